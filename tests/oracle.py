"""The equivalence oracle: a cached rollout equals full forwards with the mask implied by its keep sets.

:class:`Recorder` is a policy (it only observes) that logs, for every model forward of a rollout, its
input, timestep, output and the resident token ids per sample, and the resident set each chunk was
committed against. :func:`check_rollout_against_full_forward` replays every logged forward as one stock
diffusers forward over all committed chunks plus the current one, with the block-causal mask restricted
to the logged keep sets, and returns the largest absolute difference.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from cachepolicy.adapters.wan.adapter import WanAdapter, masked_forward
from cachepolicy.cache import metadata_for_chunk
from cachepolicy.engine import RolloutConfig, RolloutResult, Session
from cachepolicy.layers import ForwardCall
from cachepolicy.hookspecs import hookimpl
from cachepolicy.policy import Policy, build_policies


def resident_ids(session) -> list[list[list[torch.Tensor]]]:
    """Global token index (frame * tokens_per_frame + spatial) of the tokens each (layer, head) holds, per
    sample: ``[L][H][B]`` tensors."""
    cache, tpf = session.cache, session.model.tokens_per_frame
    view = cache.view()
    ids = view.frame * tpf + view.spatial_index
    held = cache.held()
    return [[[ids[b][held[layer, head, b]].clone().cpu() for b in range(cache.batch_size)]
             for head in range(cache.num_heads)] for layer in range(cache.num_layers)]


@attrs.frozen
class Recorder(Policy):
    """Observe-only policy that logs every forward and every commit for the oracle."""

    name: ClassVar[str] = "recorder"

    def new_state(self):
        return {"forwards": [], "commits": {}}

    @hookimpl
    def cachepolicy_after_step(self, session, step):
        self.state(session)["forwards"].append({
            "chunk": step.chunk, "attempt": step.attempt, "step": step.step, "timestep": step.timestep,
            "x_t": step.x_t.clone(), "output": step.model_output.clone(), "resident": resident_ids(session),
        })

    @hookimpl
    def cachepolicy_select(self, session, view):
        """The context pass attended to what is held now except the chunk just committed (in-layer edits of the
        context pass included); a prune's earlier call is overwritten by the real selection."""
        chunk_ids = torch.arange(session.chunk * session.model.tokens_per_chunk,
                                 (session.chunk + 1) * session.model.tokens_per_chunk)
        self.state(session)["commits"][session.chunk] = [
            [[ids[~torch.isin(ids, chunk_ids)] for ids in head] for head in layer] for layer in resident_ids(session)]


def oracle_masks(chunk: int, frames_per_chunk: int, tokens_per_frame: int, commits: dict, current: list,
                 batch: int) -> list[torch.Tensor]:
    """Per layer, bool ``[B, H, L, L]``: row block ``j`` of head ``h`` may see what (layer, h) held when chunk
    ``j`` was committed (the current chunk: what it holds now) and its own chunk."""
    tpc = frames_per_chunk * tokens_per_frame
    total = (chunk + 1) * tpc
    masks = []
    for layer, heads in enumerate(current):
        mask = torch.zeros(batch, len(heads), total, total, dtype=torch.bool)
        for j in range(chunk + 1):
            rows = slice(j * tpc, (j + 1) * tpc)
            resident = current if j == chunk else commits[j]
            for head in range(len(heads)):
                for b in range(batch):
                    mask[b, head, rows, rows] = True
                    mask[b, head, rows, resident[layer][head][b]] = True
        masks.append(mask)
    return masks


def check_rollout_against_full_forward(adapter: WanAdapter, result: RolloutResult, records: dict,
                                       context_noise: float = 0.0, guidance: float = 1.0) -> float:
    """Largest |cached - oracle| model output over every forward of the rollout.

    With ``guidance != 1`` the oracle is classifier-free guidance over two full forwards under the same
    mask, one with the prompts and one with the empty prompt: ``u + guidance * (c - u)``.
    """
    info = adapter.info
    F, tpf = info.frames_per_chunk, info.tokens_per_frame
    latents = result.latents
    batch = latents.shape[0]
    conditioning = adapter.encode_prompts(list(result.config.prompts))
    empty = adapter.encode_prompts([""] * batch)
    worst = 0.0
    for fwd in records["forwards"]:
        c = fwd["chunk"]
        x = torch.cat([latents[:, :, : c * F].to(fwd["x_t"].dtype), fwd["x_t"].cpu()], dim=2)
        frame_t = torch.tensor([context_noise] * (c * F) + [fwd["timestep"]] * F, dtype=torch.float32)
        timestep = frame_t.repeat_interleave(tpf).unsqueeze(0).expand(batch, -1)
        mask = oracle_masks(c, F, tpf, records["commits"], fwd["resident"], batch)
        with torch.no_grad():
            full = masked_forward(adapter.model, x, timestep, conditioning.cpu(), mask)
            if guidance != 1.0:
                uncond = masked_forward(adapter.model, x, timestep, empty.cpu(), mask)
                full = uncond + guidance * (full - uncond)
        expected = full[:, :, c * F:]
        worst = max(worst, float((expected - fwd["output"].cpu()).abs().max()))
    return worst


def run_recorded(adapter, registry, spec, num_chunks, seeds, prompts=None, sampler=None):
    """Run ``spec`` (may be empty) with a :class:`Recorder`; returns ``(result, records, session)``."""
    policies = build_policies(spec, registry.policies) if spec else []
    recorder = Recorder()
    prompts = prompts or [f"prompt number {s}" for s in seeds]
    session = Session(adapter, [*policies, recorder], RolloutConfig(
        num_chunks=num_chunks, prompts=prompts, seeds=list(seeds), sampler=sampler))
    result = session.run()
    return result, session.policy_state[recorder.spec], session


def adapter_forward(adapter, latent, timesteps, frame_start, chunk, cache, conditioning, commit, *, rope_start=None,
                    visible=None, rope_positions=None, branch=0):
    """One adapter forward described the short way (a context pass with ``commit``, made resident as the engine
    does); returns the model output."""
    rope_start = frame_start if rope_start is None else rope_start
    call = ForwardCall(chunk=chunk, phase="context" if commit else "step", frame_start=frame_start,
                       num_frames=latent.shape[2], rope_start=rope_start, visible=visible,
                       rope_positions=rope_positions, branch=branch)
    out = adapter.forward(latent, timesteps, call, cache, conditioning)
    if commit:
        info = adapter.info
        cache.commit(metadata_for_chunk(latent.shape[0], frame_start, latent.shape[2], info.token_rows,
                                        info.token_cols, chunk, rope_start=rope_start))
    return out


def layer_keys(cache, layer, branch=0, name="k"):
    """Keys (or values) ``[B, capacity, H, D]`` of ``layer`` when it is one head group."""
    cells = cache.layer_cells(layer, branch)
    assert len(cells) == 1, cells
    return getattr(cells[0], name)


def stacked(cache, name="k", branch=0):
    """Keys (or values) of every layer ``[L, B, capacity, H, D]`` of a cache whose layers are one head group and
    one residency (today's per-token policies)."""
    return torch.stack([layer_keys(cache, layer, branch, name) for layer in range(cache.num_layers)])
