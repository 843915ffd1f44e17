"""Textual-inversion embeddings: A1111 and diffusers files -> `Embedding(name, vectors [n, width], sha256)`.

Formats, told apart by content (not by extension):

    A1111 .pt / .bin     {"string_to_param": {"*": Tensor [n, width]}, "name": ..., "step": ...}; in files
                         from torch 1.11 days string_to_param is a torch.nn.ParameterDict
    A1111 .safetensors   {"emb_params": Tensor [n, width]}
    diffusers            learned_embeds.bin / .safetensors: {token: Tensor [width] or [n, width]}

The name (the token a prompt writes) is `name` when given, else what A1111 or diffusers would take: A1111's
formats go by the file's stem (A1111 ignores the "name" inside the file), diffusers' by the file's token.
Vectors are fp32 on the CPU; casting them to the text encoder's dtype and device is the caller's.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints.read import read_file
from .config import CLIPConfig
from .errors import CheckpointError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
# Text encoder widths of other model families, to name them when an embedding made for one is refused.
OTHER_MODEL_WIDTHS = {1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL's second text encoder (OpenCLIP ViT-bigG)"}
A1111_SAFETENSORS_KEY = "emb_params"


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, width], fp32, CPU: one row per token the name stands for
    sha256: str  # of the file; A1111's "TI hashes" infotext gives its first 12 hex digits
    path: Path


def read_embedding(path, name: str | None = None, width: int = CLIPConfig().width) -> Embedding:
    """Read one embedding file, checked: width must be the text encoder's (768 for SD 1.5)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such embedding file; expected an A1111 .pt / .safetensors or a "
                                    "diffusers learned_embeds.bin / .safetensors file")
    data, _ = read_file(path, allowed_classes=(torch.nn.ParameterDict,))
    file_token, vectors = _vectors(path, data)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise CheckpointError(path, f"not an embedding: its tensor is {vectors.dtype} {list(vectors.shape)}; "
                                    "expected floating-point vectors [n, width]")
    if vectors.shape[1] != width:
        family = OTHER_MODEL_WIDTHS.get(vectors.shape[1])
        made_for = f", as {family} takes" if family else ""
        raise CheckpointError(path, f"the embedding is {vectors.shape[1]} wide{made_for}; this text encoder "
                                    f"takes {width}-wide vectors")
    vectors = vectors.detach().to(torch.float32).contiguous()
    if not torch.isfinite(vectors).all():
        raise CheckpointError(path, "the embedding holds NaN or infinite values")
    return Embedding(name=name or file_token or path.stem, vectors=vectors,
                     sha256=hashlib.sha256(path.read_bytes()).hexdigest(), path=path)


def read_embedding_folder(folder, width: int = CLIPConfig().width) -> dict[str, Embedding]:
    """Every embedding file directly in `folder`, by name (A1111's embeddings/ folder). All files are read
    before any error is raised, and the error names every bad file and every name two files share."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(folder, "no such embeddings folder")
    embeddings, problems = {}, []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES):
        try:
            embedding = read_embedding(path, width=width)
        except CheckpointError as e:
            problems.append(f"{path.name}: {e.problem}")
            continue
        if embedding.name in embeddings:
            other = embeddings[embedding.name].path.name
            problems.append(f"{path.name}: its name {embedding.name!r} is also that of {other}")
            continue
        embeddings[embedding.name] = embedding
    if problems:
        raise CheckpointError(folder, f"{len(problems)} embedding files refused: " + "; ".join(problems))
    return embeddings


def _vectors(path: Path, data: dict) -> tuple[str | None, torch.Tensor]:
    """(the token the file names, or None for A1111's formats; its tensor)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch.nn.ParameterDict in old files
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise CheckpointError(path, f"an A1111 embedding whose string_to_param holds {count} entries; "
                                        "expected exactly one")
        return None, _tensor(path, next(iter(params.values())))
    if "clip_l" in data and "clip_g" in data:
        raise CheckpointError(path, "an SDXL embedding (clip_l and clip_g vectors); SD 1.x takes one "
                                    "768-wide set of vectors")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1 or len(data) != 1:
        listed = ", ".join(f"{k!r}" for k in list(data)[:5])
        raise CheckpointError(path, f"not an embedding file: it holds {len(data)} entries ({listed}); "
                                    "expected A1111's string_to_param or emb_params, or one diffusers token")
    (token, tensor), = tensors.items()
    return (None if token == A1111_SAFETENSORS_KEY else token), tensor


def _tensor(path: Path, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(path, f"not an embedding: holds a {type(value).__name__} where vectors belong")
    return value
