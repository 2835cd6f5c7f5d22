"""Executors: the Ray executor on a local CPU instance streams results into the same results file."""

from __future__ import annotations

import json

import pytest

from cachepolicy.compare import CompareConfig, ResultsStore, run_compare
from cachepolicy.errors import CompareConfigError
from cachepolicy.executors import LocalExecutor, make_executor


def test_unknown_executor():
    with pytest.raises(CompareConfigError, match="unknown executor 'slurm'; choose 'local' or 'ray'"):
        make_executor("slurm")


def test_ray_executor_matches_local(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cachepolicy[ray]')")
    config = CompareConfig(model="tiny-wan", policies=["full", "sliding-window:frames=3"], prompts=["a red square"],
                           seeds=[0, 1], num_chunks=3, metrics=["latent-drift", "cache-tokens"])
    local = run_compare(config, tmp_path / "local", executor=LocalExecutor())
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        remote = run_compare(config, tmp_path / "ray", executor=make_executor("ray"))
    finally:
        ray.shutdown()
    records = ResultsStore(tmp_path / "ray" / "results.jsonl").load()
    assert len(records) == 4
    assert json.dumps(remote["policies"], sort_keys=True) == json.dumps(local["policies"], sort_keys=True)
