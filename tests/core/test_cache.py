"""KVCache: the per-layer entry point, commits, compaction per token / layer / head, edits, growth, and a state
machine over its invariants (a reference model of which (layer, head) holds which token)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachepolicy.cache import KVCache, metadata_for_chunk
from cachepolicy.errors import CacheShapeError, CompositionError, ParameterError
from cachepolicy.layers import ForwardCall, LayerEdit, LayerRequest, Merge
from cachepolicy.policy import Selection, compose

LAYERS, HEADS, DIM = 2, 2, 3


def token_value(frame: torch.Tensor, spatial: torch.Tensor, layer: int, head: int = 0) -> torch.Tensor:
    """A value that identifies a token: lets tests check tensors and metadata agree after compaction."""
    return (frame * 1000 + spatial + 0.25 * layer + 0.125 * head).float()


class PositionRotary:
    """A fake rotary embedding: ``tables`` encodes (frame, row, col); ``rotate`` adds it, so a test reads which
    positions a key was rotated to from its value."""

    def tables(self, frames, rows, cols):
        code = (frames * 100 + rows * 10 + cols).float().unsqueeze(-1).unsqueeze(-1)
        return code, torch.zeros_like(code)

    def rotate(self, x, cos, sin):
        return x + cos

    def shift_frames(self, x, delta):
        return x + 100 * delta.float()[..., None, None]


class Recorder:
    """The attention kernel of the tests: records what each call saw, returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, mask):
        self.calls.append({"query": query.clone(), "key": key.clone(), "value": value.clone(),
                           "mask": None if mask is None else mask.clone()})
        return torch.zeros_like(query)


def own_values(cache, meta, layer):
    """Keys ``[B, n, H, D]`` whose values identify (frame, spatial, layer, head)."""
    spatial = meta["row"] * cache.token_cols + meta["col"]
    heads = [token_value(meta["frame"], spatial, layer, head) for head in range(cache.num_heads)]
    return torch.stack(heads, dim=2)[..., None].expand(-1, -1, -1, cache.head_dim).contiguous()


def forward(cache, chunk, frames, rows, cols, *, commit=True, attention=None, **call):
    """Run every layer's :meth:`KVCache.attend` for one chunk (queries zero, keys/values identifying tokens)."""
    meta = metadata_for_chunk(cache.batch_size, chunk * frames, frames, rows, cols, chunk)
    n = meta["frame"].shape[1]
    tables = (torch.zeros(1, n, 1, 1), torch.zeros(1, n, 1, 1))
    attention = attention or Recorder()
    branches = range(cache.branches)
    for branch in branches:
        forward_call = ForwardCall(chunk=chunk, phase="context" if commit else "step", frame_start=chunk * frames,
                                   num_frames=frames, rope_start=chunk * frames, branch=branch, **call)
        with cache.forward(forward_call, rotary=PositionRotary(), own_tables=tables, own_positions=meta):
            for layer in range(cache.num_layers):
                keys = own_values(cache, meta, layer) + branch
                query = torch.zeros(cache.batch_size, n, cache.num_heads, cache.head_dim)
                cache.attend(layer, query, keys, -keys, attention=attention)
    if commit:
        cache.commit(meta)
    return attention


def stored(cache, layer, head, b, branch=0, name="k"):
    """``(table positions, values)`` of what (layer, head) holds for sample ``b``."""
    cell = next(c for c in cache.layer_cells(layer, branch) if head in c.heads)
    length = cell.residency.lengths[b]
    return cell.residency.slots[b, :length], getattr(cell, name)[b, :length, cell.heads.index(head), 0]


def check_values(cache, b):
    """Every (layer, head) holds exactly the values of the table tokens its slots name."""
    view = cache.view()
    for layer in range(cache.num_layers):
        for head in range(cache.num_heads):
            slots, values = stored(cache, layer, head, b)
            expected = token_value(view.frame[b, slots], view.spatial_index[b, slots], layer, head)
            assert torch.equal(values, expected), (layer, head)


