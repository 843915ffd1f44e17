"""The OpenVINO backend (sdcore.openvino): pixel parity with diffusers, batch invariance, the IR cache, LoRAs
and the set-up checks.

Parity runs diffusers' pipelines and sdcore with its U-Net and VAE compiled by OpenVINO on the same scaled
random weights (tests/test_pipeline.py's models: tiny configs, and the full SD 1.5 dimensions in the slow
test). OpenVINO's CPU kernels round differently from oneDNN's, so images may differ by a level here and
there, as in the Winograd mode: the bound is 2 levels.
"""

import gc
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sdcore
from sdcore import Pipeline
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.openvino import openvino_precision
from sdcore.params import Request
from tests.fixtures_checkpoints import write_safetensors
from tests.reference import original_state_dict
from tests.test_lora import kohya_state_dict, random_layers, unet_linear_names, write_lora
from tests.test_pipeline import (
    build_models,
    generate_batch,
    init_image,
    max_level_difference,
    our_image,
    reference_image,
    tokenizer_folder,  # noqa: F401 (a fixture)
)
from worker.config import ConfigError, load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="the openvino extra is not installed: pip install -e '.[openvino]'")

REPO = Path(__file__).resolve().parents[1]
LEVELS = 2  # OpenVINO's rounding vs oneDNN's; measured: see each test


def with_openvino(models) -> SimpleNamespace:
    """The same diffusers pipelines, and an sdcore Pipeline over the same modules on OpenVINO."""
    ours = Pipeline(models.ours.parts)
    ours.use_openvino()
    return SimpleNamespace(ours=ours, txt2img=models.txt2img, img2img=models.img2img)


def compiled_models(pipe) -> dict:
    return {"unet": pipe.unet.compiled, "vae-encoder": pipe.vae.encoder, "vae-decoder": pipe.vae.decoder}


def ir_times(pipe) -> dict[str, int]:
    return {name: (c.folder / "model.bin").stat().st_mtime_ns for name, c in compiled_models(pipe).items()}


@pytest.fixture(scope="module")
def tiny(tokenizer_folder, tmp_path_factory):  # noqa: F811
    """diffusers' pipelines, and sdcore on OpenVINO loaded from a checkpoint file of the same weights into an
    empty cache (the cache is keyed by the file's SHA-256; a conversion costs seconds, so once per module);
    and a LoRA over the U-Net's linears."""
    models = build_models(tiny_clip(), tiny_unet(), tiny_vae(), tokenizer_folder)
    reference = models.txt2img
    folder, cache = tmp_path_factory.mktemp("openvino-checkpoint"), tmp_path_factory.mktemp("openvino-cache")
    path = write_safetensors(folder / "tiny.safetensors", original_state_dict(
        unet=reference.unet, vae=reference.vae, text_encoder=reference.text_encoder, non_weights=True))
    layers = random_layers(reference.unet, unet_linear_names(reference.unet), rank=4, seed=6)
    lora = write_lora(folder / "style.safetensors", kohya_state_dict("unet", layers, alpha=4))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDCORE_OPENVINO_CACHE", str(cache))
        ours = sdcore.load(path, backend="openvino")
    return SimpleNamespace(ours=ours, txt2img=models.txt2img, img2img=models.img2img, path=path, lora=lora,
                           cache=cache, written=ir_times(ours),
                           converted=[c.converted for c in compiled_models(ours).values()])


@pytest.mark.parametrize(("sampler", "steps", "eta"), [("euler_a", 3, 0.0), ("dpmpp_2m_karras", 4, 0.0)])
def test_txt2img_equals_diffusers(tiny, sampler, steps, eta):
    theirs = reference_image(tiny, sampler, seed=7, steps=steps, width=64, height=128, eta=eta)
    ours = our_image(tiny, sampler, seed=7, steps=steps, width=64, height=128, eta=eta)
    assert max_level_difference(ours, theirs) <= LEVELS  # measured: 1


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.5), ("euler_a", 0.0)])
def test_img2img_equals_diffusers(tiny, sampler, eta):
    image = init_image(128, 64)
    theirs = reference_image(tiny, sampler, seed=3, steps=5, width=128, height=64, eta=eta, image=image,
                             strength=0.6)
    ours = our_image(tiny, sampler, seed=3, steps=5, width=128, height=64, eta=eta, image=image, strength=0.6)
    assert max_level_difference(ours, theirs) <= LEVELS  # measured: 1


