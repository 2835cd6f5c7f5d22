"""The tutorial's attention-scoring policy (examples/cachepolicy-example-policy/cachepolicy_attention_score.py):
its evictions are exact (the full-forward oracle with per-layer masks), each layer keeps its budget, and what a
layer keeps is the top of the score the policy accumulated from attention mass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from cachepolicy.adapters.wan.tiny import load_tiny_wan
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import build_policies
from cachepolicy.models import Sampler
from tests.oracle import Recorder, check_rollout_against_full_forward

PATH = Path(__file__).resolve().parents[1] / "examples" / "cachepolicy-example-policy" / "cachepolicy_attention_score.py"
spec = importlib.util.spec_from_file_location("cachepolicy_attention_score", PATH)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)


class Watch(module.AttentionScore):
    """Records, at each selection, the scores and what each layer holds before compaction."""

    name = "attention-score-watch"

    def new_state(self):
        return []

    @hookimpl
    def cachepolicy_select(self, session, view):
        selection = super().cachepolicy_select(session, view)
        self.state(session).append((session.chunk, view.columns[module.COLUMN].clone(), view.chunk.clone(),
                                    selection))
        return selection


def test_attention_score_keeps_the_top_scored_tokens_per_layer_and_is_exact(registry):
    adapter = load_tiny_wan(seed=4, num_layers=3)
    policy, recorder = Watch(budget=2, decay=0.5, stride=3), Recorder()
    sink = build_policies("attention-sink:frames=3", registry.policies)
    session = Session(adapter, [*sink, policy, recorder], RolloutConfig(
        num_chunks=5, prompts=["a red fox"], seeds=[0], sampler=Sampler(denoising_steps=(1000, 500), shift=3.0)))
    result = session.run()
    assert check_rollout_against_full_forward(adapter, result, session.policy_state[recorder.spec]) <= 1e-5
    tpf, frames = adapter.info.tokens_per_frame, adapter.info.frames_per_chunk
    # after the last selection: sink (3 frames) + budget (2 frames) + the new chunk (3 frames) per layer
    assert session.cache.head_lengths() == [[(3 + 2 + 3) * tpf] * 2] * 3
    assert session.cache.split  # layers chose different tokens
    for chunk, scores, chunks, selection in session.policy_state[policy.spec][2:]:
        older = (chunks[0] < chunk) & (chunks[0] >= 1)  # not the sink's chunk 0, not the new chunk
        for layer in range(3):
            dropped = selection.drop[layer, 0] & older
            kept = older & ~dropped
            assert int(kept.sum()) == 2 * tpf
            # every kept token scores at least as high as every dropped one
            assert float(scores[0, kept, layer].min()) >= float(scores[0, dropped, layer].max())
            assert float(scores[0, older, layer].sum()) > 0  # the attention mass was accumulated
