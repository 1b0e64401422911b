"""DDIM sampler with batched classifier-free guidance for the reference digits DiT.

This is the evaluation protocol of the caching experiments (DiT's): ``diffusers.DDIMScheduler`` with
the training noise schedule (linear betas 1e-4..0.02, 1000 steps), 50 steps, classifier-free
guidance 1.5 computed *batched* (one transformer call per step on ``cat([x, x])`` with labels
``cat([labels, null])``). The loop is deliberately plain: caching hooks sit on the transformer's
forward and count the steps themselves; the sampler only announces a new generation.

Scheduler choices (documented because they change the numbers):

* ``set_alpha_to_one=False``: the last DDIM step goes to ``alphas_cumprod[0]`` (= 1 - 1e-4), the
  smallest noise level the model was trained on, instead of a noise-free level it never saw;
* ``clip_sample=False``: no clipping of the predicted x0 inside the loop, as in DiT's latent-space
  sampling (so a cached feature's error propagates unaltered); the final images are clamped to
  [-1, 1];
* ``timestep_spacing="leading"`` (diffusers' default): timesteps 980, 960, ..., 0 for 50 steps.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

__all__ = ["make_ddim_scheduler", "sample_digits"]


def make_ddim_scheduler() -> DDIMScheduler:
    """The DDIM scheduler matching the training noise schedule (see the module docstring)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )


def sample_digits(
    transformer: torch.nn.Module,
    class_labels: torch.Tensor,
    num_steps: int = 50,
    guidance_scale: float = 1.5,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate one 16x16 digit per label; returns (B, 1, 16, 16) images in [-1, 1] (float32, CPU).

    ``transformer`` is a class-conditional ``DiTTransformer2DModel`` (its null class is
    ``config.num_embeds_ada_norm``). Initial noise is drawn on the CPU from ``generator``, so a
    seed gives the same samples whatever the model's device. With ``guidance_scale <= 1`` each
    step is a single, un-doubled conditional call.
    """
    from ...api import begin_generation  # a no-op when caching is off; tells target-NFC mode the steps

    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    cfg = transformer.config
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
    batch = labels.shape[0]
    use_cfg = guidance_scale > 1.0
    null = torch.full_like(labels, cfg.num_embeds_ada_norm)
    model_labels = torch.cat([labels, null]) if use_cfg else labels

    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(num_steps)
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    with torch.no_grad():
        begin_generation(transformer, num_steps)
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="DDIM"):
            model_in = torch.cat([x, x]) if use_cfg else x
            timestep = t.to(device).expand(model_in.shape[0])
            out = transformer(model_in.to(dtype), timestep=timestep, class_labels=model_labels).sample
            out = out.float()
            if use_cfg:
                eps_c, eps_u = out.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            else:
                eps = out
            x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1.0, 1.0).cpu()
