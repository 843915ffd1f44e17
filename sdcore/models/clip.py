"""CLIP text encoder (the ViT-L/14 text tower of SD 1.5): token ids [B, 77] -> hidden states [B, 77, 768].

Attribute names follow `cond_stage_model.transformer.text_model.*` of the original checkpoint.
`clip_skip` counts as AUTOMATIC1111 does: 1 is the last layer's output, n stops n - 1 layers short of it
(transformers' `hidden_states[-n]`); every output passes the final layer norm, as SD 1.5 was trained on.
"""

import torch
from torch import nn

from ..config import CLIPConfig
from .attention import attention


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal: SD 1.5 was trained on the text tower's causally masked states, padding included.
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU, as CLIP was trained


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """token_embeddings, when given, stand in for the ids' rows of the table (textual inversion)."""
        # Positions are computed, not stored: checkpoints disagree on the dtype of their `position_ids`.
        positions = torch.arange(ids.shape[1], device=ids.device)
        tokens = self.token_embedding(ids) if token_embeddings is None else token_embeddings
        return tokens + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """The output of the first `layers` layers (all by default)."""
        for layer in self.layers[:layers]:
            x = layer(x)
        return x


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CLIPConfig()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1,
                token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> final_layer_norm(output of the first layers - clip_skip + 1 layers) [B, T, width].

        token_embeddings [B, T, width], when given, replace the token-embedding lookup of the ids (whose
        values then only set the shape): textual-inversion vectors go in this way.
        """
        if ids.shape[1] > self.cfg.max_positions:
            raise ValueError(
                f"token ids have length {ids.shape[1]}; the text encoder accepts at most "
                f"max_positions={self.cfg.max_positions}"
            )
        layers = self.cfg.layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers + 1:
            raise ValueError(f"clip_skip {clip_skip!r} is out of range for a {layers}-layer text encoder; "
                             f"accepted: an integer from 1 to {layers + 1}")
        hidden = self.encoder(self.embeddings(ids, token_embeddings), layers - clip_skip + 1)
        return self.final_layer_norm(hidden)


def emphasize(states: torch.Tensor, weights) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis on one chunk's states [T, width]: each position's vector times its
    weight (T weights), then the whole chunk rescaled so that its mean is the unweighted one. Computed in
    fp32, returned in the states' dtype; all weights 1 return the states themselves."""
    if all(weight == 1.0 for weight in weights):
        return states
    original = states.float()
    weighted = original * torch.tensor(weights, dtype=torch.float32, device=states.device)[:, None]
    return (weighted * (original.mean() / weighted.mean())).to(states.dtype)
