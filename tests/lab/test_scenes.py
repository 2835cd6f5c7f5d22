"""Scene generator: determinism, prompt grammar, ground truth agreeing with the frames."""

from __future__ import annotations

import numpy as np
import pytest

from cachepolicy.errors import CachePolicyError
from cachepolicy.lab.errors import PromptError, SceneError, UnknownWordError
from cachepolicy.lab.scenes import (
    SPRITE_COLOURS,
    VOCABULARY,
    SceneConfig,
    SceneSpec,
    SpriteGroup,
    background_image,
    build_scene,
    colour_to_model_range,
    parse_prompt,
    sample_prompt,
    sample_spec,
    shape_stamp,
    to_uint8,
)

PROMPT = "two red squares and a blue disc bouncing fast over a navy-to-teal gradient"


def test_same_seed_same_scene_different_seed_different_positions():
    a, b = build_scene(PROMPT, 7), build_scene(PROMPT, 7)
    assert np.array_equal(a.frames, b.frames)
    assert np.array_equal(a.positions, b.positions)
    c = build_scene(PROMPT, 8)
    assert not np.array_equal(a.positions, c.positions)
    assert np.array_equal(a.background, c.background)  # the prompt fixes the background


def test_sample_spec_is_deterministic_and_parses_back():
    specs1 = [sample_spec(np.random.default_rng(3)) for _ in range(2)]
    assert specs1[0] == specs1[1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = sample_spec(rng)
        assert parse_prompt(spec.prompt) == spec
        assert 1 <= spec.num_sprites <= 3
        assert all(w in VOCABULARY for w in spec.prompt.replace("-", " ").split())


def test_frames_shape_range_and_dtype():
    s = build_scene(PROMPT, 1)
    cfg = SceneConfig()
    assert s.frames.shape == (cfg.num_frames, 3, cfg.height, cfg.width)
    assert s.frames.dtype == np.float32
    assert s.frames.min() >= -1.0 and s.frames.max() <= 1.0
    assert to_uint8(s.frames).shape == (cfg.num_frames, cfg.height, cfg.width, 3)


@pytest.mark.parametrize("seed", range(6))
def test_ground_truth_agrees_with_frames(seed):
    rng = np.random.default_rng(seed)
    s = build_scene(sample_spec(rng), seed)
    T, N = s.positions.shape[:2]
    assert len(s.sprites) == N == s.spec.num_sprites
    assert np.array_equal(s.count, np.full(T, N))
    any_sprite = s.sprite_mask
    # background everywhere else, and the background image is the prompt's gradient
    assert np.array_equal(s.background, background_image(s.spec, *s.frames.shape[2:]))
    for t in range(T):
        assert np.array_equal(s.frames[t][:, ~any_sprite[t]], s.background[:, ~any_sprite[t]])
        for n, sp in enumerate(s.sprites):
            m = s.masks[t, n]
            assert m.sum() == sp.area == shape_stamp(sp.shape, sp.size).sum()
            assert np.allclose(s.frames[t][:, m], np.asarray(sp.rgb, dtype=np.float32)[:, None])
            # the stamp sits at its corner and the centre is inside the stamp's box
            c, r = s.corners[t, n]
            assert np.array_equal(m[r:r + sp.size, c:c + sp.size], shape_stamp(sp.shape, sp.size))
            x, y = s.positions[t, n]
            assert c <= x <= c + sp.size and r <= y <= r + sp.size
        # sprites never overlap
        assert (s.masks[t].sum(axis=0) <= 1).all()


def test_sprites_move_at_prompt_speed_and_stay_inside():
    s = build_scene("a white square bouncing fast over a black-to-gray gradient", 0, SceneConfig(num_frames=40))
    step = np.linalg.norm(np.diff(s.positions[:, 0], axis=0), axis=1)
    assert step.max() <= 0.07 * 16 + 1e-9
    assert step.mean() > 0.5  # it moves
    half = s.sprites[0].size / 2
    assert (s.positions[..., 0] >= half - 1e-9).all() and (s.positions[..., 0] <= 16 - half + 1e-9).all()


def test_colours_match_the_prompt():
    s = build_scene(PROMPT, 2)
    assert [sp.colour for sp in s.sprites] == ["red", "red", "blue"]
    assert [sp.shape for sp in s.sprites] == ["square", "square", "disc"]
    assert s.sprites[2].rgb == tuple(float(v) for v in colour_to_model_range(SPRITE_COLOURS["blue"]))


def test_prompt_errors_name_the_problem():
    with pytest.raises(UnknownWordError, match="'purplish'") as exc:
        parse_prompt("a purplish square bouncing fast over a navy-to-teal gradient")
    assert "square" in str(exc.value) and isinstance(exc.value, CachePolicyError)
    with pytest.raises(PromptError, match="shape word agreeing"):
        parse_prompt("two red square bouncing fast over a navy-to-teal gradient")
    with pytest.raises(PromptError, match="distinct colours"):
        SceneSpec(groups=(SpriteGroup(1, "red", "disc"), SpriteGroup(1, "red", "square")), speed="fast",
                  top="navy", bottom="teal")
    with pytest.raises(PromptError, match="two different colours"):
        parse_prompt("a red disc bouncing fast over a navy-to-navy gradient")
    with pytest.raises(SceneError, match="seed"):
        build_scene(PROMPT, -1)
    with pytest.raises(SceneError, match="max_sprites"):
        build_scene(PROMPT, 0, SceneConfig(max_sprites=2))


def test_every_sampled_prompt_keeps_sprites_far_from_background():
    rng = np.random.default_rng(1)
    for _ in range(100):
        p = sample_prompt(rng)
        s = build_scene(p, 0)
        for sp in s.sprites:
            d = np.sqrt(((s.background - np.asarray(sp.rgb)[:, None, None]) ** 2).sum(axis=0))
            assert d.min() >= 0.7 - 1e-6


def test_articles_and_vocabulary_order():
    spec = parse_prompt("an orange disc bouncing slowly over an olive-to-navy gradient")
    assert spec.groups[0].count == 1 and spec.prompt == "an orange disc bouncing slowly over an olive-to-navy gradient"
    assert parse_prompt("a orange disc bouncing slowly over a olive-to-navy gradient") == spec
    # rows of the text table are indexed by vocabulary position: keep the historical order stable
    assert VOCABULARY[:3] == ("a", "two", "three") and VOCABULARY[-1] == "an"
