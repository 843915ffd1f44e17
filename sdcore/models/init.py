"""Deterministic random weights that make activations look like a trained model's.

PyTorch's default init leaves SD-sized models degenerate (U-Net output nearly constant, VAE decode far
outside [-1, 1]), so a comparison on such weights proves little. The rules below go by parameter name and
shape only, so they apply alike to sdcore modules and to the diffusers/transformers reference models.
"""

import math

import torch
from torch import nn

# Chosen by measurement (asserted in tests/test_models.py): at SD 1.5 size, U-Net output std ~1, VAE decode
# std ~0.8 with ~80% of values in [-1, 1], CLIP last hidden state std ~1.
WEIGHT_GAIN = 1.4  # about sqrt(2): GroupNorm + SiLU halves the power that reaches each conv
EMBEDDING_STD = 0.02
NORM_WEIGHT_NOISE = 0.1
BIAS_STD = 0.02


@torch.no_grad()
def scaled_init_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of `module` in place from a generator seeded with `seed`; returns `module`."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "embedding" in name and param.ndim == 2:  # lookup tables: rows are vectors, not fan-in maps
            mean, std = 0.0, EMBEDDING_STD
        elif param.ndim >= 2:  # linear and conv weights: fan_in over input channels x kernel
            mean, std = 0.0, WEIGHT_GAIN / math.sqrt(math.prod(param.shape[1:]))
        elif name.endswith("weight"):  # 1-D weights are GroupNorm / LayerNorm scales
            mean, std = 1.0, NORM_WEIGHT_NOISE
        else:
            mean, std = 0.0, BIAS_STD
        # Values are drawn in fp32 on the CPU, so they do not depend on the module's dtype or device.
        on_cpu_fp32 = param.device.type == "cpu" and param.dtype == torch.float32
        values = param if on_cpu_fp32 else torch.empty(param.shape, dtype=torch.float32)
        values.normal_(mean, std, generator=generator)
        if not on_cpu_fp32:
            param.copy_(values)
    return module
