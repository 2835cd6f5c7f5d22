"""Where TokenTrim's unstable set lands with ``summary_at=first_step`` against ``final``, on the drift lab.

One command::

    python benchmarks/tokentrim_summary_at.py            # table
    python benchmarks/tokentrim_summary_at.py --json     # machine-readable

The drift lab (its shipped weights and sampler: 24 steps, fresh noise, guidance 2) generates ``--chunks``
chunks for each of ``--seeds`` seeds (random prompts of its vocabulary) with the full cache and no policy
acting. An observe-only policy reads, at every chunk ``t >= 1``, the x0-prediction after the first
denoising step and the final x0, and compares each with the committed previous chunk exactly as TokenTrim
does (``latent_summary`` of ``token_grid``, ``token_drift``, ``unstable_set`` with the default ``p``):

* ``overlap``: ``|S_first & S_final| / k``, the share of the unstable set that is the same in both modes;
* ``offset share``: the share of ``S_first`` that lies among the ``k`` tokens where the first-step summary
  differs most from the final one (``||Z_first - Z_final||``): positions picked because the first-step
  prediction is not yet the final latent, not because the chunk drifted from its predecessor;
* ``severity ratio``: ``D_first / D_final`` (the size of the offset that the trigger's ``mu`` absorbs).

A chance level is printed: the overlap two random sets of ``k`` out of ``N`` tokens have (``k / N``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import ClassVar

import attrs
import numpy as np
import torch

from cachepolicy.api import load_model
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.hookspecs import hookimpl
from cachepolicy.plugins.tokentrim import latent_summary, token_drift, unstable_count, unstable_set, severity
from cachepolicy.policy import Policy


@attrs.frozen
class SummaryProbe(Policy):
    """Observe-only: TokenTrim's set and severity from the first-step x0 and from the final x0, per chunk."""

    name: ClassVar[str] = "summary-probe"
    p: float = 0.1

    def new_state(self):
        return {"first": None, "previous": None, "rows": []}

    def _summary(self, session, latent):
        return latent_summary(session.adapter.token_grid(latent.to(session.cache.device)))

    @hookimpl
    def cachepolicy_after_step(self, session, step):
        if step.step == 0:
            self.state(session)["first"] = self._summary(session, step.x0)

    @hookimpl
    def cachepolicy_candidate_ready(self, session, candidate):
        state = self.state(session)
        if state["previous"] is None:
            return None
        final = self._summary(session, candidate.x0)
        first = state["first"]
        drift_first = token_drift(first, state["previous"])
        drift_final = token_drift(final, state["previous"])
        set_first, set_final = unstable_set(drift_first, self.p), unstable_set(drift_final, self.p)
        offset_set = unstable_set(token_drift(first, final), self.p)
        k = set_first.shape[-1]
        for b in range(first.shape[0]):
            a, f, o = set(set_first[b].tolist()), set(set_final[b].tolist()), set(offset_set[b].tolist())
            state["rows"].append({
                "chunk": candidate.chunk, "sample": b, "overlap": len(a & f) / k, "offset_share": len(a & o) / k,
                "severity_ratio": float(severity(drift_first, set_first)[b] / severity(drift_final, set_final)[b]),
            })
        return None

    @hookimpl
    def cachepolicy_chunk_end(self, session, chunk):
        state = self.state(session)
        state["previous"] = self._summary(session, session.latents[-1])
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from cachepolicy.lab.scenes import sample_prompt

    adapter = load_model("drift-lab")
    seeds = list(range(args.seeds))
    prompts = [sample_prompt(np.random.default_rng(s), adapter.lab_config.scene) for s in seeds]
    probe = SummaryProbe(p=args.p)
    session = Session(adapter, [probe], RolloutConfig(num_chunks=args.chunks, prompts=prompts, seeds=seeds))
    session.run()
    rows = probe.state(session)["rows"]
    n = adapter.info.tokens_per_frame
    k = unstable_count(args.p, n)
    result = {
        "model": "drift-lab", "seeds": args.seeds, "chunks": args.chunks, "p": args.p, "tokens_per_frame": n, "k": k,
        "chance_overlap": k / n, "decisions": len(rows),
        **{f"{key}_mean": statistics.fmean(r[key] for r in rows) for key in ("overlap", "offset_share",
                                                                             "severity_ratio")},
        **{f"{key}_median": statistics.median(r[key] for r in rows) for key in ("overlap", "offset_share",
                                                                                 "severity_ratio")},
    }
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print(f"drift lab, {args.seeds} seeds x {args.chunks} chunks, p={args.p}: k={k} of N={n} tokens, "
          f"{len(rows)} decisions (chunks >= 1)")
    print(f"  S_first vs S_final overlap: mean {result['overlap_mean']:.2f}, median {result['overlap_median']:.2f} "
          f"(chance {k / n:.2f})")
    print(f"  share of S_first among the k tokens of largest first-step offset: mean {result['offset_share_mean']:.2f}")
    print(f"  severity ratio D_first / D_final: mean {result['severity_ratio_mean']:.2f}, "
          f"median {result['severity_ratio_median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
