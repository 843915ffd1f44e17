"""A VAE from its own file replaces the checkpoint's: each layout decodes as diffusers' AutoencoderKL loaded
from the same file (`from_single_file`, offline with a config), bad files get errors naming the file."""

import gc
import hashlib
import json
import pickle

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdcore.checkpoints import diffusers_config, load_components, load_vae
from sdcore.config import VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.errors import CheckpointError
from tests.fixtures_checkpoints import build_references, half, write_ckpt, write_safetensors
from tests.reference import original_layout, original_state_dict, reference_vae
from tests.test_models import assert_close_to_reference

VAE = "first_stage_model."


def training_leftovers() -> dict:
    """What vae-ft-mse-840000-ema-pruned.ckpt holds besides the autoencoder: LPIPS / discriminator weights
    of the loss and the EMA counters (A1111 skips both)."""
    return {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
            "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}


@pytest.fixture(scope="module")
def vae_ref():
    return reference_vae(tiny_vae(), seed=40)


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A config.json for from_single_file, so diffusers never asks the Hub for one."""
    folder = tmp_path_factory.mktemp("vae-config")
    (folder / "config.json").write_text(json.dumps(diffusers_config("vae", tiny_vae())))
    return folder


@pytest.fixture(scope="module")
def vae_files(vae_ref, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vaes")
    weights = original_layout("vae", vae_ref)
    refs = build_references(tiny_unet(), tiny_vae(), tiny_clip(), seed=41)
    checkpoint = original_state_dict(unet=refs["unet"], vae=vae_ref, text_encoder=refs["text_encoder"])
    folder = tmp / "diffusers-folder"
    vae_ref.save_pretrained(folder / "vae")
    return {
        "ft-mse-ckpt": write_ckpt(tmp / "vae-ft-mse.ckpt", {**weights, **training_leftovers()}),
        "safetensors": write_safetensors(tmp / "plain.vae.safetensors", weights),
        "prefixed-pt": write_ckpt(tmp / "prefixed.vae.pt", {VAE + k: v for k, v in weights.items()}),
        "fp16": write_safetensors(tmp / "half.safetensors", half(weights)),
        "whole-checkpoint": write_safetensors(tmp / "model.safetensors", checkpoint),
        "diffusers-file": write_safetensors(tmp / "diffusers.safetensors", vae_ref.state_dict()),
        "diffusers-folder": folder,
    }


def latents(seed: int = 42) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) / 0.18215


@pytest.mark.parametrize("fmt", ["ft-mse-ckpt", "safetensors", "prefixed-pt", "whole-checkpoint"])
@torch.no_grad()
def test_original_layout_files_decode_as_diffusers_from_single_file(vae_files, config_folder, fmt):
    reference = DiffusersAutoencoderKL.from_single_file(str(vae_files[fmt]), config=str(config_folder),
                                                        local_files_only=True).eval()
    z = latents()
    expected = reference.decode(z).sample
    assert_close_to_reference(load_vae(vae_files[fmt]).decode(z), expected)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(43)) * 2 - 1
    assert_close_to_reference(load_vae(vae_files[fmt]).encode_mean(images),
                              reference.encode(images).latent_dist.mean)


@pytest.mark.parametrize("fmt", ["diffusers-file", "diffusers-folder"])
@torch.no_grad()
def test_diffusers_layout_files_decode_as_the_model_that_wrote_them(vae_files, vae_ref, fmt):
    z = latents()
    assert_close_to_reference(load_vae(vae_files[fmt]).decode(z), vae_ref.decode(z).sample)


def test_old_diffusers_attention_names_load(vae_files, vae_ref, tmp_path):
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in vae_ref.state_dict().items()}
    vae = load_vae(write_safetensors(tmp_path / "old.safetensors", old))
    expected = load_vae(vae_files["diffusers-file"]).state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in vae.state_dict().items())


def test_dtype_is_the_one_asked_for(vae_files):
    assert next(load_vae(vae_files["fp16"]).parameters()).dtype == torch.float32
    assert {p.dtype for p in load_vae(vae_files["safetensors"], dtype=torch.float16).parameters()} == {
        torch.float16}


@torch.no_grad()
def test_load_components_takes_the_vae_file_and_records_it(vae_files, vae_ref, tmp_path):
    other = build_references(tiny_unet(), tiny_vae(), tiny_clip(), seed=50)
    checkpoint = write_safetensors(tmp_path / "checkpoint.safetensors", original_state_dict(**other))
    vae_file = vae_files["ft-mse-ckpt"]
    parts = load_components(checkpoint, vae=vae_file)
    z = latents()
    assert_close_to_reference(parts.vae.decode(z), vae_ref.decode(z).sample)
    assert parts.vae_file.name == "vae-ft-mse.ckpt" and parts.vae_file.vae is parts.vae
    assert parts.vae_file.sha256 == hashlib.sha256(vae_file.read_bytes()).hexdigest()
    assert parts.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    own = load_components(checkpoint)
    assert own.vae_file is None
    assert not torch.equal(own.vae.decoder.conv_out.weight, parts.vae.decoder.conv_out.weight)
    assert next(load_components(checkpoint, vae=vae_file, dtype=torch.float16).vae.parameters()).dtype == (
        torch.float16)
    random = load_components("tiny-random", vae=vae_files["safetensors"])
    assert_close_to_reference(random.vae.decode(z), vae_ref.decode(z).sample)


def test_a_bad_vae_file_fails_before_the_checkpoint_is_read(vae_files, tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such file or folder"):
        load_components(tmp_path / "no-checkpoint-either.safetensors", vae=tmp_path / "missing.safetensors")


def test_missing_and_mis_shaped_keys_are_named(vae_ref, tmp_path):
    weights = original_layout("vae", vae_ref)
    missing = {k: v for k, v in weights.items() if k != "decoder.conv_out.weight"}
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: not a Stable Diffusion VAE as sdcore "
                                              r"expects it: missing 1 of \d+ VAE weights "
                                              r"\(decoder\.conv_out\.weight\)"):
        load_vae(write_safetensors(tmp_path / "missing.safetensors", missing))
    wrong = {**weights, "post_quant_conv.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(CheckpointError, match=r"1 VAE shape mismatches \(post_quant_conv\.weight expected "
                                              r"\[4, 4, 1, 1\], found \[4, 4, 3, 3\]\)"):
        load_vae(write_safetensors(tmp_path / "wrong.safetensors", wrong))


def test_a_file_without_a_vae_is_refused(vae_files, tmp_path):
    unet_only = {k: v for k, v in original_state_dict(**build_references(
        tiny_unet(), tiny_vae(), tiny_clip())).items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match=r"unet\.safetensors: .*missing \d+ of \d+ VAE weights "
                                              r".*unexpected VAE keys \(model\.diffusion_model\."):
        load_vae(write_safetensors(tmp_path / "unet.safetensors", unet_only))
    unknown = {"encoder.mid_block.gate.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: a diffusers-layout VAE with a key sdcore "
                                              r"does not know: .*'encoder\.mid_block\.gate\.weight'"):
        load_vae(write_safetensors(tmp_path / "odd.safetensors", unknown))


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.vae.pt"
    path.write_bytes(pickle.dumps({"state_dict": {"encoder.conv_in.weight": Payload()}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load: its pickle would call (builtins\.)?print"):
        load_vae(path)


@pytest.mark.slow
@torch.no_grad()
def test_sd15_sized_ft_mse_layout_vae_decodes_as_diffusers(tmp_path):
    """The layout of vae-ft-mse-840000-ema-pruned.ckpt at full size: 248 weights (no prefix) under
    "state_dict", with the loss's weights and the EMA counters next to them."""
    reference = reference_vae(VAEConfig(), seed=44)
    weights = original_layout("vae", reference)
    assert len(weights) == 248
    path = write_ckpt(tmp_path / "vae-ft-mse-840000-ema-pruned.ckpt", {**weights, **training_leftovers()})
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(diffusers_config("vae", VAEConfig())))
    from_file = DiffusersAutoencoderKL.from_single_file(str(path), config=str(tmp_path / "config"),
                                                        local_files_only=True).eval()
    del reference
    gc.collect()
    z = latents(45)
    expected = from_file.decode(z).sample
    decoded = load_vae(path).decode(z)
    print(f"\nSD 1.5 VAE from file: decode max abs error {(decoded - expected).abs().max():.3g} "
          f"(std {expected.std():.3g})")
    assert (decoded.abs() <= 1).float().mean() > 0.6, "VAE decode should sit mostly in [-1, 1]"
    assert_close_to_reference(decoded, expected)
