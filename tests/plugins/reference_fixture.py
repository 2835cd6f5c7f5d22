"""Golden fixtures recorded from reference code (``tests/fixtures/golden/<method>/``, drivers and conventions in
``tools/golden/README.md``), loaded for a rollout through the engine.

A fixture holds the tiny model's weights (original Wan key names, bfloat16-exact), the recorded conditioning,
initial noise and re-noising draws, the reference's output latents and its decisions. :func:`load` turns it into
a :class:`~cachepolicy.adapters.wan.adapter.WanAdapter` around a stock ``diffusers.WanTransformer3DModel``, a
:class:`~cachepolicy.noise.RecordedNoise` and the sampler the reference ran (the float32 training table, warped
steps, context noise 0), so a test only chooses the policy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
import torch

from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


@attrs.frozen(eq=False)
class Fixture:
    """One recorded reference run.

    Attributes:
        folder: the fixture folder.
        golden: ``golden.json`` (reference, tiny config, pipeline, draw order).
        decisions: ``decisions.json`` (what the reference decided, per method).
        tensors: ``tensors.safetensors`` (``latents`` ``[B, F, C, H, W]``, ``noise_initial``, ``renoise``, ...).
    """

    folder: Path
    golden: dict[str, Any]
    decisions: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def num_chunks(self) -> int:
        return int(self.golden["pipeline"]["chunks"])

    @property
    def latents(self) -> torch.Tensor:
        """The reference's output ``[B, C, T, H, W]`` (the engine's layout)."""
        return self.tensors["latents"].permute(0, 2, 1, 3, 4)

    def adapter(self) -> Any:
        """A Wan adapter around stock diffusers with the fixture's weights; its text encoder returns the recorded
        conditioning whatever the prompt."""
        from diffusers import WanTransformer3DModel
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        from safetensors.torch import load_file

        from cachepolicy.adapters.wan.adapter import WanAdapter

        tiny = self.golden["tiny_model"]
        state = {k: v.float() for k, v in load_file(str(self.folder / "weights.safetensors")).items()}
        model = WanTransformer3DModel(
            patch_size=tuple(tiny["patch_size"]), num_attention_heads=tiny["num_heads"],
            attention_head_dim=tiny["head_dim"], in_channels=tiny["in_dim"], out_channels=tiny["out_dim"],
            text_dim=tiny["text_dim"], freq_dim=tiny["freq_dim"], ffn_dim=tiny["ffn_dim"],
            num_layers=tiny["num_layers"], cross_attn_norm=tiny["cross_attn_norm"], qk_norm="rms_norm_across_heads",
            eps=tiny["eps"], image_dim=None, rope_max_seq_len=1024)
        model.load_state_dict(convert_wan_transformer_to_diffusers(state), strict=True)
        conditioning = self.tensors["conditioning"]

        def encoder(prompts: list[str]) -> torch.Tensor:
            return conditioning.expand(len(prompts), -1, -1).clone()

        return WanAdapter(model.eval(), name=f"golden-{self.folder.name}", latent_size=tuple(tiny["latent_hw"]),
                          text_encoder=encoder, frames_per_chunk=tiny["frames_per_chunk"], sampler=self.sampler())

    def sampler(self) -> Any:
        """The reference's sampler: its denoising steps, warped through the float32 training table, fresh noise."""
        from cachepolicy.models import Sampler

        pipeline = self.golden["pipeline"]
        sampler = Sampler(denoising_steps=pipeline["denoising_step_list"], shift=5.0, warp=True, table=True,
                          context_noise=float(pipeline["context_noise"]))
        assert sampler.timesteps() == pipeline["warped_timesteps"] and sampler.sigmas() == pipeline["sigmas"]
        return sampler

    def noise(self) -> Any:
        """The recorded draws as (chunk, use) -> ``[C, F, H, W]``: use 0 the chunk's frames of the initial noise,
        use ``i`` the re-noising draw before step ``i`` (``draw_order``: ``chunk{c}/after_D{i}``)."""
        from cachepolicy.noise import RecordedNoise

        frames = int(self.golden["tiny_model"]["frames_per_chunk"])
        initial = self.tensors["noise_initial"][0]  # [F, C, H, W]
        draws: dict[tuple[int, int], torch.Tensor] = {}
        for chunk in range(self.num_chunks):
            draws[(chunk, 0)] = initial[chunk * frames:(chunk + 1) * frames].permute(1, 0, 2, 3)
        for entry in self.golden["draw_order"]:
            if entry["tensor"] != "renoise":
                continue
            chunk, _, after = entry["label"].partition("/after_D")
            draws[(int(chunk.removeprefix("chunk")), int(after))] = \
                self.tensors["renoise"][entry["row"]].permute(1, 0, 2, 3)
        expected = self.num_chunks * len(self.golden["pipeline"]["denoising_step_list"])
        assert len(draws) == expected, f"{len(draws)} recorded draws, expected {expected}"
        return RecordedNoise(draws)

    def rollout(self, policies: list[Any], *, adapter: Any = None, chunks: int | None = None) -> Any:
        """Run ``policies`` through the engine on the recorded inputs, with :class:`Held` recording what every
        (layer, head) holds after each chunk; returns ``(result, session, held)``: ``held[chunk][layer][head]``
        is the sorted list of global token ids (sample 0)."""
        from cachepolicy.engine import RolloutConfig, Session

        adapter = adapter or self.adapter()
        config = RolloutConfig(num_chunks=chunks or self.num_chunks, prompts=["recorded conditioning"], seeds=[0],
                               noise=self.noise())
        recorder = Held()
        session = Session(adapter, [*policies, recorder], config)
        return session.run(), session, session.policy_state[recorder.spec]

    def max_difference(self, result: Any) -> float:
        """Max |ours - reference| over every recorded frame."""
        reference = self.latents
        return (result.latents[:, :, :reference.shape[2]] - reference).abs().max().item()


@attrs.frozen
class Held(Policy):
    """Observe-only: after each chunk's compaction, the global token ids each (layer, head) holds (sample 0)."""

    name: ClassVar[str] = "held-recorder"

    def new_state(self) -> dict[int, list[list[list[int]]]]:
        return {}

    @hookimpl
    def cachepolicy_after_compaction(self, session: Any, chunk: int) -> None:
        from tests.oracle import resident_ids

        self.state(session)[chunk] = [[sorted(head[0].tolist()) for head in layer] for layer in resident_ids(session)]


def load(method: str) -> Fixture:
    """The fixture of ``method`` (a folder name under ``tests/fixtures/golden``)."""
    from safetensors.torch import load_file

    folder = FIXTURES / method
    return Fixture(folder=folder, golden=json.loads((folder / "golden.json").read_text()),
                   decisions=json.loads((folder / "decisions.json").read_text()),
                   tensors=load_file(str(folder / "tensors.safetensors")))


def token_ids(runs: list[list[int]]) -> list[int]:
    """Half-open ``[start, end)`` runs of global token ids (``frame * tokens_per_frame + raster index``) -> ids."""
    return [i for start, end in runs for i in range(start, end)]


def held_by_head(record: dict[str, Any]) -> dict[int, list[int]]:
    """Per head, the sorted token ids the reference's caches held after a context pass: one ``cache_after_ctx``
    record, whose ``*_heads`` groups list their ``heads`` and runs of ids per cache part (``tokens``: a count)."""
    out = {}
    for key, group in record.items():
        if not key.endswith("_heads"):
            continue
        ids = sorted(i for name, runs in group.items() if name not in ("heads", "tokens") for i in token_ids(runs))
        for head in group["heads"]:
            out[head] = ids
    return out
