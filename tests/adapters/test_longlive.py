"""LongLive: a base training checkpoint plus peft LoRA weights, merged and loaded into stock diffusers Wan.

The files are written in LongLive 1.0's layouts (NVlabs/LongLive at 7add41d): the base as its trainer saves
it (``{"generator", "critic"}`` of ``model.``-prefixed original names), the LoRA as ``trainer/distillation.py``
``save`` does, ``{"generator_lora": get_peft_model_state_dict(...), "critic_lora": ..., "step": N}`` with
keys ``base_model.model.blocks.<i>.<module>.lora_<A|B>.weight`` for every ``nn.Linear`` of every block
(``utils/lora_utils.py``). The reference is :class:`~tests.adapters.test_checkpoints.OriginalWan` with the
LoRA applied by hand (``W + alpha/r * B @ A``) and, when peft is installed, peft's own (unmerged) LoRA
forward on a file written by ``get_peft_model_state_dict``. Tolerances are those of the checkpoint tests.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cachepolicy.adapters.wan.checkpoints import load_longlive
from cachepolicy.errors import CheckpointError, ParameterError
from tests.adapters.test_checkpoints import (
    ATOL_SINUSOID,
    RTOL_FP32,
    TIMESTEPS,
    live_wan_models,
    max_diffs,
    random_original,
    wrapped,
)

logger = logging.getLogger(__name__)

RANK = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models run faster on one thread than on two (thread hand-off dominates on a busy
    machine); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_targets(model: nn.Module) -> list[str]:
    """LongLive's ``configure_lora_for_model``: every ``nn.Linear`` inside an attention block."""
    return sorted(name for name, module in model.named_modules()
                  if name.startswith("blocks.") and isinstance(module, nn.Linear))


def random_lora(model: nn.Module, rank: int = RANK, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A [r, in], B [out, r])}`` for every target, B random too (peft initialises it to zero)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in lora_targets(model):
        weight = model.get_submodule(name).weight
        out_features, in_features = weight.shape
        pairs[name] = (torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features),
                       0.5 * torch.randn(out_features, rank, generator=generator) / math.sqrt(rank))
    return pairs


