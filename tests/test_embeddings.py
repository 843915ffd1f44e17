"""Textual-inversion files: A1111 .pt / .safetensors and diffusers learned_embeds read to the same vectors,
the ones diffusers' load_textual_inversion puts into its embedding table; other models' embeddings refused."""

import hashlib
import pickle

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from sdcore.config import tiny_clip, tiny_unet, tiny_vae
from sdcore.embeddings import read_embedding, read_embedding_folder
from sdcore.errors import CheckpointError
from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder
from tests.reference import reference_text_encoder, reference_unet, reference_vae

WIDTH = 768


def vectors(n: int, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.02


def write_a1111_pt(path, tensor, parameter_dict: bool = False):
    """What A1111's textual inversion training saves (torch 1.11-era files hold a ParameterDict)."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(tensor)}) if parameter_dict else {"*": tensor}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "name-inside-the-file",
                "step": 1500, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


def write_a1111_safetensors(path, tensor):
    save_file({"emb_params": tensor.contiguous()}, path)
    return path


def write_diffusers(path, token, tensor):
    if path.suffix == ".safetensors":
        save_file({token: tensor.contiguous()}, path)
    else:
        torch.save({token: tensor}, path)
    return path


@pytest.mark.parametrize("fmt", ["a1111-pt", "a1111-pt-parameterdict", "a1111-safetensors", "diffusers-bin",
                                 "diffusers-safetensors"])
def test_every_format_reads_its_vectors_and_name(tmp_path, fmt):
    expected = vectors(3)
    if fmt.startswith("a1111-pt"):
        old = fmt.endswith("parameterdict")
        path = write_a1111_pt(tmp_path / "wlop-style.pt", expected, parameter_dict=old)
    elif fmt == "a1111-safetensors":
        path = write_a1111_safetensors(tmp_path / "wlop-style.safetensors", expected)
    else:
        suffix = ".bin" if fmt == "diffusers-bin" else ".safetensors"
        path = write_diffusers(tmp_path / f"learned_embeds{suffix}", "wlop-style", expected)
    embedding = read_embedding(path)
    # A1111's formats go by the file's stem (as A1111 does), diffusers' by the token the file holds.
    assert embedding.name == "wlop-style"
    assert embedding.vectors.dtype == torch.float32 and torch.equal(embedding.vectors, expected)
    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_embedding(path, name="<given>").name == "<given>"


def test_single_vector_and_half_precision_files_give_fp32_rows(tmp_path):
    one = vectors(1)[0].half()
    embedding = read_embedding(write_diffusers(tmp_path / "learned_embeds.bin", "<cat-toy>", one))
    assert embedding.vectors.shape == (1, WIDTH) and embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors[0], one.float())


@pytest.mark.parametrize("width, message", [
    (1024, r"the embedding is 1024 wide, as SD 2\.x \(OpenCLIP ViT-H\) takes; this text encoder takes 768"),
    (1280, r"the embedding is 1280 wide, as SDXL's second text encoder"),
    (64, r"the embedding is 64 wide; this text encoder takes 768"),
])  # fmt: skip
def test_embeddings_of_another_width_are_refused_naming_it(tmp_path, width, message):
    path = write_a1111_pt(tmp_path / "other.pt", vectors(2, width))
    with pytest.raises(CheckpointError, match=rf"other\.pt: {message}"):
        read_embedding(path)


def test_the_width_checked_is_the_text_encoders(tmp_path):
    path = write_a1111_safetensors(tmp_path / "tiny.safetensors", vectors(2, 64))
    assert read_embedding(path, width=64).vectors.shape == (2, 64)
    with pytest.raises(CheckpointError, match=r"64 wide; this text encoder takes 768"):
        read_embedding(path)


def test_sdxl_embedding_is_named(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"clip_l": vectors(2), "clip_g": vectors(2, 1280)}, path)
    with pytest.raises(CheckpointError, match=r"an SDXL embedding \(clip_l and clip_g vectors\)"):
        read_embedding(path)


@pytest.mark.parametrize("case, content, message", [
    ("two-tokens", {"<a>": vectors(1), "<b>": vectors(1)}, r"holds 2 entries \('<a>', '<b>'\)"),
    ("two-terms", {"string_to_param": {"*": vectors(1), "+": vectors(1)}, "name": "x"},
     r"string_to_param holds 2 entries; expected exactly one"),
    ("no-vectors", {"<a>": torch.zeros(2, 3, WIDTH)}, r"its tensor is torch\.float32 \[2, 3, 768\]"),
    ("integers", {"<a>": torch.zeros(1, WIDTH, dtype=torch.int64)}, r"expected floating-point vectors"),
    ("nan", {"<a>": torch.full((1, WIDTH), float("nan"))}, r"NaN or infinite"),
])  # fmt: skip
def test_files_that_are_not_one_embedding_are_refused(tmp_path, case, content, message):
    path = tmp_path / f"{case}.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        read_embedding(path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": Payload()}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load: its pickle would call (builtins\.)?print"):
        read_embedding(path)


def test_a_folder_reads_every_embedding_and_names_clashes(tmp_path):
    write_a1111_pt(tmp_path / "style.pt", vectors(2))
    write_diffusers(tmp_path / "learned_embeds.safetensors", "<cat-toy>", vectors(1))
    (tmp_path / "notes.txt").write_text("not an embedding")
    assert sorted(read_embedding_folder(tmp_path)) == ["<cat-toy>", "style"]
    write_a1111_safetensors(tmp_path / "style.safetensors", vectors(2))
    write_a1111_pt(tmp_path / "wide.pt", vectors(1, 1024))
    clash = r"style\.safetensors: its name 'style' is also that of style\.pt"
    with pytest.raises(CheckpointError, match=rf"2 embedding files refused: {clash}; wide\.pt: the embedding "
                                              r"is 1024 wide"):
        read_embedding_folder(tmp_path)


# ----------------------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    tokenizer = reference_tokenizer(write_clip_tokenizer_folder(tmp_path_factory.mktemp("tokenizer")))
    return StableDiffusionPipeline(
        vae=reference_vae(tiny_vae(), seed=0), text_encoder=reference_text_encoder(tiny_clip(), seed=1),
        tokenizer=tokenizer, unet=reference_unet(tiny_unet(), seed=2),
        scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("fmt", ["a1111-pt", "a1111-safetensors", "diffusers-bin", "diffusers-safetensors"])
def test_diffusers_puts_the_same_vectors_into_its_embedding_table(diffusers_pipeline, tmp_path, fmt):
    width = tiny_clip().width
    expected = vectors(4, width, seed=hash(fmt) % 1000)
    name = f"<{fmt}>"
    if fmt == "a1111-pt":
        path = write_a1111_pt(tmp_path / f"{name}.pt", expected)
    elif fmt == "a1111-safetensors":
        path = write_a1111_safetensors(tmp_path / f"{name}.safetensors", expected)
    else:
        path = write_diffusers(tmp_path / f"learned_embeds.{fmt.split('-')[1]}", name, expected)
    embedding = read_embedding(path, width=width)
    assert embedding.name == name
    diffusers_pipeline.load_textual_inversion(str(path), token=embedding.name)
    tokenizer, text_encoder = diffusers_pipeline.tokenizer, diffusers_pipeline.text_encoder
    ids = tokenizer.convert_tokens_to_ids([name] + [f"{name}_{i}" for i in range(1, len(expected))])
    table = text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[ids], embedding.vectors)
