"""Ground-truth metrics for models whose scenes are known (the drift lab), for ``cachepolicy compare``.

They apply to models whose entry says ``provides_ground_truth`` (``drift-lab``); for other models they are
not in the default metric set and give NaN if asked for. Each compares the decoded frames with the
prompt's scene drawn at the model's sprite size (the adapter's ground truth, a
:class:`cachepolicy.lab.metrics.SceneTruth`; :func:`cachepolicy.lab.metrics.evaluate_video`), per chunk:

* ``scene-background-error``: mean absolute error against the prompt's background, away from sprites;
* ``scene-count-error``: sum over sprite groups of ``|sprites found - sprites asked for|``;
* ``scene-colour-error``: RGB distance of each sprite found from its nominal colour;
* ``scene-size-error``: relative area error of each sprite found;
* ``scene-histogram-drift``: colour-histogram distance of each frame from the first chunk's.

Scalar per job: the mean over the last quarter of the chunks (where drift has accumulated). Every error is
exactly 0 on the true video.
"""

from __future__ import annotations

import math
from typing import ClassVar

from cachepolicy.hookspecs import hookimpl
from cachepolicy.metrics import JobData, Metric, MetricValue


class SceneMetric(Metric):
    """Base: one key of :func:`cachepolicy.lab.metrics.evaluate_video`, averaged per chunk."""

    key: ClassVar[str] = ""
    higher_is_better: ClassVar[bool | None] = False
    needs_ground_truth: ClassVar[bool] = True
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, None)

    def compute(self, job: JobData) -> MetricValue:
        if job.ground_truth is None or job.frames is None:
            return MetricValue(math.nan, [math.nan] * job.num_chunks)
        from cachepolicy.lab.metrics import SceneTruth, evaluate_video, summarize

        truth = job.ground_truth
        if not isinstance(truth, SceneTruth):  # a bare SceneSpec: the default geometry
            truth = SceneTruth(truth)
        frames = job.frames.float().numpy() * 2.0 - 1.0  # the lab's frames are in [-1, 1]
        per_frame = evaluate_video(frames, truth.spec, chunk_frames=job.frames_per_chunk,
                                   sprite_size=truth.scene.sprite_size)
        per_chunk = summarize(per_frame, job.frames_per_chunk)[self.key]
        curve = [float(v) for v in per_chunk]
        tail = [v for v in curve[-max(1, len(curve) // 4):] if not math.isnan(v)]
        return MetricValue(sum(tail) / len(tail) if tail else math.nan, curve)


class SceneBackgroundError(SceneMetric):
    name: ClassVar[str] = "scene-background-error"
    summary: ClassVar[str] = "error against the prompt's background, away from sprites"
    key: ClassVar[str] = "background_error"


class SceneCountError(SceneMetric):
    name: ClassVar[str] = "scene-count-error"
    summary: ClassVar[str] = "|sprites found - sprites in the prompt|, summed over groups"
    key: ClassVar[str] = "count_error"
    unit: ClassVar[str] = "sprites"


class SceneColourError(SceneMetric):
    name: ClassVar[str] = "scene-colour-error"
    summary: ClassVar[str] = "RGB distance of the sprites found from the prompt's colours"
    key: ClassVar[str] = "colour_error"


class SceneSizeError(SceneMetric):
    name: ClassVar[str] = "scene-size-error"
    summary: ClassVar[str] = "relative area error of the sprites found"
    key: ClassVar[str] = "size_error"


class SceneHistogramDrift(SceneMetric):
    name: ClassVar[str] = "scene-histogram-drift"
    summary: ClassVar[str] = "colour-histogram drift from the first chunk"
    key: ClassVar[str] = "histogram_drift"
    value_range: ClassVar[tuple[float | None, float | None]] = (0.0, 1.0)  # a total-variation distance


@hookimpl
def cachepolicy_metrics() -> list[type[Metric]]:
    return [SceneBackgroundError, SceneCountError, SceneColourError, SceneSizeError, SceneHistogramDrift]
