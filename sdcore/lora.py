"""LoRA: read kohya/A1111 and diffusers/PEFT LoRA files, merge a set of them into the text encoder and U-Net.

Layouts, told apart by key (in a .safetensors file or a .ckpt / .pt / .bin pickle read with weights_only):

    kohya / A1111    lora_unet_<layer>.lora_down.weight, .lora_up.weight, .alpha; lora_te_<layer>...
                     <layer> is the diffusers module path with "_" for "." (down_blocks_0_attentions_0_...,
                     text_model_encoder_layers_0_self_attn_q_proj), in older files the original one
                     (input_blocks_1_1_...). LoCon: a 3x3 lora_down [r, in, 3, 3] and a 1x1 lora_up
                     [out, r, 1, 1], or with a lora_mid [r, r, 3, 3] between 1x1 down and up (CP).
    diffusers / PEFT unet.<dotted diffusers path>.lora_A.weight / .lora_B.weight, text_encoder.<path>...;
                     older diffusers: <path>.lora.down/up.weight, <path>.lora_linear_layer.down/up.weight,
                     <attention>.processor.to_q_lora.down/up.weight (text encoder: to_q_lora is q_proj).

Every key names one Linear or Conv2d of SD 1.5's U-Net or text encoder, under the names that
sdcore.checkpoints.layout gives it in either layout; a key that names none is an error, never skipped.

Merging, as A1111 and diffusers compute it: W' = W + sum_i weight_i * scale_i * (up_i @ down_i), where
scale = alpha / rank (kohya: the layer's `.alpha`, scale 1 without one; PEFT: `lora_alpha` and
`alpha_pattern` of the file's lora_adapter_metadata, alpha = rank without it, alpha / sqrt(rank) with
use_rslora). The delta is computed in fp32 and W' rounded once to the weights' dtype.
"""

import functools
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checkpoints.build import sha256_of_files
from .checkpoints.layout import rename_keys
from .checkpoints.read import MODELS, read_file
from .errors import CheckpointError
from .models.winograd import WinogradConv2d

TARGETS = ("text_encoder", "unet")  # the components a LoRA may change
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
# Endings of the diffusers layouts, longest first where one ends another.
DIFFUSERS_PARTS = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: to_q_lora.down...
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)  # fmt: skip
# The attention processors' projection names (`to_out_lora`) and the layers they mean.
PROCESSOR_LAYERS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Other adapter kinds, by a pattern of their keys, to name them when refused.
UNSUPPORTED = {
    r"\.hada_": "LoHa (LyCORIS)", r"\.lokr_": "LoKr (LyCORIS)", r"dora_scale": "DoRA",
    r"lora_magnitude_vector": "DoRA", r"\.oft_": "OFT", r"\.on_input": "IA3",
    r"\.diff(_b)?$": "a full weight difference (LyCORIS 'full')", r"\.[wb]_norm$": "a norm-layer adapter",
    r"lora_B\.bias$": "LoRA with a bias",
}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights writes the PEFT LoraConfig
SHOWN = 5  # keys an error lists before "..."


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """The update of one weight: scale * up @ down (with the CP core `mid` between them when present)."""

    component: str  # "text_encoder" or "unet"
    module: str  # sdcore's module path in the component (the original names), e.g. "input_blocks.1.1.proj_in"
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    mid: torch.Tensor | None  # [rank, rank, kh, kw] or None
    scale: float  # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the update: (out, in) or (out, in, kh, kw)."""
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in * kh * kw]) in fp32 on `device`, the update being scale * up @ down; a CP
        core is folded into down (up_in mid_nmkl down_mj = up_in (mid down)_njkl)."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        if self.mid is not None:
            mid = self.mid.to(device=device, dtype=torch.float32)
            down = torch.einsum("nmkl,mj->njkl", mid, down).flatten(1)
        return up, down


@dataclass(frozen=True, eq=False)
class LoRA:
    name: str  # the file's stem: what `<lora:name:weight>` refers to
    path: Path
    layout: str  # "kohya" or "diffusers"
    layers: tuple[LoRALayer, ...]
    # A1111's hash of a .safetensors LoRA (the "Lora hashes" of its infotext, network.NetworkOnDisk): the
    # file's `sshs_model_hash` metadata when it has one, else sd-scripts' "addnet" hash, the sha256 of the
    # bytes after the JSON header, so that editing the metadata keeps the hash. None: not a .safetensors.
    addnet_hash: str | None = None

    @property
    def sha256(self) -> str:
        """sha256 of the file (hashed on first use, then cached)."""
        return sha256_of_files((self.path,))

    @property
    def shorthash(self) -> str:
        """What A1111's "Lora hashes" write: 12 hex digits of the addnet hash, or of the file's sha256."""
        return (self.addnet_hash or self.sha256)[:12]

    def components(self) -> set[str]:
        return {layer.component for layer in self.layers}


