"""Build sdcore's modules from a checkpoint's weights: `load_components` and the `Components` it returns.

Each module is built on the meta device and takes the tensors that `read.select_weights` checked by
assignment, cast one tensor at a time, so the weights are never resident twice while loading.
"""

import ctypes
import dataclasses
import functools
import hashlib
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import scaled_init_
from ..models.clip import CLIPTextModel
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from ..tokenizer import CLIPTokenizer
from .read import COMPONENTS, MODELS, TINY_RANDOM, read_original_layout, read_vae, select_weights

TINY_RANDOM_SEEDS = {"text_encoder": 1, "vae": 2, "unet": 3}


@dataclass(frozen=True)
class VAEFile:
    """A VAE read from a file of its own, with what the PNG metadata says about it."""

    vae: AutoencoderKL
    name: str  # A1111's "VAE": the file's name, extension included
    files: tuple[Path, ...]  # what `sha256` hashes

    @property
    def sha256(self) -> str:
        """A1111's "VAE hash" is its first 10 hex digits; hashed on first use, cached like the model's."""
        return sha256_of_files(self.files)


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
    vae_file: VAEFile | None = None  # set when `vae` came from its own file (load_components(..., vae=PATH))

    @property
    def sha256(self) -> str | None:
        """sha256 of the checkpoint file (for a folder: of its weight files in sorted order); None if random.

        Hashing a 4 GB file takes seconds, so it runs on first use and is cached by path, size and mtime.
        The A1111 short "Model hash" is its first 10 hex digits.
        """
        return sha256_of_files(self.weight_files) if self.weight_files else None



def load_components(source, device="cpu", dtype=torch.float32, tokenizer=None, ema="auto", vae=None
                    ) -> Components:
    """Tokenizer, text encoder, U-Net and VAE from a checkpoint file, a diffusers folder or "tiny-random".

    ema: "auto" takes the U-Net's EMA weights when the file holds an EMA copy, True requires them, False
    takes the non-EMA weights. Weights are cast to `dtype` (fp16 files are upcast for fp32) on `device`.
    vae: a VAE file or diffusers folder to use instead of the checkpoint's VAE (see `load_vae`); the
    checkpoint's own VAE is then checked but never built.
    """
    if ema not in ("auto", True, False):
        raise ValueError(f"ema={ema!r} is not accepted; use 'auto', True or False")
    vae_file = read_vae_file(vae, device, dtype) if vae is not None else None  # a bad VAE file fails first
    if str(source) == TINY_RANDOM:
        parts = _tiny_random(device, dtype, tokenizer)
        return parts if vae_file is None else dataclasses.replace(parts, vae=vae_file.vae, vae_file=vae_file)
    path = Path(source)
    weights, weight_files, mapped = read_original_layout(path)
    parts = select_weights(path, weights, ema)
    del weights
    if vae_file is not None:
        del parts["vae"]
    models = {c: _build(c, cfg, tensors, device, dtype, mapped) for c, (cfg, tensors) in parts.items()}
    return Components(
        tokenizer=_tokenizer(path, tokenizer),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"] if vae_file is None else vae_file.vae,
        name=path.stem if path.is_file() else path.name,
        weight_files=weight_files,
        is_random=False,
        vae_file=vae_file,
    )


def load_vae(source, device="cpu", dtype=torch.float32) -> AutoencoderKL:
    """An AutoencoderKL from a standalone VAE file (.ckpt / .pt / .safetensors; original keys with or
    without `first_stage_model.`, or diffusers' names) or a diffusers folder, checked like a checkpoint:
    CheckpointError names the file and every missing, unexpected or mis-shaped key. Training-only keys
    (`loss.*`, `model_ema.*`) are skipped, as A1111 does. Cast to `dtype` on `device`."""
    return read_vae_file(source, device, dtype).vae


def read_vae_file(source, device="cpu", dtype=torch.float32) -> VAEFile:
    """`load_vae`'s model with the file's name and hash."""
    path = Path(source)
    cfg, tensors, files, mapped = read_vae(path)
    return VAEFile(_build("vae", cfg, tensors, device, dtype, mapped), path.name, files)


def sha256_of_files(files) -> str:
    """sha256 of the files' bytes one after another; cached by path, size and mtime, so a file is hashed
    again only when it changed."""
    return _sha256(tuple((str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in files))


def _tokenizer(path: Path, tokenizer) -> CLIPTokenizer:
    if tokenizer is not None:
        return CLIPTokenizer.from_folder(tokenizer)
    if path.is_dir() and (path / "tokenizer").is_dir():
        return CLIPTokenizer.from_folder(path / "tokenizer")
    return CLIPTokenizer.bundled()


def _build(component: str, cfg, tensors: dict, device, dtype, mapped: bool) -> nn.Module:
    """Build on the meta device, then assign the file's tensors: memory is spent once, per tensor.

    A memory-mapped tensor is copied even when its dtype and device are already right: its pages belong to
    the page cache, which the kernel reclaims under memory pressure and reads from disk again at the next
    step, so a CPU worker's speed would depend on its neighbours' memory use. The copies are anonymous
    memory and stay resident."""
    module_class, _ = MODELS[component]
    with torch.device("meta"):
        module = module_class(cfg)
    state = {}
    for key in list(tensors):
        source = tensors.pop(key)
        state[key] = source.to(device=device, dtype=dtype, copy=mapped)
        if mapped:
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
    tell the kernel we are done so that the file and the weights are not both held. The mapping is
    private and unmodified, so the pages would simply be read from the file again if touched."""
    if _libc is None:
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first_page = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # only pages wholly inside this tensor
    last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last_page > first_page:
        _libc.madvise(ctypes.c_void_p(first_page), ctypes.c_size_t(last_page - first_page), _MADV_DONTNEED)


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
