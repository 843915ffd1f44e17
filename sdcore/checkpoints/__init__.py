"""Stable Diffusion 1.x checkpoints: `read` identifies and checks a source's weights, `build` makes sdcore's
modules from them, `write` converts a source to safetensors, `layout` renames keys original <-> diffusers."""

from .build import Components, VAEFile, load_components, load_vae, read_vae_file, sha256_of_files
from .read import TINY_RANDOM
from .write import convert_checkpoint, diffusers_config

__all__ = [
    "TINY_RANDOM", "Components", "VAEFile", "convert_checkpoint", "diffusers_config", "load_components",
    "load_vae", "read_vae_file", "sha256_of_files",
]
