"""Strict checkpoint loaders into a stock ``diffusers.WanTransformer3DModel``.

Two on-disk formats are read:

* **Training checkpoints** of Self Forcing, Rolling Forcing and CausVid (all Wan2.1-1.3B). A torch file
  (``torch.save`` of a dict) holding ``generator`` and, once EMA has started, ``generator_ema`` state
  dicts (Self Forcing also stores ``critic``; CausVid's image-to-video files use ``model``). Their keys
  are the *original* Wan names behind the wrapper's ``model.`` prefix (``model.blocks.0.self_attn.q.weight``);
  EMA keys may also carry FSDP / activation-checkpointing / ``torch.compile`` wrapper components
  (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``). The same flat keys in a
  safetensors file (``generator_ema.model.blocks.0...``), a bare original-layout state dict, or a folder
  holding ``model.pt`` (CausVid's ``--checkpoint_folder``) are accepted too. Names are converted with
  diffusers' own ``convert_wan_transformer_to_diffusers``; the architecture is inferred from the tensor
  shapes (heads, which no shape reveals, default to Wan2.1's 128 channels per head) or given explicitly.
* **diffusers folders** (``config.json`` + ``diffusion_pytorch_model*.safetensors``, sharded or not, or a
  pipeline folder with a ``transformer/`` subfolder).

Loading is strict and atomic: the key set and every shape are compared with a model built from the
config *before* any weight is assigned; missing, unexpected or mis-shaped keys raise
:class:`~cachepolicy.errors.CheckpointError` listing them, and a model is returned only when complete.
``torch.load`` always runs with ``weights_only=True``; nothing is ever unpickled beyond tensors and
containers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from cachepolicy.adapters.wan.adapter import WanAdapter, parse_dtype
from cachepolicy.errors import CheckpointError, ParameterError
from cachepolicy.models import Sampler

logger = logging.getLogger(__name__)

#: wrapper components that FSDP, activation checkpointing and torch.compile insert into parameter names
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: leading prefixes of the original names: ComfyUI / single-file (``model.diffusion_model.``), the AR
#: systems' ``WanDiffusionWrapper`` (``model.``)
LEADING_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
#: top-level entries of a training checkpoint that hold generator state dicts
GENERATOR_KEYS = ("generator", "model")
EMA_KEY = "generator_ema"
#: channels per attention head when the config does not say (Wan2.1 1.3B: 12 x 128, 14B: 40 x 128)
DEFAULT_HEAD_DIM = 128
#: how many names of each kind an error message lists
LIST_LIMIT = 10

_SAFETENSORS_GROUPS = ("generator", "generator_ema", "critic")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# original Wan config.json vocabulary (``WanModel``) -> diffusers ``WanTransformer3DModel`` arguments
_ORIGINAL_CONFIG_KEYS = {
    "num_heads": "num_attention_heads",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
}
# original config keys that do not change the weights or are implied by the keys
_IGNORED_ORIGINAL_KEYS = {"model_type", "text_len", "window_size"}


# ------------------------------------------------------------------------------------------ reading
def _sniff_safetensors(path: Path) -> bool:
    """True if ``path`` looks like a safetensors file (suffix, or an 8-byte header length then ``{``)."""
    if path.suffix == ".safetensors":
        return True
    if path.suffix in _TORCH_SUFFIXES:
        return False
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_torch(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (memory-mapped when the file allows)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: torch.load(weights_only=True) failed: {exc}. The file is truncated "
            f"or holds objects other than tensors and plain containers; cachepolicy never unpickles arbitrary "
            f"objects (re-save the state dicts as tensors, or as safetensors)"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or not a torch file?): {type(exc).__name__}: {exc}"
        ) from exc


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    """Open a safetensors file, turning a truncated or malformed file into a :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or not a safetensors file?): {exc}"
        ) from exc
    with handle as opened:
        yield opened


