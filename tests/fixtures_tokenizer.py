"""The CLIP vocabulary in Hugging Face form, and transformers' CLIPTokenizer on it as the reference."""

import gzip
import json
from pathlib import Path

from sdcore.tokenizer import BUNDLED_VOCAB


def bytes_to_unicode():
    """OpenAI's table from simple_tokenizer.py, restated here so the reference shares no code with sdcore."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_folder(folder: Path) -> Path:
    """Write vocab.json + merges.txt built from the bundled BPE file the way OpenAI's simple_tokenizer builds
    its encoder, so the reference never shares code with sdcore's own loader."""
    lines = gzip.open(BUNDLED_VOCAB).read().decode("utf-8").split("\n")
    merges = [tuple(merge.split()) for merge in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for merge in merges:
        vocab.append("".join(merge))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(dict(zip(vocab, range(len(vocab)), strict=True))),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


def reference_tokenizer(folder: Path):
    """transformers' CLIPTokenizer on a vocab.json + merges.txt folder."""
    from transformers import CLIPTokenizer

    # Positional on purpose: with transformers 5, vocab=/merges= keywords silently build a 3-token vocabulary.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert len(tokenizer) == 49408, f"reference tokenizer has {len(tokenizer)} tokens, expected 49408"
    return tokenizer
