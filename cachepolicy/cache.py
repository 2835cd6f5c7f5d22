"""KV-cache storage: one token table, and K/V cells per (guidance branch, layer, head group), on the model's device.

Layout::

    table (one per cache: shared by every layer, head and branch)
        frame, chunk, row, col, rope_pos   [B, capacity]  int64   per-token metadata
        pinned                             [B, capacity]  bool    protected at some selection (sticky)
        columns[name]                      [B, capacity, *shape]  policy-owned per-token values
        lengths[b]                         tokens of sample b that some cell holds, in frame order

    cells: one per (branch, layer, head group)
        k, v       [B, capacity_c, H_c, D]  model dtype   the group's keys and values
        heads      which of the layer's heads the group holds (all of them unless a policy split the layer)
        residency  shared by the cells that hold the same tokens:
                   lengths[b] and slots [B, capacity_c] int64, the table position of each stored token

A cell stores its resident tokens at ``[0, lengths[b])`` in table (frame) order; the chunk being
generated writes its keys/values *provisionally* after them, and they become resident only through
:meth:`KVCache.commit`. Until a policy selects per layer or per head, every cell shares one residency
that equals the table (the fast path: one keep set for all, one attention call per layer). A selection
per layer gives each layer its own residency; one per head splits a layer into head groups, each attended
by its own attention call over only the tokens it holds. Tokens that no cell holds leave the table.

Guidance: classifier-free guidance keeps a second set of cells (branch 1, the unconditional forward) with
the same residencies: every commit and edit applies to both, so they always hold the same tokens.

RoPE modes (``rope_mode``): ``"absolute"`` (default) stores keys after RoPE at their ``rope_pos``;
``"raw"`` stores keys before RoPE and rotates every key it attends to on read, resident tokens to their
``rope_pos`` unless the forward overrides their positions. Both modes give the same result when nothing
is overridden. The adapter supplies the rotation (:class:`Rotary`).

Memory: buffers are allocated with uninitialised memory, grow geometrically when a write does not fit
and are otherwise reused; compaction moves tokens inside the same storage, so under a window the memory
stays flat after warm-up. :meth:`KVCache.reserve` sizes the buffers up front.

The per-layer path is one call, :meth:`KVCache.attend`: rotate the call's queries and keys, run any
in-layer hooks (:mod:`cachepolicy.layers`), write the call's keys and values, attend per head group.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs
import torch

from cachepolicy.errors import CacheShapeError, CompositionError, ParameterError
from cachepolicy.layers import CellView, ForwardCall, LayerContext, LayerEdit, Merge, describe

METADATA_FIELDS = ("frame", "chunk", "row", "col", "rope_pos")
_SERIALS = itertools.count()
ROPE_MODES = ("absolute", "raw")


class Rotary(Protocol):
    """A model's rotary position embedding as the cache uses it (the adapter provides it).

    Positions are latent frames (temporal axis) and token rows / columns (spatial axes).
    """

    def tables(self, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables ``[B, L, 1, D]`` for tokens at (frame position, row, column), each ``[B, L]``."""

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, H, D]`` rotated by tables ``[B or 1, L, 1, D]``."""

    def shift_frames(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, H, D]`` (keys after RoPE) re-rotated by ``delta`` ``[B, L]`` frames along the temporal
        axis only, as if RoPE had been applied at their frame position plus ``delta``."""


@attrs.frozen(eq=False)
class CacheView:
    """Read-only view of the table of resident tokens (tensors are ``[B, S]`` views).

    ``S`` is the largest table length in the batch; ``valid[b, s]`` is False past sample ``b``'s length.
    ``columns`` holds the policy-owned columns (``[B, S, *shape]``). Do not modify these tensors.
    """

    frame: torch.Tensor
    chunk: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rope_pos: torch.Tensor
    pinned: torch.Tensor
    valid: torch.Tensor
    token_cols: int
    columns: dict[str, torch.Tensor] = attrs.field(factory=dict)

    @property
    def spatial_index(self) -> torch.Tensor:
        """``[B, S]`` row-major spatial index ``row * token_cols + col`` of each token."""
        return self.row * self.token_cols + self.col

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def size(self) -> int:
        return self.valid.shape[1]


class Residency:
    """The tokens a set of cells holds: ``lengths[b]`` and ``slots`` ``[B, capacity]`` (table positions, in
    increasing order; entries past ``lengths[b]`` are uninitialised)."""

    def __init__(self, batch_size: int, capacity: int, device: torch.device) -> None:
        self.lengths: list[int] = [0] * batch_size
        self.slots = torch.empty(batch_size, capacity, dtype=torch.long, device=device)
        #: bumped on every change, so per-forward plans built from it are rebuilt
        self.version = 0
        #: positions ``[0, zeroed)`` of its cells' buffers hold finite values in every sample (buffers are
        #: allocated uninitialised and zeroed just before a read first reaches a position: a padded batch
        #: reads positions a sample never wrote, masked out, where ``0 * NaN`` would still poison attention)
        self.zeroed = 0

    @property
    def capacity(self) -> int:
        return self.slots.shape[1]

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        return min(self.lengths) == max(self.lengths)

    def valid(self, size: int | None = None) -> torch.Tensor:
        """bool ``[B, size]`` (default ``max_length``): positions holding a token."""
        size = self.max_length if size is None else size
        lengths = torch.tensor(self.lengths, device=self.slots.device).unsqueeze(1)
        return torch.arange(size, device=self.slots.device).unsqueeze(0) < lengths


class Cell:
    """The keys and values of one (branch, layer, head group): ``k``, ``v`` ``[B, capacity, H_c, D]``."""

    def __init__(self, branch: int, layer: int, heads: tuple[int, ...], num_heads: int, k: torch.Tensor,
                 v: torch.Tensor, residency: Residency) -> None:
        self.branch = branch
        self.layer = layer
        self.heads = heads
        self.all_heads = heads == tuple(range(num_heads))
        self.head_index = torch.tensor(heads, dtype=torch.long, device=k.device)
        self.k = k
        self.v = v
        self.residency = residency

    @property
    def lengths(self) -> list[int]:
        return self.residency.lengths

    def __repr__(self) -> str:
        return f"Cell(branch={self.branch}, layer={self.layer}, heads={list(self.heads)}, lengths={self.lengths})"


@attrs.define(eq=False)
class _Plan:
    """What every cell of one residency needs during one forward (built once per forward and version)."""

    version: int
    end: int
    index: Any
    mask: torch.Tensor | None
    key_tables: tuple[torch.Tensor, torch.Tensor] | None


