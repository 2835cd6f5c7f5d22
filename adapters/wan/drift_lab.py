"""``drift-lab``: the drift lab's trained Wan model through the same Wan adapter as every Wan model.

The drift lab (:mod:`cachepolicy.lab`) is a small stock ``WanTransformer3DModel`` (patch ``(1, 1, 1)``)
trained here with diffusion forcing on procedural scenes whose ground truth is known. This module adds
only what is specific to it on top of :class:`~cachepolicy.adapters.wan.adapter.WanAdapter`:

* its recipe: the sampler its ``config.json`` names (``sampler_steps`` steps from sigma 1 down, the lab's
  shift, no warping; ``sampler_noise``: the shipped weights re-noise with ``fresh`` noise, older configs
  take the Euler step, ``noise="predicted"``; ``sampler_guidance``, classifier-free guidance against the empty
  prompt, which the lab trains with prompt dropout) and 3 frames per chunk;
* its text embedding (:func:`cachepolicy.lab.text.embed_prompts`, a fixed seeded word table); a prompt
  is parsed whole by the scene grammar or refused (naming the word where parsing stopped), and a scene
  with more sprites than the model was trained on is refused; its default prompt is a scene it draws;
* a decoder: the latent is the frames pixel-unshuffled by 2, so decoding is exact, with no learned VAE;
* ground truth: the prompt's :class:`~cachepolicy.lab.scenes.SceneSpec`, for the ground-truth metrics.

Weights: those shipped in ``cachepolicy/lab/weights/``, or a folder written by
``python -m cachepolicy.lab.train`` (its ``final/``: ``config.json`` and ``weights.safetensors``) given
as ``path=DIR``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cachepolicy.adapters.wan.adapter import WanAdapter, cast_model
from cachepolicy.errors import CheckpointError, ParameterError
from cachepolicy.models import Sampler

logger = logging.getLogger(__name__)


def packaged_weights() -> Path:
    """Where the trained weights ship: ``cachepolicy/lab/weights/`` (absent until they are trained)."""
    from importlib.resources import files

    return Path(str(files("cachepolicy.lab"))) / "weights"


class DriftLabAdapter(WanAdapter):
    """A :class:`WanAdapter` for the drift-lab model, with an exact decoder and the scene's ground truth."""

    #: the first prompt of the README's main job: one sprite, within every trained sprite limit
    default_prompt = "a red triangle bouncing slowly over a gray-to-purple gradient"

    def __init__(self, model: Any, config: Any) -> None:
        from cachepolicy.lab.sampling import sigma_schedule
        from cachepolicy.lab.text import embed_prompts

        self.lab_config = config
        sigmas = sigma_schedule(config.sampler_steps, config.sampler_shift)[:-1]
        # the steps are the sigmas already shifted (no warping); the shift is recorded as the lab's own
        sampler = Sampler(denoising_steps=tuple(1000.0 * float(s) for s in sigmas), warp=False,
                          shift=config.sampler_shift, noise=config.sampler_noise, guidance=config.sampler_guidance)
        super().__init__(model, name="drift-lab", latent_size=config.latent_hw,
                         text_encoder=lambda prompts: embed_prompts(list(prompts), config.text),
                         frames_per_chunk=config.chunk_frames, sampler=sampler)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """The lab's text embedding ``[B, max_words, text_dim]``. Every prompt but the empty one (the
        unconditional input) must parse whole as a scene of the lab's grammar (the error names the word
        where parsing stopped) with at most the sprites the model was trained on (``scene.max_sprites`` of
        its config)."""
        from cachepolicy.lab.errors import PromptError
        from cachepolicy.lab.scenes import parse_prompt

        limit = self.lab_config.scene.max_sprites
        for prompt in prompts:
            spec = parse_prompt(prompt) if prompt != "" else None
            if spec is not None and spec.num_sprites > limit:
                raise PromptError(
                    f"prompt {prompt!r} asks for {spec.num_sprites} sprites; this drift-lab model was trained "
                    f"on scenes of 1 to {limit} (scene.max_sprites in its config.json)"
                )
        return super().encode_prompts(prompts)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, 12, F, 8, 8]`` latents -> ``[B, F, 3, 16, 16]`` frames in [0, 1] (exact inverse transform)."""
        frames = self.lab_config.latent.decode(latent.float().cpu())
        return ((frames + 1.0) / 2.0).clamp(0.0, 1.0)

    def weights_id(self) -> str:
        """The transformer's content id combined with the sampler its ``config.json`` names (after any
        ``steps``/``noise``/``guidance`` model option): the lab's weights ship with their recipe, so a
        ``compare`` folder sampled with another recipe of the same weights is not resumed as if it were
        this one (the shipped recipe changed from Euler to guided fresh-noise sampling in place)."""
        import hashlib
        import json

        recipe = {name: getattr(self.lab_config, name)
                  for name in ("sampler_steps", "sampler_shift", "sampler_noise", "sampler_guidance")}
        text = f"{super().weights_id()}:{json.dumps(recipe, sort_keys=True)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def ground_truth(self, prompt: str, seed: int, num_frames: int) -> Any:
        """The prompt's scene (sprites' colours, shapes, counts; background) and this model's scene
        geometry (its sprite size), as a :class:`cachepolicy.lab.metrics.SceneTruth`."""
        from cachepolicy.lab.metrics import SceneTruth
        from cachepolicy.lab.scenes import parse_prompt

        return SceneTruth(parse_prompt(prompt), self.lab_config.scene)


def load_drift_lab(path: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                   steps: int | None = None, noise: str | None = None,
                   guidance: float | None = None) -> DriftLabAdapter:
    """Load the drift-lab model from ``path`` (a lab weights folder) or from the packaged weights.

    ``steps``, ``noise`` and ``guidance`` replace the sampler of the weights' ``config.json``
    (``sampler_steps``, ``sampler_noise``: ``fresh`` or ``predicted``, ``sampler_guidance``), e.g.
    ``--model-option guidance=1`` to sample without classifier-free guidance.
    """
    import attrs

    from cachepolicy.lab.checkpoint import load_lab_model
    from cachepolicy.lab.errors import LabError

    folder = Path(path) if path is not None else packaged_weights()
    if not (folder / "config.json").is_file():
        if path is None:
            raise CheckpointError(
                f"no drift-lab weights in {folder} (this installation lacks the package data); train them with "
                "'python -m cachepolicy.lab.train --out DIR' and pass --model-option path=DIR/final"
            )
        raise CheckpointError(f"{folder} holds no config.json: not a drift-lab weights folder (DIR/final)")
    try:
        model, config = load_lab_model(folder)
    except LabError as exc:
        raise CheckpointError(f"cannot load drift-lab weights from {folder}: {exc}") from exc
    overrides = {name: value for name, value in
                 (("sampler_steps", steps), ("sampler_noise", noise), ("sampler_guidance", guidance))
                 if value is not None}
    if overrides:
        try:
            config = attrs.evolve(config, **overrides)
        except LabError as exc:
            raise ParameterError(f"drift-lab model option: {exc}") from exc
    return DriftLabAdapter(cast_model(model, device, dtype), config)
