"""Stable Diffusion 1.5 generation: text-to-image and image-to-image.

One `generate` call runs N prompts as one batch through the U-Net (2N rows with classifier-free guidance),
yet every image is a function of its own prompt, seed and settings only: each image owns a CPU
`torch.Generator` seeded with its seed, and every random draw for that image (initial noise, VAE posterior
sample, sampler noise) comes from it, in the order diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline draw it. The same weights and seed give the same pixels as diffusers.

    text  -> tokenizer -> text_encoder ------------------------------------------.
    seed  -> randn (1,4,H/8,W/8) * init_noise_sigma  (or: VAE posterior sample     |  [uncond, cond]
             of the init image * 0.18215, noised to the first timestep)         v
          -> for each timestep: U-Net(scale_model_input(x), t, context) -> eps = u + g (c - u)
                                sampler step (noise from the image's generator)
          -> VAE decode(x / 0.18215) -> round(clamp(x/2 + 0.5, 0, 1) * 255) -> PIL
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sdcore import samplers
from sdcore.checkpoints import Components, load_components
from sdcore.models.winograd import use_winograd

VAE_SCALE = 0.18215  # SD 1.x latent scaling factor: latents = 0.18215 * VAE posterior
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit unsigned value
MIN_SIZE, MAX_SIZE = 64, 2048  # the U-Net downsamples the 1/8 latent 3 times; 2048 bounds memory, not math


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> fp16 on CUDA, fp32 elsewhere (CPU bf16/fp16 are emulated or slow); names or torch dtypes."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in PRECISIONS.values():
        return dtype
    if isinstance(dtype, str) and dtype in PRECISIONS:
        return PRECISIONS[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(PRECISIONS)}, "
                     "torch.float32/float16/bfloat16, or None (fp16 on CUDA, fp32 elsewhere)")


def load(source: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         tokenizer=None, ema: str | bool = "auto", winograd: bool = False) -> Pipeline:
    """Load a checkpoint (.ckpt / .safetensors / diffusers folder / "tiny-random") as a ready Pipeline.

    winograd=True turns on the CPU fp32 fast path for the U-Net's convolutions (Pipeline.use_winograd)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device='cpu'")
    dtype = resolve_dtype(dtype, device)
    if winograd and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(winograd_error(device, dtype))  # before reading gigabytes of weights
    pipe = Pipeline(load_components(source, device=device, dtype=dtype, tokenizer=tokenizer, ema=ema))
    if winograd:
        pipe.use_winograd()
    return pipe


def winograd_error(device: torch.device, dtype: torch.dtype) -> str:
    return (f"winograd runs on the CPU in fp32 only, not on {device} in {dtype}: on CUDA, cuDNN picks its "
            "own convolution algorithms, and in fp16/bf16 the F(4x4) transforms would lose too much "
            "precision")


