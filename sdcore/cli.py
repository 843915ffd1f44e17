"""`sdcore generate` and `sdcore convert`: the library from a shell.

    sdcore generate "a lighthouse at dusk" --checkpoint v1-5-pruned-emaonly.safetensors --seed 1 --out a.png
    sdcore generate --from-png a.png --out again.png          # same pixels, from the PNG's own metadata
    sdcore convert v1-5-pruned-emaonly.ckpt sd15.safetensors --half

User errors (a bad argument, a missing or broken file) print one line and exit with status 1; argparse's
usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from PIL import Image

from sdcore.errors import InvalidField
from sdcore.params import (
    CLIP_SKIP_RANGE,
    IMG2IMG_STRENGTH,
    LOAD_BACKENDS,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    OPENVINO_PRECISIONS,
    PRECISIONS,
    SAMPLERS,
    Generation,
    Request,
)
from sdcore.png import png_bytes, read_settings

# generate's flags for the request's fields: flag -> field of sdcore.params.Request / Generation
REQUEST_FLAGS = {"negative": "negative_prompt", "seed": "seed", "steps": "steps", "sampler": "sampler",
                 "cfg": "guidance_scale", "eta": "eta", "width": "width", "height": "height",
                 "strength": "strength", "clip_skip": "clip_skip"}


LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")


def build_parser() -> argparse.ArgumentParser:
    default = Generation()
    size = f"multiple of 8 in {MIN_SIZE}..{MAX_SIZE}"
    parser = argparse.ArgumentParser(prog="sdcore", description="Stable Diffusion 1.5 from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="generate one image and write it as PNG with its settings",
        description="Generate one image. With --from-png, settings come from that PNG's metadata; "
                    "flags given explicitly override them.")
    generate.add_argument("prompt", nargs="?", help="the prompt (omit with --from-png)")
    generate.add_argument("--checkpoint", help=".ckpt / .safetensors file, diffusers folder, or tiny-random")
    generate.add_argument("--from-png", type=Path, metavar="FILE", help="regenerate from this PNG's settings")
    generate.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    generate.add_argument("--negative", help='negative prompt (default "")')
    generate.add_argument("--seed", type=int, help="0..2**64-1 (default: random, printed and recorded)")
    generate.add_argument("--steps", type=int,
                          help=f"sampler steps, 1..{MAX_STEPS} (default {default.steps})")
    generate.add_argument("--sampler", choices=list(SAMPLERS), help=f"default {default.sampler}")
    generate.add_argument("--cfg", type=float, help="guidance scale; <= 1 disables guidance "
                                                    f"(default {default.guidance_scale:g})")
    generate.add_argument("--eta", type=float, help=f"DDIM eta (default {default.eta:g})")
    generate.add_argument("--width", type=int, help=f"{size} (default {default.width})")
    generate.add_argument("--height", type=int, help=f"{size} (default {default.height})")
    generate.add_argument("--clip-skip", type=int, metavar="N",
                          help="text-encoder layer to condition on, counted from the last as AUTOMATIC1111 "
                               "does: 1 the last, 2 the one before "
                               f"({'..'.join(map(str, CLIP_SKIP_RANGE))}, default {default.clip_skip})")
    generate.add_argument("--precision", choices=tuple(dict.fromkeys((*PRECISIONS, *OPENVINO_PRECISIONS))),
                          help="default: fp16 on CUDA, fp32 on CPU; with --from-png, the PNG's precision; "
                               "int8 with --backend openvino only")
    generate.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto: cuda when available)")
    generate.add_argument("--init-image", type=Path, metavar="FILE", help="img2img: start from this image")
    generate.add_argument("--strength", type=float,
                          help=f"img2img strength in (0, 1] (default {IMG2IMG_STRENGTH:g})")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                          help="merge this LoRA (kohya/A1111 or diffusers layout) at WEIGHT (default 1, or "
                               "the weight a --from-png image recorded); repeatable")
    generate.add_argument("--lora-dir", type=Path, metavar="DIR",
                          help="where <lora:name:w> tags in the prompt find name.safetensors / .pt / .ckpt")
    generate.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                          help="a textual-inversion embedding; the prompt word is its token or file stem; "
                               "repeatable")
    generate.add_argument("--vae", type=Path, metavar="FILE",
                          help="a standalone VAE file (e.g. the ft-MSE VAE) instead of the checkpoint's")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    generate.add_argument("--winograd", action="store_true",
                          help="CPU fp32: run the U-Net's 3x3 convolutions as Winograd (faster, more memory)")
    generate.add_argument("--backend", choices=LOAD_BACKENDS,
                          help="openvino: the U-Net and VAE compiled for the CPU (--precision fp32, bf16 or "
                               "int8; pip install -e '.[openvino]'); auto: openvino for fp32 on the CPU "
                               "where it is installed, else torch (default torch, or what --from-png "
                               "recorded)")
    generate.set_defaults(run=run_generate)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint to one .safetensors file (fast memory-mapped loads)")
    convert.add_argument("source", help=".ckpt / .safetensors file or diffusers folder")
    convert.add_argument("destination", help="output .safetensors file")
    convert.add_argument("--half", action="store_true", help="store weights as fp16")
    convert.add_argument("--layout", choices=("original", "diffusers"), default="original",
                         help="key layout of the output (default original)")
    convert.set_defaults(run=run_convert)
    return parser


def run_generate(args: argparse.Namespace) -> str:
    from sdcore.pipeline import load  # torch: not needed for --help or a bad setting

    recorded = read_settings(args.from_png) if args.from_png else {}
    img2img = args.init_image is not None
    if recorded.get("strength") is not None and not img2img:
        raise ValueError(f"{args.from_png} is an img2img image (strength {recorded['strength']!r:.40}); "
                         "pass --init-image with the image it started from")
    if args.strength is not None and not img2img:
        raise ValueError("--strength applies to img2img only; pass --init-image too")
    values = dict(recorded)
    values["prompt"] = args.prompt if args.prompt is not None else recorded.get("prompt")
    if values["prompt"] is None:
        raise ValueError("generate needs a PROMPT argument or --from-png FILE")
    for flag, name in REQUEST_FLAGS.items():
        if getattr(args, flag) is not None:
            values[name] = getattr(args, flag)
    values.setdefault("seed", secrets.randbelow(2**32))
    lora_files = [lora_file(text) for text in args.lora]
    weights = {lora["name"]: lora["weight"] for lora in recorded.get("loras", [])}
    for path, weight in lora_files:
        weights[path.stem] = weights.get(path.stem, 1.0) if weight is None else weight
    values["loras"] = [{"name": name, "weight": weight} for name, weight in weights.items()]
    if img2img:
        values.setdefault("strength", IMG2IMG_STRENGTH)
    try:
        request = Request.from_dict(values)  # every setting checked before the model loads
    except (InvalidField, TypeError) as error:
        given = {name for flag, name in REQUEST_FLAGS.items() if getattr(args, flag) is not None}
        if args.prompt is not None:
            given.add("prompt")
        field = getattr(error, "field", "").split(".")[0].split("[")[0]
        if recorded and field not in given:  # the value came from the PNG: say which file holds it
            raise ValueError(f"{args.from_png}: the 'sdcore' chunk: {error}") from None
        raise
    device = check_device(args.device)

    checkpoint = args.checkpoint or ("tiny-random" if recorded.get("random_model") else None)
    if checkpoint is None:
        if recorded:
            raise ValueError(f"{args.from_png} was made with model {recorded.get('model')!r:.80} "
                             f"(hash {recorded.get('model_hash')}); pass --checkpoint with that model's file")
        raise ValueError("--checkpoint is required: a .ckpt / .safetensors file, a diffusers folder, "
                         "or tiny-random")
    # A recorded winograd image is remade with winograd where it can run (CPU fp32), for the same bytes;
    # sdcore.load leaves it off on a GPU that device "auto" finds.
    winograd = args.winograd or (bool(recorded.get("winograd")) and args.device in (None, "auto", "cpu")
                                 and (args.precision or "fp32") == "fp32")
    # A request that named its VAE (Generation.vae, e.g. an sdbatch job's) is remade with --vae under that
    # name, so its record stays the same; otherwise --vae replaces the checkpoint's VAE.
    named_vae = request.generation.vae
    if (recorded.get("vae_file") or named_vae) and args.vae is None:
        made_with = (recorded.get("vae_file") or {}).get("name") or named_vae
        raise ValueError(f"{args.from_png} was made with VAE {made_with!r:.80}; pass --vae FILE")
    pipe = load(checkpoint, device=device, dtype=args.precision or recorded.get("precision"),
                winograd=winograd, vae=None if named_vae else args.vae,
                backend=args.backend or recorded.get("backend", "torch"))  # a replay keeps its backend
    if named_vae:
        pipe.add_vae(args.vae, named_vae)
    for path, _ in lora_files:
        pipe.add_lora(path)
    for path in args.embedding:
        pipe.add_embedding(path)
    add_tagged_loras(pipe, request, args.lora_dir)
    missing = [e["name"] for e in recorded.get("embeddings", []) if e["name"] not in pipe.embeddings]
    if missing:
        raise ValueError(f"{args.from_png} was made with the embedding(s) {missing}; pass --embedding FILE "
                         "for each")
    recorded_hashes = {lora["name"]: lora.get("sha256") for lora in recorded.get("loras", [])}
    for name, lora in pipe.loras.items():
        if recorded_hashes.get(name) and recorded_hashes[name] != lora.sha256:
            print(f"sdcore: warning: {args.from_png} was made with another LoRA {name!r} "
                  f"(sha256 {recorded_hashes[name][:12]}); the image will differ", file=sys.stderr)
    if recorded.get("model_hash") and pipe.model_hash and recorded["model_hash"] != pipe.model_hash:
        print(f"sdcore: warning: {args.from_png} was made with model hash {recorded['model_hash']}, "
              f"{checkpoint} has {pipe.model_hash}; the image will differ", file=sys.stderr)

    init_images = [open_image(args.init_image)] if img2img else None
    result = pipe.run([request], init_images, progress=not args.no_progress)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png_bytes(result.image, pipe.metadata(request)))
    label = " (random weights)" if pipe.is_random else ""
    return f"wrote {args.out} (seed {request.seed}, model {pipe.name}{label})"


def lora_file(text: str) -> tuple[Path, float | None]:
    """--lora FILE[:WEIGHT] -> (file, weight or None). A weight is the part after the last colon when it
    reads as a number, so paths holding colons still work."""
    head, _, tail = text.rpartition(":")
    try:
        return Path(head), float(tail)
    except ValueError:
        return Path(text), None


def add_tagged_loras(pipe, request: Request, folder: Path | None) -> None:
    """Load the LoRA files the prompt's <lora:name:w> tags name (and --lora did not) from --lora-dir."""
    from sdcore.prompts import extract_networks

    _, tags = extract_networks(request.prompt)
    for name in dict.fromkeys(tag.name for tag in tags if tag.is_lora and tag.name not in pipe.loras):
        found = [path for path in (folder / f"{name}{ext}" for ext in LORA_EXTENSIONS) if path.is_file()] \
            if folder else []
        if not found:
            where = f"in --lora-dir {folder}" if folder else "(no --lora-dir given)"
            raise ValueError(f"the prompt's <lora:{name}:...> names no LoRA file {where}; accepted: "
                             f"{name}{'/'.join(LORA_EXTENSIONS)} in --lora-dir, or --lora FILE")
        pipe.add_lora(found[0], name)


