"""The drift lab's fixed, exactly invertible pixel <-> latent transform (no learned VAE).

``encode`` rearranges every ``factor x factor`` block of pixels into channels (pixel-unshuffle), so
frames ``[B, T, 3, H, W]`` in ``[-1, 1]`` become latents ``[B, 3 * factor**2, T, H / factor, W / factor]``
in Wan's ``(batch, channels, frames, height, width)`` layout, and ``decode`` is its exact inverse (a pure
permutation of values: ``decode(encode(x))`` equals ``x`` bit for bit). With the model's patch size
``(1, 1, 1)`` one latent position is one token, i.e. one token covers ``factor x factor`` pixels.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from cachepolicy.lab.errors import LatentShapeError

__all__ = ["PixelUnshuffleLatent"]


@attrs.frozen
class PixelUnshuffleLatent:
    """Pixel-unshuffle by ``factor``: ``[B, T, 3, H, W]`` <-> ``[B, 3 * factor**2, T, H / factor, W / factor]``."""

    factor: int = 2

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.factor, int) or self.factor < 1:
            raise LatentShapeError(f"PixelUnshuffleLatent.factor must be a positive int, got {self.factor!r}")

    @property
    def channels(self) -> int:
        """Latent channels, ``3 * factor**2``."""
        return 3 * self.factor**2

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` (or ``[T, 3, H, W]``, treated as ``B = 1``) -> latents ``[B, C, T, h, w]``."""
        frames = torch.as_tensor(frames)
        if frames.ndim == 4:
            frames = frames.unsqueeze(0)
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise LatentShapeError(f"expected frames [B, T, 3, H, W], got {tuple(frames.shape)}")
        b, t, _, h, w = frames.shape
        if h % self.factor or w % self.factor:
            raise LatentShapeError(f"frame size {h}x{w} is not divisible by the unshuffle factor {self.factor}")
        z = F.pixel_unshuffle(frames.reshape(b * t, 3, h, w), self.factor)
        return z.reshape(b, t, self.channels, h // self.factor, w // self.factor).permute(0, 2, 1, 3, 4).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, T, h, w]`` -> frames ``[B, T, 3, h * factor, w * factor]``."""
        latents = torch.as_tensor(latents)
        if latents.ndim != 5 or latents.shape[1] != self.channels:
            raise LatentShapeError(
                f"expected latents [B, {self.channels}, T, h, w], got {tuple(latents.shape)}"
            )
        b, c, t, h, w = latents.shape
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = F.pixel_shuffle(z, self.factor)
        return x.reshape(b, t, 3, h * self.factor, w * self.factor).contiguous()
