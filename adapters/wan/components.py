"""Optional real components of the Wan2.1 pipeline: the UMT5 text encoder and the Wan VAE.

Neither is needed to run a rollout: without a text encoder prompts are embedded by
:class:`~cachepolicy.adapters.wan.tiny.HashedWordEncoder` (with a warning), without a VAE the adapter has no
decoder (reports show a latent preview). With them, conditioning and decoding are what diffusers'
``WanPipeline`` computes:

* :func:`load_umt5_text_encoder` -> :class:`UMT5TextEncoder`, ``prompts -> [B, max_length, text_dim]``:
  ``WanPipeline._get_t5_prompt_embeds`` (clean the prompt, tokenize with padding to ``max_length`` and
  truncation, ``UMT5EncoderModel(ids, mask).last_hidden_state``, each sequence trimmed to its length and
  zero-padded back). ``max_length`` defaults to 512, the ``text_len`` of Wan2.1 and of the AR systems'
  ``WanTextEncoder`` (diffusers' pipeline defaults to 226).
* :func:`load_wan_vae` -> :class:`WanVAEDecoder`, ``latents [B, C, F, H, W] -> pixels [B, F', 3, H', W']``
  in [0, 1]: ``latents / (1 / latents_std) + latents_mean`` (from the VAE config), ``vae.decode``, then
  ``(x + 1) / 2`` clamped to [0, 1] (``VideoProcessor.postprocess_video(output_type="pt")``).

A ``source`` is a local folder (the component's own folder, or a diffusers pipeline folder holding
``text_encoder/`` + ``tokenizer/`` or ``vae/``) or a Hugging Face hub id (downloaded by ``from_pretrained``;
``cachepolicy`` itself never downloads anything else). ``transformers`` is imported only inside the
functions that need it.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cachepolicy.errors import CheckpointError, MissingDependencyError, ParameterError

logger = logging.getLogger(__name__)

#: Wan2.1's text length (``text_len`` in its config; ``seq_len=512`` in the AR systems' tokenizer)
TEXT_LEN = 512
#: weight files a transformers model folder may hold (any one of them is enough)
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                         "pytorch_model.bin.index.json")
#: tokenizer files (a fast tokenizer's ``tokenizer.json`` or T5/UMT5's sentencepiece ``spiece.model``)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                      "diffusion_pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EXPECTED_ENCODER = (
    "expected a folder with a UMT5 encoder (config.json + model.safetensors or its index) and its tokenizer "
    "(tokenizer.json or spiece.model), a diffusers pipeline folder with text_encoder/ and tokenizer/ (e.g. "
    "Wan2.1-T2V-1.3B-Diffusers), or a Hugging Face hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
)
_EXPECTED_VAE = (
    "expected a diffusers AutoencoderKLWan folder (config.json + diffusion_pytorch_model.safetensors), a "
    "diffusers pipeline folder with vae/ (e.g. Wan2.1-T2V-1.3B-Diffusers), or a Hugging Face hub id such as "
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
)


# ---------------------------------------------------------------------------------------- helpers
def _require_transformers(feature: str) -> Any:
    """``import transformers``, or a :class:`MissingDependencyError` saying what to install."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the 'transformers' package, which is not installed: pip install transformers "
            f"(or pip install 'cachepolicy[real]'); without a text encoder, prompts are embedded by "
            f"HashedWordEncoder ({exc})"
        ) from exc
    return transformers


