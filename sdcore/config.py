"""Model dimensions: one dataclass per model, Stable Diffusion 1.5 by default, tiny variants for tests."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CLIPConfig:
    """The CLIP ViT-L/14 text tower that SD 1.5 conditions on."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _require_divisible("CLIPConfig.width", self.width, "heads", self.heads)


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (8x spatial downsampling, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    # Applied by the pipeline (latents * scaling_factor go to the U-Net), never inside the modules.
    scaling_factor: float = 0.18215

    def __post_init__(self):
        for ch in self.block_channels:
            _require_divisible("VAEConfig.block_channels", ch, "norm_groups", self.norm_groups)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising U-Net; `attention_levels[i]` says whether level i has cross-attention blocks."""

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries; expected one per "
                f"entry of block_channels ({len(self.block_channels)})"
            )
        for ch in self.block_channels:
            _require_divisible("UNetConfig.block_channels", ch, "norm_groups", self.norm_groups)
            _require_divisible("UNetConfig.block_channels", ch, "heads", self.heads)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]


def tiny_clip() -> CLIPConfig:
    """A 2-layer, 64-wide text encoder; keeps the real vocabulary and 77 positions so the tokenizer fits."""
    return CLIPConfig(width=64, layers=2, heads=4, mlp_width=256)


def tiny_vae() -> VAEConfig:
    """Four levels like SD 1.5 (so 8x downsampling holds), narrow channels."""
    return VAEConfig(block_channels=(32, 32, 64, 64), norm_groups=8)


def tiny_unet() -> UNetConfig:
    """Four levels with attention on the first three like SD 1.5; context width matches tiny_clip()."""
    return UNetConfig(block_channels=(32, 64, 64, 64), context_dim=64, norm_groups=8)


def _require_divisible(field: str, value: int, by_field: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{field} value {value} is not divisible by {by_field}={by}; use a multiple of {by}")
