"""The generation pipeline: pixel parity with diffusers, per-image RNG, batching, precision, arguments.

Parity runs diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline on reference models with
scaled random weights, and sdcore on the same weights (tiny configs by default; the full SD 1.5 dimensions
in the slow test). Both must produce uint8 images within 1 level of each other.
"""

import copy
import gc
import io
import threading
from types import SimpleNamespace

import numpy as np
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
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

import sdcore
from sdcore import Pipeline
from sdcore.checkpoints import Components
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.params import Generation, Request
from sdcore.pipeline import from_pil, resolve_dtype, to_pil
from sdcore.png import REQUIRED_KEYS, png_bytes, read_settings
from sdcore.tokenizer import CLIPTokenizer
from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder
from tests.reference import (
    reference_text_encoder,
    reference_unet,
    reference_vae,
    sdcore_model,
)

# SD 1.5's scheduler_config.json, with the spacing stated explicitly: without the key, diffusers' Euler and
# DPM-Solver fall back to "linspace".
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)  # fmt: skip

REFERENCE_SCHEDULERS = {
    "ddpm": lambda: DDPMScheduler.from_config(SD15_SCHEDULER),
    "ddim": lambda: DDIMScheduler.from_config(SD15_SCHEDULER),
    "euler": lambda: EulerDiscreteScheduler.from_config(SD15_SCHEDULER),
    "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER),
    "heun": lambda: HeunDiscreteScheduler.from_config(SD15_SCHEDULER),
    "lms": lambda: LMSDiscreteScheduler.from_config(SD15_SCHEDULER),
    # SD 1.5's scheduler_config.json sets skip_prk_steps: PLMS from the first step.
    "pndm": lambda: PNDMScheduler.from_config(SD15_SCHEDULER, skip_prk_steps=True),
    "unipc": lambda: UniPCMultistepScheduler.from_config(SD15_SCHEDULER),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER,
                                                                       use_karras_sigmas=True),
    "dpmpp_2m_sde": lambda: DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER,
                                                                    algorithm_type="sde-dpmsolver++"),
    "dpmpp_2m_sde_karras": lambda: DPMSolverMultistepScheduler.from_config(
        SD15_SCHEDULER, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    "lcm": lambda: LCMScheduler.from_config(SD15_SCHEDULER),  # original_inference_steps 50: its default
}

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk, oil painting", "blurry, low quality"


