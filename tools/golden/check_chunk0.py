#!/usr/bin/env python
"""Cross-check the golden fixtures' conventions with stock diffusers (no reference code, no cache policy).

In every recorded method the first chunk (frames 0..2) attends only to itself in all five calls, so its final latent
can be recomputed with a plain ``diffusers.WanTransformer3DModel`` loaded from the fixture's ``weights.safetensors``
(original Wan key names -> ``convert_wan_transformer_to_diffusers``), the recorded initial noise, conditioning and
re-noising draws, and the sampler described in tools/golden/README.md. The remaining difference is the float32
sinusoid / RoPE implementation of diffusers versus the reference code.

    python tools/golden/check_chunk0.py
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "fixtures", "golden"))


def load_model(fixture: str, meta: dict) -> WanTransformer3DModel:
    tm = meta["tiny_model"]
    sd = {k: v.float() for k, v in load_file(os.path.join(fixture, "weights.safetensors")).items()}
    model = WanTransformer3DModel(
        patch_size=tuple(tm["patch_size"]), num_attention_heads=tm["num_heads"], attention_head_dim=tm["head_dim"],
        in_channels=tm["in_dim"], out_channels=tm["out_dim"], text_dim=tm["text_dim"], freq_dim=tm["freq_dim"],
        ffn_dim=tm["ffn_dim"], num_layers=tm["num_layers"], cross_attn_norm=tm["cross_attn_norm"],
        qk_norm="rms_norm_across_heads", eps=tm["eps"], image_dim=None, rope_max_seq_len=1024)
    model.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return model.eval()


def chunk0(method: str) -> float:
    fixture = os.path.join(FIXTURES, method)
    meta = json.load(open(os.path.join(fixture, "golden.json")))
    t = load_file(os.path.join(fixture, "tensors.safetensors"))
    model = load_model(fixture, meta)
    cond = t["conditioning"]
    if cond.ndim == 4:           # Infinity-RoPE: one conditioning per scene
        cond = cond[meta["policy"]["scene_of_chunk"][0]]
    timesteps = meta["pipeline"]["warped_timesteps"]
    sigmas = meta["pipeline"]["sigmas"]
    draws = [m for m in meta["draw_order"] if m["chunk"] == 0 and m["tensor"] == "renoise"]
    tokens = meta["tiny_model"]["tokens_per_frame"]
    x = t["noise_initial"][:, 0:3]                                   # [B, F, C, H, W]
    for i, (tt, sg) in enumerate(zip(timesteps, sigmas)):
        ts = torch.full((1, 3 * tokens), tt, dtype=torch.float32)    # per-token timestep (B, L)
        with torch.no_grad():
            v = model(x.permute(0, 2, 1, 3, 4), ts, cond, return_dict=False)[0].permute(0, 2, 1, 3, 4)
        x0 = (x.double() - sg * v.double()).float()
        if i < len(timesteps) - 1:
            eps = t[draws[i]["tensor"]][draws[i]["row"]].unflatten(0, (1, 3))
            s_next = torch.tensor(sigmas[i + 1], dtype=torch.float32)
            x = (1 - s_next) * x0 + s_next * eps
    return (x0 - t["latents"][:, 0:3]).abs().max().item()


def main():
    torch.set_num_threads(1)
    for m in ("deep_forcing", "forcing_kv", "dummy_forcing", "infinity_rope"):
        if os.path.isdir(os.path.join(FIXTURES, m)):
            print(f"{m}: chunk 0 via stock diffusers, max |diff| vs fixture latents = {chunk0(m):.3e}")


if __name__ == "__main__":
    main()
