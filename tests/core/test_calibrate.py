"""Head-role calibration (``cachepolicy calibrate``): the measured ratio against attention computed by hand, the
criterion's boundary, the written file driving ``forcing-kv``, and bad input refused before anything is written."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import attrs
import pytest
import torch

from cachepolicy.calibrate import DEFAULT_PROMPT, calibrate, classify_heads, static_scores
from cachepolicy.cli import main
from cachepolicy.engine import RolloutConfig, Session
from cachepolicy.errors import ParameterError, RolloutConfigError
from cachepolicy.hookspecs import hookimpl
from cachepolicy.layers import LayerRequest
from cachepolicy.plugins.forcing_kv import ForcingKV, read_head_roles
from cachepolicy.policy import Policy


@attrs.frozen
class Capture(Policy):
    """Keeps the post-RoPE queries, resident keys, own keys and key frames of every layer of chunk 2's steps."""

    name: ClassVar[str] = "capture"

    def new_state(self):
        return []

    @hookimpl
    def cachepolicy_layer_request(self, session, call):
        return LayerRequest() if call.chunk == 2 and call.phase == "step" else None

    @hookimpl
    def cachepolicy_layer(self, session, layer):
        self.state(session).append((layer.index, layer.query.clone(), layer.cells[0].rotated_keys.clone(),
                                    layer.key.clone(), layer.view.frame.clone()))


def test_the_ratio_is_the_attention_mass_computed_by_hand(tiny_wan, tmp_path):
    payload = calibrate(tiny_wan(seed=1), out=tmp_path / "roles.json", chunks=3, sink_frames=2)
    capture = Capture()
    session = Session(tiny_wan(seed=1), [capture], RolloutConfig(num_chunks=3, prompts=[DEFAULT_PROMPT], seeds=[0]))
    session.run()
    sums = torch.zeros(2, 2, 3)  # [layer, head, (sink, middle, anchor + current)]
    for layer, query, resident, own, frame in session.policy_state[capture.spec]:
        keys = torch.cat([resident, own], dim=1)  # [1, S + n, H, D]
        probs = torch.einsum("bnhd,bshd->bhns", query, keys).div(math.sqrt(query.shape[-1])).softmax(-1)[0]
        frames = torch.cat([frame[0], torch.full((own.shape[1],), 6)])  # the chunk's own keys: frames 6..8
        for head in range(2):
            mass = probs[head].sum(0)  # summed over every query row
            sums[layer, head] += torch.stack([mass[frames < 2].sum(), mass[(frames >= 2) & (frames < 5)].sum(),
                                              mass[frames >= 5].sum()])
    by_hand = sums[..., 2] / (sums[..., 1] + sums[..., 2])
    found = payload["calibration"]
    assert found["chunk"] == 2 and found["frames"] == [6, 8] and found["steps"] == [0, 1, 2, 3]
    assert torch.allclose(torch.tensor(found["scores"]), by_hand, atol=2e-6)
    assert len(session.policy_state[capture.spec]) == 4 * 2  # 4 steps x 2 layers were measured


def test_the_criterion_is_static_at_or_above_the_threshold():
    masses = torch.tensor([[[0.1, 0.18, 0.2, 0.52], [0.1, 0.19, 0.2, 0.51]]])  # ratios 0.8 and 0.7889
    scores = static_scores(masses)
    assert torch.allclose(scores, torch.tensor([[0.8, 0.71 / 0.9]]))
    assert classify_heads(scores, 0.8) == ([[0]], [[1]])
    assert classify_heads(scores, 0.81) == ([[]], [[0, 1]])


def test_the_written_file_is_the_reference_format_and_drives_forcing_kv(tiny_wan, tmp_path):
    path = tmp_path / "roles" / "tiny.json"
    adapter = tiny_wan(seed=2, num_attention_heads=4, attention_head_dim=12, num_layers=3, latent_size=(6, 8))
    payload = calibrate(adapter, out=path, chunks=3, sink_frames=1, threshold=0.5)
    written = json.loads(path.read_text())
    assert written == payload
    assert list(written)[:6] == ["format", "profile", "num_layers", "num_heads", "description", "layers"]
    assert written["format"] == "forcingkv_offline_head_custom2"
    roles = read_head_roles(path, 3, 4)
    assert roles.counts() == (written["calibration"]["static"], written["calibration"]["dynamic"])
    assert 0 < roles.counts()[0] < 12  # this threshold splits the random model's heads
    session = Session(adapter, [ForcingKV(roles=str(path))], RolloutConfig(num_chunks=4, prompts=["a"], seeds=[0]))
    result = session.run()
    assert "forcing_kv_segments" in result.trace[-1]


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(chunks=1), ParameterError, "chunks must be at least 2"),
    (dict(chunks=2, sink_frames=3), ParameterError, r"starts at frame 3, which must come after the 3 sink and 1 "
                                                    r"anchor frame\(s\); generate at least 3 chunks"),
    (dict(steps=[0, 4]), ParameterError, r"steps \[0, 4\] are not allowed; give denoising-step indices in 0..3"),
    (dict(threshold=1.5), ParameterError, r"threshold=1.5 is not allowed; it must be a number in \(0, 1\]"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny_wan, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        calibrate(tiny_wan(), out=tmp_path / "roles.json", **kwargs)
    assert not (tmp_path / "roles.json").exists()


def test_an_existing_file_or_a_folder_is_not_overwritten(tiny_wan, tmp_path):
    path = tmp_path / "roles.json"
    path.write_text("keep me")
    with pytest.raises(RolloutConfigError, match="exists; choose another file or pass --force"):
        calibrate(tiny_wan(), out=path)
    assert path.read_text() == "keep me"
    with pytest.raises(RolloutConfigError, match="is a folder"):
        calibrate(tiny_wan(), out=tmp_path)


def test_the_cli_writes_the_roles_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "roles.json"
    assert main(["calibrate", "tiny-wan", "--out", str(out), "--chunks", "3", "--steps", "0,3"]) == 0
    assert "static /" in capsys.readouterr().out
    assert json.loads(out.read_text())["calibration"]["steps"] == [0, 3]
    assert main(["calibrate", "tiny-wan", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["calibrate", "tiny-wan", "--out", str(tmp_path / "b.json"), "--steps", "one"]) == 2
    assert "--steps 'one': write step indices" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
