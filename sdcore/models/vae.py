"""KL autoencoder of SD 1.5: images in [-1, 1] <-> unscaled latents (8x smaller, 4 channels).

Attribute names follow `first_stage_model.*` of the original checkpoint. The 0.18215 scaling factor
(VAEConfig.scaling_factor) is the pipeline's business, not the modules'.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..noise import randn
from .attention import attention

NORM_EPS = 1e-6  # the original autoencoder's GroupNorm eps (the U-Net ResBlocks use torch's 1e-5)


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior over latents."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """A draw from each image's posterior, row k from generators[k] (in the posterior's dtype, as
        diffusers draws it; a CPU generator gives the same latents on any device)."""
        noise = randn(generators, self.mean.shape[1:], self.mean.dtype, self.mean.device)
        return self.mean + self.std * noise


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the original."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=NORM_EPS)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # A 1x1 conv is a linear map per pixel: apply the conv weights to one contiguous token copy instead
        # of making three strided token views from three conv outputs.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = (F.linear(tokens, proj.weight.flatten(1), proj.bias) for proj in (self.q, self.k, self.v))
        out = F.linear(attention(q, k, v, heads=1), self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original pads right/bottom only before the unpadded stride-2 conv.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: resnets `block`, then the resampler where the level has one, under the name the
    checkpoint gives it (`encoder.down.i.downsample`, `decoder.up.i.upsample`)."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, resampler_name: str,
                 resampler: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n_blocks)
        )
        self.resampler_name = resampler_name
        setattr(self, resampler_name, resampler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resampler = getattr(self, self.resampler_name)
        return resampler(x) if resampler is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, last = cfg.block_channels, cfg.norm_groups, len(cfg.block_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g,
                  "downsample", Downsample(ch) if i < last else None)
            for i, ch in enumerate(chs)
        )
        self.mid = MidBlock(chs[-1], g)
        self.norm_out = nn.GroupNorm(g, chs[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, last = cfg.block_channels, cfg.norm_groups, len(cfg.block_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[-1], 3, padding=1)
        self.mid = MidBlock(chs[-1], g)
        # up.i works at the resolution of down.i, so the decoder runs up.N-1 ... up.0.
        self.up = nn.ModuleList(
            Level(chs[min(i + 1, last)], ch, cfg.layers_per_block + 1, g,
                  "upsample", Upsample(ch) if i > 0 else None)
            for i, ch in enumerate(chs)
        )
        self.norm_out = nn.GroupNorm(g, chs[0], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
