"""The SD 1.5 denoising U-Net: (noisy latents, timesteps, text context) -> predicted noise.

Attribute names follow `model.diffusion_model.*` of the original checkpoint (input_blocks, middle_block,
output_blocks, in_layers, emb_layers, out_layers, transformer_blocks, attn1, attn2 ...). The stride-1 3x3
convolutions are WinogradConv2d: plain nn.Conv2d until `use_winograd` turns on their CPU fast path.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .attention import attention
from .winograd import WinogradConv2d


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim], cosines first (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def repeat_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, ...] -> [rows, ...] as rows // B copies of the batch one after another (CFG's [x; x])."""
    return x if x.shape[0] == rows else x.repeat(rows // x.shape[0], *(1,) * (x.dim() - 1))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_ch), nn.SiLU(), WinogradConv2d(in_ch, out_ch)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        # Index 2 held the (inference-time no-op) dropout; keeping the slot keeps `out_layers.3` loadable.
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Identity(), WinogradConv2d(out_ch, out_ch)
        )
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb may have more rows than x, in the order of [x; x; ...] (UNetModel.forward): the linear runs on
        # all of them, since MKL rounds a small matmul differently at another row count.
        h = self.in_layers(x) + self.emb_layers(emb)[: x.shape[0], :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to `context` tokens (itself when context is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(value)  # = value * gelu(gate) bit for bit, into gelu's fresh buffer


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Index 1 held the dropout; the slot keeps `ff.net.2` loadable.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward. Two calls, before and after the text
    enters, so that UNetModel can run the first once per latent for several contexts."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def attend_self(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn1(self.norm1(x)) + x

    def attend_text(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Image feature map -> tokens -> transformer block -> feature map, plus the residual; in two calls, split
    where the block's are."""

    def __init__(self, ch: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        # A list of one: SD 1.5 has a single block per transformer, at `transformer_blocks.0`.
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim, heads)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def attend_self(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map [n, c, h, w] -> tokens [n, h*w, c] after the self-attention."""
        b, c, h, w = x.shape
        # One copy each way (here and in attend_text): strided token views would make every LayerNorm,
        # linear and residual add copy, and would hand proj_out a channels-last layout that the rest of the
        # NCHW network converts back. (Channels-last throughout, which makes both copies views, measured no
        # faster on this CPU: U-Net step at 256x256 2.03 s vs 1.98 s NCHW.)
        tokens = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        return self.transformer_blocks[0].attend_self(tokens)

    def attend_text(self, tokens: torch.Tensor, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """attend_self's tokens, and the feature map it was given as the residual -> feature map."""
        b, c, h, w = x.shape
        tokens = self.transformer_blocks[0].attend_text(tokens, context)
        return self.proj_out(tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()) + x


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = WinogradConv2d(ch, ch)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # To the size of the skip it meets next, not 2x: odd sides were rounded up on the way down.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        chs, n_res, g, emb_dim = cfg.block_channels, cfg.layers_per_block, cfg.norm_groups, cfg.time_embed_dim

        def stage(in_ch: int, out_ch: int, level: int) -> list[nn.Module]:
            layers = [ResBlock(in_ch, out_ch, emb_dim, g)]
            if cfg.attention_levels[level]:
                layers.append(SpatialTransformer(out_ch, cfg.context_dim, cfg.heads, g))
            return layers

        self.time_embed = nn.Sequential(nn.Linear(chs[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([nn.Sequential(WinogradConv2d(cfg.in_channels, chs[0]))])
        skip_chs, ch = [chs[0]], chs[0]
        for level, out_ch in enumerate(chs):
            for _ in range(n_res):
                self.input_blocks.append(nn.Sequential(*stage(ch, out_ch, level)))
                ch = out_ch
                skip_chs.append(ch)
            if level < len(chs) - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skip_chs.append(ch)

        self.middle_block = nn.Sequential(
            ResBlock(ch, ch, emb_dim, g),
            SpatialTransformer(ch, cfg.context_dim, cfg.heads, g),
            ResBlock(ch, ch, emb_dim, g),
        )

        self.output_blocks = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(chs))):
            for i in range(n_res + 1):
                layers = stage(ch + skip_chs.pop(), out_ch, level)
                ch = out_ch
                if level > 0 and i == n_res:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.Sequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(g, ch), nn.SiLU(), WinogradConv2d(ch, cfg.out_channels)
        )

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor
    ) -> torch.Tensor:
        """latents [B, 4, h, w], timesteps [B] or scalar, context [r*B, 77, context_dim] -> eps [r*B, ...].

        With r > 1 each latent is paired with r contexts, in the order of torch.cat([x] * r), and what comes
        before the first cross-attention (conv_in, the first ResBlock, the first self-attention: ~6 % of the
        work at 512x512) runs once per latent: CFG's latents with their [uncond; cond] contexts. The result
        is that of the latents repeated, up to rounding (oneDNN rounds other batch sizes differently).
        """
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != x.shape[:1] or context.shape[0] % x.shape[0]:
            raise ValueError(f"the U-Net takes latents [B, ...], timesteps [B] and context [r*B, ...]; got "
                             f"{x.shape[0]} latents, {timesteps.shape[0]} timesteps, "
                             f"{context.shape[0]} contexts")
        # Rows are repeated here and nowhere else: x has a row per latent until the first cross-attention,
        # then a row per context. Each repeat_rows is a no-op when the latents come repeated.
        rows = context.shape[0]
        # A row per context, as for repeated latents: MKL rounds small matmuls differently at other sizes.
        timesteps = repeat_rows(timesteps, rows)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.block_channels[0]).to(x.dtype))

        # A stage (input_blocks.i, middle_block, output_blocks.i) is an nn.Sequential for the checkpoint's
        # names; its layers take the time embedding (ResBlock), the text (SpatialTransformer) or the size of
        # the next skip connection (Upsample).
        def run(stage: nn.Sequential, x: torch.Tensor, skip_size: torch.Size | None = None) -> torch.Tensor:
            for layer in stage:
                if isinstance(layer, ResBlock):
                    x = layer(x, emb)
                elif isinstance(layer, SpatialTransformer):
                    # The text enters here; at the first transformer the self-attention is still per latent.
                    tokens = layer.attend_self(x)
                    x = layer.attend_text(repeat_rows(tokens, rows), repeat_rows(x, rows), context)
                elif isinstance(layer, Upsample):
                    x = layer(x, skip_size)
                else:
                    x = layer(x)
            return x

        skips = []
        for stage in self.input_blocks:
            x = run(stage, x)
            skips.append(x)
        x = run(self.middle_block, x)
        for stage in self.output_blocks:
            x = torch.cat([x, repeat_rows(skips.pop(), rows)], dim=1)
            x = run(stage, x, skips[-1].shape[2:] if skips else None)
        return self.out(x)
