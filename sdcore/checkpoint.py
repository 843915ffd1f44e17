"""Load Stable Diffusion 1.x weights into sdcore's modules, and convert checkpoints between layouts.

Every source (an original .ckpt / .safetensors file, a diffusers folder) is first read as one flat state
dict in the original layout whose tensors are memory-mapped views of the file. Each module is then built on
the meta device and takes those tensors by assignment, cast one tensor at a time, so the weights are never
resident twice while loading.
"""

import ctypes
import functools
import hashlib
import json
import mmap
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import convert
from .config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from .errors import CheckpointError
from .models import scaled_init_
from .models.clip import CLIPTextModel
from .models.unet import UNetModel
from .models.vae import AutoencoderKL
from .tokenizer import CLIPTokenizer

COMPONENTS = ("text_encoder", "vae", "unet")  # the order errors and loads go in
PREFIXES = convert.ORIGINAL_PREFIXES
TITLES = {"text_encoder": "text encoder", "vae": "VAE", "unet": "U-Net"}
# Module class and the configs sdcore knows for each component, SD 1.5 first: a file's shapes pick one
# (checkpoints do not record the head count, so dimensions cannot be fully read off the weights).
MODELS = {
    "text_encoder": (CLIPTextModel, (CLIPConfig(), tiny_clip())),
    "vae": (AutoencoderKL, (VAEConfig(), tiny_vae())),
    "unet": (UNetModel, (UNetConfig(), tiny_unet())),
}
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEEDS = {"text_encoder": 1, "vae": 2, "unet": 3}

# Tensors in original checkpoints that are not weights: the training noise schedule (recomputed in fp32 by
# the samplers), the EMA bookkeeping, and CLIP's position_ids (computed by the module; dtypes vary by file).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
NOT_WEIGHTS = frozenset((*SCHEDULE_BUFFERS, "model_ema.decay", "model_ema.num_updates"))
EMA_PREFIX = "model_ema."
# The EMA-only release still carries model_ema.decay/num_updates; a real EMA copy of the U-Net has hundreds
# of keys. Same threshold as diffusers.
EMA_MIN_KEYS = 100

DIFFUSERS_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"  # protocol 2+ pickle: torch.save before the zip format (PyTorch < 1.6)


