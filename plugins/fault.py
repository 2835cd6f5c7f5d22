"""``fault``: an evaluation policy that corrupts chosen spatial tokens of one chunk (fault injection).

Not a cache policy for production: it makes a controlled, known corruption so that a pruning policy
(``tokentrim``) can be checked against it (precision/recall of what it prunes, how far the corruption
propagates against a clean run with the same seed; see ``benchmarks/fault_study.py``).

Semantics, at chunk ``chunk=K`` only:

* Positions (spatial token indices ``row * token_cols + col`` on the cache's token grid, the same in every
  frame of the chunk): either a rectangle ``rows=a-b,cols=c-d`` (inclusive ranges; ``a`` alone is one row or
  column; ``all``, the default, is the whole axis), or ``fraction=f``: ``max(1, round(f * N))`` positions
  drawn without replacement by a CPU generator seeded with ``seed``. Not both; with neither, every position.
* ``target=kv``: right after chunk K is committed and the keep set applied (``after_compaction``), the cached
  keys and values of chunk K's resident tokens at those positions are corrupted, in every frame of the chunk,
  every layer and every head that holds them (under classifier-free guidance, in both branches). Nothing else in
  the cache is touched. The chunk's latent is clean.
* ``target=latent``: the chunk's clean latent is corrupted before the context pass (``before_commit``) on the
  latent pixels of those tokens' patches (all channels, all frames of the chunk); the committed K/V are
  then computed from the corrupted latent, and the corrupted latent is what the rollout returns.
* ``mode=noise``: add ``scale * eps`` with ``eps ~ N(0, 1)`` drawn from a CPU generator seeded by
  (``seed``, the sample's rollout seed, target), so a batched run equals each sample run alone.
  ``mode=constant``: set the values to ``scale``. ``mode=swap``: exchange the tokens among the chosen positions
  (a seeded cyclic permutation: no position keeps its own value; needs at least two positions; ``scale`` is
  not used). Values are in the units of what is corrupted: latent units, or the cached keys (after q/k
  RMS norm and RoPE) and values.

Trace field per chunk: ``faulted_positions``, one sorted list of spatial indices per sample (empty except at
chunk K; for ``target=kv`` only positions with a resident token of chunk K).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

from cachepolicy.errors import ParameterError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, finite_float, non_negative_int

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from cachepolicy.chunk import Candidate
    from cachepolicy.engine import Session
    from cachepolicy.models import ModelInfo

logger = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_range(text: str, what: str) -> tuple[int, int] | None:
    """``"a-b"`` -> ``(a, b)`` inclusive, ``"a"`` -> ``(a, a)``, ``"all"`` -> None (the whole axis)."""
    if text == "all":
        return None
    match = _RANGE_RE.match(text)
    if match is None:
        raise ParameterError(f"fault: {what}={text!r} is not allowed; write an inclusive range a-b, one index a, or all")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
        raise ParameterError(f"fault: {what}={text!r} is empty; write a-b with a <= b")
    return low, high


def stable_seed(*parts: Any) -> int:
    """A 63-bit generator seed from any printable parts (blake2b), stable across machines and runs."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def swap_sources(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """For ``positions`` ``[k]`` (k >= 2), the position whose value each one receives under ``mode=swap``.

    A seeded permutation ``perm`` of the positions is shifted cyclically by one: ``perm[i]`` receives the
    value of ``perm[i + 1]`` (mod k), so no position keeps its own value. Returns ``[k]`` aligned with
    ``positions``.
    """
    import torch

    k = positions.shape[0]
    order = torch.randperm(k, generator=torch.Generator("cpu").manual_seed(stable_seed(seed, "swap")))
    sources = torch.empty_like(positions)
    sources[order] = positions[order.roll(-1)]
    return sources


def corrupt(values: torch.Tensor, mode: str, scale: float, generator: torch.Generator,
            sources: torch.Tensor | None = None) -> torch.Tensor:
    """Corrupt ``values`` ``[k, ...]`` (one entry per chosen token) and return the new tensor.

    ``noise``: ``values + scale * eps`` (eps from ``generator``, float32 on the CPU, then cast); ``constant``:
    ``scale`` everywhere; ``swap``: ``values[sources]`` (``sources`` ``[k]`` indexes into ``values``).
    """
    import torch

    if mode == "noise":
        eps = torch.randn(values.shape, generator=generator, dtype=torch.float32)
        return (values.float() + scale * eps.to(values.device)).to(values.dtype)
    if mode == "constant":
        return torch.full_like(values, scale)
    if mode == "swap":
        if sources is None:
            raise ParameterError("fault: mode=swap needs the source index of every chosen token")
        return values[sources.to(values.device)].clone()
    raise ParameterError(f"fault: mode={mode!r} is not allowed; choose one of noise, constant, swap")


def latent_patches(latent: torch.Tensor, model: ModelInfo) -> torch.Tensor:
    """``[B, C, F, H, W]`` latent -> a copy as ``[B, N, C, F, p_h, p_w]`` patches, token-major in the cache's
    row-major spatial order (``N = token_rows * token_cols``)."""
    rows, cols = model.token_rows, model.token_cols
    p_h, p_w = model.latent_height // rows, model.latent_width // cols
    batch, channels, frames = latent.shape[:3]
    return (latent.reshape(batch, channels, frames, rows, p_h, cols, p_w)
            .permute(0, 3, 5, 1, 2, 4, 6).reshape(batch, rows * cols, channels, frames, p_h, p_w).clone())


def patches_latent(patches: torch.Tensor, model: ModelInfo) -> torch.Tensor:
    """The inverse of :func:`latent_patches`: ``[B, N, C, F, p_h, p_w]`` -> ``[B, C, F, H, W]``."""
    batch, _, channels, frames, p_h, p_w = patches.shape
    rows, cols = model.token_rows, model.token_cols
    return (patches.reshape(batch, rows, cols, channels, frames, p_h, p_w)
            .permute(0, 3, 4, 1, 5, 2, 6).reshape(batch, channels, frames, rows * p_h, cols * p_w))


@attrs.frozen
class Fault(Policy):
    """Corrupt chosen spatial tokens of chunk ``chunk``, in the cached K/V or in the committed latent.

    Attributes:
        chunk: the chunk to corrupt (0-based; required).
        rows, cols: inclusive token-row / token-column ranges ``a-b`` of a rectangle (``all``: the whole axis).
        fraction: fraction of spatial tokens chosen at random instead of a rectangle, in [0, 1] (0: unused).
        seed: seed of the random positions and of the noise.
        mode: ``noise`` (add ``scale`` x standard normal), ``constant`` (set to ``scale``) or ``swap``.
        scale: noise standard deviation or constant value (units of what is corrupted).
        target: ``kv`` (cached keys/values of chunk K) or ``latent`` (chunk K's latent before the context pass).
    """

    name: ClassVar[str] = "fault"
    summary: ClassVar[str] = "evaluation: corrupt chosen tokens of one chunk (K/V or latent)"

    chunk: int = attrs.field(validator=non_negative_int)
    rows: str = attrs.field(default="all")
    cols: str = attrs.field(default="all")
    fraction: float = attrs.field(default=0.0, validator=finite_float(0.0, 1.0))
    seed: int = attrs.field(default=0, validator=non_negative_int)
    mode: Literal["noise", "constant", "swap"] = attrs.field(default="noise")
    scale: float = attrs.field(default=1.0, validator=finite_float())
    target: Literal["kv", "latent"] = attrs.field(default="kv")

    def __attrs_post_init__(self) -> None:
        parse_range(self.rows, "rows")
        parse_range(self.cols, "cols")
        region = self.rows != "all" or self.cols != "all"
        if region and self.fraction > 0:
            raise ParameterError(
                f"fault: give either rows/cols (a rectangle) or fraction (random positions), not both "
                f"(got rows={self.rows!r}, cols={self.cols!r}, fraction={self.fraction})"
            )
        if self.mode not in ("noise", "constant", "swap"):
            raise ParameterError(f"fault: mode={self.mode!r} is not allowed; choose one of noise, constant, swap")
        if self.target not in ("kv", "latent"):
            raise ParameterError(f"fault: target={self.target!r} is not allowed; choose one of kv, latent")

    # ----------------------------------------------------------------------------------- positions
    def positions(self, model: ModelInfo) -> torch.Tensor:
        """Sorted int64 spatial indices ``[k]`` of the chosen positions on ``model``'s token grid."""
        import torch

        rows, cols = model.token_rows, model.token_cols
        num_tokens = rows * cols
        if self.fraction > 0:
            count = max(1, round(self.fraction * num_tokens))
            generator = torch.Generator("cpu").manual_seed(stable_seed(self.seed, "positions"))
            return torch.randperm(num_tokens, generator=generator)[:count].sort().values
        spans = []
        for text, what, size in ((self.rows, "rows", rows), (self.cols, "cols", cols)):
            span = parse_range(text, what) or (0, size - 1)
            if span[1] >= size:
                raise ParameterError(
                    f"fault: {what}={text!r} is outside the token grid of model {model.name!r}: "
                    f"{what} run from 0 to {size - 1} ({rows}x{cols} tokens per frame)"
                )
            spans.append(torch.arange(span[0], span[1] + 1))
        r, c = torch.meshgrid(spans[0], spans[1], indexing="ij")
        return (r * cols + c).reshape(-1).sort().values

    def check_compatible(self, model: ModelInfo) -> None:
        positions = self.positions(model)
        if self.mode == "swap" and positions.numel() < 2:
            raise ParameterError(
                f"fault: mode=swap exchanges tokens among the chosen positions and needs at least two; "
                f"{self.spec} chooses {positions.numel()}"
            )

    def new_state(self) -> dict[str, Any]:
        return {"positions": None, "faulted": None}

    def _generator(self, session: Session, sample: int) -> torch.Generator:
        import torch

        return torch.Generator("cpu").manual_seed(stable_seed(self.seed, session.config.seeds[sample], self.target))

    # --------------------------------------------------------------------------------------- hooks
    @hookimpl
    def cachepolicy_session_start(self, session: Session) -> None:
        if self.chunk >= session.config.num_chunks:
            raise ParameterError(
                f"fault: chunk={self.chunk} is never generated; the rollout has {session.config.num_chunks} "
                f"chunks (0..{session.config.num_chunks - 1})"
            )
        state = self.state(session)
        state["positions"] = self.positions(session.model)
        state["faulted"] = [[] for _ in range(session.batch_size)]

    @hookimpl
    def cachepolicy_before_commit(self, session: Session, candidate: Candidate) -> torch.Tensor | None:
        """``target=latent``: return chunk K's latent ``[B, C, F, H, W]`` with the chosen patches corrupted."""
        import torch

        if self.target != "latent" or candidate.chunk != self.chunk:
            return None
        state = self.state(session)
        positions: torch.Tensor = state["positions"]
        latent = candidate.x0
        tokens = latent_patches(latent, session.model)
        device_positions = positions.to(latent.device)
        sources = None
        if self.mode == "swap":
            lookup = {int(p): i for i, p in enumerate(positions.tolist())}
            sources = torch.tensor([lookup[int(s)] for s in swap_sources(positions, self.seed).tolist()])
        for b in range(latent.shape[0]):
            values = tokens[b, device_positions]
            tokens[b, device_positions] = corrupt(values, self.mode, self.scale, self._generator(session, b), sources)
            state["faulted"][b] = positions.tolist()
        out = patches_latent(tokens, session.model)
        logger.info("fault: corrupted the latent of chunk %d at %d positions (%s, scale %g)", self.chunk,
                    positions.numel(), self.mode, self.scale)
        return out

    @hookimpl
    def cachepolicy_after_compaction(self, session: Session, chunk: int) -> None:
        """``target=kv``: corrupt chunk K's resident keys/values at the chosen positions, in every layer."""
        import torch

        if self.target != "kv" or chunk != self.chunk:
            return
        state = self.state(session)
        cache = session.cache
        positions: torch.Tensor = state["positions"]
        view = cache.view()
        num_tokens = session.model.tokens_per_frame
        chosen = torch.zeros(num_tokens, dtype=torch.bool)
        chosen[positions] = True
        chosen = chosen.to(view.valid.device)
        hit = view.valid & (view.chunk == chunk) & chosen[view.spatial_index]
        source_of = dict(zip(positions.tolist(), swap_sources(positions, self.seed).tolist())) \
            if self.mode == "swap" else {}
        for b in range(cache.batch_size):
            index = hit[b].nonzero().squeeze(1)  # table positions, frame/row/col order
            if index.numel() == 0:
                continue
            spatial = view.spatial_index[b, index].tolist()
            frames = view.frame[b, index].tolist()
            sources = None
            if self.mode == "swap":  # same frame, source position; a token whose source is gone keeps its value
                where = {(f, s): i for i, (f, s) in enumerate(zip(frames, spatial))}
                sources = torch.tensor([where.get((f, source_of[s]), i)
                                        for i, (f, s) in enumerate(zip(frames, spatial))])
            for branch in range(cache.branches):  # the same draws for each branch (a fresh generator each)
                generator = self._generator(session, b)
                for name in ("k", "v"):
                    values, held = _gather(cache, branch, b, index, name)  # [n, layers, H, D], [n, layers, H]
                    new = corrupt(values, self.mode, self.scale, generator, sources)
                    _scatter(cache, branch, b, index, name, torch.where(held[..., None], new, values))
            state["faulted"][b] = sorted(set(spatial))
        logger.info("fault: corrupted the cached K/V of chunk %d at positions %s (%s, scale %g)", chunk,
                    state["faulted"], self.mode, self.scale)

    @hookimpl
    def cachepolicy_chunk_end(self, session: Session, chunk: int) -> dict[str, Any]:
        state = self.state(session)
        if chunk == self.chunk:
            return {"faulted_positions": [list(p) for p in state["faulted"]]}
        return {"faulted_positions": [[] for _ in range(session.batch_size)]}


def _slots(cell: Any, sample: int, positions: torch.Tensor) -> torch.Tensor:
    """Slot of each table position ``[n]`` in ``cell`` for ``sample`` (-1 where the cell does not hold it)."""
    import torch

    length = cell.residency.lengths[sample]
    slots = cell.residency.slots[sample, :length]
    where = torch.full((int(positions.max()) + 1,), -1, dtype=torch.long, device=slots.device)
    inside = slots <= int(positions.max())
    where[slots[inside]] = torch.arange(length, device=slots.device)[inside]
    return where[positions]


def _gather(cache: Any, branch: int, sample: int, positions: torch.Tensor,
            name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values ``[n, layers, H, D]`` of table ``positions`` of ``sample`` in ``branch``, and where a cell
    holds them (bool ``[n, layers, H]``; zeros elsewhere)."""
    import torch

    n = positions.shape[0]
    values = torch.zeros(n, cache.num_layers, cache.num_heads, cache.head_dim, dtype=cache.dtype, device=cache.device)
    held = torch.zeros(n, cache.num_layers, cache.num_heads, dtype=torch.bool, device=cache.device)
    for cell in cache.cells:
        if cell.branch != branch:
            continue
        slots = _slots(cell, sample, positions)
        inside = slots >= 0
        tensor = getattr(cell, name)
        for i, head in enumerate(cell.heads):
            values[inside, cell.layer, head] = tensor[sample, slots[inside], i]
            held[inside, cell.layer, head] = True
    return values, held


def _scatter(cache: Any, branch: int, sample: int, positions: torch.Tensor, name: str, values: torch.Tensor) -> None:
    """Write ``values`` ``[n, layers, H, D]`` back where the cells of ``branch`` hold the positions."""
    for cell in cache.cells:
        if cell.branch != branch:
            continue
        slots = _slots(cell, sample, positions)
        inside = slots >= 0
        tensor = getattr(cell, name)
        for i, head in enumerate(cell.heads):
            tensor[sample, slots[inside], i] = values[inside, cell.layer, head].to(tensor.dtype)


@hookimpl
def cachepolicy_policies() -> list[type[Policy]]:
    return [Fault]
