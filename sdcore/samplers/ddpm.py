"""DDPM ancestral sampling (Ho et al. 2020) on a subsequence of the 1000 training steps, as diffusers'
DDPMScheduler runs it: fixed_small variance, epsilon prediction, no clipping."""

import torch
from torch import Tensor

from .schedule import ALPHAS_CUMPROD, Plan, draw_noise, leading_timesteps

ONE = torch.tensor(1.0)


class DDPM(Plan):
    def __init__(self, steps: int, start: int):
        super().__init__(leading_timesteps(steps), start)

    def step(self, eps: Tensor, i: int, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        k = self.start + i
        alpha_prod = ALPHAS_CUMPROD[self.schedule[k]]
        alpha_prod_prev = ALPHAS_CUMPROD[self.schedule[k + 1]] if k + 1 < len(self.schedule) else ONE
        # One step spans 1000 // steps training steps: its beta is the product over them, not betas[t].
        alpha = alpha_prod / alpha_prod_prev
        beta = 1 - alpha

        x0 = (x - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
        # Posterior mean of q(x_prev | x_t, x0), eq. 7 of the paper.
        x0_coeff = (alpha_prod_prev**0.5 * beta) / (1 - alpha_prod)
        x_coeff = alpha**0.5 * (1 - alpha_prod_prev) / (1 - alpha_prod)
        mean = x0_coeff * x0 + x_coeff * x

        # The offset keeps every t >= 1, so noise is drawn at every step, the last one included.
        variance = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod) * beta, min=1e-20)
        return mean + variance**0.5 * draw_noise(generators, eps)
