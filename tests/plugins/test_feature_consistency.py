"""``feature-consistency`` on a tiny random transformers vision model saved locally (nothing downloaded).

Oracle: VBench's subject consistency by hand, per frame ``(cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2`` with
``f`` the model's pooled features of the resized, normalised frame; score = mean over frames 1..T-1.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cachepolicy.metrics import JobData  # noqa: E402
from cachepolicy.plugins.metrics import FeatureConsistency  # noqa: E402


@pytest.fixture
def vit_dir(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(config).eval().save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(image_mean=[0.2, 0.4, 0.6], image_std=[0.5, 0.25, 0.5]).save_pretrained(
        tmp_path / "vit")
    return tmp_path / "vit"


def features(model, images):
    pixels = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    pixels = (pixels - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.nn.functional.normalize(model(pixel_values=pixels).pooler_output, dim=-1)


def job(video):
    return JobData(latents=torch.zeros(4, 12, 4, 4), frames=video, trace=[{}] * 4, frames_per_chunk=3,
                   token_grid=None, prompt="p", seed=0, policy="full")


def test_feature_consistency_matches_the_formula_by_hand(vit_dir):
    generator = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 24, 24, generator=generator)
    video = torch.stack([a] * 6 + [b] * 6)  # 12 frames, one per latent frame: the scene cuts at frame 6
    metric = FeatureConsistency({"path": str(vit_dir)})
    assert metric.unavailable_reason() is None
    value = metric.compute(job(video))
    model = transformers.ViTModel.from_pretrained(vit_dir).eval()
    fa, fb = features(model, torch.stack([a, b]))
    c = float(fa @ fb)
    assert c < 0.999  # the two images really differ
    per_frame = [1.0] * 6 + [c] + [(c + 1) / 2] * 5
    assert value.value == pytest.approx(sum(per_frame[1:]) / 11, abs=1e-5)
    assert value.per_chunk == pytest.approx([1.0, 1.0, (c + 2 * (c + 1) / 2) / 3, (c + 1) / 2], abs=1e-5)


def test_a_still_video_is_perfectly_consistent(vit_dir):
    frame = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(2))
    value = FeatureConsistency({"path": str(vit_dir)}).compute(job(frame.expand(12, -1, -1, -1)))
    assert value.value == pytest.approx(1.0, abs=1e-6)
    assert value.per_chunk == pytest.approx([1.0] * 4, abs=1e-6)
