"""KVCache: writes, commits, compaction in frame order, growth, and a state machine over its invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.errors import CacheShapeError
from cachepolicy.policy import Selection, compose

LAYERS, HEADS, DIM = 2, 2, 3


def token_value(frame: torch.Tensor, spatial: torch.Tensor, layer: int) -> torch.Tensor:
    """A value that identifies a token: lets tests check tensors and metadata agree after compaction."""
    return (frame * 1000 + spatial + 0.25 * layer).float()


def commit_chunk(cache: KVCache, chunk: int, frames: int, rows: int, cols: int) -> None:
    meta = metadata_for_chunk(cache.batch_size, chunk * frames, frames, rows, cols, chunk)
    n = meta["frame"].shape[1]
    cache.reserve(n)
    index = cache.write_index(n)
    spatial = meta["row"] * cols + meta["col"]
    for layer in range(cache.num_layers):
        value = token_value(meta["frame"], spatial, layer)[:, :, None, None].expand(-1, -1, cache.num_heads, cache.head_dim)
        cache.write(layer, value, -value, index)
    cache.commit(meta)


def test_commit_then_compact_keeps_frame_order_and_values():
    cache = KVCache(LAYERS, 2, HEADS, DIM, token_cols=2)
    for chunk in range(3):
        commit_chunk(cache, chunk, frames=2, rows=1, cols=2)
    assert cache.lengths == [12, 12]
    view = cache.view()
    ids_before = (view.frame * 2 + view.spatial_index).clone()  # views alias the storage compaction moves
    keep = torch.ones_like(view.valid)
    keep[0, [0, 5, 6]] = False       # sample 0 loses three scattered tokens
    keep[1, 8:] = False              # sample 1 loses the last four
    removed = cache.compact(keep)
    assert removed == 7
    assert cache.lengths == [9, 8]
    cache.check_consistent()
    for b in range(2):
        length = cache.lengths[b]
        frames = cache.meta["frame"][b, :length]
        spatial = cache.meta["row"][b, :length] * 2 + cache.meta["col"][b, :length]
        assert torch.equal(frames * 2 + spatial, ids_before[b][keep[b]])  # survivors, in order
        for layer in range(LAYERS):
            assert torch.equal(cache.k[layer, b, :length, 0, 0], token_value(frames, spatial, layer))
            assert torch.equal(cache.v[layer, b, :length, 0, 0], -token_value(frames, spatial, layer))


def test_non_uniform_batch_writes_and_masks_per_sample():
    cache = KVCache(1, 2, 1, 1, token_cols=1)
    commit_chunk(cache, 0, frames=3, rows=1, cols=1)
    cache.compact(torch.tensor([[True, False, True], [True, True, True]]))
    assert cache.lengths == [2, 3] and not cache.uniform
    mask = cache.key_mask(2)
    # sample 0: resident [0, 2) + own slot [2, 4); position 4 is stale. sample 1: resident [0, 3) + own [3, 5)
    assert mask[:, 0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    batch_index, positions = cache.write_index(2)
    assert positions.tolist() == [[2, 3], [3, 4]]


def test_visible_restricts_resident_keys_uniform_and_not():
    cache = KVCache(1, 2, 1, 1, token_cols=1)
    commit_chunk(cache, 0, frames=3, rows=1, cols=1)
    visible = torch.tensor([[True, False, True], [False, False, True]])
    mask = cache.key_mask(2, visible)
    assert mask[:, 0, 0].tolist() == [[True, False, True, True, True], [False, False, True, True, True]]
    cache.compact(torch.tensor([[True, False, True], [True, True, True]]))
    mask = cache.key_mask(2, torch.tensor([[False, True, True], [True, False, True]]))
    # sample 0: resident [0, 2) (position 0 hidden), own [2, 4); sample 1: resident [0, 3), own [3, 5)
    assert mask[:, 0, 0].tolist() == [[False, True, True, True, False], [True, False, True, True, True]]
    with pytest.raises(CacheShapeError, match="visible mask of shape"):
        cache.key_mask(2, torch.ones(2, 2, dtype=torch.bool))


def test_key_positions_take_resident_metadata_overrides_and_the_own_slot():
    cache = KVCache(1, 2, 1, 1, token_cols=2, rope_mode="raw")
    assert cache.rope_mode == "raw" and KVCache(1, 1, 1, 1, token_cols=1).rope_mode == "absolute"
    commit_chunk(cache, 0, frames=1, rows=1, cols=2)  # frame 0: tokens (row 0, col 0), (row 0, col 1)
    commit_chunk(cache, 1, frames=1, rows=1, cols=2)  # frame 1
    cache.compact(torch.tensor([[True, True, True, True], [False, True, True, True]]))  # non-uniform
    own = metadata_for_chunk(2, 5, 1, 1, 2, 0)
    cache.reserve(2)
    override = cache.view().rope_pos + 10
    pos = cache.key_positions(own, override)
    assert pos["rope_pos"][0].tolist() == [10, 10, 11, 11, 5, 5]
    assert pos["rope_pos"][1, :5].tolist() == [10, 11, 11, 5, 5]  # own slot right after its 3 tokens
    assert pos["col"][1, :5].tolist() == [1, 0, 1, 0, 1]
    assert cache.key_positions(own)["rope_pos"][0].tolist() == [0, 0, 1, 1, 5, 5]
    with pytest.raises(CacheShapeError, match="rope_mode must be one of absolute, raw"):
        KVCache(1, 1, 1, 1, token_cols=1, rope_mode="relative")


def test_growth_is_geometric_and_stops_under_a_window():
    cache = KVCache(1, 1, 1, 1, token_cols=4)
    for chunk in range(40):
        commit_chunk(cache, chunk, frames=3, rows=2, cols=4)
        view = cache.view()
        newest = (chunk + 1) * 3 - 1
        cache.compact(view.valid & (view.frame > newest - 6))
    assert cache.lengths == [6 * 8]
    assert cache.reallocations <= 3
    capacity = cache.capacity
    for chunk in range(40, 80):
        commit_chunk(cache, chunk, frames=3, rows=2, cols=4)
        view = cache.view()
        cache.compact(view.valid & (view.frame > (chunk + 1) * 3 - 1 - 6))
    assert cache.capacity == capacity


def test_shape_errors_name_the_mismatch():
    cache = KVCache(1, 2, 2, 3, token_cols=1)
    with pytest.raises(CacheShapeError, match="a batch of 3 samples does not match the cache's batch of 2"):
        cache.write(0, torch.zeros(3, 1, 2, 3), torch.zeros(3, 1, 2, 3), cache.write_index(1))
    with pytest.raises(CacheShapeError, match="heads x dim"):
        cache.write(0, torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 3), cache.write_index(1))
    with pytest.raises(CacheShapeError, match="keep mask of shape"):
        cache.compact(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(CacheShapeError, match="positive integer"):
        KVCache(0, 1, 1, 1, token_cols=1)


class CacheMachine(RuleBasedStateMachine):
    """Random commits, sink+window selections and unpinned prunes against a reference set model.

    Invariants: sinks are never evicted; the newest ``window`` frames are kept except tokens explicitly
    pruned; residents are a subset of what was committed, in frame order; metadata matches tensors;
    residency stays bounded by (sink + window) frames.
    """

    @initialize(batch=st.integers(1, 3), rows=st.integers(1, 2), cols=st.integers(1, 3),
                frames=st.integers(1, 3), sink=st.integers(0, 4), extra=st.integers(0, 6))
    def setup(self, batch, rows, cols, frames, sink, extra):
        self.rows, self.cols, self.frames = rows, cols, frames
        self.sink, self.window = sink, frames + extra
        self.cache = KVCache(LAYERS, batch, HEADS, DIM, token_cols=cols)
        self.chunk = 0
        self.seen: list[set[int]] = [set() for _ in range(batch)]
        self.expected: list[set[int]] = [set() for _ in range(batch)]
        self.pruned: list[set[int]] = [set() for _ in range(batch)]

    @property
    def tpf(self) -> int:
        return self.rows * self.cols

    def ids(self, b: int) -> list[int]:
        length = self.cache.lengths[b]
        meta = self.cache.meta
        return (meta["frame"][b, :length] * self.tpf + meta["row"][b, :length] * self.cols
                + meta["col"][b, :length]).tolist()

    @rule()
    def commit_and_select(self):
        commit_chunk(self.cache, self.chunk, self.frames, self.rows, self.cols)
        new_ids = set(range(self.chunk * self.frames * self.tpf, (self.chunk + 1) * self.frames * self.tpf))
        for b in range(self.cache.batch_size):
            self.seen[b] |= new_ids
            self.expected[b] |= new_ids
        view = self.cache.view()
        newest = (self.chunk + 1) * self.frames - 1
        selections = {
            "sink": Selection(protect=view.valid & (view.frame < self.sink)),
            "window": Selection(drop=view.valid & (view.frame <= newest - self.window)),
        }
        resolution = compose(selections, view.valid)
        self.cache.compact(resolution.keep, pin=resolution.protected)
        for b in range(self.cache.batch_size):
            self.expected[b] = {i for i in self.expected[b]
                                if i // self.tpf < self.sink or i // self.tpf > newest - self.window}
        self.chunk += 1

    @precondition(lambda self: self.cache.max_length > 0)
    @rule(data=st.data())
    def prune_unpinned(self, data):
        """A TokenTrim-like hard prune of random unpinned tokens in one sample."""
        view = self.cache.view()
        b = data.draw(st.integers(0, self.cache.batch_size - 1))
        chosen = data.draw(st.lists(st.integers(0, view.size - 1), max_size=4))
        drop = torch.zeros_like(view.valid)
        drop[b, chosen] = True
        drop &= view.valid & ~view.pinned
        ids = (view.frame * self.tpf + view.spatial_index)[b][drop[b]].tolist()
        self.cache.compact(view.valid & ~drop)
        self.expected[b] -= set(ids)
        self.pruned[b] |= set(ids)

    @invariant()
    def matches_reference(self):
        if not hasattr(self, "cache"):
            return
        self.cache.check_consistent()
        for b in range(self.cache.batch_size):
            ids = self.ids(b)
            assert ids == sorted(ids), "residents must stay in frame order"
            assert set(ids) == self.expected[b]
            assert set(ids) <= self.seen[b]
            sink_ids = {i for i in self.seen[b] if i // self.tpf < self.sink}
            assert sink_ids <= set(ids), "a sink token was evicted"
            if self.chunk:
                newest = self.chunk * self.frames - 1
                recent = {i for i in self.seen[b] if i // self.tpf > newest - self.window} - self.pruned[b]
                assert recent <= set(ids), "a token of the newest window frames was evicted"
            assert len(ids) <= (self.sink + self.window) * self.tpf
            length = self.cache.lengths[b]
            meta = self.cache.meta
            spatial = meta["row"][b, :length] * self.cols + meta["col"][b, :length]
            for layer in range(LAYERS):
                assert torch.equal(self.cache.k[layer, b, :length, 0, 0],
                                   token_value(meta["frame"][b, :length], spatial, layer))
            pinned = self.cache.pinned[b, :length]
            assert torch.equal(pinned, meta["frame"][b, :length] < self.sink)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = __import__("hypothesis").settings(max_examples=80, stateful_step_count=15,
                                                                deadline=None)
