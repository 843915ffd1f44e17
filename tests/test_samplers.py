"""Samplers: every sampler equals its diffusers scheduler (built from SD 1.5's scheduler config with "leading"
spacing and steps_offset 1) step by step, for txt2img and img2img, shares nothing between calls, draws each
image's noise from that image's generator, and rejects arguments it cannot run with a message naming them."""

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from sdcore import params, samplers
from sdcore.errors import InvalidField
from sdcore.noise import randn

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
SDE = {"algorithm_type": "sde-dpmsolver++"}
REFERENCE = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {**SDE, "use_karras_sigmas": False}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {**SDE, "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),  # original_inference_steps 50, timestep_scaling 10: its defaults
}
# (sampler, eta): ddim also with eta > 0, where it draws noise.
CASES = [(name, 0.0) for name in samplers.SAMPLERS] + [("ddim", 0.6)]
STEP_COUNTS = (1, 2, 3, 10, 50, 999)
IMG2IMG_CASES = [(10, 0.75), (50, 0.3), (3, 1.0), (7, 0.15), (10, 0.9), (999, 0.01)]  # (steps, strength)
SEEDS = (11, 12)
LATENT_SHAPE = (4, 8, 8)


def max_steps(name: str) -> int:
    return params.SAMPLERS[name].max_steps


def timestep_step_counts(name: str) -> list[int]:
    """Every step count up to 100, then every 7th and the last: the Karras schedules' reference takes ~0.1 s
    per step count near 999 (measured once over all of 1..999: every count equal)."""
    top = max_steps(name)
    return sorted({*range(1, min(top, 100) + 1), *range(101, top + 1, 7), top})


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
    return randn(generators(seeds), LATENT_SHAPE)


def noise_sampler(gens):
    """What the pipeline passes: each image's draws from its own generator, in fp32, cast to x's dtype."""
    return lambda like: randn(gens, like.shape[1:], torch.float32, like.device).to(like.dtype)


def run(name, x, schedule, seeds, eta=0.0, model=pseudo_unet) -> list[torch.Tensor]:
    """The x after each step, as the callback sees it."""
    trajectory = []
    samplers.sample(name, model, x, schedule, noise_sampler(generators(seeds)), eta=eta,
                    callback=lambda step, total, x: trajectory.append(x))
    return trajectory


def run_reference(scheduler, timesteps, x: torch.Tensor, gens, eta: float) -> list[torch.Tensor]:
    # What diffusers' pipelines pass (prepare_extra_step_kwargs): eta and the generators where step takes them
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        extra["generator"] = gens
    trajectory = []
    for t in timesteps:
        eps = pseudo_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **extra).prev_sample
        trajectory.append(x)
    return trajectory


def assert_same_trajectory(ours, reference):
    """Every step within 1e-6 of the trajectory's scale, with NaN and inf where the reference has them:
    dpmpp_2m at 999 steps holds t = 1000 at t = 999's sigma, so its second step divides by a zero-length
    first one, in diffusers too."""
    assert len(ours) == len(reference)
    scale = max(b.nan_to_num(0.0, 0.0, 0.0).abs().max().item() for b in reference)
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(
            a, b, rtol=0, atol=1e-6 * max(scale, 1.0), equal_nan=True, check_dtype=False,
            msg=lambda message, step=step: f"step {step} (|x| <= {scale:.3g}): {message}",
        )


@pytest.mark.parametrize(
    "name, eta, steps",
    [(name, eta, steps) for name, eta in CASES for steps in STEP_COUNTS if steps <= max_steps(name)],
)
def test_txt2img_trajectory_equals_diffusers(name, eta, steps):
    scheduler = reference_scheduler(name, steps)
    schedule = samplers.schedule(name, steps)
    assert torch.equal(schedule.timesteps, scheduler.timesteps.long())
    assert schedule.timesteps.dtype == torch.long
    assert schedule.init_noise_sigma == float(scheduler.init_noise_sigma)

    noise = initial_noise(SEEDS)
    ours = run(name, noise * schedule.init_noise_sigma, schedule, SEEDS, eta)
    reference = run_reference(
        scheduler, scheduler.timesteps, noise * scheduler.init_noise_sigma, generators(SEEDS), eta
    )
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name, eta", CASES)
def test_half_precision_latents_step_in_half_like_diffusers(name, eta):
    scheduler = reference_scheduler(name, 10)
    schedule = samplers.schedule(name, 10)
    noise = initial_noise(SEEDS).half()
    ours = run(name, noise * schedule.init_noise_sigma, schedule, SEEDS, eta)
    reference = run_reference(
        scheduler, scheduler.timesteps, noise * scheduler.init_noise_sigma, generators(SEEDS), eta
    )
    assert all(x.dtype == torch.float16 for x in ours)
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_timesteps_equal_diffusers_for_every_step_count(name):
    for steps in timestep_step_counts(name):
        expected = reference_scheduler(name, steps).timesteps.long()
        assert torch.equal(samplers.schedule(name, steps).timesteps, expected), f"steps={steps}"


