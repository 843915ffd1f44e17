"""The one attention function of sdcore, shared by the text encoder, the VAE and the U-Net."""

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on tokens: q [B, Nq, C], k/v [B, Nk, C] -> [B, Nq, C]."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).flatten(2)
