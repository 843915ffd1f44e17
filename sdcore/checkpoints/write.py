"""Write checkpoints: `convert_checkpoint` stores any source's weights once as safetensors, in the original
or the diffusers layout, so that later loads are a fast memory map."""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layout import original_to_diffusers
from .read import PREFIXES, TINY_RANDOM, read_original_layout, select_weights


def convert_checkpoint(src, dst, half=False, layout="original", ema="auto") -> Path:
    """Write the weights of `src` once in a form that later loads as a fast memory map.

    layout "original": one flat .safetensors with the original full key names, weights only (the EMA
    U-Net, when chosen, under the plain `model.diffusion_model.*` names, like the EMA-only release).
    layout "diffusers": a folder with unet/, vae/, text_encoder/ safetensors files in diffusers' key names.
    half: store fp16. The source is checked exactly as `load_components` checks it.
    """
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout={layout!r} is not accepted; use 'original' or 'diffusers'")
    if str(src) == TINY_RANDOM:
        raise ValueError("tiny-random has no weights file to convert: it is made from fixed seeds at load; "
                         "accepted: a .ckpt / .safetensors file or a diffusers folder")
    src, dst = Path(src), Path(dst)
    _check_destination(dst, layout)  # before the source is read: that takes a while for a 4 GB file
    weights, _, _ = read_original_layout(src)
    parts = select_weights(src, weights, ema)

    def stored(t):
        return (t.half() if half and t.is_floating_point() else t).contiguous()

    if layout == "original":
        flat = {PREFIXES[c] + k: stored(t) for c, (_, tensors) in parts.items() for k, t in tensors.items()}
        _save_atomically(flat, dst)
        return dst
    for component, (cfg, tensors) in parts.items():
        diffusers = original_to_diffusers(component, tensors)
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


def _check_destination(dst: Path, layout: str) -> None:
    if layout != "original":
        return  # the diffusers layout makes its folders (mkdir names a file in the way)
    if dst.is_dir():
        raise ValueError(f"{dst}: is a folder; accepted: the path of the .safetensors file to write")
    if not dst.parent.is_dir():
        raise ValueError(f"{dst.parent}: no such folder; accepted: a file path in an existing folder")


def _save_atomically(tensors: dict[str, torch.Tensor], dst: Path) -> None:
    """Write beside `dst`, then rename: readers (and the source, if dst == src) never see half a file."""
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, a folder in the way) leaves nothing behind
        raise
