"""Drive a policy through the engine on a golden fixture recorded from reference code (``tools/golden/README.md``).

A fixture holds the tiny model's weights (original Wan key names), the conditioning, every noise draw of the
reference loop and its outputs. Here the weights load into a stock ``diffusers.WanTransformer3DModel``
through cachepolicy's checkpoint loader (diffusers' own key converter), the conditioning comes from a text
encoder that returns it, the draws go through :class:`cachepolicy.noise.RecordedNoise` (use 0: the chunk's
frames of ``noise_initial``; use ``i``: the ``renoise`` draw recorded after call ``D{i}``), and the sampler is
Self Forcing's float32 table (1000, 937.5, 833.33, 625; context pass at 0). The timestep sinusoid is computed
in float64 as in the reference (:func:`~cachepolicy.adapters.wan.adapter.use_float64_sinusoid`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch
from safetensors.torch import load_file

from cachepolicy.adapters.wan.adapter import WanAdapter, use_float64_sinusoid
from cachepolicy.adapters.wan.checkpoints import load_training_checkpoint
from cachepolicy.engine import RolloutConfig, RolloutResult, Session
from cachepolicy.hookspecs import hookimpl
from cachepolicy.models import Sampler
from cachepolicy.noise import RecordedNoise
from cachepolicy.policy import Policy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
#: the fixtures' budget: max abs difference of the latents (fp32)
TOLERANCE = 2e-5
CALL_USE = {"D1": 1, "D2": 2, "D3": 3}


@attrs.frozen(eq=False)
class Fixture:
    """One recorded reference run: ``meta`` (golden.json), ``decisions`` (decisions.json) and the tensors."""

    name: str
    meta: dict[str, Any]
    decisions: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def chunks(self) -> int:
        return self.meta["pipeline"]["chunks"]

    @property
    def tokens_per_frame(self) -> int:
        return self.meta["tiny_model"]["tokens_per_frame"]

    def reference(self) -> torch.Tensor:
        """The reference latents as ``[B, C, T, H, W]`` (the engine's layout)."""
        return self.tensors["latents"].permute(0, 2, 1, 3, 4)

    def noise(self) -> RecordedNoise:
        draws = {}
        initial = self.tensors["noise_initial"]  # [B, T, C, H, W]
        for chunk in range(self.chunks):
            draws[(chunk, 0)] = initial[:, 3 * chunk:3 * chunk + 3].permute(0, 2, 1, 3, 4)
        for draw in self.meta["draw_order"]:
            if draw["tensor"] == "renoise":
                eps = self.tensors["renoise"][draw["row"]].unflatten(0, (-1, 3))  # [B, 3, C, H, W]
                draws[(draw["chunk"], CALL_USE[draw["after_call"]])] = eps.permute(0, 2, 1, 3, 4)
        return RecordedNoise(draws)

    def adapter(self, *, float64_sinusoid: bool = True) -> WanAdapter:
        tiny = self.meta["tiny_model"]
        model = load_training_checkpoint(FIXTURES / self.name / "weights.safetensors", ema=False,
                                         config={"num_attention_heads": tiny["num_heads"]})
        if float64_sinusoid:
            use_float64_sinusoid(model)
        conditioning = self.tensors["conditioning"]

        def encode(prompts: list[str]) -> torch.Tensor:
            if conditioning.ndim == 3:  # one prompt
                return conditioning.expand(len(prompts), -1, -1)
            return torch.cat([conditioning[int(p.removeprefix("scene"))] for p in prompts])  # sceneI

        return WanAdapter(model, name=f"golden-{self.name}", latent_size=tuple(tiny["latent_hw"]),
                          text_encoder=encode, frames_per_chunk=tiny["frames_per_chunk"])


def load(name: str) -> Fixture:
    folder = FIXTURES / name
    return Fixture(name, json.loads((folder / "golden.json").read_text()),
                   json.loads((folder / "decisions.json").read_text()),
                   load_file(str(folder / "tensors.safetensors")))


def rollout(fixture: Fixture, policies: list, *, chunks: int | None = None, prompt: str = "scene0",
            switches: tuple = (), float64_sinusoid: bool = True, observers: list | None = None
            ) -> tuple[RolloutResult, Session]:
    """Run ``policies`` (plus ``observers``) on the fixture's model, conditioning and noise (the first ``chunks``
    chunks, default all; ``switches`` past them are left out)."""
    adapter = fixture.adapter(float64_sinusoid=float64_sinusoid)
    chunks = chunks or fixture.chunks
    config = RolloutConfig(num_chunks=chunks, prompts=[prompt], seeds=[0],
                           sampler=Sampler(table=True), noise=fixture.noise(),
                           prompt_switches=[s for s in switches if s.chunk < chunks],
                           trace_residency=True)
    session = Session(adapter, [*policies, *(observers or [])], config)
    return session.run(), session


def chunk_errors(result: RolloutResult, fixture: Fixture) -> list[float]:
    """Max abs difference of each chunk's latents from the reference's."""
    reference = fixture.reference()
    frames = result.latents.shape[2]
    return [float((result.latents[:, :, f:f + 3] - reference[:, :, f:f + 3]).abs().max())
            for f in range(0, frames, 3)]


def token_ids(runs: list[list[int]]) -> list[int]:
    """Half-open ``[start, end)`` runs -> the token ids they cover."""
    return [i for start, end in runs for i in range(start, end)]


def held_by_head(record: dict[str, Any]) -> dict[int, list[int]]:
    """Per head, the sorted token ids the reference's caches held after a context pass: one ``cache_after_ctx``
    record of a per-head fixture (Forcing-KV, Dummy Forcing), whose ``*_heads`` groups list their ``heads`` and
    runs of ids per cache part (``tokens``: a count, skipped)."""
    out = {}
    for key, group in record.items():
        if not key.endswith("_heads"):
            continue
        ids = sorted(i for name, runs in group.items() if name not in ("heads", "tokens") for i in token_ids(runs))
        for head in group["heads"]:
            out[head] = ids
    return out


def assert_heads_hold(fixture: Fixture, held: dict[int, list[list[list[int]]]]) -> None:
    """Every (chunk, layer, head) of ``held`` (a :class:`HeadLayout` state) holds exactly what the reference's
    caches held after that chunk's context pass, and every record covers every head."""
    records = fixture.decisions["cache_after_ctx"]
    num_layers, num_heads = fixture.meta["tiny_model"]["num_layers"], fixture.meta["tiny_model"]["num_heads"]
    assert len(records) == fixture.chunks * num_layers
    for record in records:
        want = held_by_head(record)
        assert sorted(want) == list(range(num_heads)), record["label"]
        got = held[record["chunk"]][record["layer"]]
        assert {head: got[head] for head in want} == want, (record["label"], record["layer"])


@attrs.frozen
class HeadLayout(Policy):
    """Observer: after each chunk's compaction, the sorted token ids (``frame * n + row * cols + col``) every
    (layer, head) holds in sample 0: ``state[chunk][layer][head]``. Changes nothing."""

    name: ClassVar[str] = "head-layout"

    def new_state(self) -> dict[int, list[list[list[int]]]]:
        return {}

    @hookimpl
    def cachepolicy_after_compaction(self, session: Session, chunk: int) -> None:
        view = session.cache.view()
        ids = view.frame * session.model.tokens_per_frame + view.spatial_index
        held = session.cache.held()  # [L, H, B, S]
        self.state(session)[chunk] = [[sorted(ids[0][held[layer, head, 0]].tolist()) for head in range(held.shape[1])]
                                      for layer in range(held.shape[0])]
