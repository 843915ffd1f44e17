"""Samplers: every plan equals its diffusers scheduler (built from SD 1.5's scheduler config with "leading"
spacing and steps_offset 1) step by step, for txt2img and img2img, keeps no state between plans, draws each
image's noise from that image's generator, and rejects arguments it cannot run with a message naming them."""

import re
import threading

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)

from sdcore import samplers

# diffusers' schedulers call np.array on a torch tensor, which numpy 2 warns about on every set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    # Not in SD 1.5's file: without it Euler and DPM-Solver fall back to "linspace".
    "timestep_spacing": "leading",
}
REFERENCE = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
# (sampler, eta): ddim also with eta > 0, where it draws noise.
CASES = [(name, 0.0) for name in samplers.NAMES] + [("ddim", 0.6)]
STEP_COUNTS = (1, 2, 3, 10, 50, 999)
SEEDS = (11, 12)
LATENT_SHAPE = (4, 8, 8)


def reference_scheduler(name: str, steps: int):
    scheduler_class, options = REFERENCE[name]
    scheduler = scheduler_class.from_config({**SD15_SCHEDULER_CONFIG, **options})
    scheduler.set_timesteps(steps)
    return scheduler


def reference_img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """StableDiffusionImg2ImgPipeline.get_timesteps."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def pseudo_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the U-Net's eps: depends on x and t (so multistep history matters), elementwise and
    plain arithmetic (so its value per image cannot depend on the batch)."""
    return 0.9 * x - 0.2 * x / (1 + x * x) + (float(t) - 500) / 1000


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def initial_noise(seeds) -> torch.Tensor:
    return torch.cat([torch.randn((1, *LATENT_SHAPE), generator=g) for g in generators(seeds)])


def run_plan(plan, x: torch.Tensor, gens) -> list[torch.Tensor]:
    trajectory = []
    for i, t in enumerate(plan.timesteps):
        x = plan.step(pseudo_unet(plan.scale_model_input(x, i), t), i, x, gens)
        trajectory.append(x)
    return trajectory


def run_reference(scheduler, timesteps, x: torch.Tensor, gens, eta: float) -> list[torch.Tensor]:
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    trajectory = []
    for t in timesteps:
        eps = pseudo_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=gens, **extra).prev_sample
        trajectory.append(x)
    return trajectory


def max_abs_error(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    assert len(ours) == len(reference)
    return max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))


def assert_same_trajectory(ours, reference):
    scale = max(b.abs().max().item() for b in reference)
    error = max_abs_error(ours, reference)
    assert error <= 1e-6 * max(scale, 1.0), (
        f"max abs error {error:.3g} along the trajectory (|x| <= {scale:.3g})"
    )


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, eta", CASES)
def test_txt2img_trajectory_equals_diffusers(name, eta, steps):
    scheduler = reference_scheduler(name, steps)
    plan = samplers.create(name, steps, eta=eta)
    assert torch.equal(plan.timesteps, scheduler.timesteps.long())
    assert plan.timesteps.dtype == torch.long
    assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)

    noise = initial_noise(SEEDS)
    ours = run_plan(plan, noise * plan.init_noise_sigma, generators(SEEDS))
    reference = run_reference(
        scheduler, scheduler.timesteps, noise * scheduler.init_noise_sigma, generators(SEEDS), eta
    )
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name, eta", CASES)
def test_half_precision_latents_step_in_half_like_diffusers(name, eta):
    scheduler = reference_scheduler(name, 10)
    plan = samplers.create(name, 10, eta=eta)
    noise = initial_noise(SEEDS).half()
    ours = run_plan(plan, noise * plan.init_noise_sigma, generators(SEEDS))
    reference = run_reference(
        scheduler, scheduler.timesteps, noise * scheduler.init_noise_sigma, generators(SEEDS), eta
    )
    assert all(x.dtype == torch.float16 for x in ours)
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name", samplers.NAMES)
def test_timesteps_equal_diffusers_for_every_step_count(name):
    for steps in range(1, samplers.MAX_STEPS + 1):
        expected = reference_scheduler(name, steps).timesteps.long()
        assert torch.equal(samplers.create(name, steps).timesteps, expected), f"steps={steps}"


