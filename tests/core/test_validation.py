"""Input checks of one kind each: numbers a tensor holds, devices, loader options by signature, text files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachepolicy.errors import ParameterError
from cachepolicy.validation import (
    FLOAT32_MAX,
    INT64_MAX,
    check_device,
    check_float32,
    check_int,
    check_loader_options,
    read_text_file,
)


@given(st.integers())
def test_integers_are_those_of_int64(value):
    if 0 <= value <= INT64_MAX:
        assert check_int(value, "seed", low=0) == value
    else:
        with pytest.raises(ParameterError, match=rf"seed must be at (least 0|most 2\*\*63 - 1 \(int64\)), got {value}"):
            check_int(value, "seed", low=0)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_those_finite_in_float32(value):
    if abs(value) <= FLOAT32_MAX:
        assert check_float32(value, "scale") == value
    else:
        with pytest.raises(ParameterError, match="scale must be a finite number of float32"):
            check_float32(value, "scale")


def test_booleans_are_not_numbers():
    with pytest.raises(ParameterError, match="must be an integer, got True"):
        check_int(True, "frames")
    with pytest.raises(ParameterError, match="must be a number, got False"):
        check_float32(False, "p")


def test_devices_must_exist_here():
    assert check_device("cpu") == "cpu"
    with pytest.raises(ParameterError, match=r"device 'gpu' is not a torch device; write cpu, cuda, cuda:N or mps"):
        check_device("gpu")
    with pytest.raises(ParameterError, match=r"device 'cuda:99' is not available on this machine; available: cpu"):
        check_device("cuda:99")


def _loader(path: str | None = None, *, steps: int | None = None, scale: float = 1.0, name: str = "x",
            flag: bool = False, size: tuple[int, int] = (8, 8), device: str = "cpu") -> None:
    """A loader signature like the adapters' (``size`` is not a simple type: not checked)."""


def _open_loader(seed: int = 0, **overrides: object) -> None:
    """A loader that passes unknown options on."""


@pytest.mark.parametrize("options, message", [
    ({"stpes": 3}, r"model 'm' takes no option 'stpes'; it takes: path, steps, scale, name, flag, size, device"),
    ({"steps": "3"}, r"steps='3': model 'm' takes int or none for steps, got str"),
    ({"steps": 2.5}, r"takes int or none for steps, got float"),
    ({"steps": True}, r"takes int or none for steps, got bool"),
    ({"scale": "big"}, r"takes float for scale, got str"),
    ({"scale": 1e39}, r"scale must be a finite number of float32"),
    ({"flag": 1}, r"takes bool for flag, got int"),
    ({"name": 3}, r"takes str for name, got int"),
    ({"steps": 2**70}, r"steps must be at most 2\*\*63 - 1"),
    ({"device": "cuda:99"}, r"device 'cuda:99' is not available"),
])
def test_loader_options_are_checked_against_the_loaders_signature(options, message):
    with pytest.raises(ParameterError, match=message):
        check_loader_options("m", _loader, options)


def test_loader_options_that_fit_pass():
    check_loader_options("m", _loader, {"path": "/x", "steps": 3, "scale": 2, "flag": True, "size": "8x8"})
    check_loader_options("m", _open_loader, {"seed": 1, "anything": "goes"})
    with pytest.raises(ParameterError, match="takes int for seed, got str"):
        check_loader_options("m", _open_loader, {"seed": "one"})


def test_text_files_must_be_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red fox\n".encode())
    assert read_text_file(path, "prompts file") == "a red fox\n"
    path.write_bytes(b"a red fox\nthird\nna\xefve\n")
    with pytest.raises(ParameterError, match=rf"prompts file {path} is not UTF-8 text: byte 0xef on line 3"):
        read_text_file(Path(path), "prompts file")
