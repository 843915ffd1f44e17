"""Checkpoint loading: each format gives diffusers' outputs, bad files get clear errors, memory stays flat."""

import copy
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdcore.checkpoints import convert_checkpoint, load_components
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.errors import CheckpointError
from sdcore.models import CLIPTextModel, scaled_init_
from sdcore.tokenizer import CLIPTokenizer
from tests.fixtures_checkpoints import (
    build_references,
    ema_name,
    half,
    round_to_half_,
    with_ema_copy,
    write_ckpt,
    write_diffusers_folder,
    write_safetensors,
)
from tests.reference import original_layout, original_state_dict, reference_unet

REPO = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def refs():
    return build_references(tiny_unet(), tiny_vae(), tiny_clip())


@pytest.fixture(scope="module")
def refs_fp16(refs):
    return {name: round_to_half_(copy.deepcopy(model)) for name, model in refs.items()}


@pytest.fixture(scope="module")
def plain_unet():
    """The non-EMA U-Net of the pruned-with-EMA file: another model, so EMA selection is visible."""
    return reference_unet(tiny_unet(), seed=7)


@pytest.fixture(scope="module")
def state_dict(refs):
    return original_state_dict(**refs, non_weights=True)


@pytest.fixture(scope="module")
def files(refs, refs_fp16, plain_unet, state_dict, tmp_path_factory) -> dict[str, Path]:
    """Each format sdcore reads, holding the tiny reference weights (fp16-rounded ones for the fp16 files)."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    fp16_models = {name: copy.deepcopy(model).half() for name, model in refs_fp16.items()}
    return {
        "ckpt": write_ckpt(tmp / "emaonly.ckpt", state_dict),
        "safetensors": write_safetensors(tmp / "emaonly.safetensors", state_dict),
        "fp16": write_safetensors(tmp / "emaonly-fp16.safetensors", half(state_dict)),
        "ema": write_ckpt(tmp / "pruned.ckpt", with_ema_copy(state_dict, refs["unet"], plain_unet)),
        "diffusers": write_diffusers_folder(tmp / "diffusers", **refs, tokenizer=CLIPTokenizer.bundled()),
        "diffusers-fp16": write_diffusers_folder(tmp / "diffusers-fp16", **fp16_models, variant="fp16"),
    }


# ------------------------------------------------------------------------------------------- parity


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    error = (ours - reference).abs().max().item()
    scale = reference.std().item()
    assert error <= 1e-4 * scale, f"{what}: max abs error {error:.3g} > 1e-4 x output std {scale:.3g}"


@torch.no_grad()
def assert_matches_references(components, refs, latent_size=16, image_size=32) -> None:
    """Text encoder, U-Net, VAE encode and decode of `components` give the references' outputs in fp32."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=g)
    timesteps = torch.tensor([10, 700])
    context = torch.randn(2, 77, refs["unet"].config.cross_attention_dim, generator=g)
    images = torch.rand(1, 3, image_size, image_size, generator=g) * 2 - 1
    z = torch.randn(1, 4, image_size // 8, image_size // 8, generator=g)

    assert_close(components.text_encoder(ids), refs["text_encoder"](ids).last_hidden_state, "text encoder")
    assert_close(
        components.unet(latents, timesteps, context),
        refs["unet"](latents, timesteps, encoder_hidden_states=context).sample,
        "U-Net",
    )
    assert_close(
        components.vae.encode_mean(images), refs["vae"].encode(images).latent_dist.mean, "VAE encode"
    )
    assert_close(components.vae.decode(z), refs["vae"].decode(z).sample, "VAE decode")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "fp16", "ema", "diffusers", "diffusers-fp16"])
def test_each_format_loads_to_the_reference_outputs_in_fp32(fmt, files, refs, refs_fp16):
    components = load_components(files[fmt])

    assert {
        p.dtype for m in (components.text_encoder, components.unet, components.vae) for p in m.parameters()
    } == {torch.float32}, "fp16 files are upcast to the requested fp32"
    assert not components.is_random
    assert_matches_references(components, refs_fp16 if "fp16" in fmt else refs)