def build_models(clip_cfg: CLIPConfig, unet_cfg: UNetConfig, vae_cfg: VAEConfig, tokenizer_folder):
    """diffusers' two pipelines and an sdcore Pipeline over the same scaled random weights."""
    text_encoder = reference_text_encoder(clip_cfg, seed=11)
    unet = reference_unet(unet_cfg, seed=12)
    vae = reference_vae(vae_cfg, seed=13)
    unet.register_to_config(sample_size=64)  # SD 1.5's value; diffusers' img2img refuses a missing one
    ours = Pipeline(Components(
        tokenizer=CLIPTokenizer.bundled(),
        text_encoder=sdcore_model("text_encoder", text_encoder, clip_cfg).requires_grad_(False),
        unet=sdcore_model("unet", unet, unet_cfg).requires_grad_(False),
        vae=sdcore_model("vae", vae, vae_cfg).requires_grad_(False),
        name="reference", weight_files=(), is_random=True))
    tokenizer = reference_tokenizer(tokenizer_folder)
    tokenizer.model_max_length = 77  # what SD 1.5's tokenizer_config.json sets; the pipelines pad to it
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 unet=unet, scheduler=REFERENCE_SCHEDULERS["ddpm"](), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    txt2img = StableDiffusionPipeline(**parts)
    img2img = StableDiffusionImg2ImgPipeline(**parts)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(ours=ours, txt2img=txt2img, img2img=img2img)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_clip_tokenizer_folder(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def tiny(tokenizer_folder):
    return build_models(tiny_clip(), tiny_unet(), tiny_vae(), tokenizer_folder)


def init_image(width: int, height: int) -> Image.Image:
    """A smooth picture with some texture: gradients plus a disc, like a photo more than like noise."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.4 * disc + 0.1 * np.sin(40 * x)], axis=-1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def reference_image(models, sampler, seed, steps, width, height, guidance_scale=7.5, eta=0.0,
                    image=None, strength=0.8) -> np.ndarray:
    pipe = models.txt2img if image is None else models.img2img
    pipe.scheduler = REFERENCE_SCHEDULERS[sampler]()
    args = dict(prompt=[PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed), eta=eta)
    if image is None:
        args.update(width=width, height=height)
    else:
        args.update(image=image, strength=strength)
    with torch.no_grad():
        return np.array(pipe(**args).images[0])


def our_image(models, sampler, seed, steps, width, height, guidance_scale=7.5, eta=0.0, image=None,
              strength=0.8) -> np.ndarray:
    images = models.ours.generate(
        [PROMPT], [seed], steps=steps, sampler=sampler, guidance_scale=guidance_scale,
        negative_prompts=[NEGATIVE], width=width, height=height, eta=eta, progress=False,
        init_images=None if image is None else [image], strength=None if image is None else strength)
    return np.array(images[0])


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_looks_like_an_image(pixels: np.ndarray):
    """Guards the parity tests against degenerate models: a flat or saturated image would match anything."""
    assert 8 < pixels.std() and 10 < pixels.mean() < 245, (pixels.mean(), pixels.std())


# -- parity with diffusers ---------------------------------------------------------------------------------

SAMPLER_CASES = [  # sampler, steps, eta
    ("ddpm", 3, 0.0),
    ("ddim", 3, 0.0),
    ("ddim", 3, 0.7),
    ("euler", 3, 0.0),
    ("euler_a", 3, 0.0),
    ("heun", 3, 0.0),
    ("lms", 4, 0.0),
    ("pndm", 4, 0.0),
    ("unipc", 4, 0.0),
    ("dpmpp_2m", 4, 0.0),
    ("dpmpp_2m_karras", 4, 0.0),
    ("dpmpp_2m_sde", 4, 0.0),
    ("dpmpp_2m_sde_karras", 4, 0.0),
    ("lcm", 4, 0.0),
]


@pytest.mark.parametrize(("sampler", "steps", "eta"), SAMPLER_CASES)
def test_txt2img_equals_diffusers(tiny, sampler, steps, eta):
    # 64 x 128: not square, so a swapped width and height would show.
    theirs = reference_image(tiny, sampler, seed=7, steps=steps, width=64, height=128, eta=eta)
    ours = our_image(tiny, sampler, seed=7, steps=steps, width=64, height=128, eta=eta)
    assert ours.shape == (128, 64, 3)
    assert_looks_like_an_image(theirs)
    assert max_level_difference(ours, theirs) <= 1


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.5), ("euler_a", 0.0),
                                              ("dpmpp_2m_karras", 0.0), ("heun", 0.0), ("lms", 0.0),
                                              ("pndm", 0.0), ("dpmpp_2m_sde", 0.0), ("lcm", 0.0)])
def test_img2img_equals_diffusers(tiny, sampler, eta):
    image = init_image(128, 64)
    theirs = reference_image(tiny, sampler, seed=3, steps=5, width=128, height=64, eta=eta, image=image,
                             strength=0.6)
    ours = our_image(tiny, sampler, seed=3, steps=5, width=128, height=64, eta=eta, image=image, strength=0.6)
    assert_looks_like_an_image(theirs)
    assert max_level_difference(ours, theirs) <= 1


def test_any_multiple_of_8_size_equals_diffusers(tiny):
    theirs = reference_image(tiny, "ddim", seed=2, steps=2, width=72, height=80)
    ours = our_image(tiny, "ddim", seed=2, steps=2, width=72, height=80)
    assert max_level_difference(ours, theirs) <= 1


def test_guidance_scale_one_equals_diffusers_without_guidance(tiny):
    theirs = reference_image(tiny, "euler_a", seed=5, steps=3, width=64, height=64, guidance_scale=1.0)
    ours = our_image(tiny, "euler_a", seed=5, steps=3, width=64, height=64, guidance_scale=1.0)
    assert max_level_difference(ours, theirs) <= 1


# -- per-image RNG and batching ----------------------------------------------------------------------------

def generate_batch(pipe, prompts, seeds, **kwargs):
    kwargs = dict(steps=3, sampler="euler_a", width=64, height=64, progress=False) | kwargs
    return [np.array(image) for image in pipe.generate(prompts, seeds, **kwargs)]


def test_an_image_does_not_depend_on_its_batch_neighbours(tiny):
    alone = generate_batch(tiny.ours, [PROMPT], [42])[0]
    in_three = generate_batch(tiny.ours, ["a red car", PROMPT, "a forest"], [1, 42, 2**64 - 1])[1]
    neighbours = [f"neighbour {i}" for i in range(7)]
    in_eight = generate_batch(tiny.ours, neighbours[:5] + [PROMPT] + neighbours[5:],
                              [100, 101, 102, 103, 104, 42, 105, 106])[5]
    assert max_level_difference(in_three, alone) <= 1
    assert max_level_difference(in_eight, alone) <= 1


def test_the_same_batch_gives_identical_bytes_again(tiny):
    prompts, seeds = [PROMPT, "a red car", PROMPT], [5, 6, 7]
    first = tiny.ours.generate(prompts, seeds, steps=3, sampler="ddpm", width=64, height=64, progress=False)
    again = tiny.ours.generate(prompts, seeds, steps=3, sampler="ddpm", width=64, height=64, progress=False)
    settings = tiny.ours.metadata(Request(PROMPT, 5, generation=Generation("ddpm", 3, width=64, height=64)))
    assert [png_bytes(image, settings) for image in first] == [png_bytes(image, settings) for image in again]


def test_seeds_and_prompts_change_the_image(tiny):
    base, other_seed, other_prompt = generate_batch(tiny.ours, [PROMPT, PROMPT, "a red car"], [1, 2, 1])
    assert max_level_difference(base, other_seed) > 10
    assert max_level_difference(base, other_prompt) > 10


def test_run_batches_requests_by_their_settings_and_each_image_is_as_if_alone(tiny):
    fast, other = Generation("euler_a", 3, width=64, height=64), Generation("ddim", 2, width=64, height=64)
    requests = [Request(PROMPT, 1, generation=fast), Request("a red car", 2, generation=other),
                Request("a forest", 3, generation=fast)]
    sizes = []
    handle = tiny.ours.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        results = tiny.ours.run(requests, progress=False)
    finally:
        handle.remove()
    assert sizes == [4] * 3 + [2] * 2  # one batch per Generation: 2 images (CFG rows), then 1
    assert [result.request for result in results] == requests
    for request, result in zip(requests, results, strict=True):
        alone = tiny.ours.run([request], progress=False)[0]
        assert result.finite and max_level_difference(np.array(result.image), np.array(alone.image)) <= 1


def test_run_reports_an_image_whose_latents_are_not_finite(tiny):
    broken = copy.deepcopy(tiny.ours.parts)
    broken.unet = copy.deepcopy(broken.unet)
    with torch.no_grad():
        broken.unet.out[2].bias.fill_(float("nan"))
    generation = Generation("ddim", 2, width=64, height=64)
    results = Pipeline(broken).run([Request(PROMPT, 1, generation=generation)], progress=False)
    assert results[0].finite is False
    assert tiny.ours.run([Request(PROMPT, 1, generation=generation)], progress=False)[0].finite is True


def test_run_refuses_a_strength_without_an_init_image_and_the_reverse(tiny):
    img2img = Request(PROMPT, 1, generation=Generation(steps=2, width=64, height=64, strength=0.5))
    with pytest.raises(ValueError, match=r"^requests\[0\]\.generation\.strength: is 0\.5 with init_images "
                                         r"not given"):
        tiny.ours.run([img2img])
    with pytest.raises(ValueError, match=r"^requests\[0\]\.generation\.strength: is None with init_"
                                         r"images given"):
        tiny.ours.run([Request(PROMPT, 1)], init_images=[BLACK])


def test_threads_may_share_one_pipeline(tiny):
    shared = Pipeline(tiny.ours.parts)  # fresh caches, so the threads also race to fill them
    seeds = (1, 2, 3)
    results = {}

    def run(seed):
        results[seed] = generate_batch(shared, [PROMPT], [seed], negative_prompts=[""])[0]

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in seeds:
        assert np.array_equal(results[seed], generate_batch(tiny.ours, [PROMPT], [seed])[0])


def unet_batch_sizes(pipe, **kwargs) -> list[tuple[int, int]]:
    """(latent rows, context rows) of every U-Net call."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args: sizes.append((args[0].shape[0], args[2].shape[0])))
    try:
        generate_batch(pipe, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_guidance_runs_uncond_and_cond_rows_in_one_unet_batch(tiny):
    sizes = unet_batch_sizes(tiny.ours, prompts=["a", "b", "c"], seeds=[1, 2, 3], guidance_scale=7.5)
    assert sizes == [(6, 6)] * 3


def test_guidance_scale_at_most_one_skips_the_uncond_pass(tiny):
    sizes = unet_batch_sizes(tiny.ours, prompts=["a", "b", "c"], seeds=[1, 2, 3], guidance_scale=1.0)
    assert sizes == [(3, 3)] * 3
    with_negative = generate_batch(tiny.ours, ["a"], [1], guidance_scale=1.0, negative_prompts=["ugly"])[0]
    without = generate_batch(tiny.ours, ["a"], [1], guidance_scale=1.0)[0]
    assert np.array_equal(with_negative, without)


def test_each_distinct_text_is_encoded_once(tiny):
    rows = []
    handle = tiny.ours.text_encoder.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        tiny.ours.encode_text([""])  # the empty negative prompt is cached after its first use
        rows.clear()
        embeddings = tiny.ours.encode_text(["", "", "", "a cat", "a dog", "a cat"])
    finally:
        handle.remove()
    assert rows == [2]
    assert torch.equal(embeddings[3], embeddings[5]) and torch.equal(embeddings[0], embeddings[2])


def test_callback_sees_every_step(tiny):
    calls = []
    generate_batch(tiny.ours, ["a", "b"], [1, 2], steps=4,
                   callback=lambda step, total, latents: calls.append((step, total, tuple(latents.shape))))
    assert calls == [(step, 4, (2, 4, 8, 8)) for step in (1, 2, 3, 4)]


def test_img2img_callback_counts_only_the_steps_run(tiny):
    calls = []
    generate_batch(tiny.ours, ["a"], [1], steps=10, init_images=[init_image(64, 64)], strength=0.3,
                   callback=lambda step, total, latents: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


# -- images in and out -------------------------------------------------------------------------------------

def test_init_images_of_another_size_or_mode_are_converted_and_resized_with_lanczos(tiny):
    source = init_image(100, 60)
    rgba = source.convert("RGBA")
    resized = source.resize((64, 64), resample=Image.Resampling.LANCZOS)
    from_rgba = generate_batch(tiny.ours, ["a"], [1], init_images=[rgba], strength=0.5)[0]
    from_resized = generate_batch(tiny.ours, ["a"], [1], init_images=[resized], strength=0.5)[0]
    assert np.array_equal(from_rgba, from_resized)
    grey = from_pil(source.convert("L"), 100, 60)
    assert grey.shape == (1, 3, 60, 100) and torch.equal(grey[:, 0], grey[:, 2])


def test_from_pil_maps_pixels_to_minus_one_one():
    pixels = from_pil(Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8)), 1, 1)
    assert torch.allclose(pixels.flatten(), torch.tensor([-1.0, 1.0, -0.6]))


def test_to_pil_rounds_half_to_even_like_diffusers():
    # float32 values whose (x * 0.5 + 0.5) * 255 is exactly 64.5 and 65.5: ties round to the even level.
    x = torch.tensor([-0.4941175878047943, -0.48627445101737976], dtype=torch.float32)
    assert ((x * 0.5 + 0.5).numpy() * np.float32(255)).tolist() == [64.5, 65.5]
    pixels = np.array(to_pil(x.view(1, 1, 1, 2).expand(1, 3, 1, 2)))
    assert pixels[0, :, 0].tolist() == [64, 66]


def test_settings_hold_every_key_of_the_png_contract(tiny):
    generation = Generation("ddim", 20, guidance_scale=6, width=64, height=128, eta=0.3)
    settings = tiny.ours.metadata(Request(PROMPT, 9, "x", generation))
    assert set(REQUIRED_KEYS) == set(settings)
    assert settings["guidance_scale"] == 6.0 and settings["random_model"] is True
    assert settings["precision"] == "fp32" and settings["model"] == "reference"
    img2img = tiny.ours.metadata(Request(PROMPT, 9, generation=Generation(strength=0.5)))
    assert img2img["strength"] == 0.5
    image = tiny.ours.generate([PROMPT], [9], steps=2, width=64, height=64, progress=False)[0]
    assert read_settings(png_bytes(image, settings)) == settings


def test_png_of_a_generated_image_round_trips(tiny):
    image = tiny.ours.generate([PROMPT], [3], steps=2, width=64, height=64, progress=False)[0]
    data = png_bytes(image, tiny.ours.metadata(Request(PROMPT, 3, generation=Generation(steps=2, width=64,
                                                                                         height=64))))
    assert np.array_equal(np.array(Image.open(io.BytesIO(data))), np.array(image))


# -- precision ---------------------------------------------------------------------------------------------

def half_copy(pipe: Pipeline) -> Pipeline:
    parts = pipe.parts
    return Pipeline(Components(
        tokenizer=parts.tokenizer, text_encoder=_half(parts.text_encoder), unet=_half(parts.unet),
        vae=_half(parts.vae), name=parts.name, weight_files=(), is_random=True))


def _half(module):
    return copy.deepcopy(module).half()


def test_load_takes_precision_names_or_dtypes_and_defaults_to_fp32_on_cpu():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'fp8' is not supported; use one of \['fp32', 'fp16'"):
        resolve_dtype("fp8", torch.device("cpu"))
    pipe = sdcore.load("tiny-random", dtype="fp16")  # device "auto": the CPU here, fp16 as asked
    assert (pipe.precision, pipe.dtype, pipe.model_hash) == ("fp16", torch.float16, None)
    assert next(pipe.vae.parameters()).dtype == torch.float16


def test_fp16_on_cpu_stays_close_to_fp32(tiny):
    half = half_copy(tiny.ours)
    assert half.precision == "fp16"
    full = generate_batch(tiny.ours, [PROMPT], [4], sampler="dpmpp_2m")[0]
    reduced = generate_batch(half, [PROMPT], [4], sampler="dpmpp_2m")[0]
    difference = np.abs(full.astype(int) - reduced.astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 8  # measured: mean 0.23, max 3


def test_vae_decode_redoes_an_fp16_overflow_in_fp32(tiny):
    half = half_copy(tiny.ours)
    with torch.no_grad():
        # Weights just inside fp16's range (max 65504) give activations past it; fp32 has room for them.
        weight = half.vae.decoder.conv_in.weight
        weight *= 60000 / weight.abs().max().item()
        scale = VAEConfig().scaling_factor
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scale
        assert not torch.isfinite(half.vae.decode((latents / scale).half())).all()  # the overflow
        decoded = half.decode(latents)
        in_fp32 = _half(half.vae).float().decode(latents / scale)
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded, in_fp32)
    image = np.array(half.generate(["a"], [1], steps=2, width=64, height=64, progress=False)[0])
    assert image.std() > 8  # not the black image that NaN would give


def test_vae_encode_redoes_an_fp16_overflow_in_fp32(tiny):
    half = half_copy(tiny.ours)
    image = init_image(64, 64)
    with torch.no_grad():
        weight = half.vae.encoder.conv_in.weight
        weight *= 60000 / weight.abs().max().item()
        pixels = from_pil(image, 64, 64)
        assert not torch.isfinite(half.vae.encode(pixels.half()).mean).all()  # the overflow
        latents = half.encode_images([image], [torch.Generator().manual_seed(1)], 64, 64)
        in_fp32 = _half(half.vae).float().encode(pixels).sample([torch.Generator().manual_seed(1)])
    assert torch.equal(latents, VAEConfig().scaling_factor * in_fp32)


# -- arguments ---------------------------------------------------------------------------------------------

BLACK = Image.new("RGB", (64, 64))
BAD_ARGUMENTS = [  # overrides of a valid call, error type, message fragment
    (dict(steps=0), ValueError, r"^steps: 0 is out of range; accepted: an integer from 1 to 999"),
    (dict(steps=1000), ValueError, r"^steps: 1000 is out of range; accepted: an integer from 1 to 999"),
    (dict(width=100), ValueError, r"^width: 100 is not a multiple of 8; accepted: .* from 64 to"),
    (dict(height=56), ValueError, r"^height: 56 is out of range; accepted: an integer from 64 to 2048"),
    (dict(width=4096), ValueError, r"^width: 4096 is out of range"),
    (dict(strength=1.5, init_images=[BLACK]), ValueError,
     r"^strength: 1\.5 is out of range; accepted: .* from 0 to 1"),
    (dict(strength=0.05, init_images=[BLACK]), ValueError, r"^strength: 0\.05 with steps=2 leaves 0 steps"),
    (dict(strength=0.5), ValueError, r"^strength: 0\.5 without init_images; accepted: .* img2img"),
    (dict(sampler="plms"), ValueError, r"^sampler: 'plms' is not a known sampler; accepted: ddpm, ddim"),
    (dict(eta=0.5), ValueError, r"^eta: 0\.5 with sampler ddpm, which has no eta; accepted: 0, .*: ddim"),
    (dict(cfg=7), TypeError, r"unknown setting\(s\) \['cfg'\]; accepted: .*guidance_scale"),
    (dict(seeds=[1, 2]), ValueError, r"^seeds has 2 values for 1 prompts"),
    (dict(seeds=[-1]), ValueError,
     r"^seeds\[0\]: -1 is out of range; accepted: an integer from 0 to 18446744073709551615"),
    (dict(seeds=[2**64]), ValueError, r"^seeds\[0\]: 18446744073709551616 is out of range"),
    (dict(seeds=[1.5]), ValueError, r"^seeds\[0\]: 1\.5 is a float; accepted: an integer"),
    (dict(prompts="a cat"), TypeError, r"^prompts must be a list, got str"),
    (dict(prompts=[None]), ValueError, r"^prompts\[0\]: None is a NoneType; accepted: UTF-8 text"),
    (dict(prompts=["a\x00"]), ValueError, r"^prompts\[0\]: contains a NUL character at position 1"),
    (dict(prompts=[]), ValueError, r"^prompts is empty"),
    (dict(negative_prompts=["a", "b"]), ValueError, r"^negative_prompts has 2 values for 1 prompts"),
    (dict(guidance_scale=float("nan")), ValueError,
     r"^guidance_scale: nan is not finite; accepted: .* from 0 to 100"),
    (dict(guidance_scale=float("inf")), ValueError, r"^guidance_scale: inf is not finite"),
    (dict(guidance_scale=-2), ValueError, r"^guidance_scale: -2 is out of range"),
    (dict(init_images=[BLACK, BLACK]), ValueError, r"^init_images has 2 images for 1 prompts"),
    (dict(init_images=[np.zeros((64, 64, 3))]), TypeError, r"^init_images\[0\] must be a PIL.Image.Image"),
    (dict(callback="print"), TypeError, r"^callback must be a callable"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_the_argument_and_the_range(tiny, overrides, error, message):
    arguments = dict(prompts=["a cat"], seeds=[1], steps=2, sampler="ddpm", width=64, height=64,
                     progress=False) | overrides
    with pytest.raises(error, match=message):
        tiny.ours.generate(**arguments)


# -- full SD 1.5 dimensions --------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_sd15_txt2img_and_img2img_equal_diffusers(tokenizer_folder):
    """The real SD 1.5 shapes (a 3.4 GB U-Net) at 64x64: run by hand under `flock /tmp/sd-heavy.lock`."""
    models = build_models(CLIPConfig(), UNetConfig(), VAEConfig(), tokenizer_folder)
    txt2img = [  # sampler, steps, eta (lms at 4 steps reaches its 4th order; heun at 3 runs 5 U-Net calls)
        ("dpmpp_2m_karras", 3, 0.0), ("ddim", 3, 0.5), ("euler", 3, 0.0), ("heun", 3, 0.0), ("lms", 4, 0.0),
        ("pndm", 3, 0.0), ("unipc", 3, 0.0), ("dpmpp_2m_sde", 3, 0.0), ("dpmpp_2m_sde_karras", 3, 0.0),
        ("lcm", 3, 0.0),
    ]  # fmt: skip
    try:
        for sampler, steps, eta in txt2img:
            theirs = reference_image(models, sampler, seed=1, steps=steps, width=64, height=64, eta=eta)
            ours = our_image(models, sampler, seed=1, steps=steps, width=64, height=64, eta=eta)
            assert_looks_like_an_image(theirs)
            assert max_level_difference(ours, theirs) <= 1, sampler
        image = init_image(64, 64)
        theirs = reference_image(models, "euler_a", seed=2, steps=4, width=64, height=64, image=image,
                                 strength=0.5)
        ours = our_image(models, "euler_a", seed=2, steps=4, width=64, height=64, image=image, strength=0.5)
        assert max_level_difference(ours, theirs) <= 1
    finally:
        del models
        gc.collect()
