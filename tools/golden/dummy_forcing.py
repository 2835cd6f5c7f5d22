#!/usr/bin/env python
"""Record golden fixtures from the official Dummy Forcing code (csguoh/DummyForcing).

Drives the checkout's own ``pipeline.causal_inference.CausalInferencePipeline`` and
``wan.modules.causal_model.CausalWanModel`` (+ ``wan/modules/dummyforcing.py``) on CPU, fp32, with a tiny random
model. No reference file is edited; every deviation is a monkeypatch listed in the fixture JSON.
See tools/golden/README.md.

    python tools/golden/dummy_forcing.py --checkout /tmp/dummyforcing
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
    repo="csguoh/DummyForcing",
    commit="28128ed6204dcb4c572bf8719955124a5f2dbe20",
    files=["pipeline/causal_inference.py", "wan/modules/causal_model.py", "wan/modules/dummyforcing.py",
           "utils/wan_wrapper.py", "utils/scheduler.py", "wan/modules/model.py", "wan/modules/rope_triton.py",
           "wan/modules/extract_head_triton.py", "configs/self_forcing_inference.yaml"],
    note="official code of the paper (arXiv 2601.20499); zju-jiyicheng/Forcing-KV@50ac1f45 carries the same "
         "wan/modules/dummyforcing.py logic (whitespace/import differences only)",
)

TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=64,
            text_dim=32, out_dim=16, num_heads=4, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6)
LATENT_HW = (6, 8)
FRAME_TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
FRAMES_PER_CHUNK = 3
REAL_HEADS = 30 * 12

# configs/self_forcing_inference.yaml; num_dummy scaled from 180 of 360 heads to the same half of 3 x 4 = 12
MODEL_KWARGS = dict(local_attn_size=12, timestep_shift=5.0, sink_size=3)
DUMMY = dict(denoise_start=0, ar_start=1, local_context_length=1, num_dummy=180, teacache_enabled=False,
             teacache_threshold=0.2)
PIPE_ARGS = dict(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
                 context_noise=0)

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
                                                                    "dummy_forcing")))
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--weight-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=1)
    ap.add_argument("--global-seed", type=int, default=5,
                    help="5 (of 2..5 tried): layers 0 and 2 hold all three groups, layer 1 an empty mid group")
    ap.add_argument("--sinusoid", choices=["fp64", "fp32"], default="fp64")
    ap.add_argument("--rope", choices=["triton-fp32", "fp64"], default="triton-fp32")
    ap.add_argument("--replay")
    ap.add_argument("--compare")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    C.setup_torch(1)
    checkout = os.path.abspath(args.checkout)
    commit = C.git_head(checkout)
    sys.path.insert(0, checkout)

    C.install_stubs(["ftfy", "easydict", "einops", "omegaconf", "torchvision", "xfuser", "lmdb", "wandb", "av",
                     "cv2", "open_clip", "dominate", "peft", "sageattention", "imageio"])
    if C.install_triton_stub():
        PATCHES.append(dict(target="triton, triton.language (stub modules)",
                            why="not installed on CPU; rope_triton.py / extract_head_triton.py import it at module "
                                "level; @triton.jit kernels become objects that raise if launched"))
    with C.cuda_device_query_at_import():
        import wan.modules.attention as WA
        import wan.modules.model as WM
        import wan.modules.causal_model as CM
        import wan.modules.dummyforcing as DF
        import wan.modules.extract_head_triton as EHT
        import utils.wan_wrapper as WW
        from pipeline.causal_inference import CausalInferencePipeline
    PATCHES.append(dict(target="torch.cuda.current_device (during imports only)",
                        why="wan/modules/t5.py and utils/memory.py:9 query the CUDA device at import"))

    patch(CM, "attention", C.sdpa_attention,
          "self-attention (all head groups): wan/modules/attention.py would cast to bfloat16 on CPU; fp32 SDPA")
    patch(WM, "flash_attention", C.sdpa_attention, "cross-attention asserts CUDA flash-attn; fp32 SDPA, no mask")
    patch(WA, "attention", C.sdpa_attention, "same, for any other importer")
    patch(WA, "flash_attention", C.sdpa_attention, "same, for any other importer")
    if args.rope == "triton-fp32":
        patch(CM, "rope_apply_triton", C.rope_apply_fp32_interleaved,
              "Triton kernel (wan/modules/rope_triton.py) -> the same fp32 complex64 arithmetic in torch")
    else:
        def rope64(x, grid_sizes, freqs, start_frame=0):
            return torch.cat([CM.causal_rope_apply(u, grid_sizes, freqs, start_frame) for u in x.chunk(2, dim=0)])
        patch(CM, "rope_apply_triton", rope64, "SENSITIVITY RUN ONLY: float64 causal_rope_apply of the same module")
    patch(CM, "extract_heads_triton", EHT.extract_heads_torch,
          "Triton kernel -> the reference's own torch version in the same file (extract_heads_torch)")
    if args.sinusoid == "fp32":
        patch(CM, "sinusoidal_embedding_1d", C.sinusoidal_embedding_1d_fp32,
              "SENSITIVITY RUN ONLY: float32 timestep sinusoid (diffusers style)")

    F_ = FRAME_TOKENS
    n_heads_total = TINY["num_layers"] * TINY["num_heads"]
    num_dummy = DUMMY["num_dummy"] * n_heads_total // REAL_HEADS

    def tiny_from_pretrained(cls, path, **kw):
        return cls(**TINY, **kw)

    patch(CM.CausalWanModel, "from_pretrained", classmethod(tiny_from_pretrained),
          "no checkpoint: build the tiny config with the wrapper's local_attn_size / sink_size")

    def _initialize_kv_cache(self, batch_size, dtype, device, kv_cache_size_override=None):
        m = self.generator.model
        hd = m.dim // m.num_heads
        z = lambda: torch.zeros([batch_size, 0, m.num_heads, hd], dtype=dtype, device=device)  # noqa: E731
        self.kv_cache1 = [{"sink_k": z(), "sink_v": z(), "local_k": z(), "local_v": z()}
                          for _ in range(self.num_transformer_blocks)]

    patch(CausalInferencePipeline, "_initialize_kv_cache", _initialize_kv_cache,
          "empty caches hard-coded [B, 0, 12, 128] -> [B, 0, 4, 16]")

    generator = WW.WanDiffusionWrapper(**MODEL_KWARGS, is_causal=True)
    model = generator.model
    C.randomise_(model, args.weight_seed)

    g = torch.Generator().manual_seed(args.noise_seed)
    n_frames = args.chunks * FRAMES_PER_CHUNK
    noise = torch.randn([1, n_frames, TINY["in_dim"], *LATENT_HW], generator=g)
    cond = torch.randn([1, TINY["text_len"], TINY["text_dim"]], generator=g)

    dum_args = types.SimpleNamespace(**dict(DUMMY, num_dummy=num_dummy))
    pipe_args = types.SimpleNamespace(**PIPE_ARGS, dummy_forcing=dum_args,
                                      model_kwargs=types.SimpleNamespace(**MODEL_KWARGS))
    pipe = CausalInferencePipeline(pipe_args, device=torch.device("cpu"), generator=generator,
                                   text_encoder=C.FakeTextEncoder(cond), vae=C.FakeVAE())
    pipe.num_transformer_blocks = TINY["num_layers"]
    PATCHES.append(dict(target="CausalInferencePipeline.num_transformer_blocks",
                        why="hard-coded 30 -> 3; frame_seq_length is recomputed by inference() as H*W//4 = 12"))
    PATCHES.append(dict(target="dummy_forcing.num_dummy", why=f"180 of 30x12 = 360 heads -> {num_dummy} of "
                                                              f"{n_heads_total} (the same half)"))
    PATCHES.append(dict(target="text encoder / VAE", why="bypassed (fixed conditioning; dummy decode)"))

    # ---- tracing ----------------------------------------------------------------------------------------------
    tr = C.CallTracer(F_, FRAMES_PER_CHUNK)
    tr.attach(generator)
    bank: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(TINY["num_layers"])}
    cur: dict = {}
    classification: dict = {}
    layouts: list[dict] = []
    rows_seen: list[dict] = []

    orig_rope = CM.rope_apply_triton

    def rope_rec(x, grid_sizes, freqs, start_frame=0):
        out = orig_rope(x, grid_sizes, freqs, start_frame)
        cur["roped_key"] = out.chunk(2, dim=0)[1]
        cur["start_token"] = start_frame * F_
        return out

    CM.rope_apply_triton = rope_rec
    PATCHES.append(dict(target="causal_model.rope_apply_triton (recording wrapper around the CPU rope)",
                        why="RECORDING ONLY: keeps the post-RoPE clean keys to identify cached rows bit for bit"))

    def attn_pre(i):
        def hook(mod, a):
            cur["layer"] = i
        return hook

    def attn_post(i):
        def hook(mod, a, out):
            if tr.call["call"] == "CTX":
                k = cur["roped_key"][0]
                for j in range(k.shape[0]):
                    bank[i][cur["start_token"] + j] = k[j].clone()
        return hook

    for i, blk in enumerate(model.blocks):
        blk.self_attn.register_forward_pre_hook(attn_pre(i))
        blk.self_attn.register_forward_hook(attn_post(i))

    orig_cls = CM.online_head_classification

    def cls_rec(query, key, ar_start):
        n0 = len(rec.draws)
        out = orig_cls(query, key, ar_start)
        rows = [int(r) for r in rec.draws[n0]] if len(rec.draws) > n0 else None
        rows_seen.append(dict(tr.call_label(), layer=cur["layer"], query_rows=rows,
                              query_tokens=int(query.shape[1]), key_tokens=int(key.shape[1]),
                              mass_first_mid_last=[[float(v) for v in out[j, 0]] for j in range(3)]))
        return out

    patch(CM, "online_head_classification", cls_rec, "RECORDING ONLY: wraps the original, returns its result")

    orig_alloc = CM.heterogeneous_memory_allocation

    def alloc_rec(global_kv_cache, num_dummy=180):
        scores = torch.stack([li["frame_attn_score"][:, 0] for li in global_kv_cache]).transpose(1, 2)
        p0, p1 = scores[:, :, 0].reshape(-1), scores[:, :, 1].reshape(-1)
        p0n, p1n = p0 / p0.sum(), p1 / p1.sum()
        out = orig_alloc(global_kv_cache, num_dummy=num_dummy)
        classification.update(
            label=tr.call_label()["label"], num_dummy=int(num_dummy),
            probs_layer_head_first_mid_last=[[[float(v) for v in scores[l, h]] for h in range(scores.shape[1])]
                                             for l in range(scores.shape[0])],
            p0_norm=[float(v) for v in p0n], p1_norm=[float(v) for v in p1n],
            cost=[float(v) for v in torch.maximum(p0n, p1n)],
            groups=[dict(layer=l, first=list(kv["headgroup_first"]), mid=list(kv["headgroup_mid"]),
                         dummy=list(kv["headgroup_last"])) for l, kv in enumerate(global_kv_cache)])
        return out

    patch(CM, "heterogeneous_memory_allocation", alloc_rec, "RECORDING ONLY: wraps the original")

    def ids_of(rows, layer, heads):
        if len(heads) == 0:          # an empty head group holds rows of zero width: nothing to identify
            return [None] * rows.shape[1]
        b = {tid: r[heads] for tid, r in bank[layer].items()}
        got = C.identify_rows(rows[0], b)
        if any(x is None for x in got):
            raise RuntimeError(f"layer {layer}: a cached row matches no clean key of this layer")
        return got

    def gen_post(mod, a, kw, out):
        if tr.call["call"] != "CTX":
            return
        for i, kv in enumerate(pipe.kv_cache1):
            rec_ = dict(tr.call_label(), layer=i)
            if "headgroup_first" not in kv:
                allh = list(range(TINY["num_heads"]))
                rec_["all_heads"] = dict(heads=allh, sink=C.compact_ranges(ids_of(kv["sink_k"], i, allh)),
                                         local=C.compact_ranges(ids_of(kv["local_k"], i, allh)))
            else:
                first, mid, last = kv["headgroup_first"], kv["headgroup_mid"], kv["headgroup_last"]
                nf = len(first)
                rec_["first_heads"] = dict(heads=list(first),
                                           cache=C.compact_ranges(ids_of(kv["sink_k"][:, :, :nf], i, first)))
                rec_["dummy_heads"] = dict(heads=list(last),
                                           cache=C.compact_ranges(ids_of(kv["sink_k"][:, :, nf:], i, last)))
                rec_["mid_heads"] = dict(heads=list(mid), cache=C.compact_ranges(ids_of(kv["local_k"], i, mid))
                                         if mid else [], tokens=int(kv["local_k"].shape[1]))
            layouts.append(rec_)

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
                                    low_memory=False)
    latents = latents.detach().clone()
    summary = C.tensor_summary(latents)
    draws = C.pack_draws(rec)
    print(f"[dummy_forcing] reference {REFERENCE['repo']}@{commit}")
    print(f"[dummy_forcing] chunks={args.chunks} calls={len(tr.calls)} draws={len(rec.draws)} "
          f"({ {k: list(v.shape) for k, v in draws.items()} }) latents {summary}")
    print(f"[dummy_forcing] classification at {classification.get('label')} with sampled query rows "
          f"{[r['query_rows'] for r in rows_seen]}")
    for gr in classification.get("groups", []):
        print(f"[dummy_forcing]   layer {gr['layer']}: first {gr['first']} mid {gr['mid']} dummy {gr['dummy']}")
    grouped = sorted({r["chunk"] for r in layouts if "first_heads" in r})
    print(f"[dummy_forcing] three-group caches after CTX of chunks {grouped}")
    print(f"[dummy_forcing] stubbed modules actually imported: {C.used_stubs()}")

    scheduler = pipe.scheduler
    denoise = [float(x) for x in pipe.denoising_step_list]
    sig = [float(scheduler.sigmas[int(torch.argmin((scheduler.timesteps - t).abs()))]) for t in denoise]
    decisions = dict(classification=[classification], classification_calls=rows_seen, cache_after_ctx=layouts)
    meta = dict(
        method="dummy_forcing",
        reference=dict(REFERENCE, commit_recorded_by_driver=commit,
                       files_sha256={f: C.file_sha256(os.path.join(checkout, f)) for f in REFERENCE["files"]}),
        driver="tools/golden/dummy_forcing.py",
        tiny_model=dict(TINY, latent_hw=list(LATENT_HW), tokens_per_frame=F_, frames_per_chunk=FRAMES_PER_CHUNK,
                        head_dim=TINY["dim"] // TINY["num_heads"], weight_seed=args.weight_seed,
                        weight_init="tools/golden/_common.py:randomise_"),
        policy=dict(model_kwargs=MODEL_KWARGS, dummy_forcing=dict(DUMMY, num_dummy=num_dummy),
                    num_dummy_reference=DUMMY["num_dummy"], sampled_query_rows=F_ // 3),
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
            "renoise": "[N, B*3, C, H, W] float32; torch.randn_like draws (after D1, D2, D3 of each chunk)",
            "sampled_rows": "[num_layers, F/3] int64; torch.randint query-row draws of online_head_classification "
                            "(one per layer, in layer order, during the CTX pass of chunk ar_start)",
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
        same_groups = dec["classification"][0]["groups"] == classification["groups"]
        same = dec == json.loads(json.dumps(decisions))
        per_chunk = (latents - ref["latents"]).abs().flatten(2).amax(-1)[0].view(-1, FRAMES_PER_CHUNK).amax(-1)
        print(f"[dummy_forcing] compare to {args.compare}: max|latents diff| = {d:.3e}; groups identical: "
              f"{same_groups}; decisions identical: {same}")
        print(f"[dummy_forcing] per-chunk max|diff|: {[float('%.2e' % x) for x in per_chunk]}")

    if not args.no_save:
        from safetensors.torch import save_file
        os.makedirs(args.out, exist_ok=True)
        save_file(weights, os.path.join(args.out, "weights.safetensors"))
        save_file({"noise_initial": noise.contiguous(), "conditioning": cond.contiguous(), **draws,
                   "latents": latents.contiguous()}, os.path.join(args.out, "tensors.safetensors"))
        C.dump_json(meta, os.path.join(args.out, "golden.json"))
        C.dump_json_lines(decisions, os.path.join(args.out, "decisions.json"))
        print(f"[dummy_forcing] wrote {args.out}")
    return latents, decisions


if __name__ == "__main__":
    main()
