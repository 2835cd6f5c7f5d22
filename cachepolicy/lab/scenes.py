"""Seeded procedural scenes for the drift lab: flat sprites bouncing over a two-colour gradient.

A scene is described by a prompt from a small fixed grammar, for example::

    "two red squares and a blue disc bouncing fast over a navy-to-teal gradient"

and built from that prompt and an integer seed (the seed picks the sprites' start positions and
directions). Everything about the scene is known exactly, so generated videos can be scored against
ground truth (:mod:`cachepolicy.lab.metrics`).

Conventions used throughout the lab:

- Frames are ``float32`` arrays of shape ``[T, 3, H, W]`` (frames, RGB, rows, columns) with values in
  ``[-1, 1]`` (``-1`` black, ``+1`` full intensity), the range the model is trained on.
  :func:`to_unit_range` and :func:`to_uint8` convert for display.
- Colours in the palettes are RGB triples in ``[0, 1]``; :func:`colour_to_model_range` maps them to
  ``[-1, 1]``.
- Positions are in pixels, ``(x, y)`` = (column, row) of the sprite's centre, where the centre of
  pixel ``(row i, column j)`` is at ``(j + 0.5, i + 0.5)``. Velocities are in pixels per frame.
- The background is a vertical gradient: the first colour named in the prompt at the top row, the
  second at the bottom row, linear in between.
- Sprites are drawn as fixed binary stamps of ``size x size`` pixels placed at an integer offset
  (the rounded top-left corner), so a sprite keeps exactly the same pixels from frame to frame; they
  bounce off the borders and off each other (equal-mass elastic swap of velocities), so they never
  overlap and every sprite stays a separate connected blob in every frame.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from cachepolicy.lab.errors import PromptError, SceneError, UnknownWordError

__all__ = [
    "BACKGROUND_COLOURS",
    "COUNT_WORDS",
    "GRAMMAR_WORDS",
    "SHAPES",
    "SPEEDS",
    "SPRITE_COLOURS",
    "VOCABULARY",
    "Scene",
    "SceneConfig",
    "SceneSpec",
    "SpriteGroup",
    "SpriteTruth",
    "background_image",
    "build_scene",
    "colour_to_model_range",
    "parse_prompt",
    "sample_prompt",
    "sample_spec",
    "shape_stamp",
    "to_uint8",
    "to_unit_range",
    "tokenize",
]

#: Sprite colours (RGB in [0, 1]): bright and saturated, far from every background colour.
SPRITE_COLOURS: Mapping[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (1.00, 0.90, 0.10),
    "cyan": (0.10, 0.95, 0.95),
    "magenta": (1.00, 0.20, 0.85),
    "white": (1.00, 1.00, 1.00),
    "orange": (1.00, 0.55, 0.00),
}

#: Background colours (RGB in [0, 1]): dark and muted, so sprites stand out and segment cleanly.
BACKGROUND_COLOURS: Mapping[str, tuple[float, float, float]] = {
    "black": (0.00, 0.00, 0.00),
    "navy": (0.05, 0.08, 0.35),
    "teal": (0.00, 0.33, 0.33),
    "gray": (0.40, 0.40, 0.40),
    "olive": (0.33, 0.33, 0.05),
    "maroon": (0.40, 0.05, 0.12),
    "purple": (0.30, 0.08, 0.40),
    "brown": (0.38, 0.22, 0.08),
}

#: Shape name -> (singular, plural) word.
SHAPES: Mapping[str, tuple[str, str]] = {
    "square": ("square", "squares"),
    "disc": ("disc", "discs"),
    "triangle": ("triangle", "triangles"),
}

#: Count word -> count. ``a`` / ``an`` are the singular articles (``an`` before a vowel).
COUNT_WORDS: Mapping[str, int] = {"a": 1, "an": 1, "two": 2, "three": 3}

#: Speed word -> speed in frame heights per frame.
SPEEDS: Mapping[str, float] = {"slowly": 0.035, "fast": 0.07}

#: Function words of the grammar.
GRAMMAR_WORDS: tuple[str, ...] = ("and", "bouncing", "over", "to", "gradient")

#: The whole vocabulary, in a fixed order (the text embedding indexes rows by this order; new words
#: are appended at the end so that existing rows keep their index).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            "a", "two", "three",
            *SPRITE_COLOURS,
            *BACKGROUND_COLOURS,
            *(w for pair in SHAPES.values() for w in pair),
            *SPEEDS,
            *GRAMMAR_WORDS,
            "an",
        ]
    )
)

_NUMBER_WORD = {1: "a", 2: "two", 3: "three"}
_MIN_COLOUR_DISTANCE = 0.35  # min L2 distance (RGB in [0, 1]) between a sprite colour and the background
_SPRITE_GAP = 1  # min pixels of background between two sprites' stamps


def tokenize(prompt: str) -> list[str]:
    """Split a prompt into lower-case words; hyphens and commas separate words like spaces do."""
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    return [w for w in re.split(r"[\s,\-]+", prompt.strip().lower()) if w]


def colour_to_model_range(rgb: Sequence[float]) -> np.ndarray:
    """Map an RGB triple in ``[0, 1]`` to the model range ``[-1, 1]``; returns ``float32 [3]``."""
    return (np.asarray(rgb, dtype=np.float32) * 2.0 - 1.0).astype(np.float32)


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """Map frames from ``[-1, 1]`` to ``[0, 1]`` (clipped); same shape, ``float32``."""
    return np.clip((np.asarray(frames, dtype=np.float32) + 1.0) * 0.5, 0.0, 1.0)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Map frames ``[T, 3, H, W]`` in ``[-1, 1]`` to ``uint8 [T, H, W, 3]`` for image and video files."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise SceneError(f"expected frames of shape [T, 3, H, W], got {tuple(frames.shape)}")
    return np.round(to_unit_range(frames) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


@attrs.frozen
class SceneConfig:
    """Geometry of the scenes.

    Attributes:
        num_frames: frames per scene, ``T``.
        height: frame height ``H`` in pixels.
        width: frame width ``W`` in pixels.
        sprite_size: side of every sprite's stamp in pixels (square side, disc diameter, triangle
            base and height).
        max_sprites: most sprites in a scene (sum of the groups' counts).
    """

    num_frames: int = 12
    height: int = 16
    width: int = 16
    sprite_size: int = 5
    max_sprites: int = 3

    def __attrs_post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "sprite_size", "max_sprites"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SceneError(f"SceneConfig.{name} must be a positive int, got {value!r}")
        if self.max_sprites > max(COUNT_WORDS.values()) * len(SPRITE_COLOURS):
            raise SceneError(f"SceneConfig.max_sprites={self.max_sprites} is more than prompts can describe")
        if 2 * self.sprite_size + _SPRITE_GAP > min(self.height, self.width):
            raise SceneError(
                f"sprite_size={self.sprite_size} is too large for {self.height}x{self.width} frames "
                f"(two sprites and a gap must fit side by side)"
            )


@attrs.frozen
class SpriteGroup:
    """``count`` sprites of one colour and one shape, e.g. "two red squares"."""

    count: int
    colour: str
    shape: str

    def __attrs_post_init__(self) -> None:
        if self.count not in _NUMBER_WORD:
            raise PromptError(f"sprite count must be one of {sorted(_NUMBER_WORD)}, got {self.count!r}")
        if self.colour not in SPRITE_COLOURS:
            raise PromptError(f"unknown sprite colour {self.colour!r}; known: {', '.join(SPRITE_COLOURS)}")
        if self.shape not in SHAPES:
            raise PromptError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")

    @property
    def text(self) -> str:
        """The group's phrase, e.g. ``"two red squares"``."""
        number = _article(self.colour) if self.count == 1 else _NUMBER_WORD[self.count]
        return f"{number} {self.colour} {SHAPES[self.shape][self.count > 1]}"


@attrs.frozen
class SceneSpec:
    """What a prompt says: sprite groups, speed and the background gradient.

    Attributes:
        groups: one or more sprite groups with pairwise distinct colours.
        speed: a key of :data:`SPEEDS`.
        top: background colour at the top row (key of :data:`BACKGROUND_COLOURS`).
        bottom: background colour at the bottom row; differs from ``top``.
    """

    groups: tuple[SpriteGroup, ...] = attrs.field(converter=tuple)
    speed: str
    top: str
    bottom: str

    def __attrs_post_init__(self) -> None:
        if not self.groups:
            raise PromptError("a scene needs at least one sprite group")
        colours = [g.colour for g in self.groups]
        if len(set(colours)) != len(colours):
            raise PromptError(f"sprite groups must have distinct colours, got {colours}")
        if self.speed not in SPEEDS:
            raise PromptError(f"unknown speed {self.speed!r}; known: {', '.join(SPEEDS)}")
        for name in (self.top, self.bottom):
            if name not in BACKGROUND_COLOURS:
                raise PromptError(
                    f"unknown background colour {name!r}; known: {', '.join(BACKGROUND_COLOURS)}"
                )
        if self.top == self.bottom:
            raise PromptError(f"the gradient needs two different colours, got {self.top!r} twice")
        for g in self.groups:
            d = _distance_to_gradient(SPRITE_COLOURS[g.colour], BACKGROUND_COLOURS[self.top],
                                      BACKGROUND_COLOURS[self.bottom])
            if d < _MIN_COLOUR_DISTANCE:
                raise PromptError(
                    f"sprite colour {g.colour!r} is too close to the {self.top}-to-{self.bottom} gradient "
                    f"(distance {d:.3f} < {_MIN_COLOUR_DISTANCE})"
                )

    @property
    def num_sprites(self) -> int:
        """Total number of sprites, the sum of the groups' counts."""
        return sum(g.count for g in self.groups)

    @property
    def prompt(self) -> str:
        """The canonical prompt text; ``parse_prompt(spec.prompt) == spec``."""
        groups = " and ".join(g.text for g in self.groups)
        return f"{groups} bouncing {self.speed} over {_article(self.top)} {self.top}-to-{self.bottom} gradient"


def _article(word: str) -> str:
    """``an`` before a vowel, else ``a``."""
    return "an" if word[0] in "aeiou" else "a"


def _distance_to_gradient(c: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """L2 distance from colour ``c`` to the RGB segment between ``a`` and ``b`` (all in [0, 1])."""
    c, a, b = (np.asarray(x, dtype=np.float64) for x in (c, a, b))
    ab = b - a
    t = float(np.clip(np.dot(c - a, ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


def parse_prompt(prompt: str) -> SceneSpec:
    """Parse a prompt of the drift-lab grammar into a :class:`SceneSpec`.

    Grammar: ``GROUP ("and" GROUP)* "bouncing" SPEED "over" ("a"|"an") BG "to" BG "gradient"`` with
    ``GROUP = COUNT COLOUR SHAPE`` (plural shape word for counts above one; ``a`` and ``an`` are
    both accepted for one, whatever the next word).

    Raises:
        UnknownWordError: a word is outside :data:`VOCABULARY` (the error names it and the vocabulary).
        PromptError: the words do not follow the grammar (the error says where).
    """
    words = tokenize(prompt)
    for w in words:
        if w not in VOCABULARY:
            raise UnknownWordError(w, VOCABULARY)
    if not words:
        raise PromptError("empty prompt")

    def expect(i: int, what: str, allowed: Sequence[str]) -> str:
        if i >= len(words):
            raise PromptError(f"prompt {prompt!r} ends early: expected {what} at word {i + 1}")
        if words[i] not in allowed:
            raise PromptError(
                f"prompt {prompt!r}: expected {what} ({'/'.join(allowed)}) at word {i + 1}, got {words[i]!r}"
            )
        return words[i]

    groups: list[SpriteGroup] = []
    i = 0
    while True:
        count = COUNT_WORDS[expect(i, "a count", list(COUNT_WORDS))]
        colour = expect(i + 1, "a sprite colour", list(SPRITE_COLOURS))
        shape_words = [pair[count > 1] for pair in SHAPES.values()]
        shape_word = expect(i + 2, "a shape word agreeing with the count", shape_words)
        shape = next(s for s, pair in SHAPES.items() if pair[count > 1] == shape_word)
        groups.append(SpriteGroup(count=count, colour=colour, shape=shape))
        i += 3
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    expect(i, "'bouncing'", ["bouncing"])
    speed = expect(i + 1, "a speed", list(SPEEDS))
    expect(i + 2, "'over'", ["over"])
    expect(i + 3, "'a'", ["a", "an"])
    top = expect(i + 4, "a background colour", list(BACKGROUND_COLOURS))
    expect(i + 5, "'to'", ["to"])
    bottom = expect(i + 6, "a background colour", list(BACKGROUND_COLOURS))
    expect(i + 7, "'gradient'", ["gradient"])
    if i + 8 != len(words):
        raise PromptError(f"prompt {prompt!r}: unexpected words after 'gradient': {words[i + 8:]}")
    return SceneSpec(groups=tuple(groups), speed=speed, top=top, bottom=bottom)


def sample_spec(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> SceneSpec:
    """Draw a random valid :class:`SceneSpec` (1..``max_sprites`` sprites in 1..3 colour groups).

    Args:
        rng: the random generator (all choices are drawn from it, so a seeded generator gives a
            reproducible prompt).
        config: the scene geometry (only ``max_sprites`` is used).
    """
    while True:
        total = int(rng.integers(1, config.max_sprites + 1))
        num_groups = int(rng.integers(1, min(total, len(SPRITE_COLOURS)) + 1))
        # a random composition of `total` into `num_groups` positive parts, each at most 3
        cuts = sorted(rng.choice(np.arange(1, total), size=num_groups - 1, replace=False).tolist())
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        if max(counts) > max(COUNT_WORDS.values()):
            continue
        bg_names = list(BACKGROUND_COLOURS)
        top, bottom = (bg_names[k] for k in rng.choice(len(bg_names), size=2, replace=False))
        allowed = [
            c for c in SPRITE_COLOURS
            if _distance_to_gradient(SPRITE_COLOURS[c], BACKGROUND_COLOURS[top], BACKGROUND_COLOURS[bottom])
            >= _MIN_COLOUR_DISTANCE
        ]
        if len(allowed) < num_groups:
            continue
        colours = [allowed[k] for k in rng.choice(len(allowed), size=num_groups, replace=False)]
        shapes = [list(SHAPES)[int(rng.integers(len(SHAPES)))] for _ in range(num_groups)]
        speed = list(SPEEDS)[int(rng.integers(len(SPEEDS)))]
        groups = tuple(SpriteGroup(count=n, colour=c, shape=s) for n, c, s in zip(counts, colours, shapes))
        return SceneSpec(groups=groups, speed=speed, top=top, bottom=bottom)


def sample_prompt(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> str:
    """Draw a random valid prompt; ``sample_spec(rng, config).prompt``."""
    return sample_spec(rng, config).prompt


def shape_stamp(shape: str, size: int) -> np.ndarray:
    """The binary stamp of a shape: ``bool [size, size]`` (rows, columns).

    - ``square``: every pixel.
    - ``disc``: pixels whose centre lies within ``size / 2`` of the stamp's centre.
    - ``triangle``: apex at the top centre, base along the bottom row; row ``r`` keeps pixels with
      ``|dx| <= (r + 1) / 2`` where ``dx`` is the pixel centre's offset from the stamp's centre column.
    """
    if shape not in SHAPES:
        raise SceneError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if not isinstance(size, int) or size < 1:
        raise SceneError(f"stamp size must be a positive int, got {size!r}")
    centres = np.arange(size, dtype=np.float64) + 0.5 - size / 2.0
    dy, dx = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "disc":
        return dx**2 + dy**2 <= (size / 2.0) ** 2 + 1e-9
    rows = np.arange(size, dtype=np.float64)[:, None]
    return np.abs(dx) <= (rows + 1.0) / 2.0 + 1e-9


@attrs.frozen
class SpriteTruth:
    """Ground truth of one sprite (constant over the scene; positions are per frame in :class:`Scene`).

    Attributes:
        colour: colour name (key of :data:`SPRITE_COLOURS`).
        rgb: the colour in the model range ``[-1, 1]``, ``(r, g, b)``.
        shape: shape name (key of :data:`SHAPES`).
        size: stamp side in pixels.
        area: number of pixels of the stamp.
    """

    colour: str
    rgb: tuple[float, float, float]
    shape: str
    size: int
    area: int


@attrs.frozen(eq=False)
class Scene:
    """A rendered scene and its ground truth. Arrays are numpy; shapes use ``T`` frames, ``N`` sprites.

    Attributes:
        spec: what the prompt says.
        seed: the seed the scene was built from.
        config: the geometry.
        frames: ``float32 [T, 3, H, W]`` in ``[-1, 1]``.
        background: ``float32 [3, H, W]`` in ``[-1, 1]``, the static background of every frame.
        sprites: ``N`` sprite descriptions, in drawing order (group by group).
        positions: ``float64 [T, N, 2]`` sprite centres ``(x, y)`` in pixels.
        velocities: ``float64 [T, N, 2]`` velocity in pixels per frame after moving into frame ``t``
            (``positions[t + 1] - positions[t]`` unless the sprite was held back by a collision).
        corners: ``int64 [T, N, 2]`` integer ``(column, row)`` of each stamp's top-left pixel.
        masks: ``bool [T, N, H, W]``, the pixels each sprite covers in each frame.
        count: ``int64 [T]`` visible sprites per frame (always ``N``: sprites never leave the frame).
    """

    spec: SceneSpec
    seed: int
    config: SceneConfig
    frames: np.ndarray
    background: np.ndarray
    sprites: tuple[SpriteTruth, ...]
    positions: np.ndarray
    velocities: np.ndarray
    corners: np.ndarray
    masks: np.ndarray
    count: np.ndarray

    @property
    def prompt(self) -> str:
        """The canonical prompt of the scene."""
        return self.spec.prompt

    @property
    def sprite_mask(self) -> np.ndarray:
        """``bool [T, H, W]``: pixels covered by any sprite."""
        return self.masks.any(axis=1)


def background_image(spec: SceneSpec, height: int, width: int) -> np.ndarray:
    """The background a prompt describes: ``float32 [3, H, W]`` in ``[-1, 1]`` (vertical gradient)."""
    return _gradient(spec.top, spec.bottom, height, width)


def _gradient(top: str, bottom: str, height: int, width: int) -> np.ndarray:
    """Vertical gradient ``float32 [3, H, W]`` in ``[-1, 1]``: ``top`` colour at row 0 centre ... ``bottom``."""
    a = colour_to_model_range(BACKGROUND_COLOURS[top]).astype(np.float64)
    b = colour_to_model_range(BACKGROUND_COLOURS[bottom]).astype(np.float64)
    t = (np.arange(height, dtype=np.float64) + 0.5) / height
    column = a[:, None] * (1.0 - t[None, :]) + b[:, None] * t[None, :]  # [3, H]
    return np.repeat(column[:, :, None], width, axis=2).astype(np.float32)


def _corner(position: np.ndarray, size: int) -> np.ndarray:
    """Integer top-left ``(column, row)`` of stamps centred at ``position [..., 2]``."""
    return np.floor(position - size / 2.0 + 0.5).astype(np.int64)


def _overlap(ci: np.ndarray, cj: np.ndarray, size: int) -> bool:
    """Whether two stamps with top-left corners ``ci``, ``cj`` overlap or touch (gap < ``_SPRITE_GAP``)."""
    return bool(np.all(np.abs(ci - cj) < size + _SPRITE_GAP))


def build_scene(prompt: str | SceneSpec, seed: int, config: SceneConfig = SceneConfig()) -> Scene:
    """Render the scene a prompt describes; positions and directions come from ``seed``.

    Every sprite starts at a random position (no two stamps closer than one pixel) and moves in a
    random direction at the prompt's speed (:data:`SPEEDS` times the frame height, pixels per frame).
    Each frame, positions advance by the velocity; a sprite that would leave the frame is reflected
    off the border; two sprites whose stamps would touch are both held at their previous positions
    and exchange velocities (an elastic collision of equal masses).

    Args:
        prompt: a prompt string (parsed with :func:`parse_prompt`) or a :class:`SceneSpec`.
        seed: a non-negative int; the same prompt, seed and config always give the same scene.
        config: frame count and geometry.

    Returns:
        The :class:`Scene`, frames ``float32 [T, 3, H, W]`` in ``[-1, 1]``.

    Raises:
        PromptError / UnknownWordError: the prompt is invalid.
        SceneError: the seed is invalid or the sprites do not fit the frame.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(spec, SceneSpec):
        raise SceneError(f"expected a prompt string or SceneSpec, got {type(prompt).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SceneError(f"seed must be a non-negative int, got {seed!r}")
    if spec.num_sprites > config.max_sprites:
        raise SceneError(
            f"prompt has {spec.num_sprites} sprites but SceneConfig.max_sprites is {config.max_sprites}"
        )
    rng = np.random.default_rng([int(seed), 0x5CE4E])
    T, H, W, S = config.num_frames, config.height, config.width, config.sprite_size

    sprites: list[SpriteTruth] = []
    for g in spec.groups:
        stamp = shape_stamp(g.shape, S)
        rgb = tuple(float(v) for v in colour_to_model_range(SPRITE_COLOURS[g.colour]))
        for _ in range(g.count):
            sprites.append(SpriteTruth(colour=g.colour, rgb=rgb, shape=g.shape, size=S, area=int(stamp.sum())))
    N = len(sprites)

    lo = np.array([S / 2.0, S / 2.0])
    hi = np.array([W - S / 2.0, H - S / 2.0])
    pos = np.zeros((N, 2))
    for attempt in range(10_000):
        pos = lo + rng.random((N, 2)) * (hi - lo)
        corners = _corner(pos, S)
        if all(not _overlap(corners[i], corners[j], S) for i in range(N) for j in range(i + 1, N)):
            break
    else:  # pragma: no cover - only with absurd configurations
        raise SceneError(f"could not place {N} sprites of size {S} without overlap in {H}x{W} frames")
    speed = SPEEDS[spec.speed] * H
    angles = rng.random(N) * 2.0 * math.pi
    vel = np.stack([np.cos(angles), np.sin(angles)], axis=1) * speed

    positions = np.zeros((T, N, 2))
    velocities = np.zeros((T, N, 2))
    positions[0], velocities[0] = pos, vel
    for t in range(1, T):
        prev = positions[t - 1]
        new = prev + vel
        for axis in range(2):
            low, high = lo[axis], hi[axis]
            below = new[:, axis] < low
            new[below, axis] = 2 * low - new[below, axis]
            vel[below, axis] = np.abs(vel[below, axis])
            above = new[:, axis] > high
            new[above, axis] = 2 * high - new[above, axis]
            vel[above, axis] = -np.abs(vel[above, axis])
        moved = np.ones(N, dtype=bool)
        changed = True
        while changed:  # terminates: held sprites sit at the previous (non-overlapping) positions
            changed = False
            corners = _corner(new, S)
            for i in range(N):
                for j in range(i + 1, N):
                    if (moved[i] or moved[j]) and _overlap(corners[i], corners[j], S):
                        new[i], new[j] = prev[i], prev[j]
                        if moved[i] and moved[j]:
                            vel[[i, j]] = vel[[j, i]]
                        elif moved[i]:
                            vel[i] = -vel[i]
                        else:
                            vel[j] = -vel[j]
                        moved[i] = moved[j] = False
                        changed = True
                        corners = _corner(new, S)
        positions[t], velocities[t] = new, vel

    background = _gradient(spec.top, spec.bottom, H, W)
    frames = np.repeat(background[None], T, axis=0).copy()
    corners = _corner(positions, S)  # [T, N, 2] (column, row)
    masks = np.zeros((T, N, H, W), dtype=bool)
    for n, sprite in enumerate(sprites):
        stamp = shape_stamp(sprite.shape, S)
        colour = np.asarray(sprite.rgb, dtype=np.float32)[:, None]
        for t in range(T):
            c, r = corners[t, n]
            masks[t, n, r:r + S, c:c + S] = stamp
            frames[t][:, masks[t, n]] = colour
    count = masks.reshape(T, N, -1).any(axis=2).sum(axis=1).astype(np.int64)
    return Scene(
        spec=spec, seed=int(seed), config=config, frames=frames.astype(np.float32), background=background,
        sprites=tuple(sprites), positions=positions, velocities=velocities, corners=corners, masks=masks,
        count=count,
    )
