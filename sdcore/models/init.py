"""Deterministic random weights that make activations look like a trained model's.

PyTorch's default init leaves SD-sized models degenerate (U-Net output nearly constant, VAE decode far
outside [-1, 1]), so a comparison on such weights proves little. The rules below go by parameter name and
shape only, so they apply alike to sdcore modules and to the diffusers/transformers reference models.
"""

import math

import torch
from torch import nn

# Chosen by measurement (see tests/test_models.py): with these, the SD 1.5 and tiny U-Nets give output std
# near 1, the VAE decodes mostly into [-1, 1] and CLIP hidden states stay O(1).
WEIGHT_GAIN = 1.0
EMBEDDING_STD = 0.02
NORM_WEIGHT_NOISE = 0.1
BIAS_STD = 0.02


@torch.no_grad()
def scaled_init_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of `module` in place from a generator seeded with `seed`; returns `module`."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if "embedding" in name and param.ndim == 2:  # lookup tables: rows are vectors, not fan-in maps
            values *= EMBEDDING_STD
        elif param.ndim >= 2:  # linear and conv weights: fan_in over input channels x kernel
            values *= WEIGHT_GAIN / math.sqrt(math.prod(param.shape[1:]))
        elif name.endswith("weight"):  # 1-D weights are GroupNorm / LayerNorm scales
            values = 1.0 + NORM_WEIGHT_NOISE * values
        else:
            values *= BIAS_STD
        param.copy_(values)
    return module
