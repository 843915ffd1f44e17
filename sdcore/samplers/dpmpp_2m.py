"""DPM-Solver++(2M) (Lu et al. 2022) as diffusers' DPMSolverMultistepScheduler runs it with SD 1.5's config:
data prediction, midpoint solver, first order on the first and the last step (final sigma zero), with its
own "leading" spacing or with Karras et al.'s sigmas."""

import numpy as np
import torch
from torch import Tensor

from .schedule import SIGMAS, STEPS_OFFSET, TRAIN_STEPS, Plan


def leading_schedule(steps: int) -> tuple[Tensor, Tensor]:
    """DPM-Solver's "leading": steps + 1 points 1000 // (steps + 1) apart, t = 0 dropped, then the offset.
    At 999 steps that runs t = 1000, one past the schedule, where the reference (np.interp) holds the last
    sigma: so do we, and the U-Net sees t = 1000 as it does in diffusers."""
    timesteps = torch.arange(steps, 0, -1) * (TRAIN_STEPS // (steps + 1)) + STEPS_OFFSET
    return timesteps, SIGMAS[timesteps.clamp(max=TRAIN_STEPS - 1)]


def karras_schedule(steps: int, rho: float = 7.0) -> tuple[Tensor, Tensor]:
    """Sigmas evenly spaced in sigma^(1/rho) between the schedule's extremes (Karras et al. 2022, eq. 5),
    each mapped to a timestep by interpolating log sigma. In numpy float64 over the fp32 schedule, as the
    reference computes them (duplicate timesteps are possible from about 45 steps on: steps are counted by
    index, never looked up by timestep)."""
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


def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x0 + sigma_t noise for a noise-to-signal ratio sigma."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def log_snr(sigma: Tensor) -> Tensor:
    alpha, sigma = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)


class DPMSolverPP2M(Plan):
    def __init__(self, steps: int, start: int, karras: bool):
        timesteps, sigmas = karras_schedule(steps) if karras else leading_schedule(steps)
        super().__init__(timesteps, start)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        # The multistep history: the previous step's x0 prediction, and how many steps this plan has run.
        self.x0_prev = None
        self.steps_done = 0

    def step(self, eps: Tensor, i: int, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        if i != self.steps_done:
            raise ValueError(f"step index i={i}: DPM++ 2M steps in order; the next step is {self.steps_done}")
        k = self.start + i
        alpha_s, sigma_s = alpha_sigma(self.sigmas[k])
        x0 = (x - sigma_s * eps) / alpha_s

        alpha_t, sigma_t = alpha_sigma(self.sigmas[k + 1])
        h = log_snr(self.sigmas[k + 1]) - log_snr(self.sigmas[k])
        x = x.to(torch.float32)
        if i == 0 or k == len(self.schedule) - 1:
            # First order (DPM-Solver++ 1 = DDIM): no history yet, or the final step down to sigma 0.
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            h_prev = log_snr(self.sigmas[k]) - log_snr(self.sigmas[k - 1])
            d1 = (1.0 / (h_prev / h)) * (x0 - self.x0_prev)
            x_next = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        self.x0_prev = x0
        self.steps_done += 1
        return x_next.to(x0.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = alpha_sigma(self.sigmas.to(x0.device, x0.dtype)[self.start])
        return alpha * x0 + sigma * noise
