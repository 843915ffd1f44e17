"""SD 1.5's noise schedule, the step schedules samplers run on it, and `Schedule`, one generation's steps.

The numbers follow diffusers' schedulers built from SD 1.5's scheduler config with timestep_spacing "leading"
and steps_offset 1, operation for operation in fp32, so a trajectory agrees with the reference to the bit.
A schedule function (as k-diffusion's get_sigmas_*) gives the whole schedule of a step count: the timesteps
the model runs at, first to last, as the reference's scheduler.timesteps lists them (one per model call, so
Heun lists most twice), and the sigma of each.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sdcore import params

TRAIN_STEPS = 1000
STEPS_OFFSET = 1

# scaled_linear: linear in sqrt(beta). Computed in fp32 like the reference; the checkpoint's buffers are
# fp64-derived and would not match.
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
ALPHAS_CUMPROD = torch.cumprod(1.0 - BETAS, dim=0)
# Noise-to-signal ratio of x_t = x_0 + sigma * noise (the variance-exploding view Euler and DPM-Solver use).
SIGMAS = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5

# How a sampler's x holds x0 and noise at a step; each diffusers scheduler noises an init image its own way:
#   "alphas_cumprod"  x = sqrt(a) x0 + sqrt(1 - a) noise, a = alphas_cumprod[t]   (DDPM, DDIM, PLMS, LCM)
#   "sigma"           x = x0 + sigma noise, variance exploding                      (Euler, Heun, LMS)
#   "alpha_sigma"     the first, with a = 1 / (sigma^2 + 1) computed from sigma     (DPM-Solver, UniPC)
Space = Literal["alphas_cumprod", "sigma", "alpha_sigma"]


@dataclass(frozen=True, eq=False)
class Schedule:
    """The steps one generation runs, made by `sdcore.samplers.schedule`. Sampling reads it and never changes
    it, so a schedule can serve any number of sample calls, concurrent ones included."""

    sampler: str  # the sampler it was made for; sample() refuses to run another on it
    steps: int  # the whole schedule's step count; img2img runs only its tail
    # long: the timesteps that run, one per model call (img2img: the tail, diffusers' get_timesteps)
    timesteps: Tensor
    sigmas: Tensor  # fp32: the sigma at each of them, then 0, where the last step lands
    space: Space
    # fp32: img2img: the sigmas of the timesteps before the tail, which never run; LMS's coefficients reach
    # back to them, as the reference's do. Empty for txt2img.
    skipped_sigmas: Tensor

    @property
    def init_noise_sigma(self) -> float:
        """The txt2img start is noise * init_noise_sigma. In the variance-exploding space the reference scales
        by sqrt(sigma^2 + 1), the std of x at the first timestep, rather than by sigma: with "leading" spacing
        that timestep sits below t = 999."""
        return float((self.sigmas[0] ** 2 + 1) ** 0.5) if self.space == "sigma" else 1.0

    def noised(self, x0: Tensor, noise: Tensor) -> Tensor:
        """x0 noised to the first timestep that runs (the img2img start), in x0's dtype, as the sampler's
        diffusers scheduler's add_noise does it."""
        if self.space == "alphas_cumprod":
            alpha_prod = ALPHAS_CUMPROD.to(x0.device, x0.dtype)[self.timesteps[0]]
            return alpha_prod**0.5 * x0 + (1 - alpha_prod) ** 0.5 * noise
        sigma = self.sigmas.to(x0.device, x0.dtype)[0]
        if self.space == "sigma":
            return x0 + noise * sigma
        alpha, sigma = alpha_sigma(sigma)
        return alpha * x0 + sigma * noise


def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t noise for a noise-to-signal ratio sigma."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def leading_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """Every (1000 // steps)-th timestep from the top, plus the offset: 3 steps run 667, 334, 1."""
    timesteps = torch.arange(steps - 1, -1, -1) * (TRAIN_STEPS // steps) + STEPS_OFFSET
    return timesteps, SIGMAS[timesteps]


def dpm_solver_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """DPM-Solver's "leading": steps + 1 points 1000 // (steps + 1) apart, t = 0 dropped, then the offset.
    At 999 steps that runs t = 1000, one past the schedule, where the reference (np.interp) holds the last
    sigma: so do we, and the U-Net sees t = 1000 as it does in diffusers."""
    timesteps = torch.arange(steps, 0, -1) * (TRAIN_STEPS // (steps + 1)) + STEPS_OFFSET
    return timesteps, SIGMAS[timesteps.clamp(max=TRAIN_STEPS - 1)]


def karras_schedule(steps: int, rho: float = 7.0) -> tuple[Tensor, Tensor]:
    """Sigmas evenly spaced in sigma^(1/rho) between the schedule's extremes (Karras et al. 2022, eq. 5),
    each mapped to a timestep by interpolating log sigma. In numpy float64 over the fp32 schedule, as the
    reference computes them (duplicate timesteps are possible from about 45 steps on: samplers count steps by
    index, never look them up by timestep)."""
    sigmas = SIGMAS.numpy()
    log_sigmas = np.log(sigmas)
    sigma_min, sigma_max = sigmas[0].item(), sigmas[-1].item()
    ramp = np.linspace(0, 1, steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    karras = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    log_sigma = np.log(np.maximum(karras, 1e-10))
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    timesteps = ((1 - w) * low + w * high).round()
    return torch.from_numpy(timesteps).long(), torch.from_numpy(karras.astype(np.float32))


def heun_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """leading_schedule with every timestep after the first listed twice, as diffusers lists Heun's model
    calls: a step calls the model at its start and again at its end, so t1, t2, ... each end one step and
    start the next; the last step, down to sigma 0, calls it once. 3 steps: 667, 334, 334, 1, 1."""
    timesteps, sigmas = leading_schedule(steps)
    return (torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),
            torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2)]))


def plms_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """leading_schedule with its second timestep listed twice, as diffusers' PNDMScheduler (skip_prk_steps)
    runs PLMS: the first step has no history, so it is a predictor-corrector pair that calls the model at both
    of its ends. 3 steps: 667, 334, 334, 1 (one step: 1)."""
    timesteps, _ = leading_schedule(steps)
    timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    return timesteps, SIGMAS[timesteps]


# LCM (Luo et al. 2023) was distilled on a 50-step schedule (diffusers' original_inference_steps): it runs a
# subset of it, so params lets it run at most that many steps.
LCM_ORIGINAL_STEPS = params.SAMPLERS["lcm"].max_steps


def lcm_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """`steps` of the distillation's timesteps 999, 979, ..., 19, evenly spaced by index (floored), as
    diffusers' LCMScheduler picks them; steps_offset and the spacing setting do not apply. 4 steps: 999, 759,
    499, 259."""
    stride = TRAIN_STEPS // LCM_ORIGINAL_STEPS
    original = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * stride - 1)[::-1]
    picked = np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, num=steps, endpoint=False)).astype(np.int64)
    timesteps = torch.from_numpy(original[picked].copy())
    return timesteps, SIGMAS[timesteps]