@pytest.mark.parametrize("steps, strength", [(10, 0.75), (50, 0.3), (3, 1.0), (7, 0.15), (999, 0.01)])
@pytest.mark.parametrize("name, eta", CASES)
def test_img2img_tail_and_noising_equal_diffusers(name, eta, steps, strength):
    scheduler = reference_scheduler(name, steps)
    timesteps = reference_img2img_timesteps(scheduler, steps, strength)
    plan = samplers.create(name, steps, eta=eta, strength=strength)
    assert torch.equal(plan.timesteps, timesteps.long())

    x0 = initial_noise((21, 22)) * 0.8
    noise = initial_noise(SEEDS)
    ours_start = plan.add_noise(x0, noise)
    reference_start = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(SEEDS)))
    assert_same_trajectory([ours_start], [reference_start])

    ours = run_plan(plan, ours_start, generators(SEEDS))
    reference = run_reference(scheduler, timesteps, reference_start, generators(SEEDS), eta)
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name, eta", CASES)
def test_each_image_draws_noise_from_its_own_generator(name, eta):
    seeds = (5, 6, 7)
    batch = run_plan(samplers.create(name, 10, eta=eta), initial_noise(seeds), generators(seeds))[-1]
    for k, seed in enumerate(seeds):
        alone = run_plan(samplers.create(name, 10, eta=eta), initial_noise([seed]), generators([seed]))[-1]
        assert torch.equal(batch[k : k + 1], alone), f"image {k} changed with its batch neighbours"


def test_plans_share_no_state_across_threads():
    jobs = [("dpmpp_2m", (1, 2)), ("dpmpp_2m", (3, 4)), ("euler_a", (5, 6))]
    sequential = [
        run_plan(samplers.create(name, 20), initial_noise(seeds), generators(seeds)) for name, seeds in jobs
    ]

    # The barrier makes the threads take their steps in lockstep, so the plans' steps interleave.
    barrier = threading.Barrier(len(jobs))
    threaded = [None] * len(jobs)

    def run(slot, name, seeds):
        plan, gens, x = samplers.create(name, 20), generators(seeds), initial_noise(seeds)
        trajectory = []
        for i, t in enumerate(plan.timesteps):
            barrier.wait(timeout=10)
            x = plan.step(pseudo_unet(plan.scale_model_input(x, i), t), i, x, gens)
            trajectory.append(x)
        threaded[slot] = trajectory

    threads = [threading.Thread(target=run, args=(slot, *job)) for slot, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, alone in zip(threaded, sequential, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, alone, strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"name": "heun", "steps": 10},
            "sampler 'heun' is unknown; choose one of ddpm, ddim, euler_a, dpmpp_2m",
        ),
        ({"name": "ddpm", "steps": 0}, "steps=0 is out of range: SD 1.5's schedule runs 1..999 steps"),
        ({"name": "euler_a", "steps": 1000}, "steps=1000 is out of range"),
        ({"name": "ddim", "steps": 2.5}, "steps=2.5 is out of range"),
        (
            {"name": "ddpm", "steps": 10, "eta": 0.5},
            "eta=0.5: only the ddim sampler has an eta; ddpm takes eta=0",
        ),
        ({"name": "dpmpp_2m_karras", "steps": 10, "eta": 1.0}, "eta=1.0: only the ddim sampler has an eta"),
        ({"name": "ddim", "steps": 10, "eta": -0.1}, "eta=-0.1 is out of range: ddim takes 0 <= eta <= 1"),
        (
            {"name": "ddim", "steps": 10, "strength": 1.5},
            "strength=1.5 is out of range: img2img takes 0 < strength <= 1",
        ),
        ({"name": "ddim", "steps": 10, "strength": 0.0}, "strength=0.0 is out of range"),
        (
            {"name": "ddpm", "steps": 10, "strength": 0.05},
            "strength=0.05 with steps=10 leaves 0 steps to run",
        ),
    ],
)
def test_bad_arguments_are_named_with_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        samplers.create(**kwargs)


def test_step_needs_one_generator_per_image():
    plan = samplers.create("ddpm", 10)
    x = initial_noise(SEEDS)
    with pytest.raises(ValueError, match="generators: got 1 for a batch of 2; one per image"):
        plan.step(x, 0, x, generators([1]))


def test_dpmpp_2m_steps_in_order():
    plan = samplers.create("dpmpp_2m", 10)
    x = initial_noise(SEEDS)
    message = "step index i=1: DPM++ 2M steps in order; the next step is 0"
    with pytest.raises(ValueError, match=re.escape(message)):
        plan.step(x, 1, x, generators(SEEDS))
