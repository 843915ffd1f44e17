"""PNG metadata: A1111 `parameters` text, the `sdcore` JSON chunk, deterministic bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from sdcore.png import infotext, png_bytes, read_settings

SETTINGS = {
    "prompt": "a lighthouse at dusk, oil painting",
    "negative_prompt": "blurry",
    "seed": 1,
    "steps": 20,
    "sampler": "euler_a",
    "guidance_scale": 7.5,
    "eta": 0.0,
    "width": 64,
    "height": 48,
    "model": "v1-5-pruned-emaonly",
    "model_hash": "6ce0161689",
    "precision": "fp16",
    "random_model": False,
}


def an_image(width=64, height=48, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_round_trip_gives_back_the_settings_and_the_pixels():
    image = an_image()
    data = png_bytes(image, SETTINGS)
    assert read_settings(data) == SETTINGS
    assert np.array_equal(np.array(Image.open(io.BytesIO(data))), np.array(image))


def test_read_settings_accepts_a_path(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes(an_image(), SETTINGS))
    assert read_settings(path) == SETTINGS
    assert read_settings(str(path)) == SETTINGS


def test_same_image_and_settings_give_identical_bytes():
    assert png_bytes(an_image(), SETTINGS) == png_bytes(an_image(), dict(reversed(SETTINGS.items())))


def test_parameters_chunk_is_a1111_infotext():
    text = Image.open(io.BytesIO(png_bytes(an_image(), SETTINGS))).text["parameters"]
    assert text == (
        "a lighthouse at dusk, oil painting\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x48, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Precision: fp16"
    )


def test_infotext_omits_empty_negative_and_adds_img2img_and_eta_fields():
    settings = {**SETTINGS, "negative_prompt": "", "sampler": "ddim", "eta": 0.5, "strength": 0.75}
    assert infotext(settings) == (
        "a lighthouse at dusk, oil painting\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x48, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Eta: 0.5, Precision: fp16"
    )


def test_random_weight_images_are_labelled_as_such():
    settings = {**SETTINGS, "model": "tiny-random", "model_hash": None, "random_model": True}
    text = infotext(settings)
    assert "Model: tiny-random (random weights)" in text
    assert "Model hash" not in text
    assert read_settings(png_bytes(an_image(), settings))["random_model"] is True


def test_non_latin1_prompts_survive():
    settings = {**SETTINGS, "prompt": "富士山と桜 🌸", "negative_prompt": "ぼやけた"}
    data = png_bytes(an_image(), settings)
    assert read_settings(data)["prompt"] == "富士山と桜 🌸"
    parameters = Image.open(io.BytesIO(data)).text["parameters"]
    assert parameters.startswith("富士山と桜 🌸\nNegative prompt: ぼやけた")


def test_missing_setting_is_named():
    settings = {key: value for key, value in SETTINGS.items() if key != "seed"}
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        png_bytes(an_image(), settings)


def test_png_without_sdcore_chunk_is_a_clear_error():
    buffer = io.BytesIO()
    an_image().save(buffer, format="PNG")
    with pytest.raises(ValueError, match="no 'sdcore' settings chunk"):
        read_settings(buffer.getvalue())


def test_non_image_bytes_are_a_clear_error():
    with pytest.raises(ValueError, match="not an image file"):
        read_settings(b"definitely not a png")
