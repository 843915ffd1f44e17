"""sdcore's CLIP, VAE and U-Net compute what transformers/diffusers compute, given the same weights.

The weights are scaled random ones (sdcore.models.scaled_init_) put into the reference models, then loaded
into sdcore by name through the original checkpoint layout. Tolerance: max abs error <= 1e-4 x output std
(diffusers differs from itself by ~1e-5 when its attention backend changes).
"""

import dataclasses

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from sdcore.checkpoints.layout import ORIGINAL_PREFIXES
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.models import AutoencoderKL, CLIPTextModel, UNetModel, scaled_init_
from tests.reference import (
    diffusers_config_for,
    original_layout,
    reference_text_encoder,
    reference_unet,
    reference_vae,
    sdcore_model,
)

RELATIVE_TOLERANCE = 1e-4


def assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor) -> None:
    error, scale = (ours - reference).abs().max().item(), reference.std().item()
    message = f"max abs error {error:.3g} > {RELATIVE_TOLERANCE} x output std {scale:.3g}"
    assert error <= RELATIVE_TOLERANCE * scale, message


def token_ids(batch: int, seed: int, length: int = 77) -> torch.Tensor:
    """Ids shaped like the tokenizer's: start token, prompt tokens, end token, end-token padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), 49407)
    ids[:, 0] = 49406
    for row in range(batch):
        n = 5 + 20 * row
        ids[row, 1 : 1 + n] = torch.randint(0, 49406, (n,), generator=g)
    return ids


@pytest.fixture(scope="module")
def clip_pair():
    reference = reference_text_encoder(tiny_clip(), seed=1)
    return reference, sdcore_model("text_encoder", reference, tiny_clip())


@pytest.fixture(scope="module")
def vae_pair():
    reference = reference_vae(tiny_vae(), seed=2)
    return reference, sdcore_model("vae", reference, tiny_vae())


@pytest.fixture(scope="module")
def unet_pair():
    reference = reference_unet(tiny_unet(), seed=3)
    return reference, sdcore_model("unet", reference, tiny_unet())


@torch.no_grad()
def test_text_encoder_matches_transformers(clip_pair):
    reference, ours = clip_pair
    ids = token_ids(batch=3, seed=0)
    assert_close_to_reference(ours(ids), reference(ids).last_hidden_state)


@torch.no_grad()
def test_text_encoder_rejects_more_than_77_tokens(clip_pair):
    _, ours = clip_pair
    with pytest.raises(ValueError, match="length 78.*max_positions=77"):
        ours(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("timesteps", [0, 1, 500, 999, [10, 900]], ids=str)
@torch.no_grad()
def test_unet_matches_diffusers(unet_pair, timesteps):
    reference, ours = unet_pair
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, tiny_unet().context_dim, generator=g)
    t = torch.tensor(timesteps)
    assert_close_to_reference(ours(latents, t, context), reference(latents, t, context).sample)


@torch.no_grad()
def test_unet_matches_diffusers_on_latent_sides_not_divisible_by_8(unet_pair):
    reference, ours = unet_pair
    g = torch.Generator().manual_seed(16)
    latents = torch.randn(1, 4, 9, 10, generator=g)  # a 72x80 image
    context = torch.randn(1, 77, tiny_unet().context_dim, generator=g)
    eps = ours(latents, 300, context)
    assert eps.shape == latents.shape
    assert_close_to_reference(eps, reference(latents, 300, context).sample)


@torch.no_grad()
def test_unet_takes_a_python_scalar_timestep(unet_pair):
    _, ours = unet_pair
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, tiny_unet().context_dim)
    assert torch.equal(ours(latents, 250, context), ours(latents, torch.tensor([250, 250]), context))


@pytest.mark.parametrize("attention_levels", [(True, True, True, False), (False, False, False, False)],
                         ids=["sd15", "attention-only-in-the-middle"])
@torch.no_grad()
def test_unet_pairs_each_latent_with_its_contexts(unet_pair, attention_levels):
    """CFG passes its latents once for [uncond; cond] contexts: the same numbers as the latents repeated."""
    reference, ours = unet_pair
    if not attention_levels[0]:
        cfg = dataclasses.replace(tiny_unet(), attention_levels=attention_levels)
        reference = reference_unet(cfg, seed=3)
        ours = sdcore_model("unet", reference, cfg)
    g = torch.Generator().manual_seed(17)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(4, 77, tiny_unet().context_dim, generator=g)
    t = torch.tensor([10, 900])
    shared = ours(latents, t, context)
    repeated = torch.cat([latents, latents])
    if attention_levels[0]:
        assert torch.equal(shared, ours(repeated, t.repeat(2), context))
    else:
        # The shared part reaches the middle block's 1x1 map, whose 2-row matmuls MKL rounds differently
        # from 4-row ones; at SD 1.5's first transformer (>= 64 tokens) the rows are many and the same.
        torch.testing.assert_close(shared, ours(repeated, t.repeat(2), context), rtol=0, atol=1e-5)
    assert_close_to_reference(shared, reference(repeated, t.repeat(2), context).sample)


@torch.no_grad()
def test_unet_runs_what_comes_before_the_text_once_per_latent(unet_pair):
    """The saving of CFG's shared start: conv_in, the first ResBlock and the first self-attention see the 2
    latents; the first cross-attention and all after it see the 4 latent-context pairs."""
    _, ours = unet_pair
    first_block = ours.input_blocks[1][1].transformer_blocks[0]
    watched = {"conv_in": ours.input_blocks[0][0], "first ResBlock": ours.input_blocks[1][0],
               "first self-attention": first_block.attn1, "first cross-attention": first_block.attn2,
               "output": ours.out}
    rows = {}
    hooks = [module.register_forward_hook(lambda _, args, out, name=name: rows.update({name: out.shape[0]}))
             for name, module in watched.items()]
    try:
        ours(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(4, 77, tiny_unet().context_dim))
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {"conv_in": 2, "first ResBlock": 2, "first self-attention": 2, "first cross-attention": 4,
                    "output": 4}


@torch.no_grad()
def test_unet_names_mismatched_rows(unet_pair):
    _, ours = unet_pair
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(3, 77, tiny_unet().context_dim)
    with pytest.raises(ValueError, match="2 latents, 2 timesteps, 3 contexts"):
        ours(latents, 500, context)
    with pytest.raises(ValueError, match="2 latents, 4 timesteps, 4 contexts"):
        ours(latents, torch.tensor([1, 2, 3, 4]), torch.cat([context[:2]] * 2))


@torch.no_grad()
def test_vae_encode_mean_matches_diffusers(vae_pair):
    reference, ours = vae_pair
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert_close_to_reference(ours.encode_mean(images), reference.encode(images).latent_dist.mean)


@torch.no_grad()
def test_vae_posterior_matches_diffusers(vae_pair):
    reference, ours = vae_pair
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    expected = reference.encode(images).latent_dist.sample(torch.Generator().manual_seed(7))
    assert_close_to_reference(ours.encode(images).sample([torch.Generator().manual_seed(7)]), expected)


@torch.no_grad()
def test_vae_decode_matches_diffusers(vae_pair):
    reference, ours = vae_pair
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8)) / 0.18215
    assert_close_to_reference(ours.decode(latents), reference.decode(latents).sample)


def test_sdcore_modules_carry_exactly_the_original_names(unet_pair, vae_pair, clip_pair):
    pairs = {"unet": unet_pair, "vae": vae_pair, "text_encoder": clip_pair}
    for component, (reference, ours) in pairs.items():
        assert set(ours.state_dict()) == set(original_layout(component, reference)), component


def test_scaled_init_is_deterministic_per_seed():
    first, again, other = (scaled_init_(UNetModel(tiny_unet()), seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["out.2.weight"], other["out.2.weight"])


@torch.no_grad()
def test_scaled_init_gives_trained_like_activations():
    clip = scaled_init_(CLIPTextModel(tiny_clip()), seed=0)
    unet = scaled_init_(UNetModel(tiny_unet()), seed=0)
    vae = scaled_init_(AutoencoderKL(tiny_vae()), seed=0)
    context = clip(token_ids(batch=2, seed=1))
    other_prompt = clip(token_ids(batch=2, seed=2))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    eps = unet(latents, 500, context)
    assert_nondegenerate(context, eps, unet(latents, 100, context), unet(latents, 500, other_prompt))
    decoded = vae.decode(latents / 0.18215)
    assert (decoded.abs() <= 1).float().mean() > 0.6, "VAE decode should sit mostly in [-1, 1]"


def assert_nondegenerate(context, eps, eps_other_t, eps_other_prompt):
    assert 0.5 < context.std() < 2 and context.abs().max() < 20, "CLIP hidden states should be O(1)"
    assert 0.4 < eps.std() < 2.5, f"U-Net output std {eps.std():.3g} should be near 1"
    assert (eps_other_t - eps).std() > 0.05 * eps.std(), "the timestep should change the U-Net output"
    assert (eps_other_prompt - eps).std() > 0.05 * eps.std(), "the prompt should change the U-Net output"


# Key counts of the real v1-5-pruned-emaonly.ckpt (weights only), and a few of its shapes.
SD15_KEY_COUNTS = {"unet": 686, "vae": 248, "text_encoder": 196}
SD15_SHAPES = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
}
SD15_CONFIGS = {"text_encoder": CLIPConfig(), "vae": VAEConfig(), "unet": UNetConfig()}
SD15_REFERENCES = {"text_encoder": reference_text_encoder, "vae": reference_vae, "unet": reference_unet}


def sd15_pair(component: str):
    """Reference and sdcore model at full SD 1.5 size, after checking the keys are those of v1.5's file
    and that diffusers' own converter maps them back to the reference's names."""
    reference = SD15_REFERENCES[component](SD15_CONFIGS[component], seed=10)
    original, prefix = original_layout(component, reference), ORIGINAL_PREFIXES[component]
    assert len(original) == SD15_KEY_COUNTS[component]
    for key, shape in SD15_SHAPES.items():
        if key.startswith(prefix):
            assert tuple(original[key.removeprefix(prefix)].shape) == shape, key
    checkpoint = {prefix + k: v for k, v in original.items()}
    if component == "unet":
        converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config_for(SD15_CONFIGS[component]))
    elif component == "vae":
        converted = convert_ldm_vae_checkpoint(checkpoint, diffusers_config_for(SD15_CONFIGS[component]))
    else:  # transformers 5 names the text encoder's weights without the converter's `text_model.` prefix
        converted = {
            k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()
        }
    assert sorted(converted) == sorted(reference.state_dict())
    return reference, sdcore_model(component, reference, SD15_CONFIGS[component])


@pytest.mark.slow
@torch.no_grad()
def test_sd15_text_encoder_has_v1_5_keys_and_matches_transformers():
    reference, ours = sd15_pair("text_encoder")
    ids = token_ids(batch=2, seed=13)
    hidden = ours(ids)
    assert 0.5 < hidden.std() < 2 and hidden.abs().max() < 50
    assert_close_to_reference(hidden, reference(ids).last_hidden_state)


@pytest.mark.slow
@torch.no_grad()
def test_sd15_vae_has_v1_5_keys_and_matches_diffusers():
    reference, ours = sd15_pair("vae")
    g = torch.Generator().manual_seed(14)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g) / 0.18215
    assert_close_to_reference(ours.encode_mean(images), reference.encode(images).latent_dist.mean)
    decoded = ours.decode(latents)
    assert (decoded.abs() <= 1).float().mean() > 0.6, "VAE decode should sit mostly in [-1, 1]"
    assert_close_to_reference(decoded, reference.decode(latents).sample)


@pytest.mark.slow
@torch.no_grad()
def test_sd15_unet_has_v1_5_keys_and_matches_diffusers():
    reference, ours = sd15_pair("unet")
    g = torch.Generator().manual_seed(15)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([20, 980])
    eps = ours(latents, t, context)
    assert_nondegenerate(context, eps, ours(latents, t.flip(0), context), ours(latents, t, context.flip(0)))
    assert_close_to_reference(eps, reference(latents, t, context).sample)
