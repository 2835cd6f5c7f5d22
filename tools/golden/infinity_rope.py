#!/usr/bin/env python
"""Record golden fixtures from the official Infinity-RoPE code (yesiltepe-hidir/infinity-rope).

Drives the checkout's own ``pipeline.causal_inference.CausalInferencePipeline`` (multi-scene prompts, KV flush at
every prompt switch, RoPE cut at switches marked ``#``) and ``wan.modules.causal_model.CausalWanModel``
(block-relativistic RoPE over raw cached keys) on CPU, fp32, with a tiny random model. No reference file is edited;
every deviation is a monkeypatch or data-structure shim listed in the fixture JSON. See tools/golden/README.md.

    python tools/golden/infinity_rope.py --checkout /tmp/infinityrope
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)

import torch  # noqa: E402

REFERENCE = dict(
    repo="yesiltepe-hidir/infinity-rope",
    commit="63d7b84f043a2536ccb62d5171ed54dfadc0a721",
    files=["pipeline/causal_inference.py", "wan/modules/causal_model.py", "utils/wan_wrapper.py",
           "utils/scheduler.py", "wan/modules/model.py", "configs/self_forcing_dmd.yaml", "configs/default_config.yaml"],
    note="official code of the paper (arXiv 2511.20649)",
)

TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=64,
            text_dim=32, out_dim=16, num_heads=4, num_layers=3, qk_norm=True, cross_attn_norm=True, eps=1e-6)
LATENT_HW = (6, 8)
FRAME_TOKENS = (LATENT_HW[0] // 2) * (LATENT_HW[1] // 2)
FRAMES_PER_CHUNK = 3

# configs/self_forcing_dmd.yaml (+ default_config.yaml), unchanged: window 6 frames, sink 1 frame
MODEL_KWARGS = dict(timestep_shift=5.0, local_attn_size=6, sink_size=1)
PIPE_ARGS = dict(denoising_step_list=[1000, 750, 500, 250], warp_denoising_step=True, num_frame_per_block=3,
                 independent_first_frame=False, context_noise=0)
# 5 scenes of 3 blocks each ("2.25s" -> int(2.25 * 16 / (4 * 3)) = 3 blocks; the last scene takes the rest).
# '#' on a scene marks the switch *after* it as a scene cut: switches at blocks 3, 6 plain; 9, 12 cuts.
PROMPT = "scene0[2.25s] | scene1[2.25s] | scene2[2.25s#] | scene3[2.25s#] | scene4"
N_SCENES = 5

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
                                                                    "infinity_rope")))
    ap.add_argument("--chunks", type=int, default=15)
    ap.add_argument("--weight-seed", type=int, default=0)
    ap.add_argument("--noise-seed", type=int, default=1)
    ap.add_argument("--global-seed", type=int, default=2)
    ap.add_argument("--sinusoid", choices=["fp64", "fp32"], default="fp64")
    ap.add_argument("--replay")
    ap.add_argument("--compare")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)

    C.setup_torch(1)
    checkout = os.path.abspath(args.checkout)
    commit = C.git_head(checkout)
    sys.path.insert(0, checkout)
    C.install_stubs(["ftfy", "easydict", "einops", "omegaconf", "torchvision", "xfuser", "lmdb", "wandb", "av",
                     "cv2", "open_clip", "dominate", "peft", "imageio"])
    with C.cuda_device_query_at_import():
        import wan.modules.attention as WA
        import wan.modules.model as WM
        import wan.modules.causal_model as CM
        import utils.wan_wrapper as WW
        from pipeline import CausalInferencePipeline
    PATCHES.append(dict(target="torch.cuda.current_device (during imports only)",
                        why="wan/modules/t5.py:478 and demo_utils/memory.py:9 query the CUDA device at import"))

    patch(CM, "attention", C.sdpa_attention, "self-attention: Wan's CPU fallback casts to bfloat16; fp32 SDPA")
    patch(WM, "flash_attention", C.sdpa_attention, "cross-attention asserts CUDA flash-attn; fp32 SDPA, no mask")
    patch(WA, "attention", C.sdpa_attention, "same, for any other importer")
    patch(WA, "flash_attention", C.sdpa_attention, "same, for any other importer")
    if args.sinusoid == "fp32":
        patch(CM, "sinusoidal_embedding_1d", C.sinusoidal_embedding_1d_fp32,
              "SENSITIVITY RUN ONLY: float32 timestep sinusoid (diffusers style)")

    F_ = FRAME_TOKENS
    W = MODEL_KWARGS["local_attn_size"]

    def tiny_from_pretrained(cls, path, **kw):
        kw.pop("low_cpu_mem_usage", None)
        kw.pop("device_map", None)
        return cls(**TINY, **kw)

    patch(CM.CausalWanModel, "from_pretrained", classmethod(tiny_from_pretrained),
          "no checkpoint: build the tiny config with the wrapper's local_attn_size / sink_size")

    C.Rescaled1560.frame_tokens = F_
    C.Rescaled1560.log = []

    class FlushShimDict(dict):
        """kv_flush (a closure inside CausalInferencePipeline.inference) sets local_end_index = 4680 (3 x 1560)."""
        log: list = []

        def __setitem__(self, key, value):
            if key == "local_end_index" and int(value.reshape(-1)[0]) == 3 * 1560:
                value = torch.tensor([3 * F_], dtype=torch.long, device=value.device)
                FlushShimDict.log.append(key)
            super().__setitem__(key, value)

    def _initialize_kv_cache(self, batch_size, dtype, device):
        m = self.generator.model
        hd = m.dim // m.num_heads
        size = self.local_attn_size * self.frame_seq_length if self.local_attn_size != -1 else 32760
        self.kv_cache1 = [FlushShimDict({
            "k": torch.zeros([batch_size, size, m.num_heads, hd], dtype=dtype, device=device).as_subclass(C.Rescaled1560),
            "v": torch.zeros([batch_size, size, m.num_heads, hd], dtype=dtype, device=device).as_subclass(C.Rescaled1560),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "scene_cut": False}) for _ in range(self.num_transformer_blocks)]

    patch(CausalInferencePipeline, "_initialize_kv_cache", _initialize_kv_cache,
          "KV buffers hard-coded [B, S, 12, 128] (pipeline/causal_inference.py:375-376) -> [B, 6*12, 4, 16]; the "
          "K/V tensors are _common.Rescaled1560 and the per-layer dicts FlushShimDict so that kv_flush's hard-coded "
          "token offsets k[:, 1560:4680] = k[:, -3120:] and local_end_index = 4680 (pipeline/causal_inference.py:"
          "214-222, a closure that cannot be replaced) address the tiny frames: [F:3F] = [-2F:], local_end = 3F")

    generator = WW.WanDiffusionWrapper(**MODEL_KWARGS, is_causal=True)
    model = generator.model
    C.randomise_(model, args.weight_seed)
    for blk in model.blocks:
        blk.self_attn.max_attention_size = W * F_
    PATCHES.append(dict(target="blocks[i].self_attn.max_attention_size",
                        why="local_attn_size * 1560 (wan/modules/causal_model.py:104) -> 6 * 12"))

    g = torch.Generator().manual_seed(args.noise_seed)
    n_frames = args.chunks * FRAMES_PER_CHUNK
    noise = torch.randn([1, n_frames, TINY["in_dim"], *LATENT_HW], generator=g)
    cond = torch.randn([N_SCENES, 1, TINY["text_len"], TINY["text_dim"]], generator=g)
    scene_names = [f"scene{i}" for i in range(N_SCENES)]

    class SceneText(torch.nn.Module):
        def forward(self, text_prompts):
            (tp,) = text_prompts
            return {"prompt_embeds": cond[scene_names.index(tp)]}

    import types
    pipe = CausalInferencePipeline(types.SimpleNamespace(**PIPE_ARGS, model_kwargs=MODEL_KWARGS),
                                   device=torch.device("cpu"), generator=generator, text_encoder=SceneText(),
                                   vae=C.FakeVAE())
    pipe.num_transformer_blocks = TINY["num_layers"]
    pipe.frame_seq_length = F_
    PATCHES.append(dict(target="CausalInferencePipeline.num_transformer_blocks / frame_seq_length",
                        why="hard-coded 30 / 1560 (pipeline/causal_inference.py:33-34) -> 3 / 12"))
    PATCHES.append(dict(target="text encoder / VAE",
                        why="bypassed: the text encoder maps scene prompt 'sceneI' to conditioning[I]; dummy decode"))

    # ---- tracing ----------------------------------------------------------------------------------------------
    tr = C.CallTracer(F_, FRAMES_PER_CHUNK)
    tr.attach(generator)
    raw_bank: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(TINY["num_layers"])}
    cur: dict = {}
    per_call: list[dict] = []
    flushes: list[dict] = []

    orig_brr = CM.block_relativistic_rope

    def brr_rec(x, grid_sizes, freqs, start_frame=0, scene_cut=False):
        f = int(grid_sizes[0][0])
        pos = list(range(start_frame, start_frame + f - 3)) + [45, 46, 47] if scene_cut else \
            list(range(start_frame, start_frame + f))
        cur.setdefault("rope_calls", []).append(dict(start_frame=int(start_frame), frames=f, scene_cut=bool(scene_cut),
                                                     positions=pos))
        return orig_brr(x, grid_sizes, freqs, start_frame=start_frame, scene_cut=scene_cut)

    patch(CM, "block_relativistic_rope", brr_rec, "RECORDING ONLY: wraps the original, returns its result")

    def normk_hook(i):
        def hook(mod, a, out):
            k = out.view(out.shape[0], out.shape[1], TINY["num_heads"], -1)[0]
            start = cur["current_start"]
            for j in range(k.shape[0]):
                raw_bank[i][start + j] = k[j].clone()
        return hook

    def attn_pre(i):
        def hook(mod, a, kw):
            cur["layer"] = i
            cur["current_start"] = a[6]      # called positionally: (x, seq_lens, grid_sizes, freqs, block_mask,
            #                                    kv_cache, current_start, cache_start) (causal_model.py:378-381)
            cur["rope_calls"] = []
        return hook

    def frame_of_rows(i, rows):
        ids = C.identify_rows(rows, raw_bank[i])
        return ids

    def attn_post(i):
        def hook(mod, a, kw, out):
            kv = a[5]
            le = int(kv["local_end_index"].item())
            k = kv["k"][0, :le]
            # slot 0..F-1: the sink, stored rotated at temporal position 0; verify against the reference's own rope
            sink_raw = torch.stack([raw_bank[i][t] for t in range(F_)])[None]
            gs = torch.tensor([[1, LATENT_HW[0] // 2, LATENT_HW[1] // 2]])
            sink_ok = bool(torch.equal(orig_brr(sink_raw, gs, model.freqs, start_frame=0).type_as(sink_raw)[0],
                                       k[:F_]))
            ids = frame_of_rows(i, k[F_:])
            if any(x is None for x in ids):
                raise RuntimeError(f"layer {i}: cached raw key matches no key of this layer")
            frames = [0] + [ids[j] // F_ for j in range(0, len(ids), F_)]
            for j in range(0, len(ids), F_):
                assert ids[j:j + F_] == list(range(ids[j], ids[j] + F_)), "cache slots hold whole frames in order"
            q_rope, k_rope = cur["rope_calls"]
            rec = dict(tr.call_label(), layer=i, local_end=le, scene_cut=bool(kv.get("scene_cut", False)),
                       cache_frames=frames, sink_slot_is_frame0_at_position0=sink_ok,
                       query_positions=q_rope["positions"],
                       key_positions=[0] + k_rope["positions"][1:])
            if i == 0:
                per_call.append(rec)
            else:   # every layer must see the same positions and frames
                ref = per_call[-1]
                for key in ("local_end", "scene_cut", "cache_frames", "query_positions", "key_positions"):
                    assert ref[key] == rec[key], (key, ref[key], rec[key])
        return hook

    for i, blk in enumerate(model.blocks):
        blk.self_attn.register_forward_pre_hook(attn_pre(i), with_kwargs=True)
        blk.self_attn.register_forward_hook(attn_post(i), with_kwargs=True)
        blk.self_attn.norm_k.register_forward_hook(normk_hook(i))

    def gen_pre(mod, a, kw):
        c = tr.call
        if c["call"] == "D1":
            n_map = len(C.Rescaled1560.log)
            n_le = len(FlushShimDict.log)
            if n_map or n_le:
                flushes.append(dict(before_chunk=c["chunk"], start_frame=c["start_frame"],
                                    scene_cut=bool(pipe.kv_cache1[0]["scene_cut"]),
                                    crossattn_reset=not pipe.crossattn_cache[0]["is_init"],
                                    offsets_rescaled=[list(x) for x in C.Rescaled1560.log[:4]],
                                    local_end_after_flush=int(pipe.kv_cache1[0]["local_end_index"].item())))
                C.Rescaled1560.log.clear()
                FlushShimDict.log.clear()

    generator.register_forward_pre_hook(gen_pre, with_kwargs=True)   # runs after the tracer's pre-hook

    replay = None
    if args.replay:
        from safetensors.torch import load_file
        order = json.load(open(os.path.join(args.replay, "golden.json")))["draw_order"]
        replay = C.unpack_draws(load_file(os.path.join(args.replay, "tensors.safetensors")), order)

    weights = C.state_dict_exact(model, torch.bfloat16)
    torch.manual_seed(args.global_seed)
    with C.DrawRecorder(tr.draw_label, replay=replay) as rec:
        _, latents = pipe.inference(noise=noise, text_prompts=[PROMPT], return_latents=True)
    latents = latents.detach().clone()
    summary = C.tensor_summary(latents)
    draws = C.pack_draws(rec)
    scene_of_chunk = [min(c // 3, N_SCENES - 1) for c in range(args.chunks)]
    print(f"[infinity_rope] reference {REFERENCE['repo']}@{commit}")
    print(f"[infinity_rope] chunks={args.chunks} calls={len(tr.calls)} draws={len(rec.draws)} latents {summary}")
    print(f"[infinity_rope] flushes: {[(f['before_chunk'], 'cut' if f['scene_cut'] else 'plain') for f in flushes]}")
    rolled = [r["chunk"] for r in per_call if r["call"] == "D1" and r["cache_frames"][1] != 1]
    print(f"[infinity_rope] window full from chunk 1; FIFO eviction at D1 of chunks {rolled}")
    cuts = sorted({r["chunk"] for r in per_call if r["scene_cut"]})
    print(f"[infinity_rope] RoPE cut (positions 45..47) in chunks {cuts}")
    for r in per_call:
        if r["call"] in ("D1",) and r["chunk"] in (0, 1, 2, 3, 9):
            print(f"[infinity_rope]   {r['label']}: frames {r['cache_frames']} keys@{r['key_positions']} "
                  f"queries@{r['query_positions']}")
    print(f"[infinity_rope] stubbed modules actually imported: {C.used_stubs()}")

    scheduler = pipe.scheduler
    denoise = [float(x) for x in pipe.denoising_step_list]
    sig = [float(scheduler.sigmas[int(torch.argmin((scheduler.timesteps - t).abs()))]) for t in denoise]
    decisions = dict(flushes=flushes, calls=per_call)
    meta = dict(
        method="infinity_rope",
        reference=dict(REFERENCE, commit_recorded_by_driver=commit,
                       files_sha256={f: C.file_sha256(os.path.join(checkout, f)) for f in REFERENCE["files"]}),
        driver="tools/golden/infinity_rope.py",
        tiny_model=dict(TINY, latent_hw=list(LATENT_HW), tokens_per_frame=F_, frames_per_chunk=FRAMES_PER_CHUNK,
                        head_dim=TINY["dim"] // TINY["num_heads"], weight_seed=args.weight_seed,
                        weight_init="tools/golden/_common.py:randomise_"),
        policy=dict(MODEL_KWARGS, prompt=PROMPT, scene_of_chunk=scene_of_chunk, switch_blocks=[3, 6, 9, 12],
                    cut_blocks=[9, 12], rope_cut_positions=[45, 46, 47], fps=16),
        pipeline=dict(PIPE_ARGS, warped_timesteps=denoise, sigmas=sig, chunks=args.chunks, frames=n_frames,
                      calls_per_chunk=["D1", "D2", "D3", "D4", "CTX"], context_timestep=0.0,
                      timestep_sinusoid=args.sinusoid),
        seeds=dict(noise_seed=args.noise_seed, global_seed=args.global_seed),
        patches=PATCHES,
        stubbed_modules=C.used_stubs(),
        calls=tr.calls,
        draw_order=rec.meta,
        tensors={
            "noise_initial": "[B=1, F, C, H, W] float32; the pipeline's `noise` (chunk c uses frames 3c..3c+2)",
            "conditioning": "[n_scenes=5, B=1, text_len, text_dim] float32; prompt_embeds of scene I = conditioning[I] "
                            "(scene of chunk c = policy.scene_of_chunk[c])",
            "renoise": "[N, B*3, C, H, W] float32; torch.randn_like draws (after D1, D2, D3 of each chunk)",
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
        same = dec == json.loads(json.dumps(decisions))
        per_chunk = (latents - ref["latents"]).abs().flatten(2).amax(-1)[0].view(-1, FRAMES_PER_CHUNK).amax(-1)
        print(f"[infinity_rope] compare to {args.compare}: max|latents diff| = {d:.3e}; decisions identical: {same}")
        print(f"[infinity_rope] per-chunk max|diff|: {[float('%.2e' % x) for x in per_chunk]}")

    if not args.no_save:
        from safetensors.torch import save_file
        os.makedirs(args.out, exist_ok=True)
        save_file(weights, os.path.join(args.out, "weights.safetensors"))
        save_file({"noise_initial": noise.contiguous(), "conditioning": cond.contiguous(), **draws,
                   "latents": latents.contiguous()}, os.path.join(args.out, "tensors.safetensors"))
        C.dump_json(meta, os.path.join(args.out, "golden.json"))
        C.dump_json_lines(decisions, os.path.join(args.out, "decisions.json"))
        print(f"[infinity_rope] wrote {args.out}")
    return latents, decisions


if __name__ == "__main__":
    main()
