"""peft LoRA weights (LongLive's ``lora.pt``) merged into an original-layout Wan state dict, strictly.

LongLive 1.0 (NVlabs/LongLive at 7add41d) wraps its generator's ``CausalWanModel`` with
``peft.get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=[every nn.Linear
inside a CausalWanAttentionBlock]))`` (``utils/lora_utils.py``; rank 256, alpha 256 in
``configs/longlive_inference.yaml``) and saves ``{"generator_lora": get_peft_model_state_dict(...),
"critic_lora": ..., "step": N}`` (``trainer/distillation.py``, ``save``). The generator's keys read
``base_model.model.blocks.<i>.<self_attn|cross_attn>.<q|k|v|o>.lora_<A|B>.weight`` and
``base_model.model.blocks.<i>.ffn.<0|2>.lora_<A|B>.weight``; ``lora_A`` is ``[r, in]``, ``lora_B`` ``[out, r]``.
Its inference loads ``lora_checkpoint["generator_lora"]`` (or the file itself when that key is absent) with
``peft.set_peft_model_state_dict``.

Here the LoRA is merged as peft's ``merge`` does for ``nn.Linear``: ``W' = W + (alpha / r) * B @ A`` (computed
in float32). Everything is checked before anything is merged: unpaired ``A``/``B`` tensors, ranks that differ
between ``A`` and ``B``, between modules or from the stated rank, tensors peft's plain LoRA does not have
(DoRA magnitudes, LoRA biases, embeddings), targets the base does not have and shapes that do not fit raise
one :class:`~cachepolicy.errors.CheckpointError` listing them.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cachepolicy.adapters.wan.checkpoints import (
    WRAPPER_COMPONENTS,
    _describe,
    _format_list,
    _is_state_dict,
    _read_safetensors,
    _read_torch,
    _safetensors,
    _sniff_safetensors,
    strip_prefixes,
)
from cachepolicy.errors import CheckpointError, ParameterError

logger = logging.getLogger(__name__)

#: the entry of LongLive's ``lora.pt`` that holds the generator's LoRA (``critic_lora`` is the critic's)
LORA_GROUP = "generator_lora"
#: the prefix ``PeftModel`` puts before the wrapped model's names
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.default)?\.weight$")


def _listed(plural: str, singular: str, items: list[str]) -> str:
    """:func:`_format_list` with the title in the right number (``"1 module whose ..."``)."""
    return _format_list(plural if len(items) != 1 else singular, items)


@dataclass(frozen=True)
class LoraWeights:
    """A checked LoRA: per target module (original Wan name, e.g. ``blocks.0.self_attn.q``) its
    ``(A [r, in], B [out, r])`` pair, all of rank ``rank``."""

    path: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The generator's LoRA tensors of a ``lora.pt`` (``generator_lora`` entry, or a bare state dict), or of a
    safetensors file (flat ``generator_lora.<name>`` keys, or bare)."""
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    if _sniff_safetensors(path):
        with _safetensors(path) as handle:
            names = list(handle.keys())
        grouped = [n for n in names if n.startswith(LORA_GROUP + ".")]
        if grouped:
            return _read_safetensors(path, grouped, strip=LORA_GROUP + ".")
        if any(n.startswith("critic_lora.") for n in names):
            raise CheckpointError(f"LoRA file {path} has no '{LORA_GROUP}.' tensors (only the critic's)")
        return _read_safetensors(path)
    content = _read_torch(path)
    if isinstance(content, Mapping) and LORA_GROUP in content:
        group = content[LORA_GROUP]
        if not _is_state_dict(group):
            raise CheckpointError(f"LoRA file {path}: '{LORA_GROUP}' is a {type(group).__name__}, not a state dict")
        return dict(group)
    if _is_state_dict(content):
        return dict(content)
    held = _describe(content) if isinstance(content, Mapping) else type(content).__name__
    raise CheckpointError(f"LoRA file {path} holds {held}; expected LongLive's layout (a dict with "
                          f"'{LORA_GROUP}') or a bare peft LoRA state dict")


