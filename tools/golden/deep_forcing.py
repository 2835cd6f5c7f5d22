#!/usr/bin/env python
"""Record golden fixtures from the Deep Forcing reference code (Deep Sink + Participative Compression).

Drives the reference checkout's own ``pipeline.CausalInferencePipeline`` and
``wan.modules.causal_model_deepforcing.CausalWanModelDeepForcing`` (through its
``utils.wan_wrapper.WanDiffusionWrapperDeepForcing``) on CPU, fp32, with a tiny random model.
No reference file is edited; every deviation is a monkeypatch listed in ``PATCHES`` and in the
fixture JSON. See tools/golden/README.md.

    git -C <mirror> archive e688827bb63a517aac9cca43f7fc149b1afe5f4c | tar -x -C /tmp/deepforcing
    python tools/golden/deep_forcing.py --checkout /tmp/deepforcing
"""
from __future__ import annotations

import argparse
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

import torch  # noqa: E402

REFERENCE = dict(
    repo="AshadowZ/PackForcing-Unofficial",
    commit="e688827bb63a517aac9cca43f7fc149b1afe5f4c",
    files=["pipeline/causal_inference.py", "utils/wan_wrapper.py", "utils/scheduler.py",
           "wan/modules/causal_model_deepforcing.py", "wan/modules/model.py",
           "configs/deepforcing_chunkwise_sinkmid.yaml"],
    note="port of the official cvlab-kaist/DeepForcing code (the official repo snapshot in the store holds only the "
         "project page); its pc_mid_rope_mode='none' path is line-for-line the logic of the file headed 'Adapted from "
         "Deep-Forcing under Apache-2.0' (code-index id 66894382714) except the generalised bootstrap delta",
)

# Tiny CausalWanModelDeepForcing (Wan architecture, every size shrunk)
TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=64,
            text_dim=32, out_dim=16, num_heads=4, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6)
LATENT_HW = (6, 8)                      # latent H x W -> 3 x 4 = 12 tokens per frame
FRAME_TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
FRAMES_PER_CHUNK = 3

# Policy settings: the paper / released-config values (configs/deepforcing_chunkwise_sinkmid.yaml), unscaled in
# frames. pc_mid_rope_mode 'none' = official behaviour (the port's HEAD config says 'token', a port-only mode).
MODEL_KWARGS = dict(timestep_shift=5.0, local_attn_size=21, sink_size=10, pc_enable=True, budget=16, recent=4,
                    pc_fusion="sum", pc_keep_sinks=True, pc_topc_max_reuse=7, pc_mid_rope_mode="none")
PIPE_ARGS = dict(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
                 independent_first_frame=False, context_noise=0)

PATCHES: list[dict] = []