def read_lora(path) -> LoRA:
    """Read a LoRA file, every key mapped to a layer of SD 1.5; CheckpointError names the file and lists the
    keys it could not use (unknown layers, other adapter kinds, SDXL / SD 2.x files, bad shapes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such LoRA file; expected a .safetensors, .ckpt or .pt LoRA")
    tensors, _ = read_file(path)
    if isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    metadata = _safetensors_metadata(path)
    _reject_other_models(path, tensors, metadata or {})
    if not tensors:
        raise CheckpointError(path, "an empty LoRA: the file holds no tensors")

    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    file_names: dict[tuple[str, str], str] = {}  # the layer's name in the file, for PEFT's alpha_pattern
    unmatched, unsupported, repeated, layouts = [], [], [], set()
    targets = _targets()
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            unmatched.append(key)
            continue
        kind = next((what for pattern, what in UNSUPPORTED.items() if re.search(pattern, key)), None)
        parsed = None if kind else _parse_key(key)
        if kind or parsed is None:
            (unsupported if kind else unmatched).append(f"{key} ({kind})" if kind else key)
            continue
        layout, component, name, part = parsed
        module = targets[component].get(name.replace(".", "_"))
        if module is None:
            unmatched.append(key)
            continue
        layer = parts.setdefault((component, module), {})
        if part in layer:
            repeated.append(key)
        layer[part] = tensor
        file_names[(component, module)] = name
        layouts.add(layout)

    problems = []
    if unsupported:
        problems.append(f"{len(unsupported)} keys of adapter kinds sdcore does not merge "
                        f"({_first(unsupported)})")
    if unmatched:
        problems.append(f"{len(unmatched)} of {len(tensors)} keys name no text encoder or U-Net layer of "
                        f"SD 1.5 ({_first(unmatched)})")
    if repeated:
        problems.append(f"{len(repeated)} keys name a layer part that another key already names "
                        f"({_first(repeated)})")
    scales = _peft_scales(metadata or {})
    layers = []
    for (component, module), found in parts.items():
        layer, problem = _layer(component, module, found, scales, file_names[(component, module)])
        if problem:
            problems.append(problem)
        else:
            layers.append(layer)
    if problems:
        raise CheckpointError(path, "not a LoRA sdcore can merge into SD 1.5: " + "; ".join(problems))
    addnet = (metadata.get("sshs_model_hash") or _addnet_hash(path)) if metadata is not None else None
    return LoRA(name=path.stem, path=path, layout="kohya" if layouts == {"kohya"} else "diffusers",
                layers=tuple(layers), addnet_hash=addnet)


def _addnet_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LoRAMerge:
    """A set of (LoRA, weight) merged into a text encoder's and a U-Net's weights in place, removably.

        merge = LoRAMerge(text_encoder, unet)
        merge.apply([(style, 0.8), (detail, -0.5)])  # weights now W + sum of the deltas
        merge.apply([])                              # the base weights again, bit for bit

    The first time a weight is touched a copy of it is kept (on its device): restoring copies it back, so
    no apply/remove sequence drifts. The copies cost the size of every touched weight: 1.3 GiB in fp32 for
    an SD 1.5 LoRA on the U-Net's transformer layers and every text encoder linear, 3.5 GiB with LoCon on
    every convolution (the whole U-Net); half that in fp16. A weight the new set no longer touches is
    restored and its copy freed.
    Not thread-safe: nothing may run the models while `apply` runs.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        self.models = {"text_encoder": text_encoder, "unet": unet}
        self.active: tuple[tuple[LoRA, float], ...] = ()
        self._base: dict[tuple[str, str], torch.Tensor] = {}
        self._modules: dict[tuple[str, str], nn.Module] = {}

    @property
    def saved_bytes(self) -> int:
        """Memory held by the copies of the base weights."""
        return sum(t.nbytes for t in self._base.values())

    def apply(self, loras: Sequence[tuple[LoRA, float]]) -> None:
        """Make the merged set exactly `loras` (an empty set restores the base weights). Checks every layer
        against the models first: on a CheckpointError nothing has changed."""
        wanted = tuple((lora, float(weight)) for lora, weight in loras)
        if [(id(lora), w) for lora, w in wanted] == [(id(lora), w) for lora, w in self.active]:
            return
        plan = self._plan(wanted)
        try:
            with torch.inference_mode():  # in-place updates work on inference tensors and normal ones alike
                for target in [t for t in self._base if t not in plan]:
                    self._write(target, self._base.pop(target))
                for target, terms in plan.items():
                    module = self._module(target)
                    base = self._base.get(target)
                    if base is None:
                        base = self._base[target] = module.weight.detach().clone()
                    merge_into(module.weight, base, terms)
                    _forget_transformed(module)
        except BaseException:
            self._restore_all()
            raise
        self.active = wanted

    def remove(self) -> None:
        """Restore every touched weight to its base value and free the copies."""
        self.apply(())

    def _plan(self, wanted) -> dict[tuple[str, str], list[tuple[LoRALayer, float]]]:
        plan: dict[tuple[str, str], list[tuple[LoRALayer, float]]] = {}
        for lora, weight in wanted:
            if not math.isfinite(weight):
                raise ValueError(f"LoRA {lora.name!r}: weight {weight} is not a finite number")
            problems = []
            for layer in lora.layers:
                try:
                    module = self._module((layer.component, layer.module))
                except AttributeError:
                    problems.append(f"{layer.component} has no layer {layer.module}")
                    continue
                shape, made = module.weight.shape, layer.weight_shape()
                if (made[0], math.prod(made[1:])) != (shape[0], math.prod(shape[1:])):  # linear ~ 1x1 conv
                    problems.append(f"{layer.component} {layer.module}: the LoRA makes {list(made)}, the "
                                    f"layer is {list(shape)}")
                elif weight:
                    plan.setdefault((layer.component, layer.module), []).append((layer, weight))
            if problems:
                raise CheckpointError(lora.path, f"does not fit this model: {len(problems)} of "
                                                 f"{len(lora.layers)} layers ({_first(problems)})")
        return plan

    def _module(self, target: tuple[str, str]) -> nn.Module:
        module = self._modules.get(target)
        if module is None:
            component, path = target
            module = self._modules[target] = self.models[component].get_submodule(path)
        return module

    def _write(self, target: tuple[str, str], value: torch.Tensor) -> None:
        module = self._module(target)
        module.weight.copy_(value)
        _forget_transformed(module)

    def _restore_all(self) -> None:
        with torch.inference_mode():
            for target in list(self._base):
                self._write(target, self._base.pop(target))
        self.active = ()


