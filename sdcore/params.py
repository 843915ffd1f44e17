"""What one image is made from: the one definition of a generation request, its defaults, ranges and checks.

    Request(prompt, seed, negative_prompt, Generation(sampler=..., steps=..., ...))

`Generation` holds the settings that images of one batch share (a batched U-Net pass needs them equal);
`Request` adds what each image has of its own. The pipeline, the PNG metadata, the `sdcore` CLI and the
worker's job checks all take their fields, defaults and rules from here, so a new setting is one field here
plus the code that uses it. Torch-free: clients check whole prompt files without importing torch.

Every failed check is an `InvalidField` naming the field, what is wrong and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sdcore.errors import InvalidField

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit seed
MAX_STEPS = 999  # "leading" spacing with 1000 steps would run t = 1000, one past SD 1.5's 1000 timesteps
MIN_SIZE, MAX_SIZE = 64, 2048  # the U-Net downsamples the 1/8 latent 3 times; 2048 bounds memory, not math
GUIDANCE_RANGE = (0.0, 100.0)
ETA_RANGE = (0.0, 1.0)
PRECISIONS = ("fp32", "fp16", "bf16")  # the model's weight and activation precision (sdcore.load's dtype)
# sdcore.load's dtype with backend "openvino": OpenVINO's precision (sdcore.openvino.PRECISIONS; int8: the
# U-Net's weights compressed to int8, computed in f32)
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("torch", "openvino")  # what runs the U-Net and the VAE: torch, or OpenVINO (sdcore.openvino)
# sdcore.load takes a backend, or "auto": openvino for fp32 on the CPU where it is installed, else torch
LOAD_BACKENDS = ("auto", *BACKENDS)
IMG2IMG_STRENGTH = 0.8  # the strength an img2img call runs with when it names none (diffusers' default)
LORA_WEIGHT_LIMIT = 10.0  # A1111 takes any multiplier; past +-10 a LoRA only makes noise
# A1111's numbering and slider: 1 is the text encoder's last layer, 12 its first (SD 1.5's has 12 layers)
CLIP_SKIP_RANGE = (1, 12)


@dataclass(frozen=True)
class SamplerInfo:
    a1111: str  # the name AUTOMATIC1111's web UI writes in its infotext for the same algorithm
    eta: bool = False  # whether the sampler takes an eta (its noise amount); others require eta 0
    max_steps: int = MAX_STEPS  # the most steps its schedule has (LCM: the steps it was distilled on)


# The samplers sdcore runs (sdcore.samplers implements each under the same name).
SAMPLERS = {
    "ddpm": SamplerInfo("DDPM"),
    "ddim": SamplerInfo("DDIM", eta=True),
    "euler_a": SamplerInfo("Euler a"),
    "dpmpp_2m": SamplerInfo("DPM++ 2M"),
    "dpmpp_2m_karras": SamplerInfo("DPM++ 2M Karras"),
    "euler": SamplerInfo("Euler"),
    "heun": SamplerInfo("Heun"),
    "lms": SamplerInfo("LMS"),
    "pndm": SamplerInfo("PLMS"),
    "unipc": SamplerInfo("UniPC"),
    "dpmpp_2m_sde": SamplerInfo("DPM++ 2M SDE"),
    "dpmpp_2m_sde_karras": SamplerInfo("DPM++ 2M SDE Karras"),
    "lcm": SamplerInfo("LCM", max_steps=50),
}


@dataclass(frozen=True)
class Generation:
    """The settings shared by the images of one batch. Frozen and hashable: equal settings, one batch."""

    sampler: str = "ddpm"
    steps: int = 50
    guidance_scale: float = 7.5  # <= 1 runs the prompt alone, without classifier-free guidance
    width: int = 512
    height: int = 512
    eta: float = 0.0
    strength: float | None = None  # img2img: how far the init image is noised, (0, 1]; None is txt2img
    # Text-encoder layer whose output conditions the U-Net, counted from the last: 1 the last, 2 the one
    # before it (then the final layer norm), for the prompt and the negative prompt alike.
    clip_skip: int = 1
    # LoRAs merged into the model for this batch, as (name, weight) pairs sorted by name; a pipeline knows
    # them by name (Pipeline.add_lora). Also given as [{"name": ..., "weight": ...}], as job files write them.
    loras: tuple[tuple[str, float], ...] = ()
    # A VAE the pipeline knows by name (Pipeline.add_vae) that encodes and decodes in place of the model's
    # own; None is the model's (the checkpoint's, or the file given to sdcore.load(vae=)).
    vae: str | None = None

    def __post_init__(self):
        _check_choice("sampler", self.sampler, SAMPLERS)
        _set(self, "steps", check_int("steps", self.steps, 1, MAX_STEPS))
        limit = SAMPLERS[self.sampler].max_steps
        if self.steps > limit:
            problem = f"{self.steps} with sampler {self.sampler}, which runs at most {limit}"
            raise InvalidField("steps", problem, f"an integer from 1 to {limit}, or another sampler (up to "
                                                 f"{MAX_STEPS})")
        _set(self, "guidance_scale", check_float("guidance_scale", self.guidance_scale, *GUIDANCE_RANGE))
        for side in ("width", "height"):
            size = check_int(side, getattr(self, side), MIN_SIZE, MAX_SIZE)
            if size % 8:
                # the VAE downsamples by 8: other sizes have no latent of their own
                raise InvalidField(side, f"{size} is not a multiple of 8",
                                   f"a multiple of 8 from {MIN_SIZE} to {MAX_SIZE}")
        _set(self, "eta", check_float("eta", self.eta, *ETA_RANGE))
        if self.eta and not SAMPLERS[self.sampler].eta:
            takes = [name for name, info in SAMPLERS.items() if info.eta]
            raise InvalidField("eta", f"{self.eta:g} with sampler {self.sampler}, which has no eta",
                               f"0, or a sampler that takes one: {', '.join(takes)}")
        if self.strength is not None:
            strength = check_float("strength", self.strength, 0.0, 1.0)
            if strength == 0:
                raise InvalidField("strength", "0 is out of range", "a number in (0, 1]")
            if int(self.steps * strength) == 0:
                raise InvalidField("strength", f"{strength:g} with steps={self.steps} leaves 0 steps to run "
                                   "(int(steps * strength) = 0)",
                                   f"a strength of at least {1 / self.steps:.4g}, or more steps")
            _set(self, "strength", strength)
        _set(self, "clip_skip", check_int("clip_skip", self.clip_skip, *CLIP_SKIP_RANGE))
        _set(self, "loras", check_loras(self.loras))
        if self.vae is not None:
            check_text("vae", self.vae, max_chars=255, allow_blank=False)

    @property
    def steps_run(self) -> int:
        """How many of the schedule's steps run: all for txt2img, the last int(steps * strength) for img2img
        (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps)."""
        return self.steps if self.strength is None else min(int(self.steps * self.strength), self.steps)

    def to_dict(self) -> dict:
        """Every field; strength and vae only when set (records of plain txt2img images stay as they were)."""
        values = dataclasses.asdict(self)
        for name in OPTIONAL_FIELDS:
            if values[name] is None:
                del values[name]
        values["loras"] = [{"name": name, "weight": weight} for name, weight in self.loras]
        return values


@dataclass(frozen=True)
class Request:
    """One image: its prompt, negative prompt and seed, and the settings it shares with its batch."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    generation: Generation = field(default_factory=Generation)

    def __post_init__(self):
        check_text("prompt", self.prompt)
        check_text("negative_prompt", self.negative_prompt)
        _set(self, "seed", check_int("seed", self.seed, 0, MAX_SEED))
        if not isinstance(self.generation, Generation):
            raise InvalidField("generation", f"is a {type(self.generation).__name__}",
                               "a sdcore.params.Generation")

    def to_dict(self) -> dict:
        """Flat: prompt, negative_prompt, seed and every Generation field (as Generation.to_dict)."""
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                **self.generation.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> Request:
        """The request recorded by `to_dict` (keys it does not know, such as the model's, are ignored)."""
        if "prompt" not in values or "seed" not in values:
            raise InvalidField("prompt" if "prompt" not in values else "seed", "is missing",
                               "a record with prompt and seed")
        settings = {name: values[name] for name in GENERATION_FIELDS if name in values}
        negative = values.get("negative_prompt", "")
        return cls(values["prompt"], values["seed"], negative, Generation(**settings))


