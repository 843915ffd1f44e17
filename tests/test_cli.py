"""`sdcore generate` / `sdcore convert` end to end on tiny models: files written, images reproducible from
their own metadata, user errors as one line and a non-zero status."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdcore
from sdcore.checkpoints.layout import ORIGINAL_PREFIXES
from sdcore.cli import main
from sdcore.png import png_bytes, read_settings

FAST = ["--steps", "3", "--width", "64", "--height", "64", "--no-progress"]


def sdcore_cli(*args) -> int:
    return main([str(arg) for arg in args])


def pixels(path) -> np.ndarray:
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One txt2img PNG made by the CLI, shared by the tests that read it back."""
    out = tmp_path_factory.mktemp("made") / "lighthouse.png"
    status = sdcore_cli("generate", "a lighthouse at dusk", "--checkpoint", "tiny-random", "--seed", 7,
                        "--sampler", "euler_a", "--cfg", 6, "--negative", "fog", *FAST, "--out", out)
    assert status == 0
    return out


def test_generate_writes_a_png_with_every_setting(made):
    settings = read_settings(made)
    assert settings == {
        "prompt": "a lighthouse at dusk", "negative_prompt": "fog", "seed": 7, "steps": 3,
        "sampler": "euler_a", "guidance_scale": 6.0, "eta": 0.0, "width": 64, "height": 64, "clip_skip": 1,
        "loras": [],
        "model": "tiny-random", "model_hash": None, "precision": "fp32", "random_model": True,
    }  # fmt: skip
    parameters = Image.open(made).text["parameters"]
    assert parameters.endswith("Model: tiny-random (random weights), RNG: CPU, Precision: fp32")
    assert pixels(made).shape == (64, 64, 3)


def test_from_png_reproduces_the_same_file(made, tmp_path, capsys):
    again = tmp_path / "again.png"
    assert sdcore_cli("generate", "--from-png", made, "--no-progress", "--out", again) == 0
    assert again.read_bytes() == made.read_bytes()
    assert "seed 7" in capsys.readouterr().out


def test_flags_override_the_png_settings(made, tmp_path):
    other = tmp_path / "other.png"
    assert sdcore_cli("generate", "--from-png", made, "--seed", 8, "--no-progress", "--out", other) == 0
    settings = read_settings(other)
    assert settings == {**read_settings(made), "seed": 8}
    assert not np.array_equal(pixels(other), pixels(made))


def test_img2img_from_the_command_line_and_back(made, tmp_path, capsys):
    out, again = tmp_path / "img2img.png", tmp_path / "again.png"
    arguments = ["--init-image", made, "--strength", 0.5, "--sampler", "ddim", "--eta", 0.5]
    assert sdcore_cli("generate", "a ship", "--checkpoint", "tiny-random", "--seed", 1, *FAST, *arguments,
                      "--out", out) == 0
    assert read_settings(out)["strength"] == 0.5 and read_settings(out)["eta"] == 0.5

    assert sdcore_cli("generate", "--from-png", out, "--out", again) == 1
    assert "is an img2img image (strength 0.5); pass --init-image" in capsys.readouterr().err
    assert sdcore_cli("generate", "--from-png", out, "--init-image", made, "--no-progress",
                      "--out", again) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize(("arguments", "message"), [
    (["x", "--checkpoint", "tiny-random", "--width", "100"], "width: 100 is not a multiple of 8"),
    (["x", "--checkpoint", "tiny-random", "--steps", "0"], "steps: 0 is out of range"),
    (["x", "--checkpoint", "tiny-random", "--seed", "-1"], "seed: -1 is out of range"),
    (["x", "--checkpoint", "tiny-random", "--strength", "0.5"], "--strength applies to img2img only"),
    (["x"], "--checkpoint is required"),
    *([(["x", "--checkpoint", "tiny-random", "--device", "cuda"],
        "--device cuda: torch sees no CUDA GPU (torch")] if not torch.cuda.is_available() else []),
    (["--checkpoint", "tiny-random"], "needs a PROMPT argument or --from-png"),
    (["x", "--checkpoint", "no-such-model.safetensors"], "no-such-model.safetensors"),
    (["--from-png", "no-such-image.png"], "no-such-image.png"),
    (["x", "--checkpoint", "tiny-random", "--init-image", __file__], "not an image file"),
])  # fmt: skip
def test_user_errors_are_one_line_and_status_1(tmp_path, capsys, arguments, message):
    out = tmp_path / "never.png"
    assert sdcore_cli("generate", *arguments, "--out", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdcore generate: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_convert_of_tiny_random_says_there_is_nothing_to_convert(tmp_path, capsys):
    assert sdcore_cli("convert", "tiny-random", tmp_path / "x.safetensors") == 1
    assert "tiny-random has no weights file to convert" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_from_png_of_a_real_model_needs_its_checkpoint(made, tmp_path, capsys):
    png = Image.open(made)
    settings = {**read_settings(made), "model": "v1-5-pruned-emaonly", "model_hash": "6ce0161689",
                "random_model": False}
    real = tmp_path / "real.png"
    real.write_bytes(png_bytes(png, settings))
    assert sdcore_cli("generate", "--from-png", real, "--out", tmp_path / "x.png") == 1
    err = capsys.readouterr().err
    assert "made with model 'v1-5-pruned-emaonly' (hash 6ce0161689); pass --checkpoint" in err


def test_python_dash_m_sdcore_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sdcore", "generate", "x", "--checkpoint", "tiny-random", "--width", "100",
         "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "width: 100" in result.stderr


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sdcore_cli("generate", "x", "--sampler", "plms", "--out", tmp_path / "x.png")
    assert exit_.value.code == 2
    assert "invalid choice: 'plms'" in capsys.readouterr().err


def test_convert_then_generate_from_the_converted_weights(tmp_path):
    pipe = sdcore.load("tiny-random")
    original = tmp_path / "tiny.safetensors"
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    save_file({ORIGINAL_PREFIXES[name] + key: tensor.contiguous()
               for name, module in modules.items() for key, tensor in module.state_dict().items()}, original)
    assert sdcore_cli("convert", original, tmp_path / "folder", "--layout", "diffusers") == 0
    assert sdcore_cli("convert", original, tmp_path / "half.safetensors", "--half") == 0
    assert (tmp_path / "folder" / "unet").is_dir() and (tmp_path / "half.safetensors").is_file()

    for checkpoint in (original, tmp_path / "folder"):
        assert sdcore_cli("generate", "a cat", "--checkpoint", checkpoint, "--seed", 1, *FAST,
                          "--out", tmp_path / f"{checkpoint.stem}.png") == 0
    from_tiny_random = tmp_path / "random.png"
    assert sdcore_cli("generate", "a cat", "--checkpoint", "tiny-random", "--seed", 1, *FAST,
                      "--out", from_tiny_random) == 0
    assert np.array_equal(pixels(tmp_path / "tiny.png"), pixels(from_tiny_random))
    assert np.array_equal(pixels(tmp_path / "folder.png"), pixels(from_tiny_random))
    settings = read_settings(tmp_path / "tiny.png")
    assert settings["model"] == "tiny" and settings["random_model"] is False
    assert settings["model_hash"] == sdcore.load(original).sha256[:10]
