"""The drift-lab model through the Wan adapter: loading, exact decoding, its recipe, ground-truth metrics."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from cachepolicy.errors import CheckpointError
from tests.oracle import Recorder, check_rollout_against_full_forward

PROMPT = "a white disc and a red square bouncing slowly over a teal-to-purple gradient"


def save_random_lab_weights(folder, config):
    """Save a drift-lab model of ``config`` with every parameter randomised (seed 0) to ``folder``, in the
    lab's weights format; returns ``folder``."""
    from cachepolicy.adapters.wan.tiny import randomize_
    from cachepolicy.lab.checkpoint import save_weights_dir
    from cachepolicy.lab.model import build_transformer

    model = randomize_(build_transformer(config, seed=0), seed=0)
    save_weights_dir(folder, config, {k: v.contiguous() for k, v in model.state_dict().items()})
    return folder


@pytest.fixture
def lab_weights(tmp_path):
    """A small random drift-lab model saved in the lab's weights format."""
    from cachepolicy.lab.model import LabConfig

    config = attrs.evolve(LabConfig(), layers=2, heads=2, dim_head=16, ffn_dim=64, sampler_steps=4)
    return save_random_lab_weights(tmp_path / "final", config)


@pytest.mark.parametrize("noise, guidance", [("fresh", 1.0), ("predicted", 1.0), ("fresh", 2.0)])
def test_loads_with_its_recipe_and_matches_the_full_forward(tmp_path, registry, noise, guidance):
    from cachepolicy.engine import RolloutConfig, Session
    from cachepolicy.lab.model import LabConfig

    config = attrs.evolve(LabConfig(), layers=2, heads=2, dim_head=16, ffn_dim=64, sampler_steps=4,
                          sampler_noise=noise, sampler_guidance=guidance)
    adapter = registry.model("drift-lab").load(path=str(save_random_lab_weights(tmp_path / "final", config)))
    info = adapter.info
    assert (info.latent_channels, info.latent_height, info.token_rows, info.frames_per_chunk) == (12, 8, 8, 3)
    # the config's sampler, whichever it is
    assert info.sampler.noise == noise and info.sampler.guidance == guidance and not info.sampler.warp
    assert info.sampler.sigmas() == pytest.approx([1.0, 0.75, 0.5, 0.25])  # the lab's 4-step schedule
    recorder = Recorder()
    session = Session(adapter, [recorder], RolloutConfig(num_chunks=3, prompts=[PROMPT], seeds=[0]))
    result = session.run()
    # under guidance the unconditional input is the empty prompt, the lab's zero (prompt-dropout) embedding
    assert check_rollout_against_full_forward(adapter, result, session.policy_state[recorder.spec],
                                              guidance=guidance) <= 1e-5


def test_model_options_replace_the_sampler_of_the_config(lab_weights, registry):
    from cachepolicy.errors import ParameterError

    entry = registry.model("drift-lab")
    assert entry.load(path=str(lab_weights)).info.sampler.guidance == 2.0  # the config's (LabConfig default)
    sampler = entry.load(path=str(lab_weights), steps=2, noise="predicted", guidance=3.0).info.sampler
    assert (sampler.sigmas(), sampler.noise, sampler.guidance) == ([1.0, 0.5], "predicted", 3.0)
    with pytest.raises(ParameterError, match=r"drift-lab model option: sampler_noise='ddim' is not allowed; "
                                             r"choose one of fresh, predicted"):
        entry.load(path=str(lab_weights), noise="ddim")
    with pytest.raises(ParameterError, match=r"sampler_guidance must be a finite scale >= 0 .*got -1"):
        entry.load(path=str(lab_weights), guidance=-1)


