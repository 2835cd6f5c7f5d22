"""``benchmarks/policy_speed.py --json`` on a small config: the list it prints and what its rows must say."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "policy_speed.py"


def test_the_benchmark_prints_one_object_per_policy(capsys):
    spec = importlib.util.spec_from_file_location("policy_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--latent", "6", "8", "--layers", "2", "--heads", "12", "--head-dim", "12", "--ffn-dim", "32",
                        "--chunks", "8", "--steps", "1000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    policies = [row["policy"] for row in rows]
    assert policies == ["full", "sliding-window:frames=18", "attention-sink:frames=3+sliding-window:frames=6",
                        "forcing-kv", "dummy-forcing"]
    for row in rows:
        assert {"policy", "seconds_per_chunk", "speedup_vs_full", "cache_mb"} <= set(row)
        assert row["seconds_per_chunk"] > 0 and row["setup"]["tokens_per_frame"] == 12
    by = {row["policy"]: row for row in rows}
    assert by["full"]["speedup_vs_full"] == 1.0
    # what each holds after 8 chunks (24 frames) per layer and head, 12 tokens per frame, 12 heads x 12 x 4 bytes x 2
    per_token = 12 * 12 * 4 * 2 / 1e6
    assert by["full"]["cache_mb"] == round(2 * 24 * 12 * per_token, 2)
    assert by["sliding-window:frames=18"]["cache_mb"] == round(2 * 18 * 12 * per_token, 2)
    # forcing-kv: layer 0 keeps 2 frames in every head; layer 1: 4 static heads 2 frames, 8 dynamic heads 3 frames
    assert by["forcing-kv"]["cache_mb"] == round((2 * 12 * 12 + (4 * 2 + 8 * 3) * 12) * 12 * 4 * 2 / 1e6, 2)
    assert by["dummy-forcing"]["cache_mb"] < by["attention-sink:frames=3+sliding-window:frames=6"]["cache_mb"]
