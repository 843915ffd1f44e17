"""PNG files that carry their own generation settings.

Two text chunks, so both people's tools and this project can read an image back:
- `parameters`: the AUTOMATIC1111 web UI's "infotext" (prompt, `Negative prompt:` line, then
  `Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model hash: .., Model: ..`), which image
  viewers and other SD front ends already parse;
- `sdcore`: every setting as JSON, the exact record `sdcore generate --from-png` regenerates from.

The bytes depend only on the pixels and the settings (no timestamps, sorted JSON keys, fixed compression),
so re-running a job rewrites an identical file.
"""

from __future__ import annotations

import io
import json
import os

from PIL import Image, PngImagePlugin

from sdcore.params import GENERATION_FIELDS, SAMPLERS

# A Request's fields (sdcore.params; strength only for img2img) and the model that made the image.
MODEL_KEYS = ("model", "model_hash", "precision", "random_model")
REQUIRED_KEYS = ("prompt", "negative_prompt", "seed",
                 *(name for name in GENERATION_FIELDS if name != "strength"), *MODEL_KEYS)


def infotext(settings: dict) -> str:
    """The A1111 `parameters` text for one image's settings."""
    lines = [settings["prompt"]]
    if settings["negative_prompt"]:
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [
        ("Steps", settings["steps"]),
        ("Sampler", SAMPLERS[settings["sampler"]].a1111 if settings["sampler"] in SAMPLERS
                    else settings["sampler"]),
        ("CFG scale", settings["guidance_scale"]),
        ("Seed", settings["seed"]),
        ("Size", f"{settings['width']}x{settings['height']}"),
    ]
    if settings["model_hash"]:
        fields.append(("Model hash", settings["model_hash"]))
    # A reader must never mistake a random-weight image for a real model's output.
    model = f"{settings['model']} (random weights)" if settings["random_model"] else settings["model"]
    fields.append(("Model", model))
    if settings.get("strength") is not None:
        fields.append(("Denoising strength", settings["strength"]))
    if settings["eta"]:
        fields.append(("Eta", settings["eta"]))
    fields.append(("Precision", settings["precision"]))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image, settings: dict) -> bytes:
    """Encode `image` as PNG with the `parameters` (A1111) and `sdcore` (JSON) text chunks."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in settings]
    if missing:
        raise ValueError(f"settings is missing {missing}; required keys are {list(REQUIRED_KEYS)}")
    info = PngImagePlugin.PngInfo()
    # add_text writes tEXt when the text is latin-1 and falls back to iTXt (UTF-8) otherwise, so prompts
    # in any script survive; the JSON is ASCII (escaped) and always lands in tEXt.
    info.add_text("parameters", infotext(settings))
    info.add_text("sdcore", json.dumps(settings, sort_keys=True, ensure_ascii=True, allow_nan=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_settings(path_or_bytes: str | os.PathLike | bytes) -> dict:
    """The `sdcore` JSON settings of a PNG written by `png_bytes` (a path or the file's bytes)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes | bytearray) else path_or_bytes
    name = "<bytes>" if isinstance(path_or_bytes, bytes | bytearray) else os.fspath(path_or_bytes)
    try:
        with Image.open(source) as image:
            if image.format != "PNG":
                raise ValueError(f"{name}: is a {image.format} image; sdcore settings live in PNG files")
            text = dict(image.text)
    except Image.UnidentifiedImageError as error:
        raise ValueError(f"{name}: not an image file ({error})") from None
    if "sdcore" not in text:
        found = sorted(text) or "none"
        raise ValueError(f"{name}: no 'sdcore' settings chunk (text chunks found: {found}); "
                         "only PNGs written by sdcore can be regenerated")
    try:
        return json.loads(text["sdcore"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: the 'sdcore' chunk is not valid JSON ({error})") from None
