"""Shared helpers for the golden-fixture drivers in ``tools/golden/``.

Nothing here is copied from a reference repository. These helpers let a driver import a
reference checkout's *own* inference loop and model on a CPU-only machine:

* ``install_stubs`` - placeholder modules for third-party packages that the reference code imports
  at module level but never calls on the inference path we drive (e.g. ``ftfy`` for the T5
  tokenizer, ``einops`` for the VAE). Every placeholder callable raises if it is ever called, so a
  stub can never silently change a result.
* ``sdpa_attention`` - a drop-in for Wan's ``attention`` / ``flash_attention`` that runs
  ``torch.nn.functional.scaled_dot_product_attention`` in the *input* dtype (fp32 here). Wan's own
  CPU fallback casts q/k/v to bfloat16 (``dtype=torch.bfloat16`` default), and its
  ``flash_attention`` asserts CUDA.
* ``randomise_`` - every parameter of the tiny model drawn from a seeded generator (Wan's init
  zeroes the output head, which would make a comparison vacuous).
* ``DrawRecorder`` - wraps ``torch.randn``/``randn_like``/``rand``/``randint``/... so every random
  draw the reference loop makes is recorded (value, label, order) or replayed from a recording.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import types
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def setup_torch(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------------
# stubs for unavailable, unused third-party modules


class _Placeholder:
    """Attribute access and subclassing work; calling raises (the path we drive never calls it)."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._qualname}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"golden driver stub {self._qualname} was called; the stub is not valid here")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")


