"""LoRAs, textual-inversion embeddings and a VAE file through the pipeline and the CLI: pixels equal
diffusers' own loaders on the same files, adapter sets switch between batches without touching the other
images, the base weights come back bit for bit, and a PNG records (and replays) every adapter with its
hash."""

import copy
import dataclasses
import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdcore
from sdcore import Pipeline
from sdcore.cli import main
from sdcore.config import tiny_clip, tiny_unet, tiny_vae
from sdcore.errors import InvalidField
from sdcore.params import Generation, Request
from sdcore.png import png_bytes, read_settings
from tests.fixtures_tokenizer import write_clip_tokenizer_folder
from tests.test_lora import kohya_state_dict, random_layers, text_encoder_names, unet_linear_names, write_lora
from tests.test_pipeline import NEGATIVE, PROMPT, build_models, max_level_difference

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SETTINGS = dict(steps=3, sampler="euler_a", width=64, height=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models and diffusers' pipelines on the same weights; sdcore's in storage of their own, since
    merging writes into them (build_models shares the storage)."""
    models = build_models(tiny_clip(), tiny_unet(), tiny_vae(),
                          write_clip_tokenizer_folder(tmp_path_factory.mktemp("tokenizer")))
    parts = models.ours.parts
    models.ours = Pipeline(dataclasses.replace(parts, unet=copy.deepcopy(parts.unet),
                                               text_encoder=copy.deepcopy(parts.text_encoder)))
    return models


@pytest.fixture(scope="module")
def style(models, tmp_path_factory):
    """A kohya LoRA on the U-Net's attention and feed-forward linears and every text-encoder projection."""
    unet, text_encoder = models.txt2img.unet, models.txt2img.text_encoder
    unet_layers = random_layers(unet, unet_linear_names(unet), rank=4, seed=5)
    text_layers = random_layers(text_encoder, text_encoder_names(text_encoder), rank=4, seed=6)
    state = {**kohya_state_dict("unet", unet_layers, alpha=2),
             **kohya_state_dict("text_encoder", text_layers, alpha=2)}
    return write_lora(tmp_path_factory.mktemp("loras") / "style.safetensors", state)


def ours(models, prompt=PROMPT, seed=1, **settings):
    return np.array(models.ours.generate([prompt], [seed], negative_prompts=[NEGATIVE], progress=False,
                                         **(SETTINGS | settings))[0])


def theirs(models, prompt=PROMPT, seed=1):
    args = dict(prompt=[prompt], negative_prompt=[NEGATIVE], num_inference_steps=SETTINGS["steps"],
                width=64, height=64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return np.array(models.txt2img(**args).images[0])


def unet_and_text_weights(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "te": pipe.text_encoder}
    return {f"{name}.{key}": value.clone() for name, module in modules.items()
            for key, value in module.state_dict().items()}


def test_a_lora_gives_diffusers_pixels_and_visibly_changes_the_image(models, style):
    from diffusers import EulerAncestralDiscreteScheduler

    from tests.test_pipeline import SD15_SCHEDULER

    base = ours(models)
    assert models.ours.add_lora(style) == "style"
    with_lora = ours(models, loras=[("style", 0.7)])
    models.txt2img.scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
    models.txt2img.load_lora_weights(str(style), adapter_name="style")
    try:
        models.txt2img.set_adapters(["style"], adapter_weights=[0.7])
        reference = theirs(models)
    finally:
        models.txt2img.unload_lora_weights()
    assert max_level_difference(with_lora, reference) <= 1
    change = np.abs(with_lora.astype(int) - base.astype(int))
    assert change.mean() > 5, f"the LoRA changed the image by only {change.mean():.2f} levels on average"
    # the tag in the prompt is the same LoRA at the same weight
    assert np.array_equal(ours(models, prompt=f"{PROMPT} <lora:style:0.7>"), with_lora)


def test_mixed_adapter_sets_in_one_run_give_each_image_as_alone_and_restore_the_base(models, style):
    models.ours.add_lora(style)
    models.ours.use_loras(())  # an earlier test's batch may have left its set merged
    before = unet_and_text_weights(models.ours)
    generation = Generation(**SETTINGS)
    requests = [Request(PROMPT, 1, generation=generation),
                Request(PROMPT, 2, generation=Generation(**SETTINGS, loras=[("style", 0.5)])),
                Request(f"{PROMPT} <lora:style:-0.8>", 3, generation=generation),
                Request("a red car", 4, generation=generation)]
    batch = models.ours.run(requests, progress=False)
    for request, result in zip(requests, batch, strict=True):
        alone = models.ours.run([request], progress=False)[0]
        assert max_level_difference(np.array(result.image), np.array(alone.image)) <= 1
    models.ours.use_loras(())
    after = unet_and_text_weights(models.ours)
    assert all(torch.equal(before[key], after[key]) for key in before)
    hashes = {"sha256": models.ours.loras["style"].sha256, "shorthash": models.ours.loras["style"].shorthash}
    assert models.ours.metadata(requests[2])["prompt_loras"] == [{"name": "style", "weight": -0.8, **hashes}]
    assert models.ours.metadata(requests[1])["loras"] == [{"name": "style", "weight": 0.5, **hashes}]


def test_an_unknown_lora_is_refused_naming_the_request(models):
    with pytest.raises(ValueError, match=r"^requests\[0\]\.loras: LoRA 'nope' is not loaded"):
        models.ours.run([Request(f"{PROMPT} <lora:nope:1>", 1, generation=Generation(**SETTINGS))])


def test_an_embedding_gives_diffusers_pixels(models, tmp_path):
    vectors = torch.randn(2, tiny_clip().width, generator=torch.Generator().manual_seed(9)) * 0.5
    path = tmp_path / "shiny-style.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "shiny-style"}, path)
    assert models.ours.add_embedding(path, "shinystyle") == "shinystyle"
    prompt = "a lighthouse in shinystyle, oil painting"
    ours_image = ours(models, prompt=prompt)
    models.txt2img.load_textual_inversion(str(path), token="shinystyle")
    from diffusers import EulerAncestralDiscreteScheduler

    from tests.test_pipeline import SD15_SCHEDULER

    models.txt2img.scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
    assert max_level_difference(ours_image, theirs(models, prompt=prompt)) <= 1
    plain = ours(models, prompt="a lighthouse in shiny style, oil painting")
    assert max_level_difference(ours_image, plain) > 5
    metadata = models.ours.metadata(Request(prompt, 1))
    assert metadata["embeddings"] == [{"name": "shinystyle", "sha256": models.ours.embedding_files[
        "shinystyle"].sha256}]


def save_file_and_return(path, state: dict):
    save_file(state, path)
    return path


def write_vae_file(path, seed: int):
    vae = sdcore.load("tiny-random", device="cpu").vae
    torch.manual_seed(seed)
    state = {f"first_stage_model.{key}": value + 0.02 * torch.randn_like(value)
             for key, value in vae.state_dict().items()}
    save_file(state, path)
    return path


def test_a_vae_file_replaces_the_checkpoints_and_is_recorded(tmp_path):
    path = write_vae_file(tmp_path / "vae-ft-test.safetensors", seed=3)
    base = sdcore.load("tiny-random", device="cpu")
    swapped = sdcore.load("tiny-random", device="cpu", vae=path)
    request = Request("a red kite", 5, generation=Generation(**SETTINGS))
    image, other = (np.array(pipe.run([request], progress=False)[0].image) for pipe in (base, swapped))
    assert max_level_difference(image, other) > 0
    from safetensors.torch import load_file

    written = load_file(path)
    assert all(torch.equal(value, written[f"first_stage_model.{key}"])
               for key, value in swapped.vae.state_dict().items())
    vae = swapped.metadata(request)["vae_file"]
    assert vae["name"] == "vae-ft-test.safetensors" and len(vae["sha256"]) == 64
    assert "vae_file" not in base.metadata(request) and "vae" not in base.metadata(request)


def test_a_named_vae_per_request_gives_the_swapped_models_image_beside_the_base(tmp_path):
    path = write_vae_file(tmp_path / "vae-ft-test.safetensors", seed=3)
    swapped = sdcore.load("tiny-random", device="cpu", vae=path)
    pipe = sdcore.load("tiny-random", device="cpu")
    assert pipe.add_vae(path) == "vae-ft-test"
    base_request = Request("a red kite", 5, generation=Generation(**SETTINGS))
    named = Request("a red kite", 5, generation=Generation(**SETTINGS, vae="vae-ft-test"))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img2img = Request("a red kite", 6, generation=Generation(**SETTINGS, vae="vae-ft-test", strength=0.5))

    both = pipe.run([base_request, named], progress=False)  # two batches: the VAE is a batch setting
    alone = swapped.run([base_request], progress=False)[0]
    assert np.array_equal(np.array(both[1].image), np.array(alone.image))
    assert np.array_equal(np.array(both[0].image), np.array(sdcore.load("tiny-random", device="cpu").run(
        [base_request], progress=False)[0].image))
    unnamed = dataclasses.replace(img2img, generation=dataclasses.replace(img2img.generation, vae=None))
    assert np.array_equal(np.array(pipe.run([img2img], [init], progress=False)[0].image),
                          np.array(swapped.run([unnamed], [init], progress=False)[0].image))
    settings = pipe.metadata(named)
    assert settings["vae"] == "vae-ft-test"
    assert settings["vae_file"] == {"name": path.name, "sha256": swapped.parts.vae_file.sha256}
    assert Request.from_dict(settings) == named
    with pytest.raises(InvalidField, match=r"requests\[0\]\.generation\.vae: VAE 'other' is not added"):
        pipe.run([Request("x", 1, generation=Generation(**SETTINGS, vae="other"))], progress=False)


def test_cli_records_every_adapter_and_replays_them_from_the_png(style, tmp_path, capsys):
    vectors = torch.randn(1, tiny_clip().width, generator=torch.Generator().manual_seed(2))
    embedding = tmp_path / "glow.pt"
    torch.save({"string_to_param": {"*": vectors}, "name": "glow"}, embedding)
    vae = write_vae_file(tmp_path / "my-vae.safetensors", seed=4)
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(style.read_bytes())
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    adapters = ["--lora-dir", loras, "--embedding", embedding, "--vae", vae]
    common = ["--steps", 2, "--width", 64, "--height", 64, "--no-progress", "--device", "cpu"]
    # the tiny-random text encoder is 64 wide like the test's pipeline: the same LoRA file fits it
    assert main([str(a) for a in ["generate", "a glow lighthouse <lora:style:0.6>", "--checkpoint",
                                  "tiny-random", "--seed", 3, *adapters, *common, "--out", first]]) == 0
    settings = read_settings(first)
    assert settings["loras"] == [] and settings["prompt_loras"][0]["weight"] == 0.6
    assert settings["embeddings"][0]["name"] == "glow"
    assert settings["vae_file"]["name"] == "my-vae.safetensors" and "vae" not in settings
    parameters = Image.open(first).text["parameters"]
    assert 'Lora hashes: "style: ' in parameters and "TI hashes: " in parameters
    assert "VAE: my-vae" in parameters

    assert main([str(a) for a in ["generate", "--from-png", first, "--no-progress", "--out", again]]) == 1
    assert "pass --vae FILE" in capsys.readouterr().err
    assert main([str(a) for a in ["generate", "--from-png", first, *adapters, "--no-progress",
                                  "--out", again]]) == 0
    assert read_settings(again) == read_settings(first)
    assert again.read_bytes() == first.read_bytes()


def test_cli_replays_a_request_that_named_its_vae_under_the_same_name(tmp_path, capsys):
    path = write_vae_file(tmp_path / "ft-test.safetensors", seed=6)
    pipe = sdcore.load("tiny-random", device="cpu")
    pipe.add_vae(path, "ft")
    request = Request("a red kite", 5, generation=Generation(**SETTINGS, vae="ft"))
    made = tmp_path / "made.png"
    made.write_bytes(png_bytes(pipe.run([request], progress=False)[0].image, pipe.metadata(request)))
    again = tmp_path / "again.png"

    assert main(["generate", "--from-png", str(made), "--no-progress", "--out", str(again)]) == 1
    assert "was made with VAE 'ft-test.safetensors'; pass --vae FILE" in capsys.readouterr().err
    assert main(["generate", "--from-png", str(made), "--vae", str(path), "--no-progress", "--device", "cpu",
                 "--out", str(again)]) == 0
    assert again.read_bytes() == made.read_bytes()


@pytest.mark.slow
def test_full_size_sd15_lora_embedding_and_vae_file_equal_diffusers(tmp_path):
    """SD 1.5's real shapes at 64x64, all three adapters in one image: a kohya LoRA on the U-Net and the
    text encoder (diffusers: load_lora_weights + set_adapters), a 2-vector A1111 embedding
    (load_textual_inversion) and an original-layout VAE file (AutoencoderKL.from_single_file)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import EulerAncestralDiscreteScheduler

    from sdcore.checkpoints import diffusers_config
    from sdcore.config import CLIPConfig, UNetConfig, VAEConfig
    from tests.reference import original_layout, reference_vae
    from tests.test_pipeline import SD15_SCHEDULER

    tokenizer = write_clip_tokenizer_folder(tmp_path / "tokenizer")
    models = build_models(CLIPConfig(), UNetConfig(), VAEConfig(), tokenizer)
    try:
        unet, text_encoder = models.txt2img.unet, models.txt2img.text_encoder
        # alpha 16 at rank 4: scale 4, enough for a random LoRA to move SD 1.5-sized activations visibly
        state = {**kohya_state_dict("unet", random_layers(unet, unet_linear_names(unet), rank=4, seed=5), 16),
                 **kohya_state_dict("text_encoder", random_layers(
                     text_encoder, text_encoder_names(text_encoder), rank=4, seed=6), 16)}
        lora = write_lora(tmp_path / "style.safetensors", state)
        embedding = tmp_path / "glowstyle.pt"
        vectors = torch.randn(2, CLIPConfig().width, generator=torch.Generator().manual_seed(7)) * 0.02
        torch.save({"string_to_param": {"*": vectors}, "name": "glowstyle"}, embedding)
        vae_file = save_file_and_return(tmp_path / "vae-ft-test.safetensors",
                                        original_layout("vae", reference_vae(VAEConfig(), seed=14)))
        (tmp_path / "vae-config").mkdir()
        (tmp_path / "vae-config" / "config.json").write_text(json.dumps(diffusers_config("vae", VAEConfig())))
        prompt = "a glowstyle lighthouse at dusk, oil painting"

        models.txt2img.scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER)
        models.txt2img.load_textual_inversion(str(embedding), token="glowstyle")
        models.txt2img.vae = DiffusersAutoencoderKL.from_single_file(str(vae_file),
                                                                     config=str(tmp_path / "vae-config"))
        models.txt2img.load_lora_weights(str(lora), adapter_name="style")
        models.txt2img.set_adapters(["style"], adapter_weights=[0.8])
        reference = theirs(models, prompt=prompt)
        models.txt2img.unload_lora_weights()  # before ours merges into the weights both share

        models.ours.add_lora(lora), models.ours.add_embedding(embedding), models.ours.add_vae(vae_file)
        with_lora = ours(models, prompt=prompt, loras=[("style", 0.8)], vae="vae-ft-test")
        without = ours(models, prompt=prompt, vae="vae-ft-test")
    finally:
        del models
        gc.collect()
    assert max_level_difference(with_lora, reference) <= 1
    change = np.abs(with_lora.astype(int) - without.astype(int))
    print(f"the LoRA moved the image by {change.mean():.1f} levels on average, at most {change.max()}")
    assert change.mean() > 5, f"the LoRA changed the image by only {change.mean():.2f} levels on average"
