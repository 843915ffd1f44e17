"""The samplers, as k-diffusion's sampling.py has them: each a plain function that runs the whole loop, with
any multistep history a local variable, so no step can run out of order or leak into another call.

One signature: sample_x(model, x, schedule, noise, callback), plus eta for the samplers that take one.
    model(x_in, t) -> eps    x_in is the sampler's model input; t is a 0-dim long tensor of schedule.timesteps
    noise(like) -> fresh N(0, 1) draws shaped and typed like `like`, each image's from its own generator
    callback(i, x)           after step i (0-based) with the x it produced
Each equals its diffusers scheduler built from SD 1.5's config and steps in x's dtype where that scheduler
does (fp16 latents step in fp16), in fp32 where it upcasts.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import ALPHAS_CUMPROD, TRAIN_STEPS, Schedule, alpha_sigma

Model = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]
Callback = Callable[[int, Tensor], None]

ONE = torch.tensor(1.0)


def sample_ddpm(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) on a subsequence of the 1000 training steps, as diffusers'
    DDPMScheduler runs it: fixed_small variance, epsilon prediction, no clipping."""
    timesteps = schedule.timesteps
    for i, t in enumerate(timesteps):
        eps = model(x, t)
        alpha_prod = ALPHAS_CUMPROD[t]
        alpha_prod_prev = ALPHAS_CUMPROD[timesteps[i + 1]] if i + 1 < len(timesteps) else ONE
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
        x = mean + variance**0.5 * noise(eps)
        callback(i, x)
    return x


def sample_ddim(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2020), deterministic at eta = 0, as diffusers' DDIMScheduler runs it with SD 1.5's
    config (set_alpha_to_one False, no clipping)."""
    stride = TRAIN_STEPS // schedule.steps
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha_prod = ALPHAS_CUMPROD[t]
        # set_alpha_to_one=False: the last step lands on alpha_cumprod[0], not on a clean 1.
        alpha_prod_prev = ALPHAS_CUMPROD[max(int(t) - stride, 0)]

        x0 = (x - (1 - alpha_prod) ** 0.5 * eps) / alpha_prod**0.5
        variance = ((1 - alpha_prod_prev) / (1 - alpha_prod)) * (1 - alpha_prod / alpha_prod_prev)
        std = eta * variance**0.5
        direction = (1 - alpha_prod_prev - std**2) ** 0.5 * eps
        x = alpha_prod_prev**0.5 * x0 + direction
        if eta > 0:
            x = x + std * noise(eps)
        callback(i, x)
    return x


def sample_euler_ancestral(model: Model, x: Tensor, schedule: Schedule, noise: Noise,
                           callback: Callback) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral) as diffusers' EulerAncestralDiscreteScheduler
    runs it: steps in sigma space, x = x0 + sigma * noise, with noise re-injected after each deterministic
    step."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = model(x / ((sigma**2 + 1) ** 0.5), t)
        x = x.to(torch.float32)
        x0 = x - sigma * eps
        # Split the way down to sigma_next into a deterministic part (sigma_down) and fresh noise (sigma_up).
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        # Drawn at the last step too (where sigma_up is 0), to consume the generator as the reference does.
        x = (x + noise(eps) * sigma_up).to(eps.dtype)
        callback(i, x)
    return x


def sample_dpmpp_2m(model: Model, x: Tensor, schedule: Schedule, noise: Noise, callback: Callback) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) as diffusers' DPMSolverMultistepScheduler runs it with SD 1.5's
    config: data prediction, midpoint solver, first order on the first and the last step (final sigma zero).
    Draws no noise."""
    sigmas = schedule.sigmas
    last = len(schedule.timesteps) - 1
    x0_prev = None  # the multistep history: the previous step's x0 prediction
    for i, t in enumerate(schedule.timesteps):
        eps = model(x, t)
        alpha_s, sigma_s = alpha_sigma(sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s

        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
        x = x.to(torch.float32)
        if i == 0 or i == last:
            # First order (DPM-Solver++ 1 = DDIM): no history yet, or the final step down to sigma 0.
            x = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            h_prev = log_snr(sigmas[i]) - log_snr(sigmas[i - 1])
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)
            x = (
                (sigma_t / sigma_s) * x
                - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        x = x.to(x0.dtype)
        x0_prev = x0
        callback(i, x)
    return x


def log_snr(sigma: Tensor) -> Tensor:
    alpha, sigma = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma)