def test_an_image_does_not_depend_on_its_batch_neighbours(tiny):
    alone = generate_batch(tiny.ours, ["a lighthouse"], [42])[0]
    in_three = generate_batch(tiny.ours, ["a red car", "a lighthouse", "a forest"], [1, 42, 2])[1]
    assert max_level_difference(in_three, alone) <= 1


# -- the IR cache and LoRAs --------------------------------------------------------------------------------

def test_a_second_load_reads_the_converted_models_from_the_cache(tiny, monkeypatch):
    monkeypatch.setenv("SDCORE_OPENVINO_CACHE", str(tiny.cache))
    second = sdcore.load(tiny.path, backend="openvino")
    assert all(tiny.converted)
    assert not any(c.converted for c in compiled_models(second).values())
    assert ir_times(second) == tiny.written
    first, again = (generate_batch(pipe, ["a cat"], [1])[0] for pipe in (tiny.ours, second))
    assert np.array_equal(first, again)


def test_a_lora_set_converts_the_unet_again_and_matches_torch(tiny):
    torch_pipe, ov_pipe = sdcore.load(tiny.path), tiny.ours
    for pipe in (torch_pipe, ov_pipe):
        pipe.add_lora(tiny.lora)
    base = ov_pipe.unet.compiled
    styled = [generate_batch(pipe, ["a cat"], [1], loras=[("style", 0.8)])[0]
              for pipe in (torch_pipe, ov_pipe)]
    assert ov_pipe.unet.compiled.converted and ov_pipe.unet.compiled.folder != base.folder
    assert max_level_difference(*styled) <= LEVELS
    assert max_level_difference(styled[1], generate_batch(ov_pipe, ["a cat"], [1])[0]) > 10  # it applied
    assert not ov_pipe.unet.compiled.converted  # the base U-Net again, from the cache
    assert ov_pipe.unet.compiled.folder == base.folder


def test_int8_keeps_the_unet_weights_as_int8_in_a_cache_entry_of_its_own(tiny, monkeypatch):
    monkeypatch.setenv("SDCORE_OPENVINO_CACHE", str(tiny.cache))
    int8 = sdcore.load(tiny.path, backend="openvino", dtype="int8")
    fp32_unet, unet = tiny.ours.unet.compiled, int8.unet.compiled
    assert int8.precision == "int8" and unet.converted and unet.folder != fp32_unet.folder
    # a quarter of the bytes, plus a scale and a zero point per output channel
    assert (unet.folder / "model.bin").stat().st_size < 0.35 * (fp32_unet.folder / "model.bin").stat().st_size
    assert not int8.vae.decoder.converted and int8.vae.decoder.folder == tiny.ours.vae.decoder.folder
    image, fp32 = (generate_batch(pipe, ["a cat"], [1])[0] for pipe in (int8, tiny.ours))
    difference = np.abs(image.astype(int) - fp32.astype(int))
    print(f"\nint8 vs fp32, tiny random weights: max {difference.max()} levels, mean {difference.mean():.2f}")
    assert 0 < difference.mean() < 8  # measured: max 14, mean 1.36
    assert int8.metadata(Request(prompt="a cat", seed=1))["precision"] == "int8"


# -- the torch path's weights (issue 16, item 4) ------------------------------------------------------------

def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from `path` (/proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps", encoding="utf-8"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() == str(path):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_weights_loaded_from_a_file_are_copies_not_its_mapped_pages(tiny):
    """Mapped pages are page cache, which memory pressure reclaims: weights read from it again at every
    step would make a worker's speed depend on its neighbours. The file is mapped while loading only."""
    pipe = sdcore.load(tiny.path)
    mappings = file_mappings(tiny.path.resolve())
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        for tensor in (*module.parameters(), *module.buffers()):
            assert not any(start <= tensor.data_ptr() < end for start, end in mappings)


# -- set-up ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "message"), [
    (dict(backend="onnx"), r"^backend 'onnx' is not known; accepted: auto, torch, openvino"),
    (dict(dtype="fp16"), r"^dtype 'fp16' is not offered by backend 'openvino'; accepted: fp32, bf16"),
    (dict(winograd=True), r"^winograd is a torch kernel and backend 'openvino' runs its own convolutions"),
])  # fmt: skip
def test_load_refuses_what_the_backend_cannot_run(arguments, message):
    with pytest.raises(ValueError, match=message):
        sdcore.load("tiny-random", **{"backend": "openvino", **arguments})


