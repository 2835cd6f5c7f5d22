"""``cachepolicy run``: files written, their fields, and the errors users see (in-process CLI calls)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cachepolicy.cli import main


def test_run_writes_latents_run_json_and_trace(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "tiny-wan", "--policy", "attention-sink:frames=3", "--policy", "sliding-window:frames=3",
                 "--chunks", "4", "--seed", "7", "--batch", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out / "latents.safetensors") in printed
    latents = load_file(out / "latents.safetensors")["latents"]
    assert tuple(latents.shape) == (2, 4, 12, 8, 8)  # [B, C, F, H, W]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["model"] == "tiny-wan" and run["seeds"] == [7, 8]
    assert run["tokens_per_frame"] == 16 and run["frames_per_chunk"] == 3
    assert [p["spec"] for p in run["policies"]] == ["attention-sink:frames=3", "sliding-window:frames=3"]
    assert run["policies"][1]["params"] == {"frames": 3}
    assert run["package_version"]
    from cachepolicy.api import load_model
    from cachepolicy.models import module_weights_id

    assert run["weights"] == module_weights_id(load_model("tiny-wan").model)
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert [r["chunk"] for r in trace] == [0, 1, 2, 3]
    assert "residency" not in trace[-1]


def test_run_with_the_official_noise_of_a_recipe(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "tiny-wan", "--recipe", "self-forcing", "--noise", "official", "--seed", "3", "--chunks",
                 "2", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["noise"] == "OfficialNoise(order='self-forcing', seed=3, rollout_frames=21, overlap_frames=3)"
    from cachepolicy.api import load_model, rollout
    from cachepolicy.recipes import get_recipe

    recipe = get_recipe("self-forcing")
    expected = rollout(load_model("tiny-wan"), [], num_chunks=2, prompts=["a video"], seeds=[3], recipe=recipe,
                       noise=recipe.official_noise(3)).latents
    assert torch.equal(load_file(out / "latents.safetensors")["latents"], expected)


def test_run_traces_the_resident_tokens_on_request(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "tiny-wan", "--policy", "attention-sink:frames=3+sliding-window:frames=3", "--chunks", "4",
                 "--trace-residency", "--out", str(out)]) == 0
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert [sorted(map(int, r["residency"][0]["frames"])) for r in trace] == [
        [0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 8], [0, 1, 2, 9, 10, 11]]


@pytest.mark.parametrize("args, message", [
    (["run", "tiny-wan", "--policy", "sliding-windw", "--chunks", "2"], "Did you mean 'sliding-window'"),
    (["run", "tiny-wan", "--policy", "sliding-window:frames=x", "--chunks", "2"], "frames='x' is not an integer"),
    (["run", "tiny-wan", "--policy", "sliding-window:frames=1", "--chunks", "2"], "shorter than one chunk"),
    (["run", "tiny-van", "--chunks", "2"], "unknown model 'tiny-van'. Did you mean 'tiny-wan'"),
    (["run", "tiny-wan", "--chunks", "400"], "passes the model's rope_max_seq_len=1024"),
    (["run", "tiny-wan", "--chunks", "2", "--dtype", "float8"], "dtype 'float8' is not supported"),
    (["run", "tiny-wan", "--chunks", "2", "--recipe", "causvit"], "unknown recipe 'causvit'. Did you mean 'causvid'"),
    (["run", "tiny-wan", "--chunks", "4", "--switch", "4:a dog"], "a prompt switch at chunk 4 does not exist"),
    (["run", "tiny-wan", "--chunks", "2", "--noise", "official"], "--noise official draws in the order of a system's official script: give its --recipe"),
    (["run", "tiny-wan", "--chunks", "2", "--model-option", "sampler=fresh"],
     "sampler='fresh': 'fresh' is not a recipe (self-forcing, causvid, longlive, rolling-forcing)"),
    (["run", "tiny-wan", "--chunks", "2", "--model-option", "sampler=causvid,guidance=x"],
     "sampler guidance='x' is not a number"),
    (["run", "tiny-wan", "--chunks", "2", "--model-option", "sampler=steps=1000/500,wrap=true"],
     "sampler term 'wrap=true' is not allowed; write KEY=VALUE with KEY one of steps, shift, warp"),
    (["run", "tiny-wan", "--chunks", "2", "--model-option", "sampler=steps=1000/1000"],
     "denoising steps must be strictly decreasing"),
    (["run", "tiny-wan", "--chunks", "2", "--model-option", "sampler=3"], "sampler=3 is not allowed; give a recipe"),
    (["run", "drift-lab", "--chunks", "2", "--model-option", "sampler=causvid"],
     "model 'drift-lab' takes no option 'sampler'; it takes: path, device, dtype, steps, noise, guidance"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option, expected", [
    ("causvid", {"denoising_steps": [1000.0, 757.0, 522.0], "shift": 8.0, "warp": False, "table": True}),
    ("rolling-forcing,guidance=2.5", {"timesteps": [1000.0, 952.3810424804688, 882.3529052734375,
                                                    769.2307739257812, 555.5556030273438], "guidance": 2.5}),
    ("steps=1000/500,shift=3,noise=predicted", {"denoising_steps": [1000.0, 500.0], "shift": 3.0,
                                                "noise": "predicted", "sigmas": [1.0, 0.75]}),
])
def test_model_option_sampler_sets_the_models_sampler(tmp_path, option, expected):
    """``--model-option sampler=...`` (once an AttributeError deep in the engine) is the model's sampler."""
    out = tmp_path / "run"
    assert main(["run", "tiny-wan", "--chunks", "1", "--model-option", f"sampler={option}", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model_options"] == {"sampler": option}
    for key, value in expected.items():
        assert run["sampler"][key] == value, key
    assert len(run["sampler"]["timesteps"]) == len(run["sampler"]["denoising_steps"])


def test_existing_run_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "tiny-wan", "--chunks", "1", "--out", str(out)]) == 0
    before = (out / "latents.safetensors").read_bytes()
    assert main(["run", "tiny-wan", "--chunks", "2", "--seed", "3", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "latents.safetensors").read_bytes() == before
    assert main(["run", "tiny-wan", "--chunks", "2", "--out", str(out), "--force"]) == 0
    assert len((out / "trace.jsonl").read_text().splitlines()) == 2


def test_argument_errors_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "tiny-wan", "--chunks", "0", "--out", "x"])
    assert info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_run_with_a_recipe_and_a_prompt_switch(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "tiny-wan", "--recipe", "longlive", "--policy", "tokentrim", "--chunks", "5",
            "--prompt", "a red fox", "--switch", "4:a blue bird", "--out", str(out)]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["name"] == "longlive"
    assert run["policy_spec"].startswith("attention-sink:frames=3+sliding-window:frames=6+tokentrim")
    assert run["prompt_switches"] == [{"chunk": 4, "prompts": ["a blue bird"], "cut": False}]
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    assert trace[4]["recached_frames"] == [0, 12] and trace[4]["prompt_switch"] == ["a blue bird"]
    assert "recached_frames" not in trace[3]


