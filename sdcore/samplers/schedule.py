"""SD 1.5's noise schedule and what every sampler plan shares.

The numbers follow diffusers' schedulers built from SD 1.5's scheduler config with timestep_spacing "leading"
and steps_offset 1, operation for operation in fp32, so a trajectory agrees with the reference to the bit.
"""

import torch
from torch import Tensor

TRAIN_STEPS = 1000
STEPS_OFFSET = 1
# "leading" spacing with 1000 steps would run t = 1000, one past the end of the schedule.
MAX_STEPS = TRAIN_STEPS - 1

# scaled_linear: linear in sqrt(beta). Computed in fp32 like the reference; the checkpoint's buffers are
# fp64-derived and would not match.
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, TRAIN_STEPS, dtype=torch.float32) ** 2
ALPHAS_CUMPROD = torch.cumprod(1.0 - BETAS, dim=0)
# Noise-to-signal ratio of x_t = x_0 + sigma * noise (the variance-exploding view Euler and DPM-Solver use).
SIGMAS = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD) ** 0.5


def leading_timesteps(steps: int) -> Tensor:
    """Every (1000 // steps)-th timestep from the top, plus the offset: 3 steps run 667, 334, 1."""
    return torch.arange(steps - 1, -1, -1) * (TRAIN_STEPS // steps) + STEPS_OFFSET


def draw_noise(generators: list[torch.Generator], like: Tensor) -> Tensor:
    """One standard normal draw per image, each from that image's own generator, so an image never depends
    on its batch neighbours. Drawn on CPU in fp32 like diffusers' randn_tensor (its fp16 draws are these
    numbers rounded), then moved to `like`'s device and dtype."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"generators: got {len(generators)} for a batch of {like.shape[0]}; one per image")
    noise = [torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(like.device, like.dtype)


class Plan:
    """The timesteps of one generation and how to step between them.

    `schedule` holds every timestep of the `steps`-step schedule; img2img runs only its tail from `start`
    (diffusers' get_timesteps and set_begin_index). Step index i counts within `timesteps`, the tail.
    A plan belongs to one generate() call: create a fresh one per call.
    """

    init_noise_sigma = 1.0

    def __init__(self, schedule: Tensor, start: int):
        self.schedule = schedule
        self.start = start
        self.timesteps = schedule[start:]

    def scale_model_input(self, x: Tensor, i: int) -> Tensor:
        return x

    def add_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        """Forward diffusion to the first timestep run: sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha_prod = ALPHAS_CUMPROD.to(x0.device, x0.dtype)[self.timesteps[0]]
        return alpha_prod**0.5 * x0 + (1 - alpha_prod) ** 0.5 * noise