def test_fp32_file_loads_as_fp16_when_asked(files):
    components = load_components(files["safetensors"], dtype=torch.float16)

    assert {p.dtype for p in components.unet.parameters()} == {torch.float16}


def test_old_text_encoder_prefix_without_text_model_loads(state_dict, refs, tmp_path):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state_dict.items()}  # fmt: skip

    components = load_components(write_safetensors(tmp_path / "old.safetensors", old))

    assert_matches_references(components, refs)


def test_diffusers_text_encoder_with_text_model_prefix_loads(files, refs, tmp_path):
    folder = tmp_path / "older-transformers"
    for part in ("unet", "vae", "text_encoder"):
        (folder / part).mkdir(parents=True)
    for part, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ):
        os.link(files["diffusers"] / part / name, folder / part / name)
    with safe_open(files["diffusers"] / "text_encoder" / "model.safetensors", "pt") as f:
        prefixed = {"text_model." + k: f.get_tensor(k) for k in f.keys()}
    write_safetensors(folder / "text_encoder" / "model.safetensors", prefixed)

    assert_matches_references(load_components(folder), refs)


def test_diffusers_folder_brings_its_tokenizer(files):
    folder_tokenizer = CLIPTokenizer.from_folder(files["diffusers"] / "tokenizer")  # only 1,000 merges
    prompt = ["a photograph of an astronaut riding a horse"]
    assert not torch.equal(folder_tokenizer(prompt), CLIPTokenizer.bundled()(prompt)), "fixture must differ"

    assert torch.equal(load_components(files["diffusers"]).tokenizer(prompt), folder_tokenizer(prompt))
    assert torch.equal(
        load_components(files["safetensors"]).tokenizer(prompt), CLIPTokenizer.bundled()(prompt)
    )
    explicit = load_components(files["safetensors"], tokenizer=files["diffusers"] / "tokenizer")
    assert torch.equal(explicit.tokenizer(prompt), folder_tokenizer(prompt))


# ----------------------------------------------------------------------------------------------- EMA


def test_ema_auto_takes_the_ema_copy_and_false_the_plain_weights(files, refs, plain_unet):
    def unet_weights(components):
        return components.unet.state_dict()

    auto, plain = load_components(files["ema"]), load_components(files["ema"], ema=False)

    ema_expected, plain_expected = original_layout("unet", refs["unet"]), original_layout("unet", plain_unet)
    assert all(torch.equal(unet_weights(auto)[k], v) for k, v in ema_expected.items())
    assert all(torch.equal(unet_weights(plain)[k], v) for k, v in plain_expected.items())
    assert torch.equal(auto.vae.decoder.conv_out.weight, plain.vae.decoder.conv_out.weight)


def test_ema_true_requires_an_ema_copy(files):
    """The EMA-only release keeps model_ema.decay/num_updates: two keys are not an EMA copy."""
    no_ema_copy = r"ema=True but the file has no EMA copy of the U-Net: 0 model_ema\.\* weights"
    with pytest.raises(CheckpointError, match=no_ema_copy):
        load_components(files["ckpt"], ema=True)


def test_ema_argument_is_validated(files):
    with pytest.raises(ValueError, match="ema='yes' is not accepted"):
        load_components(files["ckpt"], ema="yes")


def test_ema_copy_with_a_missing_key_names_it(state_dict, refs, plain_unet, tmp_path):
    checkpoint = with_ema_copy(state_dict, refs["unet"], plain_unet)
    del checkpoint[ema_name(UNET + "out.2.weight")]

    with pytest.raises(CheckpointError, match=r"missing 1 of \d+ U-Net \(from the EMA copy\) weights "
                                              r"\(model\.diffusion_model\.out\.2\.weight\)"):  # fmt: skip
        load_components(write_safetensors(tmp_path / "ema.safetensors", checkpoint))


# ------------------------------------------------------------------------------------------ bad files