@pytest.mark.parametrize(
    "name, steps, calls",
    [
        ("heun", 3, [667, 334, 334, 1, 1]),  # each step calls at both ends, but the last, down to sigma 0
        ("pndm", 3, [667, 334, 334, 1]),  # the first step is a predictor-corrector pair
        ("pndm", 1, [1]),
        ("lcm", 4, [999, 759, 499, 259]),  # from its 50 distillation timesteps 999, 979, ..., 19
    ],
)
def test_the_model_runs_at_each_timestep_of_the_schedule_as_in_diffusers(name, steps, calls):
    seen = []
    trajectory = run(name, initial_noise(SEEDS), samplers.schedule(name, steps), SEEDS,
                     model=lambda x, t: seen.append(int(t)) or pseudo_unet(x, t))
    assert seen == calls
    assert len(trajectory) == len(calls)  # the callback follows every model call, as diffusers counts steps


def test_lcm_refuses_more_steps_than_it_was_distilled_on():
    with pytest.raises(InvalidField) as error:
        samplers.schedule("lcm", 51)
    assert str(error.value) == ("steps: 51 with sampler lcm, which runs at most 50; accepted: an integer "
                                "from 1 to 50, or another sampler (up to 999)")
    assert len(samplers.schedule("lcm", 50).timesteps) == 50


@pytest.mark.parametrize(
    "name, eta, steps, strength",
    [(name, eta, steps, strength) for name, eta in CASES for steps, strength in IMG2IMG_CASES
     if steps <= max_steps(name)],
)
def test_img2img_tail_and_noising_equal_diffusers(name, eta, steps, strength):
    scheduler = reference_scheduler(name, steps)
    timesteps = reference_img2img_timesteps(scheduler, steps, strength)
    schedule = samplers.schedule(name, steps, strength=strength)
    assert torch.equal(schedule.timesteps, timesteps.long())

    x0 = initial_noise((21, 22)) * 0.8
    noise = initial_noise(SEEDS)
    ours_start = schedule.noised(x0, noise)
    reference_start = scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(SEEDS)))
    assert_same_trajectory([ours_start], [reference_start])

    ours = run(name, ours_start, schedule, SEEDS, eta)
    reference = run_reference(scheduler, timesteps, reference_start, generators(SEEDS), eta)
    assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("name, eta", CASES)
def test_each_image_draws_noise_from_its_own_generator(name, eta):
    seeds, schedule = (5, 6, 7), samplers.schedule(name, 10)
    batch = run(name, initial_noise(seeds), schedule, seeds, eta)[-1]
    for k, seed in enumerate(seeds):
        alone = run(name, initial_noise([seed]), schedule, [seed], eta)[-1]
        assert torch.equal(batch[k : k + 1], alone), f"image {k} changed with its batch neighbours"


def test_concurrent_sample_calls_share_nothing():
    # Two dpmpp_2m calls on one schedule object: each keeps its own multistep history.
    jobs = [("dpmpp_2m", (1, 2)), ("dpmpp_2m", (3, 4)), ("euler_a", (5, 6)), ("lms", (7, 8)),
            ("unipc", (9, 10))]
    schedules = {name: samplers.schedule(name, 20) for name, _ in jobs}
    alone = [run(name, initial_noise(seeds), schedules[name], seeds) for name, seeds in jobs]

    # Every model call waits for the other calls' model calls, so the calls' steps interleave.
    barrier = threading.Barrier(len(jobs))

    def lockstep_unet(x, t):
        barrier.wait(timeout=10)
        return pseudo_unet(x, t)

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(run, name, initial_noise(seeds), schedules[name], seeds, model=lockstep_unet)
            for name, seeds in jobs
        ]
        together = [future.result() for future in futures]
    for ours, expected in zip(together, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))


