"""DDIM (Song et al. 2020), deterministic at eta = 0, as diffusers' DDIMScheduler runs it with SD 1.5's
config (set_alpha_to_one False, no clipping)."""

import torch
from torch import Tensor

from .schedule import ALPHAS_CUMPROD, TRAIN_STEPS, Plan, draw_noise, leading_timesteps


class DDIM(Plan):
    def __init__(self, steps: int, start: int, eta: float):
        super().__init__(leading_timesteps(steps), start)
        self.stride = TRAIN_STEPS // steps
        self.eta = eta

    def step(self, eps: Tensor, i: int, x: Tensor, generators: list[torch.Generator]) -> Tensor:
        t = int(self.timesteps[i])
        alpha_prod = ALPHAS_CUMPROD[t]
        # set_alpha_to_one=False: the last step lands on alpha_cumprod[0], not on a clean 1.
        alpha_prod_prev = ALPHAS_CUMPROD[max(t - self.stride, 0)]

        x0 = (x - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
        variance = ((1 - alpha_prod_prev) / (1 - alpha_prod)) * (1 - alpha_prod / alpha_prod_prev)
        std = self.eta * variance**0.5
        direction = (1 - alpha_prod_prev - std**2) ** 0.5 * eps
        x_prev = alpha_prod_prev**0.5 * x0 + direction
        if self.eta > 0:
            x_prev = x_prev + std * draw_noise(generators, eps)
        return x_prev
