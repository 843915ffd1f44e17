"""Per-image noise: the one way sdcore draws random numbers.

Every image owns a CPU `torch.Generator` seeded with its seed, and each draw for it (the initial latent, the
VAE posterior sample of an init image, a sampler's fresh noise) comes from that generator alone, in the order
diffusers' pipelines draw. So an image never depends on its batch neighbours, and a CPU generator gives the
same numbers whatever device the model runs on.
"""

from collections.abc import Sequence

import torch


def randn(generators: Sequence[torch.Generator], shape: Sequence[int], dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(generators), *shape] standard normal draws, row k from generators[k], drawn on the generators'
    device in `dtype` (as diffusers' randn_tensor draws: fp16 draws are not fp32 draws rounded), then
    moved to `device`."""
    draws = [torch.randn((1, *shape), generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.cat(draws).to(device)
