"""Saving and loading drift-lab weights (safetensors) and their configuration (JSON).

A *weights directory* holds ``config.json`` (:meth:`LabConfig.to_dict`) and ``weights.safetensors``
(the transformer's ``state_dict``, float32). Training checkpoints (see :mod:`cachepolicy.lab.train`) hold
the same two files (EMA weights) plus the raw weights, the optimizer state and ``state.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from cachepolicy.lab.errors import LabCheckpointError
from cachepolicy.lab.model import LabConfig, build_transformer, load_lab_config

__all__ = ["load_lab_model", "load_state_into", "save_weights_dir", "write_atomically"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def write_atomically(directory: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> None:
    """Write ``files`` (name -> bytes, or name -> tensor dict saved as safetensors) into ``directory``.

    The files go to a sibling temporary directory which then replaces ``directory``, so a reader (or
    a resumed run after a kill) never sees a half-written checkpoint.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, dict):
            save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / name))
        else:
            (tmp / name).write_bytes(content)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_weights_dir(directory: Path, config: LabConfig, state: dict[str, torch.Tensor],
                     extra: dict[str, bytes] | None = None) -> None:
    """Write a weights directory: ``config.json``, ``weights.safetensors`` and any ``extra`` files."""
    files: dict[str, bytes | dict[str, torch.Tensor]] = {
        CONFIG_FILE: json.dumps(config.to_dict(), indent=2).encode(),
        WEIGHTS_FILE: state,
    }
    files.update(extra or {})
    write_atomically(Path(directory), files)


def load_state_into(model: WanTransformer3DModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly; mismatches raise :class:`LabCheckpointError` naming ``source``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise LabCheckpointError(
            f"weights in {source} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict(state, strict=True)


def load_lab_model(directory: str | Path, weights: str = WEIGHTS_FILE) -> tuple[WanTransformer3DModel, LabConfig]:
    """Load a drift-lab model from a weights directory (or a training checkpoint directory).

    Args:
        directory: directory holding ``config.json`` and ``weights``.
        weights: file name of the safetensors weights inside ``directory``.

    Returns:
        ``(model, config)``, the model in eval mode, float32, on CPU.
    """
    directory = Path(directory)
    config = load_lab_config(directory / CONFIG_FILE)
    path = directory / weights
    if not path.is_file():
        raise LabCheckpointError(f"no weights file {path}")
    model = build_transformer(config)
    load_state_into(model, load_file(str(path)), str(path))
    model.eval()
    return model, config
