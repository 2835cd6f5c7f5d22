"""KV-cache storage with per-token metadata, on the model's device.

Layout (one tensor for all layers, so compaction is one pass over the batch)::

    k, v      [num_layers, B, capacity, H, D]   model dtype, model device
    frame     [B, capacity]  int64   absolute latent frame of the token
    chunk     [B, capacity]  int64   chunk that committed the token
    row, col  [B, capacity]  int64   spatial position on the token grid
    rope_pos  [B, capacity]  int64   frame position of the key (rotated there when stored, or on read)
    pinned    [B, capacity]  bool    protected by some policy at a selection (sticky once set)

Sample ``b`` holds ``lengths[b]`` resident tokens at positions ``[0, lengths[b])``, always in frame
order. The chunk being generated writes its keys/values *provisionally* into positions
``[lengths[b], lengths[b] + n)``; they become resident only through :meth:`KVCache.commit`.

RoPE modes (``rope_mode``): ``"absolute"`` (default) stores keys after RoPE at their absolute (or
recipe-chosen) frame positions, recorded as ``rope_pos``; ``"raw"`` stores keys before RoPE and the
adapter rotates every key it attends to on read, resident tokens to their ``rope_pos`` unless the forward
overrides their positions (Rolling Forcing's anchor, re-rotated to sit just before its working cache).
Both modes give the same result when nothing is overridden.

The buffer grows geometrically when needed and is otherwise reused: compaction moves tokens inside the
same storage, so under a window the memory stays flat.
"""

from __future__ import annotations

import math
import attrs
import torch

from cachepolicy.errors import CacheShapeError

METADATA_FIELDS = ("frame", "chunk", "row", "col", "rope_pos")
ROPE_MODES = ("absolute", "raw")


@attrs.frozen(eq=False)
class CacheView:
    """Read-only view of the resident tokens that policies see (tensors are ``[B, S]`` views).

    ``S`` is the largest resident length in the batch; ``valid[b, s]`` is False past sample ``b``'s length.
    Do not modify these tensors.
    """

    frame: torch.Tensor
    chunk: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rope_pos: torch.Tensor
    pinned: torch.Tensor
    valid: torch.Tensor
    token_cols: int

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


