"""Metrics: known answers on true scenes and on videos with planted changes."""

from __future__ import annotations

import numpy as np
import pytest

from cachepolicy.lab.errors import LabError
from cachepolicy.lab.metrics import (
    SceneTruth,
    colour_histogram_drift,
    connected_components,
    evaluate_video,
    flicker,
    palette_histogram,
    summarize,
)
from cachepolicy.lab.scenes import SPRITE_COLOURS, build_scene, colour_to_model_range, sample_spec

PROMPT = "two red squares and a blue disc bouncing fast over a navy-to-teal gradient"


@pytest.mark.parametrize("seed", range(4))
def test_true_scene_scores_zero(seed):
    s = build_scene(sample_spec(np.random.default_rng(seed + 10)), seed)
    m = evaluate_video(s.frames, s.spec)
    assert np.array_equal(m["count"], np.full(12, s.spec.num_sprites))
    for key in ("count_error", "colour_error", "size_error", "shape_error", "background_error", "palette_drift"):
        assert np.allclose(m[key], 0.0, atol=1e-6), key


def test_planted_recolour():
    s = build_scene(PROMPT, 3)
    f = s.frames.copy()
    blue = s.masks[:, 2]  # the disc
    green = colour_to_model_range(SPRITE_COLOURS["green"])  # not a prompt colour
    for t in range(6, 12):
        f[t][:, blue[t]] = green[:, None]
    m = evaluate_video(f, s.spec)
    assert np.array_equal(m["count_error"], np.r_[np.zeros(6), np.ones(6)])
    area = s.sprites[2].area
    assert np.allclose(m["palette_drift"], np.r_[np.zeros(6), np.full(6, area / 256)], atol=1e-9)
    assert np.allclose(m["colour_error"], 0.0, atol=1e-6)  # the red squares are still exact
    assert (m["background_error"][6:] > 0.05).all()  # a green disc is not background either


def test_planted_background_shift():
    s = build_scene(PROMPT, 3)
    delta = 0.1
    f = s.frames + np.where(~s.sprite_mask[:, None], delta, 0.0).astype(np.float32)
    m = evaluate_video(f, s.spec)
    assert np.allclose(m["background_error"], delta, atol=1e-6)
    assert np.allclose(m["count_error"], 0.0)
    assert np.allclose(m["palette_drift"], 0.0)  # 0.1 is within the colour tolerance


def test_planted_colour_error_and_size_error():
    s = build_scene("a red square bouncing slowly over a black-to-gray gradient", 0)
    f = s.frames.copy()
    f[4][0, s.masks[4, 0]] -= 0.2  # red channel of the square down by 0.2
    m = evaluate_video(f, s.spec)
    assert m["colour_error"][4] == pytest.approx(0.2, abs=1e-6)
    g = s.frames.copy()
    r, c = s.corners[5, 0][::-1]
    g[5][:, r, c:c + 5] = s.background[:, r, c:c + 5]  # remove the top row: 20 of 25 pixels left
    m = evaluate_video(g, s.spec)
    assert m["size_error"][5] == pytest.approx(5 / 25)


def test_flicker_and_histogram_drift_known_values():
    f = np.zeros((4, 3, 8, 8), dtype=np.float32)
    f[2:] = 0.5
    assert np.allclose(flicker(f), [0.0, 0.5, 0.0])
    d = colour_histogram_drift(f, reference_frames=2, bins=4)
    assert np.allclose(d, [0, 0, 1, 1])
    f[3, :, :4] = 0.0  # half of the last frame back to the reference colour
    assert colour_histogram_drift(f, 2, 4)[3] == pytest.approx(0.5)


def test_connected_components_and_summary():
    m = np.zeros((5, 5), dtype=bool)
    m[0, 0:2] = True
    m[3:, 3:] = True
    m[4, 0] = True
    labels, n = connected_components(m)
    assert n == 3 and set(np.unique(labels)) == {0, 1, 2, 3}
    s = summarize({"a": np.arange(6.0), "flicker": np.ones(5)}, chunk_frames=3)
    assert np.allclose(s["a"], [1.0, 4.0]) and np.allclose(s["flicker"], [1.0, 1.0])


def test_palette_histogram_rows_sum_to_one():
    s = build_scene(PROMPT, 0)
    h = palette_histogram(s.frames, s.spec)
    assert h.shape == (12, 4) and np.allclose(h.sum(axis=1), 1.0)
    assert np.allclose(h[:, 0], 2 * 25 / 256)  # two red 5x5 squares


def test_scene_truth_names_a_bad_field():
    spec = build_scene(PROMPT, seed=0).spec
    assert SceneTruth(spec).scene.sprite_size == 5  # the default geometry
    with pytest.raises(LabError, match=r"SceneTruth.spec must be a SceneSpec, got str"):
        SceneTruth(PROMPT)
    with pytest.raises(LabError, match=r"SceneTruth.scene must be a SceneConfig, got dict"):
        SceneTruth(spec, {"sprite_size": 6})