def _read_safetensors(path: Path, keys: list[str] | None = None, strip: str = "") -> dict[str, torch.Tensor]:
    """Tensors of ``keys`` (default: all) from a safetensors file, with ``strip`` removed from their names."""
    from safetensors import SafetensorError

    with _safetensors(path) as handle:
        try:
            return {key[len(strip):]: handle.get_tensor(key) for key in (keys if keys is not None else handle.keys())}
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _describe(mapping: Mapping[str, Any]) -> str:
    names = sorted(str(k) for k in mapping)
    more = f" ... ({len(names)} in all)" if len(names) > LIST_LIMIT else ""
    return ", ".join(repr(n) for n in names[:LIST_LIMIT]) + more


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def read_generator_state_dict(path: str | Path, *, ema: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """Read the generator (or its EMA) state dict of a training checkpoint, names untouched.

    Args:
        path: a torch file, a safetensors file with flat ``<group>.<name>`` keys, or a folder holding
            ``model.pt``.
        ema: read ``generator_ema`` (True) or ``generator`` (False; ``model`` is accepted as a fallback,
            as CausVid's image-to-video files and Self Forcing's ``generator_ckpt`` loader do). A bare state
            dict (no groups) is read only with ``ema=False``.

    Returns:
        ``(which, state_dict)``: which entry was read (``"generator_ema"``, ``"generator"``, ``"model"`` or
        ``"(bare state dict)"``) and its tensors on the CPU.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.pt"
        if not candidate.is_file():
            raise CheckpointError(
                f"{path} is a folder without model.pt; pass the checkpoint file itself "
                f"(contents: {', '.join(sorted(p.name for p in path.iterdir())[:LIST_LIMIT]) or 'empty'})"
            )
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    wanted = (EMA_KEY,) if ema else GENERATOR_KEYS
    hint = "pass ema=false to load 'generator'" if ema else "pass ema=true to load 'generator_ema'"
    if _sniff_safetensors(path):
        with _safetensors(path) as handle:
            names = list(handle.keys())
        groups = {n.split(".", 1)[0] for n in names if n.split(".", 1)[0] in _SAFETENSORS_GROUPS}
        if not groups:  # a bare state dict
            if ema:
                raise CheckpointError(
                    f"checkpoint {path} holds a bare state dict ({len(names)} tensors, e.g. {names[:3]}), no "
                    f"'{EMA_KEY}' group; pass ema=false to load it"
                )
            return "(bare state dict)", _read_safetensors(path)
        for which in wanted:
            if which in groups:
                keys = [n for n in names if n.startswith(which + ".")]
                return which, _read_safetensors(path, keys, strip=which + ".")
        raise CheckpointError(
            f"checkpoint {path} has no {' or '.join(repr(w) for w in wanted)} tensors; its key groups are "
            f"{', '.join(repr(g) for g in sorted(groups))}; {hint}"
        )
    content = _read_torch(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(content).__name__}, expected a dict of state dicts")
    if _is_state_dict(content) and not any(k in content for k in (*GENERATOR_KEYS, EMA_KEY)):
        if ema:
            raise CheckpointError(
                f"checkpoint {path} holds a bare state dict ({len(content)} tensors), no '{EMA_KEY}' key; "
                f"pass ema=false to load it"
            )
        return "(bare state dict)", dict(content)
    for which in wanted:
        value = content.get(which)
        if value is not None:
            if not _is_state_dict(value):
                raise CheckpointError(f"checkpoint {path}: '{which}' is a {type(value).__name__}, not a state dict")
            return which, dict(value)
    raise CheckpointError(
        f"checkpoint {path} has no {' or '.join(repr(w) for w in wanted)} key; it holds {_describe(content)}; {hint}"
    )


# -------------------------------------------------------------------------------------- conversion
def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper components (``_fsdp_wrapped_module.`` ...) anywhere in the names, then the leading
    ``model.`` (or ``model.diffusion_model.``) prefix that every name shares."""
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for component in WRAPPER_COMPONENTS:
            key = key.replace(component, "")
        cleaned[key] = value
    for prefix in LEADING_PREFIXES:
        if cleaned and all(key.startswith(prefix) for key in cleaned):
            return {key[len(prefix):]: value for key, value in cleaned.items()}
    return cleaned


def is_diffusers_layout(state_dict: Mapping[str, Any]) -> bool:
    """True when the names are already diffusers' (``condition_embedder.*``, ``proj_out.*``)."""
    return any(key.startswith(("condition_embedder.", "proj_out.")) for key in state_dict)


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert original Wan names to diffusers names with diffusers' own converter.

    Returns:
        ``(converted, origin)``: the converted state dict (same tensors) and, for error messages, the
        original name of every converted key.
    """
    converted = convert_wan_transformer_to_diffusers(dict(state_dict))
    origin: dict[str, str] = {}
    for key in state_dict:  # the converter renames key by key for T2V weights: replay it on names only
        renamed = convert_wan_transformer_to_diffusers({key: torch.empty(0)})
        if len(renamed) == 1:
            origin[next(iter(renamed))] = key
    return converted, origin


# --------------------------------------------------------------------------------------------- config
def _constructor_arguments(model_class: type = WanTransformer3DModel) -> set[str]:
    return {name for name in inspect.signature(model_class.__init__).parameters if name != "self"}


#: keys of the autoregressive systems' own inference / training configs (Self Forcing's, LongLive's, Rolling
#: Forcing's and CausVid's YAML files); none of them is a Wan architecture key
AR_CONFIG_KEYS = frozenset({
    "local_attn_size", "sink_size", "model_kwargs", "denoising_step_list", "warp_denoising_step", "timestep_shift",
    "context_noise", "num_frame_per_block", "global_sink", "independent_first_frame", "generator_ckpt", "lora_ckpt",
    "num_output_frames", "switch_frame_indices", "generator_name", "real_name", "use_ema", "num_training_frames",
})


def _ar_setting(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """``model_kwargs.key`` (what the systems' ``WanDiffusionWrapper`` receives) before a top-level ``key``."""
    kwargs = config.get("model_kwargs")
    if isinstance(kwargs, Mapping) and key in kwargs:
        return kwargs[key]
    return config.get(key, default)


def translate_ar_config(config: Mapping[str, Any]) -> str:
    """What the cache and sampler settings of an autoregressive system's config are in ``cachepolicy``.

    ``local_attn_size=L`` and ``sink_size=S`` (latent frames; ``L`` counts the sink and the chunk's own
    ``F = num_frame_per_block`` frames, ``-1`` is global attention) are the policies
    ``attention-sink:frames=S+sliding-window:frames=L-S-F``; ``denoising_step_list``,
    ``warp_denoising_step``, ``timestep_shift`` and ``context_noise`` are a sampler
    (``sampler=steps=...,shift=...,warp=...,table=true,context_noise=...``, the float32 training table
    their code indexes). Returns one paragraph for an error message, naming the recipe a setting matches.
    """
    from cachepolicy.models import Sampler
    from cachepolicy.recipes import RECIPES

    parts: list[str] = []
    frames = config.get("num_frame_per_block", 1)
    local = _ar_setting(config, "local_attn_size", -1)
    sink = _ar_setting(config, "sink_size", 0)
    kwargs = config.get("model_kwargs")
    stated = {"local_attn_size", "sink_size"} & (set(config) | (set(kwargs) if isinstance(kwargs, Mapping) else set()))
    if not stated:
        pass
    elif not isinstance(local, int) or isinstance(local, bool) or not isinstance(sink, int) or isinstance(sink, bool):
        parts.append(f"local_attn_size={local!r}, sink_size={sink!r} (per-layer or non-integer windows) have no "
                     f"policy equivalent here")
    elif local == -1:
        parts.append("local_attn_size=-1 (global attention) is the default here: no policy, or --policy full")
    else:
        specs = [f"attention-sink:frames={sink}"] if sink > 0 else []
        window = local - sink - int(frames)
        if window >= int(frames):
            specs.append(f"sliding-window:frames={window}")
            spec = "+".join(specs)
            same = [name for name, recipe in RECIPES.items() if recipe.policies and "+".join(recipe.policies) == spec]
            parts.append(f"local_attn_size={local}, sink_size={sink} with {frames} frames per block is "
                         f"--policy {spec}" + (f" (the policies of the {same[0]} recipe: --recipe {same[0]})"
                                               if same else ""))
        else:
            parts.append(f"local_attn_size={local}, sink_size={sink} with {frames} frames per block leaves a window "
                         f"of {window} frames, shorter than one chunk, which sliding-window refuses")
    steps = config.get("denoising_step_list")
    if isinstance(steps, (list, tuple)) and steps:
        steps = [int(t) for t in steps]
        if steps[-1] == 0:  # CausVid lists the final 0 and drops it
            steps = steps[:-1]
        warp = bool(config.get("warp_denoising_step", False))
        shift = float(_ar_setting(config, "timestep_shift", 8.0))
        context = float(config.get("context_noise", 0))
        try:
            sampler = Sampler(denoising_steps=tuple(steps), shift=shift, warp=warp, table=True, context_noise=context)
        except ParameterError as exc:
            parts.append(f"its sampler settings are not valid here: {exc}")
        else:
            text = (f"--model-option sampler=steps={'/'.join(str(t) for t in steps)},shift={shift:g},"
                    f"warp={str(warp).lower()},table=true,context_noise={context:g}")
            same = [name for name, recipe in RECIPES.items() if recipe.sampler == sampler]
            parts.append(f"denoising_step_list={list(config['denoising_step_list'])}, warp_denoising_step={warp}, "
                         f"timestep_shift={shift:g}, context_noise={context:g} is {text}"
                         + (f" (the sampler of the {' and '.join(same)} recipe{'s' if len(same) > 1 else ''})"
                            if same else ""))
    if int(frames) != 3:
        parts.append(f"num_frame_per_block={frames} is --model-option frames_per_chunk={frames}")
    return "; ".join(parts)


def _read_config_file(source: Path) -> Any:
    if source.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ParameterError(f"config {source} is a YAML file (an autoregressive system's own config?) and PyYAML "
                                 f"is not installed; config= takes the Wan architecture config.json") from exc
        try:
            return yaml.safe_load(source.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ParameterError(f"config {source}: cannot read a YAML config: {exc}") from exc
    try:
        return json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ParameterError(f"config {source}: cannot read a JSON config: {exc}") from exc


def normalise_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A user config in diffusers' or the original Wan vocabulary -> ``WanTransformer3DModel`` arguments.

    ``config`` may be a dict or a path to a JSON file (a diffusers ``config.json``, an original Wan
    ``config.json`` such as ``Wan2.1-T2V-1.3B/config.json``, or a folder holding either). Keys starting
    with ``_`` are metadata and ignored. The original ``dim`` becomes a check (``heads * head_dim``).

    An autoregressive system's own config (Self Forcing's ``self_forcing_dmd.yaml``, LongLive's
    ``longlive_inference.yaml``...: keys such as ``local_attn_size``, ``sink_size``, ``denoising_step_list``,
    see :data:`AR_CONFIG_KEYS`), as a dict, a JSON or a YAML file, is refused with a
    :class:`~cachepolicy.errors.ParameterError` that says what its settings are here
    (:func:`translate_ar_config`): the policy spec of its window and sink, the sampler option, the recipe
    they match.
    """
    source: Any = "config"
    if isinstance(config, (str, Path)):
        source = Path(config)
        if source.is_dir():
            source = source / "config.json"
        config = _read_config_file(source)
        if not isinstance(config, Mapping):
            raise ParameterError(f"config {source} holds a {type(config).__name__}, expected a JSON object")
        source = f"config {source}"
    ar_keys = sorted(AR_CONFIG_KEYS & set(config))
    if ar_keys:
        raise ParameterError(
            f"{source} has keys of an autoregressive system's own inference config ({', '.join(ar_keys)}), not Wan "
            f"architecture keys. In cachepolicy the cache window and sink are policies and the denoising steps a "
            f"sampler, chosen per run, not with the model: {translate_ar_config(config)}. config= takes only the "
            f"architecture (an original Wan config.json such as wan_models/Wan2.1-T2V-1.3B/config.json, a diffusers "
            f"config.json, or a dict of either), and the checkpoint's shapes usually make it unnecessary"
        )
    allowed = _constructor_arguments()
    out: dict[str, Any] = {}
    dim = None
    for key, value in config.items():
        if key.startswith("_") or key in _IGNORED_ORIGINAL_KEYS:
            if key == "model_type" and value != "t2v":
                raise ParameterError(f"config model_type={value!r}: only text-to-video ('t2v') Wan models load here")
            if key == "window_size" and tuple(value) != (-1, -1):
                raise ParameterError(f"config window_size={value!r}: only global attention (-1, -1) is supported")
            continue
        if key == "dim":
            dim = int(value)
            continue
        name = _ORIGINAL_CONFIG_KEYS.get(key, key)
        if name not in allowed:
            known = sorted(allowed | set(_ORIGINAL_CONFIG_KEYS) | {"dim"})
            raise ParameterError(f"unknown Wan config key {key!r}; known keys: {', '.join(known)}")
        if name == "qk_norm" and isinstance(value, bool):  # original: a flag; diffusers: the norm's name
            value = "rms_norm_across_heads" if value else None
        if name == "patch_size":
            value = tuple(int(v) for v in value)
        out[name] = value
    if dim is not None:
        heads = out.get("num_attention_heads")
        head_dim = out.get("attention_head_dim")
        if heads is not None and head_dim is None:
            if dim % int(heads):
                raise ParameterError(f"config dim={dim} is not divisible by num_heads={heads}")
            out["attention_head_dim"] = dim // int(heads)
        elif head_dim is not None and heads is None:
            out["num_attention_heads"] = dim // int(head_dim)
        if int(out.get("num_attention_heads", 0)) * int(out.get("attention_head_dim", 0)) not in (0, dim):
            raise ParameterError(
                f"config dim={dim} does not equal num_attention_heads x attention_head_dim = "
                f"{out['num_attention_heads']} x {out['attention_head_dim']}"
            )
        out["_dim"] = dim
    return out


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        sample = ", ".join(sorted(state_dict)[:5])
        raise CheckpointError(
            f"{source} is not a Wan2.1 transformer: it has no {key!r} (after conversion to diffusers names; "
            f"its keys start {sample} ...)"
        )
    return tuple(state_dict[key].shape)


def infer_config(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | str | Path | None = None, *,
                 source: str = "checkpoint") -> dict[str, Any]:
    """The ``WanTransformer3DModel`` arguments of a diffusers-named state dict.

    Dimensions come from tensor shapes: ``patch_embedding.weight`` ``[dim, in_channels, p_t, p_h, p_w]``,
    ``proj_out.weight`` ``[out_channels * p_t * p_h * p_w, dim]``, ``...text_embedder.linear_1.weight``
    ``[dim, text_dim]``, ``...time_embedder.linear_1.weight`` ``[dim, freq_dim]``,
    ``blocks.0.ffn.net.0.proj.weight`` ``[ffn_dim, dim]``; the block count from ``blocks.N.``; the cross-
    attention norm and q/k norms from their presence. Heads: ``config`` if it says, else ``dim / 128``.
    Values that ``config`` states and the shapes contradict raise :class:`CheckpointError`.
    """
    given = normalise_config(config) if config is not None else {}
    dim, in_channels, *patch = _shape(state_dict, "patch_embedding.weight", source)
    if len(patch) != 3:
        raise CheckpointError(f"{source}: patch_embedding.weight has shape {[dim, in_channels, *patch]}, "
                              f"expected a Conv3d weight [dim, in_channels, p_t, p_h, p_w]")
    proj_out = _shape(state_dict, "proj_out.weight", source)
    patch_volume = patch[0] * patch[1] * patch[2]
    if proj_out[0] % patch_volume:
        raise CheckpointError(f"{source}: proj_out.weight {list(proj_out)} is not a multiple of the patch volume "
                              f"{patch_volume}")
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    inferred: dict[str, Any] = {
        "patch_size": tuple(patch),
        "in_channels": in_channels,
        "out_channels": proj_out[0] // patch_volume,
        "text_dim": _shape(state_dict, "condition_embedder.text_embedder.linear_1.weight", source)[1],
        "freq_dim": _shape(state_dict, "condition_embedder.time_embedder.linear_1.weight", source)[1],
        "ffn_dim": _shape(state_dict, "blocks.0.ffn.net.0.proj.weight", source)[0],
        "num_layers": max(blocks) + 1 if blocks else 0,
        "cross_attn_norm": "blocks.0.norm2.weight" in state_dict,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state_dict else None,
    }
    if "condition_embedder.image_embedder.norm1.weight" in state_dict:  # image-conditioned (I2V / FLF2V)
        inferred["image_dim"] = state_dict["condition_embedder.image_embedder.norm1.weight"].shape[0]
        inferred["added_kv_proj_dim"] = dim
        if "condition_embedder.image_embedder.pos_embed" in state_dict:
            inferred["pos_embed_seq_len"] = state_dict["condition_embedder.image_embedder.pos_embed"].shape[1]
    conflicts = []
    for key, value in inferred.items():
        if key in given and given[key] != value:
            conflicts.append(f"{key}: config {given[key]!r}, checkpoint {value!r}")
    stated_dim = given.pop("_dim", None)
    if stated_dim is not None and stated_dim != dim:
        conflicts.append(f"dim: config {stated_dim}, checkpoint {dim}")
    heads = given.get("num_attention_heads")
    head_dim = given.get("attention_head_dim")
    if heads is None and head_dim is None:
        head_dim = DEFAULT_HEAD_DIM
        if dim % head_dim:
            raise CheckpointError(
                f"{source}: hidden size {dim} is not a multiple of {DEFAULT_HEAD_DIM} (Wan's channels per head); "
                f"say how many heads it has: config={{'num_attention_heads': N}} (or an original Wan config.json)"
            )
        heads = dim // head_dim
    elif heads is None:
        heads = dim // int(head_dim)
    elif head_dim is None:
        head_dim = dim // int(heads)
    if int(heads) * int(head_dim) != dim:
        conflicts.append(f"num_attention_heads x attention_head_dim: config {heads} x {head_dim}, "
                         f"checkpoint hidden size {dim}")
    if conflicts:
        raise CheckpointError(f"{source} does not match the given config: " + "; ".join(conflicts))
    return {**given, **inferred, "num_attention_heads": int(heads), "attention_head_dim": int(head_dim)}


# ----------------------------------------------------------------------------------- strict building
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (buffers stay real), as diffusers does with
    ``accelerate.init_empty_weights(include_buffers=False)``: a model skeleton costs no memory and no
    random initialisation. Not thread-safe (patches ``nn.Module.register_parameter`` while active)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _format_list(title: str, items: list[str]) -> str:
    """``"  3 missing keys:"`` then the first :data:`LIST_LIMIT` items, one per line."""
    shown = "\n    ".join(items[:LIST_LIMIT])
    more = f"\n    ... and {len(items) - LIST_LIMIT} more" if len(items) > LIST_LIMIT else ""
    noun = title if len(items) != 1 else title.removesuffix("s")
    return f"  {len(items)} {noun}:\n    {shown}{more}"


def build_strict(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, source: str,
                 dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                 origin: Mapping[str, str] | None = None,
                 model_class: type = WanTransformer3DModel) -> WanTransformer3DModel:
    """A fresh ``model_class(**config)`` (default ``WanTransformer3DModel``) holding exactly ``state_dict``
    (diffusers names).

    The key set and every shape are checked against the config's model *before* anything is assigned:
    missing, unexpected and mis-shaped keys raise one :class:`CheckpointError` that lists the first
    :data:`LIST_LIMIT` of each with their counts (``origin`` adds the original name of a converted key).
    Parameters whose name matches ``_keep_in_fp32_modules`` stay float32, the rest take ``dtype`` (what
    ``from_pretrained(torch_dtype=...)`` and :func:`cast_model` do). Nothing is returned half-loaded.
    """
    target = parse_dtype(dtype)
    arguments = {k: v for k, v in config.items() if not k.startswith("_")}
    with _parameters_on_meta():
        model = model_class(**arguments)
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    origin = origin or {}

    def named(key: str) -> str:
        return f"{key} (original {origin[key]})" if key in origin and origin[key] != key else key

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{named(key)}: checkpoint {list(state_dict[key].shape)}, model {list(expected[key])}"
        for key in sorted(set(expected) & set(state_dict)) if tuple(state_dict[key].shape) != expected[key]
    ]
    not_float = [f"{named(k)}: {v.dtype}" for k, v in sorted(state_dict.items())
                 if k in expected and not v.is_floating_point()]
    if missing or unexpected or mis_shaped or not_float:
        del model
        summary = ", ".join(f"{k}={v}" for k, v in sorted(arguments.items()))
        parts = [f"{source} does not match {model_class.__name__}({summary}); nothing was loaded:"]
        if mis_shaped:
            parts.append(_format_list("mis-shaped keys", mis_shaped))
        if missing:
            parts.append(_format_list("missing keys", missing))
        if unexpected:
            parts.append(_format_list("unexpected keys", [named(k) for k in unexpected]))
        if not_float:
            parts.append(_format_list("non-floating-point tensors", not_float))
        raise CheckpointError("\n".join(parts))
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    weights = {
        key: value.to(torch.float32 if any(part in key for part in keep) else target)
        for key, value in state_dict.items()
    }
    # the model is only returned once complete: a failure leaves nothing half-loaded in use
    model.load_state_dict(weights, strict=True, assign=True)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: tensors left unloaded: {leftover[:LIST_LIMIT]}")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- front doors
def load_training_checkpoint(path: str | Path, *, ema: bool = True,
                             config: Mapping[str, Any] | str | Path | None = None,
                             dtype: str | torch.dtype = "float32",
                             device: str | torch.device = "cpu", lora: Any = None,
                             lora_alpha: float | None = None) -> WanTransformer3DModel:
    """Load a Self Forcing / Rolling Forcing / CausVid checkpoint into a stock ``WanTransformer3DModel``.

    Args:
        path: the checkpoint (see :func:`read_generator_state_dict` for the layouts read).
        ema: load ``generator_ema`` (True) or ``generator`` (False).
        config: architecture (dict or JSON path, diffusers or original Wan vocabulary); shapes decide the
            rest, heads default to ``dim / 128``.
        dtype: compute dtype; norms, modulation tables, time embedder stay float32.
        device: where the model goes.
        lora: a :class:`~cachepolicy.adapters.wan.lora.LoraWeights` merged into the original-layout weights
            before conversion (LongLive), with ``lora_alpha`` (default: its rank, a scale of 1).
    """
    if config is not None:
        normalise_config(config)  # a bad config is refused before the checkpoint is read
    which, raw = read_generator_state_dict(path, ema=ema)
    source = f"checkpoint {path} ['{which}']" if not which.startswith("(") else f"checkpoint {path}"
    stripped = strip_prefixes(raw)
    del raw
    if lora is not None:
        from cachepolicy.adapters.wan.lora import merge_lora

        stripped = merge_lora(stripped, lora, alpha=lora_alpha, source=source)
        source = f"{source} + LoRA {lora.path}"
    if is_diffusers_layout(stripped):
        converted, origin = stripped, {}
    else:
        converted, origin = original_to_diffusers(stripped)
    del stripped
    architecture = infer_config(converted, config, source=source)
    model = build_strict(architecture, converted, source=source, dtype=dtype, device=device, origin=origin)
    logger.info("loaded %s: %d tensors, %d layers, %d heads x %d, ffn %d, dtype %s", source, len(converted),
                architecture["num_layers"], architecture["num_attention_heads"], architecture["attention_head_dim"],
                architecture["ffn_dim"], parse_dtype(dtype))
    return model


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid shard index ({exc})") from exc
        shards = sorted(set(weight_map.values()))
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {absent[:LIST_LIMIT]}")
        return [folder / name for name in shards]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder} has no diffusion_pytorch_model.safetensors (or its .index.json, or .bin); it holds: "
        f"{', '.join(present[:LIST_LIMIT])}"
    )


def load_diffusers_folder(path: str | Path, *, dtype: str | torch.dtype = "float32",
                          device: str | torch.device = "cpu",
                          model_class: type = WanTransformer3DModel) -> WanTransformer3DModel:
    """Strictly load a ``model_class`` (default ``WanTransformer3DModel``) saved in diffusers format.

    ``path`` is the model folder (``config.json`` + weights) or a pipeline folder with ``transformer/``.
    Unlike ``from_pretrained`` (which only warns about unexpected keys), any missing, unexpected or
    mis-shaped key raises :class:`CheckpointError`.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: not a diffusers model folder")
    try:
        raw_config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read it: {exc}") from exc
    expected_class = model_class.__name__
    class_name = raw_config.get("_class_name", expected_class)
    if class_name != expected_class:
        raise CheckpointError(f"{folder} holds a {class_name}, not a {expected_class}")
    allowed = _constructor_arguments(model_class)
    ignored = sorted(k for k in raw_config if not k.startswith("_") and k not in allowed)
    if ignored:
        logger.warning("%s/config.json: ignoring keys this diffusers version does not know: %s", folder, ignored)
    config = {k: v for k, v in raw_config.items() if k in allowed}
    if "patch_size" in config:
        config["patch_size"] = tuple(config["patch_size"])
    state_dict: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        part = _read_safetensors(file) if file.suffix == ".safetensors" else _read_torch(file)
        if not _is_state_dict(part):
            raise CheckpointError(f"{file} is not a state dict of tensors")
        state_dict.update(part)
    return build_strict(config, state_dict, source=f"diffusers folder {folder}", dtype=dtype, device=device,
                        model_class=model_class)


# ------------------------------------------------------------------------------------ model loaders
def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ParameterError(f"{name}={value!r}: expected true or false")


def parse_latent_size(value: Any) -> tuple[int, int]:
    """``(60, 104)``, ``[60, 104]``, ``"60x104"`` or ``"60,104"`` -> ``(60, 104)`` latent pixels (H, W)."""
    parts: Any = value
    if isinstance(value, str):
        parts = re.split(r"[x,X]", value)
    try:
        height, width = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ParameterError(f"latent_size={value!r}: expected HxW latent pixels, e.g. 60x104") from None
    if height <= 0 or width <= 0:
        raise ParameterError(f"latent_size={value!r}: both sides must be positive")
    return height, width


def default_text_encoder(text_dim: int, model: str) -> Any:
    """The hashed-word stand-in encoder, with a warning that prompts are not really understood."""
    from cachepolicy.adapters.wan.tiny import HashedWordEncoder

    logger.warning(
        "model %r: no text encoder given; prompts are embedded by HashedWordEncoder (a fixed random vector per "
        "word, text_dim=%d), not UMT5: a real checkpoint will not follow the prompt. Pass text_encoder= "
        "(a callable prompts -> [B, L, %d]) for real conditioning.", model, text_dim, text_dim,
    )
    return HashedWordEncoder(text_dim)


_LOADER_OPTIONS = ("checkpoint", "ema", "device", "dtype", "latent_size", "frames_per_chunk", "config",
                   "text_encoder", "vae", "sampler")
_LORA_OPTIONS = ("lora", "lora_alpha", "lora_rank")


def _adapter(transformer: WanTransformer3DModel, *, model: str, device: str, dtype: str, latent_size: Any,
             frames_per_chunk: int, text_encoder: Any, vae: Any, sampler: Sampler | None) -> WanAdapter:
    """The :class:`WanAdapter` around a loaded transformer, with its text encoder and decoder resolved."""
    from cachepolicy.adapters.wan.components import resolve_components

    encoder, decoder = resolve_components(transformer, model=model, text_encoder=text_encoder, vae=vae,
                                          device=device, dtype=dtype)
    return WanAdapter(transformer, name=model, latent_size=parse_latent_size(latent_size), text_encoder=encoder,
                      frames_per_chunk=int(frames_per_chunk), sampler=sampler, decoder=decoder)


def _check_options(model: str, unknown: Mapping[str, Any], allowed: tuple[str, ...], checkpoint: Any,
                   example: str) -> None:
    if unknown:
        raise ParameterError(f"unknown option(s) {sorted(unknown)} for model {model!r}; "
                             f"allowed: {', '.join(allowed)}")
    if checkpoint is None:
        raise ParameterError(f"model {model!r} needs checkpoint=PATH (the training checkpoint file, e.g. "
                             f"--model-option checkpoint={example})")


def load_wan_checkpoint(checkpoint: str | Path | None = None, *, model: str = "wan-checkpoint", ema: Any = True,
                        device: str = "cpu", dtype: str = "float32", latent_size: Any = (60, 104),
                        frames_per_chunk: int = 3, config: Mapping[str, Any] | str | Path | None = None,
                        text_encoder: Any = None, vae: Any = None, sampler: Sampler | None = None,
                        **unknown: Any) -> WanAdapter:
    """A :class:`WanAdapter` around a training checkpoint (the loader behind ``self-forcing`` & co).

    Args:
        checkpoint: path of the checkpoint file (or a folder holding ``model.pt``).
        model: the model name recorded in outputs and messages.
        ema: load ``generator_ema`` (True) or ``generator`` (False); ``"true"``/``"false"`` accepted.
        device, dtype: where and in which precision the model runs.
        latent_size: ``(H, W)`` latent pixels per frame, or ``"HxW"`` (Wan2.1 at 480x832: 60x104).
        frames_per_chunk: latent frames per chunk (3 in every Wan-based AR system).
        config: architecture, when shapes do not tell (heads): dict or JSON path.
        text_encoder: a callable ``prompts -> [B, L, text_dim]``, or a UMT5 folder / hub id loaded with
            :func:`~cachepolicy.adapters.wan.components.load_umt5_text_encoder` (512 tokens, in ``dtype``);
            default: :class:`HashedWordEncoder` (warned).
        vae: a callable ``latents -> pixels [B, F', 3, H', W']``, or a Wan VAE folder / hub id loaded with
            :func:`~cachepolicy.adapters.wan.components.load_wan_vae` (float32); default: no decoder.
        sampler: default denoising recipe (default: Self Forcing's 4 steps warped with shift 5).
    """
    from cachepolicy.adapters.wan.components import check_component_sources

    _check_options(model, unknown, _LOADER_OPTIONS, checkpoint, "checkpoints/self_forcing_dmd.pt")
    if config is not None:
        normalise_config(config)  # refused before anything is read
    check_component_sources(text_encoder=text_encoder, vae=vae)
    transformer = load_training_checkpoint(str(checkpoint), ema=_as_bool("ema", ema), config=config, dtype=dtype,
                                           device=device)
    return _adapter(transformer, model=model, device=device, dtype=dtype, latent_size=latent_size,
                    frames_per_chunk=frames_per_chunk, text_encoder=text_encoder, vae=vae, sampler=sampler)


def _positive_number(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= 0 or isinstance(value, bool):
        raise ParameterError(f"{name}={value!r}: expected a positive {'integer' if kind is int else 'number'}")
    return number


def load_longlive(checkpoint: str | Path | None = None, *, lora: str | Path | None = None,
                  lora_alpha: Any = None, lora_rank: Any = None, ema: Any = False, device: str = "cpu",
                  dtype: str = "float32", latent_size: Any = (60, 104), frames_per_chunk: int = 3,
                  config: Mapping[str, Any] | str | Path | None = None, text_encoder: Any = None, vae: Any = None,
                  sampler: Sampler | None = None, **unknown: Any) -> WanAdapter:
    """``longlive``: LongLive 1.0's base generator (``longlive_base.pt``) with its LoRA (``lora.pt``) merged.

    LongLive's inference (NVlabs/LongLive ``inference.py``) loads ``generator`` of the base (``use_ema:
    false``), wraps the model with peft LoRA (rank 256, alpha 256) and loads ``lora.pt``'s
    ``generator_lora``. Here the LoRA is merged into the original-layout weights (``W + alpha/r * B @ A``, see
    :mod:`cachepolicy.adapters.wan.lora`) before the strict conversion, and the model is a stock
    ``WanTransformer3DModel``.

    Args:
        checkpoint: the base checkpoint (``longlive_models/models/longlive_base.pt``).
        lora: the LoRA file (``longlive_models/models/lora.pt``); required.
        lora_alpha: peft's ``lora_alpha`` (default: the rank, i.e. a scale of 1, as LongLive's configs).
        lora_rank: the rank the file must have (default: read from it; LongLive's release: 256).
        ema: read ``generator_ema`` of the base (default false, as LongLive's configs).
        other options: as :func:`load_wan_checkpoint`.
    """
    from cachepolicy.adapters.wan.components import check_component_sources
    from cachepolicy.adapters.wan.lora import read_lora

    model = "longlive"
    _check_options(model, unknown, (*_LOADER_OPTIONS, *_LORA_OPTIONS), checkpoint,
                   "longlive_models/models/longlive_base.pt")
    if config is not None:
        normalise_config(config)  # refused before anything is read
    if lora is None:
        raise ParameterError("model 'longlive' needs lora=PATH (LongLive's LoRA weights, e.g. --model-option "
                             "lora=longlive_models/models/lora.pt); to run the base alone, use wan-checkpoint")
    alpha = _positive_number("lora_alpha", lora_alpha, float)
    rank = _positive_number("lora_rank", lora_rank, int)
    check_component_sources(text_encoder=text_encoder, vae=vae)
    weights = read_lora(str(lora), rank=rank)  # small: checked before the base is read
    transformer = load_training_checkpoint(str(checkpoint), ema=_as_bool("ema", ema), config=config, dtype=dtype,
                                           device=device, lora=weights, lora_alpha=alpha)
    del weights
    return _adapter(transformer, model=model, device=device, dtype=dtype, latent_size=latent_size,
                    frames_per_chunk=frames_per_chunk, text_encoder=text_encoder, vae=vae, sampler=sampler)


def load_self_forcing(checkpoint: str | Path | None = None, *, ema: Any = True, **options: Any) -> WanAdapter:
    """``self-forcing``: a Self Forcing checkpoint (``self_forcing_dmd.pt``); EMA weights by default, as the
    README's ``--use_ema`` command loads them."""
    return load_wan_checkpoint(checkpoint, model="self-forcing", ema=ema, **options)


def load_rolling_forcing(checkpoint: str | Path | None = None, *, ema: Any = True, **options: Any) -> WanAdapter:
    """``rolling-forcing``: a Rolling Forcing checkpoint (``rolling_forcing_dmd.pt``); EMA by default, as its
    README's ``--use_ema`` command loads it."""
    return load_wan_checkpoint(checkpoint, model="rolling-forcing", ema=ema, **options)


def load_causvid(checkpoint: str | Path | None = None, *, ema: Any = False, **options: Any) -> WanAdapter:
    """``causvid``: a CausVid checkpoint (``model.pt`` or its folder); ``generator`` by default, which is
    what CausVid's inference scripts load."""
    return load_wan_checkpoint(checkpoint, model="causvid", ema=ema, **options)