def test_callback_follows_every_step_and_sample_returns_the_last_x():
    schedule = samplers.schedule("euler_a", 10, strength=0.5)
    calls = []
    noise = noise_sampler(generators(SEEDS))
    x = samplers.sample("euler_a", pseudo_unet, initial_noise(SEEDS), schedule, noise,
                        callback=lambda step, total, x: calls.append((step, total, x)))
    assert [(step, total) for step, total, _ in calls] == [(step, 5) for step in range(1, 6)]
    assert x is calls[-1][2]


def test_progress_bar_shows_when_enabled(capsys):
    schedule = samplers.schedule("ddim", 3)
    samplers.sample("ddim", pseudo_unet, initial_noise(SEEDS), schedule, noise_sampler(generators(SEEDS)),
                    disable=False)
    bar = capsys.readouterr().err
    assert "sdcore: 100%" in bar and "3/3" in bar and "step" in bar


KNOWN = ("ddpm, ddim, euler_a, dpmpp_2m, dpmpp_2m_karras, euler, heun, lms, pndm, unipc, dpmpp_2m_sde, "
         "dpmpp_2m_sde_karras, lcm")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"name": "plms", "steps": 10},
            "sampler: 'plms' is not a known sampler; accepted: " + KNOWN,
        ),
        ({"name": "ddpm", "steps": 0}, "steps: 0 is out of range; accepted: an integer from 1 to 999"),
        (
            {"name": "euler_a", "steps": 1000},
            "steps: 1000 is out of range; accepted: an integer from 1 to 999",
        ),
        ({"name": "ddim", "steps": 2.5}, "steps: 2.5 is a float; accepted: an integer from 1 to 999"),
        (
            {"name": "ddim", "steps": 10, "strength": 1.5},
            "strength: 1.5 is out of range; accepted: a finite number from 0 to 1",
        ),
        (
            {"name": "ddim", "steps": 10, "strength": 0.0},
            "strength: 0 is out of range; accepted: a number in (0, 1]",
        ),
        (
            {"name": "ddpm", "steps": 10, "strength": 0.05},
            "strength: 0.05 with steps=10 leaves 0 steps to run (int(steps * strength) = 0); "
            "accepted: a strength of at least 0.1, or more steps",
        ),
    ],
)
def test_schedule_names_a_bad_argument_with_what_is_accepted(kwargs, message):
    with pytest.raises(InvalidField) as error:
        samplers.schedule(**kwargs)
    assert str(error.value) == message
    assert error.value.field == message.split(":")[0]


@pytest.mark.parametrize(
    "name, eta, message",
    [
        (
            "ddpm", 0.5,
            "eta: 0.5 with sampler ddpm, which has no eta; accepted: 0, or a sampler that takes one: ddim",
        ),
        (
            "dpmpp_2m_karras", 1.0,
            "eta: 1 with sampler dpmpp_2m_karras, which has no eta; "
            "accepted: 0, or a sampler that takes one: ddim",
        ),
        ("ddim", -0.1, "eta: -0.1 is out of range; accepted: a finite number from 0 to 1"),
        ("plms", 0.0, "sampler: 'plms' is not a known sampler; accepted: " + KNOWN),
        ("ddim", 0.0, "schedule: was made for sampler euler_a, not ddim; accepted: a schedule from "
                      "samplers.schedule('ddim', ...)"),
    ],
)
def test_sample_names_a_bad_argument_with_what_is_accepted(name, eta, message):
    schedule, noise = samplers.schedule("euler_a", 10), noise_sampler(generators(SEEDS))
    with pytest.raises(InvalidField) as error:
        samplers.sample(name, pseudo_unet, initial_noise(SEEDS), schedule, noise, eta=eta)
    assert str(error.value) == message
    assert error.value.field == message.split(":")[0]


def test_noise_must_draw_for_every_image():
    # One generator for a batch of two would broadcast one image's noise over both.
    with pytest.raises(InvalidField) as error:
        samplers.sample("ddpm", pseudo_unet, initial_noise(SEEDS), samplers.schedule("ddpm", 10),
                        noise_sampler(generators([1])))
    assert error.value.field == "noise"
    assert error.value.problem == "returned torch.float32 (1, 4, 8, 8) for torch.float32 (2, 4, 8, 8)"
