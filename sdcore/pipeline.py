"""Stable Diffusion 1.5 generation: text-to-image and image-to-image.

One batch runs N requests through the U-Net together (2N rows with classifier-free guidance), yet every image
is a function of its own request (sdcore.params.Request: prompt, seed and settings) only: each image owns a
CPU `torch.Generator` seeded with its seed, and every random draw for that image (initial noise, VAE
posterior sample, sampler noise) comes from it (sdcore.noise), in the order diffusers'
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline draw it. The same weights and seed give the same
pixels as diffusers.

    text  -> sdcore.prompts (77-token chunks) -> text_encoder, weighted ---------.
    seed  -> randn (1,4,H/8,W/8) * init_noise_sigma  (or: VAE posterior sample     |  [uncond, cond]
             of the init image * 0.18215, noised to the first timestep)         v
          -> sampler: for each timestep, U-Net(x, t, context) -> eps = u + g (c - u), step (noise from the
             image's generator)
          -> VAE decode(x / 0.18215) -> round(clamp(x/2 + 0.5, 0, 1) * 255) -> PIL
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdcore import samplers
from sdcore.checkpoints import Components, VAEFile, load_components, read_vae_file
from sdcore.embeddings import Embedding, read_embedding
from sdcore.errors import InvalidField
from sdcore.lora import LoRA, LoRAMerge, read_lora
from sdcore.models.clip import emphasize
from sdcore.models.winograd import use_winograd
from sdcore.noise import randn
from sdcore.params import GENERATION_FIELDS, IMG2IMG_STRENGTH, LOAD_BACKENDS, PRECISIONS, Generation, Request
from sdcore.prompts import Chunk, ParsedPrompt, ParsedRequest, empty_chunk, parse_prompt

log = logging.getLogger(__name__)
DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.float16, torch.bfloat16), strict=True))


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> the first CUDA GPU when torch sees one, else the CPU; a named CUDA device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available: torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> fp16 on CUDA, fp32 elsewhere (CPU bf16/fp16 are emulated or slow); names or torch dtypes."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(PRECISIONS)}, "
                     "torch.float32/float16/bfloat16, or None (fp16 on CUDA, fp32 elsewhere); int8 with "
                     "backend 'openvino' only")


def load(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
         tokenizer=None, ema: str | bool = "auto", winograd: bool = False, vae=None,
         backend: str = "torch") -> Pipeline:
    """Load a checkpoint (.ckpt / .safetensors / diffusers folder / "tiny-random") as a ready Pipeline.

    device "auto" takes CUDA when there is a GPU; dtype None is fp16 on CUDA and fp32 on the CPU, decided
    after "auto" is resolved. winograd=True turns on the CPU fp32 fast path for the U-Net's convolutions
    (Pipeline.use_winograd), CPU fp32 only; on a GPU that device "auto" finds it stays off, so one setting
    serves CPU and GPU hosts alike. vae: a standalone VAE file (e.g. the ft-MSE VAE) or diffusers folder to
    use instead of the checkpoint's (sdcore.checkpoints.load_vae).

    backend "openvino" runs the U-Net and the VAE compiled with OpenVINO on the CPU (Pipeline.use_openvino):
    the weights load in fp32 and dtype names OpenVINO's precision, fp32 (None), bf16 where the CPU has it
    natively, or int8 (the U-Net's weights compressed to int8 by NNCF, computed in f32). It excludes
    winograd; like winograd, it stays off on a GPU that device "auto" finds.
    backend "auto" is "openvino" for fp32 on the CPU when the openvino package is installed (winograd then
    stays off: OpenVINO runs its own convolutions), and "torch" otherwise, with a warning on the CPU that
    names the package; Pipeline.backend says which one runs."""
    if backend not in LOAD_BACKENDS:
        raise ValueError(f"backend {backend!r} is not known; accepted: {', '.join(LOAD_BACKENDS)}")
    auto = device == "auto"
    device = resolve_device(device)
    if backend == "auto":
        backend = auto_backend(device, dtype)
        winograd = winograd and backend == "torch"
    if backend == "openvino" and auto and device.type == "cuda":
        backend = "torch"  # a GPU host that "auto" found runs torch's CUDA kernels
    precision = None
    if backend == "openvino":
        from sdcore.openvino import openvino_precision

        precision = openvino_precision(device, dtype, winograd)  # before reading gigabytes of weights
        dtype = torch.float32
    dtype = resolve_dtype(dtype, device)
    if winograd and auto and device.type == "cuda":
        winograd = False  # a GPU host that "auto" found: cuDNN picks its own convolution algorithms
    if winograd and not (device.type == "cpu" and dtype == torch.float32):
        raise ValueError(winograd_error(device, dtype))  # before reading gigabytes of weights
    pipe = Pipeline(load_components(source, device=device, dtype=dtype, tokenizer=tokenizer, ema=ema,
                                    vae=vae))
    if winograd:
        pipe.use_winograd()
    if precision is not None:
        pipe.use_openvino(precision)
    return pipe


def auto_backend(device: torch.device, dtype) -> str:
    """backend "auto": OpenVINO where it runs the model as asked (fp32 on the CPU) and is installed."""
    if device.type != "cpu" or resolve_dtype(dtype, device) != torch.float32:
        return "torch"
    if importlib.util.find_spec("openvino") is None:
        from sdcore.openvino import INSTALL_HINT

        log.warning("backend auto: the openvino package is not installed, so the U-Net and the VAE run in "
                    "torch; for the faster CPU backend: %s", INSTALL_HINT)
        return "torch"
    return "openvino"


def winograd_error(device: torch.device, dtype: torch.dtype) -> str:
    return (f"winograd runs on the CPU in fp32 only, not on {device} in {dtype}: on CUDA, cuDNN picks its "
            "own convolution algorithms, and in fp16/bf16 the F(4x4) transforms would lose too much "
            "precision")


@dataclass(frozen=True)
class Result:
    request: Request
    image: Image.Image
    # False when the image's latents held NaN or inf after the last step (the image is then black): an fp16
    # overflow in the U-Net, most likely. The VAE's own fp16 overflow is redone in fp32 and never shows here.
    finite: bool


class Pipeline:
    """The loaded model plus `generate`/`run`. Threads may share one instance: a batch's only state, the
    LoRA set merged into the weights, is held under a lock for the batch."""

    def __init__(self, parts: Components):
        self.parts = parts
        self.tokenizer, self.text_encoder, self.unet, self.vae = (
            parts.tokenizer, parts.text_encoder, parts.unet, parts.vae)
        self.name, self.is_random = parts.name, parts.is_random
        weight = next(self.unet.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.precision = next(name for name, dtype in DTYPES.items() if dtype == self.dtype)
        self.winograd = False
        self.backend = "torch"  # use_openvino changes it
        # Textual inversion: name -> vectors [n, width]; a prompt word equal to a name stands for its vectors.
        self.embeddings: dict[str, torch.Tensor] = {}
        self._empty_chunk = empty_chunk(self.tokenizer)
        self._empty_chunk_states: dict[int, torch.Tensor] = {}  # per clip_skip, for the LoRAs merged now
        self.embedding_files: dict[str, Embedding] = {}  # the embeddings add_embedding read, for their hashes
        # LoRAs by name (add_lora); a batch merges the set its requests name, so the weights are shared state:
        # batches run one at a time under the lock.
        self.loras: dict[str, LoRA] = {}
        self._merge = LoRAMerge(self.text_encoder, self.unet)
        self._weights_lock = threading.RLock()
        # VAEs by name (add_vae), which requests name in Generation.vae in place of the model's own.
        self.vaes: dict[str, VAEFile] = {}
        self._fp32_vaes: dict[int, torch.nn.Module] = {}  # id(VAE) -> its fp32 copy, made on first need
        self._fp32_vae_lock = threading.Lock()

    @property
    def sha256(self) -> str | None:
        """SHA-256 of the weight file(s); None for random weights. Hashed on first use (seconds for 4 GB)."""
        return self.parts.sha256

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash" (its AutoV2 hash): the first 10 hex digits of the file's SHA-256."""
        return self.sha256[:10] if self.sha256 else None

    def __repr__(self):
        winograd = ", winograd" if self.winograd else ""
        return f"Pipeline({self.name!r}, device={self.device}, precision={self.precision}{winograd})"

    def use_winograd(self, enabled: bool = True) -> None:
        """Run the U-Net's large 3x3 convolutions as Winograd convolutions (sdcore.models.winograd), CPU fp32.

        They hold ~65 % of a U-Net step at 256x256 and run near the CPU's matmul peak already; Winograd does
        them with 2.25-4x fewer multiplications. In this mode CFG also passes its latents once for the
        [uncond; cond] contexts, so the U-Net's start before the text enters (~6 % of the work at 512x512)
        runs once per image (UNetModel.forward). Not bit-identical to the direct convolution (and so to
        diffusers): the U-Net output moves by ~2e-5 of its scale, an image by at most a level here and there.
        Memory: the transformed weights, made on first use (+3-5 s on the first step), add 1.1x the U-Net's
        weights at 256x256 and 1.3x at 512x512; use_winograd(False) frees them. Speed: BENCHMARKS.md.
        """
        if enabled and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(winograd_error(self.device, self.dtype))
        use_winograd(self.unet, enabled)
        self.winograd = bool(enabled)

    def use_openvino(self, precision: str = "fp32") -> None:
        """Run the U-Net and the VAE compiled with OpenVINO on the CPU (sdcore.openvino), in OpenVINO's fp32,
        bf16 where the CPU has it natively, or int8 (the U-Net's weights as int8, computed in f32; not the
        same pixels); the text encoder, the samplers and every random draw stay in torch. The converted
        models are cached on disk by the weights' SHA-256 (random weights are converted every time). A LoRA
        set converts the U-Net again on its first batch (or reads it from the cache). A VAE added with
        add_vae runs in torch. Pixels (fp32): within a level or two of the torch path.
        Memory: the compiled weights, next to the torch weights that LoRAs merge into. Speed: BENCHMARKS.md.
        """
        from sdcore import openvino

        if self.dtype != torch.float32:
            raise ValueError(f"use_openvino converts fp32 torch weights, not {self.dtype}; its precision "
                             "argument sets OpenVINO's (fp32 or bf16)")
        precision = openvino.openvino_precision(self.device, precision, self.winograd)
        compiler = openvino.Compiler(precision)
        weights = self.sha256
        vae_weights = self.parts.vae_file.sha256 if self.parts.vae_file is not None else weights
        self.unet = openvino.OpenVINOUNet(self.parts.unet, compiler, weights, self._lora_set)
        self.vae = openvino.OpenVINOVAE(self.parts.vae, compiler, vae_weights)
        self.backend, self.precision = "openvino", precision

    def _lora_set(self) -> tuple[str, ...]:
        """The LoRAs merged into the torch weights now, by file hash and weight: what a compiled U-Net has."""
        return tuple(f"{lora.sha256} {weight!r}" for lora, weight in self._merge.active)

    def cfg_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The U-Net's latents for CFG's [uncond; cond] contexts: repeated, as diffusers does, or in the
        Winograd mode (already a rounding away from diffusers) once, which saves the U-Net's text-free start
        (UNetModel.forward). The default keeps the repeat: oneDNN's convolutions round a batch of one
        differently from a batch of two, and bit-identity with diffusers would be lost."""
        return latents if self.winograd else torch.cat([latents, latents])

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 negative_prompts: Sequence[str] | None = None,
                 init_images: Sequence[Image.Image] | None = None,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None, progress: bool = True,
                 **settings) -> list[Image.Image]:
        """One image per (prompt, seed), all with the same settings: the fields of sdcore.params.Generation
        (sampler, steps, guidance_scale, width, height, eta, strength, clip_skip), its defaults where not
        given.

        negative_prompts (default "") are the uncond prompts. init_images (one PIL image per prompt) make it
        img2img, with strength IMG2IMG_STRENGTH unless given. See `run` for the rest.
        """
        unknown = sorted(set(settings) - set(GENERATION_FIELDS))
        if unknown:
            raise TypeError(f"generate() got unknown setting(s) {unknown}; accepted: the arguments named in "
                            f"its signature and the settings {', '.join(GENERATION_FIELDS)}")
        if init_images is not None:
            settings.setdefault("strength", IMG2IMG_STRENGTH)
        elif settings.get("strength") is not None:
            raise InvalidField("strength", f"{settings['strength']!r} without init_images",
                               "a strength for img2img only: pass init_images too")
        requests = make_requests(prompts, seeds, negative_prompts, Generation(**settings))
        return [result.image for result in self.run(requests, init_images, callback, progress)]

    def run(self, requests: Sequence[Request], init_images: Sequence[Image.Image] | None = None,
            callback: Callable[[int, int, torch.Tensor], None] | None = None,
            progress: bool = True) -> list[Result]:
        """A Result per request, in order. Requests with equal settings (Generation) and as many prompt chunks
        (sdcore.prompts: 75 tokens each) run as one batch, others as batches of their own; an image never
        depends on the other requests. Prompts use AUTOMATIC1111's syntax: (emphasis:1.2), [less], BREAK,
        textual-inversion names (`embeddings`) and <lora:...> tags, which are listed (`parse`), not applied.

        guidance_scale > 1 runs classifier-free guidance, eps = uncond + g * (cond - uncond), with the
        [uncond, cond] rows in one U-Net batch; guidance_scale <= 1 runs the prompt alone (no uncond pass),
        as diffusers does.

        img2img: a request with a strength takes its init image (init_images[k] for requests[k]), converted
        to RGB (alpha dropped, grey replicated) and, when its size differs from width x height, resized to
        it with PIL's LANCZOS filter (what diffusers' VaeImageProcessor does), without keeping the aspect
        ratio. Only the last int(steps * strength) timesteps of the schedule run.

        callback(step, total, latents) runs after every sampler step of each batch, step counting from 1.
        Pixels are round(clamp(x / 2 + 0.5, 0, 1) * 255), rounding half to even, as diffusers does.
        """
        requests = check_requests(requests)
        if init_images is not None:
            init_images = check_init_images(init_images, len(requests))
        for k, request in enumerate(requests):
            if (request.generation.strength is not None) != (init_images is not None):
                raise InvalidField(f"requests[{k}].generation.strength",
                                   f"is {request.generation.strength} with init_images "
                                   f"{'given' if init_images is not None else 'not given'}",
                                   "a strength exactly when there are init images (img2img)")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a callable (step, total, latents), "
                            f"got {type(callback).__name__}")
        parsed = []  # every prompt before any work: a bad one fails the call, not its last batch
        for k, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
            except InvalidField as error:
                raise (error.under(f"requests[{k}]") if "prompt" in error.field else error) from None
        # A batch per (settings, chunks per text-encoder row): the rows of one U-Net pass share a context
        # length, and padding a prompt to a longer neighbour's length would change its image.
        # A LoRA set (the settings' and the prompt's <lora:> tags) is merged per batch, so it joins the key.
        batches: dict[tuple[Generation, int, tuple], list[int]] = {}
        for k, (request, prompts) in enumerate(zip(requests, parsed, strict=True)):
            chunks = prompts.chunk_count(uses_guidance(request.generation))
            loras = self.loras_of(request, prompts, f"requests[{k}]")
            self.vae_of(request, f"requests[{k}]")
            batches.setdefault((request.generation, chunks, loras), []).append(k)
        results: list[Result | None] = [None] * len(requests)
        for (generation, _, loras), rows in batches.items():
            images = None if init_images is None else [init_images[k] for k in rows]
            with self._weights_lock:
                self.use_loras(loras)
                batch = self._batch([requests[k] for k in rows], generation, images, callback, progress,
                                    [parsed[k] for k in rows])
            for k, result in zip(rows, batch, strict=True):
                results[k] = result
        return results

    def _batch(self, requests: list[Request], generation: Generation, init_images, callback,
               progress: bool, parsed: list[ParsedRequest]) -> list[Result]:
        g = generation
        schedule = samplers.schedule(g.sampler, g.steps, g.strength)
        vae = self.vae if g.vae is None else self.vaes[g.vae].vae
        with torch.inference_mode():
            guided = uses_guidance(g)
            prompts = [request.prompt for request in parsed]
            negatives = [request.negative for request in parsed]
            context = self.encode_prompts((negatives + prompts) if guided else prompts, g.clip_skip)
            generators = [torch.Generator("cpu").manual_seed(request.seed) for request in requests]
            latent_shape = (4, g.height // 8, g.width // 8)
            if init_images is None:
                x = randn(generators, latent_shape, device=self.device) * schedule.init_noise_sigma
            else:
                clean = self.encode_images(init_images, generators, g.width, g.height, vae)  # draws first
                x = schedule.noised(clean, randn(generators, latent_shape, device=self.device))

            def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                model_input = self.cfg_latents(x) if guided else x
                timesteps = t.to(self.device).expand(model_input.shape[0])
                # The sampler's arithmetic stays in fp32; only the U-Net runs in the model's precision.
                eps = self.unet(model_input.to(self.dtype), timesteps, context).float()
                if not guided:
                    return eps
                uncond, cond = eps.chunk(2)
                return uncond + g.guidance_scale * (cond - uncond)

            def noise(like: torch.Tensor) -> torch.Tensor:
                return randn(generators, like.shape[1:], device=like.device).to(like.dtype)

            x = samplers.sample(g.sampler, denoise, x, schedule, noise, eta=g.eta, callback=callback,
                                disable=not progress)
            finite = x.flatten(1).isfinite().all(1).tolist()
            # One image at a time: a 512x512 decode holds ~0.5 GB per 128-channel fp16 map, so batching buys
            # little and costs peak memory; it also keeps the decode of an image free of its neighbours.
            return [Result(request, to_pil(self.decode(x[k:k + 1], vae)), ok)
                    for k, (request, ok) in enumerate(zip(requests, finite, strict=True))]

    def metadata(self, request: Request) -> dict:
        """The settings of one image as sdcore.png writes them: the request and the model that made it, with
        every adapter it used (the LoRAs of its settings and its <lora:> tags, the embeddings its prompts
        name, the VAE's file when not the checkpoint's) and each one's SHA-256."""
        parsed = self.parse(request)
        settings = {
            **request.to_dict(), "model": self.name, "model_hash": self.model_hash,
            "precision": self.precision, "random_model": bool(self.is_random),
        }
        self.loras_of(request, parsed)  # every LoRA named is loaded
        settings["loras"] = [self._lora_record(name, weight) for name, weight in request.generation.loras]
        tagged = self.loras_of(Request(request.prompt, request.seed), parsed)  # the tags' alone
        if tagged:
            settings["prompt_loras"] = [self._lora_record(name, weight) for name, weight in tagged]
        used = dict.fromkeys((*parsed.prompt.embeddings, *parsed.negative.embeddings))
        if used:
            settings["embeddings"] = [{"name": name, "sha256": self.embedding_files[name].sha256
                                       if name in self.embedding_files else None} for name in used]
        vae_file = self.vae_of(request) if request.generation.vae else self.parts.vae_file
        if vae_file is not None:
            settings["vae_file"] = {"name": vae_file.name, "sha256": vae_file.sha256}
        if self.winograd:
            settings["winograd"] = True  # recorded only when on: it is why a rerun without it may differ
        if self.backend != "torch":
            settings["backend"] = self.backend  # the same: OpenVINO's kernels are a level away from torch's
        return settings

    def _lora_record(self, name: str, weight: float) -> dict:
        lora = self.loras[name]
        return {"name": name, "weight": weight, "sha256": lora.sha256, "shorthash": lora.shorthash}

    # -- stages -------------------------------------------------------------------------------------------

    # -- adapters -----------------------------------------------------------------------------------------

    def add_lora(self, path, name: str | None = None) -> str:
        """Read a LoRA file (sdcore.lora: kohya/A1111 or diffusers/PEFT layout) under `name` (default: the
        file's stem, what `<lora:name:w>` tags use); requests then name it in Generation.loras or in a tag.
        Returns the name."""
        lora = read_lora(path)
        self.loras[name or lora.name] = lora
        return name or lora.name

    def add_embedding(self, path, name: str | None = None) -> str:
        """Read a textual-inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds) under
        `name` (default: the file's token or stem); a prompt word equal to it stands for its vectors."""
        embedding = read_embedding(path, name, width=self.text_encoder.cfg.width)
        self.embeddings[embedding.name] = embedding.vectors
        self.embedding_files[embedding.name] = embedding
        return embedding.name

    def add_vae(self, path, name: str | None = None) -> str:
        """Read a standalone VAE file or diffusers folder (sdcore.checkpoints.load_vae) under `name` (default:
        the file's stem); requests then name it in Generation.vae. Returns the name."""
        vae_file = read_vae_file(path, self.device, self.dtype)
        name = name or Path(path).stem
        self.vaes[name] = vae_file
        return name

    def vae_of(self, request: Request, where: str = "request") -> VAEFile | None:
        """The VAE file a request names (Generation.vae), which must be added (add_vae); None: the model's."""
        name = request.generation.vae
        if name is not None and name not in self.vaes:
            added = ", ".join(sorted(self.vaes)) or "none added"
            raise InvalidField(f"{where}.generation.vae", f"VAE {name!r} is not added",
                               f"a VAE added with Pipeline.add_vae ({added}), or none for the model's own")
        return None if name is None else self.vaes[name]

    def loras_of(self, request: Request, parsed: ParsedRequest, where: str = "request"
                 ) -> tuple[tuple[str, float], ...]:
        """The LoRA set one request runs with: its settings' loras plus its prompt's <lora:name:w> tags (a
        name in both adds up, as A1111 applies each), sorted; each must be loaded (add_lora)."""
        weights = dict(request.generation.loras)
        for tag in parsed.prompt.networks:
            if not tag.is_lora:
                continue
            if tag.unet_weight != tag.weight:
                raise InvalidField(f"{where}.prompt", f"{tag.text} gives the U-Net its own weight",
                                   "one weight for text encoder and U-Net alike: <lora:name:w>")
            weights[tag.name] = weights.get(tag.name, 0.0) + tag.weight
        unknown = sorted(set(weights) - set(self.loras))
        if unknown:
            loaded = ", ".join(sorted(self.loras)) or "none loaded"
            raise InvalidField(f"{where}.loras", f"LoRA {unknown[0]!r} is not loaded",
                               f"a LoRA added with Pipeline.add_lora ({loaded})")
        return tuple(sorted(weights.items()))

    def use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Merge exactly this set into the weights (nothing to do when it already is; () restores the base
        weights bit for bit). A batch calls it under the weights lock."""
        with self._weights_lock:
            wanted = [(self.loras[name], weight) for name, weight in loras if weight != 0]
            if [(id(lora), w) for lora, w in wanted] != [(id(lora), w) for lora, w in self._merge.active]:
                self._merge.apply(wanted)
                self._empty_chunk_states.clear()  # the text encoder changed

    def parse(self, request: Request) -> ParsedRequest:
        """The request's prompts as the text encoder reads them (sdcore.prompts, A1111's syntax), with the
        extra-network tags (<lora:name:weight>) cut out of the prompt and listed in `.prompt.networks`
        (`loras_of` turns them into the request's LoRA set). A1111 cuts tags from the positive prompt only."""
        sizes = self._embedding_sizes()
        return ParsedRequest(
            parse_prompt(request.prompt, self.tokenizer, sizes),
            parse_prompt(request.negative_prompt, self.tokenizer, sizes, networks=False,
                         field="negative_prompt"))

    def encode_text(self, texts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """The context [len(texts), 77 * chunks, width] of prompts (parsed as positive prompts); see
        `encode_prompts`."""
        return self.encode_prompts([parse_prompt(text, self.tokenizer, self._embedding_sizes())
                                    for text in texts], clip_skip)

    def encode_prompts(self, prompts: Sequence[ParsedPrompt], clip_skip: int = 1) -> torch.Tensor:
        """Text-encoder states [len(prompts), 77 * k, width], k the most chunks of any prompt: each chunk
        encoded on its own (start and end tokens included), weighted, and the chunks concatenated; a prompt
        with fewer is padded with the empty prompt's chunk. Each distinct chunk is encoded once, in one
        batch; the empty prompt's (most negative prompts) once per pipeline and clip_skip."""
        with torch.inference_mode():
            if clip_skip not in self._empty_chunk_states:
                self._empty_chunk_states[clip_skip] = self._encode_chunks([self._empty_chunk], clip_skip)[0]
            table = {self._empty_chunk: self._empty_chunk_states[clip_skip]}
            count = max(len(prompt.chunks) for prompt in prompts)
            rows = [(*prompt.chunks, *(self._empty_chunk,) * (count - len(prompt.chunks)))
                    for prompt in prompts]
            distinct = [chunk for chunk in dict.fromkeys(chunk for row in rows for chunk in row)
                        if chunk not in table]
            if distinct:
                table.update(zip(distinct, self._encode_chunks(distinct, clip_skip), strict=True))
            return torch.stack([torch.cat([table[chunk] for chunk in row]) for row in rows])

    def _encode_chunks(self, chunks: list[Chunk], clip_skip: int) -> list[torch.Tensor]:
        ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long, device=self.device)
        vectors = None
        if any(chunk.embeddings for chunk in chunks):
            vectors = self.text_encoder.embeddings.token_embedding(ids)
            for row, chunk in enumerate(chunks):
                for position, name in chunk.embeddings:
                    embedding = self.embeddings[name]
                    vectors[row, position:position + len(embedding)] = embedding.to(vectors)
        states = self.text_encoder(ids, clip_skip=clip_skip, token_embeddings=vectors)
        return [emphasize(rows, chunk.weights) for rows, chunk in zip(states, chunks, strict=True)]

    def _embedding_sizes(self) -> dict[str, int]:
        """name -> number of vectors of `embeddings`, each checked to be a [n, width] tensor."""
        width = self.text_encoder.cfg.width
        sizes = {}
        for name, vectors in self.embeddings.items():
            if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[1] != width:
                found = f"a tensor {list(vectors.shape)}" if isinstance(vectors, torch.Tensor) \
                    else f"a {type(vectors).__name__}"
                raise InvalidField(f"embeddings[{name!r}]", f"is {found}", f"a tensor [n, {width}]")
            sizes[name] = vectors.shape[0]
        return sizes

    def encode_images(self, images: list[Image.Image], generators: list[torch.Generator], width: int,
                      height: int, vae=None) -> torch.Tensor:
        """Scaled VAE posterior samples of the init images, one image at a time (diffusers' order).
        An fp16 overflow in the encoder is redone in fp32, as in `decode`. vae: the model's by default."""
        vae = vae or self.vae
        latents = []
        for image, generator in zip(images, generators, strict=True):
            pixels = from_pil(image, width, height).to(self.device)
            posterior = vae.encode(pixels.to(self.dtype))
            if self.dtype != torch.float32 and not all(torch.isfinite(p).all() for p in posterior):
                posterior = self.fp32_vae(vae).encode(pixels)
            latents.append(vae.cfg.scaling_factor * posterior.sample([generator]).float())
        return torch.cat(latents)

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        """VAE decode to images in about [-1, 1], fp32, never NaN/inf.

        fp16 activations can overflow in the VAE decoder (65504 is fp16's largest value), which turns an
        image into NaN and then black. Decoding every image in fp32 would double the cost of the most
        expensive single call at 512x512 (~2.5 TFLOP), so decode in the model's precision and redo only a
        non-finite result with an fp32 copy of the VAE, made on first need. bf16 has fp32's range; the
        check costs one reduction. vae: the model's by default.
        """
        vae = vae or self.vae
        unscaled = latents / vae.cfg.scaling_factor
        images = vae.decode(unscaled.to(self.dtype)).float()
        if self.dtype != torch.float32 and not torch.isfinite(images).all():
            images = self.fp32_vae(vae).decode(unscaled.float())
        return images

    def fp32_vae(self, vae):
        with self._fp32_vae_lock:
            if id(vae) not in self._fp32_vaes:
                self._fp32_vaes[id(vae)] = copy.deepcopy(vae).float()
            return self._fp32_vaes[id(vae)]


def uses_guidance(generation: Generation) -> bool:
    """Classifier-free guidance runs above a scale of 1 (as in diffusers); at most 1 the prompt runs alone."""
    return generation.guidance_scale > 1.0


# -- images ------------------------------------------------------------------------------------------------

def from_pil(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An init image as a [1, 3, height, width] fp32 tensor in [-1, 1] (diffusers' VaeImageProcessor)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    pixels = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] * 2.0 - 1.0


def to_pil(images: torch.Tensor) -> Image.Image:
    """A decoded [1, 3, H, W] image to PIL, rounding in float32 numpy exactly as diffusers' postprocess does
    (np.round rounds half to even; truncating instead would shift the mean by half a level)."""
    pixels = (images * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return Image.fromarray((pixels[0] * 255).round().astype(np.uint8))


# -- argument checks: each error names the argument, the value and what is accepted ----------------------

def make_requests(prompts, seeds, negative_prompts, generation: Generation) -> list[Request]:
    """generate()'s parallel lists as Requests; an error names the list and the index."""
    prompts = check_list("prompts", prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    seeds = check_list("seeds", seeds)
    negative_prompts = [""] * len(prompts) if negative_prompts is None \
        else check_list("negative_prompts", negative_prompts)
    for name, values in (("seeds", seeds), ("negative_prompts", negative_prompts)):
        if len(values) != len(prompts):
            raise ValueError(f"{name} has {len(values)} values for {len(prompts)} prompts; pass one per "
                             "prompt" + (", or None for empty negative prompts" if name[0] == "n" else ""))
    plural = {"prompt": "prompts", "seed": "seeds", "negative_prompt": "negative_prompts"}
    requests = []
    for k, (prompt, seed, negative) in enumerate(zip(prompts, seeds, negative_prompts, strict=True)):
        try:
            requests.append(Request(prompt, seed, negative, generation))
        except InvalidField as error:
            raise InvalidField(f"{plural[error.field]}[{k}]", error.problem, error.accepted) from None
    return requests


def check_list(name: str, values) -> list:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list, got {type(values).__name__} {values!r:.60}; "
                        "wrap a single value in a list")
    return list(values)


def check_requests(requests) -> list[Request]:
    requests = check_list("requests", requests)
    if not requests:
        raise ValueError("requests is empty; pass at least one sdcore.params.Request")
    for index, request in enumerate(requests):
        if not isinstance(request, Request):
            raise TypeError(f"requests[{index}] must be a sdcore.params.Request, "
                            f"got {type(request).__name__}")
    return requests


def check_init_images(images, count: int) -> list[Image.Image]:
    if not isinstance(images, Sequence) or isinstance(images, Image.Image):
        raise TypeError(f"init_images must be a list of PIL images (one per prompt), "
                        f"got {type(images).__name__}")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"init_images[{index}] must be a PIL.Image.Image, got {type(image).__name__}")
    if len(images) != count:
        raise ValueError(f"init_images has {len(images)} images for {count} prompts; pass one per prompt")
    return list(images)