def test_decoding_is_the_exact_inverse_of_the_latent_transform(lab_weights, registry):
    from cachepolicy.lab.metrics import SceneTruth
    from cachepolicy.lab.scenes import build_scene

    adapter = registry.model("drift-lab").load(path=str(lab_weights))
    scene = build_scene(PROMPT, seed=3)
    frames = torch.from_numpy(scene.frames)  # [T, 3, 16, 16] in [-1, 1]
    latent = adapter.lab_config.latent.encode(frames)  # [1, 12, T, 8, 8]
    decoded = adapter.decode(latent)[0]
    assert torch.allclose(decoded, (frames + 1) / 2, atol=1e-7)
    assert adapter.ground_truth(PROMPT, 3, frames.shape[0]) == SceneTruth(scene.spec, adapter.lab_config.scene)


def test_prompts_with_more_sprites_than_trained_are_refused(tmp_path, registry):
    from cachepolicy.lab.errors import PromptError, UnknownWordError
    from cachepolicy.lab.model import LabConfig
    from cachepolicy.lab.scenes import SceneConfig
    from cachepolicy.lab.text import embed_prompts

    config = attrs.evolve(LabConfig(), scene=SceneConfig(max_sprites=2), layers=1, heads=2, dim_head=16,
                          ffn_dim=32, sampler_steps=2)
    adapter = registry.model("drift-lab").load(path=str(save_random_lab_weights(tmp_path / "final", config)))
    two = ["a white disc and a red square bouncing slowly over a teal-to-purple gradient", ""]
    assert torch.equal(adapter.encode_prompts(two), embed_prompts(two, config.text))  # 2 sprites, ""
    # words of the vocabulary outside the grammar are refused, naming the word where parsing stopped
    with pytest.raises(PromptError, match=r"expected a count \(a/an/two/three\) at word 1, got 'red'"):
        adapter.encode_prompts(["red disc"])
    with pytest.raises(PromptError, match=r"ends early: expected 'bouncing' at word 4"):
        adapter.encode_prompts(["a red disc"])
    three = "two cyan discs and a red square bouncing slowly over a teal-to-purple gradient"
    with pytest.raises(PromptError, match=r"asks for 3 sprites; this drift-lab model was trained on scenes of "
                                          r"1 to 2 \(scene.max_sprites"):
        adapter.encode_prompts([two[0], three])
    with pytest.raises(UnknownWordError, match="'purpel'"):
        adapter.encode_prompts(["a red disc bouncing slowly over a teal-to-purpel gradient"])


def test_scene_metrics_are_zero_on_the_true_video_and_see_a_planted_change(registry):
    from cachepolicy.lab.scenes import build_scene
    from cachepolicy.metrics import JobData

    scene = build_scene(PROMPT, seed=1)
    frames = (torch.from_numpy(scene.frames) + 1) / 2  # [12, 3, 16, 16] in [0, 1]

    def job(video):
        return JobData(latents=torch.zeros(12, 12, 8, 8), frames=video, trace=[{}] * 4, frames_per_chunk=3,
                       token_grid=None, prompt=PROMPT, seed=1, policy="full", ground_truth=scene.spec)

    names = ["scene-background-error", "scene-count-error", "scene-colour-error", "scene-size-error"]
    for name in names:
        value = registry.metric(name)().compute(job(frames))
        # exact up to the [0, 1] -> [-1, 1] round trip of the frames (float32, ~1e-8)
        assert value.value == pytest.approx(0.0, abs=1e-6), name
        assert value.per_chunk == pytest.approx((0.0,) * 4, abs=1e-6), name
    planted = frames.clone()
    planted[9:] = planted[9:] * 0.5  # the last chunk darkens
    assert registry.metric("scene-background-error")().compute(job(planted)).per_chunk[3] > 0.05
    no_truth = attrs.evolve(job(frames), ground_truth=None)
    assert math.isnan(registry.metric("scene-count-error")().compute(no_truth).value)


