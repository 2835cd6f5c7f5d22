"""Exceptions raised by the drift lab (:mod:`cachepolicy.lab`).

Every lab error derives from the project's :class:`cachepolicy.errors.CachePolicyError` and from
``ValueError`` (the lab only rejects bad values: prompts, seeds, shapes, configurations).
"""

from __future__ import annotations

from collections.abc import Iterable

from cachepolicy.errors import CachePolicyError


class LabError(CachePolicyError, ValueError):
    """Base class of every error the drift lab raises on purpose."""


class SceneError(LabError):
    """A scene cannot be built as asked (bad configuration, sprites that do not fit, bad seed)."""


class PromptError(LabError):
    """A prompt does not follow the drift-lab grammar."""


class UnknownWordError(PromptError):
    """A prompt uses a word outside the drift-lab vocabulary."""

    def __init__(self, word: str, vocabulary: Iterable[str]) -> None:
        self.word = word
        self.vocabulary = tuple(vocabulary)
        super().__init__(
            f"unknown word {word!r} in prompt; the drift-lab vocabulary is: {', '.join(self.vocabulary)}"
        )


class LatentShapeError(LabError):
    """A tensor given to the pixel <-> latent transform has the wrong shape."""


class LabCheckpointError(LabError):
    """A drift-lab checkpoint directory is missing files or does not match the configuration."""