class _EasyDict(dict):
    """Minimal attribute dict for ``wan/configs`` (imported at package import, never used by us)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def __setattr__(self, name, value):
        self[name] = value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        if spec.name == "easydict":
            mod.EasyDict = _EasyDict
        return mod

    def exec_module(self, module):
        return None


STUBBED: list[str] = []


def install_stubs(candidates: list[str]) -> list[str]:
    """Stub each top-level module of ``candidates`` that cannot be imported here. Returns the list."""
    missing = []
    for name in candidates:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            missing.append(name)
    if missing:
        sys.meta_path.insert(0, _StubFinder(set(missing)))
    STUBBED.extend(missing)
    return missing


def used_stubs() -> list[str]:
    """The stubbed names that something actually imported."""
    return [n for n in STUBBED if n in sys.modules]


def stub_module(fullname: str, **attrs: Any) -> types.ModuleType:
    """Pre-seed ``sys.modules[fullname]`` with a module holding ``attrs`` (others -> placeholders)."""
    mod = _StubModule(fullname)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[fullname] = mod
    STUBBED.append(fullname)
    return mod


# ---------------------------------------------------------------------------------------------
# attention on torch SDPA in the input dtype


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None,
                   fa_version=None, **unused):
    """[B, L, H, D] q/k/v -> [B, Lq, H, D]; no padding masks, no window, no causal mask (as called)."""
    if q_lens is not None or k_lens is not None:
        raise RuntimeError("golden sdpa_attention: variable lengths are not expected on this path")
    if causal or tuple(window_size) != (-1, -1) or dropout_p:
        raise RuntimeError("golden sdpa_attention: causal/window/dropout not expected on this path")
    if q_scale is not None:
        q = q * q_scale
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def sinusoidal_embedding_1d_fp32(dim, position):
    """diffusers-style float32 sinusoid ([cos, sin], 10000^(-i/half)) for the sensitivity rerun."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.to(torch.float32)
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
    sinusoid = position[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


# ---------------------------------------------------------------------------------------------
# weights


def randomise_(model: torch.nn.Module, seed: int, gain: float = 1.0, exact_dtype=torch.bfloat16) -> None:
    """Draw EVERY parameter from a seeded generator, in sorted-name order.

    matrices / conv kernels: N(0, gain/sqrt(fan_in)); 1-D ``weight`` of norms: 1 + 0.1 N(0,1);
    biases: 0.05 N(0,1); ``modulation`` tables: N(0,1)/sqrt(dim) (Wan's own scale).
    Values are rounded to ``exact_dtype`` (bfloat16) and then held in the model's fp32 parameters, so the
    weights file can be stored in bfloat16 and upcast to fp32 *exactly* (half the bytes, no loss).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        shape = p.shape
        if name.endswith("modulation"):
            val = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])
        elif p.ndim >= 2:
            fan_in = int(math.prod(shape[1:]))
            val = torch.randn(shape, generator=g, dtype=torch.float64) * (gain / math.sqrt(fan_in))
        elif name.endswith("weight"):
            val = 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            val = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        if exact_dtype is not None:
            val = val.to(exact_dtype)
        with torch.no_grad():
            p.copy_(val.to(p.dtype))


def state_dict_exact(model: torch.nn.Module, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """state_dict in ``dtype``; raises unless every value round-trips to the fp32 parameter exactly."""
    out = {}
    for k, v in model.state_dict().items():
        w = v.detach().to(dtype).contiguous().clone()
        if not torch.equal(w.to(v.dtype), v):
            raise RuntimeError(f"{k} is not exactly representable in {dtype}")
        out[k] = w
    return out


def runs(values: list) -> list[list]:
    """Run-length encoding: [5,5,5,7] -> [[5,3],[7,1]]."""
    out: list[list] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def dump_json_lines(obj: dict, path: str) -> None:
    """A dict of lists written one list element per line (compact, still diff- and grep-able)."""
    with open(path, "w") as fh:
        fh.write("{\n")
        keys = list(obj)
        for n, k in enumerate(keys):
            v = obj[k]
            if isinstance(v, list):
                fh.write(f" {json.dumps(k)}: [\n")
                for i, item in enumerate(v):
                    fh.write("  " + json.dumps(item, separators=(",", ":")) + ("," if i < len(v) - 1 else "") + "\n")
                fh.write(" ]")
            else:
                fh.write(f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}")
            fh.write(",\n" if n < len(keys) - 1 else "\n")
        fh.write("}\n")


# ---------------------------------------------------------------------------------------------
# random draws


class DrawRecorder:
    """Record (or replay) every draw of the wrapped torch RNG functions, in call order.

    ``label_fn()`` gives the label of a draw (the driver sets it from the current pipeline call).
    Draws made while ``paused`` is true are not touched (e.g. a driver's own seeded draws).
    """

    FUNCS = ("randn", "randn_like", "rand", "rand_like", "randint", "randint_like", "randperm",
             "multinomial", "normal", "bernoulli")

    def __init__(self, label_fn: Callable[[], dict], replay: list[torch.Tensor] | None = None):
        self.label_fn = label_fn
        self.draws: list[torch.Tensor] = []
        self.meta: list[dict] = []
        self.replay = replay
        self._orig: dict[str, Callable] = {}

    def _wrap(self, fname: str, orig: Callable):
        def wrapped(*args, **kwargs):
            if kwargs.get("generator") is not None:  # a seeded generator owned by someone: not global RNG
                return orig(*args, **kwargs)
            idx = len(self.draws)
            if self.replay is not None:
                out = orig(*args, **kwargs)  # keep the global RNG stream identical
                rec = self.replay[idx]
                if rec.shape != out.shape:
                    raise RuntimeError(f"replayed draw {idx} shape {tuple(rec.shape)} != {tuple(out.shape)}")
                out = rec.to(dtype=out.dtype, device=out.device).clone()
            else:
                out = orig(*args, **kwargs)
            info = dict(self.label_fn())
            info.update(index=idx, func=f"torch.{fname}", shape=list(out.shape), dtype=str(out.dtype).replace("torch.", ""))
            self.draws.append(out.detach().clone())
            self.meta.append(info)
            return out
        return wrapped

    def __enter__(self):
        for f in self.FUNCS:
            if hasattr(torch, f):
                self._orig[f] = getattr(torch, f)
                setattr(torch, f, self._wrap(f, self._orig[f]))
        return self

    def __exit__(self, *exc):
        for f, orig in self._orig.items():
            setattr(torch, f, orig)
        self._orig.clear()
        return False


# ---------------------------------------------------------------------------------------------
# misc


def git_head(checkout: str) -> str | None:
    """Commit recorded by the driver: ``<checkout>/.golden_commit`` if present (git archive has no .git)."""
    p = os.path.join(checkout, ".golden_commit")
    if os.path.exists(p):
        return open(p).read().strip()
    head = os.path.join(checkout, ".git", "HEAD")
    if os.path.exists(head):
        import subprocess
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or None
    return None


def file_sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tensor_summary(t: torch.Tensor) -> dict:
    t = t.detach().to(torch.float64)
    return dict(shape=list(t.shape), finite=bool(torch.isfinite(t).all()), mean=float(t.mean()),
                std=float(t.std()), absmax=float(t.abs().max()))


def dump_json(obj: Any, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)
        fh.write("\n")


def compact_ranges(idx: list[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,3],[5,7]] (half-open runs) - keep-index lists stay readable and small."""
    out: list[list[int]] = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@contextlib.contextmanager
def cuda_device_query_at_import():
    """Some reference modules evaluate ``torch.cuda.current_device()`` at import time (default arguments,
    module constants). While importing, answer 0 - the value is only a default that our path never uses."""
    orig = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = orig


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any, log: list | None = None, why: str = ""):
    old = getattr(obj, name)
    setattr(obj, name, value)
    if log is not None:
        log.append(dict(target=f"{getattr(obj, '__name__', type(obj).__name__)}.{name}", why=why))
    try:
        yield old
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------
# shared driver pieces


class CallTracer:
    """Forward pre-hook on the reference's generator wrapper: names every model call of the AR loop.

    Calls of one chunk are named ``names[k]`` in order (D1..D4 then CTX for a 4-step Self-Forcing loop);
    the chunk index is ``current_start // (frames_per_chunk * frame_tokens)``.
    """

    def __init__(self, frame_tokens: int, frames_per_chunk: int = 3,
                 names: tuple[str, ...] = ("D1", "D2", "D3", "D4", "CTX")):
        self.F = frame_tokens
        self.fpc = frames_per_chunk
        self.names = names
        self.call: dict | None = None
        self.calls: list[dict] = []
        self._chunk = -1
        self._k = 0

        self.in_call = False

    def attach(self, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self._hook, with_kwargs=True)
        module.register_forward_hook(self._done)

    def _done(self, mod, args, out):
        self.in_call = False

    def _hook(self, mod, args, kwargs):
        cs = kwargs["current_start"]
        chunk = cs // (self.fpc * self.F)
        if chunk != self._chunk:
            self._chunk, self._k = chunk, 0
        t = kwargs["timestep"]
        name = self.names[self._k] if self._k < len(self.names) else f"call{self._k}"
        self.call = dict(chunk=chunk, start_frame=cs // self.F, call=name, timestep=float(t.flatten()[0]),
                         timestep_dtype=str(t.dtype).replace("torch.", ""))
        self.calls.append(dict(self.call))
        self._k += 1
        self.in_call = True

    def draw_label(self) -> dict:
        c = self.call
        if c is None:
            return dict(label="initial", chunk=None, after_call=None)
        if self.in_call:   # drawn inside a model call (e.g. Dummy Forcing's sampled query rows)
            return dict(label=f"chunk{c['chunk']}/during_{c['call']}", chunk=c["chunk"], during_call=c["call"])
        return dict(label=f"chunk{c['chunk']}/after_{c['call']}", chunk=c["chunk"], after_call=c["call"])

    def call_label(self) -> dict:
        c = self.call
        return dict(label=f"chunk{c['chunk']}/{c['call']}", chunk=c["chunk"], call=c["call"],
                    start_frame=c["start_frame"])


class FakeTextEncoder(torch.nn.Module):
    """Text encoder bypass: returns the fixed conditioning tensor as ``prompt_embeds``."""

    def __init__(self, cond: torch.Tensor):
        super().__init__()
        self.cond = cond

    def forward(self, text_prompts=None, **kw):
        return {"prompt_embeds": self.cond}


class FakeVAE(torch.nn.Module):
    """VAE bypass: decoding returns a dummy (the latents are the recorded output)."""

    def decode_to_pixel(self, latent, use_cache=False):
        return torch.zeros(1)


def rope_apply_fp32_interleaved(x, grid_size, freqs, start_frame=0):
    """CPU equivalent of Forcing-KV's Triton ``rope_apply_triton`` (wan/modules/rope_triton.py:8-112).

    Same arithmetic as the kernel: freqs cast to complex64, x read as interleaved (real, imag) fp32 pairs,
    out_r = xr*fr - xi*fi, out_i = xr*fi + xi*fr in fp32, frame index = start_frame + token // (h*w),
    row = (token % (h*w)) // w, column = token % w, grid (h, w) from ``grid_size[0]``. (A GPU may contract
    the products into FMAs; that is a last-ulp difference.)
    """
    B, L, H, C = x.shape
    if freqs.dtype != torch.complex64:
        freqs = freqs.to(torch.complex64)
    c_half = C // 2
    c0 = c_half - 2 * (c_half // 3)
    c1 = c_half // 3
    f0, f1, f2 = freqs.split([c0, c1, c1], dim=1)
    h, w = int(grid_size[0][1]), int(grid_size[0][2])
    tok = torch.arange(L)
    frame = start_frame + tok // (h * w)
    hw = tok % (h * w)
    fr = torch.cat([f0[frame], f1[hw // w], f2[hw % w]], dim=1)          # [L, c_half] complex64
    fre = torch.view_as_real(fr)                                          # [L, c_half, 2] float32
    xr = x.reshape(B, L, H, c_half, 2)
    a, b = xr[..., 0], xr[..., 1]
    cr = fre[:, None, :, 0][None]
    ci = fre[:, None, :, 1][None]
    out_r = a * cr - b * ci
    out_i = a * ci + b * cr
    return torch.stack([out_r, out_i], dim=-1).reshape(B, L, H, C).to(x.dtype)


class _Unlaunchable:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"golden driver: Triton kernel {getattr(self.fn, '__name__', self.fn)} launched; "
                           "it must be replaced by a CPU equivalent")


def install_triton_stub() -> bool:
    """Make ``import triton`` / ``triton.language`` succeed where Triton is absent: ``@triton.jit`` returns an object
    that raises when launched, so a kernel that is not replaced by the driver can never run silently."""
    try:
        if importlib.util.find_spec("triton") is not None:
            return False
    except (ImportError, ValueError):
        pass

    def jit(fn=None, **kw):
        if fn is None:
            return lambda f: _Unlaunchable(f)
        return _Unlaunchable(fn)

    tri = stub_module("triton", jit=jit, autotune=lambda *a, **k: (lambda f: f), Config=_Placeholder("triton.Config"))
    tri.__path__ = []
    lang = stub_module("triton.language")
    tri.language = lang
    return True


def identify_rows(rows: torch.Tensor, bank: dict[int, torch.Tensor]) -> list[int | None]:
    """For each row of ``rows`` [N, ...], the id in ``bank`` {id: row} whose tensor is bitwise equal (None if none)."""
    ids = list(bank)
    if not ids:
        return [None] * rows.shape[0]
    stack = torch.stack([bank[i] for i in ids]).flatten(1)
    flat = rows.flatten(1)
    out: list[int | None] = []
    for r in flat:
        hit = (stack == r).all(dim=1).nonzero()
        out.append(ids[int(hit[0])] if hit.numel() else None)
    return out


DRAW_TENSOR_NAMES = {"torch.randn_like": "renoise", "torch.randint": "sampled_rows", "torch.randn": "randn"}


def pack_draws(rec: DrawRecorder) -> dict[str, torch.Tensor]:
    """Stack the recorded draws per kind (``renoise``, ``sampled_rows``, ...) and note in each ``rec.meta`` entry
    which tensor and row holds it (``tensor``, ``row``). Draws of one kind must share a shape."""
    groups: dict[str, list[torch.Tensor]] = {}
    for m, d in zip(rec.meta, rec.draws):
        name = DRAW_TENSOR_NAMES.get(m["func"], m["func"].replace("torch.", ""))
        groups.setdefault(name, []).append(d)
        m["tensor"], m["row"] = name, len(groups[name]) - 1
    return {k: torch.stack(v).contiguous() for k, v in groups.items()}


def unpack_draws(tensors: dict[str, torch.Tensor], draw_order: list[dict]) -> list[torch.Tensor]:
    """Inverse of ``pack_draws``: the draws in call order, for ``DrawRecorder(replay=...)``."""
    return [tensors[m["tensor"]][m["row"]] for m in draw_order]


class Rescaled1560(torch.Tensor):
    """A cache tensor whose slice bounds that are non-zero multiples of 1560 (tokens per frame at 480x832) are
    rescaled to multiples of ``frame_tokens``. Only for reference code that hard-codes token offsets inside a nested
    function the driver cannot replace (Infinity-RoPE's ``kv_flush``). Every other bound (the tiny model's own
    offsets, all < 1560) passes unchanged; operations return plain tensors. Each rescaling is logged."""

    frame_tokens = 1560
    log: list = []

    @classmethod
    def _map(cls, idx):
        def m(v):
            if isinstance(v, int) and v != 0 and v % 1560 == 0:
                nv = (v // 1560) * cls.frame_tokens
                cls.log.append((v, nv))
                return nv
            return v

        def ms(s):
            return slice(m(s.start), m(s.stop), s.step) if isinstance(s, slice) else s
        return tuple(ms(s) for s in idx) if isinstance(idx, tuple) else ms(idx)

    def __getitem__(self, idx):
        return super().__getitem__(self._map(idx))

    def __setitem__(self, idx, value):
        return super().__setitem__(self._map(idx), value)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