def test_recipes_lists_the_built_in_recipes(capsys):
    assert main(["recipes", "--json"]) == 0
    recipes = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(recipes) == {"self-forcing", "causvid", "longlive", "rolling-forcing", "skyreels"}
    assert recipes["causvid"]["sampler"]["timesteps"] == [1000.0, 757.0, 522.0]
    assert recipes["longlive"]["recache"] == {"window_frames": 12, "sink_frames": 3}
    stagger = recipes["skyreels"]["stagger"]
    assert (stagger["steps"], stagger["shift"], stagger["ar_step"], stagger["solver"]) == (
        30, 8.0, 5, "UniPCMultistepScheduler")
    assert stagger["timesteps"][:3] == [999, 995, 991] and len(stagger["sigmas"]) == 31
    assert recipes["skyreels"]["sampler"]["guidance"] == 6.0
    assert main(["recipes"]) == 0
    assert "blocks denoised jointly, block-causally, each 5 steps behind" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "tiny-wan", "--chunks", "2", "--switch", "x:y", "--out", "x"])
    assert "write CHUNK:PROMPT" in capsys.readouterr().err


def test_videos_tile_samples_in_rows_of_columns(tmp_path):
    """Five flat-coloured samples in rows of two: tile (row, col) shows sample ``2 * row + col``; the sixth
    slot is black. ``columns=None`` keeps one row."""
    import imageio.v3 as iio

    from cachepolicy.errors import ParameterError
    from cachepolicy.outputs import save_videos

    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    # [B, T, 3, H, W]: sample b shows colour b in frame 0 and colour b + 1 in frame 1
    frames = torch.stack([colours, colours.roll(-1, 0)], dim=1).view(5, 2, 3, 1, 1).expand(5, 2, 3, 16, 16)
    save_videos(tmp_path, frames, columns=2)
    gif = iio.imread(tmp_path / "video.gif", index=None)[..., :3]
    assert gif.shape == (2, 3 * 128, 2 * 128, 3)
    for slot in range(6):
        row, col = divmod(slot, 2)
        for t in range(2):
            tile = gif[t, row * 128:(row + 1) * 128, col * 128:(col + 1) * 128]
            want = colours[(slot + t) % 5] * 255 if slot < 5 else torch.zeros(3)
            assert (tile == want.numpy().astype("uint8")).all(), (slot, t)
    save_videos(tmp_path, frames)
    assert iio.imread(tmp_path / "video.gif", index=None).shape[1:3] == (128, 5 * 128)
    with pytest.raises(ParameterError,
                       match=r"video columns must be a positive integer \(samples per row\), got 0"):
        save_videos(tmp_path, frames, columns=0)