class WritesMarker:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_that_runs_code_is_refused_and_nothing_runs(state_dict, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": state_dict, "callback": WritesMarker(marker)}, path)

    with pytest.raises(CheckpointError, match=r"refused to load: its pickle would call \S+") as error:
        load_components(path)

    assert str(path) in str(error.value) and "nothing from it ran" in str(error.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the same file with an unsafe loader does run the code
    assert marker.exists()


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _drop_unet_keys(sd, n):
    dropped = [k for k in sd if k.startswith(UNET)][:n]
    return {k: v for k, v in sd.items() if k not in dropped}


BAD_FILES = {
    "missing file": (lambda tmp, sd: tmp / "nowhere.ckpt", ["no such file or folder"]),
    "truncated ckpt": (lambda tmp, sd: _truncate(write_ckpt(tmp / "t.ckpt", sd)), ["truncated or corrupt"]),
    "truncated safetensors": (
        lambda tmp, sd: _truncate(write_safetensors(tmp / "t.safetensors", sd)),
        ["truncated or corrupt safetensors"],
    ),
    "random bytes": (
        lambda tmp, sd: (
            (tmp / "r.ckpt").write_bytes(torch.randint(0, 256, (4096,)).byte().numpy().tobytes())
            and tmp / "r.ckpt"
        ),
        ["not a checkpoint", "4096-byte file"],
    ),
    "empty file": (
        lambda tmp, sd: (tmp / "e.safetensors").write_bytes(b"") or tmp / "e.safetensors",
        ["not a checkpoint"],
    ),
    "pickle of a tensor": (
        lambda tmp, sd: torch.save(torch.ones(3), tmp / "x.ckpt") or tmp / "x.ckpt",
        ["not a checkpoint: the pickle holds a Tensor"],
    ),
    "SDXL key set": (
        lambda tmp, sd: write_safetensors(
            tmp / "xl.safetensors",
            {
                **sd,
                "conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
                UNET + "label_emb.0.0.weight": torch.ones(4, 4),
            },
        ),
        ["looks like an SDXL checkpoint", "conditioner.embedders.1.model.ln_final.weight"],
    ),  # fmt: skip
    "SD 2.x OpenCLIP text encoder": (
        lambda tmp, sd: write_safetensors(
            tmp / "v2.safetensors",
            {
                k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.model."): v
                for k, v in sd.items()
            },
        ),
        ["looks like an SD 2.x checkpoint", "OpenCLIP"],
    ),  # fmt: skip
    "SD 2.x 1024-dim context": (
        lambda tmp, sd: write_safetensors(
            tmp / "v2.safetensors",
            {**sd, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(32, 1024)},
        ),
        ["looks like an SD 2.x checkpoint", "1024-dim context"],
    ),  # fmt: skip
    "missing keys": (
        lambda tmp, sd: write_safetensors(tmp / "m.safetensors", _drop_unet_keys(sd, 7)),
        ["missing 7 of 684 U-Net weights", UNET + "time_embed.0.weight", ", ..."],
    ),
    "unexpected keys": (
        lambda tmp, sd: write_safetensors(
            tmp / "u.safetensors",
            {**sd, UNET + "extra.weight": torch.ones(1), "lora_unet_down.alpha": torch.ones(1)},
        ),
        [
            "1 unexpected U-Net keys (model.diffusion_model.extra.weight)",
            "1 unexpected keys (lora_unet_down.alpha)",
        ],
    ),  # fmt: skip
    "shape mismatch": (
        lambda tmp, sd: write_safetensors(
            tmp / "s.safetensors", {**sd, UNET + "input_blocks.0.0.weight": torch.ones(32, 9, 3, 3)}
        ),
        ["1 U-Net shape mismatches", "input_blocks.0.0.weight expected [32, 4, 3, 3], found [32, 9, 3, 3]"],
    ),  # fmt: skip
    "not stable diffusion at all": (
        lambda tmp, sd: write_safetensors(
            tmp / "bert.safetensors", {"encoder.layer.0.weight": torch.ones(2)}
        ),
        ["missing 196 of 196 text encoder weights", "1 unexpected keys (encoder.layer.0.weight)"],
    ),
    "diffusers folder without weights": (
        lambda tmp, sd: (
            [(tmp / "f" / p).mkdir(parents=True) for p in ("unet", "vae", "text_encoder")] and tmp / "f"
        ),
        ["diffusers folder without weights", "diffusion_pytorch_model.safetensors"],
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_input_gets_a_clear_error_naming_the_file(case, state_dict, tmp_path):
    write, fragments = BAD_FILES[case]
    path = write(tmp_path, state_dict)

    with pytest.raises(CheckpointError) as error:
        load_components(path)

    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_sdxl_diffusers_folder_is_named(tmp_path):
    (tmp_path / "text_encoder_2").mkdir()

    with pytest.raises(CheckpointError, match="looks like an SDXL diffusers folder"):
        load_components(tmp_path)


# ------------------------------------------------------------------------------------ tiny-random, hash


DIGEST_OF_TINY_RANDOM = """
import hashlib, sdcore.checkpoints as c
parts = c.load_components("tiny-random")
digest = hashlib.sha256()
for model in (parts.text_encoder, parts.unet, parts.vae):
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode()); digest.update(tensor.numpy().tobytes())
print(digest.hexdigest())
"""


def test_tiny_random_is_the_same_in_every_process():
    digests = {
        subprocess.run(
            [sys.executable, "-c", DIGEST_OF_TINY_RANDOM],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    }
    parts = load_components("tiny-random")

    assert len(digests) == 1
    assert parts.is_random and parts.sha256 is None and parts.name == "tiny-random"
    assert parts.unet.out[2].weight.std() > 0, "weights are initialised, not left empty"


def test_sha256_is_of_the_file_and_follows_changes(files, tmp_path):
    path = tmp_path / "copy.safetensors"
    path.write_bytes(files["safetensors"].read_bytes())
    components = load_components(path)

    assert components.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert components.name == "copy"
    with open(path, "ab") as f:  # a rewritten file (new size, new mtime) is hashed again
        f.write(b"\0")
    assert components.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_of_a_diffusers_folder_covers_its_weight_files_in_order(files):
    folder = files["diffusers"]
    names = ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip
    weight_files = sorted(folder / name for name in names)

    expected = hashlib.sha256(b"".join(p.read_bytes() for p in weight_files)).hexdigest()
    assert load_components(folder).sha256 == expected


# ------------------------------------------------------------------------------------------- convert


def _weights(components) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in ("text_encoder", "unet", "vae")
            for k, v in getattr(components, name).state_dict().items()}  # fmt: skip


def test_convert_to_original_safetensors_keeps_the_chosen_weights_only(files, tmp_path):
    out = convert_checkpoint(files["ema"], tmp_path / "out.safetensors")

    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model_ema") or k in ("betas", "alphas_cumprod") for k in keys)
    assert len(keys) == 36 + 684 + 244  # tiny text encoder, U-Net, VAE
    source, converted = _weights(load_components(files["ema"])), _weights(load_components(out))
    assert all(torch.equal(source[k], converted[k]) for k in source)


def test_convert_half_stores_fp16(files, refs_fp16, tmp_path):
    out = convert_checkpoint(files["ckpt"], tmp_path / "half.safetensors", half=True)

    with safe_open(out, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert_matches_references(load_components(out), refs_fp16)


def test_convert_to_diffusers_layout_round_trips_and_loads_in_diffusers(files, refs, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel as TransformersCLIPTextModel

    folder = convert_checkpoint(files["ckpt"], tmp_path / "diffusers", layout="diffusers")

    assert_matches_references(load_components(folder), refs)
    back = convert_checkpoint(folder, tmp_path / "back.safetensors")
    source, round_trip = _weights(load_components(files["ckpt"])), _weights(load_components(back))
    assert all(torch.equal(source[k], round_trip[k]) for k in source)
    in_diffusers = {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
        "text_encoder": TransformersCLIPTextModel.from_pretrained(folder / "text_encoder"),
    }
    assert_matches_references(load_components(files["ckpt"]), in_diffusers)


def test_convert_refuses_a_bad_source(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"\x00" * 100)

    with pytest.raises(CheckpointError, match="not a checkpoint"):
        convert_checkpoint(tmp_path / "bad.ckpt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# -------------------------------------------------------------------------------------- peak memory


PEAK_RSS_OF_LOADING = """
import sys
import time
from sdcore.checkpoints import load_components
from sdcore.tokenizer import CLIPTokenizer

def status_bytes(field):  # VmHWM is this process's own peak; ru_maxrss would carry the parent's over fork
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

CLIPTokenizer.bundled()
baseline = status_bytes("VmRSS")
parts = load_components(sys.argv[1])
# Touch every weight as a first generation would: memory-mapped pages count once they are read.
params = [p for m in (parts.text_encoder, parts.unet, parts.vae) for p in m.parameters()]
touched = sum(float(p.sum()) for p in params)
print(sum(p.numel() * p.element_size() for p in params), status_bytes("VmHWM") - baseline)
"""


@pytest.fixture(scope="module")
def medium_files(tmp_path_factory):
    """The full-size SD 1.5 text encoder (0.49 GB) with the tiny U-Net and VAE: large enough to see copies."""
    tmp = tmp_path_factory.mktemp("medium")
    text_encoder = scaled_init_(CLIPTextModel(CLIPConfig()), seed=0)
    small = build_references(tiny_unet(), tiny_vae(), tiny_clip())
    sd = original_state_dict(unet=small["unet"], vae=small["vae"], non_weights=True)
    sd.update(
        {"cond_stage_model.transformer.text_model." + k: v for k, v in text_encoder.state_dict().items()}
    )
    files = {
        "ckpt": write_ckpt(tmp / "m.ckpt", sd),
        "safetensors": write_safetensors(tmp / "m.safetensors", sd),
        "fp16 ckpt": write_ckpt(tmp / "m16.ckpt", half(sd)),
        "fp16 safetensors": write_safetensors(tmp / "m16.safetensors", half(sd)),
    }
    del text_encoder, sd
    gc.collect()
    return files


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors", "fp16 ckpt", "fp16 safetensors"])
def test_peak_memory_of_loading_stays_within_1_3x_the_weights(fmt, medium_files):
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_LOADING, medium_files[fmt]], cwd=REPO,
                            capture_output=True, text=True, check=True)  # fmt: skip
    weights, peak = map(int, result.stdout.split())

    assert weights > 450e6
    assert peak <= 1.3 * weights + 64e6, (
        f"loading took {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
    )


@pytest.mark.slow
def test_full_size_sd15_ckpt_and_safetensors_load_to_the_reference(tmp_path):
    """The real key names and shapes of v1-5-pruned-emaonly (1,130 weights + 15 non-weights), at 128x128."""
    free = shutil.disk_usage(tmp_path).free
    if free < 10e9:
        pytest.skip(
            f"needs 10 GB of free disk for two 4.3 GB checkpoints; {tmp_path} has {free / 1e9:.1f} GB"
        )
    refs = build_references(UNetConfig(), VAEConfig(), CLIPConfig())
    state_dict = original_state_dict(**refs, non_weights=True)
    assert len(state_dict) == 1130 + 15
    paths = {"safetensors": write_safetensors(tmp_path / "sd15.safetensors", state_dict)}
    paths["ckpt"] = write_ckpt(tmp_path / "sd15.ckpt", state_dict)
    del state_dict
    gc.collect()

    for fmt, path in paths.items():
        start = time.perf_counter()
        components = load_components(path)
        loaded = time.perf_counter()
        assert_matches_references(components, refs, latent_size=16, image_size=64)
        outputs = time.perf_counter() - loaded
        print(f"\n{fmt}: load_components {loaded - start:.2f} s, first outputs {outputs:.1f} s")
        del components
        gc.collect()
    del refs
    gc.collect()

    for fmt, path in paths.items():
        command = [sys.executable, "-c", PEAK_RSS_OF_LOADING, path]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
        weights, peak = map(int, result.stdout.split())
        ratio = peak / weights
        print(f"{fmt}: peak RSS of loading {peak / 1e9:.2f} GB for {weights / 1e9:.2f} GB ({ratio:.2f}x)")
        assert peak <= 1.3 * weights + 64e6


# --------------------------------------------------------------------------------------------- config


def test_diffusers_unet_config_names_a_sd2_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))

    with pytest.raises(CheckpointError, match="looks like an SD 2.x diffusers folder"):
        load_components(tmp_path)