class Pipeline:
    """The loaded model plus `generate`. Holds no per-call state, so threads may share one instance."""

    def __init__(self, parts: Components):
        self.parts = parts
        self.tokenizer, self.text_encoder, self.unet, self.vae = (
            parts.tokenizer, parts.text_encoder, parts.unet, parts.vae)
        self.name, self.is_random = parts.name, parts.is_random
        weight = next(self.unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.precision = next(name for name, dtype in PRECISIONS.items() if dtype == self.dtype)
        self.winograd = False
        self._empty_prompt_embedding = None
        self._fp32_vae = None
        self._fp32_vae_lock = threading.Lock()

    @property
    def sha256(self) -> str | None:
        """SHA-256 of the weight file(s); None for random weights. Hashed on first use (seconds for 4 GB)."""
        return self.parts.sha256

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" (its AutoV2 hash): the first 10 hex digits of the file's SHA-256."""
        return self.sha256[:10] if self.sha256 else None

    def __repr__(self):
        winograd = ", winograd" if self.winograd else ""
        return f"Pipeline({self.name!r}, device={self.device}, precision={self.precision}{winograd})"

    def use_winograd(self, enabled: bool = True) -> None:
        """Run the U-Net's large 3x3 convolutions as Winograd convolutions (sdcore.models.winograd), CPU fp32.

        They hold ~65 % of a U-Net step at 256x256 and run near the CPU's matmul peak already; Winograd does
        them with 2.25-4x fewer multiplications. In this mode CFG also passes its latents once for the
        [uncond; cond] contexts, so the U-Net's start before the text enters (~6 % of the work at 512x512)
        runs once per image (UNetModel.forward). SD 1.5 U-Net step on 2 cores: 0.65-0.73x diffusers' time at
        256x256 and 512x512 (BENCHMARKS.md). Not bit-identical to the direct convolution (and so to
        diffusers): the U-Net output moves by ~2e-5 of its scale, an image by at most a level here and there.
        Memory: the transformed weights, made on first use (+3-5 s on the first step), add 1.1x the U-Net's
        weights at 256x256 and 1.3x at 512x512 (3.9 / 4.4 GB for SD 1.5); use_winograd(False) frees them.
        """
        if enabled and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(winograd_error(self.device, self.dtype))
        use_winograd(self.unet, enabled)
        self.winograd = bool(enabled)

    def cfg_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The U-Net's latents for CFG's [uncond; cond] contexts: repeated, as diffusers does, or in the
        Winograd mode (already a rounding away from diffusers) once, which saves the U-Net's text-free start
        (UNetModel.forward). The default keeps the repeat: oneDNN's convolutions round a batch of one
        differently from a batch of two, and bit-identity with diffusers would be lost."""
        return latents if self.winograd else torch.cat([latents, latents])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, sampler: str = "ddpm",
                 guidance_scale: float = 7.5, negative_prompts: Sequence[str] | None = None,
                 width: int = 512, height: int = 512, init_images: Sequence[Image.Image] | None = None,
                 strength: float = 0.8, eta: float = 0.0,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 progress: bool = True) -> list[Image.Image]:
        """Generate one image per (prompt, seed); all of them in one batched U-Net pass per step.

        guidance_scale > 1 runs classifier-free guidance, eps = uncond + g * (cond - uncond), with the
        [uncond, cond] rows in one U-Net batch; guidance_scale <= 1 runs the prompt alone (no uncond pass),
        as diffusers does. negative_prompts (default "") are the uncond prompts.

        img2img: init_images (one PIL image per prompt) are converted to RGB (alpha dropped, grey
        replicated) and, when their size differs from width x height, resized to it with PIL's LANCZOS
        filter (what diffusers' VaeImageProcessor does), without keeping the aspect ratio. strength in
        (0, 1] selects the last int(steps * strength) timesteps of the schedule.

        callback(step, total, latents) runs after every sampler step, step counting from 1 to total.
        Pixels are round(clamp(x / 2 + 0.5, 0, 1) * 255), rounding half to even, as diffusers does.
        """
        prompts, seeds, negative_prompts = self._check_texts_and_seeds(prompts, seeds, negative_prompts)
        check_size(width, height)
        check_number("guidance_scale", guidance_scale, low=0.0)
        if init_images is not None:
            init_images = check_init_images(init_images, len(prompts))
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a callable (step, total, latents), "
                            f"got {type(callback).__name__}")
        # Checks the sampler name, steps (1..999), eta and strength (must leave >= 1 step).
        plan = samplers.create(sampler, steps, eta=eta, strength=1.0 if init_images is None else strength)

        with torch.inference_mode():
            guided = guidance_scale > 1.0
            context = self.encode_text((negative_prompts + prompts) if guided else prompts)
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
            if init_images is None:
                latents = self.noise(generators, height // 8, width // 8) * plan.init_noise_sigma
            else:
                clean = self.encode_images(init_images, generators, width, height)  # draws first
                latents = plan.add_noise(clean, self.noise(generators, height // 8, width // 8))

            total = len(plan.timesteps)
            for i, t in enumerate(tqdm(plan.timesteps, disable=not progress, desc="sdcore", unit="step")):
                model_input = plan.scale_model_input(latents, i)
                if guided:
                    model_input = self.cfg_latents(model_input)
                timesteps = t.to(self.device).expand(model_input.shape[0])
                # The sampler's arithmetic stays in fp32; only the U-Net runs in the model's precision.
                eps = self.unet(model_input.to(self.dtype), timesteps, context).float()
                if guided:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance_scale * (cond - uncond)
                latents = plan.step(eps, i, latents, generators)
                if callback is not None:
                    callback(i + 1, total, latents)

            # One image at a time: a 512x512 decode holds ~0.5 GB per 128-channel fp16 map, so batching buys
            # little and costs peak memory; it also keeps the decode of an image free of its neighbours.
            return [to_pil(self.decode(latents[k:k + 1])) for k in range(len(prompts))]

    def settings(self, prompt: str, seed: int, steps: int = 50, sampler: str = "ddpm",
                 guidance_scale: float = 7.5, negative_prompt: str = "", width: int = 512, height: int = 512,
                 strength: float | None = None, eta: float = 0.0) -> dict:
        """The metadata of one generated image (written to PNG by sdcore.png.png_bytes).

        strength is None for txt2img; pass the img2img strength to record an img2img image.
        """
        settings = {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "steps": int(steps),
            "sampler": sampler, "guidance_scale": float(guidance_scale), "eta": float(eta),
            "width": int(width), "height": int(height), "model": self.name, "model_hash": self.model_hash,
            "precision": self.precision, "random_model": bool(self.is_random),
        }
        if self.winograd:
            settings["winograd"] = True  # recorded only when on: it is why a rerun without it may differ
        if strength is not None:
            settings["strength"] = float(strength)
        return settings

    # -- stages -------------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """CLIP last hidden states [len(texts), 77, 768]; each distinct text is encoded once."""
        if self._empty_prompt_embedding is None:
            # The default negative prompt is "", in nearly every call: encode it once per pipeline.
            self._empty_prompt_embedding = self.text_encoder(self.tokenizer([""]).to(self.device))[0]
        table = {"": self._empty_prompt_embedding}
        distinct = [text for text in dict.fromkeys(texts) if text not in table]
        if distinct:
            embeddings = self.text_encoder(self.tokenizer(distinct).to(self.device))
            table.update(zip(distinct, embeddings, strict=True))
        return torch.stack([table[text] for text in texts])

    def noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """One fp32 N(0, 1) latent per image from its own CPU generator, as diffusers' randn_tensor does."""
        draws = [torch.randn((1, 4, height, width), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(draws).to(self.device)

    def encode_images(self, images: list[Image.Image], generators: list[torch.Generator], width: int,
                      height: int) -> torch.Tensor:
        """Scaled VAE posterior samples of the init images, one image at a time (diffusers' order).
        An fp16 overflow in the encoder is redone in fp32, as in `decode`."""
        latents = []
        for image, generator in zip(images, generators, strict=True):
            pixels = from_pil(image, width, height).to(self.device)
            posterior = self.vae.encode(pixels.to(self.dtype))
            if self.dtype != torch.float32 and not all(torch.isfinite(p).all() for p in posterior):
                posterior = self.fp32_vae().encode(pixels)
            latents.append(VAE_SCALE * posterior.sample(generator).float())
        return torch.cat(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in about [-1, 1], fp32, never NaN/inf.

        fp16 activations can overflow in the VAE decoder (65504 is fp16's largest value), which turns an
        image into NaN and then black. Decoding every image in fp32 would double the cost of the most
        expensive single call at 512x512 (~2.5 TFLOP), so decode in the model's precision and redo only a
        non-finite result with an fp32 copy of the VAE, made on first need. bf16 has fp32's range; the
        check costs one reduction.
        """
        unscaled = latents / VAE_SCALE
        images = self.vae.decode(unscaled.to(self.dtype)).float()
        if self.dtype != torch.float32 and not torch.isfinite(images).all():
            images = self.fp32_vae().decode(unscaled.float())
        return images

    def fp32_vae(self):
        with self._fp32_vae_lock:
            if self._fp32_vae is None:
                self._fp32_vae = copy.deepcopy(self.vae).float()
            return self._fp32_vae

    def _check_texts_and_seeds(self, prompts, seeds, negative_prompts):
        prompts = check_strings("prompts", prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        seeds = check_seeds(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} values for {len(prompts)} prompts; "
                             "pass one seed per prompt")
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        negative_prompts = check_strings("negative_prompts", negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"negative_prompts has {len(negative_prompts)} values for {len(prompts)} "
                             "prompts; pass one per prompt, or None for empty negative prompts")
        return prompts, seeds, negative_prompts


# -- images ------------------------------------------------------------------------------------------------

def from_pil(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An init image as a [1, 3, height, width] fp32 tensor in [-1, 1] (diffusers' VaeImageProcessor)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> Image.Image:
    """A decoded [1, 3, H, W] image to PIL, rounding in float32 numpy exactly as diffusers' postprocess does
    (np.round rounds half to even; truncating instead would shift the mean by half a level)."""
    pixels = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return Image.fromarray((pixels[0] * 255).round().astype(np.uint8))


# -- argument checks: each error names the argument, the value and what is accepted ----------------------

def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_strings(name: str, values) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__} "
                        f"{values!r:.60}; wrap a single prompt in a list")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(value).__name__} {value!r:.60}")
    return list(values)


def check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, Sequence) or isinstance(seeds, str):
        raise TypeError(f"seeds must be a list of int, got {type(seeds).__name__} {seeds!r:.60}")
    for index, seed in enumerate(seeds):
        if not is_integer(seed):
            raise TypeError(f"seeds[{index}] must be an int in 0..2**64-1, "
                            f"got {type(seed).__name__} {seed!r}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seeds[{index}] = {seed} is out of range; seeds are integers in 0..2**64-1")
    return [int(seed) for seed in seeds]


def check_size(width, height) -> None:
    for name, value in (("width", width), ("height", height)):
        if not is_integer(value) or value % 8 or not MIN_SIZE <= value <= MAX_SIZE:
            raise ValueError(f"{name} = {value!r} is not accepted; {name} is a multiple of 8 in "
                             f"{MIN_SIZE}..{MAX_SIZE} (the VAE works at 1/8 resolution)")


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(name: str, value, low: float) -> None:
    if not is_real(value) or not math.isfinite(value) or value < low:
        raise ValueError(f"{name} = {value!r} is not accepted; {name} is a finite number >= {low}")


def check_init_images(images, count: int) -> list[Image.Image]:
    if not isinstance(images, Sequence) or isinstance(images, Image.Image):
        raise TypeError(f"init_images must be a list of PIL images (one per prompt), "
                        f"got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"init_images[{index}] must be a PIL.Image.Image, got {type(image).__name__}")
    if len(images) != count:
        raise ValueError(f"init_images has {len(images)} images for {count} prompts; pass one per prompt")
    return list(images)