GENERATION_FIELDS = tuple(f.name for f in dataclasses.fields(Generation))
OPTIONAL_FIELDS = ("strength", "vae")  # None by default, and then left out of records
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Generation)}


def parse_text(name: str, text: str):
    """A Generation field's value from text (a CSV cell, a command-line word): a number where the field is
    one; text that is not a number stays text, so the field's own check reports it with its type."""
    kind = _FIELD_TYPES[name]
    try:
        if kind == "int":
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        pass
    return text


# -- checks: each returns the value (normalised) or raises InvalidField ----------------------------------

def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value: object, low: int, high: int) -> int:
    accepted = f"an integer from {low} to {high}"
    # bool is an int subclass in Python, but `"steps": true` is a mistake, not 1 step.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(name, f"{shown(value)} is a {type(value).__name__}", accepted)
    if not low <= value <= high:
        raise InvalidField(name, f"{value} is out of range", accepted)
    return int(value)


def check_float(name: str, value: object, low: float, high: float) -> float:
    accepted = f"a finite number from {low:g} to {high:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(name, f"{shown(value)} is a {type(value).__name__}", accepted)
    if isinstance(value, int) and not low <= value <= high:  # before isfinite: 10**400 has no float
        raise InvalidField(name, f"{shown(value)} is out of range", accepted)
    if not math.isfinite(value):
        raise InvalidField(name, f"{value} is not finite", accepted)
    if not low <= value <= high:
        raise InvalidField(name, f"{value:g} is out of range", accepted)
    return float(value)