class KVCache:
    """Per-layer keys/values plus metadata for ``batch_size`` samples. The one mutable cache object."""

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
    ) -> None:
        if rope_mode not in ROPE_MODES:
            raise CacheShapeError(f"KVCache rope_mode must be one of {', '.join(ROPE_MODES)}, got {rope_mode!r}")
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("token_cols", token_cols)):
            if not isinstance(value, int) or value <= 0:
                raise CacheShapeError(f"KVCache {name} must be a positive integer, got {value!r}")
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.token_cols = token_cols
        self.device = torch.device(device)
        self.dtype = dtype
        self.rope_mode = rope_mode
        self.lengths: list[int] = [0] * batch_size
        self.reallocations = 0
        self._allocate(max(capacity, 0))

    # ---------------------------------------------------------------------------------------- storage
    def _allocate(self, capacity: int) -> None:
        shape = (self.num_layers, self.batch_size, capacity, self.num_heads, self.head_dim)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        meta = {name: torch.zeros(self.batch_size, capacity, dtype=torch.long, device=self.device)
                for name in METADATA_FIELDS}
        self.meta = meta
        self.pinned = torch.zeros(self.batch_size, capacity, dtype=torch.bool, device=self.device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        """True when every sample holds the same number of resident tokens (no padding mask needed)."""
        return min(self.lengths) == max(self.lengths)

    def reserve(self, extra_tokens: int) -> None:
        """Make room for ``extra_tokens`` provisional tokens after the longest sample.

        Grows geometrically (x1.5) so that a growing cache reallocates O(log n) times, and a bounded one
        (under a window) stops reallocating after warm-up.
        """
        needed = self.max_length + extra_tokens
        if needed <= self.capacity:
            return
        new_capacity = max(needed, math.ceil(self.capacity * 1.5))
        old_k, old_v, old_meta, old_pinned, used = self.k, self.v, self.meta, self.pinned, self.max_length
        self._allocate(new_capacity)
        self.k[:, :, :used] = old_k[:, :, :used]
        self.v[:, :, :used] = old_v[:, :, :used]
        for name in METADATA_FIELDS:
            self.meta[name][:, :used] = old_meta[name][:, :used]
        self.pinned[:, :used] = old_pinned[:, :used]
        self.reallocations += 1

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (capacity, not only resident tokens)."""
        return self.k.numel() * self.k.element_size() * 2

    # ------------------------------------------------------------------------------------- write path
    def write_index(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | slice:
        """Where the provisional tokens of the next chunk go: a slice when the batch is uniform, else
        ``(batch_index [B, n], position [B, n])`` for advanced indexing."""
        if self.uniform:
            start = self.lengths[0]
            return slice(start, start + num_tokens)
        starts = torch.tensor(self.lengths, device=self.device).unsqueeze(1)
        positions = starts + torch.arange(num_tokens, device=self.device).unsqueeze(0)
        batch_index = torch.arange(self.batch_size, device=self.device).unsqueeze(1).expand_as(positions)
        return batch_index, positions

    def key_mask(self, num_tokens: int, visible: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool ``[B, 1, 1, max_length + num_tokens]`` of key positions each sample may attend to
        (resident tokens and its own provisional slot), or None when the batch is uniform and every
        resident token is visible.

        ``visible`` (bool ``[B, S]``, ``S = max_length``, aligned with :meth:`view`) restricts the resident
        tokens attended to; the own slot is always visible.
        """
        size = self.max_length
        if visible is not None and tuple(visible.shape) != (self.batch_size, size):
            raise CacheShapeError(
                f"visible mask of shape {tuple(visible.shape)} does not match the cache view {(self.batch_size, size)}"
            )
        if self.uniform:
            if visible is None:
                return None
            own = torch.ones(self.batch_size, num_tokens, dtype=torch.bool, device=self.device)
            return torch.cat([visible.to(self.device, torch.bool), own], dim=1)[:, None, None, :]
        total = size + num_tokens
        positions = torch.arange(total, device=self.device).unsqueeze(0)
        lengths = torch.tensor(self.lengths, device=self.device).unsqueeze(1)
        resident = positions < lengths
        if visible is not None:
            resident[:, :size] &= visible.to(self.device, torch.bool)
        own = (positions >= lengths) & (positions < lengths + num_tokens)
        return (resident | own)[:, None, None, :]

    def key_positions(self, own: dict[str, torch.Tensor],
                      rope_positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``rope_pos``, ``row`` and ``col`` ``[B, max_length + n]`` of every key position a forward reads
        (raw mode rotates keys on read with them): resident tokens from their metadata (``rope_pos``
        replaced by ``rope_positions`` ``[B, S]`` when given), the own slot from ``own[name]`` ``[B, n]``.
        Positions past a sample's keys hold stale values (they are masked out). Call after :meth:`reserve`.
        """
        size = self.max_length
        n = own["row"].shape[1]
        if rope_positions is not None and tuple(rope_positions.shape) != (self.batch_size, size):
            raise CacheShapeError(
                f"rope_positions of shape {tuple(rope_positions.shape)} does not match the cache view "
                f"{(self.batch_size, size)}"
            )
        index = self.write_index(n)
        out = {}
        for name in ("rope_pos", "row", "col"):
            values = self.meta[name][:, :size + n].clone()
            if name == "rope_pos" and rope_positions is not None:
                values[:, :size] = rope_positions.to(device=self.device, dtype=torch.long)
            mine = own[name].to(device=self.device, dtype=torch.long)
            if isinstance(index, slice):
                values[:, index] = mine
            else:
                values[index] = mine
            out[name] = values
        return out

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              index: tuple[torch.Tensor, torch.Tensor] | slice) -> None:
        """Write a chunk's keys/values ``[B, n, H, D]`` of ``layer`` into the provisional slot."""
        if keys.shape[0] != self.batch_size:
            raise CacheShapeError(
                f"a batch of {keys.shape[0]} samples does not match the cache's batch of {self.batch_size}"
            )
        if keys.shape[2:] != (self.num_heads, self.head_dim):
            raise CacheShapeError(
                f"keys of heads x dim {tuple(keys.shape[2:])} do not match the cache's "
                f"{(self.num_heads, self.head_dim)}"
            )
        if isinstance(index, slice):
            self.k[layer, :, index] = keys
            self.v[layer, :, index] = values
        else:
            batch_index, positions = index
            self.k[layer][batch_index, positions] = keys
            self.v[layer][batch_index, positions] = values

    def read(self, layer: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, max_length + num_tokens, H, D]`` (views) that the chunk attends to."""
        end = self.max_length + num_tokens
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, metadata: dict[str, torch.Tensor]) -> None:
        """Make the provisional tokens resident. ``metadata[name]`` is ``[B, n]`` for every metadata field."""
        missing = set(METADATA_FIELDS) - set(metadata)
        if missing:
            raise CacheShapeError(f"commit needs metadata fields {sorted(missing)}")
        n = metadata["frame"].shape[1]
        if metadata["frame"].shape[0] != self.batch_size:
            raise CacheShapeError(
                f"metadata for {metadata['frame'].shape[0]} samples does not match the cache's batch of "
                f"{self.batch_size}"
            )
        index = self.write_index(n)
        for name in METADATA_FIELDS:
            values = metadata[name].to(device=self.device, dtype=torch.long)
            if isinstance(index, slice):
                self.meta[name][:, index] = values
            else:
                self.meta[name][index] = values
        if isinstance(index, slice):
            self.pinned[:, index] = False
        else:
            self.pinned[index] = False
        self.lengths = [length + n for length in self.lengths]

    # ------------------------------------------------------------------------------- recipe operations
    def clear(self) -> None:
        """Forget every resident token (a recipe's restart, e.g. CausVid's long-video rollouts). The
        storage is kept for reuse."""
        self.lengths = [0] * self.batch_size
        self.pinned.zero_()

    def reencode_mask(self, num_tokens: int, frame_start: int, num_frames: int) -> torch.Tensor:
        """Bool ``[B, 1, 1, max_length + num_tokens]`` for a re-encoding pass over frames
        ``[frame_start, frame_start + num_frames)``: each sample sees its resident tokens of *other* frames
        and its own provisional slot (the re-encoded frames), not the stale K/V it is about to replace."""
        size = self.max_length
        positions = torch.arange(size + num_tokens, device=self.device).unsqueeze(0)
        lengths = torch.tensor(self.lengths, device=self.device).unsqueeze(1)
        frames = torch.full((self.batch_size, size + num_tokens), -1, dtype=torch.long, device=self.device)
        frames[:, :size] = self.meta["frame"][:, :size]
        stale = (frames >= frame_start) & (frames < frame_start + num_frames)
        resident = (positions < lengths) & ~stale
        own = (positions >= lengths) & (positions < lengths + num_tokens)
        return (resident | own)[:, None, None, :]

    def replace_frames(self, frame_start: int, num_frames: int, tokens_per_frame: int) -> int:
        """Give the resident tokens of frames ``[frame_start, frame_start + num_frames)`` the K/V just
        written to the provisional slot (laid out frame, row, column, ``tokens_per_frame`` per frame).

        Metadata is unchanged; nothing becomes resident. Returns the number of tokens replaced.
        """
        if tokens_per_frame % self.token_cols:
            raise CacheShapeError(
                f"tokens_per_frame={tokens_per_frame} is not a multiple of token_cols={self.token_cols}"
            )
        replaced = 0
        for b, length in enumerate(self.lengths):
            frames = self.meta["frame"][b, :length]
            index = ((frames >= frame_start) & (frames < frame_start + num_frames)).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            local = ((frames[index] - frame_start) * tokens_per_frame
                     + self.meta["row"][b, index] * self.token_cols + self.meta["col"][b, index])
            source = length + local
            self.k[:, b, index] = self.k[:, b, source]
            self.v[:, b, index] = self.v[:, b, source]
            replaced += int(index.numel())
        return replaced

    # --------------------------------------------------------------------------------------- policies
    def view(self) -> CacheView:
        """The resident tokens as ``[B, S]`` metadata views, ``S = max_length``."""
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
        )

    def compact(self, keep: torch.Tensor, pin: torch.Tensor | None = None) -> int:
        """Keep only the tokens where ``keep`` (bool ``[B, S]``, ``S = max_length``) is True.

        Survivors keep their frame order and move to the front of each sample's storage; no storage is
        reallocated. ``pin`` (bool ``[B, S]``) flags tokens as pinned (the flag stays set: a token once
        protected, e.g. a sink, is reported pinned for the rest of the rollout). Returns tokens removed.
        """
        size = self.max_length
        if keep.shape != (self.batch_size, size):
            raise CacheShapeError(
                f"keep mask of shape {tuple(keep.shape)} does not match the cache view {(self.batch_size, size)}"
            )
        keep = keep.to(self.device)
        if pin is not None:
            self.pinned[:, :size] |= pin.to(self.device)
        lengths = torch.tensor(self.lengths, device=self.device)
        valid = torch.arange(size, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        keep = keep & valid
        new_lengths = keep.sum(dim=1).tolist()
        removed = sum(self.lengths) - sum(new_lengths)
        if removed == 0:
            return 0
        # per sample: tokens before the first dropped one stay in place; the surviving tail moves left.
        # Survivors are taken in increasing position, which is frame order.
        for b in range(self.batch_size):
            if new_lengths[b] == self.lengths[b]:
                continue
            length = self.lengths[b]
            start = int((~keep[b, :length]).nonzero()[0])
            tail = keep[b, start:length].nonzero().squeeze(1) + start
            count = tail.shape[0]
            for layer in range(self.num_layers):  # per layer keeps the temporary copy small
                self.k[layer, b, start:start + count] = self.k[layer, b, tail]
                self.v[layer, b, start:start + count] = self.v[layer, b, tail]
            for name in METADATA_FIELDS:
                self.meta[name][b, start:start + count] = self.meta[name][b, tail]
            self.pinned[b, start:start + count] = self.pinned[b, tail]
        self.lengths = [int(n) for n in new_lengths]
        return int(removed)

    # --------------------------------------------------------------------------------------- helpers
    def check_consistent(self) -> None:
        """Raise :class:`CacheShapeError` if metadata and storage disagree (used by tests and debugging)."""
        for b, length in enumerate(self.lengths):
            if length > self.capacity:
                raise CacheShapeError(f"sample {b} holds {length} tokens but capacity is {self.capacity}")
            frames = self.meta["frame"][b, :length]
            if length > 1 and bool((frames[1:] < frames[:-1]).any()):
                raise CacheShapeError(f"sample {b}: resident tokens are not in frame order")


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
