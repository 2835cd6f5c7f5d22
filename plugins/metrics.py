"""Built-in metrics for ``cachepolicy compare`` (entry point ``metrics``). They need no downloaded weights.

* ``latent-drift``: per chunk, the RMS distance of each latent token's chunk mean from the first chunk's
  (the per-token drift of TokenTrim's summary, measured against chunk 0); scalar: mean of the last quarter.
* ``flicker``: mean absolute difference of consecutive frames (decoded pixels when a decoder exists,
  latents otherwise), per chunk including the step into it; scalar: mean over chunks.
* ``frame-stats-drift``: per chunk, mean absolute change of per-channel frame mean and std against the
  first chunk; scalar: mean of the last quarter.
* ``cache-tokens``: resident context tokens after each chunk; scalar: mean.
* ``cache-mb``: bytes held by the K/V buffer after each chunk; scalar: peak (MiB).
* ``seconds-per-chunk``: wall time per chunk; scalar: mean (not deterministic).
* ``tokentrim-triggers``: 1 where TokenTrim triggered at a chunk; scalar: count.
* ``feature-consistency``: VBench-style subject consistency, the mean cosine similarity of image features
  of each frame to the first frame and to the previous frame, from a DINO/CLIP-style vision model whose
  weights the user has locally (``--metric-option feature-consistency.path=DIR``, a transformers
  checkpoint; frames are resized to its ``image_size`` and normalised with its image processor's mean and
  std when the folder has a ``preprocessor_config.json``). Listed as unavailable otherwise; nothing is
  ever downloaded.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from cachepolicy.hookspecs import hookimpl
from cachepolicy.metrics import JobData, Metric, MetricValue, chunk_slices


def _last_quarter_mean(values: list[float]) -> float:
    if not values:
        return math.nan
    tail = values[-max(1, len(values) // 4):]
    return sum(tail) / len(tail)


class LatentDrift(Metric):
    name: ClassVar[str] = "latent-drift"
    summary: ClassVar[str] = "RMS drift of each token's chunk-mean latent from the first chunk"
    higher_is_better: ClassVar[bool | None] = False
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        latents = job.latents.unsqueeze(0)  # [1, C, T, H, W]
        if job.token_grid is not None:
            tokens = job.token_grid(latents)[0]  # [T, N, D]
        else:
            tokens = latents[0].permute(1, 2, 3, 0).flatten(1, 2)  # [T, H*W, C]
        summaries = [tokens[s].mean(dim=0) for s in chunk_slices(job)]  # each [N, D]
        dim = tokens.shape[-1]
        curve = [float((z - summaries[0]).norm(dim=-1).mean() / math.sqrt(dim)) for z in summaries]
        return MetricValue(_last_quarter_mean(curve), curve)


class Flicker(Metric):
    name: ClassVar[str] = "flicker"
    summary: ClassVar[str] = "mean |frame_t - frame_t-1| (pixels if decoded, else latents)"
    higher_is_better: ClassVar[bool | None] = False
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        if job.frames is not None:
            video = job.frames  # [T', 3, H, W]
            per_latent = video.shape[0] // job.latents.shape[1]
        else:
            video = job.latents.permute(1, 0, 2, 3)  # [T, C, H, W]
            per_latent = 1
        diffs = (video[1:] - video[:-1]).abs().flatten(1).mean(dim=1)  # diff t is between frame t and t+1
        curve = []
        for s in chunk_slices(job):
            start, stop = s.start * per_latent, s.stop * per_latent
            chunk_diffs = diffs[max(0, start - 1):stop - 1]
            curve.append(float(chunk_diffs.mean()) if chunk_diffs.numel() else 0.0)
        return MetricValue(sum(curve) / len(curve), curve)


class FrameStatsDrift(Metric):
    name: ClassVar[str] = "frame-stats-drift"
    summary: ClassVar[str] = "change of per-channel frame mean and std from the first chunk"
    higher_is_better: ClassVar[bool | None] = False
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        video = job.frames.permute(1, 0, 2, 3) if job.frames is not None else job.latents  # [C, T, H, W]
        per_latent = video.shape[1] // job.latents.shape[1]
        stats = []
        for s in chunk_slices(job):
            chunk = video[:, s.start * per_latent:s.stop * per_latent].flatten(1)
            stats.append((chunk.mean(dim=1), chunk.std(dim=1)))
        mean0, std0 = stats[0]
        curve = [float(((m - mean0).abs().mean() + (d - std0).abs().mean()) / 2) for m, d in stats]
        return MetricValue(_last_quarter_mean(curve), curve)


class CacheTokens(Metric):
    name: ClassVar[str] = "cache-tokens"
    summary: ClassVar[str] = "resident context tokens after each chunk"
    unit: ClassVar[str] = "tokens"
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        curve = [float(r["cache_tokens"]) for r in job.trace]
        return MetricValue(sum(curve) / len(curve), curve)


class CacheMegabytes(Metric):
    name: ClassVar[str] = "cache-mb"
    summary: ClassVar[str] = "K/V buffer size after each chunk; scalar = peak"
    unit: ClassVar[str] = "MiB"
    higher_is_better: ClassVar[bool | None] = False
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        curve = [r["cache_bytes"] / 2**20 for r in job.trace]
        return MetricValue(max(curve), curve)


class SecondsPerChunk(Metric):
    name: ClassVar[str] = "seconds-per-chunk"
    summary: ClassVar[str] = "wall-clock seconds per chunk"
    unit: ClassVar[str] = "s"
    higher_is_better: ClassVar[bool | None] = False
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)
    deterministic: ClassVar[bool] = False

    def compute(self, job: JobData) -> MetricValue:
        curve = [float(r["seconds"]) for r in job.trace]
        return MetricValue(sum(curve) / len(curve), curve)


def _triggered(record: dict[str, Any]) -> float:
    value = record.get("triggered")
    if isinstance(value, list):
        return float(any(bool(v) for v in value))
    return float(bool(value))


class TokenTrimTriggers(Metric):
    name: ClassVar[str] = "tokentrim-triggers"
    summary: ClassVar[str] = "chunks where TokenTrim triggered (0 without TokenTrim)"
    unit: ClassVar[str] = "chunks"
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)
    for_policies: ClassVar[tuple[str, ...]] = ("tokentrim",)

    def compute(self, job: JobData) -> MetricValue:
        curve = [_triggered(r) for r in job.trace]
        return MetricValue(sum(curve), curve)


class FeatureConsistency(Metric):
    name: ClassVar[str] = "feature-consistency"
    summary: ClassVar[str] = "VBench-style subject consistency from local DINO/CLIP-style weights (path=DIR)"
    higher_is_better: ClassVar[bool | None] = True
    value_range: ClassVar[tuple[float | None, float | None]] = (-1.0, 1.0)  # a cosine similarity

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("path",)

    def unavailable_reason(self) -> str | None:
        from pathlib import Path

        path = self.options.get("path")
        if not path:
            return "needs local weights: --metric-option feature-consistency.path=DIR (a transformers vision model)"
        if not Path(str(path)).is_dir():
            return f"weights folder {path} does not exist"
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "needs the 'transformers' package (pip install transformers)"
        return None

    def _model(self):
        """The vision model and the ``(mean, std)`` of its image processor (None when the folder has none)."""
        if not hasattr(self, "_loaded"):
            from transformers import AutoImageProcessor, AutoModel

            path = str(self.options["path"])
            model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            try:
                processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
                norm = (list(processor.image_mean), list(processor.image_std))
            except (OSError, ValueError, AttributeError, TypeError):
                norm = None
            self._loaded = (model, norm)
        return self._loaded

    def compute(self, job: JobData) -> MetricValue:
        import torch

        if job.frames is None:  # a latent preview: the first three channels, scaled to [0, 1]
            video = job.latents[:3].permute(1, 0, 2, 3)
            video = (video - video.amin()) / (video.amax() - video.amin() + 1e-8)
        else:
            video = job.frames
        model, norm = self._model()
        size = getattr(getattr(model, "config", None), "image_size", 224)
        pixels = torch.nn.functional.interpolate(video.float(), size=(size, size), mode="bilinear",
                                                 align_corners=False)
        if norm is not None:  # the processor's normalisation (ImageNet mean/std for DINO)
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in norm)
            pixels = (pixels - mean) / std
        with torch.no_grad():
            output = model(pixel_values=pixels)
        features = getattr(output, "pooler_output", None)
        if features is None:
            features = output.last_hidden_state[:, 0]
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        to_first = features @ features[0]
        to_prev = torch.cat([torch.ones(1), (features[1:] * features[:-1]).sum(-1)])
        per_frame = (to_first + to_prev) / 2
        per_latent = video.shape[0] // job.latents.shape[1]
        curve = [float(per_frame[s.start * per_latent:s.stop * per_latent].mean()) for s in chunk_slices(job)]
        return MetricValue(float(per_frame[1:].mean()) if per_frame.numel() > 1 else 1.0, curve)


BUILTIN_METRICS = [LatentDrift, Flicker, FrameStatsDrift, CacheTokens, CacheMegabytes, SecondsPerChunk,
                   TokenTrimTriggers, FeatureConsistency]


@hookimpl
def cachepolicy_metrics() -> list[type[Metric]]:
    return list(BUILTIN_METRICS)
