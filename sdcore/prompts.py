"""Prompts as AUTOMATIC1111's web UI reads them: emphasis, BREAK, extra-network tags, 75-token chunks.

    parsed = parse_prompt("a (red:1.2) car, BREAK night <lora:film:0.6>", tokenizer, {"easyneg": 8})
    parsed.chunks       # Chunk(tokens=77 ids, weights=77 multipliers, embeddings=((position, name), ...))
    parsed.networks     # (NetworkTag(kind="lora", name="film", weight=0.6, unet_weight=0.6, ...),)

A prompt becomes chunks in three steps, each the one A1111 runs (its `modules/extra_networks.py`,
`prompt_parser.parse_prompt_attention` and `sd_hijack_clip.tokenize_line`):

1. Extra-network tags `<kind:name:weight...>` are cut out of the text and listed (`extract_networks`); A1111
   does this to the positive prompt only, so a tag in a negative prompt stays text.
2. Emphasis (`parse_emphasis`): `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:w)` sets
   the factor w; nesting multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters. A bracket
   never closed applies to the end of the prompt, a closing one never opened is text, and `BREAK` (upper
   case, a word of its own) ends a chunk.
3. Each weighted run is tokenized on its own; a run of tokens equal to a textual-inversion embedding's name
   becomes that embedding's n vectors (n positions). Tokens fill chunks of 75; when a chunk is full and
   one of its last 20 tokens is a comma, what follows the comma moves to the next chunk. Every chunk is
   then padded with the end token and framed by the start and end tokens: 77 positions.

A prompt without brackets, backslashes, BREAK or tags and with at most 75 tokens is one chunk holding exactly
the ids of `CLIPTokenizer([prompt])`, every weight 1.

Where A1111 has a bug this module does not copy it: when the comma rule moves tokens that hold an
embedding's vectors, A1111 leaves the vectors behind in the full chunk (at its padding); here they move with
their positions. Not parsed (A1111 handles them before these steps): prompt editing `[a:b:0.5]`,
alternation `[a|b]`, `AND` composition and `#` comments; their characters are read as emphasis and text.

Torch-free. The tokenizer is any object with `encode(text) -> list[int]`, `start_id`, `end_id` and `vocab`
(sdcore.tokenizer.CLIPTokenizer).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from sdcore.errors import InvalidField

EMPHASIS = 1.1  # the factor of one pair of ( ), and the divisor of one pair of [ ]
CHUNK_TOKENS = 75  # prompt tokens per chunk; with the start and end tokens, CLIP's 77 positions
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
COMMA = ",</w>"
# Stands in the ids where an embedding's vectors go; the text encoder never looks it up (any id would do,
# this is A1111's).
EMBEDDING_PLACEHOLDER = 0

BREAK = ("BREAK", -1.0)  # A1111's marker in parse_emphasis' output, and like A1111 the only one
LORA_KINDS = ("lora", "lyco")  # the tag kinds A1111 applies as LoRAs: "lyco" is its alias of "lora"

_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_TEXT = re.compile(r"[^\\()\[\]:]+")
_WEIGHT_CLOSE = re.compile(r":([+-]?[.\d]+)\)")
_ESCAPABLE = "()[]\\"
_ROUND = EMPHASIS
_SQUARE = 1 / EMPHASIS  # multiplied, as A1111 does, never divided: the float results must match its own

# -- extra networks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkTag:
    """One `<kind:arguments>` tag of a prompt, read as A1111 reads a LoRA's: `<lora:name>`,
    `<lora:name:weight>`, `<lora:name:weight:unet_weight>`, or named `te=` / `unet=` arguments.

    kind is the word as written: "lora", "lyco" (A1111's alias of lora), "hypernet", or any other, which
    A1111 also cuts out (and then skips). weight is the text encoder's multiplier, unet_weight the U-Net's
    (the weight unless given); A1111's `dyn=` and other arguments stay in `args`.
    """

    kind: str
    name: str
    weight: float
    unet_weight: float
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"<{self.kind}:{':'.join(self.args)}>"

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_KINDS


def extract_networks(text: str, field: str = "prompt") -> tuple[str, tuple[NetworkTag, ...]]:
    """The text without its `<kind:...>` tags (nothing put in their place, as A1111 does) and the tags in
    order. A tag without a name or with a weight that is not a finite number is an InvalidField."""
    tags = []

    def cut(match: re.Match) -> str:
        tags.append(_network_tag(match[1], match[2], field))
        return ""

    return _NETWORK_TAG.sub(cut, text), tuple(tags)


def _network_tag(kind: str, arguments: str, field: str) -> NetworkTag:
    args = tuple(arguments.split(":"))
    named, positional = {}, []
    for arg in args:
        # A1111's ExtraNetworkParams: "key=value" is named; "a=b=c" (three parts) stays positional.
        parts = arg.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(arg)
    tag = f"<{kind}:{arguments}>"
    if not positional:
        raise InvalidField(field, f"the tag {tag} names no network", f"<{kind}:name> or <{kind}:name:weight>")

    def number(value: str, what: str) -> float:
        try:
            result = float(value)
        except ValueError:
            result = math.nan
        if not math.isfinite(result):
            raise InvalidField(field, f"the tag {tag} has {what} {value!r}, which is not a finite number",
                               f"<{kind}:name:weight> with a number such as 0.8")
        return result

    # In A1111's order: a named te= / unet= replaces the positional value, which must still be a number.
    weight = number(positional[1], "weight") if len(positional) > 1 else 1.0
    if "te" in named:
        weight = number(named["te"], "weight")
    unet_weight = number(positional[2], "U-Net weight") if len(positional) > 2 else weight
    if "unet" in named:
        unet_weight = number(named["unet"], "U-Net weight")
    return NetworkTag(kind, positional[0], weight, unet_weight, args)


# -- emphasis ----------------------------------------------------------------------------------------------


def parse_emphasis(text: str, field: str = "prompt") -> list[tuple[str, float]]:
    """The text as runs of (text, weight), neighbours of equal weight merged; BREAK where the text says
    BREAK. A weight written `(x:w)` whose w is not a number (`(x:1.2.3)`) is an InvalidField: A1111 fails
    the whole generation on it."""
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    rounds: list[int] = []  # for each open bracket: the first piece it covers
    squares: list[int] = []

    def scale(first: int, factor: float) -> None:
        for piece in pieces[first:]:
            piece[1] *= factor

    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            # A backslash escapes one of ()[]\ ; before any other character it vanishes (A1111's "\\" case).
            escaped = text[position + 1 : position + 2]
            escaped = escaped if escaped and escaped in _ESCAPABLE else ""
            pieces.append([escaped, 1.0])
            position += 1 + len(escaped)
        elif char == "(":
            rounds.append(len(pieces))
            position += 1
        elif char == "[":
            squares.append(len(pieces))
            position += 1
        elif char == ")" and rounds:
            scale(rounds.pop(), _ROUND)
            position += 1
        elif char == "]" and squares:
            scale(squares.pop(), _SQUARE)
            position += 1
        elif char == ":" and (weight := _WEIGHT_CLOSE.match(text, position)):
            if rounds:
                scale(rounds.pop(), _weight(weight, field))
            else:
                pieces.append([weight[0], 1.0])  # ":1.2)" with no "(" open is text
            position = weight.end()
        elif char in ":)]":
            pieces.append([char, 1.0])
            position += 1
        else:
            run = _TEXT.match(text, position)[0]
            for index, part in enumerate(_BREAK.split(run)):
                if index:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
            position += len(run)
    for first in rounds:
        scale(first, _ROUND)
    for first in squares:
        scale(first, _SQUARE)

    runs: list[tuple[str, float]] = []
    for piece_text, weight in pieces or [["", 1.0]]:
        if runs and runs[-1][1] == weight:
            runs[-1] = (runs[-1][0] + piece_text, weight)
        else:
            runs.append((piece_text, weight))
    return runs


def _weight(match: re.Match, field: str) -> float:
    try:
        return float(match[1])
    except ValueError:
        raise InvalidField(field, f"has the emphasis weight {match[1]!r} (in {match[0]!r}), which is not a "
                                  "number", "(text:weight) with a number such as (text:1.2)") from None


# -- chunks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """77 positions for the text encoder: ids, the weight of each position's output, and where embedding
    vectors replace the placeholder ids: (first position, embedding name)."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[tuple[int, str], ...] = ()

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as the text encoder reads it, and the extra-network tags cut out of it."""

    text: str
    chunks: tuple[Chunk, ...]
    networks: tuple[NetworkTag, ...] = ()

    @property
    def embeddings(self) -> tuple[str, ...]:
        """The embeddings the prompt uses, each once, in order of first use."""
        return tuple(dict.fromkeys(name for chunk in self.chunks for _, name in chunk.embeddings))


@dataclass(frozen=True)
class ParsedRequest:
    """A request's positive and negative prompt, parsed (sdcore.pipeline.Pipeline.parse)."""

    prompt: ParsedPrompt
    negative: ParsedPrompt

    def chunk_count(self, guided: bool) -> int:
        """The chunks each of the request's text-encoder rows has: the longer of the two prompts, whose
        shorter one is padded (A1111's "pad prompt/negative prompt to be same length"); without guidance the
        negative prompt is not used and only the prompt counts."""
        return max(len(self.prompt.chunks), len(self.negative.chunks)) if guided else len(self.prompt.chunks)


def empty_chunk(tokenizer) -> Chunk:
    """The chunk of the empty prompt: start, then end tokens; every weight 1. Pads shorter prompts."""
    tokens = (tokenizer.start_id,) + (tokenizer.end_id,) * (CHUNK_TOKENS + 1)
    return Chunk(tokens, (1.0,) * len(tokens))


def parse_prompt(text: str, tokenizer, embeddings: Mapping[str, int] | None = None, networks: bool = True,
                 field: str = "prompt") -> ParsedPrompt:
    """A prompt's chunks (at least one) and, with networks=True (positive prompts), its extra-network tags
    cut out first. embeddings maps each textual-inversion embedding's name to its number of vectors (1 to
    75). Errors are InvalidFields naming `field`."""
    tags: tuple[NetworkTag, ...] = ()
    if networks:
        text_left, tags = extract_networks(text, field)
    else:
        text_left = text
    index = _embedding_index(tokenizer, tuple((embeddings or {}).items()))
    filler = _Chunks(tokenizer.start_id, tokenizer.end_id, tokenizer.vocab.get(COMMA))
    for run_text, weight in parse_emphasis(text_left, field):
        if (run_text, weight) == BREAK:
            filler.close()
            continue
        ids = tokenizer.encode(run_text)
        position = 0
        while position < len(ids):
            filler.before(ids[position])
            found = _match(index, ids, position)
            if found is None:
                filler.add(ids[position], weight)
                position += 1
            else:
                name, length, vectors = found
                filler.add_embedding(name, vectors, weight)
                position += length
    return ParsedPrompt(text, filler.finish(), tags)


class _Chunks:
    """Fills chunks entry by entry; an entry is (token, weight, name of the embedding starting here)."""

    def __init__(self, start: int, end: int, comma: int | None):
        self.start, self.end, self.comma = start, end, comma
        self.done: list[Chunk] = []
        self.entries: list[tuple[int, float, str | None]] = []
        self.last_comma = -1  # index in entries of the chunk's last comma

    def before(self, token: int) -> None:
        """Make room for the next token, as A1111 does before placing each one."""
        if token == self.comma:
            self.last_comma = len(self.entries)
        elif len(self.entries) == CHUNK_TOKENS and self.last_comma >= CHUNK_TOKENS - COMMA_BACKTRACK:
            keep = self.last_comma + 1
            moved = self.entries[keep:]
            self.entries = self.entries[:keep]
            self.close()
            self.entries = moved
        if len(self.entries) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float) -> None:
        self.entries.append((token, weight, None))

    def add_embedding(self, name: str, vectors: int, weight: float) -> None:
        if len(self.entries) + vectors > CHUNK_TOKENS:
            self.close()
        self.entries.append((EMBEDDING_PLACEHOLDER, weight, name))
        self.entries.extend((EMBEDDING_PLACEHOLDER, weight, None) for _ in range(vectors - 1))

    def close(self) -> None:
        end = (self.end, 1.0, None)
        padded = [(self.start, 1.0, None), *self.entries, *[end] * (CHUNK_TOKENS - len(self.entries)), end]
        tokens, weights, names = zip(*padded, strict=True)
        self.done.append(Chunk(tokens, weights, tuple((i, n) for i, n in enumerate(names) if n is not None)))
        self.entries, self.last_comma = [], -1

    def finish(self) -> tuple[Chunk, ...]:
        if self.entries or not self.done:
            self.close()
        return tuple(self.done)


