"""Text embedding and the pixel <-> latent transform."""

from __future__ import annotations

import pytest
import torch

from cachepolicy.lab.errors import LatentShapeError, PromptError, UnknownWordError
from cachepolicy.lab.latent import PixelUnshuffleLatent
from cachepolicy.lab.scenes import VOCABULARY, build_scene
from cachepolicy.lab.text import TextConfig, embed_prompt, embed_prompts, word_table

PROMPT = "two red squares and a blue disc bouncing fast over a navy-to-teal gradient"


def test_embedding_shape_deterministic_and_padded():
    cfg = TextConfig()
    e = embed_prompt(PROMPT, cfg)
    assert e.shape == (cfg.max_words, cfg.text_dim) and e.dtype == torch.float32
    assert torch.equal(e, embed_prompt(PROMPT, cfg))
    n = len(PROMPT.replace("-", " ").split())
    assert e[n:].abs().sum() == 0 and (e[:n].abs().sum(dim=1) > 0).all()
    assert embed_prompt("").abs().sum() == 0
    assert embed_prompts([PROMPT, ""]).shape == (2, cfg.max_words, cfg.text_dim)
    assert word_table(cfg).shape == (len(VOCABULARY), cfg.word_dim)


def test_binding_and_order_change_the_embedding():
    a = embed_prompt("a red square and a blue disc bouncing fast over a navy-to-teal gradient")
    b = embed_prompt("a blue square and a red disc bouncing fast over a navy-to-teal gradient")
    c = embed_prompt("a red square and a blue disc bouncing fast over a teal-to-navy gradient")
    # same bag of words, different meaning: the multisets of rows must differ
    assert not torch.equal(a.sort(dim=0).values, b.sort(dim=0).values)
    assert not torch.equal(a.sort(dim=0).values, c.sort(dim=0).values)


def test_unknown_word_error_names_word_and_vocabulary():
    with pytest.raises(UnknownWordError) as exc:
        embed_prompt("a red hexagon")
    msg = str(exc.value)
    assert "'hexagon'" in msg and "square" in msg and "gradient" in msg
    with pytest.raises(PromptError, match="max_words"):
        embed_prompt(PROMPT, TextConfig(max_words=4))


def test_latent_round_trip_is_exact():
    t = PixelUnshuffleLatent(2)
    frames = torch.from_numpy(build_scene(PROMPT, 0).frames)
    z = t.encode(frames)
    assert z.shape == (1, 12, 12, 8, 8)
    assert torch.equal(t.decode(z)[0], frames)
    x = torch.randn(2, 5, 3, 8, 12)
    assert torch.equal(t.decode(t.encode(x)), x)
    # one latent position holds exactly its 2x2 pixel block
    assert torch.equal(z[0, :, 4, 1, 2].reshape(3, 2, 2), frames[4, :, 2:4, 4:6])


def test_latent_shape_errors():
    t = PixelUnshuffleLatent(2)
    with pytest.raises(LatentShapeError, match="divisible"):
        t.encode(torch.zeros(1, 2, 3, 7, 8))
    with pytest.raises(LatentShapeError, match="12"):
        t.decode(torch.zeros(1, 3, 2, 4, 4))
