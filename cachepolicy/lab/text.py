"""Prompt -> text embedding for the drift lab's cross-attention.

No text model is downloaded: every word of the fixed vocabulary (:data:`cachepolicy.lab.scenes.VOCABULARY`)
owns a fixed pseudo-random vector, drawn from a generator seeded by the table seed and the word's index,
so the embedding is a pure function of the prompt and :class:`TextConfig`. The model's own text
projection (``condition_embedder.text_embedder`` in ``WanTransformer3DModel``) learns to read it.

Wan's cross-attention has no positional encoding on the text side, so a bag of word vectors could not
tell "a red square and a blue disc" from "a blue square and a red disc". Each row therefore
concatenates three parts (``text_dim = 2 * word_dim + pos_dim``):

1. the word's vector (``word_dim``);
2. the mean of the word vectors of its *phrase* (``word_dim``): phrases are the runs of words between
   the separators ``and``, ``bouncing`` and ``over`` (a separator is its own phrase), so every row of
   "two red squares" carries "two + red + squares" and binding is explicit;
3. a sinusoidal code of the word's index inside its phrase (``pos_dim``), so "navy to teal" differs
   from "teal to navy".

Rows past the prompt's length are zero, and the empty prompt ``""`` embeds to all zeros: the
unconditional input used for prompt dropout in training and classifier-free guidance in sampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import attrs
import torch

from cachepolicy.lab.errors import LabError, PromptError, UnknownWordError
from cachepolicy.lab.scenes import VOCABULARY, tokenize

__all__ = ["PHRASE_SEPARATORS", "TextConfig", "embed_prompt", "embed_prompts", "word_table"]

#: Words that end a phrase (and form a phrase of their own).
PHRASE_SEPARATORS: frozenset[str] = frozenset({"and", "bouncing", "over"})


@attrs.frozen
class TextConfig:
    """Shape of the text embedding.

    Attributes:
        max_words: rows ``L`` of the embedding; prompts with more words are rejected.
        word_dim: size of each word vector.
        pos_dim: size of the in-phrase position code (even).
        seed: seed of the word table.
    """

    max_words: int = 24
    word_dim: int = 24
    pos_dim: int = 16
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        for name in ("max_words", "word_dim", "pos_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LabError(f"TextConfig.{name} must be a positive int, got {value!r}")
        if self.pos_dim % 2:
            raise LabError(f"TextConfig.pos_dim must be even, got {self.pos_dim}")

    @property
    def text_dim(self) -> int:
        """Width of each embedding row: ``2 * word_dim + pos_dim``."""
        return 2 * self.word_dim + self.pos_dim


@functools.lru_cache(maxsize=8)
def _table(word_dim: int, seed: int) -> torch.Tensor:
    rows = []
    for index in range(len(VOCABULARY)):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
        v = torch.randn(word_dim, generator=g, dtype=torch.float64)
        rows.append(v / v.pow(2).mean().sqrt())  # unit RMS
    return torch.stack(rows).to(torch.float32)


def word_table(config: TextConfig = TextConfig()) -> torch.Tensor:
    """The fixed word table ``float32 [len(VOCABULARY), word_dim]``, rows of unit RMS, in vocabulary order."""
    return _table(config.word_dim, config.seed).clone()


def _position_code(index: int, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(100.0) * torch.arange(dim // 2, dtype=torch.float64) / max(dim // 2, 1))
    angles = index * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)]).to(torch.float32)


def embed_prompt(prompt: str, config: TextConfig = TextConfig()) -> torch.Tensor:
    """Embed one prompt: ``float32 [max_words, text_dim]`` (see the module docstring for the layout).

    Raises:
        UnknownWordError: a word is outside the vocabulary (the message names the word and the vocabulary).
        PromptError: the prompt has more than ``config.max_words`` words.
    """
    words = tokenize(prompt)
    if len(words) > config.max_words:
        raise PromptError(f"prompt has {len(words)} words, more than TextConfig.max_words={config.max_words}")
    index = {w: i for i, w in enumerate(VOCABULARY)}
    for w in words:
        if w not in index:
            raise UnknownWordError(w, VOCABULARY)
    table = _table(config.word_dim, config.seed)
    out = torch.zeros(config.max_words, config.text_dim, dtype=torch.float32)
    phrases: list[list[int]] = []
    current: list[int] = []
    for k, w in enumerate(words):
        if w in PHRASE_SEPARATORS:
            if current:
                phrases.append(current)
            phrases.append([k])
            current = []
        else:
            current.append(k)
    if current:
        phrases.append(current)
    d = config.word_dim
    for phrase in phrases:
        vectors = table[[index[words[k]] for k in phrase]]
        mean = vectors.mean(dim=0)
        for j, k in enumerate(phrase):
            out[k, :d] = vectors[j]
            out[k, d:2 * d] = mean
            out[k, 2 * d:] = _position_code(j, config.pos_dim)
    return out


def embed_prompts(prompts: Sequence[str], config: TextConfig = TextConfig()) -> torch.Tensor:
    """Embed a batch of prompts: ``float32 [B, max_words, text_dim]``; ``""`` gives the zero (unconditional) row block."""
    if isinstance(prompts, str):
        raise PromptError("embed_prompts takes a sequence of prompts, got a single string")
    return torch.stack([embed_prompt(p, config) for p in prompts]) if prompts else torch.zeros(
        0, config.max_words, config.text_dim
    )
