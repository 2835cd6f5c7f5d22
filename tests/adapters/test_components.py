"""The optional real components: UMT5 text encoder and Wan VAE, loaded from tiny random local folders.

Both are checked against what diffusers' ``WanPipeline`` computes, written out here from stock parts:
the text encoder against ``UMT5EncoderModel(ids, mask).last_hidden_state`` with the padded positions zeroed
(and against ``WanPipeline._get_t5_prompt_embeds`` itself, called on a stand-in pipeline), the decoder
against ``vae.decode(latents * std + mean)`` mapped by ``(x + 1) / 2`` and clamped (and against diffusers'
``VideoProcessor.postprocess_video``). The same code runs on both sides, so equality is exact. Nothing is
downloaded: the tokenizer is a ``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from cachepolicy.adapters.wan.checkpoints import load_wan_checkpoint
from cachepolicy.adapters.wan.components import (
    UMT5TextEncoder,
    WanVAEDecoder,
    load_umt5_text_encoder,
    load_wan_vae,
    prompt_clean,
)
from cachepolicy.errors import CheckpointError, MissingDependencyError, ParameterError
from tests.adapters.test_checkpoints import TINY, random_original, write_training_checkpoint

pytest.importorskip("transformers")

TEXT_DIM = TINY["text_dim"]  # 24: the tiny transformer's text_dim
Z_DIM = TINY["in_dim"]  # 4: the tiny transformer's latent channels
WORDS = "a cat dog runs in the park & red blue sky over hills slowly".split()
PROMPTS = ["a cat runs in the park", "  the dog &amp;amp;   red\n sky ", "a " * 40]
MEAN = [0.3, -0.2, 0.1, 0.5]
STD = [1.5, 2.0, 0.5, 1.2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny VAE's many small conv3d calls are slower on 2 threads than on 1 (thread hand-off dominates,
    seconds per decode on a busy machine): run this module on one thread and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_umt5(folder: Path, *, d_model: int = TEXT_DIM, seed: int = 0) -> None:
    """A tiny random ``UMT5EncoderModel`` (``folder/text_encoder``) and WordLevel tokenizer
    (``folder/tokenizer``) that pads with ``<pad>`` (id 0) and appends ``</s>`` like UMT5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder / "tokenizer")
    config = UMT5Config(vocab_size=len(vocab) + 5, d_model=d_model, d_kv=6, d_ff=32, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    torch.manual_seed(seed)
    UMT5EncoderModel(config).save_pretrained(folder / "text_encoder")


@pytest.fixture(scope="module")
def umt5(tmp_path_factory) -> Path:
    """A pipeline-style folder (``text_encoder/`` + ``tokenizer/``); ``flat/`` holds both in one folder."""
    root = tmp_path_factory.mktemp("umt5")
    save_umt5(root / "pipe")
    flat = root / "flat"
    shutil.copytree(root / "pipe" / "text_encoder", flat)
    for file in (root / "pipe" / "tokenizer").iterdir():
        shutil.copy(file, flat / file.name)
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny random ``AutoencoderKLWan`` (z_dim 4) in ``root/vae`` (a pipeline-style folder)."""
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=MEAN, latents_std=STD)
    vae.save_pretrained(root / "vae")
    return root


def direct_embeddings(folder: Path, prompts: list[str], max_length: int) -> torch.Tensor:
    """``last_hidden_state`` of the stock model with every padded position zeroed."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    cleaned = [" ".join(p.replace("&amp;amp;", "&").split()) for p in prompts]  # what prompt_clean does here
    inputs = tokenizer(cleaned, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
    return hidden * inputs.attention_mask[..., None]


def diffusers_embeddings(encoder: UMT5TextEncoder, prompts: list[str], max_length: int) -> torch.Tensor:
    """diffusers' own ``WanPipeline._get_t5_prompt_embeds`` on a stand-in holding the same parts."""
    from diffusers import WanPipeline

    shim = SimpleNamespace(tokenizer=encoder.tokenizer, text_encoder=encoder.model, _execution_device="cpu")
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(shim, prompts, max_sequence_length=max_length)


# ------------------------------------------------------------------------------------- text encoder
def test_text_encoder_reproduces_the_pipeline(umt5, caplog):
    want = direct_embeddings(umt5 / "pipe", PROMPTS, 16)
    for source in (umt5 / "pipe", umt5 / "flat"):
        encoder = load_umt5_text_encoder(source, max_length=16)
        with caplog.at_level(logging.WARNING, logger="cachepolicy.adapters.wan.components"):
            got = encoder(PROMPTS)
        assert got.shape == (3, 16, TEXT_DIM) and encoder.text_dim == TEXT_DIM
        assert torch.equal(got, want), float((got - want).abs().max())
        assert torch.equal(got, diffusers_embeddings(encoder, PROMPTS, 16))
    assert "prompt(s) [2] exceed 16 tokens" in caplog.text  # the 41-token prompt was truncated
    lengths = [7, 6, 16]  # words + </s>: the rest is zero, the tokens are not
    for row, n in zip(got, lengths):
        assert row[n:].abs().sum() == 0 and bool((row[:n].abs().sum(-1) > 0).all())
    assert float(want.abs().mean()) > 0.05  # not vacuous


def test_prompt_clean_is_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean as diffusers_clean

    for text in PROMPTS + ["  tabs\tand\nnewlines  ", "&lt;b&gt; caf&eacute;", "plain"]:
        assert prompt_clean(text) == diffusers_clean(text)


def test_text_encoder_default_length_and_dtype(umt5):
    encoder = load_umt5_text_encoder(umt5 / "pipe", dtype="bfloat16")
    got = encoder(["a cat"])
    assert got.shape == (1, 512, TEXT_DIM) and got.dtype == torch.bfloat16


def test_text_encoder_errors(umt5, tmp_path, monkeypatch):
    absent = tmp_path / "nowhere"
    with pytest.raises(ParameterError, match=rf"text_encoder='{absent}': no such folder; expected a folder"):
        load_umt5_text_encoder(absent)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(umt5 / "flat", no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ParameterError, match=r"is incomplete: .*has no weights \(model.safetensors"):
        load_umt5_text_encoder(no_weights)
    half_pipe = tmp_path / "half_pipe"
    shutil.copytree(umt5 / "pipe" / "text_encoder", half_pipe / "text_encoder")
    with pytest.raises(ParameterError, match=r"tokenizer is missing"):
        load_umt5_text_encoder(half_pipe)
    with pytest.raises(ParameterError, match=r"produces 24-dim embeddings \(d_model\).*text_dim=4096"):
        load_umt5_text_encoder(umt5 / "pipe", text_dim=4096)
    holed = tmp_path / "holed"
    shutil.copytree(umt5 / "flat", holed)
    weights = load_file(holed / "model.safetensors")
    del weights["encoder.final_layer_norm.weight"]
    save_file(weights, holed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"nothing was loaded: 1 missing keys: encoder.final_layer_norm.weight"):
        load_umt5_text_encoder(holed)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install transformers") as excinfo:
        load_umt5_text_encoder(umt5 / "pipe")
    assert isinstance(excinfo.value, ImportError)


# ---------------------------------------------------------------------------------------------- VAE
def test_vae_decode_reproduces_the_pipeline(vae_dir):
    from diffusers.video_processor import VideoProcessor

    stock = AutoencoderKLWan.from_pretrained(vae_dir / "vae").eval()
    latents = torch.randn(2, Z_DIM, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(MEAN).view(1, Z_DIM, 1, 1, 1)
    std = torch.tensor(STD).view(1, Z_DIM, 1, 1, 1)
    with torch.no_grad():
        video = stock.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # [B, 3, F', H', W']
    want = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    for source in (vae_dir, vae_dir / "vae"):
        decoder = load_wan_vae(source)
        assert isinstance(decoder, WanVAEDecoder) and decoder.latent_channels == Z_DIM
        got = decoder(latents)
        assert got.shape == (2, 5, 3, 8, 8)  # 1 + 2 (F - 1) frames, 2x pixels (tiny config)
        assert torch.equal(got, want)
    assert torch.equal(got, VideoProcessor().postprocess_video(video, output_type="pt"))
    assert 0.05 < float(got.std()) and 0 < float(got.mean()) < 1  # not vacuous
    with pytest.raises(ParameterError, match=r"decodes latents \[B, 4, F, H, W\], got \[1, 3, 3, 4, 4\]"):
        decoder(latents[:1, :3])


def test_vae_errors(vae_dir, tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(ParameterError, match=rf"vae='{absent}': no such folder; expected a diffusers"):
        load_wan_vae(absent)
    empty = tmp_path / "empty" / "vae"
    empty.mkdir(parents=True)
    shutil.copy(vae_dir / "vae" / "config.json", empty)
    with pytest.raises(ParameterError, match=r"is incomplete: .*has no weights \(diffusion_pytorch_model"):
        load_wan_vae(empty.parent)
    holed = tmp_path / "holed"
    shutil.copytree(vae_dir / "vae", holed)
    weights = load_file(holed / "diffusion_pytorch_model.safetensors")
    del weights["decoder.conv_out.weight"]
    save_file(weights, holed / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"nothing was loaded: 1 missing keys: decoder.conv_out.weight"):
        load_wan_vae(holed)
    with pytest.raises(ParameterError, match=r"z_dim=4\) but the transformer's latents have in_channels=16"):
        load_wan_vae(vae_dir, latent_channels=16)


# ------------------------------------------------------------------------------------------- wiring
def live_models() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, (WanTransformer3DModel, AutoencoderKLWan))}


def test_loaders_take_text_encoder_and_vae(umt5, vae_dir, tmp_path):
    checkpoint = write_training_checkpoint(tmp_path / "model.pt", random_original(1), None)
    adapter = load_wan_checkpoint(checkpoint, ema=False, latent_size="4x4", text_encoder=str(umt5 / "pipe"),
                                  vae=str(vae_dir))
    assert isinstance(adapter.text_encoder, UMT5TextEncoder)
    conditioning = adapter.encode_prompts(["a cat runs", "the dog"])
    assert conditioning.shape == (2, 512, TEXT_DIM)
    latents = torch.randn(1, Z_DIM, 3, 4, 4)
    assert torch.equal(adapter.decode(latents), load_wan_vae(vae_dir)(latents))
    # a z_dim that does not fit the transformer fails at load time, before the VAE's weights are read
    wrong = tmp_path / "wrong_vae"
    shutil.copytree(vae_dir / "vae", wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "z_dim": 8, "latents_mean": [0.0] * 8,
                                                   "latents_std": [1.0] * 8}))
    before = live_models()
    with pytest.raises(ParameterError, match=r"decodes 8-channel latents \(z_dim=8\).*in_channels=4"):
        load_wan_checkpoint(checkpoint, ema=False, latent_size="4x4", vae=str(wrong))
    with pytest.raises(ParameterError, match=r"text_encoder='.*nowhere': no such folder"):
        load_wan_checkpoint(checkpoint, ema=False, latent_size="4x4", text_encoder=str(tmp_path / "nowhere"))
    assert live_models() == before  # nothing half-loaded stays alive
    plain = load_wan_checkpoint(checkpoint, ema=False, latent_size="4x4", text_encoder=lambda p: torch.zeros(1))
    with pytest.raises(NotImplementedError, match="has no decoder"):
        plain.decode(latents)
