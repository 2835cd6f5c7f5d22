"""The example third-party distribution (examples/cachepolicy-example-policy) installs and works.

It is installed with pip into a fresh target directory (no virtual environment needed, no network:
``--no-deps --no-build-isolation --no-index`` with the setuptools already installed) and put on
``PYTHONPATH``: ``importlib.metadata`` finds its ``*.dist-info`` there, so its entry point in the
``cachepolicy`` group is discovered exactly as for an ordinary install. Then the CLI, in a subprocess,
must list it with its distribution and version, and a ``run`` must use it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cachepolicy-example-policy"
DISTRIBUTION = "cachepolicy-example-policy"
MODULE_FILE = EXAMPLE / "cachepolicy_example_policy.py"


def example_version() -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The example installed with pip into a fresh target directory; returns that directory."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: pip cannot build the example without build isolation")
    base = tmp_path_factory.mktemp("example-plugin")
    source = base / "src"
    # build from a copy, so that pip's in-tree build leaves nothing behind in the checkout
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = base / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(target.glob("cachepolicy_example_policy-*.dist-info")), sorted(p.name for p in target.iterdir())
    return target


def cli(target: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cachepolicy.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_plugins_json_lists_the_example(installed):
    result = cli(installed, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    mine = [r for r in records if r["name"] == "random-drop"]
    assert len(mine) == 1, records
    record = mine[0]
    assert record["kind"] == "policy"
    assert record["distribution"] == DISTRIBUTION
    assert record["version"] == example_version()
    assert record["hooks"] == ["cachepolicy_select"]
    assert record["error"] is None
    assert record["entry_point"] == "cachepolicy_example_policy"
    # the built-ins are still there, from their own distribution
    builtins = {r["name"] for r in records if r["distribution"] == "cachepolicy" and r["kind"] == "policy"}
    assert {"full", "sliding-window", "attention-sink"} <= builtins


def test_a_run_uses_the_example(installed, tmp_path):
    out = tmp_path / "run"
    result = cli(installed, "run", "tiny-wan", "--policy", "random-drop:fraction=0.2", "--chunks", "3",
                 "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["policies"] == [{"name": "random-drop", "spec": "random-drop:fraction=0.2,seed=0",
                                "params": {"fraction": 0.2, "seed": 0}}]
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    dropped = [r["dropped_tokens"]["random-drop:fraction=0.2,seed=0"] for r in trace]
    # tiny-wan: 16 tokens per frame, 48 per chunk. Chunk 0: nothing older. Chunk 1: 20% of chunk 0's 48.
    # Chunk 2: 20% of the 38 survivors of chunk 0 plus chunk 1's 48.
    assert dropped == [0, round(0.2 * 48), round(0.2 * (38 + 48))]
    assert [r["cache_tokens"] for r in trace] == [48, 96 - 10, 86 + 48 - 17]


def test_the_attention_score_example_is_found_and_runs_as_the_tutorial_says(installed, tmp_path):
    records = json.loads(cli(installed, "plugins", "--json").stdout)
    record = next(r for r in records if r["name"] == "attention-score")
    assert record["distribution"] == DISTRIBUTION and record["entry_point"] == "cachepolicy_attention_score"
    assert record["hooks"] == ["cachepolicy_layer", "cachepolicy_layer_request", "cachepolicy_select",
                               "cachepolicy_session_start"]
    out = tmp_path / "run"
    result = cli(installed, "run", "tiny-wan", "--policy", "attention-sink:frames=3+attention-score:budget=3",
                 "--chunks", "6", "--trace-residency", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    last = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()][-1]
    cells = last["residency"][0]["cells"]  # layers kept different tokens
    # every layer: the sink's 3 frames, 3 frames of budget and the new chunk, 16 tokens each
    for cell in cells:
        assert sum(16 if v == "all" else len(v) for v in cell["frames"].values()) == 9 * 16


def test_bad_parameters_are_refused(installed, tmp_path):
    result = cli(installed, "run", "tiny-wan", "--policy", "random-drop:fraction=2", "--chunks", "1",
                 "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert "fraction=2.0 is not allowed" in result.stderr
    assert not (tmp_path / "bad" / "run.json").exists()


# --------------------------------------------------------------------- the policy itself, in-process
@pytest.fixture(scope="module")
def example_module():
    spec = importlib.util.spec_from_file_location("cachepolicy_example_policy_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_has_a_docstring_and_the_discovery_hook(example_module):
    assert example_module.__doc__ and "random-drop" in example_module.__doc__
    assert example_module.cachepolicy_policies() == [example_module.RandomDrop]


def test_drops_are_deterministic_and_per_sample(example_module, tiny_wan):
    from cachepolicy.api import build_policies
    from cachepolicy.engine import RolloutConfig, Session

    def run(seeds, spec_seed=0, fraction=0.3):
        policy = example_module.RandomDrop(fraction=fraction, seed=spec_seed)
        sink = build_policies("attention-sink:frames=3")
        config = RolloutConfig(num_chunks=4, prompts=["a"] * len(seeds), seeds=seeds)
        session = Session(tiny_wan(), [*sink, policy], config)
        result = session.run()
        view = session.cache.view()
        kept = [(view.frame[b][view.valid[b]] * 16 + view.spatial_index[b][view.valid[b]]).tolist()
                for b in range(len(seeds))]
        return result, kept

    first, kept_a = run([0])
    again, kept_b = run([0])
    assert kept_a == kept_b and torch.equal(first.latents, again.latents)
    _, kept_other_seed = run([0], spec_seed=1)
    assert kept_other_seed != kept_a
    # the sink is never dropped, and the chunk just committed is never a candidate
    frames = [token // 16 for token in kept_a[0]]
    assert all(frames.count(f) == 16 for f in (0, 1, 2, 9, 10, 11))
    # a batch equals running each sample alone
    _, kept_batch = run([0, 5])
    _, kept_alone = run([5])
    assert kept_batch == [kept_a[0], kept_alone[0]]


def test_fraction_zero_drops_nothing(example_module, tiny_wan):
    from cachepolicy.engine import RolloutConfig, Session

    session = Session(tiny_wan(), [example_module.RandomDrop(fraction=0.0)],
                      RolloutConfig(num_chunks=3, prompts=["a"], seeds=[0]))
    result = session.run()
    assert [r["cache_tokens"] for r in result.trace] == [48, 96, 144]
