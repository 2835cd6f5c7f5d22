#!/usr/bin/env python
"""Record golden fixtures from the official Forcing-KV code (zju-jiyicheng/Forcing-KV).

Drives the checkout's own ``pipeline.causal_inference_forcingkv.CausalInferencePipeline_ForcingKV`` and
``wan.modules.causal_model_forcingkv.CausalWanModel`` (through ``utils.wan_wrapper.WanDiffusionWrapper``,
``method='forcingkv'``) on CPU, fp32, with a tiny random model and a head-role file written for it. No reference file
is edited; every deviation is a monkeypatch listed in the fixture JSON. See tools/golden/README.md.

    python tools/golden/forcing_kv.py --checkout /tmp/forcingkv
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

import torch  # noqa: E402

REFERENCE = dict(
    repo="zju-jiyicheng/Forcing-KV",
    commit="50ac1f454348e7f0a2e54bde71e1652b20c09fe6",
    files=["pipeline/causal_inference_forcingkv.py", "wan/modules/causal_model_forcingkv.py", "utils/wan_wrapper.py",
           "utils/scheduler.py", "wan/modules/model.py", "wan/modules/rope_triton.py",
           "wan/modules/extract_head_triton.py", "configs/forcing-kv/forcingkv_self_forcing_inference.yaml"],
    note="official code of the paper (arXiv 2605.09681)",
)

TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=64,
            text_dim=32, out_dim=16, num_heads=4, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6)
LATENT_HW = (6, 8)                      # -> 3 x 4 = 12 tokens per frame; 6 segments of 2 tokens (half a row)
FRAME_TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
FRAMES_PER_CHUNK = 3

# configs/forcing-kv/forcingkv_self_forcing_inference.yaml, unchanged (all lengths are in frames)
MODEL_KWARGS = dict(local_attn_size=-1, timestep_shift=5.0, sink_size=1)
FORCINGKV = dict(ar_start=1, spatial_context_length=1, temporal_context_length=1, dynamic_context_length=1,
                 teacache_enabled=False, teacache_threshold=0.2, dynamic_temporal_enabled=True, num_frame_patch=6,
                 sim_retention_ratio=0.33, use_offline_head=True, offline_head_file=None, quantization_enabled=False)
PIPE_ARGS = dict(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
                 context_noise=0, output_folder="/nonexistent")

# Head roles of the tiny model, in the reference's JSON format (configs_head/*.json). Layer 0 is never split by the
# reference (causal_model_forcingkv.py:923-924); its entry is required by nothing but kept for the format.
HEADS = {
    "format": "forcingkv_offline_head_custom2",
    "profile": "golden_tiny_manual",
    "num_layers": TINY["num_layers"],
    "num_heads": TINY["num_heads"],
    "description": "hand-written roles for the tools/golden tiny model (not calibrated): layer 1 splits 2 static / 2 "
                   "dynamic, layer 2 splits 1 static / 3 dynamic, so the layer-1 segment selection is reused by a "
                   "layer with a different dynamic-head count",
    "layers": [
        {"layer_idx": 0, "static_head": [0, 1], "dynamic_head": [2, 3]},
        {"layer_idx": 1, "static_head": [0, 2], "dynamic_head": [1, 3]},
        {"layer_idx": 2, "static_head": [1], "dynamic_head": [0, 2, 3]},
    ],
}

PATCHES: list[dict] = []


def patch(obj, name, value, why):
    setattr(obj, name, value)
    where = f"{obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else obj.__name__
    PATCHES.append(dict(target=f"{where}.{name}", why=why))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--checkout", required=True)
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "..", "tests", "fixtures", "golden",
                                                                    "forcing_kv")))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--weight-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=1)
    ap.add_argument("--global-seed", type=int, default=2)
    ap.add_argument("--sinusoid", choices=["fp64", "fp32"], default="fp64")
    ap.add_argument("--rope", choices=["triton-fp32", "fp64"], default="triton-fp32",
                    help="fp64: the module's own float64 causal_rope_apply instead (sensitivity check only)")
    ap.add_argument("--replay")
    ap.add_argument("--compare")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    C.setup_torch(1)
    checkout = os.path.abspath(args.checkout)
    commit = C.git_head(checkout)
    sys.path.insert(0, checkout)
    if args.no_save:
        import tempfile
        heads_path = os.path.join(tempfile.mkdtemp(prefix="golden_fkv_"), "heads_tiny.json")
    else:
        os.makedirs(args.out, exist_ok=True)
        heads_path = os.path.join(args.out, "heads_tiny.json")
    C.dump_json(HEADS, heads_path)

    C.install_stubs(["ftfy", "easydict", "einops", "omegaconf", "torchvision", "xfuser", "lmdb", "wandb", "av",
                     "cv2", "open_clip", "dominate", "peft", "sageattention", "imageio", "matplotlib"])
    if C.install_triton_stub():
        PATCHES.append(dict(target="triton, triton.language (stub modules)",
                            why="not installed on CPU; rope_triton.py / extract_head_triton.py import it at module "
                                "level; @triton.jit kernels become objects that raise if launched"))
    with C.cuda_device_query_at_import():
        import wan.modules.attention as WA
        import wan.modules.model as WM
        import wan.modules.causal_model_forcingkv as FKV
        import wan.modules.extract_head_triton as EHT
        import utils.wan_wrapper as WW
        from pipeline.causal_inference_forcingkv import CausalInferencePipeline_ForcingKV
    PATCHES.append(dict(target="torch.cuda.current_device (during imports only)",
                        why="wan/modules/t5.py:478 and utils/memory.py:9 query the CUDA device at import"))

    patch(FKV, "attention", C.sdpa_attention,
          "self-attention (both head groups): wan/modules/attention.py would cast to bfloat16 on CPU; fp32 SDPA")
    patch(WM, "flash_attention", C.sdpa_attention, "cross-attention asserts CUDA flash-attn; fp32 SDPA, no mask")
    patch(WA, "attention", C.sdpa_attention, "same, for any other importer")
    patch(WA, "flash_attention", C.sdpa_attention, "same, for any other importer")
    if args.rope == "triton-fp32":
        patch(FKV, "rope_apply_triton", C.rope_apply_fp32_interleaved,
              "Triton kernel (wan/modules/rope_triton.py:8-112) -> the same fp32 complex64 arithmetic in torch "
              "(_common.rope_apply_fp32_interleaved)")
    else:
        def rope64(x, grid_sizes, freqs, start_frame=0):   # x = cat([q, k]) along batch; grid_sizes has B rows
            return torch.cat([FKV.causal_rope_apply(u, grid_sizes, freqs, start_frame) for u in x.chunk(2, dim=0)])
        patch(FKV, "rope_apply_triton", rope64,
              "SENSITIVITY RUN ONLY: float64 causal_rope_apply of the same module instead of the fp32 Triton kernel")
    patch(FKV, "extract_heads_triton", EHT.extract_heads_torch,
          "Triton kernel -> the reference's own torch version in the same file (extract_head_triton.py:110-119)")
    if args.sinusoid == "fp32":
        patch(FKV, "sinusoidal_embedding_1d", C.sinusoidal_embedding_1d_fp32,
              "SENSITIVITY RUN ONLY: float32 timestep sinusoid (diffusers style)")

    F_ = FRAME_TOKENS

    def tiny_from_pretrained(cls, path, **kw):
        return cls(**TINY, **kw)

    patch(FKV.CausalWanModel, "from_pretrained", classmethod(tiny_from_pretrained),
          "no checkpoint: build the tiny config with the wrapper's local_attn_size / sink_size")

    def _initialize_kv_cache(self, batch_size, dtype, device, kv_cache_size_override=None):
        m = self.generator.model
        hd = m.dim // m.num_heads
        z = lambda: torch.zeros([batch_size, 0, m.num_heads, hd], dtype=dtype, device=device)  # noqa: E731
        self.kv_cache1 = [{"sink_k": z(), "sink_v": z(), "local_k": z(), "local_v": z()}
                          for _ in range(self.num_transformer_blocks)]

    patch(CausalInferencePipeline_ForcingKV, "_initialize_kv_cache", _initialize_kv_cache,
          "empty caches hard-coded [B, 0, 12, 128] (pipeline/causal_inference_forcingkv.py:272-296) -> [B, 0, 4, 16]")

    generator = WW.WanDiffusionWrapper(**MODEL_KWARGS, is_causal=True, method="forcingkv")
    model = generator.model
    C.randomise_(model, args.weight_seed)

    g = torch.Generator().manual_seed(args.noise_seed)
    n_frames = args.chunks * FRAMES_PER_CHUNK
    noise = torch.randn([1, n_frames, TINY["in_dim"], *LATENT_HW], generator=g)
    cond = torch.randn([1, TINY["text_len"], TINY["text_dim"]], generator=g)

    fkv_args = types.SimpleNamespace(**dict(FORCINGKV, offline_head_file=os.path.abspath(heads_path)))
    pipe_args = types.SimpleNamespace(**PIPE_ARGS, forcingkv=fkv_args,
                                      model_kwargs=types.SimpleNamespace(**MODEL_KWARGS))
    pipe = CausalInferencePipeline_ForcingKV(pipe_args, device=torch.device("cpu"), generator=generator,
                                             text_encoder=C.FakeTextEncoder(cond), vae=C.FakeVAE())
    pipe.num_transformer_blocks = TINY["num_layers"]
    PATCHES.append(dict(target="CausalInferencePipeline_ForcingKV.num_transformer_blocks",
                        why="hard-coded 30 (pipeline/causal_inference_forcingkv.py:59) -> 3; frame_seq_length is "
                            "recomputed by inference() as H*W//4 = 12"))
    PATCHES.append(dict(target="text encoder / VAE", why="bypassed (fixed conditioning; dummy decode)"))
    PATCHES.append(dict(target="offline_head_file", why="absolute path of the tiny model's role file "
                                                         "(tests/fixtures/golden/forcing_kv/heads_tiny.json)"))
    PATCHES.append(dict(target="inference(profile=False, low_memory=False)",
                        why="config says profile: true, which needs torch.cuda.Event; timing only"))

    # ---- tracing ----------------------------------------------------------------------------------------------
    tr = C.CallTracer(F_, FRAMES_PER_CHUNK)
    tr.attach(generator)
    SA = FKV.CausalWanSelfAttention
    bank: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(TINY["num_layers"])}   # layer -> id -> k row
    cur: dict = {}
    selections: list[dict] = []
    layouts: list[dict] = []

    orig_rope = FKV.rope_apply_triton

    def rope_rec(x, grid_sizes, freqs, start_frame=0):
        out = orig_rope(x, grid_sizes, freqs, start_frame)
        cur["roped_key"] = out.chunk(2, dim=0)[1]
        cur["start_token"] = start_frame * F_
        return out

    FKV.rope_apply_triton = rope_rec

    def attn_pre(i):
        def hook(mod, a):
            cur["layer"] = i
        return hook

    def attn_post(i):
        def hook(mod, a, out):
            if tr.call["call"] == "CTX":       # clean keys: the only ones that can enter a cache
                k = cur["roped_key"][0]
                for j in range(k.shape[0]):
                    bank[i][cur["start_token"] + j] = k[j].clone()
        return hook

    for i, blk in enumerate(model.blocks):
        blk.self_attn.register_forward_pre_hook(attn_pre(i))
        blk.self_attn.register_forward_hook(attn_post(i))

    orig_dc = SA.dynamic_compression

    def dc_rec(self, layer_idx, old_temporal_k, old_temporal_v, new_temporal_k, new_temporal_v, num_frame_patch,
               dynamic_keep_tokens, grid_h, grid_w, dynamic_cache_k, dynamic_cache_v):
        n = orig_dc(self, layer_idx, old_temporal_k, old_temporal_v, new_temporal_k, new_temporal_v, num_frame_patch,
                    dynamic_keep_tokens, grid_h, grid_w, dynamic_cache_k, dynamic_cache_v)
        if layer_idx == 1:
            s = tr.call["start_frame"]
            seg = F_ // int(num_frame_patch)
            idx = [int(i) for i in SA.shared_dynamic_chunk_indices]
            frames = [s - 1 + c // int(num_frame_patch) for c in idx]
            selections.append(dict(
                tr.call_label(), layer=layer_idx, candidate_frames=[s - 1, s, s + 1], boundary_frame=s + 2,
                segment_tokens=seg, keep_chunk_indices=idx,
                keep_frame_segment=[[f, c % int(num_frame_patch)] for f, c in zip(frames, idx)],
                keep_token_ids=C.compact_ranges(sorted(t for f, c in zip(frames, idx)
                                                        for t in range(f * F_ + (c % int(num_frame_patch)) * seg,
                                                                       f * F_ + (c % int(num_frame_patch) + 1) * seg))),
                patch_scores=[[float(v) for v in row] for row in SA.shared_dynamic_patch_score],
                dynamic_valid_tokens=int(n)))
        return n

    patch(SA, "dynamic_compression", dc_rec, "RECORDING ONLY: wraps the original method, returns its result")
    PATCHES.append(dict(target="causal_model_forcingkv.rope_apply_triton (recording wrapper around the CPU rope)",
                        why="RECORDING ONLY: keeps the post-RoPE clean keys to identify cached rows bit for bit"))

    def ring(kv, name, ptr_key, valid_key):
        from wan.modules.causal_model_forcingkv import _materialize_ring_view
        t = kv[name]
        return _materialize_ring_view(t, int(kv.get(ptr_key, 0)), int(kv.get(valid_key, t.shape[1])), name)

    def ids_of(rows, layer, heads):
        b = {tid: r[heads] for tid, r in bank[layer].items()}
        got = C.identify_rows(rows[0], b)
        if any(x is None for x in got):
            raise RuntimeError(f"layer {layer}: a cached row matches no clean key of this layer")
        return got

    def gen_post(mod, a, kw, out):
        if tr.call["call"] != "CTX":
            return
        for i, kv in enumerate(pipe.kv_cache1):
            rec = dict(tr.call_label(), layer=i, switched=bool(kv.get("cache_switched", False)))
            grouped = rec["switched"] and i != 0 and "headgroup_last" in kv
            if not grouped:
                allh = list(range(TINY["num_heads"]))
                rec["all_heads"] = dict(heads=allh,
                                        sink=C.compact_ranges(ids_of(kv["sink_k"], i, allh)),
                                        local=C.compact_ranges(ids_of(kv["local_k"], i, allh)))
            else:
                sh, dh = kv["headgroup_last"], kv["headgroup_mid"]
                dyn = kv["group_dynamic_temporal_k"][:, :int(kv.get("group_dynamic_temporal_valid_tokens", 0))]
                rec["static_heads"] = dict(
                    heads=list(sh), sink=C.compact_ranges(ids_of(kv["group_sink_spatial_k"], i, sh)),
                    anchor=C.compact_ranges(ids_of(ring(kv, "group_spatial_k", "group_spatial_write_ptr",
                                                        "group_spatial_valid_tokens"), i, sh)))
                rec["dynamic_heads"] = dict(
                    heads=list(dh), sink=C.compact_ranges(ids_of(kv["group_sink_temporal_k"], i, dh)),
                    dynamic=ids_of(dyn, i, dh) and C.compact_ranges(ids_of(dyn, i, dh)),
                    anchor=C.compact_ranges(ids_of(ring(kv, "group_temporal_k", "group_temporal_write_ptr",
                                                        "group_temporal_valid_tokens"), i, dh)))
            layouts.append(rec)

    generator.register_forward_hook(gen_post, with_kwargs=True)

    replay = None
    if args.replay:
        from safetensors.torch import load_file
        order = json.load(open(os.path.join(args.replay, "golden.json")))["draw_order"]
        replay = C.unpack_draws(load_file(os.path.join(args.replay, "tensors.safetensors")), order)

    weights = C.state_dict_exact(model, torch.bfloat16)
    torch.manual_seed(args.global_seed)
    with C.DrawRecorder(tr.draw_label, replay=replay) as rec:
        _, latents = pipe.inference(noise=noise, text_prompts=["golden"], return_latents=True, profile=False,
                                    low_memory=False, num_output_frames=n_frames)
    latents = latents.detach().clone()
    summary = C.tensor_summary(latents)
    draws = C.pack_draws(rec)
    switch_at = [r["chunk"] for r in layouts if r["switched"] and r["layer"] == 1][:1]
    print(f"[forcing_kv] reference {REFERENCE['repo']}@{commit}")
    print(f"[forcing_kv] chunks={args.chunks} calls={len(tr.calls)} draws={len(rec.draws)} latents {summary}")
    print(f"[forcing_kv] warm-up chunks 0..{FORCINGKV['ar_start']}, head-group switch after CTX of chunk {switch_at}; "
          f"segment selections at {[s['label'] for s in selections]}")
    for s in selections:
        print(f"[forcing_kv]   {s['label']}: keep (frame, segment) {s['keep_frame_segment']}")
    print(f"[forcing_kv] stubbed modules actually imported: {C.used_stubs()}")

    scheduler = pipe.scheduler
    denoise = [float(x) for x in pipe.denoising_step_list]
    sig = [float(scheduler.sigmas[int(torch.argmin((scheduler.timesteps - t).abs()))]) for t in denoise]
    decisions = dict(segment_selections=selections, cache_after_ctx=layouts)
    meta = dict(
        method="forcing_kv",
        reference=dict(REFERENCE, commit_recorded_by_driver=commit,
                       files_sha256={f: C.file_sha256(os.path.join(checkout, f)) for f in REFERENCE["files"]}),
        driver="tools/golden/forcing_kv.py",
        tiny_model=dict(TINY, latent_hw=list(LATENT_HW), tokens_per_frame=F_, frames_per_chunk=FRAMES_PER_CHUNK,
                        head_dim=TINY["dim"] // TINY["num_heads"], weight_seed=args.weight_seed,
                        weight_init="tools/golden/_common.py:randomise_"),
        policy=dict(model_kwargs=MODEL_KWARGS, forcingkv={k: v for k, v in FORCINGKV.items() if k != "offline_head_file"},
                    head_roles_file="heads_tiny.json", segment_tokens=F_ // FORCINGKV["num_frame_patch"],
                    dynamic_keep_segments=round(3 * FORCINGKV["num_frame_patch"] * FORCINGKV["sim_retention_ratio"])),
        pipeline=dict(PIPE_ARGS, warped_timesteps=denoise, sigmas=sig, chunks=args.chunks, frames=n_frames,
                      calls_per_chunk=["D1", "D2", "D3", "D4", "CTX"], context_timestep=0.0,
                      timestep_sinusoid=args.sinusoid, rope=args.rope),
        seeds=dict(noise_seed=args.noise_seed, global_seed=args.global_seed),
        patches=PATCHES,
        stubbed_modules=C.used_stubs(),
        calls=tr.calls,
        draw_order=rec.meta,
        tensors={
            "noise_initial": "[B=1, F, C, H, W] float32; the pipeline's `noise` (chunk c uses frames 3c..3c+2)",
            "conditioning": "[B=1, text_len, text_dim] float32; prompt_embeds",
            "renoise": "[N, B*3, C, H, W] float32; torch.randn_like draws in draw_order (after D1, D2, D3 of each chunk)",
            "latents": "[B=1, F, C, H, W] float32; pipeline output = final x0 (D4) of every chunk",
        },
        weights="weights.safetensors: CausalWanModel.state_dict() (original Wan key names) stored as bfloat16; the "
                "reference ran in float32 with exactly these values",
        outputs_summary=summary,
        decisions_file="decisions.json",
    )

    if args.compare:
        from safetensors.torch import load_file
        ref = load_file(os.path.join(args.compare, "tensors.safetensors"))
        d = (latents - ref["latents"]).abs().max().item()
        dec = json.load(open(os.path.join(args.compare, "decisions.json")))
        same_sel = [s["keep_chunk_indices"] for s in dec["segment_selections"]] == \
                   [s["keep_chunk_indices"] for s in selections]
        same = dec == json.loads(json.dumps(decisions))
        per_chunk = (latents - ref["latents"]).abs().flatten(2).amax(-1)[0].view(-1, FRAMES_PER_CHUNK).amax(-1)
        print(f"[forcing_kv] compare to {args.compare}: max|latents diff| = {d:.3e}; selections identical: "
              f"{same_sel}; decisions identical: {same}")
        print(f"[forcing_kv] per-chunk max|diff|: {[float('%.2e' % x) for x in per_chunk]}")

    if not args.no_save:
        from safetensors.torch import save_file
        save_file(weights, os.path.join(args.out, "weights.safetensors"))
        save_file({"noise_initial": noise.contiguous(), "conditioning": cond.contiguous(),
                   **draws, "latents": latents.contiguous()},
                  os.path.join(args.out, "tensors.safetensors"))
        C.dump_json(meta, os.path.join(args.out, "golden.json"))
        C.dump_json_lines(decisions, os.path.join(args.out, "decisions.json"))
        print(f"[forcing_kv] wrote {args.out}")
    return latents, decisions


if __name__ == "__main__":
    main()