@functools.lru_cache(maxsize=16)
def _embedding_index(tokenizer, embeddings: tuple[tuple[str, int], ...]) -> dict[int, list[tuple]]:
    """first token id -> [(name's ids, name, vectors)], longest names first (A1111's ids_lookup)."""
    index: dict[int, list[tuple]] = {}
    for name, vectors in embeddings:
        accepted = f"a name that is text, and 1 to {CHUNK_TOKENS} vectors"
        if not isinstance(name, str) or not tokenizer.encode(name):
            raise InvalidField(f"embeddings[{name!r}]", "has a name with no tokens", accepted)
        if isinstance(vectors, bool) or not isinstance(vectors, int) or not 1 <= vectors <= CHUNK_TOKENS:
            raise InvalidField(f"embeddings[{name!r}]", f"has {vectors!r} vectors", accepted)
        ids = tuple(tokenizer.encode(name))
        index.setdefault(ids[0], []).append((ids, name, vectors))
    for entries in index.values():
        entries.sort(key=lambda entry: len(entry[0]), reverse=True)  # stable: the first named wins a tie
    return index


def _match(index: dict[int, list[tuple]], ids: list[int], position: int) -> tuple[str, int, int] | None:
    for name_ids, name, vectors in index.get(ids[position], ()):
        if tuple(ids[position : position + len(name_ids)]) == name_ids:
            return name, len(name_ids), vectors
    return None
