"""OpenVINO as the CPU backend of sdcore's U-Net and VAE (opt-in: `sdcore.load(..., backend="openvino")`).

Each module is converted once with OpenVINO's PyTorch frontend (`openvino.convert_model` traces sdcore's own
forward), saved as IR in a disk cache, and compiled for the CPU with dynamic batch and image size. The
compiled models stand in for the torch modules behind the same calls the pipeline makes:

    unet(x, timesteps, context) -> eps    vae.encode(pixels) -> DiagonalGaussian    vae.decode(z) -> images

so the sampler loop, CFG, every random draw (the posterior sample included: it is drawn in torch from the
image's generator) and the pixel rounding are the torch path's. The text encoder stays in torch: one call
per batch, a few percent of an image, and its clip_skip and textual-inversion inputs would each need a
graph of their own. LoRAs keep working: `LoRAMerge` merges into the torch U-Net's weights, and the U-Net is
converted again (or read from the cache) for each LoRA set it is called with.

Cache: `$SDCORE_OPENVINO_CACHE`, else ~/.cache/sdcore/openvino; one folder per (module, weights' SHA-256,
LoRA set, sdcore's model code, OpenVINO version). Models with random weights (no file to hash) are
converted every time and never cached.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models.vae import AutoencoderKL, DiagonalGaussian

INSTALL_HINT = "pip install -e '.[openvino]'"
# sdcore precision name (sdcore.params.OPENVINO_PRECISIONS) -> OpenVINO's CPU inference precision. bf16 is a
# compile-time hint over the same fp32 IR (weights and activations rounded to bf16 inside the CPU plugin),
# offered where the CPU has it. int8 is the U-Net's weights stored as int8 with a scale and zero point per
# output channel (NNCF's data-free compress_weights, INT8_ASYM), computed in f32: under a third of the memory,
# not the same pixels (BENCHMARKS.md). The VAE stays f32: it is 0.3 of 3.7 GB, and its errors go straight
# into the pixels.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
CACHE_ENV = "SDCORE_OPENVINO_CACHE"
MODELS_SOURCE = Path(__file__).parent / "models"


def import_extra(name: str, needed_by: str):
    """A package of the openvino extra, or an ImportError that says what needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{needed_by} needs the {name} package, which is not installed: {INSTALL_HINT}") \
            from error


def openvino_precision(device: torch.device, dtype, winograd: bool) -> str:
    """The backend's precision for load()'s dtype (None: fp32), checked with the rest of the set-up before any
    weights are read: the CPU, no winograd (OpenVINO picks its own convolutions), openvino installed, and bf16
    only where the CPU runs it natively (OpenVINO would otherwise emulate it, slower than fp32)."""
    precision = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"dtype {dtype!r} is not offered by backend 'openvino'; accepted: "
                         f"{', '.join(PRECISIONS)} (None: fp32)")
    if precision == "int8":
        import_extra("nncf", "dtype int8 with backend 'openvino'")
    if torch.device(device).type != "cpu":
        raise ValueError(f"backend 'openvino' runs on the CPU, not on {device}; use device 'cpu' or 'auto'")
    if winograd:
        raise ValueError("winograd is a torch kernel and backend 'openvino' runs its own convolutions: "
                         "use one or the other")
    openvino = import_extra("openvino", "backend 'openvino'")
    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in capabilities:
        raise ValueError(f"dtype bf16 with backend 'openvino' needs a CPU with native bf16 (AVX512-BF16 or "
                         f"AMX); this one offers {', '.join(capabilities)}: use fp32")
    return precision


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdcore" / "openvino")