def test_scene_metrics_judge_sprites_at_the_model_sprite_size(tmp_path, registry):
    """A model trained on 6-pixel sprites: its true videos score 0; judged at the default 5 pixels they would
    not (the stamps' areas differ), so the adapter's ground truth must carry the model's geometry."""
    from cachepolicy.lab.model import LabConfig
    from cachepolicy.lab.scenes import SceneConfig, build_scene
    from cachepolicy.metrics import JobData

    config = attrs.evolve(LabConfig(), scene=SceneConfig(sprite_size=6, max_sprites=2), layers=1, heads=2,
                          dim_head=16, ffn_dim=32, sampler_steps=2)
    adapter = registry.model("drift-lab").load(path=str(save_random_lab_weights(tmp_path / "final", config)))
    scene = build_scene(PROMPT, seed=2, config=config.scene)
    frames = (torch.from_numpy(scene.frames) + 1) / 2  # [12, 3, 16, 16] in [0, 1], 6-pixel sprites
    truth = adapter.ground_truth(PROMPT, 2, 12)
    assert truth.scene.sprite_size == 6

    def size_error(ground_truth):
        job = JobData(latents=torch.zeros(12, 12, 8, 8), frames=frames, trace=[{}] * 4, frames_per_chunk=3,
                      token_grid=None, prompt=PROMPT, seed=2, policy="full", ground_truth=ground_truth)
        return registry.metric("scene-size-error")().compute(job).value

    assert size_error(truth) == pytest.approx(0.0, abs=1e-6)
    # 6-pixel stamps judged against 5-pixel ones: 36 against 25 pixels for the square, (36 - 25) / 25 = 0.44;
    # this video measures 0.48 (disc and square)
    assert size_error(truth.spec) > 0.2


def test_ground_truth_metrics_are_default_only_for_models_that_provide_ground_truth():
    from cachepolicy.compare import default_metrics

    assert "scene-count-error" in default_metrics(model="drift-lab")
    assert not any(m.startswith("scene-") for m in default_metrics(model="tiny-wan"))


def test_missing_weights_say_what_to_do(registry, tmp_path, monkeypatch):
    import cachepolicy.adapters.wan.drift_lab as drift_lab

    monkeypatch.setattr(drift_lab, "packaged_weights", lambda: tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no drift-lab weights in .*--model-option path=DIR/final"):
        registry.model("drift-lab").load()
    with pytest.raises(CheckpointError, match="holds no config.json"):
        registry.model("drift-lab").load(path=str(tmp_path))


def test_run_writes_mp4_and_gif_of_the_decoded_frames(lab_weights, tmp_path, capsys):
    import imageio.v3 as iio

    from cachepolicy.cli import main

    out = tmp_path / "run"
    code = main(["run", "drift-lab", "--model-option", f"path={lab_weights}", "--chunks", "2", "--batch", "2",
                 "--prompt", PROMPT, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "video.mp4" in printed and "video.gif" in printed
    gif = iio.imread(out / "video.gif", index=None)
    assert gif.shape[:3] == (6, 128, 256)  # 6 frames; 16x16 enlarged x8; two samples side by side
    import imageio_ffmpeg

    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out / "video.mp4"))
    assert frames == 6

    # a prompt the model refuses (first prompt or a switch's) fails before --force replaces anything
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = "a red disc bouncing slowly over a teal-to-purpel gradient"
    base = ["run", "drift-lab", "--model-option", f"path={lab_weights}", "--chunks", "2", "--out", str(out),
            "--force"]
    assert main(base + ["--prompt", bad]) == 2
    assert "unknown word 'purpel'" in capsys.readouterr().err
    assert main(base + ["--prompt", PROMPT, "--switch", f"1:{bad}"]) == 2
    assert "unknown word 'purpel'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # compare encodes every prompt before any job: nothing is created
    cmp = tmp_path / "cmp"
    assert main(["compare", "drift-lab", "--model-option", f"path={lab_weights}", "--policies", "full",
                 "--prompts", f"{PROMPT}; {bad}", "--chunks", "1", "--out", str(cmp), "--no-progress"]) == 2
    assert "unknown word 'purpel'" in capsys.readouterr().err
    assert not cmp.exists()


def test_no_video_for_a_model_without_decoder(tmp_path):
    import json

    from cachepolicy.cli import main

    assert main(["run", "tiny-wan", "--chunks", "1", "--out", str(tmp_path / "r")]) == 0
    assert not (tmp_path / "r" / "video.gif").exists()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["videos"] == []