@dataclass
class Components:
    """The loaded models of one checkpoint, with what the PNG metadata says about them."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNetModel
    vae: AutoencoderKL
    name: str
    weight_files: tuple[Path, ...]  # what `sha256` hashes, in order; empty for tiny-random
    is_random: bool

    @property
    def sha256(self) -> str | None:
        """sha256 of the checkpoint file (for a folder: of its weight files in sorted order); None if random.

        Hashing a 4 GB file takes seconds, so it runs on first use and is cached by path, size and mtime.
        The A1111 short "Model hash" is its first 10 hex digits.
        """
        if not self.weight_files:
            return None
        return _sha256(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.weight_files))


def load_components(source, device="cpu", dtype=torch.float32, tokenizer=None, ema="auto") -> Components:
    """Tokenizer, text encoder, U-Net and VAE from a checkpoint file, a diffusers folder or "tiny-random".

    ema: "auto" takes the U-Net's EMA weights when the file holds an EMA copy, True requires them, False
    takes the non-EMA weights. Weights are cast to `dtype` (fp16 files are upcast for fp32) on `device`.
    """
    if ema not in ("auto", True, False):
        raise ValueError(f"ema={ema!r} is not accepted; use 'auto', True or False")
    if str(source) == TINY_RANDOM:
        return _tiny_random(device, dtype, tokenizer)
    path = Path(source)
    weights, weight_files, mapped = read_original_layout(path)
    parts = select_weights(path, weights, ema)
    del weights
    models = {c: _build(c, cfg, tensors, device, dtype, mapped) for c, (cfg, tensors) in parts.items()}
    return Components(
        tokenizer=_tokenizer(path, tokenizer),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"],
        name=path.stem if path.is_file() else path.name,
        weight_files=weight_files,
        is_random=False,
    )


def convert_checkpoint(src, dst, half=False, layout="original", ema="auto") -> Path:
    """Write the weights of `src` once in a form that later loads as a fast memory map.

    layout "original": one flat .safetensors with the original full key names, weights only (the EMA
    U-Net, when chosen, under the plain `model.diffusion_model.*` names, like the EMA-only release).
    layout "diffusers": a folder with unet/, vae/, text_encoder/ safetensors files in diffusers' key names.
    half: store fp16. The source is checked exactly as `load_components` checks it.
    """
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout={layout!r} is not accepted; use 'original' or 'diffusers'")
    src, dst = Path(src), Path(dst)
    weights, _, _ = read_original_layout(src)
    parts = select_weights(src, weights, ema)

    def stored(t):
        return (t.half() if half and t.is_floating_point() else t).contiguous()

    if layout == "original":
        flat = {PREFIXES[c] + k: stored(t) for c, (_, tensors) in parts.items() for k, t in tensors.items()}
        _save_atomically(flat, dst)
        return dst
    for component, (cfg, tensors) in parts.items():
        diffusers = convert.original_to_diffusers(component, tensors)
        stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
        folder = dst / component
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(diffusers_config(component, cfg), indent=2) + "\n")
        _save_atomically({k: stored(t) for k, t in diffusers.items()}, folder / f"{stem}.safetensors")
    return dst


def diffusers_config(component: str, cfg) -> dict:
    """The config.json with which diffusers / transformers rebuild a component of the given dimensions;
    the fields left out have the defaults that SD 1.5 uses."""
    if component == "unet":
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "down_block_types": [
                "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels
            ],
            "up_block_types": [
                "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]
            ],
            "block_out_channels": list(cfg.block_channels),
            "layers_per_block": cfg.layers_per_block,
            "attention_head_dim": cfg.heads,  # diffusers' legacy name: for SD 1.x it is the head count
            "cross_attention_dim": cfg.context_dim,
            "norm_num_groups": cfg.norm_groups,
            "sample_size": 64,
        }
    if component == "vae":
        levels = len(cfg.block_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(cfg.block_channels),
            "layers_per_block": cfg.layers_per_block,
            "latent_channels": cfg.latent_channels,
            "norm_num_groups": cfg.norm_groups,
            "scaling_factor": cfg.scaling_factor,
            "sample_size": 512,
        }
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": 768,
        "pad_token_id": 1,  # SD 1.5's text_encoder/config.json
        "bos_token_id": 0,
        "eos_token_id": 2,
    }


# ---------------------------------------------------------------------------------------------- reading


def read_original_layout(path: Path) -> tuple[dict[str, torch.Tensor], tuple[Path, ...], bool]:
    """Any source as one flat state dict with original full key names.

    Returns (state dict, the weight files read, whether its tensors are memory-mapped views of the files).
    """
    if path.is_dir():
        return _read_diffusers_folder(path)
    if not path.exists():
        raise CheckpointError(
            path,
            "no such file or folder; expected a .ckpt or .safetensors file, a diffusers folder or "
            f"{TINY_RANDOM!r}",
        )
    tensors, mapped = read_file(path)
    if isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    # Training checkpoints carry counters next to the weights (global_step, epoch): only tensors matter.
    return {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}, (path,), mapped


def read_file(path: Path) -> tuple[dict, bool]:
    """A .ckpt / .bin pickle (read with weights_only: no code runs) or a .safetensors file, by content."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return _read_pickle(path, mappable=head.startswith(ZIP_MAGIC)), head.startswith(ZIP_MAGIC)
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path), True
    size = path.stat().st_size
    raise CheckpointError(
        path,
        f"not a checkpoint: a {size}-byte file that is neither a PyTorch pickle (zip or legacy) nor "
        f"a safetensors file (first bytes {head[:8]!r})",
    )