class Compiler:
    """Converts torch modules to OpenVINO models, through the IR cache, and compiles them for the CPU."""

    def __init__(self, precision: str = "fp32", cache: str | Path | None = None):
        self.ov = import_extra("openvino", "backend 'openvino'")
        self.core = self.ov.Core()
        # Cached IR is read into memory, not mapped: mapped pages are page cache, which memory pressure
        # reclaims and the next step reads from disk again (see sdcore.checkpoints.build._build).
        self.core.set_property({"ENABLE_MMAP": False})
        self.config = {
            # Explicit: on CPUs with AMX OpenVINO's default is bf16.
            "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            # The thread count torch runs with (OMP_NUM_THREADS): CPU workers sharing a machine split it the
            # same way in both backends, instead of OpenVINO taking every core for each of them.
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.int8 = precision == "int8"

    def compile(self, name: str, module: nn.Module, example: tuple[torch.Tensor, ...], dynamic: list,
                weights: str | None, compress: bool = False) -> Compiled:
        """`module` converted (or read from the cache when `weights`, the identity of its weights, is known)
        and compiled; `dynamic` gives each input's shape with -1 for the sizes that vary. `compress`: its
        weights are stored as int8 when the precision is int8."""
        compress = compress and self.int8
        if weights is not None and compress:
            weights = f"{weights}\nint8 weights"  # another graph than the f32 one
        folder = None if weights is None else self.cache / f"{name}-{self._key(name, weights)}"
        converted = folder is None or not (folder / "model.xml").exists()
        if converted:
            # Traced here rather than by convert_model, which checks its trace by running the module twice
            # more (three quarters of a conversion). The tracer warns of every shape check it records as a
            # constant: expected, since each input's rank and fixed sizes are those of the example.
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, example, check_trace=False)
                model = self.ov.convert_model(traced, example_input=example,
                                              input=[self.ov.PartialShape(shape) for shape in dynamic])
            if compress:
                nncf = import_extra("nncf", "dtype int8 with backend 'openvino'")
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
            if folder is not None:
                self._save(model, folder)
        else:
            model = self.core.read_model(folder / "model.xml")
        return Compiled(self.core.compile_model(model, "CPU", self.config), folder, converted)

    def _key(self, name: str, weights: str) -> str:
        """What the converted graph depends on: the weights, sdcore's model code and OpenVINO's version."""
        digest = hashlib.sha256(f"{name}\n{weights}\n{self.ov.__version__}\n".encode())
        for source in sorted(MODELS_SOURCE.glob("*.py")):
            digest.update(source.read_bytes())
        return digest.hexdigest()[:32]

    def _save(self, model, folder: Path) -> None:
        # Into a temporary folder renamed into place: a worker killed while writing leaves no half model,
        # and two workers converting at once both end with a whole one.
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            self.ov.save_model(model, partial / "model.xml", compress_to_fp16=False)
            partial.rename(folder)
        except OSError:
            if not (folder / "model.xml").exists():
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)


class Compiled:
    """A compiled model called with torch tensors. One infer request, reused under a lock: a new request
    sets up its buffers on its first call, which costs about as much as a U-Net step."""

    def __init__(self, model, folder: Path | None, converted: bool):
        self.model = model
        self.folder = folder  # the cached IR; None when not cached (random weights)
        self.converted = converted  # False: read from the cache
        self._request = model.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        arrays = [np.ascontiguousarray(x.detach().cpu().numpy()) for x in inputs]
        with self._lock:
            outputs = self._request.infer(arrays)  # copies the outputs: the request's buffers are reused
            return [torch.from_numpy(outputs[port]) for port in self.model.outputs]


class OpenVINOUNet:
    """UNetModel's call, compiled; converted again when the LoRA set merged into the torch weights changes."""

    def __init__(self, unet: nn.Module, compiler: Compiler, weights: str | None,
                 loras: Callable[[], tuple[str, ...]]):
        self.torch_module, self.cfg = unet, unet.cfg
        # The config too: the head count shapes the graph and is not in the weights.
        self._weights = None if weights is None else f"{weights}\n{unet.cfg!r}"
        self._compiler, self._loras = compiler, loras
        self._lock = threading.Lock()
        self.compiled: Compiled | None = None
        self._compiled_for: tuple[str, ...] | None = None
        self._current()

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor
                 ) -> torch.Tensor:
        # The graph was traced with a latent per context (as the default path calls it: CFG repeats the
        # latents) and float timesteps; integer timesteps below 2**24 are exact in fp32.
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32).expand(x.shape[0])
        return self._current()(x.float(), timesteps, context.float())[0]

    def _current(self) -> Compiled:
        """The compiled U-Net for the LoRA set merged now."""
        with self._lock:
            loras = self._loras()
            if self._compiled_for != loras:
                self.compiled = None  # free the old one before compiling the next
                weights = None if self._weights is None else "\n".join((self._weights, *loras))
                c = self.cfg
                example = (torch.zeros(2, c.in_channels, 8, 8), torch.full((2,), 500.0),
                           torch.zeros(2, 77, c.context_dim))
                dynamic = [[-1, c.in_channels, -1, -1], [-1], [-1, -1, c.context_dim]]
                self.compiled = self._compiler.compile("unet", self.torch_module, example, dynamic, weights,
                                                       compress=True)
                self._compiled_for = loras
            return self.compiled


class OpenVINOVAE:
    """AutoencoderKL's encode and decode, compiled; the posterior sample stays in torch (the RNG contract)."""

    def __init__(self, vae: AutoencoderKL, compiler: Compiler, weights: str | None):
        self.torch_module, self.cfg = vae, vae.cfg
        c = vae.cfg
        weights = None if weights is None else f"{weights}\n{c!r}"
        self.encoder = compiler.compile(
            "vae-encoder", _Method(vae, "encode"), (torch.zeros(1, c.in_channels, 64, 64),),
            [[-1, c.in_channels, -1, -1]], weights)
        self.decoder = compiler.compile(
            "vae-decoder", _Method(vae, "decode"), (torch.zeros(1, c.latent_channels, 8, 8),),
            [[-1, c.latent_channels, -1, -1]], weights)

    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(*self.encoder(pixels.float()))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.float())[0]


class _Method(nn.Module):
    """One method of a module as a module's forward, for the tracer; a NamedTuple result as a plain tuple."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor):
        out = getattr(self.module, self.method)(x)
        return tuple(out) if isinstance(out, tuple) else out