def test_the_backend_refuses_a_gpu():
    with pytest.raises(ValueError, match=r"^backend 'openvino' runs on the CPU, not on cuda"):
        openvino_precision(torch.device("cuda"), None, winograd=False)


def test_auto_runs_openvino_on_the_cpu_and_torch_where_openvino_cannot_run_as_asked():
    pipe = sdcore.load("tiny-random", device="cpu", backend="auto", winograd=True)
    assert (pipe.backend, pipe.winograd, type(pipe.unet).__name__) == ("openvino", False, "OpenVINOUNet")
    half = sdcore.load("tiny-random", device="cpu", dtype="fp16", backend="auto")
    assert (half.backend, half.precision) == ("torch", "fp16")


def test_auto_without_openvino_installed_runs_torch_and_warns_naming_the_extra(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)
    pipe = sdcore.load("tiny-random", device="cpu", backend="auto", winograd=True)
    assert (pipe.backend, pipe.winograd) == ("torch", True)
    assert "the openvino package is not installed" in caplog.text
    assert "pip install -e '.[openvino]'" in caplog.text


def test_the_cpu_worker_config_runs_auto_with_winograd_and_a_bad_backend_is_refused(tmp_path):
    model = load_config(REPO / "configs" / "sd15-fp32-cpu.yaml", environ={}).model
    assert (model.backend, model.winograd) == ("auto", True)
    assert load_config(REPO / "configs" / "demo.yaml", environ={}).model.backend == "torch"
    config = tmp_path / "config.yaml"
    for precision in ("bf16", "int8"):  # the CPU's bf16 is checked at start
        config.write_text(f"model: {{checkpoint: tiny-random, device: cpu, backend: openvino, precision: "
                          f"{precision}}}\n")
        assert load_config(config, environ={}).model.precision == precision
    for model, message in [
        ("backend: onnx", r"model\.backend: 'onnx' is not a backend; accepted: auto, torch, openvino"),
        ("backend: openvino, winograd: true", r"model\.backend: openvino with device auto, winograd True"),
        ("device: cpu, backend: auto, precision: bf16",
         r"model\.precision: bf16 on device cpu is unsupported; accepted: fp32 on cpu \(bf16 or int8 with "
         r"backend openvino\)"),
        ("precision: int8",
         r"model\.precision: 'int8' is not a precision; accepted: fp32, fp16, bf16 \(fp32, bf16, int8 with "
         r"backend openvino\)"),
        ("backend: openvino, precision: int8",
         r"model\.precision: int8 with device auto; accepted: int8 with device cpu"),
    ]:
        config.write_text(f"model: {{checkpoint: tiny-random, {model}}}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(config, environ={})


def test_without_openvino_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an import of a missing package raises
    with pytest.raises(ImportError, match=r"needs the openvino package.*pip install -e '\.\[openvino\]'"):
        sdcore.load("tiny-random", backend="openvino")


# -- full SD 1.5 dimensions --------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_sd15_txt2img_and_img2img_equal_diffusers(tokenizer_folder):  # noqa: F811
    """The real SD 1.5 shapes at 64x64 (most of the time: converting the 3.4 GB U-Net): run by hand under
    `flock /tmp/sd-heavy.lock`."""
    models = with_openvino(build_models(CLIPConfig(), UNetConfig(), VAEConfig(), tokenizer_folder))
    try:
        for sampler, steps in (("dpmpp_2m_karras", 3), ("euler_a", 3)):
            theirs = reference_image(models, sampler, seed=1, steps=steps, width=64, height=64)
            ours = our_image(models, sampler, seed=1, steps=steps, width=64, height=64)
            assert max_level_difference(ours, theirs) <= LEVELS, sampler  # measured: 1
        image = init_image(64, 64)
        for sampler, eta in (("ddim", 0.5), ("euler_a", 0.0)):
            settings = dict(seed=2, steps=4, width=64, height=64, eta=eta, image=image, strength=0.5)
            theirs = reference_image(models, sampler, **settings)
            ours = our_image(models, sampler, **settings)
            assert max_level_difference(ours, theirs) <= LEVELS, sampler  # measured: 1
    finally:
        del models
        gc.collect()