def _forget_transformed(module: nn.Module) -> None:
    if isinstance(module, WinogradConv2d):
        # Its cache of transformed weights is keyed on the weight's version, which inference tensors lack.
        module._transformed.clear()


def merge_into(weight: torch.Tensor, base: torch.Tensor, terms: list[tuple[LoRALayer, float]]) -> None:
    """weight = base + sum of factor * scale * up @ down, accumulated in fp32 and rounded once to the
    weight's dtype. An fp32 weight is written by the addmm itself: one pass over it per LoRA, no temporary."""
    rows = weight.shape[0]
    direct = weight.dtype == torch.float32 and weight.is_contiguous()
    total = weight.view(rows, -1) if direct else base.reshape(rows, -1).to(torch.float32, copy=True)
    for i, (layer, factor) in enumerate(terms):
        up, down = layer.factors(weight.device)
        if direct and i == 0:
            torch.addmm(base.view(rows, -1), up, down, alpha=factor * layer.scale, out=total)
        else:
            total.addmm_(up, down, alpha=factor * layer.scale)
    if not direct:
        weight.copy_(total.view(weight.shape))


# ------------------------------------------------------------------------------------------ reading keys


@functools.cache
def _targets() -> dict[str, dict[str, str]]:
    """{component: {layer name with "_" for ".": sdcore module path}} for every Linear and Conv2d of SD 1.5,
    under its original name and its diffusers/transformers name (the text encoder's with and without
    `text_model.`). Kohya's names are these with "_"; dotted names are looked up the same way."""
    tables = {}
    for component in TARGETS:
        module_class, (sd15, *_) = MODELS[component]
        with torch.device("meta"):
            model = module_class(sd15)
        other_names = rename_keys(component, model.state_dict().keys(), "diffusers")
        table: dict[str, str] = {}
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            for alias in (path, other_names[f"{path}.weight"].removesuffix(".weight")):
                if table.setdefault(alias.replace(".", "_"), path) != path:
                    raise AssertionError(f"two {component} layers share the LoRA name {alias}")
        tables[component] = table
    return tables


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(layout, component, layer name, part) of a LoRA key; None when it follows neither layout."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, part = key.removeprefix(prefix).partition(".")
            return ("kohya", component, name, KOHYA_PARTS[part]) if part in KOHYA_PARTS else None
    component, rest = "unet", key  # the oldest attention-processor files hold U-Net keys without a prefix
    for prefix, candidate in DIFFUSERS_PREFIXES.items():
        if key.startswith(prefix):
            component, rest = candidate, key.removeprefix(prefix)
    for ending, part in DIFFUSERS_PARTS:
        if rest.endswith(ending):
            name = rest.removesuffix(ending).replace(".processor.", ".")
            if ending.startswith("_lora."):
                head, _, projection = name.rpartition(".")
                if projection not in PROCESSOR_LAYERS[component]:
                    return None
                name = f"{head}.{PROCESSOR_LAYERS[component][projection]}"
            return "diffusers", component, name, part
    return None