@attrs.define(eq=False)
class ForwardContext:
    """The state of one adapter forward that the per-layer path needs (see :meth:`KVCache.forward`).

    Attributes:
        call: the forward.
        rotary: the model's rotary embedding.
        own_tables: cos/sin ``[1, n, 1, D]`` at the call's own positions.
        own_positions: ``rope_pos``, ``row``, ``col`` ``[B, n]`` of the call's own tokens (needed by a ``raw``
            cache only; None otherwise).
        own_mask: bool ``[1, 1, n, n]`` structure inside the call (None: it attends to itself fully).
        observer: in-layer hooks of the policies that requested this forward, or None.
    """

    call: ForwardCall
    rotary: Rotary
    own_tables: tuple[torch.Tensor, torch.Tensor]
    own_positions: dict[str, torch.Tensor] | None
    own_mask: torch.Tensor | None = None
    observer: Callable[[LayerContext], list[tuple[str, LayerEdit]]] | None = None
    wants_layer: Callable[[int], bool] | None = None
    plans: dict[int, _Plan] = attrs.field(factory=dict)
    edited: bool = False

    @property
    def num_tokens(self) -> int:
        return self.own_tables[0].shape[1]


class KVCache:
    """Token table plus K/V cells for ``batch_size`` samples (see the module docstring). The one mutable cache
    object of a rollout."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        token_cols: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 0,
        rope_mode: str = "absolute",
        branches: int = 1,
    ) -> None:
        if rope_mode not in ROPE_MODES:
            raise CacheShapeError(f"KVCache rope_mode must be one of {', '.join(ROPE_MODES)}, got {rope_mode!r}")
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("token_cols", token_cols)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CacheShapeError(f"KVCache {name} must be a positive integer, got {value!r}")
        if branches not in (1, 2):
            raise CacheShapeError(f"KVCache branches must be 1 or 2 (classifier-free guidance), got {branches!r}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.token_cols = token_cols
        self.device = torch.device(device)
        self.dtype = dtype
        self.rope_mode = rope_mode
        self.branches = branches
        #: the adapter's rotary embedding (set by :meth:`ModelAdapter.new_cache`; needed by :meth:`shift_frames`)
        self.rotary: Rotary | None = None
        #: buffer reallocations so far (growth beyond the reserved capacity, and head-group splits)
        self.reallocations = 0
        #: bumped by :meth:`flush` and :meth:`clear`: what a model caches about the context (cross-attention
        #: keys and values) is stale once it changes; ``serial`` tells caches apart for the same purpose
        self.epoch = 0
        self.serial = next(_SERIALS)
        #: tokens one forward writes at most (its provisional slot), for sizing buffers
        self.call_tokens = 0
        #: tokens a cell holds at most during a forward (what the policies allow plus one call), when known:
        #: a buffer that must grow grows to it, not past it (see :meth:`reserve`)
        self.bound: int | None = None
        capacity = max(int(capacity), 0)
        self.lengths: list[int] = [0] * batch_size
        self.meta = {name: torch.empty(batch_size, capacity, dtype=torch.long, device=self.device)
                     for name in METADATA_FIELDS}
        self.pinned = torch.zeros(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.columns: dict[str, torch.Tensor] = {}
        self._column_fill: dict[str, Any] = {}
        residency = Residency(batch_size, capacity, self.device)
        everything = tuple(range(num_heads))
        self._cells: dict[tuple[int, int], list[Cell]] = {
            (branch, layer): [Cell(branch, layer, everything, num_heads, *self._kv(capacity, num_heads), residency)]
            for branch in range(branches) for layer in range(num_layers)
        }
        self._forward: ForwardContext | None = None
        #: in-layer hooks for the forwards of the current block (see :meth:`observing`)
        self._observer: tuple[Callable, Callable[[int], bool]] | None = None

    # ---------------------------------------------------------------------------------------- storage
    def _kv(self, capacity: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch_size, capacity, heads, self.head_dim)
        return (torch.empty(shape, device=self.device, dtype=self.dtype),
                torch.empty(shape, device=self.device, dtype=self.dtype))

    @property
    def cells(self) -> list[Cell]:
        """Every cell, ordered by branch, layer, first head."""
        return [cell for key in sorted(self._cells) for cell in self._cells[key]]

    def layer_cells(self, layer: int, branch: int = 0) -> list[Cell]:
        """The head groups of ``layer`` in ``branch`` (one holding every head unless a policy split it)."""
        return self._cells[(branch, layer)]

    def residencies(self) -> list[Residency]:
        """The distinct residencies, in cell order."""
        seen: dict[int, Residency] = {}
        for cell in self.cells:
            seen.setdefault(id(cell.residency), cell.residency)
        return list(seen.values())

    @property
    def capacity(self) -> int:
        """Table capacity (tokens per sample)."""
        return self.pinned.shape[1]

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        """True when every sample holds the same number of table tokens."""
        return min(self.lengths) == max(self.lengths)

    @property
    def split(self) -> bool:
        """True when some layers or heads hold different tokens (more than one residency)."""
        return len(self.residencies()) > 1

    def reserve(self, extra_tokens: int, *, total: int | None = None) -> None:
        """Make room for ``extra_tokens`` provisional tokens after the longest sample, in the table and every
        cell; with ``total``, size the buffers for ``total`` tokens now (what the policies allow plus one call),
        so that a rollout within that bound never reallocates.

        Without a bound growth is geometric (x1.5) into uninitialised memory, so a growing cache reallocates
        O(log n) times. With one, a split residency (a layer or head group holding its own tokens, sized for
        them when it split) grows geometrically too, but never past ``total``.
        """
        self.call_tokens = max(self.call_tokens, extra_tokens)
        if total is not None:
            self.bound = max(int(total), 0)
        capacity = _grown(self.capacity, self.max_length + extra_tokens, total)
        if capacity is not None:
            self._grow_table(capacity)
        residencies = self.residencies()
        for residency in residencies:
            if len(residencies) == 1:
                capacity = _grown(residency.capacity, residency.max_length + extra_tokens, total)
            else:
                capacity = self._cell_growth(residency.capacity, residency.max_length + extra_tokens)
            if capacity is not None:
                self._resize(residency, capacity)

    def _cell_growth(self, capacity: int, needed: int) -> int | None:
        """The new capacity of a cell buffer of ``capacity`` tokens that must hold ``needed``: x1.5, capped
        at :attr:`bound` while ``needed`` is within it; None when it need not change."""
        if needed <= capacity:
            return None
        target = max(needed, math.ceil(capacity * 1.5))
        if self.bound is not None and needed <= self.bound:
            target = min(target, self.bound)
        return target

    def _grow_table(self, capacity: int) -> None:
        used, had = self.max_length, self.capacity > 0
        for name in METADATA_FIELDS:
            old = self.meta[name]
            self.meta[name] = torch.empty(self.batch_size, capacity, dtype=torch.long, device=self.device)
            self.meta[name][:, :used] = old[:, :used]
        pinned = torch.zeros(self.batch_size, capacity, dtype=torch.bool, device=self.device)
        pinned[:, :used] = self.pinned[:, :used]
        self.pinned = pinned
        for name, old in self.columns.items():
            new = torch.empty((self.batch_size, capacity, *old.shape[2:]), dtype=old.dtype, device=self.device)
            new[:, :used] = old[:, :used]
            self.columns[name] = new
        if had:
            self.reallocations += 1

    def _resize(self, residency: Residency, capacity: int) -> None:
        """Move a residency and its cells into buffers of ``capacity`` tokens (uninitialised past the data)."""
        used = residency.max_length
        slots = torch.empty(self.batch_size, capacity, dtype=torch.long, device=self.device)
        slots[:, :used] = residency.slots[:, :used]
        had_data = residency.capacity > 0
        residency.slots = slots
        for cell in self.cells:
            if cell.residency is residency:
                k, v = self._kv(capacity, len(cell.heads))
                k[:, :used] = cell.k[:, :used]
                v[:, :used] = cell.v[:, :used]
                cell.k, cell.v = k, v
        residency.zeroed = min(residency.zeroed, used)
        residency.version += 1
        if had_data:
            self.reallocations += 1

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers of every cell (capacity, not only resident tokens)."""
        return sum(cell.k.numel() * cell.k.element_size() * 2 for cell in self.cells)

    def resident_bytes(self) -> int:
        """Bytes of the K/V of resident tokens (what the model attends to, summed over cells and samples)."""
        per_token = self.head_dim * torch.empty((), dtype=self.dtype).element_size() * 2
        return sum(sum(cell.lengths) * len(cell.heads) * per_token for cell in self.cells)

    # -------------------------------------------------------------------------------------- the table
    def view(self) -> CacheView:
        """The table of resident tokens as ``[B, S]`` metadata views, ``S = max_length``."""
        size = self.max_length
        positions = torch.arange(size, device=self.device).unsqueeze(0)
        valid = positions < torch.tensor(self.lengths, device=self.device).unsqueeze(1)
        return CacheView(
            frame=self.meta["frame"][:, :size],
            chunk=self.meta["chunk"][:, :size],
            row=self.meta["row"][:, :size],
            col=self.meta["col"][:, :size],
            rope_pos=self.meta["rope_pos"][:, :size],
            pinned=self.pinned[:, :size],
            valid=valid,
            token_cols=self.token_cols,
            columns={name: column[:, :size] for name, column in self.columns.items()},
        )

    def add_column(self, name: str, *, shape: Sequence[int] = (), dtype: torch.dtype = torch.long,
                   fill: Any = 0) -> None:
        """Add a policy-owned per-token column ``[B, capacity, *shape]``: committed tokens get ``fill``, values
        move with their token through every compaction, ``view().columns[name]`` shows them and
        :meth:`column` writes them. Adding an existing name with the same shape and dtype is a no-op."""
        if not isinstance(name, str) or not name:
            raise ParameterError(f"a cache column needs a non-empty name, got {name!r}")
        existing = self.columns.get(name)
        if existing is not None:
            if tuple(existing.shape[2:]) != tuple(shape) or existing.dtype != dtype:
                raise ParameterError(f"cache column {name!r} exists with shape {tuple(existing.shape[2:])} and "
                                     f"dtype {existing.dtype}, asked for {tuple(shape)} and {dtype}")
            return
        column = torch.full((self.batch_size, self.capacity, *shape), fill, dtype=dtype, device=self.device)
        self.columns[name] = column
        self._column_fill[name] = fill

    def column(self, name: str) -> torch.Tensor:
        """The writable ``[B, S, *shape]`` view of column ``name`` over the resident tokens."""
        if name not in self.columns:
            raise ParameterError(f"no cache column {name!r}; columns: {sorted(self.columns) or 'none'}")
        return self.columns[name][:, :self.max_length]

    def commit(self, metadata: dict[str, torch.Tensor]) -> None:
        """Make the provisional tokens of the last forward resident in every cell (both branches must have
        written them). ``metadata[name]`` is ``[B, n]`` for every metadata field."""
        missing = set(METADATA_FIELDS) - set(metadata)
        if missing:
            raise CacheShapeError(f"commit needs metadata fields {sorted(missing)}")
        n = metadata["frame"].shape[1]
        if metadata["frame"].shape[0] != self.batch_size:
            raise CacheShapeError(
                f"metadata for {metadata['frame'].shape[0]} samples does not match the cache's batch of "
                f"{self.batch_size}"
            )
        if self.max_length + n > self.capacity:
            self._grow_table(max(self.max_length + n, math.ceil(self.capacity * 1.5)))
        index = _write_index(self.lengths, n, self.device)
        for name in METADATA_FIELDS:
            _assign(self.meta[name], index, metadata[name].to(device=self.device, dtype=torch.long))
        _assign(self.pinned, index, False)
        for name, column in self.columns.items():
            _assign(column, index, self._column_fill[name])
        positions = (torch.tensor(self.lengths, device=self.device).unsqueeze(1)
                     + torch.arange(n, device=self.device).unsqueeze(0))
        for residency in self.residencies():
            if residency.max_length + n > residency.capacity:
                raise CacheShapeError("commit without a forward that wrote the provisional tokens")
            _assign(residency.slots, _write_index(residency.lengths, n, self.device), positions)
            residency.lengths = [length + n for length in residency.lengths]
            residency.version += 1
        self.lengths = [length + n for length in self.lengths]

    def clear(self) -> None:
        """Forget every resident token (a recipe's restart, e.g. CausVid's long-video rollouts). Storage and
        head groups are kept for reuse."""
        self.lengths = [0] * self.batch_size
        self.pinned.zero_()
        for residency in self.residencies():
            residency.lengths = [0] * self.batch_size
            residency.version += 1
        self.epoch += 1

    # ------------------------------------------------------------------------------------- compaction
    def compact(self, keep: torch.Tensor, pin: torch.Tensor | None = None) -> int:
        """Keep only the tokens where ``keep`` is True.

        ``keep`` is bool over the table view: ``[B, S]`` (every layer and head), ``[L, B, S]`` (per layer)
        or ``[L, H, B, S]`` (per layer and head). Survivors keep their frame order and move to the front of
        their cells' storage (no reallocation, except when a layer first splits into head groups). ``pin``
        (bool ``[B, S]``) flags tokens as pinned (the flag stays set). Returns the table tokens removed
        (tokens no cell holds any more).
        """
        size = self.max_length
        if keep.shape[-2:] != (self.batch_size, size) or keep.ndim not in (2, 3, 4) or (
                keep.ndim >= 3 and keep.shape[0] != self.num_layers) or (
                keep.ndim == 4 and keep.shape[1] != self.num_heads):
            raise CacheShapeError(
                f"keep mask of shape {tuple(keep.shape)} does not match the cache view: expected [B, S], "
                f"[L, B, S] or [L, H, B, S] with B={self.batch_size}, S={size}, L={self.num_layers}, "
                f"H={self.num_heads}"
            )
        keep = keep.to(self.device, torch.bool)
        if pin is not None:
            self.pinned[:, :size] |= pin.to(self.device)
        before = sum(self.lengths)
        plans: list[tuple[Cell, torch.Tensor]] = []
        for cell in self.cells:
            if cell.branch != 0:
                continue
            if keep.ndim == 2:
                rows = keep.unsqueeze(0)
            elif keep.ndim == 3:
                rows = keep[cell.layer].unsqueeze(0)
            else:
                rows = keep[cell.layer].index_select(0, cell.head_index)
            plans.append((cell, rows))
        self._compact_cells(plans)
        return before - sum(self.lengths)

    def _compact_cells(self, plans: list[tuple[Cell, torch.Tensor]], *, prune: bool = True) -> None:
        """Apply keep rows (bool ``[1 or H_c, B, S]`` over the table) to branch-0 cells and their twins in the
        other branch: split head groups whose heads disagree, give cells that disagree with the rest of their
        residency a residency of their own, compact; then (``prune``) drop table tokens that no cell holds."""
        size = self.max_length
        if size == 0:
            return
        # 1. keep in each cell's slot space (once per residency and keep tensor); split disagreeing head groups
        gathered_cache: dict[tuple[int, int], torch.Tensor] = {}
        patterns: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        for cell, rows in plans:
            residency = cell.residency
            key = (id(residency), id(rows))
            gathered = gathered_cache.get(key) if rows.shape[0] == 1 else None
            if gathered is None:
                width = residency.max_length
                slots = residency.slots[:, :width].clamp(0, size - 1)
                gathered = rows.gather(2, slots.unsqueeze(0).expand(rows.shape[0], -1, -1)) & residency.valid(width)
                if rows.shape[0] == 1:
                    gathered_cache[key] = gathered
            if gathered.shape[0] == 1 or all(torch.equal(gathered[0], g) for g in gathered[1:]):
                patterns[(cell.layer, cell.heads)] = gathered[0]
                continue
            groups: list[tuple[list[int], torch.Tensor]] = []
            for i, head in enumerate(cell.heads):
                for heads, pattern in groups:
                    if torch.equal(pattern, gathered[i]):
                        heads.append(head)
                        break
                else:
                    groups.append(([head], gathered[i]))
            self._split(cell, [heads for heads, _ in groups])
            for heads, pattern in groups:
                patterns[(cell.layer, tuple(sorted(heads)))] = pattern
        # 2. per residency: partition its cells by keep pattern (cells not planned keep everything); the
        # largest partition keeps the residency, the others get their own
        for residency in self.residencies():
            members = [cell for cell in self.cells if cell.residency is residency]
            full = residency.valid()
            partitions: list[tuple[torch.Tensor, list[Cell]]] = []
            for cell in members:
                pattern = patterns.get((cell.layer, cell.heads), full)
                for pattern_key, group in partitions:
                    if pattern_key is pattern or torch.equal(pattern_key, pattern):
                        group.append(cell)
                        break
                else:
                    partitions.append((pattern, [cell]))
            partitions.sort(key=lambda part: -len(part[1]))
            for pattern, group in partitions[1:]:
                self._detach(residency, group, pattern)
            self._compact_residency(residency, partitions[0][0])
        if prune:
            self._prune_table()

    def _split(self, cell: Cell, groups: list[list[int]]) -> None:
        """Replace ``cell`` and its twin in the other branch by head groups ``groups`` (lists of its heads),
        sharing its residency. Allocates the groups' buffers once."""
        for branch in range(self.branches):
            cells = self._cells[(branch, cell.layer)]
            twin = next(c for c in cells if c.heads == cell.heads)
            for heads in groups:
                local = torch.tensor([cell.heads.index(h) for h in sorted(heads)], device=self.device)
                cells.append(Cell(branch, cell.layer, tuple(sorted(heads)), self.num_heads,
                                  twin.k.index_select(2, local), twin.v.index_select(2, local), twin.residency))
            cells.remove(twin)
            cells.sort(key=lambda c: c.heads[0])
        self.reallocations += 1

    def _detach(self, residency: Residency, group: list[Cell], keep: torch.Tensor) -> None:
        """Move the cells of ``group`` (both branches) to a residency of their own holding the tokens ``keep``
        (bool ``[B, S_r]`` in ``residency``'s slot space), in buffers sized for them plus one call's tokens."""
        lengths = keep.sum(dim=1).tolist()
        capacity = max(max(lengths) + self.call_tokens, 1)
        fresh = Residency(self.batch_size, capacity, self.device)
        fresh.lengths = [int(n) for n in lengths]
        fresh.zeroed = capacity  # allocated zeroed once: every position is finite
        picked = [keep[b, :residency.lengths[b]].nonzero().squeeze(1) for b in range(self.batch_size)]
        for b, index in enumerate(picked):
            fresh.slots[b, :index.numel()] = residency.slots[b, index]
        for cell in group:
            shape = (self.batch_size, capacity, len(cell.heads), self.head_dim)
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            for b, index in enumerate(picked):
                k[b, :index.numel()] = cell.k[b, index]
                v[b, :index.numel()] = cell.v[b, index]
            cell.k, cell.v, cell.residency = k, v, fresh
        self.reallocations += 1

    def _compact_residency(self, residency: Residency, keep: torch.Tensor) -> None:
        """Keep ``keep`` (bool ``[B, S_r]`` in slot space) in ``residency`` and every cell that shares it."""
        new_lengths = keep.sum(dim=1).tolist()
        if new_lengths == residency.lengths:
            return
        cells = [cell for cell in self.cells if cell.residency is residency]
        for b in range(self.batch_size):
            length = residency.lengths[b]
            if new_lengths[b] == length:
                continue
            start = int((~keep[b, :length]).nonzero()[0])
            tail = keep[b, start:length].nonzero().squeeze(1) + start
            count = tail.shape[0]
            if count and int(tail[-1]) - int(tail[0]) + 1 == count:  # one run (a window's eviction): a block copy
                tail = slice(int(tail[0]), int(tail[0]) + count)
            for cell in cells:
                cell.k[b, start:start + count] = cell.k[b, tail].clone() if isinstance(tail, slice) else cell.k[b, tail]
                cell.v[b, start:start + count] = cell.v[b, tail].clone() if isinstance(tail, slice) else cell.v[b, tail]
            residency.slots[b, start:start + count] = residency.slots[b, tail].clone()
        residency.lengths = [int(n) for n in new_lengths]
        residency.version += 1

    def _prune_table(self) -> None:
        """Remove table tokens that no cell holds and renumber every residency's slots."""
        size = self.max_length
        if size == 0:
            return
        residencies = self.residencies()
        held = torch.zeros(self.batch_size, size + 1, dtype=torch.bool, device=self.device)
        for residency in residencies:
            width = residency.max_length
            slots = residency.slots[:, :width].masked_fill(~residency.valid(width), size)
            held.scatter_(1, slots, True)
        held = held[:, :size] & self.view().valid
        new_lengths = held.sum(dim=1).tolist()
        if new_lengths == self.lengths:
            return
        renumber = held.long().cumsum(dim=1) - 1  # new table position of each held token
        for b in range(self.batch_size):
            length = self.lengths[b]
            if new_lengths[b] == length:
                continue
            start = int((~held[b, :length]).nonzero()[0])
            tail = held[b, start:length].nonzero().squeeze(1) + start
            count = tail.shape[0]
            for name in METADATA_FIELDS:
                self.meta[name][b, start:start + count] = self.meta[name][b, tail]
            self.pinned[b, start:start + count] = self.pinned[b, tail]
            for column in self.columns.values():
                column[b, start:start + count] = column[b, tail]
        for residency in residencies:
            width = residency.max_length
            if width:
                slots = residency.slots[:, :width]
                residency.slots[:, :width] = renumber.gather(1, slots.clamp(0, size - 1))
                residency.version += 1
        self.lengths = [int(n) for n in new_lengths]

    # ------------------------------------------------------------------------------------------ edits
    def shift_frames(self, delta: torch.Tensor) -> None:
        """Re-rotate resident keys along the temporal RoPE axis by ``delta`` (long ``[B, S]``, frames) in every
        layer, head and branch, and move their ``rope_pos`` by it (Deep Forcing's sink re-alignment).

        Absolute mode rotates the stored keys (exactly RoPE at the new positions, up to rounding); raw mode
        only moves ``rope_pos`` (keys are rotated on read). Entries past a sample's length are ignored.
        """
        size = self.max_length
        if tuple(delta.shape) != (self.batch_size, size):
            raise CacheShapeError(f"shift of shape {tuple(delta.shape)} does not match the cache view "
                                  f"{(self.batch_size, size)}")
        delta = delta.to(self.device, torch.long).masked_fill(~self.view().valid, 0)
        if self.rope_mode == "absolute":
            if self.rotary is None:
                raise ParameterError("shifting keys needs the model's rotary embedding (KVCache.rotary); "
                                     "create the cache with the adapter's new_cache()")
            for residency in self.residencies():
                width = residency.max_length
                if not width:
                    continue
                moved = delta.gather(1, residency.slots[:, :width].clamp(0, max(size - 1, 0)))
                moved = moved.masked_fill(~residency.valid(width), 0)
                for cell in self.cells:
                    if cell.residency is residency:
                        cell.k[:, :width] = self.rotary.shift_frames(cell.k[:, :width], moved)
        self.meta["rope_pos"][:, :size] += delta
        for residency in self.residencies():
            residency.version += 1

    def merge(self, merge: Merge, *, layers: Sequence[int] | None = None) -> None:
        """Rewrite the keys and values of ``merge.target`` tokens as weighted combinations of their sources in
        the given layers (None: all), every head and branch; then the sources that are not targets leave those
        layers (and the table, if no layer holds them any more)."""
        layers = list(range(self.num_layers)) if layers is None else list(layers)
        drop = self._merge(merge, layers)
        rows = torch.ones(self.num_layers, self.batch_size, self.max_length, dtype=torch.bool, device=self.device)
        rows[layers] = ~drop
        self.compact(rows & self.view().valid)

    def _merge(self, merge: Merge, layers: list[int]) -> torch.Tensor:
        """Rewrite the targets' keys/values in ``layers``; returns bool ``[B, S]``: sources that are not targets."""
        size = self.max_length
        target = merge.target.to(self.device, torch.long)
        sources = merge.sources.to(self.device, torch.long)
        weights = merge.weights.to(self.device)
        if target.shape[0] != self.batch_size:
            raise CacheShapeError(f"a merge for {target.shape[0]} samples does not match the batch of "
                                  f"{self.batch_size}")
        used = target >= 0
        if bool(((target >= size) | (used.unsqueeze(-1) & ((sources < 0) | (sources >= size)))).any()):
            raise CacheShapeError(f"merge positions must index the cache view of {size} tokens")
        if weights.ndim == 4 and weights.shape[-1] != self.num_heads:
            raise CacheShapeError(f"per-head merge weights have {weights.shape[-1]} heads, the model "
                                  f"{self.num_heads}")
        drop = torch.zeros(self.batch_size, size + 1, dtype=torch.bool, device=self.device)
        drop.scatter_(1, sources.masked_fill(~used.unsqueeze(-1), size).flatten(1), True)
        drop.scatter_(1, target.masked_fill(~used, size), False)
        for layer in layers:
            for branch in range(self.branches):
                for cell in self._cells[(branch, layer)]:
                    self._merge_cell(cell, target, sources, weights, used, size)
        return drop[:, :size]

    def _merge_cell(self, cell: Cell, target: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor,
                    used: torch.Tensor, size: int) -> None:
        residency = cell.residency
        width = residency.max_length
        if not width:
            return
        valid = residency.valid(width)
        slot_of = torch.full((self.batch_size, size + 1), -1, dtype=torch.long, device=self.device)
        slot_of.scatter_(1, residency.slots[:, :width].masked_fill(~valid, size),
                         torch.arange(width, device=self.device).expand(self.batch_size, -1).contiguous())
        slot_of[:, size] = -1
        t_slot = slot_of.gather(1, target.masked_fill(~used, size))  # [B, M]
        s_slot = slot_of.gather(1, sources.masked_fill(~used.unsqueeze(-1), size).flatten(1)).view_as(sources)
        ok = used & (t_slot >= 0) & (s_slot >= 0).all(dim=-1)  # the cell holds the target and every source
        w = weights if weights.ndim == 4 else weights.unsqueeze(-1).expand(*weights.shape, self.num_heads)
        w = w.index_select(3, cell.head_index).to(torch.float32)  # [B, M, K, H_c]
        batch = torch.arange(self.batch_size, device=self.device)
        t_index = t_slot.clamp(min=0)
        for tensor in (cell.k, cell.v):
            picked = tensor[batch[:, None, None], s_slot.clamp(min=0)].to(torch.float32)  # [B, M, K, H_c, D]
            combined = (picked * w.unsqueeze(-1)).sum(dim=2).to(tensor.dtype)  # [B, M, H_c, D]
            current = tensor[batch[:, None], t_index]
            tensor[batch[:, None], t_index] = torch.where(ok[..., None, None], combined, current)

    def flush(self, keep: torch.Tensor) -> int:
        """Keep exactly the tokens of ``keep`` (bool ``[B, S]``) in every layer and head, and mark what the
        model caches about the context as stale (:attr:`epoch`; e.g. cross-attention keys and values).
        Infinity-RoPE's KV flush at a prompt switch. Returns the table tokens removed."""
        removed = self.compact(keep)
        self.epoch += 1
        return removed

    def replace_frames(self, frame_start: int, num_frames: int, tokens_per_frame: int, *, branch: int = 0) -> int:
        """Give the resident tokens of frames ``[frame_start, frame_start + num_frames)`` the K/V just written to
        the provisional slot of ``branch``'s cells (laid out frame, row, column, ``tokens_per_frame`` per frame).

        Metadata is unchanged; nothing becomes resident. Returns the table tokens replaced.
        """
        if tokens_per_frame % self.token_cols:
            raise CacheShapeError(
                f"tokens_per_frame={tokens_per_frame} is not a multiple of token_cols={self.token_cols}"
            )
        replaced = 0
        for b, length in enumerate(self.lengths):
            frames = self.meta["frame"][b, :length]
            hit = (frames >= frame_start) & (frames < frame_start + num_frames)
            replaced += int(hit.sum())
        for cell in self.cells:
            if cell.branch != branch:
                continue
            residency = cell.residency
            for b, length in enumerate(residency.lengths):
                slots = residency.slots[b, :length]
                frames = self.meta["frame"][b, slots]
                index = ((frames >= frame_start) & (frames < frame_start + num_frames)).nonzero().squeeze(1)
                if index.numel() == 0:
                    continue
                rows, cols = self.meta["row"][b, slots[index]], self.meta["col"][b, slots[index]]
                local = (frames[index] - frame_start) * tokens_per_frame + rows * self.token_cols + cols
                cell.k[b, index] = cell.k[b, length + local]
                cell.v[b, index] = cell.v[b, length + local]
        return replaced

    # -------------------------------------------------------------------------------- the layer path
    @contextlib.contextmanager
    def observing(self, observer: Callable[[LayerContext], list[tuple[str, LayerEdit]]] | None,
                  wants_layer: Callable[[int], bool] | None = None) -> Iterator[None]:
        """Within the block, forwards of branch 0 run ``observer`` inside each layer for which ``wants_layer``
        is True (the engine's in-layer hooks); None leaves the per-layer path untouched."""
        saved = self._observer
        self._observer = None if observer is None else (observer, wants_layer or (lambda layer: True))
        try:
            yield
        finally:
            self._observer = saved

    @contextlib.contextmanager
    def forward(self, call: ForwardCall, *, rotary: Rotary, own_tables: tuple[torch.Tensor, torch.Tensor],
                own_positions: dict[str, torch.Tensor] | None = None,
                own_mask: torch.Tensor | None = None) -> Iterator[ForwardContext]:
        """Set up one adapter forward: inside the block every layer's self-attention calls :meth:`attend`.

        ``own_positions``: ``rope_pos``, ``row``, ``col`` ``[B, n]`` of the call's tokens (a ``raw`` cache rotates
        them on read; None in ``absolute`` mode). Checks the call's
        override tensors against the cache view and makes room for the provisional slot.
        """
        size = self.max_length
        for name in ("visible", "rope_positions"):
            value = getattr(call, name)
            if value is not None and tuple(value.shape) != (self.batch_size, size):
                raise CacheShapeError(f"{name} of shape {tuple(value.shape)} does not match the cache view "
                                      f"{(self.batch_size, size)}")
        if call.rope_positions is not None and self.rope_mode != "raw":
            raise ParameterError("rope_positions re-rotate cached keys: they need a cache with rope_mode='raw' "
                                 "(keys are stored after RoPE in the default 'absolute' mode)")
        if self.rope_mode == "raw" and own_positions is None:
            raise CacheShapeError("a raw-mode cache rotates the call's keys on read: give own_positions")
        if call.branch >= self.branches:
            raise CacheShapeError(f"a forward of branch {call.branch} on a cache with {self.branches} branch(es)")
        self.reserve(own_tables[0].shape[1])
        observer, wants = self._observer if (self._observer is not None and call.branch == 0) else (None, None)
        context = ForwardContext(call, rotary, own_tables, own_positions, own_mask, observer, wants)
        self._forward = context
        try:
            yield context
        finally:
            self._forward = None
            if context.edited:
                self._prune_table()

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The per-layer entry point: self-attention of one forward in ``layer`` against the cache.

        ``query``, ``key`` ``[B, n, H, D]`` before RoPE (after the model's q/k norms), ``value`` ``[B, n, H, D]``;
        ``attention(q [B, n, h, D], k [B, S, h, D], v, mask [B, 1, 1 or n, S] or None) -> [B, n, h, D]`` is the
        model's attention kernel.
        Rotates the call's queries and keys to its positions, runs the in-layer hooks the forward asked for,
        writes the call's keys and values into every head group's provisional slot and attends to
        ``[resident, own]`` per head group. Returns ``[B, n, H, D]``.
        """
        context = self._forward
        if context is None:
            raise CacheShapeError("KVCache.attend is called inside an adapter forward (KVCache.forward)")
        if key.shape[0] != self.batch_size:
            raise CacheShapeError(
                f"a batch of {key.shape[0]} samples does not match the cache's batch of {self.batch_size}"
            )
        if key.shape[2:] != (self.num_heads, self.head_dim):
            raise CacheShapeError(
                f"keys of heads x dim {tuple(key.shape[2:])} do not match the cache's "
                f"{(self.num_heads, self.head_dim)}"
            )
        rotary = context.rotary
        query_raw = query
        query = rotary.rotate(query, *context.own_tables)
        rotated_key = rotary.rotate(key, *context.own_tables) if self.rope_mode == "absolute" else None
        if context.observer is not None and context.wants_layer(layer):
            if rotated_key is None:
                rotated_key = rotary.rotate(key, *context.own_tables)
            self._observe(layer, context, query, query_raw, rotated_key, key, value)
        stored = key if rotated_key is None or self.rope_mode == "raw" else rotated_key
        cells = self._cells[(context.call.branch, layer)]
        if len(cells) == 1:
            return self._attend_cell(cells[0], context, query, stored, value, attention)
        out = torch.empty_like(query)
        for cell in cells:
            index = cell.head_index
            part = self._attend_cell(cell, context, query.index_select(2, index), stored.index_select(2, index),
                                     value.index_select(2, index), attention)
            out.index_copy_(2, index, part.to(out.dtype))
        return out

    def _attend_cell(self, cell: Cell, context: ForwardContext, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        plan = self._plan(cell.residency, context)
        _assign(cell.k, plan.index, key)
        _assign(cell.v, plan.index, value)
        keys, values = cell.k[:, :plan.end], cell.v[:, :plan.end]
        if plan.key_tables is not None:
            keys = context.rotary.rotate(keys, *plan.key_tables)
        return attention(query, keys, values, plan.mask)

    def _plan(self, residency: Residency, context: ForwardContext) -> _Plan:
        """Write index, key mask and (raw mode) key tables of ``residency`` for this forward, built once."""
        plan = context.plans.get(id(residency))
        if plan is not None and plan.version == residency.version:
            return plan
        n = context.num_tokens
        size = residency.max_length
        capacity = self._cell_growth(residency.capacity, size + n)
        if capacity is not None:
            self._resize(residency, capacity)
        if residency.zeroed < size + n:  # first read of these positions: make them finite in every sample
            for cell in self.cells:
                if cell.residency is residency:
                    cell.k[:, residency.zeroed:size + n] = 0
                    cell.v[:, residency.zeroed:size + n] = 0
            residency.zeroed = size + n
        call = context.call
        table = self.max_length
        slots = residency.slots[:, :size].clamp(0, max(table - 1, 0))
        mask = None
        if not residency.uniform or call.visible is not None:
            positions = torch.arange(size + n, device=self.device).unsqueeze(0)
            lengths = torch.tensor(residency.lengths, device=self.device).unsqueeze(1)
            resident = positions < lengths
            if call.visible is not None:
                resident[:, :size] &= call.visible.to(self.device, torch.bool).gather(1, slots)
            own = (positions >= lengths) & (positions < lengths + n)
            mask = (resident | own)[:, None, None, :]
        if context.own_mask is not None:
            structure = torch.cat([torch.ones(1, 1, n, size, dtype=torch.bool, device=self.device),
                                   context.own_mask.to(self.device)], dim=-1)
            mask = structure if mask is None else structure & mask
        index = _write_index(residency.lengths, n, self.device)
        key_tables = None
        if self.rope_mode == "raw":  # (rope position, row, col) of every key read; the own slot per sample
            resident = self.meta["rope_pos"][:, :table] if call.rope_positions is None else \
                call.rope_positions.to(self.device, torch.long)
            sources = {"rope_pos": resident, "row": self.meta["row"][:, :table], "col": self.meta["col"][:, :table]}
            positions = {}
            for name, values in sources.items():
                full = torch.zeros(self.batch_size, size + n, dtype=torch.long, device=self.device)
                full[:, :size] = values.gather(1, slots)
                _assign(full, index, context.own_positions[name].to(self.device, torch.long))
                positions[name] = full
            key_tables = context.rotary.tables(positions["rope_pos"], positions["row"], positions["col"])
        plan = _Plan(residency.version, size + n, index, mask, key_tables)
        context.plans[id(residency)] = plan
        return plan

    def _observe(self, layer: int, context: ForwardContext, query: torch.Tensor, query_raw: torch.Tensor,
                 key: torch.Tensor, key_raw: torch.Tensor, value: torch.Tensor) -> None:
        """Run the in-layer hooks of ``layer`` (branch 0) and apply what they return, before it attends."""
        view = self.view()
        cells = []
        for cell in self._cells[(0, layer)]:
            residency = cell.residency
            width = residency.max_length
            keys = cell.k[:, :width]
            slots = residency.slots[:, :width]
            cells.append(CellView(heads=cell.heads, keys=keys, values=cell.v[:, :width], slots=slots,
                                  valid=residency.valid(width), rotate=self._rotated(keys, slots, context)))
        edits = context.observer(LayerContext(index=layer, call=context.call, query=query, query_raw=query_raw,
                                              key=key, key_raw=key_raw, value=value, view=view,
                                              cells=tuple(cells), num_heads=self.num_heads))
        if edits:
            self._apply_layer_edits(layer, edits, view)
            context.edited = True

    def _rotated(self, keys: torch.Tensor, slots: torch.Tensor, context: ForwardContext) -> Callable[[], torch.Tensor]:
        def rotate() -> torch.Tensor:
            if self.rope_mode == "absolute":
                return keys
            index = slots.clamp(0, max(self.max_length - 1, 0))
            tables = context.rotary.tables(self.meta["rope_pos"].gather(1, index), self.meta["row"].gather(1, index),
                                           self.meta["col"].gather(1, index))
            return context.rotary.rotate(keys, *tables)

        return rotate

    def _apply_layer_edits(self, layer: int, edits: list[tuple[str, LayerEdit]], view: CacheView) -> None:
        """Compose the layer edits of several policies (protect beats drop; ``pinned`` tokens are protected)
        and apply them to ``layer`` in every branch. The table is pruned after the forward."""
        size = view.size
        drop = torch.zeros(self.num_heads, self.batch_size, size, dtype=torch.bool, device=self.device)
        protect = view.pinned.unsqueeze(0).expand(self.num_heads, -1, -1).clone()
        merges = []
        for name, edit in edits:
            if not isinstance(edit, LayerEdit):
                raise CompositionError(f"policy {name} returned {describe(edit)} from cachepolicy_layer, "
                                       f"expected LayerEdit or None")
            for field, mask, into in (("drop", edit.drop, drop), ("protect", edit.protect, protect)):
                if mask is None:
                    continue
                if mask.dtype != torch.bool or tuple(mask.shape[-2:]) != (self.batch_size, size) or mask.ndim not in (
                        2, 3) or (mask.ndim == 3 and mask.shape[0] != self.num_heads):
                    raise CompositionError(
                        f"policy {name}: LayerEdit.{field} must be bool [B, S] or [H, B, S] with "
                        f"B={self.batch_size}, S={size}, H={self.num_heads}; got {describe(mask)}"
                    )
                into |= mask.to(self.device)
            if edit.merge is not None:
                merges.append((name, edit.merge))
        if len(merges) > 1:
            raise CompositionError(f"policies {', '.join(n for n, _ in merges)} all merge tokens in layer {layer}; "
                                   f"compose at most one merging policy")
        if merges:
            drop |= self._merge(merges[0][1], [layer]).unsqueeze(0)
        keep = ~(drop & ~protect) & view.valid.unsqueeze(0)
        if not bool((drop & ~protect).any()):
            return
        plans = [(cell, keep.index_select(0, cell.head_index)) for cell in self._cells[(0, layer)]]
        self._compact_cells(plans, prune=False)

    # --------------------------------------------------------------------------------------- inspect
    def held(self, branch: int = 0) -> torch.Tensor:
        """bool ``[L, H, B, S]``: which layer and head holds each table token."""
        size = self.max_length
        out = torch.zeros(self.num_layers, self.num_heads, self.batch_size, size + 1, dtype=torch.bool,
                          device=self.device)
        for cell in self.cells:
            if cell.branch != branch:
                continue
            width = cell.residency.max_length
            slots = cell.residency.slots[:, :width].masked_fill(~cell.residency.valid(width), size)
            for head in cell.heads:
                out[cell.layer, head].scatter_(1, slots, True)
        return out[..., :size]

    def head_lengths(self) -> list[list[int]]:
        """Resident tokens per (layer, head), the longest sample's (branch 0)."""
        lengths = [[0] * self.num_heads for _ in range(self.num_layers)]
        for cell in self.cells:
            if cell.branch == 0:
                for head in cell.heads:
                    lengths[cell.layer][head] = cell.residency.max_length
        return lengths

    def check_consistent(self) -> None:
        """Raise :class:`CacheShapeError` if metadata and storage disagree (used by tests and debugging)."""
        for b, length in enumerate(self.lengths):
            if length > self.capacity:
                raise CacheShapeError(f"sample {b} holds {length} tokens but capacity is {self.capacity}")
            frames = self.meta["frame"][b, :length]
            if length > 1 and bool((frames[1:] < frames[:-1]).any()):
                raise CacheShapeError(f"sample {b}: resident tokens are not in frame order")
        union = torch.zeros(self.batch_size, self.max_length, dtype=torch.bool, device=self.device)
        for residency in self.residencies():
            for b, length in enumerate(residency.lengths):
                slots = residency.slots[b, :length]
                if length > residency.capacity:
                    raise CacheShapeError(f"a residency holds {length} tokens past its capacity")
                if length and (bool((slots[1:] <= slots[:-1]).any()) or int(slots[-1]) >= self.lengths[b]):
                    raise CacheShapeError(f"sample {b}: residency slots are not increasing table positions")
                union[b, slots] = True
        if not bool((union == self.view().valid).all()):
            raise CacheShapeError("the table holds tokens that no cell holds")

    def residency_record(self, tokens_per_frame: int) -> list[dict[str, Any]]:
        """Per sample, the resident tokens as ``{"frames": {frame: [spatial indices] or "all"}}`` (``"all"``:
        every one of the frame's ``tokens_per_frame`` tokens), with ``"cells"`` per (layer, heads) group when
        layers or heads hold different tokens (JSON-serialisable; the opt-in residency trace)."""
        view = self.view()
        records = []
        split = self.split
        cells = [cell for cell in self.cells if cell.branch == 0]
        for b in range(self.batch_size):
            length = self.lengths[b]
            frames = view.frame[b, :length].tolist()
            spatial = view.spatial_index[b, :length].tolist()
            table = _group_frames(frames, spatial, tokens_per_frame)
            record: dict[str, Any] = {"frames": table}
            if split:
                groups = []
                for cell in cells:
                    slots = cell.residency.slots[b, :cell.residency.lengths[b]].tolist()
                    groups.append({"layer": cell.layer, "heads": list(cell.heads),
                                   "frames": _group_frames([frames[s] for s in slots], [spatial[s] for s in slots],
                                                           tokens_per_frame)})
                record["cells"] = groups
            records.append(record)
        return records


def _grown(capacity: int, needed: int, total: int | None) -> int | None:
    """The new capacity of a buffer of ``capacity`` tokens that must hold ``needed`` (at least ``total`` when a
    bound is given: exactly that, else x1.5), or None when it need not change."""
    target = needed if total is None else max(needed, total)
    if target <= capacity:
        return None
    return target if total is not None else max(target, math.ceil(capacity * 1.5))


def _group_frames(frames: list[int], spatial: list[int], tokens_per_frame: int) -> dict[str, Any]:
    grouped: dict[str, Any] = {}
    for frame, index in zip(frames, spatial):
        grouped.setdefault(str(frame), []).append(index)
    for frame, indices in grouped.items():
        if len(indices) == tokens_per_frame:
            grouped[frame] = "all"
    return grouped


def _write_index(lengths: list[int], num_tokens: int, device: torch.device) -> Any:
    """Where ``num_tokens`` tokens go after each sample's ``lengths``: a slice when the batch is uniform, else
    ``(batch_index [B, n], position [B, n])`` for advanced indexing."""
    if min(lengths) == max(lengths):
        return slice(lengths[0], lengths[0] + num_tokens)
    starts = torch.tensor(lengths, device=device).unsqueeze(1)
    positions = starts + torch.arange(num_tokens, device=device).unsqueeze(0)
    batch_index = torch.arange(len(lengths), device=device).unsqueeze(1).expand_as(positions)
    return batch_index, positions


def _assign(tensor: torch.Tensor, index: Any, values: Any) -> None:
    """``tensor[:, index] = values`` for a :func:`_write_index` index (dim 1 is the token axis)."""
    if isinstance(index, slice):
        tensor[:, index] = values
    else:
        tensor[index] = values


def metadata_for_chunk(
    batch_size: int,
    frame_start: int,
    num_frames: int,
    token_rows: int,
    token_cols: int,
    chunk: int,
    rope_start: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Metadata ``[B, F * rows * cols]`` of a chunk's tokens, ordered frame, row, column (Wan's order)."""
    frames = torch.arange(frame_start, frame_start + num_frames, device=device)
    rows = torch.arange(token_rows, device=device)
    cols = torch.arange(token_cols, device=device)
    f, r, c = torch.meshgrid(frames, rows, cols, indexing="ij")
    rope_offset = 0 if rope_start is None else rope_start - frame_start
    data = {
        "frame": f.reshape(-1),
        "chunk": torch.full_like(f.reshape(-1), chunk),
        "row": r.reshape(-1),
        "col": c.reshape(-1),
        "rope_pos": f.reshape(-1) + rope_offset,
    }
    return {name: value.unsqueeze(0).expand(batch_size, -1) for name, value in data.items()}