def test_run_refuses_bad_video_columns_before_writing(tmp_path):
    from cachepolicy.api import run_to_dir
    from cachepolicy.errors import ParameterError

    with pytest.raises(ParameterError, match="got -1"):
        run_to_dir("tiny-wan", "full", out=tmp_path / "run", num_chunks=1, video_columns=-1)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):  # argparse: "argument --columns: must be at least 1"
        main(["run", "tiny-wan", "--chunks", "1", "--columns", "0", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_policy_hook_error_marks_the_run_failed_in_one_line_and_keeps_the_chunks(tmp_path, capsys, broken_policy):
    """A policy's hook raises: the engine's :class:`PolicyHookError` names the policy and the hook; the CLI prints
    one line, exits 3, and the run folder keeps the chunks finished before it."""
    out = tmp_path / "run"
    assert main(["run", "tiny-wan", "--policy", "broken:chunk=2", "--chunks", "4", "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: policy 'broken:chunk=2' failed in cachepolicy_chunk_start: KeyError: 'oops'"]
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["chunks_completed"]) == ("failed", 2)
    assert (run["failed_policy"], run["failed_hook"]) == ("broken:chunk=2", "cachepolicy_chunk_start")
    assert load_file(out / "latents.safetensors")["latents"].shape[2] == 6
    assert len((out / "trace.jsonl").read_text().splitlines()) == 2


def test_a_model_runs_without_a_prompt_on_its_default_prompt(tmp_path, registry):
    """Every model that loads without options draws its own default prompt (the drift lab's is a scene of its
    grammar); ``cachepolicy run drift-lab`` without ``--prompt`` is the newcomer's first command."""
    for name in ("tiny-wan", "tiny-skyreels", "drift-lab"):
        adapter = registry.model(name).load()
        adapter.encode_prompts([adapter.default_prompt])
    out = tmp_path / "lab"
    assert main(["run", "drift-lab", "--chunks", "2", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["prompts"] == [registry.model("drift-lab").load().default_prompt]
    assert run["sampler"]["shift"] == 1.0  # what the drift lab's config.json says, not Sampler's default 5


def test_plugins_are_listed_sorted(capsys):
    assert main(["plugins", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    kinds = ["policy", "model", "metric", "plugin"]
    keys = [(kinds.index(r["kind"]), r["name"]) for r in records]
    assert keys == sorted(keys) and len({r["kind"] for r in records}) >= 3
    assert main(["plugins"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == [r["name"] for r in records]
