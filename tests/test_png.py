"""PNG metadata: A1111 `parameters` text, the `sdcore` JSON chunk, deterministic bytes."""

import io
import json
import re

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
    "clip_skip": 1,
    "loras": [],
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
        "Model: v1-5-pruned-emaonly, RNG: CPU, Precision: fp16"
    )


def test_infotext_omits_empty_negative_and_adds_img2img_clip_skip_and_eta_fields():
    settings = {**SETTINGS, "negative_prompt": "", "sampler": "ddim", "eta": 0.5, "strength": 0.75,
                "clip_skip": 2}
    assert infotext(settings) == (
        "a lighthouse at dusk, oil painting\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x48, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Clip skip: 2, RNG: CPU, Eta DDIM: 0.5, "
        "Precision: fp16"
    )


def test_infotext_writes_lora_embedding_and_vae_hashes_as_a1111_does():
    sha, other = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    settings = {**SETTINGS, "loras": [{"name": "add_detail", "weight": 0.7, "sha256": sha},
                                      {"name": "my: lora, v2", "weight": 1.0, "sha256": other}],
                "prompt_loras": [{"name": "tagged", "weight": 1, "sha256": sha, "shorthash": "a1111addnet"}],
                "embeddings": [{"name": "EasyNegative", "sha256": sha}],
                "vae_file": {"name": "vae-ft-mse-840000-ema-pruned.safetensors", "sha256": sha}}
    assert infotext(settings).split("\n")[-1] == (
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x48, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, VAE hash: 0123456789, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
        'RNG: CPU, Lora hashes: "add_detail: 0123456789ab, my lora v2: fedcba987654, tagged: a1111addnet", '
        'TI hashes: "EasyNegative: 0123456789ab", Precision: fp16'
    )
    assert read_settings(png_bytes(an_image(), settings)) == settings


def test_hash_lists_without_a_name_or_a_hash_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"settings\['loras'\] has \{'name': 'x'\}; each entry needs a name"):
        infotext({**SETTINGS, "loras": [{"name": "x"}]})


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


# -- A1111's own reader ------------------------------------------------------------------------------------

A1111_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_read(text: str) -> dict:
    """The fields A1111's `infotext_utils.parse_generation_parameters` reads, restated: prompt lines, the
    negative prompt from its "Negative prompt:" line on, then the last line's `key: value` pairs (if it has
    at least 3), a value in double quotes read as JSON, and "Size: WxH" as Size-1 / Size-2."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAMETER.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    fields = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in A1111_PARAMETER.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = A1111_SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
        else:
            fields[key] = value
    return fields


@pytest.mark.parametrize("model", ["my model, v2: final", "plain-name", 'say "hi"', '"quoted"', "a\nb",
                                   "tab\there, 100%", "ünïcödé: ✓", "back\\slash, \"quote\""])
def test_a1111s_reader_gets_every_value_back_whole(model):
    settings = {**SETTINGS, "model": model, "clip_skip": 2, "sampler": "ddim", "eta": 0.25, "strength": 0.5,
                "loras": [{"name": "detail", "weight": 0.5, "sha256": "ab" * 32}],
                "vae_file": {"name": "my vae, v1.safetensors", "sha256": "cd" * 32}}
    fields = a1111_read(Image.open(io.BytesIO(png_bytes(an_image(), settings))).text["parameters"])
    assert fields == {
        "Prompt": "a lighthouse at dusk, oil painting", "Negative prompt": "blurry", "Steps": "20",
        "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "1", "Size-1": "64", "Size-2": "48",
        "Model hash": "6ce0161689", "Model": model, "VAE hash": "cdcdcdcdcd", "VAE": "my vae, v1.safetensors",
        "Denoising strength": "0.5", "Clip skip": "2", "RNG": "CPU", "Lora hashes": "detail: abababababab",
        "Eta DDIM": "0.25", "Precision": "fp16",
    }  # fmt: skip


def test_a1111s_reader_gets_multi_line_prompts_and_reads_a_missing_clip_skip_as_one():
    settings = {**SETTINGS, "prompt": "a lighthouse,\n(at dusk:1.2)", "negative_prompt": "blurry,\nugly"}
    fields = a1111_read(infotext(settings))
    assert (fields["Prompt"], fields["Negative prompt"]) == ("a lighthouse,\n(at dusk:1.2)", "blurry,\nugly")
    assert "Clip skip" not in fields  # A1111's reader then sets 1, as written
