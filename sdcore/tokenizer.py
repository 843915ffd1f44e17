"""CLIP's byte-level BPE tokenizer, computing the ids that transformers >= 5 `CLIPTokenizer` computes.

One prompt goes through these steps, each the one transformers' tokenizers backend runs:
  1. the literal special tokens <|startoftext|> and <|endoftext|> are cut out of the raw text
     (case-sensitive, before any normalization) and become their own ids;
  2. every other piece is normalized: NFC, each whitespace run -> one space, lower case letter by letter;
  3. CLIP's regex splits the piece into words (letter runs, single digits, punctuation runs, 's 't ...);
  4. a word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode table);
  5. BPE merges the word's characters, the last one carrying the end-of-word marker '</w>'.
Then the batch form adds the start id, keeps at most 75 word ids, adds the end id and pads with it to 77:
the text encoder's one-chunk input, truncating as diffusers' pipelines do. sdcore's Pipeline reads prompts
with sdcore.prompts instead, which splits a long prompt into chunks of 75 and truncates nothing.

Unlike OpenAI's original tokenizer (and transformers 4.x), there is no ftfy and no html unescaping, so
"&amp;" stays three words.

The Unicode tables behind each step come from different places and move with library versions (Python's
unicodedata and the regex package here; the tokenizers library's own NFC tables, Oniguruma and Rust's
lower-casing there). They agree on every character assigned before Unicode 14; with tokenizers 0.23 some
characters assigned since (new combining marks, letters and case pairs of rare scripts) come out differently.
"""

import functools
import gzip
import json
import unicodedata
import warnings
from pathlib import Path

import regex
import torch

CONTEXT_LENGTH = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

BUNDLED_VOCAB = Path(__file__).with_name("data") / "bpe_simple_vocab_16e6.txt.gz"

_SPECIAL_TOKENS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")
# The special-token alternatives still matter here: a case variant such as <|EndOfText|> reaches this
# step lower-cased, and matching it whole changes where the punctuation run after it starts.
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
)


class PromptTruncatedWarning(UserWarning):
    """A prompt given to CLIPTokenizer's batch call had more than 75 tokens; the tail was dropped, as
    diffusers' pipelines do (sdcore's Pipeline encodes long prompts in chunks instead)."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the others to unused code points from 256 on,
    so that no word contains whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


class CLIPTokenizer:
    """tok = CLIPTokenizer.bundled(); tok(["a photo of a cat"]) -> LongTensor [1, 77]; tok.encode(str).

    vocab maps token -> id and merge_ranks maps a symbol pair -> its rank (lower merges first).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = "vocabulary"):
        for token in (START_TOKEN, END_TOKEN):
            if token not in vocab:
                raise ValueError(f"{source}: the vocabulary has no {token!r}; a CLIP vocabulary holds both "
                                 f"{START_TOKEN!r} and {END_TOKEN!r}")
        self.vocab = vocab
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id = vocab[START_TOKEN]
        self.end_id = vocab[END_TOKEN]
        self.pad_id = self.end_id
        self.context_length = CONTEXT_LENGTH
        self._byte_to_char = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._token_of_id = {i: t for t, i in vocab.items()}
        # Prompts repeat their words endlessly; the bound keeps a long-lived worker's memory flat.
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids_uncached)

    @classmethod
    @functools.cache
    def bundled(cls) -> "CLIPTokenizer":
        """OpenAI's 49,408-token vocabulary shipped in sdcore/data, loaded once per process."""
        lines = gzip.decompress(BUNDLED_VOCAB.read_bytes()).decode("utf-8").split("\n")
        # OpenAI's encoder: the 256 byte characters, the same with '</w>', one token per merge, then the two
        # special tokens. The file holds more merges than the vocabulary uses.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(bytes_to_unicode().values())
        tokens = [*byte_chars, *(c + END_OF_WORD for c in byte_chars), *("".join(m) for m in merges),
                  START_TOKEN, END_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, merges, source=str(BUNDLED_VOCAB))

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """A Hugging Face tokenizer folder (a diffusers model's tokenizer/) with vocab.json and merges.txt."""
        folder = Path(path)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has no {file.name}; expected a "
                                        "Hugging Face CLIP tokenizer folder with vocab.json and merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = []
        for number, line in enumerate(merges_file.read_text(encoding="utf-8").splitlines(), start=1):
            if line.startswith("#version") or not line:
                continue
            pair = tuple(line.split(" "))
            if len(pair) != 2:
                raise ValueError(f"{merges_file}: line {number} is {line!r}; expected two symbols separated "
                                 "by one space")
            merges.append(pair)
        return cls(vocab, merges, source=str(folder))

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one text, without start, end or padding."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r}")
        ids = []
        for piece in _SPECIAL_TOKENS.split(text):
            if piece in (START_TOKEN, END_TOKEN):
                ids.append(self.vocab[piece])
                continue
            for word in _WORDS.findall(self._normalize(piece)):
                ids.extend(self._word_ids(word))
        return ids

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        """Token ids [len(prompts), 77]: start, at most 75 word ids, end, then end ids as padding; a longer
        prompt is truncated, with a PromptTruncatedWarning. No prompt syntax: the text is read as it is."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of str, got the str {prompts!r}; a bare str would be "
                            f"tokenized as a list of characters. Pass [{prompts!r}]")
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        body = self.context_length - 2
        rows, truncated = [], []
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{index}] must be a str, got {type(prompt).__name__}: {prompt!r}")
            ids = self.encode(prompt)
            if len(ids) > body:
                truncated.append(f"prompts[{index}] loses {self._text(ids[body:])!r}")
            row = [self.start_id, *ids[:body], self.end_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        if truncated:
            warnings.warn(f"CLIP reads at most {body} tokens per prompt; " + "; ".join(truncated),
                          PromptTruncatedWarning, stacklevel=2)
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context_length)

    @staticmethod
    def _normalize(text: str) -> str:
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        # Lower case character by character, as the tokenizers library does: str.lower() alone would turn a
        # word-final capital sigma into the final form 'ς', transformers into 'σ'.
        return text.replace("Σ", "σ").lower()

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word in (START_TOKEN, END_TOKEN):
            # A lower-cased case variant of a special token: the byte-level step of transformers splits it
            # into three words.
            return (*self._word_ids("<|"), *self._word_ids(word[2:-2]), *self._word_ids("|>"))
        symbols = [self._byte_to_char[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        return tuple(self.vocab[s] for s in self._merge(symbols))

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply the best-ranked merge everywhere it occurs, until no adjacent pair has a merge."""
        ranks = self.merge_ranks
        while len(symbols) > 1:
            pairs = zip(symbols, symbols[1:], strict=False)
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _text(self, ids: list[int]) -> str:
        """The text a run of ids stands for, words separated by spaces (for messages)."""
        text = bytearray()
        for token in (self._token_of_id[i] for i in ids):
            word = token.removesuffix(END_OF_WORD)
            text += bytes(self._char_to_byte[c] for c in word)
            if word != token:
                text += b" "
        return text.decode("utf-8", errors="replace").strip()
