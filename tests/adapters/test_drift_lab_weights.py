"""The drift-lab weights shipped in the package: they load by name, and a short rollout draws the scene."""

from __future__ import annotations

import json


from cachepolicy.compare import CompareConfig, run_compare

PROMPTS = ["a white disc bouncing slowly over a teal-to-purple gradient",
           "a red triangle bouncing slowly over a gray-to-purple gradient",
           "a white disc and a magenta triangle bouncing fast over a black-to-purple gradient"]


def test_shipped_weights_load_by_name_with_their_training_record(registry):
    from cachepolicy.adapters.wan.drift_lab import packaged_weights

    adapter = registry.model("drift-lab").load()
    record = json.loads((packaged_weights() / "train.json").read_text())
    assert record["steps_done"] > 0 and "cachepolicy.lab.train" in record["command"]
    assert adapter.info.frames_per_chunk == 3 and adapter.info.tokens_per_frame == 64
    assert (packaged_weights() / "weights.safetensors").stat().st_size <= 20 * 2**20


def test_the_recorded_command_writes_the_shipped_config():
    """Run today, the command in train.json builds exactly the shipped config.json (sampler included)."""
    import shlex

    from cachepolicy.adapters.wan.drift_lab import packaged_weights
    from cachepolicy.lab.model import load_lab_config
    from cachepolicy.lab.train import build_configs, build_parser

    command = json.loads((packaged_weights() / "train.json").read_text())["command"]
    prefix = "python -m cachepolicy.lab.train "
    assert command.startswith(prefix)
    lab, _ = build_configs(build_parser().parse_args(shlex.split(command[len(prefix):])))
    assert lab == load_lab_config(packaged_weights() / "config.json")


def test_a_short_rollout_is_finite_and_close_to_the_scene(tmp_path):
    """Bounds: about twice what the shipped weights measured on this config when they were trained."""
    config = CompareConfig(model="drift-lab", policies=["full"], prompts=PROMPTS, seeds=[0, 1], num_chunks=2,
                           metrics=["scene-background-error", "scene-count-error", "scene-colour-error"])
    summary = run_compare(config, tmp_path / "cmp")
    stats = summary["policies"]["full"]["metrics"]
    # measured with the 7000-step, 1-2 sprite weights and their sampler (24 fresh-noise steps, guidance 2)
    assert stats["scene-background-error"]["mean"] < 0.045  # measured 0.0217
    assert stats["scene-count-error"]["mean"] < 0.7  # measured 0.333
    assert stats["scene-colour-error"]["mean"] < 0.06  # measured 0.0286
