"""Euler ancestral (k-diffusion's sample_euler_ancestral) as diffusers' EulerAncestralDiscreteScheduler runs
it: steps in sigma space, x = x0 + sigma * noise, with noise re-injected after each deterministic step."""

import torch
from torch import Tensor

from .schedule import SIGMAS, Plan, draw_noise, leading_timesteps


class EulerAncestral(Plan):
    def __init__(self, steps: int, start: int):
        super().__init__(leading_timesteps(steps), start)
        self.sigmas = torch.cat([SIGMAS[self.schedule], torch.zeros(1)])
        # "leading" spacing: the first timestep sits below t = 999, and the reference scales by the variance
        # of x_t there, sqrt(sigma^2 + 1), rather than by sigma alone.
        self.init_noise_sigma = float((self.sigmas.max() ** 2 + 1) ** 0.5)

    def scale_model_input(self, x: Tensor, i: int) -> Tensor:
        sigma = self.sigmas[self.start + i]
        return x / ((sigma**2 + 1) ** 0.5)

    def step(self, eps: Tensor, i: int, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        sigma, sigma_next = self.sigmas[self.start + i], self.sigmas[self.start + i + 1]
        x = x.to(torch.float32)
        x0 = x - sigma * eps
        # Split the way down to sigma_next into a deterministic part (sigma_down) and fresh noise (sigma_up).
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        # Drawn at the last step too (where sigma_up is 0), to consume the generator as the reference does.
        return (x + draw_noise(generators, eps) * sigma_up).to(eps.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        sigma = self.sigmas.to(x0.device, x0.dtype)[self.start]
        return x0 + noise * sigma
