"""Checkpoint files in every format sdcore reads, written from diffusers reference models into temporary dirs.

refs = build_references(tiny_unet(), tiny_vae(), tiny_clip())       # diffusers/transformers, scaled init
sd = original_state_dict(**refs, non_weights=True)                   # tests/reference.py
write_ckpt(path, sd); write_safetensors(path, sd); write_safetensors(path, half(sd))
write_ckpt(path, with_ema_copy(sd, ema_unet=refs["unet"], plain_unet=other_unet))
write_diffusers_folder(folder, **refs, tokenizer=folder_with_vocab)
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdcore.checkpoints.layout import ORIGINAL_PREFIXES
from sdcore.tokenizer import CLIPTokenizer
from tests.reference import original_layout, reference_text_encoder, reference_unet, reference_vae

UNET_PREFIX = ORIGINAL_PREFIXES["unet"]


def build_references(unet_cfg, vae_cfg, clip_cfg, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The three diffusers/transformers reference models, keyed as original_state_dict() takes them."""
    return {
        "unet": reference_unet(unet_cfg, seed),
        "vae": reference_vae(vae_cfg, seed + 1),
        "text_encoder": reference_text_encoder(clip_cfg, seed + 2),
    }


def write_ckpt(path: Path, state_dict: dict, legacy: bool = False) -> Path:
    """A Lightning-style pickle: the weights under "state_dict", next to a training counter."""
    torch.save(
        {"global_step": 840000, "state_dict": state_dict}, path, _use_new_zipfile_serialization=not legacy
    )
    return path


def write_safetensors(path: Path, state_dict: dict) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


def half(state_dict: dict) -> dict:
    """What a fp16 release holds: every floating tensor stored as fp16."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def round_to_half_(module: torch.nn.Module) -> torch.nn.Module:
    """The reference a fp16 file should reproduce: its weights rounded through fp16."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def ema_name(unet_key: str) -> str:
    """LitEma's name for a U-Net weight: `model.diffusion_model.a.0.w` -> `model_ema.diffusion_modela0w`."""
    return "model_ema." + unet_key.removeprefix("model.").replace(".", "")


def with_ema_copy(state_dict: dict, ema_unet: torch.nn.Module, plain_unet: torch.nn.Module) -> dict:
    """The v1-5-pruned.ckpt arrangement: plain U-Net weights under model.diffusion_model.*, the EMA copy
    (here: a different model, so the two are told apart) under dotless model_ema.* names."""
    rest = {k: v for k, v in state_dict.items() if not k.startswith(UNET_PREFIX)}
    plain = {UNET_PREFIX + k: v for k, v in original_layout("unet", plain_unet).items()}
    ema = {ema_name(UNET_PREFIX + k): v for k, v in original_layout("unet", ema_unet).items()}
    return {**rest, **plain, **ema}


def write_tokenizer_folder(folder: Path, tokenizer: CLIPTokenizer, merges: int | None = None) -> Path:
    """A Hugging Face tokenizer folder (vocab.json, merges.txt), optionally keeping only the first merges."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.vocab), encoding="utf-8")
    pairs = sorted(tokenizer.merge_ranks, key=tokenizer.merge_ranks.get)[:merges]
    lines = ["#version: 0.2", *(" ".join(pair) for pair in pairs)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_diffusers_folder(
    folder: Path, unet, vae, text_encoder, tokenizer: CLIPTokenizer | None = None, variant: str | None = None
) -> Path:
    """What `StableDiffusionPipeline.save_pretrained` writes for the parts sdcore reads."""
    unet.save_pretrained(folder / "unet", variant=variant)
    vae.save_pretrained(folder / "vae", variant=variant)
    text_encoder.save_pretrained(folder / "text_encoder", variant=variant)
    if tokenizer is not None:
        write_tokenizer_folder(folder / "tokenizer", tokenizer, merges=1000)
    return folder