def _read_pickle(path: Path, mappable: bool) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            path,
            f"refused to load: its pickle would call {wanted.group(1) if wanted else 'code'}, which is "
            "neither a tensor nor a plain container; nothing from it ran. Re-save it as .safetensors where "
            "you trust it.",
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(path, f"truncated or corrupt PyTorch file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"not a checkpoint: the pickle holds a {type(data).__name__}, not a dict")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(path, f"truncated or corrupt safetensors file ({e})") from None


def _read_diffusers_folder(folder: Path) -> tuple[dict[str, torch.Tensor], tuple[Path, ...], bool]:
    _reject_other_diffusers_models(folder)
    flat, files, all_mapped = {}, [], True
    for component in COMPONENTS:
        file = _diffusers_weight_file(folder / component)
        tensors, mapped = read_file(file)
        original = convert.diffusers_to_original(component, tensors)
        flat.update((PREFIXES[component] + k, t) for k, t in original.items())
        files.append(file)
        all_mapped &= mapped
    return flat, tuple(sorted(files)), all_mapped


def _diffusers_weight_file(subfolder: Path) -> Path:
    names = [
        f"{stem}{variant}{ext}"
        for variant in ("", ".fp16")
        for ext in (".safetensors", ".bin")
        for stem in DIFFUSERS_STEMS
    ]
    for name in names:
        if (subfolder / name).is_file():
            return subfolder / name
    raise CheckpointError(subfolder, f"diffusers folder without weights: expected one of {', '.join(names)}")


def _reject_other_diffusers_models(folder: Path) -> None:
    if (folder / "text_encoder_2").is_dir():
        raise CheckpointError(
            folder,
            "looks like an SDXL diffusers folder (it has text_encoder_2/); "
            "sdcore loads Stable Diffusion 1.x only",
        )
    config = folder / "unet" / "config.json"
    context = json.loads(config.read_text()).get("cross_attention_dim") if config.is_file() else None
    if context in (1024, 2048):
        kind = "SD 2.x" if context == 1024 else "SDXL"
        raise CheckpointError(
            folder,
            f"looks like an {kind} diffusers folder (unet cross_attention_dim "
            f"{context}; SD 1.x has 768); sdcore loads Stable Diffusion 1.x only",
        )


def _tokenizer(path: Path, tokenizer) -> CLIPTokenizer:
    if tokenizer is not None:
        return CLIPTokenizer.from_folder(tokenizer)
    if path.is_dir() and (path / "tokenizer").is_dir():
        return CLIPTokenizer.from_folder(path / "tokenizer")
    return CLIPTokenizer.bundled()


# ------------------------------------------------------------------------------------ choosing weights


def select_weights(path: Path, weights: dict, ema) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
    """Split an original-layout state dict into {component: (config, module state dict)}, checked.

    Raises CheckpointError for another model family, missing or unexpected keys, and shape mismatches.
    """
    _reject_other_models(path, weights)
    ema_weights = {k: t for k, t in weights.items() if k.startswith(EMA_PREFIX) and k not in NOT_WEIGHTS}
    has_ema = len(ema_weights) > EMA_MIN_KEYS
    if ema is True and not has_ema:
        raise CheckpointError(
            path,
            f"ema=True but the file has no EMA copy of the U-Net: {len(ema_weights)} model_ema.* weights "
            f"besides decay/num_updates (an EMA copy has over {EMA_MIN_KEYS}); use ema='auto' or ema=False",
        )
    use_ema = has_ema and ema in ("auto", True)

    found = {c: {} for c in COMPONENTS}
    unexpected = []
    for key, tensor in weights.items():
        if key in NOT_WEIGHTS or key.endswith("position_ids") or key.startswith(EMA_PREFIX):
            continue
        component = _component_of(key)
        if component is None:
            unexpected.append(key)
        elif not (component == "unet" and use_ema):
            found[component][_module_key(component, key)] = tensor
    if use_ema:
        found["unet"], unexpected_ema = _ema_unet(ema_weights)
        unexpected += unexpected_ema

    parts, problems = {}, []
    for component in COMPONENTS:
        cfg, expected = _closest_config(component, found[component])
        problems += _key_problems(component, expected, found[component], use_ema and component == "unet")
        parts[component] = (cfg, found[component])
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if problems:
        raise CheckpointError(
            path, "not a Stable Diffusion 1.x checkpoint as sdcore expects it: " + "; ".join(problems)
        )
    return parts


def _component_of(key: str) -> str | None:
    for component, prefix in PREFIXES.items():
        if key.startswith(prefix):
            return component
    # Text encoders saved by transformers < 4.19 lack the `text_model.` level.
    return "text_encoder" if key.startswith("cond_stage_model.transformer.") else None


def _module_key(component: str, key: str) -> str:
    if component == "text_encoder" and not key.startswith(PREFIXES["text_encoder"]):
        return key.removeprefix("cond_stage_model.transformer.")
    return key.removeprefix(PREFIXES[component])


def _ema_unet(ema_weights: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The EMA copy under U-Net module names: LitEma stores `diffusion_model.a.b.0.weight` as
    `model_ema.diffusion_modelab0weight`, so we match on the dotless form of every U-Net key we know."""
    by_dotless = {}
    for cfg in MODELS["unet"][1]:
        for key in _expected_shapes("unet", cfg):
            by_dotless[EMA_PREFIX + ("diffusion_model." + key).replace(".", "")] = key
    unet = {by_dotless[k]: t for k, t in ema_weights.items() if k in by_dotless}
    return unet, [k for k in ema_weights if k not in by_dotless]


def _reject_other_models(path: Path, weights: dict) -> None:
    """Name the model family of an SD 2.x or SDXL file instead of listing hundreds of unexpected keys."""
    keys = list(weights)
    sdxl_keys = [k for k in keys if k.startswith(("conditioner.embedders.", PREFIXES["unet"] + "label_emb."))]
    if sdxl_keys:
        raise CheckpointError(
            path,
            f"looks like an SDXL checkpoint ({len(sdxl_keys)} keys such as "
            f"{sdxl_keys[0]}); sdcore loads Stable Diffusion 1.x only",
        )
    openclip_keys = [k for k in keys if k.startswith("cond_stage_model.model.")]
    context_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context = weights[context_key].shape[1] if context_key in weights else None
    if openclip_keys or context == 1024:
        evidence = (
            f"{len(openclip_keys)} OpenCLIP text encoder keys such as {openclip_keys[0]}"
            if openclip_keys
            else f"{context_key} takes a {context}-dim context"
        )
        raise CheckpointError(
            path,
            f"looks like an SD 2.x checkpoint ({evidence}; SD 1.x has a CLIP ViT-L "
            "text encoder, 768-dim context); sdcore loads Stable Diffusion 1.x only",
        )


@functools.cache
def _expected_shapes(component: str, cfg) -> dict[str, tuple[int, ...]]:
    module_class, _ = MODELS[component]
    with torch.device("meta"):
        module = module_class(cfg)
    return {k: tuple(t.shape) for k, t in module.state_dict().items()}


def _closest_config(component: str, found: dict):
    """The known config whose shapes the file matches on most keys (SD 1.5 on a tie)."""

    def agreement(cfg):
        expected = _expected_shapes(component, cfg)
        return sum(1 for k, t in found.items() if expected.get(k) == tuple(t.shape))

    cfg = max(MODELS[component][1], key=agreement)
    return cfg, _expected_shapes(component, cfg)


def _key_problems(component: str, expected: dict, found: dict, from_ema: bool) -> list[str]:
    prefix = PREFIXES[component]
    what = TITLES[component] + (" (from the EMA copy)" if from_ema else "")
    missing = [prefix + k for k in expected if k not in found]
    unexpected = [prefix + k for k in found if k not in expected]
    mismatched = [
        f"{prefix}{k} expected {list(expected[k])}, found {list(t.shape)}"
        for k, t in found.items()
        if k in expected and tuple(t.shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} of {len(expected)} {what} weights ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {what} keys ({_first(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} {what} shape mismatches ({_first(mismatched)})")
    return problems


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


# ------------------------------------------------------------------------------------ building modules


def _build(component: str, cfg, tensors: dict, device, dtype, mapped: bool) -> nn.Module:
    """Build on the meta device, then assign the file's tensors: memory is spent once, per tensor."""
    module_class, _ = MODELS[component]
    with torch.device("meta"):
        module = module_class(cfg)
    state = {}
    for key in list(tensors):
        source = tensors.pop(key)
        state[key] = source.to(device=device, dtype=dtype)
        if mapped and state[key].data_ptr() != source.data_ptr():
            _drop_mapped_pages(source)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _tiny_random(device, dtype, tokenizer) -> Components:
    models = {}
    for component in COMPONENTS:
        module_class, (_, tiny) = MODELS[component]
        module = module_class(tiny)
        scaled_init_(module, seed=TINY_RANDOM_SEEDS[component])
        models[component] = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(
        tokenizer=CLIPTokenizer.from_folder(tokenizer) if tokenizer is not None else CLIPTokenizer.bundled(),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"],
        name=TINY_RANDOM,
        weight_files=(),
        is_random=True,
    )


_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Pages of a memory-mapped file stay in our resident set after we copied (cast) a tensor out of them;
    tell the kernel we are done so a fp16 file upcast to fp32 does not hold both copies. The mapping is
    private and unmodified, so the pages would simply be read from the file again if touched."""
    if _libc is None:
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only pages wholly inside this tensor
    last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last_page > first_page:
        _libc.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(last_page - first_page), _MADV_DONTNEED)


# ------------------------------------------------------------------------------------ writing, hashing


def _save_atomically(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    """Write beside `dst`, then rename: readers (and the source, if dst == src) never see half a file."""
    tmp = dst.with_name(dst.name + ".partial")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, dst)


@functools.lru_cache(maxsize=32)
def _sha256(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    for path, _, _ in files:
        with open(path, "rb") as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()
