"""Reference models for parity tests: diffusers/transformers twins of sdcore configs, scaled random weights.

    from tests.reference import reference_unet, original_state_dict, sdcore_model

    unet = reference_unet(tiny_unet(), seed=0)       # diffusers.UNet2DConditionModel, eval, fp32
    sd = original_state_dict(unet=unet, vae=vae)     # keys as in v1-5-pruned-emaonly.ckpt
    ours = sdcore_model("unet", unet, tiny_unet())   # sdcore.models.UNetModel with the same weights
"""

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as TransformersCLIPTextModel

from sdcore.checkpoints.layout import ORIGINAL_PREFIXES, diffusers_to_original
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig
from sdcore.models import AutoencoderKL, CLIPTextModel, UNetModel, scaled_init_

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip


def diffusers_config_for(cfg: UNetConfig | VAEConfig | CLIPConfig) -> dict:
    """Constructor kwargs of the diffusers/transformers model equivalent to an sdcore config."""
    if isinstance(cfg, UNetConfig):
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
        return dict(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=cfg.block_channels,
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.heads,  # diffusers' legacy name: for SD 1.x it is the number of heads
            cross_attention_dim=cfg.context_dim,
            norm_num_groups=cfg.norm_groups,
        )
    if isinstance(cfg, VAEConfig):
        levels = len(cfg.block_channels)
        return dict(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=cfg.block_channels,
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_groups,
            scaling_factor=cfg.scaling_factor,
        )
    if isinstance(cfg, CLIPConfig):
        return dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.max_positions,
            hidden_act="quick_gelu",
            layer_norm_eps=cfg.layer_norm_eps,
            projection_dim=768,
            pad_token_id=1,  # as in SD 1.5's text_encoder/config.json
            bos_token_id=0,
            eos_token_id=2,
        )
    raise TypeError(f"cfg is a {type(cfg).__name__}; expected UNetConfig, VAEConfig or CLIPConfig")


def reference_unet(cfg: UNetConfig, seed: int) -> UNet2DConditionModel:
    """A diffusers U-Net shaped like `cfg`, with scaled random weights, in eval mode."""
    return _scaled_without_default_init(UNet2DConditionModel, cfg, seed)


def reference_vae(cfg: VAEConfig, seed: int) -> DiffusersAutoencoderKL:
    """A diffusers AutoencoderKL shaped like `cfg`, with scaled random weights, in eval mode."""
    return _scaled_without_default_init(DiffusersAutoencoderKL, cfg, seed)


def _scaled_without_default_init(model_class, cfg, seed: int):
    # Built on the meta device: torch's default init of an SD-sized model costs seconds and is overwritten.
    with torch.device("meta"):
        model = model_class(**diffusers_config_for(cfg))
    if any(True for _ in model.buffers()):
        raise TypeError(f"{model_class.__name__} has buffers that to_empty() would leave uninitialised")
    return scaled_init_(model.to_empty(device="cpu"), seed).eval()


def reference_text_encoder(cfg: CLIPConfig, seed: int) -> TransformersCLIPTextModel:
    """A transformers CLIPTextModel shaped like `cfg`, with scaled random weights, in eval mode."""
    model = TransformersCLIPTextModel(CLIPTextConfig(**diffusers_config_for(cfg)))
    return scaled_init_(model, seed).eval()


def original_layout(component: str, reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A reference model's weights under original names, without the checkpoint prefix."""
    return diffusers_to_original(component, reference.state_dict())


def original_state_dict(unet=None, vae=None, text_encoder=None, non_weights: bool = False) -> dict:
    """The reference models' weights as a single-file checkpoint holds them (full key prefixes).

    With non_weights=True it also holds the 15 entries of v1-5-pruned-emaonly.ckpt that are not weights
    (12 schedule buffers, the text encoder's position_ids, model_ema.decay / num_updates).
    """
    checkpoint = {}
    for component, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        if model is not None:
            prefix = ORIGINAL_PREFIXES[component]
            checkpoint.update({prefix + k: v for k, v in original_layout(component, model).items()})
    if non_weights:
        checkpoint.update(checkpoint_non_weights())
    return checkpoint


def checkpoint_non_weights() -> dict[str, torch.Tensor]:
    """The non-weight entries of v1-5-pruned-emaonly.ckpt, computed as the original LatentDiffusion does."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = (
        betas, alphas_cumprod, prev, alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt(),
        (1.0 - alphas_cumprod).log(), (1.0 / alphas_cumprod).sqrt(), (1.0 / alphas_cumprod - 1).sqrt(),
        posterior_variance, posterior_variance.clamp(min=1e-20).log(),
        betas * prev.sqrt() / (1.0 - alphas_cumprod),
        (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    )  # fmt: skip
    entries = {name: value.float() for name, value in zip(SCHEDULE_BUFFERS, values, strict=True)}
    entries[ORIGINAL_PREFIXES["text_encoder"] + "embeddings.position_ids"] = torch.arange(77)[None]
    entries["model_ema.decay"] = torch.tensor(0.9999)
    entries["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return entries


def sdcore_model(component: str, reference: torch.nn.Module, cfg) -> torch.nn.Module:
    """The sdcore model for `cfg`, loaded strictly by name from the reference's original-layout weights.

    The parameters share the reference's storage (no copy: full-size pairs stay within one model's memory),
    so do not modify either model's weights in place.
    """
    with torch.device("meta"):
        model = {"unet": UNetModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component](cfg)
    model.load_state_dict(original_layout(component, reference), strict=True, assign=True)
    return model.eval()