def check_device(text: str | None) -> str:
    """--device as torch will read it ("auto" when not given), refused here as a user error otherwise."""
    if text is None or text == "auto":
        return "auto"
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {text!r:.40} is not a device; accepted: auto, cpu, cuda, "
                         "cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: torch sees no CUDA GPU (torch {torch.__version__}); accepted: "
                         "--device cpu or auto, or a CUDA build of torch on a GPU machine")
    return text


def open_image(path: Path) -> Image.Image:
    if path.exists() and not path.is_file():  # a FIFO would block the read for ever, /dev/zero never end
        raise ValueError(f"--init-image {path}: not a regular file; accepted: an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Image.UnidentifiedImageError:
        raise ValueError(f"--init-image {path}: not an image file PIL can read") from None
    except Image.DecompressionBombError as error:
        # PIL's own guard, on the header, against a small file that decodes into gigabytes
        raise ValueError(f"--init-image {path}: {error}; accepted: an image PIL decodes (it is resized to "
                         "--width x --height anyway: scale it down first)") from None
    except (OSError, SyntaxError) as error:  # PIL reports a truncated or broken file as either
        raise ValueError(f"--init-image {path}: a broken image file ({str(error)[:120]})") from None


def run_convert(args: argparse.Namespace) -> str:
    from sdcore.checkpoints import convert_checkpoint

    convert_checkpoint(args.source, args.destination, half=args.half, layout=args.layout)
    return f"wrote {args.destination} ({args.layout} layout{', fp16' if args.half else ''})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(args.run(args))
    except (ValueError, OSError) as error:  # user errors: bad arguments, missing or broken files
        print(f"sdcore {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
