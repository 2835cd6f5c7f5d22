"""Ground-truth metrics for drift-lab videos: pure functions of frames (numpy or CPU torch tensors).

All frames are ``[T, 3, H, W]`` in ``[-1, 1]`` (see :mod:`cachepolicy.lab.scenes`); colour distances are
Euclidean RGB distances in that range (so the distance from black to white is ``2 * sqrt(3)``).

Two families:

- Prompt-referenced metrics (:func:`evaluate_video`) need only the prompt, so they apply to generated
  videos whose sprites are wherever the model put them: the background the prompt describes, the
  number of sprites of each prompt colour (colour segmentation + connected components: the lab's
  sprites are flat and never touch), their colour, size and shape, the colour-class histogram drift
  from the first chunk, and flicker. On a true scene every error is exactly zero.
- Generic metrics (:func:`flicker`, :func:`colour_histogram_drift`) need nothing but frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from cachepolicy.lab.errors import LabError
from cachepolicy.lab.scenes import (
    SPRITE_COLOURS,
    SceneConfig,
    SceneSpec,
    background_image,
    colour_to_model_range,
    shape_stamp,
)

__all__ = [
    "Blob",
    "SceneTruth",
    "colour_histogram",
    "colour_histogram_drift",
    "connected_components",
    "evaluate_video",
    "find_blobs",
    "flicker",
    "palette_histogram",
    "segment_colour",
    "summarize",
]

#: Default colour tolerance (RGB distance in [-1, 1] units) for assigning a pixel to a sprite colour.
#: Sprite colours are at least 0.7 from every background and about 0.5 from each other in this range.
DEFAULT_TOLERANCE = 0.3


@attrs.frozen
class SceneTruth:
    """What the prompt-referenced metrics need to judge a generated video: the prompt's scene and the
    geometry the model was trained on (the drift-lab adapter's ``ground_truth``).

    Attributes:
        spec: the prompt's scene (sprite groups, speed, background).
        scene: the model's scene geometry; its ``sprite_size`` (pixels) sets the stamp areas that
            count and size errors compare against.
    """

    spec: SceneSpec
    scene: SceneConfig = SceneConfig()

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.spec, SceneSpec):
            raise LabError(f"SceneTruth.spec must be a SceneSpec, got {type(self.spec).__name__}")
        if not isinstance(self.scene, SceneConfig):
            raise LabError(f"SceneTruth.scene must be a SceneConfig, got {type(self.scene).__name__}")


def _frames(frames: object) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise LabError(f"expected frames of shape [T, 3, H, W], got {tuple(arr.shape)}")
    return arr


def flicker(frames: object) -> np.ndarray:
    """Temporal flicker: mean absolute difference between consecutive frames, ``float64 [T - 1]``."""
    f = _frames(frames).astype(np.float64)
    return np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))


def colour_histogram(frames: object, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram per frame, ``float64 [T, bins**3]``, each row summing to 1 (values clipped to [-1, 1])."""
    if bins < 1:
        raise LabError(f"bins must be positive, got {bins}")
    f = np.clip(_frames(frames), -1.0, 1.0)
    q = np.minimum(((f + 1.0) * 0.5 * bins).astype(np.int64), bins - 1)  # [T, 3, H, W]
    idx = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    t = idx.shape[0]
    out = np.zeros((t, bins**3))
    for i in range(t):
        out[i] = np.bincount(idx[i].ravel(), minlength=bins**3)
    return out / out.sum(axis=1, keepdims=True)


def colour_histogram_drift(frames: object, reference_frames: int = 3, bins: int = 8) -> np.ndarray:
    """Total-variation distance of each frame's joint RGB histogram from the mean histogram of the first
    ``reference_frames`` frames (the first chunk), ``float64 [T]`` in ``[0, 1]``.

    Generic (needs no prompt). On a true scene it is small but not exactly zero, because moving sprites
    cover different parts of the gradient; :func:`palette_histogram` is the exact variant.
    """
    h = colour_histogram(frames, bins)
    if not 1 <= reference_frames <= h.shape[0]:
        raise LabError(f"reference_frames must be in 1..{h.shape[0]}, got {reference_frames}")
    ref = h[:reference_frames].mean(axis=0)
    return 0.5 * np.abs(h - ref[None]).sum(axis=1)


def segment_colour(frames: object, rgb: Sequence[float], tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Pixels within ``tol`` (RGB distance, [-1, 1] units) of colour ``rgb`` (given in [-1, 1]): ``bool [T, H, W]``."""
    f = _frames(frames)
    c = np.asarray(rgb, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.sqrt(((f - c) ** 2).sum(axis=1)) <= tol


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a ``bool [H, W]`` mask: ``(labels int64 [H, W], count)``; labels 1..count, 0 outside."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise LabError(f"connected_components expects a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        new = labels.copy()
        new[1:, :] = np.maximum(new[1:, :], labels[:-1, :])
        new[:-1, :] = np.maximum(new[:-1, :], labels[1:, :])
        new[:, 1:] = np.maximum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.maximum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, 0)
        if np.array_equal(new, labels):
            break
        labels = new
    uniq = np.unique(labels[labels > 0])
    remap = np.zeros(h * w + 1, dtype=np.int64)
    remap[uniq] = np.arange(1, len(uniq) + 1)
    return remap[labels], len(uniq)


@attrs.frozen
class Blob:
    """One connected region of a sprite colour in one frame.

    Attributes:
        colour: the sprite colour name it was segmented as.
        area: pixels.
        centroid: ``(x, y)`` in pixels (pixel centres at ``+0.5``).
        mean_rgb: mean colour of its pixels in ``[-1, 1]``.
        fill: ``area`` divided by the area of its bounding box (1 for squares, lower for discs, triangles).
        shape: nearest shape by fill ratio among the stamps of ``size`` pixels.
        mask: ``bool [H, W]`` pixels of the blob.
    """

    colour: str
    area: int
    centroid: tuple[float, float]
    mean_rgb: tuple[float, float, float]
    fill: float
    shape: str
    mask: np.ndarray = attrs.field(eq=False, repr=False)


def _shape_fills(size: int) -> dict[str, float]:
    return {s: float(shape_stamp(s, size).mean()) for s in ("square", "disc", "triangle")}


def find_blobs(frame: object, colours: Sequence[str], size: int, tol: float = DEFAULT_TOLERANCE,
               min_area: int = 1) -> list[Blob]:
    """Blobs of the given sprite colours in one frame ``[3, H, W]`` (pixels assigned to their nearest colour).

    Args:
        frame: one frame in ``[-1, 1]``.
        colours: sprite colour names (keys of :data:`SPRITE_COLOURS`) to look for.
        size: nominal sprite size (pixels), used to classify shapes by fill ratio.
        tol: max RGB distance of a pixel from its colour.
        min_area: blobs smaller than this many pixels are ignored (noise).
    """
    arr = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
    f = _frames(arr[None])[0]
    for c in colours:
        if c not in SPRITE_COLOURS:
            raise LabError(f"unknown sprite colour {c!r}; known: {', '.join(SPRITE_COLOURS)}")
    palette = {c: colour_to_model_range(SPRITE_COLOURS[c]) for c in SPRITE_COLOURS}
    names = list(palette)
    dist = np.stack([np.sqrt(((f - palette[c][:, None, None]) ** 2).sum(axis=0)) for c in names])  # [K, H, W]
    nearest = dist.argmin(axis=0)
    fills = _shape_fills(size)
    blobs: list[Blob] = []
    for c in colours:
        k = names.index(c)
        mask = (nearest == k) & (dist[k] <= tol)
        labels, n = connected_components(mask)
        for lab in range(1, n + 1):
            m = labels == lab
            area = int(m.sum())
            if area < min_area:
                continue
            rows, cols = np.nonzero(m)
            bbox = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            fill = area / bbox
            shape = min(fills, key=lambda s: abs(fills[s] - fill))
            blobs.append(Blob(
                colour=c, area=area, centroid=(float(cols.mean() + 0.5), float(rows.mean() + 0.5)),
                mean_rgb=tuple(float(v) for v in f[:, m].mean(axis=1)), fill=float(fill), shape=shape, mask=m,
            ))
    return blobs


def palette_histogram(frames: object, spec: SceneSpec, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """Fraction of pixels per colour class, ``float64 [T, K + 2]``: the prompt's ``K`` sprite colours (in
    group order), then "background" (within ``tol`` of the prompt's background at that pixel), then "other"."""
    f = _frames(frames)
    t, _, h, w = f.shape
    bg = background_image(spec, h, w)
    classes = np.full((t, h, w), len(spec.groups) + 1, dtype=np.int64)
    bg_ok = np.sqrt(((f - bg[None]) ** 2).sum(axis=1)) <= tol
    classes[bg_ok] = len(spec.groups)
    for k, g in enumerate(spec.groups):
        classes[segment_colour(f, colour_to_model_range(SPRITE_COLOURS[g.colour]), tol) & ~bg_ok] = k
    out = np.stack([np.bincount(classes[i].ravel(), minlength=len(spec.groups) + 2) for i in range(t)])
    return out / float(h * w)


def evaluate_video(frames: object, spec: SceneSpec, chunk_frames: int = 3, sprite_size: int = 5,
                   tol: float = DEFAULT_TOLERANCE, dilate: int = 1) -> dict[str, np.ndarray]:
    """Prompt-referenced metrics of a video, per frame (``[T]`` arrays; ``flicker`` is ``[T - 1]``).

    Keys:
        ``count``: detected sprites of the prompt's colours (blobs of at least a quarter of the smallest
        stamp). ``count_error``: sum over groups of ``|detected - expected|``.
        ``colour_error``: mean RGB distance between each detected blob's mean colour and its nominal
        colour (NaN when no blob is found). ``size_error``: mean ``|area - stamp area| / stamp area`` over
        blobs, the stamp of the group's shape (NaN when none). ``shape_error``: fraction of blobs whose
        fill-ratio shape is not the group's shape (NaN when none).
        ``background_error``: mean absolute error against the prompt's background over pixels farther
        than ``dilate`` pixels from any detected blob. ``palette_drift``: total-variation distance of the
        frame's colour-class histogram (:func:`palette_histogram`) from the first chunk's mean.
        ``histogram_drift``: :func:`colour_histogram_drift`. ``flicker``: :func:`flicker`.

    On a true scene every ``*_error`` and ``palette_drift`` is exactly 0.
    """
    f = _frames(frames)
    t, _, h, w = f.shape
    if not 1 <= chunk_frames <= t:
        raise LabError(f"chunk_frames must be in 1..{t}, got {chunk_frames}")
    bg = background_image(spec, h, w)
    colours = [g.colour for g in spec.groups]
    min_area = max(1, min(int(shape_stamp(g.shape, sprite_size).sum()) for g in spec.groups) // 4)
    keys = ("count", "count_error", "colour_error", "size_error", "shape_error", "background_error")
    res = {k: np.zeros(t) for k in keys}
    for i in range(t):
        blobs = find_blobs(f[i], colours, sprite_size, tol, min_area)
        by_colour = {c: [b for b in blobs if b.colour == c] for c in colours}
        res["count"][i] = len(blobs)
        res["count_error"][i] = sum(abs(len(by_colour[g.colour]) - g.count) for g in spec.groups)
        if blobs:
            group = {g.colour: g for g in spec.groups}
            res["colour_error"][i] = np.mean([
                np.linalg.norm(np.asarray(b.mean_rgb) - colour_to_model_range(SPRITE_COLOURS[b.colour]))
                for b in blobs])
            res["size_error"][i] = np.mean([
                abs(b.area - shape_stamp(group[b.colour].shape, sprite_size).sum())
                / shape_stamp(group[b.colour].shape, sprite_size).sum() for b in blobs])
            res["shape_error"][i] = np.mean([b.shape != group[b.colour].shape for b in blobs])
        else:
            res["colour_error"][i] = res["size_error"][i] = res["shape_error"][i] = np.nan
        covered = np.zeros((h, w), dtype=bool)
        for b in blobs:
            covered |= b.mask
        for _ in range(dilate):
            grown = covered.copy()
            grown[1:] |= covered[:-1]
            grown[:-1] |= covered[1:]
            grown[:, 1:] |= covered[:, :-1]
            grown[:, :-1] |= covered[:, 1:]
            covered = grown
        away = ~covered
        res["background_error"][i] = float(np.abs(f[i] - bg)[:, away].mean()) if away.any() else np.nan
    ph = palette_histogram(f, spec, tol)
    ref = ph[:chunk_frames].mean(axis=0)
    res["palette_drift"] = 0.5 * np.abs(ph - ref[None]).sum(axis=1)
    res["histogram_drift"] = colour_histogram_drift(f, chunk_frames)
    res["flicker"] = flicker(f)
    return res


def summarize(metrics: Mapping[str, np.ndarray], chunk_frames: int = 3) -> dict[str, np.ndarray]:
    """Per-chunk means (NaN-aware) of :func:`evaluate_video` output: ``{key: float64 [num_chunks]}``.

    ``flicker`` (``[T - 1]``) is padded with NaN at frame 0 before averaging.
    """
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, dtype=np.float64)
        if k == "flicker":
            v = np.concatenate([[np.nan], v])
        n = len(v) // chunk_frames
        chunks = v[: n * chunk_frames].reshape(n, chunk_frames)
        with np.errstate(all="ignore"):
            out[k] = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in chunks])
    return out
