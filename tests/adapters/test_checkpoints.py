"""Checkpoint loaders: tiny random checkpoints written in the real layouts load into stock diffusers Wan.

The reference is :class:`OriginalWan`, a direct reimplementation (written here from the original Wan2.1
``WanModel``'s documented structure, no fetched code) of the original forward and parameter layout:
``patch_embedding``; ``text_embedding`` (Linear, tanh-GELU, Linear); ``time_embedding`` (Linear, SiLU,
Linear) on a float64 cos|sin sinusoid; ``time_projection`` (SiLU, Linear to 6 x dim); blocks of
``norm1`` -> modulated ``self_attn`` (q, k, v, o, RMS ``norm_q``/``norm_k`` over all heads, 3-axis complex
RoPE) -> ``norm3`` (affine LayerNorm) -> ``cross_attn`` -> ``norm2`` -> modulated ``ffn`` (0, 2), with a
``modulation`` table; ``head`` (norm, modulation, ``head``); unpatchify. Per-frame timesteps are applied as
Self Forcing's ``CausalWanModel`` does: one modulation per frame, shared by its tokens.

Tolerances (fp32). diffusers computes the timestep sinusoid in float32, the original in float64: for
t <= 1000 the arguments ``t * 10000^(-i/half)`` differ by up to ~1000 * 6e-8 = 6e-5 rad, which moves the
sinusoid by up to ~6e-5 and the output (through the time MLP and six modulations per block) by ~1e-5
(measured: at most 1.3e-5 on outputs of peak ~3.5). So the faithful float64 reference is compared at
``ATOL_SINUSOID`` = 1e-4 absolute, and the same reference with a float32 sinusoid must agree to
``RTOL_FP32`` = 1e-5 of the output's peak magnitude (measured: ~6e-6 absolute, 2e-6 relative; only the
summation order differs). The maxima are logged at INFO. A wrong conversion (norm2/norm3 not swapped,
the wrong EMA/non-EMA weights, the wrong head split) gives differences of order 1e-3 to 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file
from torch import nn

from cachepolicy.adapters.wan.checkpoints import (
    infer_config,
    load_diffusers_folder,
    load_training_checkpoint,
    original_to_diffusers,
    strip_prefixes,
)
from cachepolicy.cli import main
from cachepolicy.errors import CheckpointError, ParameterError

logger = logging.getLogger(__name__)

ATOL_SINUSOID = 1e-4  # float64 (original) vs float32 (diffusers) timestep sinusoid, see the module docstring
RTOL_FP32 = 1e-5  # same arithmetic up to summation order, relative to the output's peak magnitude

# Wan2.1-shaped but tiny: 2 heads x 128 channels, so the loader's default (dim / 128 heads) applies
TINY = dict(dim=256, num_heads=2, ffn_dim=96, num_layers=2, in_dim=4, out_dim=4, text_dim=24, freq_dim=32,
            patch_size=(1, 2, 2), eps=1e-6)


# ------------------------------------------------------------------ original-layout reimplementation
def sinusoid(dim: int, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[N]`` timesteps -> ``[N, dim]`` = cat(cos, sin) of ``t * 10000^(-i / (dim/2))`` computed in ``dtype``."""
    half = dim // 2
    t = t.to(dtype)
    angles = torch.outer(t, torch.pow(10000, -torch.arange(half, dtype=dtype) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_table(max_len: int, dim: int) -> torch.Tensor:
    """Complex ``[max_len, dim/2]`` table ``exp(i * pos * 10000^(-2j/dim))`` (float64)."""
    inv = 1.0 / torch.pow(10000, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rope_apply(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, L, n, d]`` (L = f*h*w tokens) by the 3-axis complex RoPE of ``grid``."""
    f, h, w = grid
    c = x.shape[3] // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat([
        parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:3], -1, 2))
    return torch.view_as_real(xc * table).flatten(3).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, ``[B, Lq, n, d]`` x ``[B, Lk, n, d]`` -> ``[B, Lq, n * d]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
        q = rope_apply(self.split(self.norm_q(self.q(x))), grid, freqs)
        k = rope_apply(self.split(self.norm_k(self.k(x))), grid, freqs)
        return self.o(attention(q, k, self.split(self.v(x))))


class CrossAttention(SelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q = self.split(self.norm_q(self.q(x)))
        k = self.split(self.norm_k(self.k(context)))
        return self.o(attention(q, k, self.split(self.v(context))))


class Block(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)  # the cross-attention norm
        self.cross_attn = CrossAttention(dim, heads, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, dim]``; ``e`` ``[B, L, 6, dim]`` (per-token modulation input)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.unsqueeze(0) + e).unbind(2)
        x = x + self.self_attn(self.norm1(x).float() * (1 + scale) + shift, grid, freqs) * gate
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x).float() * (1 + c_scale) + c_shift) * c_gate


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch))
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``e`` ``[B, L, dim]`` (the time embedding of each token's frame)."""
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class OriginalWan(nn.Module):
    """The original Wan2.1 T2V transformer's parameter layout and forward (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_layers: int, in_dim: int, out_dim: int,
                 text_dim: int, freq_dim: int, patch_size: tuple[int, int, int], eps: float) -> None:
        super().__init__()
        self.dim, self.freq_dim, self.out_dim, self.patch_size = dim, freq_dim, out_dim, patch_size
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads, eps) for _ in range(num_layers))
        self.head = Head(dim, out_dim, patch_size, eps)
        d = dim // num_heads
        self.freqs = torch.cat([rope_table(1024, d - 4 * (d // 6)), rope_table(1024, 2 * (d // 6)),
                                rope_table(1024, 2 * (d // 6))], dim=1)  # a plain attribute, not a buffer

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                sinusoid_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``x`` ``[B, C, F, H, W]``; ``t`` ``[B]`` or per frame ``[B, F]``; ``context`` ``[B, Lc, text_dim]``
        -> ``[B, C_out, F, H, W]``."""
        batch = x.shape[0]
        x = self.patch_embedding(x)
        f, h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        per_frame = t.reshape(batch, -1).expand(batch, f)  # [B, F]
        e = self.time_embedding(sinusoid(self.freq_dim, per_frame.flatten(), sinusoid_dtype).float())
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))  # [B*F, 6, dim]
        e = e.view(batch, f, 1, self.dim).expand(batch, f, h * w, self.dim).reshape(batch, -1, self.dim)
        e0 = e0.view(batch, f, 1, 6, self.dim).expand(batch, f, h * w, 6, self.dim).reshape(batch, -1, 6, self.dim)
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, e0, (f, h, w), self.freqs, context)
        x = self.head(x, e)
        p_t, p_h, p_w = self.patch_size
        x = x.view(batch, f, h, w, p_t, p_h, p_w, self.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(batch, self.out_dim, f * p_t, h * p_h, w * p_w)


def random_original(seed: int, **overrides) -> OriginalWan:
    """An :class:`OriginalWan` with *every* parameter random (the original init zeroes the head)."""
    torch.manual_seed(seed)
    model = OriginalWan(**{**TINY, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("modulation"):
                values = 0.5 * torch.randn(param.shape, generator=generator)
            elif param.ndim >= 2:
                values = torch.randn(param.shape, generator=generator) / math.sqrt(math.prod(param.shape[1:]))
            elif name.endswith("bias"):
                values = 0.1 * torch.randn(param.shape, generator=generator)
            else:  # RMS / LayerNorm weights
                values = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            param.copy_(values)
    assert all(float(p.detach().abs().mean()) > 1e-3 for p in model.parameters())  # nothing left at its (zero) init
    return model.eval()


def wrapped(model: nn.Module, *, fsdp: bool = False) -> dict[str, torch.Tensor]:
    """The state dict as the AR systems save it: ``model.`` + original names (EMA: FSDP components)."""
    out = {}
    for key, value in model.state_dict().items():
        if fsdp:  # EMA_FSDP.shadow walks the size-wrapped FSDP tree: each block and the root are wrapped
            key = "_fsdp_wrapped_module." + re.sub(r"^blocks\.(\d+)\.", r"blocks.\1._fsdp_wrapped_module.", key)
        out["model." + key] = value.clone()
    return out


def write_training_checkpoint(path: Path, generator: nn.Module, ema: nn.Module | None, *,
                              critic: nn.Module | None = None, fmt: str = "torch") -> Path:
    """Self Forcing's trainer layout: ``{"generator", "critic", "generator_ema"}``; or the same as flat
    safetensors keys ``<group>.<name>``."""
    groups = {"generator": wrapped(generator)}
    if critic is not None:
        groups["critic"] = wrapped(critic)
    if ema is not None:
        groups["generator_ema"] = wrapped(ema, fsdp=True)
    if fmt == "torch":
        torch.save(groups, path)
    else:
        save_file({f"{g}.{k}": v.contiguous() for g, sd in groups.items() for k, v in sd.items()}, path)
    return path


def inputs(seed: int = 0, batch: int = 2, frames: int = 3, size: int = 4, context_len: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_dim"], frames, size, size, generator=generator)
    context = torch.randn(batch, context_len, TINY["text_dim"], generator=generator)
    return x, context


def diffusers_forward(model: WanTransformer3DModel, x: torch.Tensor, t: torch.Tensor,
                      context: torch.Tensor) -> torch.Tensor:
    """Per-frame ``t`` ``[B, F]`` becomes diffusers' per-token ``(B, L)`` timestep."""
    if t.ndim == 2:
        p_t, p_h, p_w = model.config.patch_size
        t = t.repeat_interleave((x.shape[3] // p_h) * (x.shape[4] // p_w), dim=1)
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


def max_diffs(reference: OriginalWan, loaded: WanTransformer3DModel, t: torch.Tensor) -> tuple[float, float]:
    """(max |diff| vs the float64-sinusoid reference, max |diff| vs the float32-sinusoid reference divided by
    the reference's peak magnitude)."""
    x, context = inputs()
    with torch.no_grad():
        want64 = reference(x, t, context, torch.float64)
        want32 = reference(x, t, context, torch.float32)
    got = diffusers_forward(loaded, x, t, context)
    assert got.shape == want64.shape and float(want64.abs().mean()) > 0.1  # not vacuous
    return float((got - want64).abs().max()), float((got - want32).abs().max() / want32.abs().max())


def live_wan_models() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, WanTransformer3DModel)}


# ------------------------------------------------------------------------------------------ equivalence
TIMESTEPS = {
    "uniform": torch.tensor([1000.0, 625.0]),
    "per-frame": torch.tensor([[937.5, 833.3333, 0.0], [250.0, 1000.0, 625.0]]),
}


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
@pytest.mark.parametrize("ema", [True, False])
def test_training_checkpoint_matches_original_forward(tmp_path, fmt, ema):
    generator, ema_model, critic = random_original(1), random_original(2), random_original(3)
    path = write_training_checkpoint(tmp_path / f"model.{'pt' if fmt == 'torch' else 'safetensors'}",
                                     generator, ema_model, critic=critic, fmt=fmt)
    loaded = load_training_checkpoint(path, ema=ema)
    assert isinstance(loaded, WanTransformer3DModel)
    config = loaded.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim, config.ffn_dim) == (2, 2, 128, 96)
    assert (config.in_channels, config.out_channels, config.text_dim, config.freq_dim) == (4, 4, 24, 32)
    reference = ema_model if ema else generator
    for label, t in TIMESTEPS.items():
        d64, d32 = max_diffs(reference, loaded, t)
        logger.info("[%s, ema=%s, %s] max |diffusers - original|: float64 sinusoid %.2e (absolute), float32 "
                    "sinusoid %.2e (relative to peak)", fmt, ema, label, d64, d32)
        assert d64 <= ATOL_SINUSOID
        assert d32 <= RTOL_FP32
    other = generator if ema else ema_model  # the other weights really differ: the flag chose
    assert max_diffs(other, loaded, TIMESTEPS["uniform"])[1] > 1e-2


def test_conversion_swaps_norms_and_keeps_every_key():
    """diffusers' converter maps each original name; norm3 (cross-attention norm) becomes norm2."""
    original = random_original(4)
    stripped = strip_prefixes(wrapped(original, fsdp=True))
    assert set(stripped) == set(original.state_dict())
    converted, origin = original_to_diffusers(stripped)
    assert origin["blocks.1.norm2.weight"] == "blocks.1.norm3.weight"
    assert origin["scale_shift_table"] == "head.modulation" and origin["proj_out.weight"] == "head.head.weight"
    assert torch.equal(converted["blocks.1.norm2.weight"], original.blocks[1].norm3.weight)
    assert len(converted) == len(stripped)


def test_explicit_config_in_original_and_diffusers_vocabulary(tmp_path):
    """Heads are not in the weights: 4 x 64 needs a config (an original Wan config.json or a dict)."""
    reference = random_original(5, num_heads=4)
    path = write_training_checkpoint(tmp_path / "model.pt", reference, None)
    original_config = tmp_path / "config.json"
    original_config.write_text(json.dumps({"_class_name": "WanModel", "dim": 256, "num_heads": 4, "ffn_dim": 96,
                                           "in_dim": 4, "out_dim": 4, "freq_dim": 32, "num_layers": 2,
                                           "model_type": "t2v", "text_len": 512, "eps": 1e-6}))
    for config in (original_config, {"num_attention_heads": 4}):
        loaded = load_training_checkpoint(path, ema=False, config=config)
        assert (loaded.config.num_attention_heads, loaded.config.attention_head_dim) == (4, 64)
        d64, d32 = max_diffs(reference, loaded, TIMESTEPS["per-frame"])
        logger.info("[4 heads x 64, config %s] max diff: float64 sinusoid %.2e (absolute), float32 %.2e "
                    "(relative)", type(config).__name__, d64, d32)
        assert d64 <= ATOL_SINUSOID and d32 <= RTOL_FP32
    # the default (dim / 128 heads) loads the same weights as 2 x 128: a different function, hence the option
    default = load_training_checkpoint(path, ema=False)
    assert default.config.num_attention_heads == 2
    assert max_diffs(reference, default, TIMESTEPS["uniform"])[1] > 1e-3


def test_diffusers_folder_round_trip_and_pipeline_layout(tmp_path):
    source = load_training_checkpoint(write_training_checkpoint(tmp_path / "m.pt", random_original(6), None),
                                      ema=False)
    source.save_pretrained(tmp_path / "pipe" / "transformer")
    for folder in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        loaded = load_diffusers_folder(folder)
        for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    half = load_diffusers_folder(tmp_path / "pipe", dtype="bfloat16")
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.blocks[0].scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules


# ---------------------------------------------------------------------------------------- bad input
def test_wrong_size_against_the_stated_config(tmp_path):
    path = write_training_checkpoint(tmp_path / "model.pt", random_original(7, ffn_dim=64), None)
    with pytest.raises(CheckpointError, match=r"ffn_dim: config 96, checkpoint 64"):
        load_training_checkpoint(path, ema=False, config={"ffn_dim": 96, "num_heads": 2})


def test_inconsistent_block_sizes_list_mis_shaped_keys_with_original_names(tmp_path):
    generator = random_original(8)
    generator.blocks[1].ffn = nn.Sequential(nn.Linear(256, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 256))
    path = write_training_checkpoint(tmp_path / "model.pt", generator, None)
    with pytest.raises(CheckpointError) as excinfo:
        load_training_checkpoint(path, ema=False)
    message = str(excinfo.value)
    assert "3 mis-shaped keys" in message and "nothing was loaded" in message
    assert "blocks.1.ffn.net.0.proj.weight (original blocks.1.ffn.0.weight): checkpoint [64, 256], model [96, 256]" \
        in message


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    state = wrapped(random_original(9, num_layers=3))
    state = {k: v for k, v in state.items() if not k.startswith("model.blocks.1.cross_attn.")}  # a hole
    state.update({f"model.extra_{i}.weight": torch.ones(2) for i in range(12)})
    torch.save({"generator": state}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as excinfo:
        load_training_checkpoint(tmp_path / "model.pt", ema=False)
    message = str(excinfo.value)
    assert "10 missing keys:" in message and "blocks.1.attn2.to_q.weight" in message
    assert "12 unexpected keys:" in message and "... and 2 more" in message
    with pytest.raises(CheckpointError, match="not a Wan2.1 transformer: it has no 'patch_embedding.weight'"):
        torch.save({"generator": {"model.encoder.weight": torch.ones(3)}}, tmp_path / "other.pt")
        load_training_checkpoint(tmp_path / "other.pt", ema=False)


def test_diffusers_folder_is_strict(tmp_path):
    from safetensors.torch import load_file

    model = load_training_checkpoint(write_training_checkpoint(tmp_path / "m.pt", random_original(10), None),
                                     ema=False)
    model.save_pretrained(tmp_path / "ok")
    weights = load_file(tmp_path / "ok" / "diffusion_pytorch_model.safetensors")
    cases = {
        "unexpected": ({**weights, "blocks.0.attn1.norm_added_k.weight": torch.ones(256)}, "1 unexpected key:"),
        "missing": ({k: v for k, v in weights.items() if k != "proj_out.bias"}, "1 missing key:"),
        "shape": ({**weights, "proj_out.bias": torch.ones(8)}, "proj_out.bias: checkpoint [8], model [16]"),
    }
    for name, (state, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            load_diffusers_folder(folder)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "missing" / "config.json").write_text(json.dumps({**config, "ffn_dim": 128}))
    with pytest.raises(CheckpointError, match=r"ffn.net.0.proj.weight: checkpoint \[96, 256\], model \[128, 256\]"):
        load_diffusers_folder(tmp_path / "missing")


def test_missing_ema_names_the_keys_present(tmp_path):
    torch_file = write_training_checkpoint(tmp_path / "model.pt", random_original(11), None, critic=random_original(12))
    with pytest.raises(CheckpointError, match=r"has no 'generator_ema' key; it holds 'critic', 'generator'; "
                                              r"pass ema=false"):
        load_training_checkpoint(torch_file, ema=True)
    flat = write_training_checkpoint(tmp_path / "model.safetensors", random_original(11), None, fmt="safetensors")
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' tensors; its key groups are 'generator'"):
        load_training_checkpoint(flat, ema=True)
    bare = tmp_path / "bare.pt"
    torch.save(random_original(11).state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_training_checkpoint(bare, ema=True)
    assert load_training_checkpoint(bare, ema=False).config.num_layers == 2  # original names, no prefix


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    name = "model.pt" if fmt == "torch" else "model.safetensors"
    path = write_training_checkpoint(tmp_path / name, random_original(13), random_original(14), fmt=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {re.escape(str(path))}.*truncated"):
        load_training_checkpoint(path, ema=True)


def test_refuses_to_unpickle_objects(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"generator": wrapped(random_original(15)), "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_training_checkpoint(path, ema=False)


def test_failed_loads_leave_nothing_behind(tmp_path):
    """No model built by a failed load survives it, and a model loaded before is untouched."""
    good = load_training_checkpoint(write_training_checkpoint(tmp_path / "good.pt", random_original(16), None),
                                    ema=False)
    before_weights = {k: v.clone() for k, v in good.state_dict().items()}
    bad = random_original(17)
    bad.blocks[0].ffn = nn.Sequential(nn.Linear(256, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 256))
    bad_path = write_training_checkpoint(tmp_path / "bad.pt", bad, None)
    before = live_wan_models()
    for kwargs in ({"ema": False}, {"ema": True}, {"ema": False, "config": {"num_attention_heads": 3}}):
        with pytest.raises(CheckpointError):
            load_training_checkpoint(bad_path, **kwargs)
    assert live_wan_models() == before
    assert all(torch.equal(before_weights[k], v) for k, v in good.state_dict().items())


# ------------------------------------------------------------------------------- model entries & CLI
def test_cli_runs_a_self_forcing_checkpoint(tmp_path, caplog):
    path = write_training_checkpoint(tmp_path / "self_forcing_dmd.pt", random_original(18), random_original(19))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="cachepolicy.adapters.wan.checkpoints"):
        code = main(["run", "self-forcing", "--model-option", f"checkpoint={path}", "--model-option",
                     "latent_size=4x4", "--policy", "sliding-window:frames=3", "--chunks", "2", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    assert "HashedWordEncoder" in caplog.text and "not UMT5" in caplog.text
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == "self-forcing" and run["tokens_per_frame"] == 4


def test_loader_options_are_checked(registry, tmp_path):
    entry = registry.model("self-forcing")
    with pytest.raises(ParameterError, match="needs checkpoint=PATH"):
        entry.load()
    with pytest.raises(ParameterError, match=r"unknown option\(s\) \['emma'\].*allowed: checkpoint, ema"):
        entry.load(checkpoint="x.pt", emma=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        entry.load(checkpoint=str(tmp_path / "absent.pt"))
    path = write_training_checkpoint(tmp_path / "model.pt", random_original(20), None)
    with pytest.raises(ParameterError, match="latent_size='4by4'"):
        entry.load(checkpoint=str(path), ema=False, latent_size="4by4")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path.rename(folder / "model.pt")
    causvid = registry.model("causvid").load(checkpoint=str(folder), latent_size=(4, 4))  # ema=false default
    assert causvid.info.name == "causvid" and causvid.info.tokens_per_frame == 4


def test_infer_config_needs_heads_when_dim_is_not_a_multiple_of_128():
    state = original_to_diffusers(strip_prefixes(wrapped(random_original(21, dim=96, num_heads=2))))[0]
    with pytest.raises(CheckpointError, match="hidden size 96 is not a multiple of 128"):
        infer_config(state)
    assert infer_config(state, {"num_heads": 2})["attention_head_dim"] == 48
    with pytest.raises(ParameterError, match="unknown Wan config key 'heads'"):
        infer_config(state, {"heads": 2})



LONGLIVE_YAML = """\
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
num_frame_per_block: 3
model_name: Wan2.1-T2V-1.3B
model_kwargs:
  local_attn_size: 12
  timestep_shift: 5.0
  sink_size: 3
num_output_frames: 120
global_sink: true
context_noise: 0
"""


def test_an_ar_systems_own_config_is_refused_with_its_policies_and_sampler(tmp_path, registry):
    """LongLive's ``longlive_inference.yaml`` passed as ``config=``: refused before the checkpoint is read, with
    the policy spec and the sampler option its keys mean; both round-trip to the longlive recipe."""
    from cachepolicy.models import parse_sampler
    from cachepolicy.policy import build_policies
    from cachepolicy.recipes import get_recipe

    path = tmp_path / "longlive_inference.yaml"
    path.write_text(LONGLIVE_YAML)
    with pytest.raises(ParameterError) as caught:  # the absent checkpoint is never reached
        registry.model("longlive").load(checkpoint=str(tmp_path / "absent.pt"), lora=str(tmp_path / "absent_lora.pt"),
                                        config=str(path))
    message = str(caught.value)
    assert "keys of an autoregressive system's own inference config (context_noise, denoising_step_list" in message
    assert ("local_attn_size=12, sink_size=3 with 3 frames per block is --policy "
            "attention-sink:frames=3+sliding-window:frames=6 (the policies of the longlive recipe: --recipe longlive)"
            in message)
    spec = re.search(r"--policy (\S+)", message).group(1)
    assert [p.spec for p in build_policies([spec], registry.policies)] == list(get_recipe("longlive").policies)
    sampler = re.search(r"--model-option sampler=(\S+)", message).group(1)
    assert parse_sampler(sampler) == get_recipe("longlive").sampler
    assert "(the sampler of the self-forcing and longlive recipes)" in message
    assert "config= takes only the architecture" in message


@pytest.mark.parametrize("config, expected", [
    ({"local_attn_size": 9, "num_frame_per_block": 3, "num_heads": 12}, "is --policy sliding-window:frames=6."),
    ({"model_kwargs": {"local_attn_size": 6, "sink_size": 3}, "num_frame_per_block": 3},
     "leaves a window of 0 frames, shorter than one chunk"),
    ({"model_kwargs": {"local_attn_size": -1, "sink_size": 0}}, "local_attn_size=-1 (global attention) is the default"),
    ({"denoising_step_list": [1000, 757, 522, 0], "timestep_shift": 8.0},
     "sampler=steps=1000/757/522,shift=8,warp=false,table=true,context_noise=0 (the sampler of the causvid recipe)"),
    ({"denoising_step_list": [1000, 800, 600, 400, 200], "warp_denoising_step": True,
      "model_kwargs": {"timestep_shift": 5.0}}, "(the sampler of the rolling-forcing recipe)"),
])
def test_ar_config_keys_in_a_dict_are_translated(config, expected):
    state = original_to_diffusers(strip_prefixes(wrapped(random_original(21))))[0]
    with pytest.raises(ParameterError) as caught:
        infer_config(state, config)
    assert expected in str(caught.value)
