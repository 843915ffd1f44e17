"""The layout rules of sdcore.checkpoints.layout agree with diffusers' own single-file converters and
invert exactly."""

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from sdcore.checkpoints.layout import ORIGINAL_PREFIXES, diffusers_to_original, original_to_diffusers
from sdcore.config import UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from tests.reference import (
    diffusers_config_for,
    original_layout,
    reference_text_encoder,
    reference_unet,
    reference_vae,
)

# Shapes unlike SD 1.5 (3 levels, no attention at level 0, 1 resnet per level), so the rules must read the
# block structure from the keys rather than assume SD 1.5's.
ODD_UNET = UNetConfig(
    block_channels=(32, 64, 64), attention_levels=(False, True, True), layers_per_block=1, context_dim=64,
    norm_groups=8,
)  # fmt: skip
ODD_VAE = VAEConfig(block_channels=(32, 64, 64), layers_per_block=1, norm_groups=8)

BUILDERS = {"unet": reference_unet, "vae": reference_vae, "text_encoder": reference_text_encoder}
TINY = {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": tiny_clip()}


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    unequal = [k for k, v in expected.items() if actual[k].shape != v.shape or not torch.equal(actual[k], v)]
    assert not unequal, f"{len(unequal)} tensors differ, first: {unequal[:3]}"


def diffusers_layout(component: str, seed: int) -> dict:
    """A tiny reference model's state dict as diffusers' converter names it."""
    state_dict = BUILDERS[component](TINY[component], seed).state_dict()
    if component == "text_encoder":  # transformers 5 drops the prefix that diffusers' converter writes
        return {"text_model." + k: v for k, v in state_dict.items()}
    return state_dict


def with_prefix(component: str, state_dict: dict) -> dict:
    return {ORIGINAL_PREFIXES[component] + k: v for k, v in state_dict.items()}


@pytest.mark.parametrize("cfg", [tiny_unet(), ODD_UNET], ids=["tiny", "odd"])
def test_unet_rules_agree_with_diffusers_converter(cfg):
    reference = reference_unet(cfg, seed=0)
    original = original_layout("unet", reference)

    theirs = convert_ldm_unet_checkpoint(with_prefix("unet", original), diffusers_config_for(cfg))

    assert_same_state_dict(original_to_diffusers("unet", original), theirs)
    assert_same_state_dict(theirs, reference.state_dict())


@pytest.mark.parametrize("cfg", [tiny_vae(), ODD_VAE], ids=["tiny", "odd"])
def test_vae_rules_agree_with_diffusers_converter(cfg):
    reference = reference_vae(cfg, seed=0)
    original = original_layout("vae", reference)

    theirs = convert_ldm_vae_checkpoint(with_prefix("vae", original), diffusers_config_for(cfg))

    assert_same_state_dict(original_to_diffusers("vae", original), theirs)
    assert_same_state_dict(theirs, reference.state_dict())


def test_text_encoder_rules_agree_with_diffusers_converter():
    diffusers_sd = diffusers_layout("text_encoder", seed=0)
    original = diffusers_to_original("text_encoder", diffusers_sd)

    theirs = convert_ldm_clip_checkpoint(with_prefix("text_encoder", original))

    assert_same_state_dict(original_to_diffusers("text_encoder", original), theirs)
    assert_same_state_dict(theirs, diffusers_sd)


@pytest.mark.parametrize("component", list(TINY))
def test_round_trips_are_identity(component):
    diffusers_sd = diffusers_layout(component, seed=1)
    original = diffusers_to_original(component, diffusers_sd)
    back_to_original = diffusers_to_original(component, original_to_diffusers(component, original))

    assert_same_state_dict(back_to_original, original)
    assert_same_state_dict(original_to_diffusers(component, original), diffusers_sd)


def test_text_encoder_keys_are_accepted_with_or_without_text_model_prefix():
    with_text_model = diffusers_layout("text_encoder", seed=2)
    without = {k.removeprefix("text_model."): v for k, v in with_text_model.items()}

    original = diffusers_to_original("text_encoder", without)
    assert_same_state_dict(original, diffusers_to_original("text_encoder", with_text_model))
    assert "embeddings.token_embedding.weight" in original


def test_vae_mid_attention_is_conv_in_original_layout_and_linear_in_diffusers():
    diffusers_sd = reference_vae(tiny_vae(), seed=3).state_dict()
    original = diffusers_to_original("vae", diffusers_sd)

    assert original["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert diffusers_sd["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)
    assert original["encoder.mid.attn_1.q.bias"].shape == (64,)


def test_diffusers_up_blocks_run_in_reverse_order_of_original_up_levels():
    original = diffusers_to_original("vae", reference_vae(tiny_vae(), seed=4).state_dict())

    # up.0 works at full resolution (32 channels, no upsampler); diffusers' up_blocks.3 is that level
    assert "decoder.up.0.upsample.conv.weight" not in original
    assert original["decoder.up.0.block.0.conv1.weight"].shape[0] == 32
    assert original["decoder.up.3.upsample.conv.weight"].shape[0] == 64


def test_unknown_component_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match="component 'clip' is not one of unet, vae, text_encoder"):
        original_to_diffusers("clip", {})


def test_unknown_key_is_named():
    original = original_layout("unet", reference_unet(tiny_unet(), seed=5))
    original["label_emb.0.0.weight"] = torch.zeros(1)

    with pytest.raises(ValueError, match="unet key 'label_emb.0.0.weight' is not a known original-layout"):
        original_to_diffusers("unet", original)