def _layer(component: str, module: str, found: dict, scales, file_name: str
           ) -> tuple[LoRALayer | None, str | None]:
    """The checked LoRALayer of one layer's tensors, or the problem with them."""
    down, up, mid, alpha = (found.get(p) for p in ("down", "up", "mid", "alpha"))
    where = f"{component} {module}"
    if down is None or up is None:
        has, lacks = ("up", "down") if down is None else ("down", "up")
        return None, f"{where} has lora_{has} but no lora_{lacks}"
    if not _is_rank_r_update(down, up, mid):
        shapes = f"down {list(down.shape)}, up {list(up.shape)}"
        shapes += f", mid {list(mid.shape)}" if mid is not None else ""
        return None, (f"{where}: {shapes} is no rank-r update (down [r, in] or [r, in, kh, kw], up [out, r] "
                      "or [out, r, 1, 1], mid [r, r, kh, kw] after a 1x1 down)")
    if alpha is not None and alpha.numel() != 1:
        return None, f"{where}: alpha holds {alpha.numel()} values, not one"
    rank = down.shape[0]
    scale = float(alpha) / rank if alpha is not None else scales(component, file_name, rank)
    return LoRALayer(component, module, down, up, mid, scale), None


def _is_rank_r_update(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None) -> bool:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        return False
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        return False
    rank = down.shape[0]
    return mid is None or (mid.ndim == 4 and mid.shape[:2] == (rank, rank) and down.shape[2:] in ((), (1, 1)))


def _peft_scales(metadata: dict):
    """scale(component, layer name, rank) for layers without an `.alpha` key: PEFT's lora_alpha / rank from
    the file's LoraConfig (per component, `alpha_pattern` matched as PEFT matches it), else 1."""
    configs = {}
    if METADATA_KEY in metadata:
        flat = json.loads(metadata[METADATA_KEY])
        for prefix, component in DIFFUSERS_PREFIXES.items():
            configs[component] = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}

    def scale(component: str, name: str, rank: int) -> float:
        config = configs.get(component, {})
        alpha = config.get("lora_alpha", rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = value
                break
        return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    return scale


def _safetensors_metadata(path: Path) -> dict[str, str] | None:
    """A .safetensors file's metadata; None for another kind of file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return None
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def _reject_other_models(path: Path, tensors: dict, metadata: dict) -> None:
    sdxl_keys = [k for k in tensors if k.startswith(SDXL_PREFIXES)]
    if sdxl_keys or str(metadata.get("ss_base_model_version", "")).startswith("sdxl"):
        evidence = f"{len(sdxl_keys)} keys such as {sdxl_keys[0]}" if sdxl_keys else "ss_base_model_version"
        raise CheckpointError(path, f"an SDXL LoRA ({evidence}); sdcore merges LoRAs for SD 1.x only")
    if metadata.get("ss_v2") == "True":
        raise CheckpointError(path, "an SD 2.x LoRA (its metadata has ss_v2); sdcore merges SD 1.x LoRA only")
    config = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    if any(config.get(f"{prefix}use_dora") for prefix in DIFFUSERS_PREFIXES):
        raise CheckpointError(path, "a DoRA adapter (its metadata has use_dora); sdcore merges plain LoRA")


def _first(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
