"""The drift lab: a small AR video model trained here, on procedural scenes whose ground truth is known.

Submodules:

- :mod:`cachepolicy.lab.scenes`: seeded scenes (flat sprites bouncing over a gradient), prompts, ground truth.
- :mod:`cachepolicy.lab.text`: prompt -> text embedding ``[L, text_dim]`` for Wan's cross-attention.
- :mod:`cachepolicy.lab.latent`: the fixed, exactly invertible pixel <-> latent transform (pixel-unshuffle).
- :mod:`cachepolicy.lab.model`: the stock ``WanTransformer3DModel`` configuration and block-causal masking.
- :mod:`cachepolicy.lab.train`: diffusion-forcing training (``python -m cachepolicy.lab.train``).
- :mod:`cachepolicy.lab.sampling`: a reference chunk-by-chunk sampler and PNG sample grids.
- :mod:`cachepolicy.lab.metrics`: ground-truth metrics (background, sprite count/colour/size, drift, flicker).
- :mod:`cachepolicy.lab.checkpoint`: safetensors weights + JSON config directories.

Frames are ``float32 [T, 3, H, W]`` in ``[-1, 1]`` everywhere in the lab.
"""