def test_commit_then_compact_keeps_frame_order_and_values():
    cache = KVCache(LAYERS, 2, HEADS, DIM, token_cols=2)
    for chunk in range(3):
        forward(cache, chunk, frames=2, rows=1, cols=2)
    assert cache.lengths == [12, 12] and not cache.split
    view = cache.view()
    ids_before = (view.frame * 2 + view.spatial_index).clone()  # views alias the storage compaction moves
    keep = torch.ones_like(view.valid)
    keep[0, [0, 5, 6]] = False       # sample 0 loses three scattered tokens
    keep[1, 8:] = False              # sample 1 loses the last four
    assert cache.compact(keep) == 7
    assert cache.lengths == [9, 8]
    cache.check_consistent()
    view = cache.view()
    for b in range(2):
        assert torch.equal((view.frame * 2 + view.spatial_index)[b, :cache.lengths[b]], ids_before[b][keep[b]])
        check_values(cache, b)


def test_non_uniform_batch_writes_and_masks_per_sample():
    cache = KVCache(1, 2, 1, 1, token_cols=1)
    forward(cache, 0, frames=3, rows=1, cols=1)
    cache.compact(torch.tensor([[True, False, True], [True, True, True]]))
    assert cache.lengths == [2, 3] and not cache.uniform
    seen = forward(cache, 1, frames=2, rows=1, cols=1, commit=False)
    mask = seen.calls[0]["mask"]
    # sample 0: resident [0, 2) + own slot [2, 4); position 4 is stale. sample 1: resident [0, 3) + own [3, 5)
    assert mask[:, 0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    keys = seen.calls[0]["key"][:, :, 0, 0]
    assert keys[0, 2:4].tolist() == keys[1, 3:5].tolist() == [2000.0, 3000.0]  # own slot after each length


def test_visible_restricts_resident_keys_uniform_and_not():
    cache = KVCache(1, 2, 1, 1, token_cols=1)
    forward(cache, 0, frames=3, rows=1, cols=1)
    visible = torch.tensor([[True, False, True], [False, False, True]])
    mask = forward(cache, 1, 2, 1, 1, commit=False, visible=visible).calls[0]["mask"]
    assert mask[:, 0, 0].tolist() == [[True, False, True, True, True], [False, False, True, True, True]]
    cache.compact(torch.tensor([[True, False, True], [True, True, True]]))
    visible = torch.tensor([[False, True, True], [True, False, True]])
    mask = forward(cache, 1, 2, 1, 1, commit=False, visible=visible).calls[0]["mask"]
    # sample 0: resident [0, 2) (position 0 hidden), own [2, 4); sample 1: resident [0, 3), own [3, 5)
    assert mask[:, 0, 0].tolist() == [[False, True, True, True, False], [True, False, True, True, True]]
    with pytest.raises(CacheShapeError, match="visible of shape"):
        forward(cache, 1, 2, 1, 1, commit=False, visible=torch.ones(2, 2, dtype=torch.bool))


def test_raw_mode_rotates_resident_keys_at_their_positions_or_the_overrides():
    cache = KVCache(1, 2, 1, 1, token_cols=2, rope_mode="raw")
    assert cache.rope_mode == "raw" and KVCache(1, 1, 1, 1, token_cols=1).rope_mode == "absolute"
    forward(cache, 0, frames=1, rows=1, cols=2)  # frame 0: tokens (row 0, col 0), (row 0, col 1)
    forward(cache, 1, frames=1, rows=1, cols=2)  # frame 1
    cache.compact(torch.tensor([[True, True, True, True], [False, True, True, True]]))  # non-uniform
    stored_keys = [1000 * f + c for f, c in ((0, 0), (0, 1), (1, 0), (1, 1))]
    keys = forward(cache, 5, 1, 1, 2, commit=False).calls[0]["key"][:, :, 0, 0]
    # raw keys + the code of (rope_pos, row, col); own tokens at the call's positions (frame 5)
    expected0 = [k + 100 * (k // 1000) + k % 1000 for k in stored_keys] + [5000 + 500, 5001 + 501]
    assert keys[0].tolist() == expected0
    assert keys[1, :5].tolist() == expected0[1:]
    override = cache.view().rope_pos + 10
    keys = forward(cache, 5, 1, 1, 2, commit=False, rope_positions=override).calls[0]["key"][:, :, 0, 0]
    assert keys[0, :4].tolist() == [k + 100 * (k // 1000 + 10) + k % 1000 for k in stored_keys]
    with pytest.raises(CacheShapeError, match="rope_mode must be one of absolute, raw"):
        KVCache(1, 1, 1, 1, token_cols=1, rope_mode="relative")
    with pytest.raises(ParameterError, match="rope_mode='raw'"):
        forward(KVCache(1, 2, 1, 1, token_cols=2), 0, 1, 1, 2, commit=False,
                rope_positions=torch.zeros(2, 0, dtype=torch.long))


def test_growth_is_geometric_and_stops_under_a_window():
    cache = KVCache(1, 1, 1, 1, token_cols=4)
    for chunk in range(40):
        forward(cache, chunk, frames=3, rows=2, cols=4)
        view = cache.view()
        cache.compact(view.valid & (view.frame > (chunk + 1) * 3 - 1 - 6))
    assert cache.lengths == [6 * 8]
    assert cache.reallocations <= 4
    capacity, reallocations = cache.capacity, cache.reallocations
    for chunk in range(40, 80):
        forward(cache, chunk, frames=3, rows=2, cols=4)
        view = cache.view()
        cache.compact(view.valid & (view.frame > (chunk + 1) * 3 - 1 - 6))
    assert cache.capacity == capacity and cache.reallocations == reallocations


def test_reserve_sizes_every_buffer_up_front():
    cache = KVCache(2, 1, 1, 1, token_cols=4)
    cache.reserve(24, total=9 * 8 + 24)
    sizes = (cache.capacity, [c.k.shape[1] for c in cache.cells])
    for chunk in range(20):
        forward(cache, chunk, frames=3, rows=2, cols=4)
        view = cache.view()
        cache.compact(view.valid & (view.frame > (chunk + 1) * 3 - 1 - 9))
    assert cache.reallocations == 0 and (cache.capacity, [c.k.shape[1] for c in cache.cells]) == sizes


def test_shape_errors_name_the_mismatch():
    cache = KVCache(1, 2, 2, 3, token_cols=1)
    call = ForwardCall(chunk=0, phase="step", frame_start=0, num_frames=1, rope_start=0)
    meta = metadata_for_chunk(2, 0, 1, 1, 1, 0)
    tables = (torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    with cache.forward(call, rotary=PositionRotary(), own_tables=tables, own_positions=meta):
        with pytest.raises(CacheShapeError, match="a batch of 3 samples does not match the cache's batch of 2"):
            cache.attend(0, *[torch.zeros(3, 1, 2, 3)] * 3, attention=Recorder())
        with pytest.raises(CacheShapeError, match="heads x dim"):
            cache.attend(0, *[torch.zeros(2, 1, 4, 3)] * 3, attention=Recorder())
    with pytest.raises(CacheShapeError, match="outside a forward|inside an adapter forward"):
        cache.attend(0, *[torch.zeros(2, 1, 2, 3)] * 3, attention=Recorder())
    with pytest.raises(CacheShapeError, match="keep mask of shape"):
        cache.compact(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(CacheShapeError, match="positive integer"):
        KVCache(0, 1, 1, 1, token_cols=1)
    with pytest.raises(ParameterError, match="phase='denoise' is not allowed; choose one of step, context"):
        ForwardCall(chunk=0, phase="denoise", frame_start=0, num_frames=1, rope_start=0)


# ------------------------------------------------------------------------------- layers and heads
def test_per_layer_keep_gives_layers_their_own_tokens_and_prunes_the_table():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=2)
    for chunk in range(2):
        forward(cache, chunk, frames=1, rows=1, cols=2)
    keep = torch.tensor([[[True, False, True, True]], [[True, True, False, True]]])  # [L, B, S]
    cache.compact(keep)
    assert cache.split and cache.lengths == [4]  # every token is still held by some layer
    check_values(cache, 0)
    assert torch.equal(cache.held()[:, 0, 0], keep[:, 0])
    # a token that no layer holds leaves the table; slots are renumbered
    cache.compact(torch.tensor([[[True, True, True, False]], [[True, True, True, False]]]))
    assert cache.lengths == [3]
    cache.check_consistent()
    check_values(cache, 0)
    assert [stored(cache, layer, 0, 0)[0].tolist() for layer in range(LAYERS)] == [[0, 2], [0, 1]]
    assert stored(cache, 0, 0, 0)[1].tolist() == [0.0, 1000.0]  # layer 0: frame 0 col 0, frame 1 col 0


def test_per_head_keep_splits_a_layer_and_attention_reads_only_what_each_head_holds():
    cache = KVCache(1, 1, 4, 1, token_cols=1)
    for chunk in range(6):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    keep = torch.ones(1, 4, 1, 6, dtype=torch.bool)
    keep[0, [1, 3], 0, :5] = False  # heads 1 and 3 keep only the newest frame
    reallocations = cache.reallocations
    cache.compact(keep)
    assert [c.heads for c in cache.layer_cells(0)] == [(0, 2), (1, 3)]
    assert cache.head_lengths() == [[6, 1, 6, 1]] and cache.reallocations > reallocations
    check_values(cache, 0)
    seen = forward(cache, 6, 1, 1, 1, commit=False)
    # one attention call per head group, each over only its own tokens (+ the call's one)
    assert [tuple(c["key"].shape) for c in seen.calls] == [(1, 7, 2, 1), (1, 2, 2, 1)]
    assert seen.calls[1]["key"][0, :, :, 0].tolist() == [[5000.125, 5000.375], [6000.125, 6000.375]]
    forward(cache, 6, 1, 1, 1)
    assert cache.head_lengths() == [[7, 2, 7, 2]]
    check_values(cache, 0)


def test_guidance_branches_share_every_edit():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=1, branches=2)
    for chunk in range(4):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    keep = torch.ones(LAYERS, HEADS, 1, 4, dtype=torch.bool)
    keep[1, 0, 0, 1] = False
    cache.compact(keep)
    for layer in range(LAYERS):
        for head in range(HEADS):
            slots0, values0 = stored(cache, layer, head, 0, branch=0)
            slots1, values1 = stored(cache, layer, head, 0, branch=1)
            assert torch.equal(slots0, slots1) and torch.equal(values0 + 1, values1)


def test_policy_columns_move_with_their_tokens():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=1)
    cache.add_column("count", fill=7)
    cache.add_column("score", shape=(LAYERS,), dtype=torch.float32, fill=0.5)
    for chunk in range(4):
        forward(cache, chunk, frames=1, rows=1, cols=1)
        cache.column("count")[0, -1] = chunk
    assert cache.view().columns["count"].tolist() == [[0, 1, 2, 3]]
    cache.compact(torch.tensor([[False, True, False, True]]))
    assert cache.view().columns["count"].tolist() == [[1, 3]]
    assert cache.view().columns["score"].shape == (1, 2, LAYERS)
    forward(cache, 4, frames=1, rows=1, cols=1)
    assert cache.view().columns["count"].tolist() == [[1, 3, 7]]
    with pytest.raises(ParameterError, match="cache column 'count' exists with shape"):
        cache.add_column("count", shape=(2,))
    with pytest.raises(ParameterError, match="no cache column 'missing'"):
        cache.column("missing")


def test_merge_rewrites_targets_and_drops_sources():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=1)
    for chunk in range(4):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    merge = Merge(target=torch.tensor([[1]]), sources=torch.tensor([[[1, 2]]]),
                  weights=torch.tensor([[[0.25, 0.75]]]))
    cache.merge(merge, layers=[1])
    assert cache.lengths == [4] and cache.head_lengths() == [[4, 4], [3, 3]]
    slots, values = stored(cache, 1, 1, 0)
    assert slots.tolist() == [0, 1, 3]
    assert values.tolist() == [0.375, 0.25 * 1000.375 + 0.75 * 2000.375, 3000.375]
    assert stored(cache, 0, 1, 0)[1].tolist() == [0.125, 1000.125, 2000.125, 3000.125]
    cache.merge(Merge(target=torch.tensor([[0]]), sources=torch.tensor([[[0, 2]]]),
                      weights=torch.tensor([[[0.5, 0.5]]])))
    assert cache.lengths == [3]  # token 2 left every layer
    cache.check_consistent()
    with pytest.raises(ParameterError, match="Merge needs target"):
        Merge(target=torch.tensor([0]), sources=torch.tensor([[0]]), weights=torch.tensor([[1.0]]))


def test_flush_keeps_the_given_tokens_and_marks_the_context_stale():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=1)
    for chunk in range(5):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    epoch = cache.epoch
    assert cache.flush(torch.tensor([[True, False, False, True, True]])) == 2
    assert cache.view().frame.tolist() == [[0, 3, 4]] and cache.epoch == epoch + 1
    check_values(cache, 0)


def test_shift_frames_moves_absolute_keys_and_their_positions():
    cache = KVCache(1, 1, 1, 1, token_cols=1)
    cache.rotary = PositionRotary()
    for chunk in range(3):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    cache.shift_frames(torch.tensor([[5, 0, -1]]))
    assert cache.view().rope_pos.tolist() == [[5, 1, 1]]
    assert stored(cache, 0, 0, 0)[1].tolist() == [500.0, 1000.0, 1900.0]


def test_layer_edits_apply_before_the_layer_attends_and_protect_beats_drop():
    cache = KVCache(LAYERS, 1, HEADS, DIM, token_cols=1)
    for chunk in range(4):
        forward(cache, chunk, frames=1, rows=1, cols=1)
    cache.compact(torch.ones(1, 4, dtype=torch.bool), pin=torch.tensor([[True, False, False, False]]))
    seen_layers = []

    def observe(context):
        seen_layers.append(context.index)
        assert context.view.size == 4 and context.cells[0].keys.shape[1] == 4
        drop = torch.zeros(HEADS, 1, 4, dtype=torch.bool)
        drop[1, 0, :3] = True  # head 1 drops frames 0..2; frame 0 is pinned
        return [("a", LayerEdit(drop=drop)), ("b", LayerEdit(protect=torch.tensor([[False, True, False, False]])))]

    with cache.observing(observe, LayerRequest(layers=[1]).wants):
        seen = forward(cache, 4, 1, 1, 1, commit=False)
    assert seen_layers == [1]
    assert [tuple(c["key"].shape) for c in seen.calls] == [(1, 5, HEADS, DIM), (1, 5, 1, DIM), (1, 4, 1, DIM)]
    assert cache.head_lengths() == [[4, 4], [4, 3]]
    with cache.observing(lambda context: [("bad", "not an edit")]):
        with pytest.raises(CompositionError, match="policy bad returned str from cachepolicy_layer"):
            forward(cache, 4, 1, 1, 1, commit=False)


class CacheMachine(RuleBasedStateMachine):
    """Random commits, sink+window selections, unpinned prunes and per-layer / per-head drops, against a
    reference model of the tokens each (layer, head) holds.

    Invariants: sinks are never evicted; the table is the union of what the layers and heads hold, in frame
    order; every stored key is the key of the table token its slot names; per-head groups hold their tokens;
    residency stays bounded by (sink + window) frames.
    """

    @initialize(batch=st.integers(1, 3), rows=st.integers(1, 2), cols=st.integers(1, 3),
                frames=st.integers(1, 3), sink=st.integers(0, 4), extra=st.integers(0, 6),
                branches=st.integers(1, 2))
    def setup(self, batch, rows, cols, frames, sink, extra, branches):
        self.rows, self.cols, self.frames = rows, cols, frames
        self.sink, self.window = sink, frames + extra
        self.cache = KVCache(LAYERS, batch, HEADS, DIM, token_cols=cols, branches=branches)
        self.chunk = 0
        # per (layer, head, sample): the token ids it holds
        self.expected = {(l, h, b): set() for l in range(LAYERS) for h in range(HEADS) for b in range(batch)}

    @property
    def tpf(self) -> int:
        return self.rows * self.cols

    def ids(self, view) -> torch.Tensor:
        return view.frame * self.tpf + view.spatial_index

    @rule()
    def commit_and_select(self):
        forward(self.cache, self.chunk, self.frames, self.rows, self.cols)
        new_ids = set(range(self.chunk * self.frames * self.tpf, (self.chunk + 1) * self.frames * self.tpf))
        for key in self.expected:
            self.expected[key] |= new_ids
        view = self.cache.view()
        newest = (self.chunk + 1) * self.frames - 1
        selections = {
            "sink": Selection(protect=view.valid & (view.frame < self.sink)),
            "window": Selection(drop=view.valid & (view.frame <= newest - self.window)),
        }
        resolution = compose(selections, view.valid)
        self.cache.compact(resolution.keep, pin=resolution.protected)
        for key, ids in self.expected.items():
            self.expected[key] = {i for i in ids if i // self.tpf < self.sink or i // self.tpf > newest - self.window}
        self.chunk += 1

    @precondition(lambda self: self.cache.max_length > 0)
    @rule(data=st.data())
    def prune_unpinned(self, data):
        """A TokenTrim-like hard prune of random unpinned tokens in one sample, from every layer and head."""
        view = self.cache.view()
        b = data.draw(st.integers(0, self.cache.batch_size - 1))
        chosen = data.draw(st.lists(st.integers(0, view.size - 1), max_size=4))
        drop = torch.zeros_like(view.valid)
        drop[b, chosen] = True
        drop &= view.valid & ~view.pinned
        ids = set(self.ids(view)[b][drop[b]].tolist())
        self.cache.compact(view.valid & ~drop)
        for (layer, head, sample), held in self.expected.items():
            if sample == b:
                held -= ids

    @precondition(lambda self: self.cache.max_length > 0)
    @rule(data=st.data(), per_head=st.booleans())
    def drop_in_some_layers_or_heads(self, data, per_head):
        """A Deep-Forcing- or Dummy-Forcing-like drop of unpinned tokens in chosen layers or heads."""
        view = self.cache.view()
        shape = (LAYERS, HEADS) if per_head else (LAYERS,)
        drop = torch.zeros(*shape, *view.valid.shape, dtype=torch.bool)
        for index in data.draw(st.lists(st.tuples(*[st.integers(0, n - 1) for n in shape],
                                                   st.integers(0, view.batch_size - 1),
                                                   st.integers(0, view.size - 1)), max_size=8)):
            drop[index] = True
        drop &= view.valid & ~view.pinned
        ids = self.ids(view)
        before = {key: set(held) for key, held in self.expected.items()}
        self.cache.compact(~drop & view.valid)
        for (layer, head, b), held in self.expected.items():
            mask = drop[layer, head, b] if per_head else drop[layer, b]
            held -= set(ids[b][mask].tolist())
        assert all(self.expected[key] <= before[key] for key in before)

    @invariant()
    def matches_reference(self):
        if not hasattr(self, "cache"):
            return
        cache = self.cache
        cache.check_consistent()
        view = cache.view()
        ids = self.ids(view)
        for b in range(cache.batch_size):
            table = ids[b, :cache.lengths[b]].tolist()
            assert table == sorted(table), "the table must stay in frame order"
            union = set().union(*(held for (l, h, s), held in self.expected.items() if s == b))
            assert set(table) == union
            sink_ids = {i for i in union if i // self.tpf < self.sink}
            assert len(table) <= (self.sink + self.window) * self.tpf
            for layer in range(LAYERS):
                for head in range(HEADS):
                    for branch in range(cache.branches):
                        slots, values = stored(cache, layer, head, b, branch)
                        held = ids[b, slots].tolist()
                        assert set(held) == self.expected[(layer, head, b)]
                        assert sink_ids <= set(held) or not sink_ids, "a sink token was evicted"
                        expected = token_value(view.frame[b, slots], view.spatial_index[b, slots], layer, head)
                        assert torch.equal(values, expected + branch)
            pinned = view.pinned[b, :cache.lengths[b]]
            assert torch.equal(pinned, view.frame[b, :cache.lengths[b]] < self.sink)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = __import__("hypothesis").settings(max_examples=60, stateful_step_count=15,
                                                                deadline=None)
