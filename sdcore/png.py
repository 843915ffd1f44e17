"""PNG files that carry their own generation settings.

Two text chunks, so both people's tools and this project can read an image back:
- `parameters`: the AUTOMATIC1111 web UI's "infotext" (prompt, `Negative prompt:` line, then
  `Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model hash: .., Model: ..`), which image
  viewers and other SD front ends already parse. Keys, their order and when they appear follow A1111's
  `processing.create_infotext`; a value holding `,` `:` or a line break is written as a JSON string, as
  A1111's `infotext_utils.quote` does, so its reader (`parse_generation_parameters`) reads it back whole;
- `sdcore`: every setting as JSON, the exact record `sdcore generate --from-png` regenerates from.

The bytes depend only on the pixels and the settings (no timestamps, sorted JSON keys, fixed compression),
so re-running a job rewrites an identical file.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

from PIL import Image, PngImagePlugin

from sdcore.params import GENERATION_FIELDS, OPTIONAL_FIELDS, SAMPLERS

# A Request's fields (sdcore.params; strength and vae only when set) and the model that made the image.
MODEL_KEYS = ("model", "model_hash", "precision", "random_model")
REQUIRED_KEYS = ("prompt", "negative_prompt", "seed",
                 *(name for name in GENERATION_FIELDS if name not in OPTIONAL_FIELDS), *MODEL_KEYS)
# Written when present: loras [{"name", "weight", "sha256", "shorthash"}] (the settings' LoRAs),
# prompt_loras (the same, from the prompt's <lora:name:w> tags), embeddings [{"name", "sha256"}] (the ones
# the prompts used), vae_file {"name", "sha256"} (the VAE's own file: the request's `vae` or the model's).
OPTIONAL_KEYS = (*OPTIONAL_FIELDS, "loras", "prompt_loras", "embeddings", "vae_file")

# How many hex digits of a file's SHA-256 A1111 writes: sd_models' "Model hash" (AutoV2) and sd_vae's
# "VAE hash"; the networks' `shorthash` of "Lora hashes" and "TI hashes" (for a .safetensors LoRA, not the
# file's sha256: the metadata records A1111's own as the LoRA's "shorthash").
MODEL_HASH_DIGITS = 10
NETWORK_HASH_DIGITS = 12
# A1111 writes DDIM's eta as "Eta DDIM" (its timestep samplers), a k-diffusion sampler's as "Eta".
ETA_KEYS = {"ddim": "Eta DDIM"}


def infotext(settings: dict) -> str:
    """The A1111 `parameters` text for one image's settings."""
    lines = [settings["prompt"]]
    if settings["negative_prompt"]:
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    sampler = settings["sampler"]
    fields = [
        ("Steps", settings["steps"]),
        ("Sampler", SAMPLERS[sampler].a1111 if sampler in SAMPLERS else sampler),
        ("CFG scale", settings["guidance_scale"]),
        ("Seed", settings["seed"]),
        ("Size", f"{settings['width']}x{settings['height']}"),
    ]
    if settings["model_hash"]:
        fields.append(("Model hash", settings["model_hash"]))
    # A reader must never mistake a random-weight image for a real model's output.
    model = f"{settings['model']} (random weights)" if settings["random_model"] else settings["model"]
    fields.append(("Model", model))
    vae = settings.get("vae_file")
    if vae:
        if not isinstance(vae, dict) or not isinstance(vae.get("name"), str):
            raise ValueError(f"settings['vae_file'] is {vae!r}; expected {{'name': str, 'sha256': str}}")
        if vae.get("sha256"):
            fields.append(("VAE hash", vae["sha256"][:MODEL_HASH_DIGITS]))
        fields.append(("VAE", vae["name"]))
    if settings.get("strength") is not None:
        fields.append(("Denoising strength", settings["strength"]))
    if settings["clip_skip"] > 1:
        fields.append(("Clip skip", settings["clip_skip"]))  # A1111 omits it at 1, and reads 1 when absent
    # Every image's noise comes from a CPU generator seeded with its seed (sdcore.noise), which is A1111's
    # "CPU" random source; an infotext without RNG means A1111's default, the GPU's.
    fields.append(("RNG", "CPU"))
    loras = [*settings.get("loras", ()), *settings.get("prompt_loras", ())]
    for key, name, entries in (("loras", "Lora hashes", loras), ("embeddings", "TI hashes",
                                                                 settings.get("embeddings"))):
        if entries:
            fields.append((name, network_hashes(entries, key)))
    if settings["eta"]:
        fields.append((ETA_KEYS.get(sampler, "Eta"), settings["eta"]))
    fields.append(("Precision", settings["precision"]))
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields))
    return "\n".join(lines)


