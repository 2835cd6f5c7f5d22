"""Model-side contracts of the core: what an adapter must provide and how models are named.

The core never imports an adapter. Adapters are discovered through the ``cachepolicy`` entry-point group
(:mod:`cachepolicy.registry`); each provides :class:`ModelEntry` objects whose ``loader`` is an import
string, resolved only when that model is loaded, so discovery stays fast.
"""

from __future__ import annotations

import abc
import functools
import importlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from cachepolicy.errors import ParameterError, PluginLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cachepolicy.cache import KVCache
    from cachepolicy.layers import ForwardCall


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParameterError(f"{type(instance).__name__}.{attribute.name} must be a positive integer, got {value!r}")


def _steps(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value or any(not (0.0 < float(t) <= 1000.0) for t in value):
        raise ParameterError(
            f"denoising steps must be a non-empty list of timesteps in (0, 1000], got {list(value)!r}"
        )
    if any(float(b) >= float(a) for a, b in zip(value, value[1:])):
        raise ParameterError(f"denoising steps must be strictly decreasing, got {list(value)!r}")


@attrs.frozen
class Sampler:
    """How one chunk is denoised (Self Forcing's semantics; see docs "Concepts").

    Attributes:
        denoising_steps: timesteps in (0, 1000], strictly decreasing, before warping.
        shift: flow-matching shift used to warp the steps: ``sigma = shift*s / (1 + (shift-1)*s)``.
        warp: whether to warp ``denoising_steps`` through the shift (Self Forcing's ``warp_denoising_step``).
        context_noise: timestep of the clean context pass that commits a chunk (0 = clean).
        noise: what re-noises ``x0`` between steps: ``fresh`` noise (Self Forcing's stochastic sampler, the
            default) or the noise the model ``predicted`` (``eps = x + (1 - sigma) * v``), which makes each
            step the Euler step ``x <- x + (sigma_next - sigma) * v`` of the flow ODE: what an undistilled
            model such as the drift lab needs.
        table: take timesteps and sigmas from the float32 1000-entry training table of the systems'
            ``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000)``
            (:func:`flow_match_table`), exactly as their inference code does; the steps must then be
            integers (their ``denoising_step_list`` is a long tensor). With ``warp`` (Self Forcing,
            LongLive, Rolling Forcing: ``warp_denoising_step``) step ``s`` calls the model with the table's
            float32 timestep ``timesteps[1000 - s]`` (750 -> 937.5, 200 -> 555.5556030273438); without it
            (CausVid) with the raw step (757). Either way the step's sigma is the table entry nearest to
            that timestep, looked up in float64 like their ``_convert_flow_pred_to_x0`` (757 -> 0.75676;
            555.5556030273438 -> 0.5555555820465088). Without ``table``, a warped step's sigma is computed
            in float64 (``shift*s / (1 + (shift-1)*s)``, timestep ``1000 * sigma``) and an unwarped step
            ``t`` has sigma ``t / 1000``: near, but not equal, to the official float32 numbers (docs
            "Recipes").
    """

    denoising_steps: tuple[float, ...] = attrs.field(
        default=(1000.0, 750.0, 500.0, 250.0), converter=lambda v: tuple(float(x) for x in v), validator=_steps
    )
    shift: float = attrs.field(default=5.0, converter=float)
    warp: bool = attrs.field(default=True)
    context_noise: float = attrs.field(default=0.0, converter=float)
    noise: str = attrs.field(default="fresh")
    table: bool = attrs.field(default=False)
    guidance: float = attrs.field(default=1.0, converter=float)

    @table.validator
    def _check_table(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise ParameterError(f"sampler table must be true or false, got {value!r}")
        if value:
            fractional = [t for t in self.denoising_steps if not float(t).is_integer()]
            if fractional:
                raise ParameterError(
                    f"sampler table=true indexes the 1000-entry training table with integer steps (the systems' "
                    f"denoising_step_list is a long tensor), got non-integer steps {fractional}; give integer "
                    f"steps in [1, 1000] or table=false"
                )

    @warp.validator
    def _check_warp(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise ParameterError(f"sampler warp must be true or false, got {value!r}")

    @guidance.validator
    def _check_guidance(self, attribute: attrs.Attribute, value: float) -> None:
        if not (math.isfinite(value) and value >= 0.0):
            raise ParameterError(f"sampler guidance must be a finite scale >= 0 (1 = no guidance), got {value!r}")

    @property
    def guided(self) -> bool:
        """Whether steps run a second, unconditional forward (``guidance != 1``)."""
        return self.guidance != 1.0

    @shift.validator
    def _check_shift(self, attribute: attrs.Attribute, value: float) -> None:
        if not value > 0:
            raise ParameterError(f"sampler shift must be > 0, got {value!r}")

    @noise.validator
    def _check_noise(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ("fresh", "predicted"):
            raise ParameterError(f"sampler noise={value!r} is not allowed; choose fresh or predicted")

    @context_noise.validator
    def _check_ctx(self, attribute: attrs.Attribute, value: float) -> None:
        if not 0.0 <= value < 1000.0:
            raise ParameterError(f"context_noise must be in [0, 1000), got {value!r}")

    def sigmas(self) -> list[float]:
        """Noise levels in (0, 1] of the denoising steps (``x = (1 - sigma) * x0 + sigma * noise``)."""
        if self.table:
            return [table_sigma(t, self.shift) for t in self.timesteps()]
        sigmas = []
        for t in self.denoising_steps:
            s = t / 1000.0
            if self.warp:
                s = self.shift * s / (1.0 + (self.shift - 1.0) * s)
            sigmas.append(s)
        return sigmas

    def timesteps(self) -> list[float]:
        """The timesteps in (0, 1000] the model is called with, one per step: with ``table``, the table's
        float32 timestep ``timesteps[1000 - step]`` when warping and the raw step otherwise; without it
        ``1000 * sigma``."""
        if self.table:
            if not self.warp:
                return list(self.denoising_steps)
            _, timesteps = flow_match_table(self.shift)
            return [timesteps[1000 - int(t)] for t in self.denoising_steps]
        return [1000.0 * s for s in self.sigmas()]

    def to_json(self) -> dict[str, Any]:
        return {
            "denoising_steps": list(self.denoising_steps),
            "shift": self.shift,
            "warp": self.warp,
            "context_noise": self.context_noise,
            "noise": self.noise,
            "table": self.table,
            "guidance": self.guidance,
            "timesteps": self.timesteps(),
            "sigmas": self.sigmas(),
        }


#: ``sampler=`` spec keys (``--model-option sampler=KEY=VALUE,...``) and the :class:`Sampler` fields they set.
SAMPLER_SPEC_KEYS = {"steps": "denoising_steps", "shift": "shift", "warp": "warp", "table": "table",
                     "context_noise": "context_noise", "noise": "noise", "guidance": "guidance"}


def _spec_bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise ParameterError(f"sampler {key}={text!r} is not allowed; write true or false")


def _spec_number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ParameterError(f"sampler {key}={text!r} is not a number") from None


def parse_sampler(value: Any) -> Sampler:
    """A :class:`Sampler` from what a user can write for a model's ``sampler`` option.

    Accepted:

    * a :class:`Sampler` (returned as it is);
    * a recipe name (``"self-forcing"``, ``"causvid"``, ``"longlive"``, ``"rolling-forcing"``): that recipe's
      sampler;
    * a spec ``"KEY=VALUE,KEY=VALUE"``, optionally after a recipe name whose sampler it edits
      (``"rolling-forcing,guidance=3"``). Keys: ``steps`` (``/``-separated timesteps, e.g.
      ``1000/750/500/250``), ``shift``, ``warp`` and ``table`` (true/false), ``context_noise``, ``noise``
      (``fresh`` or ``predicted``), ``guidance``. Unnamed fields keep :class:`Sampler`'s defaults;
    * a mapping of :class:`Sampler` fields (``steps`` is accepted for ``denoising_steps``).

    Anything else raises :class:`~cachepolicy.errors.ParameterError` naming the value and what is allowed.
    """
    if isinstance(value, Sampler):
        return value
    if isinstance(value, Mapping):
        fields = {SAMPLER_SPEC_KEYS.get(key, key): item for key, item in value.items()}
        allowed = {f.name for f in attrs.fields(Sampler)}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ParameterError(f"sampler: unknown field(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
        return Sampler(**fields)
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(
            f"sampler={value!r} is not allowed; give a recipe name (e.g. sampler=self-forcing) or a spec such as "
            f"sampler=steps=1000/750/500/250,shift=5,warp=true,table=true"
        )
    from cachepolicy.recipes import RECIPES, get_recipe

    terms = [term.strip() for term in value.split(",") if term.strip()]
    base = Sampler()
    samplers = [name for name, recipe in RECIPES.items() if recipe.sampler is not None and recipe.stagger is None]
    if terms and "=" not in terms[0]:
        name = terms.pop(0)
        if name not in RECIPES:
            raise ParameterError(
                f"sampler={value!r}: {name!r} is not a recipe ({', '.join(samplers)}); give a recipe name, "
                f"KEY=VALUE terms ({', '.join(SAMPLER_SPEC_KEYS)}) or both, e.g. sampler=causvid or "
                f"sampler=steps=1000/750/500/250,shift=5,warp=true,table=true"
            )
        recipe = get_recipe(name)
        if recipe.sampler is None:
            raise ParameterError(f"sampler={value!r}: recipe {recipe.name!r} has no sampler of its own")
        if recipe.stagger is not None:
            raise ParameterError(
                f"sampler={value!r}: recipe {recipe.name!r} steps with UniPC in its own loop, which a sampler "
                f"cannot select (the per-chunk loop would re-noise at its timesteps instead); run it with "
                f"--recipe {recipe.name} (recipe={recipe.name!r} in Python)"
            )
        base = recipe.sampler
    changes: dict[str, Any] = {}
    for term in terms:
        key, eq, text = term.partition("=")
        key = key.strip()
        if not eq or key not in SAMPLER_SPEC_KEYS:
            raise ParameterError(
                f"sampler term {term!r} is not allowed; write KEY=VALUE with KEY one of "
                f"{', '.join(SAMPLER_SPEC_KEYS)}, optionally after a recipe name ({', '.join(samplers)})"
            )
        if key == "steps":
            try:
                changes["denoising_steps"] = tuple(float(t) for t in text.replace(" ", "/").split("/") if t)
            except ValueError:
                raise ParameterError(f"sampler steps={text!r}: write /-separated timesteps, e.g. "
                                     f"steps=1000/750/500/250") from None
        elif key in ("warp", "table"):
            changes[key] = _spec_bool(key, text)
        elif key == "noise":
            changes[key] = text.strip()
        else:
            changes[SAMPLER_SPEC_KEYS[key]] = _spec_number(key, text)
    return attrs.evolve(base, **changes)


def as_sampler(value: Any) -> Sampler:
    """:func:`parse_sampler`, with None meaning the default :class:`Sampler` (``ModelInfo.sampler``'s converter)."""
    return Sampler() if value is None else parse_sampler(value)


@functools.lru_cache(maxsize=16)
def flow_match_table(shift: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(sigmas, timesteps)``, 1000 entries each (sigma 1 first), of the training table that Self
    Forcing, LongLive, Rolling Forcing and CausVid build (``FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True).set_timesteps(1000)``), computed with the same float32 torch operations in the same
    order: ``s = linspace(1, 0, 1001)[:-1]``, ``sigmas = shift * s / (1 + (shift - 1) * s)``,
    ``timesteps = sigmas * 1000``. The float32 values are returned as Python floats (exact)."""
    import torch

    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    return tuple(sigmas.tolist()), tuple(timesteps.tolist())


def table_sigma(timestep: float, shift: float) -> float:
    """Sigma of the training-table entry (:func:`flow_match_table`) nearest to ``timestep``, looked up in
    float64 like the systems' ``_convert_flow_pred_to_x0`` (the first entry on a tie, as ``argmin``)."""
    import torch

    sigmas, timesteps = flow_match_table(float(shift))
    index = int(torch.argmin((torch.tensor(timesteps, dtype=torch.float64) - float(timestep)).abs()))
    return sigmas[index]


@attrs.frozen
class ModelInfo:
    """Static facts about a loaded model that the engine and policies rely on.

    Units: ``frames_per_chunk``, ``max_frames`` and ``causal_block_frames`` are latent frames;
    ``tokens_per_frame`` is ``token_rows * token_cols`` tokens; latent sizes are latent pixels. ``sampler`` is
    the model's default sampler; anything :func:`parse_sampler` accepts is converted (None: ``Sampler()``),
    anything else is refused with a :class:`~cachepolicy.errors.ParameterError`.

    ``causal_block_frames``: how one model call attends to its own frames. ``n``: in causal blocks of ``n``
    frames, a frame sees its own block and the earlier blocks of the call (SkyReels-V2's diffusion-forcing
    mask, ``num_frame_per_block``); None: every frame of the call sees every other (Wan). Loops that put
    several chunks into one call (a recipe's joint window) depend on it.
    """

    name: str
    adapter: str
    frames_per_chunk: int = attrs.field(validator=_positive)
    latent_channels: int = attrs.field(validator=_positive)
    latent_height: int = attrs.field(validator=_positive)
    latent_width: int = attrs.field(validator=_positive)
    token_rows: int = attrs.field(validator=_positive)
    token_cols: int = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    max_frames: int = attrs.field(validator=_positive)
    device: str
    dtype: str
    sampler: Sampler = attrs.field(factory=Sampler, converter=as_sampler)
    causal_block_frames: int | None = attrs.field(default=None)

    @causal_block_frames.validator
    def _check_blocks(self, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            _positive(self, attribute, value)

    @property
    def tokens_per_frame(self) -> int:
        return self.token_rows * self.token_cols

    @property
    def tokens_per_chunk(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["sampler"] = self.sampler.to_json()
        data["tokens_per_frame"] = self.tokens_per_frame
        return data


class ModelAdapter(abc.ABC):
    """What the engine needs from a model family. One adapter instance wraps one loaded model."""

    info: ModelInfo
    #: a prompt this model can draw, used when a run names none (``cachepolicy run`` without ``--prompt``);
    #: an adapter whose model only takes some prompts (the drift lab's grammar) sets one it takes
    default_prompt: str = "a video"

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Return the conditioning for a batch of prompts (adapter-specific, passed back to :meth:`forward`)."""

    @abc.abstractmethod
    def new_cache(self, batch_size: int, *, rope_mode: str = "absolute", branches: int = 1) -> KVCache:
        """An empty cache on the model's device and dtype for ``batch_size`` samples, with the model's rotary
        embedding (:attr:`KVCache.rotary`).

        ``rope_mode``: ``"absolute"`` stores keys after RoPE at their positions; ``"raw"`` stores keys before
        RoPE and rotates every key it reads (see :class:`~cachepolicy.cache.KVCache`). ``branches``: 2 under
        classifier-free guidance (the unconditional forward's keys and values).
        """

    @abc.abstractmethod
    def check_rollout(self, num_frames: int, batch_size: int) -> None:
        """Raise :class:`~cachepolicy.errors.RolloutConfigError` if ``num_frames`` latent frames cannot be
        generated (e.g. they pass the RoPE table); called before a rollout starts."""

    @abc.abstractmethod
    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor, call: ForwardCall, cache: KVCache,
                conditioning: Any) -> torch.Tensor:
        """Run the model on ``latent`` against the resident cache.

        Args:
            latent: ``[B, C, F, H, W]`` noisy (or clean, for a context pass) latent of ``call.num_frames`` frames.
            timesteps: ``[B, F]`` float timesteps in [0, 1000] on the CPU, one per latent frame.
            call: the forward (:class:`~cachepolicy.layers.ForwardCall`): its RoPE positions
                (``rope_start``), the guidance ``branch``, the resident tokens it attends to (``visible``) and
                their positions (``rope_positions``, a ``raw`` cache).
            cache: the resident context; inside :meth:`KVCache.forward` every self-attention layer calls
                :meth:`KVCache.attend`, which writes the call's keys/values into the provisional slot (the
                engine makes them resident with :meth:`KVCache.commit` after a context pass).
            conditioning: what :meth:`encode_prompts` returned.

        Returns:
            The model output (flow velocity) ``[B, C, F, H, W]`` in the model's dtype.
        """

    def token_grid(self, latent: torch.Tensor) -> torch.Tensor:
        """Lay a latent ``[B, C, F, H, W]`` out on the cache's token grid: ``[B, F, N, D]``.

        ``N`` is ``tokens_per_frame`` (row-major over ``token_rows x token_cols``), ``D`` the values of
        one token's patch. Policies that reason about latent tokens (TokenTrim) need it.
        """
        raise NotImplementedError(f"adapter {self.info.adapter!r} provides no token-grid mapping")

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode latents ``[B, C, F, H, W]`` to pixels ``[B, F', 3, H', W']`` in [0, 1].

        Models without a decoder raise ``NotImplementedError`` (reports then show a latent preview).
        """
        raise NotImplementedError(f"model {self.info.name!r} has no decoder")

    def ground_truth(self, prompt: str, seed: int, num_frames: int) -> Any:
        """Ground truth of the scene a prompt and seed describe, for metrics that use it (else None)."""
        return None

    def weights_id(self) -> str | None:
        """A content id of the weights this adapter runs (16 hex digits), or None if it cannot tell.

        Two loads of the same weights in the same dtype give the same id, whatever file, folder or device
        they came from; any changed value (or dtype) changes it. ``compare`` records it with every job and
        refuses to resume a folder whose results came from other weights. Adapters over a torch module
        return :func:`module_weights_id` of it.
        """
        return None


def module_weights_id(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's ``state_dict``: every entry's name, dtype, shape and bytes.

    Reads each tensor once (moved to the CPU one at a time, so a model on a GPU is not copied whole);
    about 0.8 s per GiB here (2 CPU cores, fp32).
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


@attrs.frozen
class ModelEntry:
    """A named model that an adapter plugin can load.

    Attributes:
        name: the model name used on the command line (``tiny-wan``).
        adapter: the adapter family (``wan``).
        loader: ``"module:function"``; called as ``function(**options)`` and returns a :class:`ModelAdapter`.
        summary: one line for ``cachepolicy plugins``.
        provides_ground_truth: the adapter's :meth:`ModelAdapter.ground_truth` describes the scene a prompt
            asks for (so ground-truth metrics apply to this model).
    """

    name: str
    adapter: str
    loader: str
    summary: str = ""
    provides_ground_truth: bool = False

    def loader_function(self) -> Any:
        """The function :attr:`loader` names (imported now)."""
        module_name, _, attr = self.loader.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise PluginLoadError(f"cannot load model {self.name!r}: {self.loader!r} failed: {exc}") from exc

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Check loader ``options`` before anything is loaded: names, simple types, numbers a tensor holds,
        the device (see :func:`cachepolicy.validation.check_loader_options`), a ``sampler`` spec
        (:func:`parse_sampler`)."""
        from cachepolicy.validation import check_loader_options

        check_loader_options(self.name, self.loader_function(), options)
        if "sampler" in options:
            parse_sampler(options["sampler"])

    def load(self, **options: Any) -> ModelAdapter:
        """Check ``options`` (:meth:`check_options`), then call the loader with them (a ``sampler`` option
        parsed with :func:`parse_sampler`)."""
        self.check_options(options)
        if "sampler" in options:
            options = {**options, "sampler": parse_sampler(options["sampler"])}
        return self.loader_function()(**options)
