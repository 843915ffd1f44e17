"""The three SD 1.5 networks, with module names that mirror the original checkpoint."""

from .attention import attention
from .clip import CLIPTextModel
from .init import scaled_init_
from .unet import UNetModel
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "CLIPTextModel", "DiagonalGaussian", "UNetModel", "attention", "scaled_init_"]
