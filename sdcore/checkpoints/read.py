"""Read and identify Stable Diffusion 1.x checkpoints, before anything is built from them.

Every source (an original .ckpt / .safetensors file, a diffusers folder) is first read as one flat state
dict in the original layout whose tensors are memory-mapped views of the file. `select_weights` then splits
it per component and refuses, with every problem named, what sdcore could not load: another model family,
missing or unexpected keys, shape mismatches.
"""

import functools
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from ..errors import CheckpointError
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from .layout import ORIGINAL_PREFIXES, diffusers_to_original

COMPONENTS = ("text_encoder", "vae", "unet")  # the order errors and loads go in
PREFIXES = ORIGINAL_PREFIXES
TITLES = {"text_encoder": "text encoder", "vae": "VAE", "unet": "U-Net"}
# Module class and the configs sdcore knows for each component, SD 1.5 first: a file's shapes pick one
# (checkpoints do not record the head count, so dimensions cannot be fully read off the weights).
MODELS = {
    "text_encoder": (CLIPTextModel, (CLIPConfig(), tiny_clip())),
    "vae": (AutoencoderKL, (VAEConfig(), tiny_vae())),
    "unet": (UNetModel, (UNetConfig(), tiny_unet())),
}
# The one source that is not a file: `load_components` builds it instead of reading it; named here so that
# a missing path's error can offer it.
TINY_RANDOM = "tiny-random"

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


def read_file(path: Path, allowed_classes: tuple[type, ...] = ()) -> tuple[dict, bool]:
    """A .ckpt / .bin pickle (read with weights_only: no code runs) or a .safetensors file, by content.

    allowed_classes: classes besides tensors and plain containers that the pickle may rebuild (their state
    is restored, none of their code runs), e.g. torch.nn.ParameterDict in old textual-inversion files."""
    if path.exists() and not path.is_file():
        # a FIFO would block the read for ever, a device such as /dev/zero never end
        raise CheckpointError(path, "not a regular file; expected a .ckpt, .pt, .bin or .safetensors file")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors first: its header length (8 bytes, little-endian) may begin with the pickle's 0x80 byte
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return _read_safetensors(path), True
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        mappable = head.startswith(ZIP_MAGIC)
        return _read_pickle(path, mappable, allowed_classes), mappable
    size = path.stat().st_size
    raise CheckpointError(
        path,
        f"not a checkpoint: a {size}-byte file that is neither a PyTorch pickle (zip or legacy) nor "
        f"a safetensors file (first bytes {head[:8]!r})",
    )


def _read_pickle(path: Path, mappable: bool, allowed_classes: tuple[type, ...] = ()) -> dict:
    try:
        with torch.serialization.safe_globals(list(allowed_classes)):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise CheckpointError(
            path,
            f"refused to load: its pickle would call {wanted.group(1) if wanted else 'code'}, which is "
            "neither a tensor nor a plain container; nothing from it ran. Re-save it as .safetensors where "
            "you trust it.",
        ) from None
    except Exception as e:
        # the file is untrusted bytes: a broken pickle fails in whatever the unpickler or torch's legacy
        # loader was doing (RuntimeError, EOFError, struct.error, KeyError ...), and each means "corrupt"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(path, f"truncated or corrupt PyTorch file ({first[:200]})") from None
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
        original = diffusers_to_original(component, tensors)
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
    context = _read_json_object(config).get("cross_attention_dim") if config.is_file() else None
    if context in (1024, 2048):
        kind = "SD 2.x" if context == 1024 else "SDXL"
        raise CheckpointError(
            folder,
            f"looks like an {kind} diffusers folder (unet cross_attention_dim "
            f"{context}; SD 1.x has 768); sdcore loads Stable Diffusion 1.x only",
        )


def _read_json_object(path: Path) -> dict:
    """A JSON object file (a diffusers config.json); CheckpointError naming the file otherwise."""
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"not UTF-8 (byte {e.start}); expected a diffusers config.json") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, nested too deeply
        raise CheckpointError(path, f"not valid JSON ({type(e).__name__}: {str(e)[:120]}); expected a "
                              "diffusers config.json") from None
    if not isinstance(values, dict):
        raise CheckpointError(path, f"is a JSON {type(values).__name__}, not an object; expected a diffusers "
                              "config.json")
    return values


# --------------------------------------------------------------------------------------- a VAE alone

# What standalone VAE files carry besides the autoencoder: the training loss's networks (LPIPS, the
# discriminator: `loss.*`) and EMA bookkeeping (`model_ema.decay` / `num_updates`); A1111 skips the same
# keys. The ft-MSE release "vae-ft-mse-840000-ema-pruned" already holds its EMA weights as the plain ones.
VAE_SKIPPED_PREFIXES = ("loss", EMA_PREFIX)
# diffusers < 0.14 named the VAE mid-block attention projections differently.
OLD_DIFFUSERS_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                               ".proj_attn.": ".to_out.0."}
DIFFUSERS_VAE_KEY = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.")


def read_vae(path: Path) -> tuple[object, dict[str, torch.Tensor], tuple[Path, ...], bool]:
    """A VAE to use instead of a checkpoint's, checked: (config, module state dict, files read, mapped).

    Accepts an original-layout file (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, with
    or without the `first_stage_model.` prefix; from a whole checkpoint only its VAE is taken), the same in
    diffusers' names, or a diffusers folder (its vae/ subfolder, or a folder holding the VAE's weights).
    """
    if path.is_dir():
        file = _diffusers_weight_file(path / "vae" if (path / "vae").is_dir() else path)
    elif path.exists():
        file = path
    else:
        raise CheckpointError(path, "no such file or folder; expected a VAE .ckpt / .pt / .safetensors file "
                                    "or a diffusers folder")
    tensors, mapped = read_file(file)
    if isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    tensors = {k: t for k, t in tensors.items()
               if isinstance(t, torch.Tensor) and not k.startswith(VAE_SKIPPED_PREFIXES)}
    prefix = PREFIXES["vae"]
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)}
    if any(DIFFUSERS_VAE_KEY.match(k) for k in tensors):
        tensors = _diffusers_vae_to_original(file, tensors)
    cfg, expected = _closest_config("vae", tensors)
    problems = _key_problems("vae", expected, tensors, from_ema=False, prefix="")
    if problems:
        raise CheckpointError(file, "not a Stable Diffusion VAE as sdcore expects it: " + "; ".join(problems))
    return cfg, tensors, (file,), mapped


def _diffusers_vae_to_original(file: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in tensors.items():
        for old, new in OLD_DIFFUSERS_VAE_ATTENTION.items():
            key = key.replace(old, new) if ".mid_block.attentions." in key else key
        renamed[key] = tensor
    try:
        return diffusers_to_original("vae", renamed)
    except ValueError as e:
        raise CheckpointError(file, f"a diffusers-layout VAE with a key sdcore does not know: {e}") from None


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


def _key_problems(component: str, expected: dict, found: dict, from_ema: bool, prefix: str | None = None
                  ) -> list[str]:
    prefix = PREFIXES[component] if prefix is None else prefix
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