def patch(obj, name, value, why):
    setattr(obj, name, value)
    where = f"{obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else obj.__name__
    PATCHES.append(dict(target=f"{where}.{name}", why=why))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", required=True, help="extracted reference tree (git archive of the commit)")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                                    "tests", "fixtures", "golden", "deep_forcing")))
    ap.add_argument("--chunks", type=int, default=22)
    ap.add_argument("--weight-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=1, help="seeds a private generator: initial noise + conditioning")
    ap.add_argument("--global-seed", type=int, default=2, help="torch.manual_seed before the loop (re-noising draws)")
    ap.add_argument("--sinusoid", choices=["fp64", "fp32"], default="fp64",
                    help="fp32 replaces the reference's float64 timestep sinusoid (sensitivity check only)")
    ap.add_argument("--replay", help="fixture dir: feed its recorded draws instead of the RNG")
    ap.add_argument("--compare", help="fixture dir: report max |diff| of latents and equality of decisions")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    C.setup_torch(1)
    checkout = os.path.abspath(args.checkout)
    commit = C.git_head(checkout)
    sys.path.insert(0, checkout)
    if not os.path.isdir(os.path.join(checkout, "ckpt")):
        # utils/wan_wrapper.py:18-27 walks up from its own file to a directory holding `ckpt/` at import time.
        os.makedirs(os.path.join(checkout, "ckpt"))
    PATCHES.append(dict(target="<checkout>/ckpt/ (empty directory, created if absent)",
                        why="utils/wan_wrapper.py:18-27 looks for it at import; no file is read from it"))
    stubbed = C.install_stubs(["ftfy", "easydict", "einops", "omegaconf", "torchvision", "xfuser", "lmdb",
                               "wandb", "imageio", "av", "scipy", "cv2", "open_clip", "dominate"])
    # wan/modules/t5.py:478 and demo_utils/memory.py:9 call torch.cuda.current_device() at import time.
    with C.cuda_device_query_at_import():
        import wan.modules.attention as WA
        import wan.modules.model as WM
        import wan.modules.causal_model_deepforcing as DFM
        import utils.wan_wrapper as WW
        from pipeline import CausalInferencePipeline
    PATCHES.append(dict(target="torch.cuda.current_device (during imports only)",
                        why="wan/modules/t5.py:478 and demo_utils/memory.py:9 query the CUDA device at import; "
                            "answers 0 while importing, restored afterwards"))

    # ---- patches (module attributes only; reference files untouched) -------------------------------------------
    patch(DFM, "attention", C.sdpa_attention,
          "self-attention: wan/modules/attention.py:139-185 would cast q/k/v to bfloat16 on CPU; fp32 torch SDPA")
    patch(WM, "flash_attention", C.sdpa_attention,
          "cross-attention (wan/modules/model.py:189) asserts CUDA flash-attn; fp32 torch SDPA, no length mask "
          "(context_lens is None on this path)")
    patch(WA, "attention", C.sdpa_attention, "same, for any other importer")
    patch(WA, "flash_attention", C.sdpa_attention, "same, for any other importer")
    if args.sinusoid == "fp32":
        patch(DFM, "sinusoidal_embedding_1d", C.sinusoidal_embedding_1d_fp32,
              "SENSITIVITY RUN ONLY: float32 timestep sinusoid (diffusers style) instead of float64")

    F_ = FRAME_TOKENS

    def tiny_from_pretrained(cls, path, **kw):
        # utils/wan_wrapper.py:419-420 passes PC_capacity=1560*budget, PC_window=1560*recent (1560 = tokens/frame
        # at 480x832); rescale both to the tiny model's tokens per frame.
        for key in ("PC_capacity", "PC_window"):
            assert kw[key] % 1560 == 0
            kw[key] = kw[key] // 1560 * F_
        return cls(**TINY, **kw)

    patch(DFM.CausalWanModelDeepForcing, "from_pretrained", classmethod(tiny_from_pretrained),
          "no checkpoint: build the tiny config; PC_capacity/PC_window rescaled from 1560 to tiny tokens/frame")

    orig_build = WW.WanDiffusionWrapper.build_kv_cache

    def build_kv_cache(self, batch_size, dtype, device, num_transformer_blocks, frame_seq_length, cache_mode=None):
        # utils/wan_wrapper.py:349-350 hard-codes [B, S, 12, 128]; same logic with the tiny heads x head_dim.
        m = self.model
        size = m.local_attn_size * frame_seq_length if m.local_attn_size != -1 else 32760
        hd = m.dim // m.num_heads
        return [{"k": torch.zeros([batch_size, size, m.num_heads, hd], dtype=dtype, device=device),
                 "v": torch.zeros([batch_size, size, m.num_heads, hd], dtype=dtype, device=device),
                 "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                 "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}
                for _ in range(num_transformer_blocks)]

    patch(WW.WanDiffusionWrapper, "build_kv_cache", build_kv_cache,
          "KV buffers hard-coded [B, S, 12, 128] -> tiny [B, S, heads, head_dim] (S = local_attn_size * tokens/frame)")
    del orig_build

    # ---- build ---------------------------------------------------------------------------------------------------
    generator = WW.WanDiffusionWrapperDeepForcing(**MODEL_KWARGS, is_causal=True)
    model = generator.model
    C.randomise_(model, args.weight_seed)
    for blk in model.blocks:
        # causal_model_deepforcing.py:331 max_attention_size = local_attn_size * 1560 (hard-coded tokens/frame)
        blk.self_attn.max_attention_size = model.local_attn_size * F_
    PATCHES.append(dict(target="blocks[i].self_attn.max_attention_size",
                        why="hard-coded local_attn_size*1560 -> local_attn_size*tiny tokens/frame (also feeds the "
                            "bootstrap delta local_window_frames - capacity//frame_seqlen = 21 - 16 = 5)"))

    g = torch.Generator().manual_seed(args.noise_seed)
    n_frames = args.chunks * FRAMES_PER_CHUNK
    noise = torch.randn([1, n_frames, TINY["in_dim"], *LATENT_HW], generator=g)
    cond = torch.randn([1, TINY["text_len"], TINY["text_dim"]], generator=g)

    class FakeText(torch.nn.Module):
        def forward(self, text_prompts):
            return {"prompt_embeds": cond}

    class FakeVAE(torch.nn.Module):
        def decode_to_pixel(self, latent, use_cache=False):
            return torch.zeros(1)

    pipe = CausalInferencePipeline(types.SimpleNamespace(**PIPE_ARGS), device=torch.device("cpu"),
                                   generator=generator, text_encoder=FakeText(), vae=FakeVAE())
    pipe.num_transformer_blocks = TINY["num_layers"]
    pipe.frame_seq_length = F_
    PATCHES.append(dict(target="CausalInferencePipeline.num_transformer_blocks / frame_seq_length",
                        why="pipeline/causal_inference.py:33-34 hard-codes 30 and 1560; set to tiny values"))
    PATCHES.append(dict(target="text encoder / VAE", why="bypassed: text encoder returns the fixed random "
                        "conditioning tensor, VAE decode returns a dummy (latents are the output)"))

    # ---- tracing -------------------------------------------------------------------------------------------------
    tr = C.CallTracer(F_, FRAMES_PER_CHUNK)
    tr.attach(generator)
    state = dict(layer=None)
    label, call_label = tr.draw_label, tr.call_label

    events: list[dict] = []      # one per (compression call, layer)
    rotations: list[dict] = []   # every _rope_time_delta_mul_ call
    per_call: list[dict] = []    # cache layout after every (call, layer)
    mirror: dict[int, list[int]] = {}   # layer -> global token id of every cache slot (driver-side bookkeeping)
    pending: dict[int, dict] = {}
    last_layout: dict[int, dict] = {}

    orig_select = DFM._mkv_select_indices
    reuse = MODEL_KWARGS["pc_topc_max_reuse"]

    def select_wrapper(scores_fused, total_tokens, recent_tokens, sink_tokens, top_c, device, topc_counts=None,
                       topc_max_reuse=0):
        keep, protect, sel = orig_select(scores_fused, total_tokens, recent_tokens, sink_tokens, top_c, device,
                                         topc_counts=topc_counts, topc_max_reuse=topc_max_reuse)
        cand = topc_counts[0, sink_tokens:total_tokens - recent_tokens] if topc_counts is not None else None
        pending[state["layer"]] = dict(
            T=int(total_tokens), R_eff=int(recent_tokens), sink_tokens=int(sink_tokens), top_c=int(top_c),
            keep_aug_idx=[int(i) for i in keep[0]], topc_aug_idx=[int(i) for i in sel[0]],
            candidates=int(total_tokens - recent_tokens - sink_tokens),
            candidates_excluded_by_reuse=int((cand >= topc_max_reuse).sum()) if (cand is not None and topc_max_reuse > 0) else 0,
            max_count_among_candidates=int(cand.max()) if cand is not None and cand.numel() else 0,
        )
        return keep, protect, sel

    patch(DFM, "_mkv_select_indices", select_wrapper, "RECORDING ONLY: wraps the original, returns its result")

    orig_rot = DFM._rope_time_delta_mul_

    def rot_wrapper(k_chunk, freqs, delta_frames):
        rotations.append(dict(call_label(), layer=state["layer"], delta=int(delta_frames),
                              n_tokens=int(k_chunk.shape[1])))
        return orig_rot(k_chunk, freqs, delta_frames)

    patch(DFM, "_rope_time_delta_mul_", rot_wrapper, "RECORDING ONLY: wraps the original")

    def attn_pre(i):
        def hook(mod, a):
            state["layer"] = i
            kv = a[5]
            state["prev_local_end"] = int(kv["local_end_index"].item())
        return hook

    def attn_post(i):
        def hook(mod, a, out):
            kv = a[5]
            cs = a[6]
            n_new = a[0].shape[1]
            new_ids = list(range(cs, cs + n_new))
            le = int(kv["local_end_index"].item())
            ids = mirror.setdefault(i, [])
            ev = pending.pop(i, None)
            if ev is not None:      # compression: cache = [cache[:prev_local_end] ; new][keep]
                aug = ids[:state["prev_local_end"]] + new_ids
                ids[:] = [aug[j] for j in ev["keep_aug_idx"]]
                ev_rec = dict(call_label(), layer=i, **{k: v for k, v in ev.items() if k not in ("keep_aug_idx", "topc_aug_idx")})
                ev_rec["kept_token_ids"] = C.compact_ranges(ids)
                ev_rec["topc_token_ids"] = C.compact_ranges(sorted(aug[j] for j in ev["topc_aug_idx"]))
                ev_rec["keep_aug_idx"] = C.compact_ranges(ev["keep_aug_idx"])
                ev_rec["local_end_after"] = le
                ev_rec["topc_counts_after_runs"] = C.runs([int(c) for c in kv["topc_select_counts"][0, :le]])
                events.append(ev_rec)
            else:                   # append (D1) or overwrite the same slots (D2..CTX)
                start = le - n_new
                assert start >= 0
                if len(ids) < le:
                    ids.extend([None] * (le - len(ids)))
                ids[start:le] = new_ids
                del ids[le:]
            abs_idx = kv["abs_frame_idx"][0, :le].tolist()
            # consistency of the driver mirror with the reference metadata (outside the re-labelled sink)
            sink_tok = MODEL_KWARGS["sink_size"] * F_
            for j in range(min(le, len(ids))):
                if j >= sink_tok and ids[j] // F_ != abs_idx[j]:
                    raise RuntimeError(f"mirror mismatch layer {i} slot {j}: id {ids[j]} vs abs frame {abs_idx[j]}")
            rec = dict(local_end=le, abs_frame_runs=C.runs(abs_idx), cache_token_ids=C.compact_ranges(ids))
            if "sink_base_abs_start_frame" in kv:
                rec["sink_base"] = int(kv["sink_base_abs_start_frame"].item())
            if last_layout.get(i) != rec:   # stored only when the layout changed (D1 of a chunk, in practice)
                last_layout[i] = rec
                per_call.append(dict(call_label(), layer=i, **rec))
        return hook

    for i, blk in enumerate(model.blocks):
        blk.self_attn.register_forward_pre_hook(attn_pre(i))
        blk.self_attn.register_forward_hook(attn_post(i))

    replay = None
    if args.replay:
        from safetensors.torch import load_file
        import json
        order = json.load(open(os.path.join(args.replay, "golden.json")))["draw_order"]
        replay = C.unpack_draws(load_file(os.path.join(args.replay, "tensors.safetensors")), order)

    weights = C.state_dict_exact(model, torch.bfloat16)
    torch.manual_seed(args.global_seed)
    with C.DrawRecorder(label, replay=replay) as rec:
        _, latents = pipe.inference(noise=noise, text_prompts=["golden"], return_latents=True)

    latents = latents.detach().clone()
    summary = C.tensor_summary(latents)
    draws = C.pack_draws(rec)
    calls = tr.calls
    n_comp = sorted({e["chunk"] for e in events})
    deltas = [(r["label"], r["layer"], r["delta"]) for r in rotations]
    print(f"[deep_forcing] reference {REFERENCE['repo']}@{commit}")
    print(f"[deep_forcing] chunks={args.chunks} calls={len(calls)} draws={len(rec.draws)} latents {summary}")
    print(f"[deep_forcing] compressions at chunks {n_comp} (start frames {[c * 3 for c in n_comp]}), "
          f"{len(events)} layer-events; reuse-limit exclusions per event: "
          f"{[e['candidates_excluded_by_reuse'] for e in events]}")
    print(f"[deep_forcing] sink rotations (label, layer, delta): {deltas}")
    print(f"[deep_forcing] stubbed modules actually imported: {C.used_stubs()}")

    decisions = dict(compressions=events, sink_rotations=rotations, cache_layout_changes=per_call)
    scheduler = pipe.scheduler
    denoise = [float(x) for x in pipe.denoising_step_list]
    sig = []
    for tt in denoise:
        idx = int(torch.argmin((scheduler.timesteps - tt).abs()))
        sig.append(float(scheduler.sigmas[idx]))

    meta = dict(
        method="deep_forcing",
        reference=dict(REFERENCE, commit_recorded_by_driver=commit,
                       files_sha256={f: C.file_sha256(os.path.join(checkout, f)) for f in REFERENCE["files"]}),
        driver="tools/golden/deep_forcing.py",
        tiny_model=dict(TINY, latent_hw=list(LATENT_HW), tokens_per_frame=F_, frames_per_chunk=FRAMES_PER_CHUNK,
                        head_dim=TINY["dim"] // TINY["num_heads"], weight_seed=args.weight_seed,
                        weight_init="tools/golden/_common.py:randomise_"),
        policy=dict(MODEL_KWARGS, capacity_tokens=MODEL_KWARGS["budget"] * F_, window_tokens=MODEL_KWARGS["recent"] * F_,
                    sink_tokens=MODEL_KWARGS["sink_size"] * F_, cache_tokens=MODEL_KWARGS["local_attn_size"] * F_),
        pipeline=dict(PIPE_ARGS, warped_timesteps=denoise, sigmas=sig, chunks=args.chunks, frames=n_frames,
                      calls_per_chunk=["D1", "D2", "D3", "D4", "CTX"], context_timestep=0.0,
                      timestep_sinusoid=args.sinusoid),
        seeds=dict(noise_seed=args.noise_seed, global_seed=args.global_seed),
        patches=PATCHES,
        stubbed_modules=C.used_stubs(),
        calls=calls,
        draw_order=rec.meta,
        tensors={
            "noise_initial": "[B=1, F, C, H, W] float32; the pipeline's `noise` argument (chunk c uses frames 3c..3c+2)",
            "conditioning": "[B=1, text_len, text_dim] float32; prompt_embeds (== text_len, so no zero padding)",
            "renoise": "[N, B*3, C, H, W] float32; the torch.randn_like draws in draw_order (3 per chunk, after D1, D2, "
                       "D3; shape of denoised_pred.flatten(0, 1)); add_noise(x0, eps, next t) re-noises to the next step",
            "latents": "[B=1, F, C, H, W] float32; pipeline output = final x0 (D4) of every chunk",
        },
        weights="weights.safetensors: CausalWanModelDeepForcing.state_dict() (original Wan key names) stored as "
                "bfloat16; the reference ran in float32 with exactly these values (upcast .float() is exact)",
        outputs_summary=summary,
        decisions_file="decisions.json",
    )

    if args.compare:
        from safetensors.torch import load_file
        import json
        ref = load_file(os.path.join(args.compare, "tensors.safetensors"))
        d = (latents - ref["latents"]).abs().max().item()
        dec = json.load(open(os.path.join(args.compare, "decisions.json")))
        same = dec == json_roundtrip(decisions)
        per_chunk = (latents - ref["latents"]).abs().flatten(2).amax(-1)[0].view(-1, FRAMES_PER_CHUNK).amax(-1)
        print(f"[deep_forcing] compare to {args.compare}: max|latents diff| = {d:.3e}; decisions identical: {same}")
        print(f"[deep_forcing] per-chunk max|diff|: {[float('%.2e' % x) for x in per_chunk]}")

    if not args.no_save:
        from safetensors.torch import save_file
        os.makedirs(args.out, exist_ok=True)
        save_file(weights, os.path.join(args.out, "weights.safetensors"))
        save_file({"noise_initial": noise.contiguous(), "conditioning": cond.contiguous(),
                   **draws, "latents": latents.contiguous()},
                  os.path.join(args.out, "tensors.safetensors"))
        C.dump_json(meta, os.path.join(args.out, "golden.json"))
        C.dump_json_lines(decisions, os.path.join(args.out, "decisions.json"))
        print(f"[deep_forcing] wrote {args.out}")
    return latents, decisions


def json_roundtrip(obj):
    import json
    return json.loads(json.dumps(obj))


if __name__ == "__main__":
    main()
