"""Checks of user input that have no better home, one function per kind of input, run before anything is
written. Each raises a :class:`~cachepolicy.errors.CachePolicyError` whose message names the bad value and
what is allowed.

Bounds come from what the model and its tensors can hold: integers that reach a tensor or a generator must
fit in int64, floats must be finite in float32, a batch must leave room for its KV cache in the device's
memory, a device must exist here.
"""

from __future__ import annotations

import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cachepolicy.errors import ParameterError, RolloutConfigError

#: the largest integer a tensor index, a seed or a generator takes (int64)
INT64_MAX = 2**63 - 1
#: the largest finite float32
FLOAT32_MAX = 3.4028234663852886e38


def check_int(value: Any, what: str, *, low: int | None = None, high: int | None = INT64_MAX) -> int:
    """``value`` as an int in ``[low, high]`` (bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParameterError(f"{what} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ParameterError(f"{what} must be at least {low}, got {value}")
    if high is not None and value > high:
        limit = "2**63 - 1 (int64)" if high == INT64_MAX else str(high)
        raise ParameterError(f"{what} must be at most {limit}, got {value}")
    return value


def check_float32(value: Any, what: str) -> float:
    """``value`` as a float that is finite in float32 (ints are floats here, bools are not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ParameterError(f"{what} must be a number, got {value!r}")
    number = float(value) if abs(value) <= FLOAT32_MAX else math.inf
    if not math.isfinite(number):
        raise ParameterError(f"{what} must be a finite number of float32 (magnitude at most 3.4e38), got {value!r}")
    return number


def check_scalar(value: Any, what: str) -> None:
    """Numbers that reach tensors: ints within int64, floats finite in float32; anything else passes."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        check_int(value, what, low=-INT64_MAX - 1)
    elif isinstance(value, float):
        check_float32(value, what)


def check_device(device: Any) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...)."""
    import torch

    if not isinstance(device, str) or not device.strip():
        raise ParameterError(f"device must be a name such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ParameterError(f"device {device!r} is not a torch device; write cpu, cuda, cuda:N or mps "
                             f"(available here: {', '.join(available_devices())})") from None
    available = available_devices()
    kinds = {name.partition(":")[0] for name in available}
    found = parsed.type in ("cpu", "meta") or (
        parsed.type in kinds and (parsed.index is None or f"{parsed.type}:{parsed.index}" in available
                                  or (parsed.type == "mps" and parsed.index == 0)))
    if not found:
        raise ParameterError(f"device {device!r} is not available on this machine; available: {', '.join(available)}")
    return device


def available_devices() -> list[str]:
    """The devices a model can be put on here: ``cpu``, each ``cuda:N``, ``mps``."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


_SIMPLE_TYPES = (int, float, str, bool, Path, type(None))


def check_loader_options(model: str, loader: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """Check model ``options`` against the signature of the model's ``loader``: every name must be a
    parameter (unless the loader takes ``**options``), every value of the type its annotation names when
    that annotation is built from int, float, str, bool, Path and None, every number within what a tensor
    holds, and ``device`` a device of this machine."""
    signature = inspect.signature(loader)
    parameters = {name: p for name, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_more = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        hints = typing.get_type_hints(loader)
    except Exception:  # noqa: BLE001 - an annotation we cannot resolve is not checked
        hints = {}
    for name, value in options.items():
        what = f"model option {name}={value!r}"
        if name not in parameters and not takes_more:
            raise ParameterError(f"{what}: model {model!r} takes no option {name!r}; it takes: "
                                 f"{', '.join(parameters) or 'none'}")
        check_scalar(value, f"model option {name}")
        if name == "device" and value is not None:
            check_device(value)
        allowed = _simple_types(hints.get(name))
        if allowed is not None and not _is_instance(value, allowed):
            names = " or ".join(sorted({t.__name__ if t is not type(None) else "none" for t in allowed}))
            raise ParameterError(f"{what}: model {model!r} takes {names} for {name}, got {type(value).__name__}")


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """The types an annotation allows when it is made of simple types only, else None (not checked)."""
    if hint is None:
        return None
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not all(isinstance(a, type) and a in _SIMPLE_TYPES for a in args):
        return None
    return tuple(args)


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    if isinstance(value, str) and Path in allowed:
        return True
    return isinstance(value, allowed)


def check_batch_memory(info: Any, batch: int, device: str | None = None) -> None:
    """Raise :class:`RolloutConfigError` when ``batch`` samples cannot fit their KV cache on the model's
    device even with one chunk resident (the least any policy keeps): every layer holds K and V of
    ``2 * tokens_per_chunk`` slots per sample at the model's dtype."""
    import torch

    dtype = getattr(torch, str(info.dtype).removeprefix("torch."), torch.float32)
    element = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    per_sample = info.num_layers * 2 * info.num_heads * info.head_dim * 2 * info.tokens_per_chunk * element
    memory = device_memory(device or info.device)
    if memory and batch * per_sample > memory:
        raise RolloutConfigError(
            f"a batch of {batch} needs {batch * per_sample / 2**30:.1f} GiB for its KV cache alone (one chunk "
            f"per sample, {per_sample / 2**20:.2f} MiB each); {device or info.device} has {memory / 2**30:.1f} GiB: "
            f"use a batch of at most {max(1, memory // per_sample)}"
        )


def device_memory(device: str) -> int | None:
    """Total memory in bytes of ``device`` (a CUDA GPU's, else this machine's RAM); None when unknown."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 raise :class:`ParameterError` naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParameterError(f"{what} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line}; "
                             f"save it as UTF-8") from None


def check_policy_params(policies: Any) -> None:
    """Every number a policy holds fits what its tensors take (ints in int64, floats finite in float32)."""
    for policy in policies:
        for name, value in policy.params().items():
            check_scalar(value, f"{policy.name}: {name}")
