"""Samplers for SD 1.5, each equal to its diffusers scheduler built from SD 1.5's scheduler config
(timestep_spacing "leading", steps_offset 1, skip_prk_steps).

    from sdcore import samplers
    schedule = samplers.schedule(name, steps, strength=None)   # strength in (0, 1]: img2img runs the tail
    x = noise(latents) * schedule.init_noise_sigma             # img2img: x = schedule.noised(x0, noise(x0))
    x = samplers.sample(name, model, x, schedule, noise, eta=0.0, callback=None, disable=True)

model(x_in, t) -> eps gets the sampler's model input and a 0-dim long tensor t from schedule.timesteps;
noise(like) returns per-image N(0, 1) draws shaped and typed like `like` (k-diffusion's noise_sampler), e.g.
`lambda like: sdcore.noise.randn(generators, like.shape[1:], torch.float32, like.device).to(like.dtype)`;
callback(step, total, x) runs after every model call, step = 1..total, as diffusers' pipelines count steps:
heun calls the model twice a step but on the last (2 * steps - 1 calls), pndm twice on the first (steps + 1).
A new sampler is one function in sampling.py and one line in SAMPLERS (and its name in params.SAMPLERS).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from sdcore import params
from sdcore.errors import InvalidField

from .sampling import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from .schedules import (
    Schedule,
    Space,
    dpm_solver_schedule,
    heun_schedule,
    karras_schedule,
    lcm_schedule,
    leading_schedule,
    plms_schedule,
)

__all__ = ["SAMPLERS", "Sampler", "Schedule", "sample", "schedule"]


class Sampler(NamedTuple):
    schedule: Callable[[int], tuple[Tensor, Tensor]]  # steps -> the whole schedule's timesteps and sigmas
    sample: Callable[..., Tensor]  # the loop, sample_x(model, x, schedule, noise, callback[, eta])
    space: Space  # how its x holds x0 and noise: where it starts (see Schedule)
    # Timesteps per step, diffusers' scheduler.order: img2img skips order * (steps - steps_run) of them.
    order: int = 1


SAMPLERS = {
    "ddpm": Sampler(leading_schedule, sample_ddpm, "alphas_cumprod"),
    "ddim": Sampler(leading_schedule, sample_ddim, "alphas_cumprod"),
    "euler_a": Sampler(leading_schedule, sample_euler_ancestral, "sigma"),
    "dpmpp_2m": Sampler(dpm_solver_schedule, sample_dpmpp_2m, "alpha_sigma"),
    "dpmpp_2m_karras": Sampler(karras_schedule, sample_dpmpp_2m, "alpha_sigma"),
    "euler": Sampler(leading_schedule, sample_euler, "sigma"),
    "heun": Sampler(heun_schedule, sample_heun, "sigma", order=2),
    "lms": Sampler(leading_schedule, sample_lms, "sigma"),
    "pndm": Sampler(plms_schedule, sample_plms, "alphas_cumprod"),
    "unipc": Sampler(dpm_solver_schedule, sample_unipc, "alpha_sigma"),
    "dpmpp_2m_sde": Sampler(dpm_solver_schedule, sample_dpmpp_2m_sde, "alpha_sigma"),
    "dpmpp_2m_sde_karras": Sampler(karras_schedule, sample_dpmpp_2m_sde, "alpha_sigma"),
    "lcm": Sampler(lcm_schedule, sample_lcm, "alphas_cumprod"),
}

if SAMPLERS.keys() != params.SAMPLERS.keys():
    # params.SAMPLERS is the list users choose from (and checks run against) without importing torch.
    raise RuntimeError(
        "sdcore.samplers.SAMPLERS and sdcore.params.SAMPLERS must name the same samplers; "
        f"not implemented: {sorted(params.SAMPLERS.keys() - SAMPLERS.keys())}, "
        f"not in params: {sorted(SAMPLERS.keys() - params.SAMPLERS.keys())}"
    )


def schedule(name: str, steps: int, strength: float | None = None) -> Schedule:
    """The schedule sampler `name` runs in `steps` steps; with a strength (img2img) only its last
    int(steps * strength) steps, as diffusers' StableDiffusionImg2ImgPipeline does."""
    run = params.Generation(sampler=name, steps=steps, strength=strength).steps_run
    sampler = SAMPLERS[name]
    timesteps, sigmas = sampler.schedule(steps)
    start = sampler.order * (steps - run)
    sigmas = torch.cat([sigmas, torch.zeros(1)])  # the last step lands on sigma 0
    return Schedule(name, steps, timesteps[start:], sigmas[start:], sampler.space, sigmas[:start])


def sample(name: str, model: Callable[[Tensor, Tensor], Tensor], x: Tensor, schedule: Schedule,
           noise: Callable[[Tensor], Tensor], eta: float = 0.0,
           callback: Callable[[int, int, Tensor], None] | None = None, disable: bool = True) -> Tensor:
    """x run through every step of `schedule` by sampler `name`; disable=False shows a progress bar."""
    params.Generation(sampler=name, steps=schedule.steps, eta=eta)
    if schedule.sampler != name:
        raise InvalidField("schedule", f"was made for sampler {schedule.sampler}, not {name}",
                           f"a schedule from samplers.schedule({name!r}, ...)")

    def checked_noise(like: Tensor) -> Tensor:
        # A draw for fewer images would broadcast over the batch and give images the same noise.
        draw = noise(like)
        if draw.shape != like.shape or draw.dtype != like.dtype:
            raise InvalidField("noise", f"returned {draw.dtype} {tuple(draw.shape)} for {like.dtype} "
                               f"{tuple(like.shape)}", "a function drawing one N(0, 1) sample per image, "
                               "shaped and typed like its argument")
        return draw

    total = len(schedule.timesteps)
    with tqdm(total=total, disable=disable, desc="sdcore", unit="step") as bar:
        def after_step(i: int, x: Tensor) -> None:
            bar.update()
            if callback is not None:
                callback(i + 1, total, x)

        options = {"eta": eta} if params.SAMPLERS[name].eta else {}
        return SAMPLERS[name].sample(model, x, schedule, checked_noise, after_step, **options)