def check_text(name: str, value: object, max_chars: int | None = None, allow_blank: bool = True) -> str:
    kind = "UTF-8 text" if allow_blank else "non-blank UTF-8 text"
    accepted = f"{kind} without NUL" if max_chars is None else f"{kind} of at most {max_chars} characters, " \
                                                                "without NUL"
    if not isinstance(value, str):
        raise InvalidField(name, f"{shown(value)} is a {type(value).__name__}", accepted)
    if not allow_blank and not value.strip():
        raise InvalidField(name, "is empty or only whitespace", accepted)
    if max_chars is not None and len(value) > max_chars:
        raise InvalidField(name, f"has {len(value)} characters", accepted)
    if "\x00" in value:
        raise InvalidField(name, f"contains a NUL character at position {value.index(chr(0))}", accepted)
    try:
        # Files decoded with surrogateescape and JSON that spells "\udc80" leave lone surrogates, which are
        # not text and which no tokenizer or PNG chunk can carry.
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        problem = f"is not valid UTF-8 (bad data at character {error.start})"
        raise InvalidField(name, problem, accepted) from None
    return value


def check_loras(value: object) -> tuple[tuple[str, float], ...]:
    accepted = ('a list of {"name": NAME, "weight": W} (or (name, weight) pairs), each name once, '
                f"weights from {-LORA_WEIGHT_LIMIT:g} to {LORA_WEIGHT_LIMIT:g}")
    if isinstance(value, str | dict) or not isinstance(value, list | tuple):
        raise InvalidField("loras", f"{shown(value)} is a {type(value).__name__}", accepted)
    pairs = []
    for index, item in enumerate(value):
        if isinstance(item, dict) and {"name", "weight"} <= set(item):  # metadata adds the file's sha256
            item = (item["name"], item["weight"])
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidField(f"loras[{index}]", f"{shown(item)} is not a name and a weight", accepted)
        name = check_text(f"loras[{index}].name", item[0], max_chars=255, allow_blank=False)
        weight = check_float(f"loras[{index}].weight", item[1], -LORA_WEIGHT_LIMIT, LORA_WEIGHT_LIMIT)
        pairs.append((name, weight))
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidField("loras", f"names {repeated} more than once", accepted)
    return tuple(sorted(pairs))


def _check_choice(name: str, value: object, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidField(name, f"{shown(value)} is not a known {name}", ", ".join(choices))


def _set(instance, name: str, value) -> None:
    # Checks normalise (an int guidance scale becomes a float) on a frozen dataclass.
    object.__setattr__(instance, name, value)