def peft_keys(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The names ``get_peft_model_state_dict`` gives a ``PeftModel`` around ``CausalWanModel``."""
    out = {}
    for module, (a, b) in pairs.items():
        out[f"base_model.model.{module}.lora_A.weight"] = a.clone()
        out[f"base_model.model.{module}.lora_B.weight"] = b.clone()
    return out


def write_base(path, generator: nn.Module, critic: nn.Module):
    torch.save({"generator": wrapped(generator), "critic": wrapped(critic)}, path)
    return path


def write_lora(path, generator_lora: dict[str, torch.Tensor], critic_lora: dict[str, torch.Tensor] | None = None,
               fmt: str = "torch"):
    """LongLive's ``lora.pt``: ``{"generator_lora", "critic_lora", "step"}`` (or flat safetensors groups)."""
    groups = {"generator_lora": generator_lora, "critic_lora": critic_lora or {}}
    if fmt == "torch":
        torch.save({**groups, "step": 1200}, path)
    else:
        save_file({f"{g}.{k}": v.contiguous() for g, sd in groups.items() for k, v in sd.items()}, path)
    return path


def merged_by_hand(base: nn.Module, pairs, scale: float) -> nn.Module:
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            reference.get_submodule(module).weight += scale * (b @ a)
    return reference


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_longlive_matches_the_lora_applied_by_hand(tmp_path, fmt):
    base, critic = random_original(30), random_original(31)
    pairs = random_lora(base)
    assert len(pairs) == 2 * 10  # q, k, v, o of both attentions and ffn.0, ffn.2 in each of 2 blocks
    base_path = write_base(tmp_path / "longlive_base.pt", base, critic)
    lora_path = write_lora(tmp_path / f"lora.{'pt' if fmt == 'torch' else 'safetensors'}", peft_keys(pairs),
                           peft_keys(random_lora(critic, seed=1)), fmt=fmt)
    for alpha, scale in ((None, 1.0), (2.0, 0.5)):  # default alpha = rank (LongLive: 256 / 256)
        adapter = load_longlive(str(base_path), lora=str(lora_path), lora_alpha=alpha, latent_size=(4, 4),
                                text_encoder=lambda prompts: torch.zeros(len(prompts), 5, 24))
        assert adapter.info.name == "longlive"
        reference = merged_by_hand(base, pairs, scale)
        for label, t in TIMESTEPS.items():
            d64, d32 = max_diffs(reference, adapter.model, t)
            logger.info("[longlive %s, alpha %s, %s] max |diffusers - original + LoRA|: float64 sinusoid %.2e, "
                        "float32 sinusoid %.2e (relative)", fmt, alpha, label, d64, d32)
            assert d64 <= ATOL_SINUSOID and d32 <= RTOL_FP32
        assert max_diffs(base, adapter.model, TIMESTEPS["uniform"])[1] > 1e-2  # the LoRA changed the model


def test_longlive_matches_peft_on_a_file_peft_wrote(tmp_path):
    """The LoRA file as ``peft.get_peft_model_state_dict`` writes it; peft's unmerged forward is the reference."""
    peft = pytest.importorskip("peft")
    base = random_original(32)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=lora_targets(base)))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    saved = peft.get_peft_model_state_dict(model)
    assert set(saved) == set(peft_keys(random_lora(base)))  # the names written by hand above
    base_path = write_base(tmp_path / "longlive_base.pt", base, random_original(33))
    lora_path = write_lora(tmp_path / "lora.pt", {k: v.clone() for k, v in saved.items()})
    adapter = load_longlive(str(base_path), lora=str(lora_path), lora_alpha="8", lora_rank=str(RANK),
                            latent_size="4x4", text_encoder=lambda prompts: torch.zeros(len(prompts), 5, 24))
    model.eval()
    for label, t in TIMESTEPS.items():
        d64, d32 = max_diffs(model, adapter.model, t)
        logger.info("[longlive vs peft, %s] float64 sinusoid %.2e, float32 sinusoid %.2e (relative)", label, d64, d32)
        assert d64 <= ATOL_SINUSOID and d32 <= RTOL_FP32


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_loras_are_refused_and_leave_nothing_behind(tmp_path):
    base = random_original(34)
    base_path = write_base(tmp_path / "longlive_base.pt", base, random_original(35))
    good = peft_keys(random_lora(base))
    before = live_wan_models()

    def refused(generator_lora, match, *, error=CheckpointError, **options):
        path = write_lora(tmp_path / "lora.pt", generator_lora)
        with pytest.raises(error, match=match):
            load_longlive(str(base_path), lora=str(path), latent_size=(4, 4), **options)

    refused(good, r"modules whose rank is not the stated lora_rank=256.*\n.*blocks.0.cross_attn.k: rank 4",
            lora_rank=256)
    odd = dict(good)
    odd["base_model.model.blocks.1.ffn.2.lora_A.weight"] = torch.randn(3, 96)
    odd["base_model.model.blocks.1.ffn.2.lora_B.weight"] = torch.randn(256, 3)
    refused(odd, r"1 module whose rank is not the rank of the others \(4\):\n    blocks.1.ffn.2: rank 3")
    torn = dict(good)
    torn["base_model.model.blocks.1.ffn.2.lora_A.weight"] = torch.randn(4, 96)
    torn["base_model.model.blocks.1.ffn.2.lora_B.weight"] = torch.randn(256, 3)
    refused(torn, r"do not agree:\n    blocks.1.ffn.2: lora_A \[4, 96\], lora_B \[256, 3\]")
    refused(peft_keys(random_lora(random_original(36, ffn_dim=64))),
            r"does not fit checkpoint .*\['generator'\]; nothing was loaded:\n  4 mis-shaped modules:\n"
            r"    blocks.0.ffn.0: base weight \[96, 256\], LoRA B \[64, 4\] @ A \[4, 256\] = \[64, 256\]")
    refused(peft_keys(random_lora(random_original(37, num_layers=3))),
            r"10 modules the base does not have:\n    blocks.2.cross_attn.k \(no blocks.2.cross_attn.k.weight\)")
    refused({k: v for k, v in good.items() if k != "base_model.model.blocks.0.ffn.0.lora_B.weight"},
            r"1 unpaired module:\n    blocks.0.ffn.0: lora_B missing")
    refused({**good, "base_model.model.blocks.0.ffn.0.lora_magnitude_vector": torch.ones(96)},
            r"1 tensor that is not a plain LoRA's lora_A / lora_B weights \(DoRA, LoRA bias, embeddings are not "
            r"supported\):\n    blocks.0.ffn.0.lora_magnitude_vector \[96\]")
    refused(good, r"lora_alpha=-1: expected a positive number", error=ParameterError, lora_alpha=-1)
    path = write_lora(tmp_path / "lora.pt", good)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*lora.pt.*truncated"):
        load_longlive(str(base_path), lora=str(path), latent_size=(4, 4))
    with pytest.raises(ParameterError, match=r"needs lora=PATH"):
        load_longlive(str(base_path), latent_size=(4, 4))
    with pytest.raises(CheckpointError, match=r"LoRA file .*absent.pt does not exist"):
        load_longlive(str(base_path), lora=str(tmp_path / "absent.pt"))
    torch.save({"critic_lora": good, "step": 3}, tmp_path / "critic_only.pt")
    with pytest.raises(CheckpointError, match=r"holds 'critic_lora', 'step'; expected LongLive's layout"):
        load_longlive(str(base_path), lora=str(tmp_path / "critic_only.pt"))
    assert live_wan_models() == before


def test_model_entry(registry, tmp_path):
    base = random_original(38)
    base_path = write_base(tmp_path / "longlive_base.pt", base, random_original(39))
    lora_path = write_lora(tmp_path / "lora.pt", peft_keys(random_lora(base)))
    entry = registry.model("longlive")
    with pytest.raises(ParameterError, match=r"unknown option\(s\) \['lora_scale'\].*lora, lora_alpha, lora_rank"):
        entry.load(checkpoint=str(base_path), lora=str(lora_path), lora_scale=1)
    adapter = entry.load(checkpoint=str(base_path), lora=str(lora_path), latent_size="4x4")
    assert adapter.info.name == "longlive" and adapter.info.tokens_per_frame == 4
