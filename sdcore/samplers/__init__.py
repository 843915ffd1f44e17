"""Samplers for SD 1.5, each equal to its diffusers scheduler built from SD 1.5's scheduler config
(timestep_spacing "leading", steps_offset 1).

    plan = create(name, steps, eta=0.0, strength=1.0)   # fresh per generate() call
    x = noise * plan.init_noise_sigma                   # txt2img; img2img: x = plan.add_noise(x0, noise)
    for i, t in enumerate(plan.timesteps):
        eps = unet(plan.scale_model_input(x, i), t, context)
        x = plan.step(eps, i, x, generators)            # one CPU generator per image
"""

from .ddim import DDIM
from .ddpm import DDPM
from .dpmpp_2m import DPMSolverPP2M
from .euler_a import EulerAncestral
from .schedule import MAX_STEPS, Plan

NAMES = ("ddpm", "ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")

__all__ = ["MAX_STEPS", "NAMES", "Plan", "create"]


def create(name: str, steps: int, eta: float = 0.0, strength: float = 1.0) -> Plan:
    """A new plan running `steps` steps of sampler `name`; strength < 1 (img2img) runs only the last
    int(steps * strength) of them, as diffusers' StableDiffusionImg2ImgPipeline does."""
    if name not in NAMES:
        raise ValueError(f"sampler {name!r} is unknown; choose one of {', '.join(NAMES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps!r} is out of range: SD 1.5's schedule runs 1..{MAX_STEPS} steps")
    if name == "ddim":
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta!r} is out of range: ddim takes 0 <= eta <= 1 (0 is deterministic)")
    elif eta != 0:
        raise ValueError(f"eta={eta!r}: only the ddim sampler has an eta; {name} takes eta=0")
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r} is out of range: img2img takes 0 < strength <= 1")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise ValueError(
            f"strength={strength!r} with steps={steps} leaves 0 steps to run (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:.4g} or raise steps"
        )
    start = steps - run
    if name == "ddpm":
        return DDPM(steps, start)
    if name == "ddim":
        return DDIM(steps, start, eta)
    if name == "euler_a":
        return EulerAncestral(steps, start)
    return DPMSolverPP2M(steps, start, karras=name == "dpmpp_2m_karras")
