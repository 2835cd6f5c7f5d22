"""Head-role calibration for ``forcing-kv``: measure attention on a model and write a role file (``cachepolicy
calibrate MODEL --out ROLES.json``, :func:`calibrate`).

The paper's criterion (Forcing-KV, arXiv 2605.09681, Eq. 1; the reference's ``configs_head/head_profile.py``):
a head is **static** iff

    (A_generate + A_transition) / (A_total - A_sink) >= threshold        (threshold 0.8)

with ``A_*`` the attention mass of the current chunk's queries on the current chunk, on the transition anchor
(the frame before the chunk), on everything, and on the sink frames; otherwise **dynamic**. The reference's
script computes it from frame-wise attention maps (``score = sum attn[:, -4:] / sum attn[:, 1:]`` over key
frames, static iff ``>= 0.8``); its shipped files say the sink skipped was 3 frames ("last-4-key-frame mass /
mass over key frames [3:]"). What the reference leaves open (FIELD_POLICIES.md 2.1, 2.4), chosen here:

* **rollout**: one sample, the prompt :data:`DEFAULT_PROMPT`, seed 0, the model's own sampler, no eviction
  (``full``: every earlier frame is attended, as in a Self Forcing rollout within its 21 trained frames);
* **chunk**: the last of ``chunks`` (default 7: frames 18..20, the last chunk of Self Forcing's 21 frames, the
  longest full window);
* **steps**: every denoising step of that chunk (D1..D4), not the context pass; masses are summed over steps;
* **rows**: every query row of the chunk (post-RoPE), in blocks (:data:`ROW_BLOCK` rows at a time);
* **token to frame**: softmax mass summed over each key frame's tokens (post-RoPE keys), summed over query rows,
  steps and samples, then the ratio (row scaling cancels);
* **sink**: the first ``sink_frames`` = 3 frames (the shipped files' "sink_3"); **anchor**: 1 frame;
  **threshold**: 0.8, static iff ``>=`` (the script's comparison; the paper writes ``>``).

The file is written in the reference's format (:func:`head_roles_json`; ``forcing-kv`` reads it), with the
settings and every head's score under ``"calibration"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from cachepolicy.errors import ParameterError, RolloutConfigError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.policy import Policy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.engine import Session
    from cachepolicy.layers import ForwardCall, LayerContext
    from cachepolicy.models import ModelAdapter

#: the calibration prompt (one prompt with steady motion; the reference does not say which it used)
DEFAULT_PROMPT = "a dog running happily along a beach, the camera following it"
#: query rows per attention-mass block (bounds the ``[B, H, rows, keys]`` score matrix)
ROW_BLOCK = 256
#: columns of :func:`part_masses`: mass on the sink frames, the other earlier frames, the anchor, the chunk
PARTS = ("sink", "middle", "anchor", "current")


#: the ``format`` string of the reference's shipped head-role files (``configs_head/*.json``)
ROLES_FORMAT = "forcingkv_offline_head_custom2"


def head_roles_json(static: Sequence[Sequence[int]], dynamic: Sequence[Sequence[int]], *, profile: str,
                    description: str, **extra: Any) -> dict[str, Any]:
    """A head-role file in the reference's format (loads in the reference's ``_load_offline_head_groups`` and in
    :func:`read_head_roles`); ``extra`` top-level keys (e.g. the calibration's settings) are added after."""
    num_heads = len(static[0]) + len(dynamic[0])
    return {
        "format": ROLES_FORMAT,
        "profile": profile,
        "num_layers": len(static),
        "num_heads": num_heads,
        "description": description,
        "layers": [{"layer_idx": layer, "static_head": sorted(int(h) for h in s),
                    "dynamic_head": sorted(int(h) for h in d)} for layer, (s, d) in enumerate(zip(static, dynamic))],
        **extra,
    }


def part_masses(resident: torch.Tensor, own: torch.Tensor, frame: torch.Tensor, *, sink_frames: int,
                 anchor_start: int) -> torch.Tensor:
    """Attention mass per head split by key frame: float32 ``[B, H, 4]`` over :data:`PARTS`.

    Args:
        resident: float32 ``[B, H, S]`` softmax mass per resident key (summed or averaged over query rows).
        own: float32 ``[B, H, n]`` the same over the call's own keys (the current chunk).
        frame: long ``[B, S]`` absolute frame of each resident key.
        sink_frames: frames ``< sink_frames`` are the sink.
        anchor_start: frames ``>= anchor_start`` (and not sink) are the transition anchor.
    """
    import torch

    sink = (frame < sink_frames).unsqueeze(1)
    anchor = ((frame >= anchor_start) & (frame >= sink_frames)).unsqueeze(1)
    middle = ~(sink | anchor)
    parts = [(resident * mask).sum(dim=-1) for mask in (sink, middle, anchor)]
    return torch.stack([*parts, own.sum(dim=-1)], dim=-1)


def static_scores(masses: torch.Tensor) -> torch.Tensor:
    """Eq. 1's ratio ``(A_current + A_anchor) / (A_total - A_sink)`` from ``[..., 4]`` masses (:data:`PARTS`)."""
    kept = masses[..., 2] + masses[..., 3]
    return kept / (masses[..., 1] + kept)


def classify_heads(scores: torch.Tensor, threshold: float) -> tuple[list[list[int]], list[list[int]]]:
    """Static heads (``score >= threshold``) and dynamic heads per layer from ``[L, H]`` scores."""
    static = [[h for h in range(scores.shape[1]) if float(scores[layer, h]) >= threshold]
              for layer in range(scores.shape[0])]
    dynamic = [[h for h in range(scores.shape[1]) if h not in s] for layer, s in enumerate(static)]
    return static, dynamic


@attrs.frozen
class AttentionProbe(Policy):
    """Observe-only: in every layer of the denoising steps ``steps`` of chunk ``chunk``, the attention mass of all
    the chunk's query rows per key frame (:func:`part_masses`), summed into ``state[layer]`` ``[B, H, 4]``."""

    name: ClassVar[str] = "attention-probe"

    chunk: int = 0
    steps: tuple[int, ...] = ()
    sink_frames: int = 3
    anchor_frames: int = 1
    row_block: int = ROW_BLOCK

    def new_state(self) -> dict[int, Any]:
        return {}

    @hookimpl
    def cachepolicy_layer_request(self, session: Session, call: ForwardCall) -> LayerRequest | None:
        wanted = call.chunk == self.chunk and call.phase == "step" and call.attempt == 0
        return LayerRequest() if wanted and call.step in self.steps else None

    @hookimpl
    def cachepolicy_layer(self, session: Session, layer: LayerContext) -> None:
        query = layer.query
        anchor_start = layer.call.frame_start - self.anchor_frames
        total = None
        for start in range(0, query.shape[1], self.row_block):
            rows = query[:, start:start + self.row_block]
            mass = layer.attention_mass(rows)  # averaged over the block's rows
            part = part_masses(mass.resident, mass.own, layer.view.frame, sink_frames=self.sink_frames,
                                anchor_start=anchor_start) * rows.shape[1]
            total = part if total is None else total + part
        state = self.state(session)
        state[layer.index] = state.get(layer.index, 0) + total.cpu()


def calibrate(model: str | ModelAdapter, *, out: str | Path, prompts: Sequence[str] | None = None, seed: int = 0,
              chunks: int = 7, steps: Sequence[int] | None = None, sink_frames: int = 3, anchor_frames: int = 1,
              threshold: float = 0.8, model_options: dict[str, Any] | None = None,
              force: bool = False) -> dict[str, Any]:
    """Measure every head's attention on ``model`` and write Forcing-KV head roles to ``out`` (see the module
    docstring for the criterion and the choices).

    Args:
        model: a model name (``tiny-wan``, ``drift-lab``, a diffusers Wan folder) or an adapter.
        out: the JSON file to write (refused if it exists, unless ``force``).
        prompts: one per sample (default: :data:`DEFAULT_PROMPT`); seeds are ``seed, seed + 1, ...``.
        chunks: chunks generated; the last one is measured (its first frame must come after the sink and the
            anchor).
        steps: denoising-step indices of the measured chunk (default: all).
        sink_frames: frames of the sink (left out of the denominator).
        anchor_frames: frames of the transition anchor before the measured chunk.
        threshold: static iff the ratio is ``>= threshold``.
        model_options: loader options when ``model`` is a name.
        force: replace an existing ``out``.

    Returns:
        The written payload (the role file, with ``calibration``: settings, ``scores`` ``[L][H]``, counts).
    """
    from cachepolicy.api import load_model
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.outputs import atomic_write_json, check_writable
    from cachepolicy.validation import check_int

    path = Path(out)
    if path.is_dir():
        raise RolloutConfigError(f"--out {path} is a folder; give the path of the JSON file to write")
    if path.exists() and not force:
        raise RolloutConfigError(f"--out {path} exists; choose another file or pass --force to replace it")
    check_writable(path.parent)
    check_int(chunks, "chunks", low=2)
    check_int(sink_frames, "sink_frames", low=0)
    check_int(anchor_frames, "anchor_frames", low=1)
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0.0 < threshold <= 1.0):
        raise ParameterError(f"threshold={threshold!r} is not allowed; it must be a number in (0, 1]")
    prompts = list(prompts) if prompts else [DEFAULT_PROMPT]
    adapter = load_model(model, **(model_options or {})) if isinstance(model, str) else model
    info = adapter.info
    frames = info.frames_per_chunk
    chunk = chunks - 1
    if chunk * frames < sink_frames + anchor_frames:
        raise ParameterError(f"chunks={chunks}: the measured chunk starts at frame {chunk * frames}, which must come "
                             f"after the {sink_frames} sink and {anchor_frames} anchor frame(s); generate at least "
                             f"{math.ceil((sink_frames + anchor_frames) / frames) + 1} chunks")
    config = RolloutConfig(num_chunks=chunks, prompts=prompts, seeds=[seed + b for b in range(len(prompts))])
    session = Session(adapter, [], config)
    num_steps = len(session.sampler.sigmas())
    steps = tuple(range(num_steps)) if steps is None else tuple(steps)
    bad = [s for s in steps if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < num_steps]
    if not steps or bad:
        raise ParameterError(f"steps {list(steps)} are not allowed; give denoising-step indices in 0..{num_steps - 1}")
    probe = AttentionProbe(chunk=chunk, steps=steps, sink_frames=sink_frames, anchor_frames=anchor_frames)
    session = Session(adapter, [probe], config)
    session.check()  # everything is checked before the rollout and before anything is written
    session.run()
    import torch

    state = session.policy_state[probe.spec]
    masses = torch.stack([state[layer] for layer in range(info.num_layers)], dim=1).sum(dim=0)  # [L, H, 4]
    scores = static_scores(masses)
    static, dynamic = classify_heads(scores, threshold)
    counts = {"static": sum(map(len, static)), "dynamic": sum(map(len, dynamic))}
    description = (f"cachepolicy calibrate: static iff (mass on the current chunk + the {anchor_frames} anchor "
                   f"frame(s)) / (mass on key frames [{sink_frames}:]) >= {threshold:g}; otherwise dynamic")
    payload = head_roles_json(static, dynamic, profile=f"cachepolicy_sink_{sink_frames}_thr{threshold:g}",
                              description=description, calibration={
                                  "model": info.name, "prompts": prompts, "seed": seed, "chunks": chunks,
                                  "chunk": chunk, "frames": [chunk * frames, (chunk + 1) * frames - 1],
                                  "steps": list(steps), "timesteps": [session.sampler.timesteps()[s] for s in steps],
                                  "sink_frames": sink_frames, "anchor_frames": anchor_frames, "threshold": threshold,
                                  "rows": "every query row of the chunk", "policy": "full", **counts,
                                  "scores": [[round(float(v), 6) for v in layer] for layer in scores],
                                  "masses_sink_middle_anchor_current": [
                                      [[round(float(v), 6) for v in head] for head in layer]
                                      for layer in masses / masses.sum(dim=-1, keepdim=True)]})
    atomic_write_json(path, payload)
    return payload