def quote(value) -> str:
    """A value as A1111 writes it: as a JSON string when it holds `,` `:` or a line break (its `quote`), and
    also when it starts and ends with `"`, which A1111's reader would otherwise take for a JSON string."""
    text = str(value)
    if any(char in text for char in ",:\n") or (len(text) > 1 and text[0] == text[-1] == '"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def network_hashes(entries: Iterable[dict], key: str) -> str:
    """A1111's "Lora hashes" / "TI hashes" value: "name: shorthash, ...", with `:` and `,` taken out of the
    names; a name given twice keeps its first place and its last hash, as A1111's dict of them does. The
    shorthash is the entry's own (a LoRA's: sdcore.lora.LoRA.shorthash) or its sha256's first 12 digits."""
    hashes = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("sha256"), str):
            raise ValueError(f"settings[{key!r}] has {entry!r}; each entry needs a name and a sha256 (str)")
        short = entry.get("shorthash") or entry["sha256"][:NETWORK_HASH_DIGITS]
        hashes[entry["name"].replace(":", "").replace(",", "")] = short
    return ", ".join(f"{name}: {short}" for name, short in hashes.items())


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
    if not isinstance(source, io.BytesIO) and os.path.exists(source) and not os.path.isfile(source):
        # a FIFO would block the read for ever, a device (/dev/zero) never end: only files are images
        raise ValueError(f"{name}: not a regular file; accepted: a PNG file written by sdcore")
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
        settings = json.loads(text["sdcore"])
    except RecursionError:
        raise ValueError(f"{name}: the 'sdcore' chunk is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, or an int of more digits than Python converts
        raise ValueError(f"{name}: the 'sdcore' chunk is not valid JSON ({str(error)[:120]})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{name}: the 'sdcore' chunk is a JSON {type(settings).__name__}, not an object; "
                         "only PNGs written by sdcore can be regenerated")
    problem = _recorded_problem(settings)
    if problem:
        raise ValueError(f"{name}: the 'sdcore' chunk: {problem}")
    return settings


# The shapes of the recorded keys that are not a Request's (a Request checks its own fields when it is made
# from them): what a reader of the settings may then rely on.
_NAMED = {"name": str}
RECORDED_SHAPES = {
    "model": str, "model_hash": (str, type(None)), "precision": str, "random_model": bool, "winograd": bool,
    "loras": [{"name": str, "weight": (int, float)}], "prompt_loras": [{"name": str, "weight": (int, float)}],
    "embeddings": [_NAMED], "vae_file": _NAMED,
}


def _recorded_problem(settings: dict) -> str | None:
    """What is wrong with the recorded keys of RECORDED_SHAPES that are present, or None."""
    for key, shape in RECORDED_SHAPES.items():
        if key in settings:
            problem = _shape_problem(settings[key], shape)
            if problem:
                return f"{key}: {problem}"
    return None


def _shape_problem(value, shape) -> str | None:
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"is a {type(value).__name__}; accepted: a list"
        return next((f"[{i}]: {p}" for i, p in enumerate(_shape_problem(v, shape[0]) for v in value) if p),
                    None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"is a {type(value).__name__}; accepted: an object with {', '.join(shape)}"
        return next((f"{k}: {p}" for k, p in ((k, _shape_problem(value.get(k), t)) for k, t in shape.items())
                     if p), None)
    kinds = shape if isinstance(shape, tuple) else (shape,)
    # bool is an int to Python, but a weight of true is a broken record, not 1
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f"is a {type(value).__name__}; accepted: {' or '.join(k.__name__ for k in kinds)}"
    return None