def _dtype_kwarg(transformers: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype=`` from transformers 4.56, ``torch_dtype=`` before."""
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def is_hub_id(source: str | Path) -> bool:
    """True when ``source`` is not an existing path and reads as a hub id ``owner/name``."""
    text = str(source)
    return not Path(text).expanduser().exists() and bool(_HUB_ID.match(text)) and ".." not in text


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "") or "nothing"


def _hub_subfolder(repo: str, name: str) -> str:
    """``name`` when the hub repository is a pipeline (it has ``model_index.json``), else ``""``."""
    try:
        from huggingface_hub import file_exists

        return name if file_exists(repo, "model_index.json") else ""
    except Exception as exc:  # offline, private, absent: from_pretrained reports it with its own message
        logger.debug("cannot probe hub repository %s (%s); loading without a subfolder", repo, exc)
        return ""


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``: ``ftfy.fix_text`` when ftfy is installed (as in diffusers), HTML
    entities unescaped twice, whitespace runs collapsed to one space, ends stripped."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------- text encoder
def text_encoder_folders(source: str | Path) -> tuple[Path, Path]:
    """``(model folder, tokenizer folder)`` of a local UMT5 source, checked to be complete.

    Raises:
        ParameterError: the folder does not exist, or lacks ``config.json``, weights or a tokenizer; the
            message names the path, what it holds and what is expected.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise ParameterError(f"text_encoder={str(source)!r}: {what}; {_EXPECTED_ENCODER}")
    if (folder / "text_encoder").is_dir() or (folder / "tokenizer").is_dir():
        model_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
    else:
        model_dir = tokenizer_dir = folder
    problems = []
    for sub in sorted({model_dir, tokenizer_dir}):
        if not sub.is_dir():
            problems.append(f"{sub} is missing")
    if not problems:
        if not (model_dir / "config.json").is_file():
            problems.append(f"{model_dir} has no config.json")
        if not any((model_dir / name).is_file() for name in _TRANSFORMERS_WEIGHTS):
            problems.append(f"{model_dir} has no weights ({' or '.join(_TRANSFORMERS_WEIGHTS)})")
        if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
            problems.append(f"{tokenizer_dir} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})")
    if problems:
        raise ParameterError(f"text_encoder={str(source)!r} is incomplete: {'; '.join(problems)} "
                             f"(it holds: {_listing(folder)}); {_EXPECTED_ENCODER}")
    return model_dir, tokenizer_dir


def _check_text_dim(config: dict[str, Any], text_dim: int | None, source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in (None, "umt5", "t5"):
        raise ParameterError(f"text_encoder={source!r} is a {model_type!r} model; Wan2.1 uses UMT5 ('umt5')")
    width = config.get("d_model")
    if text_dim is not None and width is not None and int(width) != int(text_dim):
        raise ParameterError(
            f"text_encoder={source!r} produces {width}-dim embeddings (d_model) but the transformer expects "
            f"text_dim={text_dim}; pass the text encoder of this model (Wan2.1: umt5-xxl, 4096)"
        )


class UMT5TextEncoder:
    """``prompts -> [B, max_length, text_dim]``, as ``WanPipeline._get_t5_prompt_embeds`` computes them.

    Args:
        tokenizer: the UMT5 tokenizer (any ``transformers`` tokenizer; pads with its pad token).
        model: a ``transformers.UMT5EncoderModel`` (in eval mode, on its device).
        max_length: sequence length every prompt is padded or truncated to (Wan2.1: 512).
        source: where it was loaded from (messages only).
    """

    def __init__(self, tokenizer: Any, model: Any, *, max_length: int = TEXT_LEN, source: str = "") -> None:
        if int(max_length) <= 0:
            raise ParameterError(f"max_length={max_length!r}: expected a positive number of tokens")
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = int(max_length)
        self.source = source

    @property
    def text_dim(self) -> int:
        """Width of the embeddings (``d_model``; 4096 for umt5-xxl)."""
        return int(self.model.config.d_model)

    def __repr__(self) -> str:
        return f"UMT5TextEncoder({self.source!r}, text_dim={self.text_dim}, max_length={self.max_length})"

    def __call__(self, prompts: Sequence[str] | str) -> torch.Tensor:
        """Embed ``prompts`` (a string or a list of B strings) -> ``[B, max_length, text_dim]`` in the
        encoder's dtype on its device; positions past each prompt's tokens (its EOS included) are zero."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cleaned = [prompt_clean(p) for p in prompts]
        inputs = self.tokenizer(cleaned, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = inputs.input_ids, inputs.attention_mask  # [B, max_length] each
        seq_lens = mask.gt(0).sum(dim=1).long()
        full = [len(x) for x in self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]]
        cut = [i for i, n in enumerate(full) if n > self.max_length]
        if cut:
            logger.warning("text encoder: prompt(s) %s exceed %d tokens (%s) and were truncated", cut,
                           self.max_length, [full[i] for i in cut])
        parameter = next(self.model.parameters())
        with torch.no_grad():
            hidden = self.model(ids.to(parameter.device), mask.to(parameter.device)).last_hidden_state
        hidden = hidden.to(dtype=self.model.dtype)  # [B, max_length, text_dim]
        trimmed = [u[:v] for u, v in zip(hidden, seq_lens)]
        return torch.stack(
            [torch.cat([u, u.new_zeros(self.max_length - u.size(0), u.size(1))]) for u in trimmed], dim=0
        )


def load_umt5_text_encoder(source: str | Path, *, device: str | torch.device = "cpu",
                           dtype: str | torch.dtype = "float32", max_length: int = TEXT_LEN,
                           text_dim: int | None = None) -> UMT5TextEncoder:
    """Load Wan's UMT5 text encoder and its tokenizer.

    Args:
        source: a local folder holding both the encoder (``config.json`` + ``model*.safetensors``) and the
            tokenizer (``tokenizer.json`` or ``spiece.model``), a diffusers pipeline folder with
            ``text_encoder/`` and ``tokenizer/``, or a hub id (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``; a pipeline
            repository is read from its subfolders).
        device, dtype: where and in which precision the encoder runs (passed to ``from_pretrained``, which
            decides what stays float32, as in diffusers' pipeline).
        max_length: tokens per prompt after padding / truncation (Wan2.1: 512).
        text_dim: the transformer's ``text_dim``, checked against the encoder's ``d_model`` (before the
            weights are read, for a local folder).

    Returns:
        A callable ``prompts -> [B, max_length, text_dim]``.

    Raises:
        ParameterError: the source is absent, incomplete, not UMT5, or of the wrong width.
        CheckpointError: the weights do not match the config (missing or mis-shaped tensors).
        MissingDependencyError: ``transformers`` is not installed.
    """
    from cachepolicy.adapters.wan.adapter import parse_dtype

    label = str(source)
    target = parse_dtype(dtype)
    hub = is_hub_id(source)
    if not hub:
        model_dir, tokenizer_dir = text_encoder_folders(source)
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ParameterError(f"text_encoder={label!r}: cannot read {model_dir / 'config.json'}: {exc}") from exc
        _check_text_dim(config, text_dim, label)
    transformers = _require_transformers(f"text_encoder={label!r}")
    if hub:
        subfolder = _hub_subfolder(label, "text_encoder")
        model_args: tuple[Any, dict[str, Any]] = (label, {"subfolder": subfolder} if subfolder else {})
        tokenizer_args = (label, {"subfolder": "tokenizer"} if subfolder else {})
    else:
        model_args, tokenizer_args = (str(model_dir), {}), (str(tokenizer_dir), {})
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_args[0], **tokenizer_args[1])
        model, info = transformers.UMT5EncoderModel.from_pretrained(
            model_args[0], output_loading_info=True, **_dtype_kwarg(transformers, target), **model_args[1])
    except OSError as exc:  # hub repository absent / offline, or unreadable files
        where = "is neither a local folder nor a reachable hub repository" if hub else "cannot be read"
        raise ParameterError(f"text_encoder={label!r} {where}: {exc}; {_EXPECTED_ENCODER}") from exc
    except (RuntimeError, ValueError) as exc:  # mis-shaped tensors, corrupt files
        raise CheckpointError(f"text_encoder={label!r}: the weights do not load: {exc}") from exc
    # an encoder-only model loaded from a full (encoder-decoder) checkpoint leaves the decoder unused
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(("decoder.", "lm_head.")))
    bad = {"missing": sorted(info.get("missing_keys", ())), "unexpected": unexpected,
           "mis-shaped": sorted(str(k) for k in info.get("mismatched_keys", ()))}
    if any(bad.values()):
        del model
        details = "; ".join(f"{len(v)} {k} keys: {', '.join(map(str, v[:10]))}" for k, v in bad.items() if v)
        raise CheckpointError(f"text_encoder={label!r}: the weights do not match UMT5EncoderModel's config; "
                              f"nothing was loaded: {details}")
    if hub:
        _check_text_dim(model.config.to_dict(), text_dim, label)
    model = model.to(device).eval().requires_grad_(False)
    encoder = UMT5TextEncoder(tokenizer, model, max_length=max_length, source=label)
    logger.info("loaded %r on %s (%s)", encoder, device, target)
    return encoder


# ---------------------------------------------------------------------------------------------- VAE
def vae_folder(source: str | Path) -> Path:
    """The local folder of an ``AutoencoderKLWan`` (itself, or the pipeline's ``vae/``), checked complete."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "no such folder"
        raise ParameterError(f"vae={str(source)!r}: {what}; {_EXPECTED_VAE}")
    if not (folder / "config.json").is_file() and (folder / "vae").is_dir():
        folder = folder / "vae"
    problems = []
    if not (folder / "config.json").is_file():
        problems.append(f"{folder} has no config.json")
    if not any((folder / name).is_file() for name in _DIFFUSERS_WEIGHTS):
        problems.append(f"{folder} has no weights ({' or '.join(_DIFFUSERS_WEIGHTS)})")
    if problems:
        raise ParameterError(f"vae={str(source)!r} is incomplete: {'; '.join(problems)} (it holds: "
                             f"{_listing(folder)}); {_EXPECTED_VAE}")
    return folder


def _check_vae_config(config: dict[str, Any], latent_channels: int | None, source: str) -> None:
    name = config.get("_class_name", "AutoencoderKLWan")
    if name != "AutoencoderKLWan":
        raise ParameterError(f"vae={source!r} holds a {name}, not an AutoencoderKLWan")
    z_dim = int(config.get("z_dim", 16))
    if latent_channels is not None and z_dim != int(latent_channels):
        raise ParameterError(
            f"vae={source!r} decodes {z_dim}-channel latents (z_dim={z_dim}) but the transformer's latents have "
            f"in_channels={latent_channels}; pass the VAE of this model (Wan2.1: the 16-channel Wan VAE)"
        )
    for key in ("latents_mean", "latents_std"):
        if key in config and len(config[key]) != z_dim:
            raise ParameterError(f"vae={source!r}: {key} has {len(config[key])} values, z_dim is {z_dim}")


class WanVAEDecoder:
    """``latents [B, C, F, H, W] -> pixels [B, F', 3, H', W']`` in [0, 1], as ``WanPipeline`` decodes.

    Args:
        vae: a ``diffusers.AutoencoderKLWan`` (eval mode, on its device).
        source: where it was loaded from (messages only).
    """

    def __init__(self, vae: Any, *, source: str = "") -> None:
        self.vae = vae.eval()
        self.source = source

    @property
    def latent_channels(self) -> int:
        """Channels of the latents it decodes (``z_dim``; 16 for Wan2.1)."""
        return int(self.vae.config.z_dim)

    def __repr__(self) -> str:
        return f"WanVAEDecoder({self.source!r}, z_dim={self.latent_channels})"

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode ``[B, z_dim, F, H, W]`` normalised latents (what the transformer generates) to
        ``[B, F', 3, H', W']`` in [0, 1] in the VAE's dtype on its device (Wan2.1: ``F' = 4 (F - 1) + 1``,
        ``H' = 8 H``, ``W' = 8 W``)."""
        vae = self.vae
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ParameterError(f"vae {self.source!r} decodes latents [B, {self.latent_channels}, F, H, W], got "
                                 f"{list(latents.shape)}")
        parameter = next(vae.parameters())
        latents = latents.to(parameter.device, dtype=vae.dtype)
        shape = (1, self.latent_channels, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        with torch.no_grad():
            video = vae.decode(latents, return_dict=False)[0]  # [B, 3, F', H', W'] in about [-1, 1]
        return (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def load_wan_vae(source: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 latent_channels: int | None = None) -> WanVAEDecoder:
    """Load the Wan VAE with ``diffusers.AutoencoderKLWan.from_pretrained``, strictly.

    Args:
        source: an ``AutoencoderKLWan`` folder, a pipeline folder with ``vae/``, or a hub id (a pipeline
            repository is read from its ``vae`` subfolder).
        device, dtype: where and in which precision it decodes (diffusers' Wan examples use float32).
        latent_channels: the transformer's ``in_channels``, checked against the VAE's ``z_dim`` before any
            weight is read.

    Returns:
        A callable ``latents [B, C, F, H, W] -> pixels [B, F', 3, H', W']`` in [0, 1].

    Raises:
        ParameterError: the source is absent, incomplete, not an ``AutoencoderKLWan``, or its ``z_dim`` is
            not ``latent_channels``.
        CheckpointError: missing, unexpected or mis-shaped weights (``from_pretrained`` would only warn).
    """
    from diffusers import AutoencoderKLWan

    from cachepolicy.adapters.wan.adapter import parse_dtype

    label = str(source)
    target = parse_dtype(dtype)
    if is_hub_id(source):
        subfolder = _hub_subfolder(label, "vae")
        location, extra = label, ({"subfolder": subfolder} if subfolder else {})
        try:
            config = AutoencoderKLWan.load_config(location, **extra)
        except OSError as exc:
            raise ParameterError(f"vae={label!r} is neither a local folder nor a reachable hub repository: {exc}; "
                                 f"{_EXPECTED_VAE}") from exc
    else:
        folder = vae_folder(source)
        location, extra = str(folder), {}
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ParameterError(f"vae={label!r}: cannot read {folder / 'config.json'}: {exc}") from exc
    _check_vae_config(dict(config), latent_channels, label)
    try:
        vae, info = AutoencoderKLWan.from_pretrained(location, torch_dtype=target, output_loading_info=True, **extra)
    except OSError as exc:
        raise ParameterError(f"vae={label!r} cannot be read: {exc}; {_EXPECTED_VAE}") from exc
    except (RuntimeError, ValueError) as exc:  # mis-shaped tensors, corrupt files
        raise CheckpointError(f"vae={label!r}: the weights do not load: {exc}") from exc
    bad = {"missing": list(info.get("missing_keys", ())), "unexpected": list(info.get("unexpected_keys", ())),
           "mis-shaped": [str(k) for k in info.get("mismatched_keys", ())],
           "unloadable": [str(m) for m in info.get("error_msgs", ())]}
    if any(bad.values()):
        del vae
        details = "; ".join(f"{len(v)} {k} keys: {', '.join(sorted(v)[:10])}" for k, v in bad.items() if v)
        raise CheckpointError(f"vae={label!r}: the weights do not match AutoencoderKLWan's config; nothing was "
                              f"loaded: {details}")
    decoder = WanVAEDecoder(vae.to(device).eval().requires_grad_(False), source=label)
    logger.info("loaded %r on %s (%s)", decoder, device, target)
    return decoder


# ------------------------------------------------------------------------------------------ wiring
def check_component_sources(*, text_encoder: Any = None, vae: Any = None) -> None:
    """Cheap checks of local ``text_encoder=`` / ``vae=`` folders (absent, incomplete), run before the
    transformer is loaded so that a typo fails at once. Callables, ``None`` and hub ids pass."""
    for option, value, check in (("text_encoder", text_encoder, text_encoder_folders), ("vae", vae, vae_folder)):
        if value is None or callable(value):
            continue
        if not isinstance(value, (str, Path)):
            raise ParameterError(f"{option}={value!r}: expected a folder, a hub id or a callable")
        if not is_hub_id(value):
            check(value)


TextEncoder = Callable[[Sequence[str]], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]


def resolve_components(transformer: Any, *, model: str, text_encoder: Any = None, vae: Any = None,
                       device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                       vae_dtype: str | torch.dtype = "float32") -> tuple[TextEncoder, Decoder | None]:
    """The ``(text encoder, decoder)`` a Wan adapter gets from the ``text_encoder=`` and ``vae=`` options.

    Args:
        transformer: the loaded ``WanTransformer3DModel`` (its ``text_dim`` and ``in_channels`` are checked
            against the components' configs).
        model: the model name, for messages.
        text_encoder: ``None`` (hashed-word stand-in, with a warning), a callable ``prompts -> [B, L,
            text_dim]`` (used as is), or a folder / hub id (:func:`load_umt5_text_encoder`, 512 tokens).
        vae: ``None`` (no decoder), a callable ``latents -> pixels`` (used as is), or a folder / hub id
            (:func:`load_wan_vae`).
        device: where loaded components run; dtype: the text encoder's precision (the transformer's);
        vae_dtype: the VAE's precision (float32, as in diffusers' Wan examples).
    """
    from cachepolicy.adapters.wan.checkpoints import default_text_encoder

    check_component_sources(text_encoder=text_encoder, vae=vae)
    config = transformer.config
    if text_encoder is None:
        encoder: Any = default_text_encoder(config.text_dim, model)
    elif callable(text_encoder):
        encoder = text_encoder
    else:
        encoder = load_umt5_text_encoder(text_encoder, device=device, dtype=dtype, text_dim=config.text_dim)
    decoder: Any = None
    if vae is not None:
        decoder = vae if callable(vae) else load_wan_vae(vae, device=device, dtype=vae_dtype,
                                                         latent_channels=config.in_channels)
    return encoder, decoder