def read_lora(path: str | Path, *, rank: int | None = None) -> LoraWeights:
    """Read and check a peft LoRA file (see the module docstring for the layouts).

    Args:
        path: LongLive's ``lora.pt`` (or a safetensors file with the same tensors).
        rank: the rank it must have (``None``: read from the shapes; every module must share it, as one
            ``LoraConfig(r=...)`` gives).

    Raises:
        CheckpointError: unreadable file, no generator LoRA, unsupported tensors, unpaired or inconsistent
            ``A``/``B`` tensors, ranks that differ (listed, first :data:`LIST_LIMIT` of each).
    """
    path = Path(path)
    raw = _lora_tensors(path)
    names: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        for component in WRAPPER_COMPONENTS:
            key = key.replace(component, "")
        names[key.removeprefix(PEFT_PREFIX)] = value
    names = strip_prefixes(names)  # a wrapper-level LoRA (``model.blocks...``) names the same modules
    found: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in sorted(names.items()):
        match = _LORA_KEY.match(key)
        if match is None:
            unsupported.append(f"{key} {list(value.shape)}")
            continue
        found.setdefault(match["module"], {})[match["kind"]] = value
    problems = []
    if unsupported:
        note = "a plain LoRA's lora_A / lora_B weights (DoRA, LoRA bias, embeddings are not supported)"
        problems.append(_listed(f"tensors that are not {note}", f"tensor that is not {note}", unsupported))
    unpaired = [f"{module}: lora_{'B' if 'A' in pair else 'A'} missing" for module, pair in found.items()
                if len(pair) != 2]
    if unpaired:
        problems.append(_listed("unpaired modules", "unpaired module", unpaired))
    pairs = {module: (pair["A"], pair["B"]) for module, pair in found.items() if len(pair) == 2}
    inconsistent = [f"{module}: lora_A {list(a.shape)}, lora_B {list(b.shape)}" for module, (a, b) in pairs.items()
                    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]]
    if inconsistent:
        what = "lora_A [r, in] and lora_B [out, r] do not agree"
        problems.append(_listed(f"modules whose {what}", f"module whose {what}", inconsistent))
    ranks = Counter(int(a.shape[0]) for a, b in pairs.values() if a.ndim == 2)
    expected = int(rank) if rank is not None else (ranks.most_common(1)[0][0] if ranks else 0)
    off = [f"{module}: rank {a.shape[0]}" for module, (a, b) in pairs.items() if a.ndim == 2 and a.shape[0] != expected]
    if off:
        what = f"the stated lora_rank={rank}" if rank is not None else f"the rank of the others ({expected})"
        problems.append(_listed(f"modules whose rank is not {what}", f"module whose rank is not {what}", off))
    if not pairs and not problems:
        problems.append("  no lora_A / lora_B tensors at all")
    if problems:
        raise CheckpointError(f"LoRA file {path} is not a usable LoRA; nothing was loaded:\n" + "\n".join(problems))
    return LoraWeights(path=str(path), pairs=pairs, rank=expected)


def merge_lora(state_dict: Mapping[str, torch.Tensor], lora: LoraWeights, *, alpha: float | None = None,
               source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A new state dict with ``W' = W + (alpha / r) * B @ A`` for every LoRA module (peft's merge).

    Args:
        state_dict: the base's original-layout names (``blocks.0.self_attn.q.weight`` ...), prefixes removed.
        lora: from :func:`read_lora`.
        alpha: ``lora_alpha`` (``None``: the rank, i.e. a scale of 1, as LongLive's configs set).
        source: the base, for messages.

    Returns:
        The base's tensors with merged weights (float32) for the LoRA modules; the input is not modified.

    Raises:
        CheckpointError: modules the base does not have, or base weights whose shape is not ``[out, in]`` of
            the LoRA (listed); nothing is merged then.
    """
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ParameterError(f"lora_alpha={alpha!r}: expected a positive number")
    absent, mis_shaped = [], []
    for module, (a, b) in sorted(lora.pairs.items()):
        weight = state_dict.get(module + ".weight")
        if weight is None:
            absent.append(f"{module} (no {module}.weight)")
        elif tuple(weight.shape) != (b.shape[0], a.shape[1]):
            mis_shaped.append(f"{module}: base weight {list(weight.shape)}, LoRA B {list(b.shape)} @ A "
                              f"{list(a.shape)} = {[b.shape[0], a.shape[1]]}")
    if absent or mis_shaped:
        parts = [f"LoRA {lora.path} does not fit {source}; nothing was loaded:"]
        if absent:
            parts.append(_listed("modules the base does not have", "module the base does not have", absent))
        if mis_shaped:
            parts.append(_listed("mis-shaped modules", "mis-shaped module", mis_shaped))
        raise CheckpointError("\n".join(parts))
    scale = float(alpha if alpha is not None else lora.rank) / lora.rank
    merged = dict(state_dict)
    for module, (a, b) in lora.pairs.items():
        key = module + ".weight"
        merged[key] = torch.addmm(state_dict[key].float(), b.float(), a.float(), alpha=scale)
    logger.info("merged LoRA %s into %s: %d modules, rank %d, scale %.4g (alpha %s)", lora.path, source,
                len(lora.pairs), lora.rank, scale, alpha if alpha is not None else f"= rank {lora.rank}")
    return merged

