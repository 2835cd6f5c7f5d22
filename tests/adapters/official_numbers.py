"""The timesteps and sigmas each system's official inference code feeds its model, recorded once.

How they were obtained: each repository was checked out at the commit below and its own modules were
imported and run on a CPU (torch 2.13.0): ``utils/wan_wrapper.py``'s ``WanDiffusionWrapper.__init__``
(which builds ``FlowMatchScheduler(shift=timestep_shift, sigma_min=0.0, extra_one_step=True)`` and calls
``set_timesteps(1000, training=True)``), the pipeline's ``__init__`` (which warps ``denoising_step_list``
through the scheduler's table when ``warp_denoising_step`` is true) and its whole ``inference`` loop (Rolling
Forcing: ``inference_rolling_forcing``; CausVid: ``InferencePipeline.inference`` with start latents), with
the configuration file named below. Only the transformer, the text encoder and the VAE were replaced by
stubs (no weights exist here); the stub transformer recorded the ``t`` tensor of every call. Then:

* ``TIMESTEPS``: the distinct values of ``t`` the model received in the denoising calls, in step order
  (float32 tensors, int64 for CausVid; the context pass receives 0);
* ``SIGMAS``: ``-_convert_flow_pred_to_x0(flow=1, xt=0, t)`` of their wrapper at each of those timesteps,
  i.e. the sigma of ``x0 = xt - sigma * flow`` (float64 of a float32 table entry). Their
  ``scheduler.add_noise(0, 1, t)`` returns the same value at every step, so re-noising uses it too.

The values below are Python floats that hold the float32 numbers exactly. No official code is in this
repository; these are recorded numbers only.
"""

from __future__ import annotations

SOURCES = {
    "self-forcing": "guandeh17/Self-Forcing@33593df3e81fa3ec10239271dd2c100facac6de1 configs/self_forcing_dmd.yaml "
                    "(+ configs/default_config.yaml), pipeline/causal_inference.py, utils/wan_wrapper.py, "
                    "utils/scheduler.py",
    "longlive": "NVlabs/LongLive@7add41d68fdc665e1d9804cdd65a6a1ee7a6f467 configs/longlive_inference.yaml, "
                "pipeline/causal_inference.py, utils/wan_wrapper.py, utils/scheduler.py",
    "rolling-forcing": "TencentARC/RollingForcing@a1477d09e85dc759a6a6728f55f77f59342ce388 "
                       "configs/rolling_forcing_dmd.yaml (+ configs/default_config.yaml), "
                       "pipeline/rolling_forcing_inference.py, utils/wan_wrapper.py, utils/scheduler.py",
    "causvid": "tianweiy/CausVid@ca2115039172dfa3a02deee1534408a09680f29f configs/wan_causal_dmd.yaml, "
               "causvid/models/wan/causal_inference.py, causvid/models/wan/wan_wrapper.py, "
               "causvid/models/wan/flow_match.py",
}

TIMESTEPS = {
    "self-forcing": (1000.0, 937.5, 833.3333129882812, 625.0),
    "longlive": (1000.0, 937.5, 833.3333129882812, 625.0),
    "rolling-forcing": (1000.0, 952.3810424804688, 882.3529052734375, 769.2307739257812, 555.5556030273438),
    "causvid": (1000.0, 757.0, 522.0),
}

SIGMAS = {
    "self-forcing": (1.0, 0.9375, 0.8333333134651184, 0.625),
    "longlive": (1.0, 0.9375, 0.8333333134651184, 0.625),
    "rolling-forcing": (1.0, 0.9523810148239136, 0.882352888584137, 0.7692307829856873, 0.5555555820465088),
    "causvid": (1.0, 0.7567567229270935, 0.52173912525177),
}
