"""Prompt syntax, long prompts, CLIP skip and embeddings, as AUTOMATIC1111's web UI reads them.

sdcore.prompts is checked against `Reference` below: A1111's algorithm (prompt_parser.parse_prompt_attention,
extra_networks.parse_prompt, sd_hijack_clip.tokenize_line, textual_inversion's find_embedding_at_position)
restated for these tests, built the way A1111 builds it (one regex over the prompt, parallel lists of
tokens, multipliers and embedding fixes) and tokenizing with transformers' CLIPTokenizer, as A1111 does. It
shares no code with sdcore. The literal cases in tests/prompt_corpus.py check both.
"""

import json
import re

import numpy as np
import pytest
import torch

from sdcore.config import CLIPConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.errors import InvalidField
from sdcore.models.clip import emphasize
from sdcore.params import Generation, Request
from sdcore.prompts import (
    BREAK,
    ParsedPrompt,
    empty_chunk,
    extract_networks,
    parse_emphasis,
    parse_prompt,
)
from sdcore.tokenizer import CLIPTokenizer
from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder
from tests.prompt_corpus import CORPUS, CORPUS_BY_KIND, EMBEDDINGS, NETWORK_CASES, PARSE_CASES, REFUSED
from tests.reference import reference_text_encoder, sdcore_model
from tests.test_pipeline import build_models, max_level_difference
from tests.tokenizer_corpus import CORPUS as TOKENIZER_CORPUS

START, END = 49406, 49407
CASES = [pytest.param(text, id=f"{kind}-{i}") for kind, texts in CORPUS_BY_KIND.items()
         for i, text in enumerate(texts)]


# -- the reference: A1111's algorithm, restated ------------------------------------------------------------

A1111_TOKENS = re.compile(r"""
      \\[()\[\]\\]                  # an escaped bracket or backslash: the character itself
    | \\                            # any other backslash: nothing
    | [(\[]                         # an opening bracket
    | :(?P<number>[+-]?[.\d]+)\)    # ":1.2)" closes a "(" with that factor
    | [)\]]                         # a closing bracket
    | [^\\()\[\]:]+                 # text
    | :                             # a colon that closes nothing
""", re.X)
A1111_BREAK = r"\s*\bBREAK\b\s*"
A1111_TAG = r"<(\w+):([^>]+)>"


def reference_emphasis(text):
    result = []  # [text, weight], as A1111 keeps them
    opened = {"(": [], "[": []}

    def times(start, factor):
        for entry in result[start:]:
            entry[1] *= factor

    for token in A1111_TOKENS.finditer(text):
        whole, number = token[0], token["number"]
        if whole.startswith("\\"):
            result.append([whole[1:], 1.0])
        elif whole in ("(", "["):
            opened[whole].append(len(result))
        elif number is not None and opened["("]:
            times(opened["("].pop(), float(number))  # ValueError on "1.2.3", as A1111 fails
        elif whole == ")" and opened["("]:
            times(opened["("].pop(), 1.1)
        elif whole == "]" and opened["["]:
            times(opened["["].pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(A1111_BREAK, whole)):
                if i > 0:
                    result.append(["BREAK", -1])
                result.append([part, 1.0])
    for start in opened["("]:
        times(start, 1.1)
    for start in opened["["]:
        times(start, 1 / 1.1)
    merged = []
    for entry in result or [["", 1.0]]:
        if merged and merged[-1][1] == entry[1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(list(entry))
    return [(text, weight) for text, weight in merged]


def reference_networks(text):
    tags = []

    def cut(match):
        items = match[2].split(":")
        named = dict(item.split("=") for item in items if len(item.split("=", 2)) == 2)
        positional = [item for item in items if len(item.split("=", 2)) != 2]
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
        tags.append((match[1], positional[0], te, unet))
        return ""

    return re.sub(A1111_TAG, cut, text), tags


class Reference:
    """tokenize_line of A1111's FrozenCLIPEmbedderWithCustomWords, with comma_padding_backtrack 20.

    One change from A1111, as sdcore documents: when the comma rule moves tokens to the next chunk, the
    embedding fixes among them move too (A1111 leaves them pointing into the chunk they left)."""

    def __init__(self, hf_tokenizer, embeddings):
        self.hf = hf_tokenizer
        self.start, self.end = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
        self.comma = hf_tokenizer.get_vocab()[",</w>"]
        self.lookup = {}  # first id -> [(ids, name, vectors)], longest first
        for name, vectors in embeddings.items():
            ids = self.tokenize([name])[0]
            self.lookup[ids[0]] = sorted(self.lookup.get(ids[0], []) + [(ids, name, vectors)],
                                         key=lambda entry: len(entry[0]), reverse=True)

    def tokenize(self, texts):
        return self.hf(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def find(self, tokens, offset):
        for ids, name, vectors in self.lookup.get(tokens[offset], []):
            if tokens[offset:offset + len(ids)] == ids:
                return ids, name, vectors
        return None

    def chunks(self, line):
        """[(77 ids, 77 multipliers, [(position, embedding name)])]"""
        parsed = reference_emphasis(line)
        chunks = []
        tokens, multipliers, fixes, last_comma = [], [], [], -1

        def next_chunk():
            nonlocal tokens, multipliers, fixes, last_comma
            padding = 75 - len(tokens)
            chunks.append(([self.start, *tokens, *[self.end] * padding, self.end],
                           [1.0, *multipliers, *[1.0] * padding, 1.0],
                           [(offset + 1, name) for offset, name in fixes]))
            tokens, multipliers, fixes, last_comma = [], [], [], -1

        for ids, (text, weight) in zip(self.tokenize([text for text, _ in parsed]), parsed, strict=True):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(ids):
                token = ids[position]
                if token == self.comma:
                    last_comma = len(tokens)
                elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= 20:
                    cut = last_comma + 1
                    moved = (tokens[cut:], multipliers[cut:], [(o - cut, n) for o, n in fixes if o >= cut])
                    tokens, multipliers = tokens[:cut], multipliers[:cut]
                    fixes = [(o, n) for o, n in fixes if o < cut]
                    next_chunk()
                    tokens, multipliers, fixes = (list(part) for part in moved)
                if len(tokens) == 75:
                    next_chunk()
                found = self.find(ids, position)
                if found is None:
                    tokens.append(token)
                    multipliers.append(weight)
                    position += 1
                    continue
                name_ids, name, vectors = found
                if len(tokens) + vectors > 75:
                    next_chunk()
                fixes.append((len(tokens), name))
                tokens += [0] * vectors
                multipliers += [weight] * vectors
                position += len(name_ids)
        if tokens or not chunks:
            next_chunk()
        return chunks


def as_lists(parsed: ParsedPrompt):
    return [(list(c.tokens), list(c.weights), list(c.embeddings)) for c in parsed.chunks]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_clip_tokenizer_folder(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def reference(tokenizer_folder):
    return Reference(reference_tokenizer(tokenizer_folder), EMBEDDINGS)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.bundled()


# -- the corpus against the reference ----------------------------------------------------------------------

def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 200
    assert all(len(prompts) >= 15 for prompts in CORPUS_BY_KIND.values())
    assert sum(len(CLIPTokenizer.bundled().encode(p)) > 150 for p in CORPUS) >= 10


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_emphasis_parses_as_a1111(text, expected):
    assert parse_emphasis(text) == expected
    assert reference_emphasis(text) == expected  # the reference too, so the corpus checks mean something


@pytest.mark.parametrize(("text", "left", "expected"), NETWORK_CASES)
def test_extra_network_tags_are_cut_out_as_a1111_does(text, left, expected):
    remaining, tags = extract_networks(text)
    assert (remaining, [(t.kind, t.name, t.weight, t.unet_weight) for t in tags]) == (left, expected)
    assert all(tag.text in text for tag in tags)  # each tag as written
    assert reference_networks(text) == (left, expected)


@pytest.mark.parametrize(("text", "message", "a1111_fails"), REFUSED)
def test_unreadable_weights_and_tags_are_refused_naming_the_problem(tok, text, message, a1111_fails):
    with pytest.raises(InvalidField, match=r"^prompt: .*" + re.escape(message)):
        parse_prompt(text, tok)
    if a1111_fails:
        with pytest.raises((ValueError, IndexError)):
            reference_emphasis(reference_networks(text)[0])


@pytest.mark.parametrize("text", CASES)
def test_corpus_parses_as_the_reference(text):
    left, tags = extract_networks(text)
    assert (left, [(t.kind, t.name, t.weight, t.unet_weight) for t in tags]) == reference_networks(text)
    assert parse_emphasis(left) == reference_emphasis(left)


@pytest.mark.parametrize("text", CASES)
def test_corpus_chunks_as_the_reference(tok, reference, text):
    parsed = parse_prompt(text, tok, EMBEDDINGS)
    assert as_lists(parsed) == reference.chunks(reference_networks(text)[0])
    assert all(len(chunk.tokens) == len(chunk.weights) == 77 for chunk in parsed.chunks)


WITH_TAGS_OR_EMBEDDINGS = [case for case in CASES if case.id.startswith(("networks-", "embeddings-"))]


@pytest.mark.parametrize("text", WITH_TAGS_OR_EMBEDDINGS)
def test_negative_prompts_keep_their_tags_as_text(tok, reference, text):
    parsed = parse_prompt(text, tok, EMBEDDINGS, networks=False)
    assert parsed.networks == () and as_lists(parsed) == reference.chunks(text)


def test_plain_prompts_give_exactly_the_tokenizers_ids(tok):
    plain = [text for text in TOKENIZER_CORPUS
             if not re.search(r"[()\[\]\\]|BREAK|<\w+:[^>]+>", text) and len(tok.encode(text)) <= 75]
    assert len(plain) >= 200
    for text in plain:
        (chunk,) = parse_prompt(text, tok).chunks
        assert list(chunk.tokens) == tok([text])[0].tolist(), text
        assert not chunk.weighted and chunk.embeddings == ()


# -- chunks, by hand ---------------------------------------------------------------------------------------

def words(word, count, separator=" "):
    return separator.join([word] * count)


def test_a_short_prompt_is_one_chunk_of_start_ids_end_padding(tok):
    (chunk,) = parse_prompt("a photo of a (cat:1.5)", tok).chunks
    assert chunk.tokens == (START, 320, 1125, 539, 320, 2368) + (END,) * 71
    assert chunk.weights == (1.0,) * 5 + (1.5,) + (1.0,) * 71


def test_the_empty_prompt_is_the_empty_chunk(tok):
    assert parse_prompt("", tok).chunks == (empty_chunk(tok),)
    assert empty_chunk(tok).tokens == (START,) + (END,) * 76


def test_75_tokens_fit_one_chunk_and_76_need_two(tok):
    cat = tok.encode("cat")[0]
    assert len(parse_prompt(words("cat", 75), tok).chunks) == 1
    first, second = parse_prompt(words("cat", 76), tok).chunks
    assert first.tokens == (START,) + (cat,) * 75 + (END,)
    assert second.tokens == (START, cat) + (END,) * 75


def test_a_full_chunk_moves_what_follows_a_comma_in_its_last_20_tokens(tok):
    cat, dog, comma = tok.encode("cat")[0], tok.encode("dog")[0], tok.vocab[",</w>"]
    # the comma at index 60: 75 - 60 = 15 <= 20, so the 14 dogs after it move to the next chunk
    first, second = parse_prompt(words("cat", 60) + ", " + words("dog", 20), tok).chunks
    assert first.tokens == (START,) + (cat,) * 60 + (comma,) + (END,) * 15
    assert second.tokens == (START,) + (dog,) * 20 + (END,) * 56
    # the comma at index 50: 25 > 20, the chunk is cut where it is full
    first, second = parse_prompt(words("cat", 50) + ", " + words("dog", 30), tok).chunks
    assert first.tokens == (START,) + (cat,) * 50 + (comma,) + (dog,) * 24 + (END,)
    assert second.tokens[:8] == (START,) + (dog,) * 6 + (END,)


def test_break_ends_a_chunk_and_never_makes_an_empty_last_one(tok):
    cat, dog = tok.encode("cat")[0], tok.encode("dog")[0]
    assert [c.tokens[:3] for c in parse_prompt("cat BREAK dog", tok).chunks] == [(START, cat, END),
                                                                                 (START, dog, END)]
    assert len(parse_prompt("cat BREAK", tok).chunks) == 1
    assert parse_prompt("BREAK cat", tok).chunks[0] == empty_chunk(tok)  # a first chunk of padding only
    assert len(parse_prompt(words("cat", 75) + " BREAK dog", tok).chunks) == 2  # a full chunk: no empty one
    assert len(parse_prompt("cat BREAK BREAK dog", tok).chunks) == 3
    # inside brackets BREAK is the word "break" with weight -1.1, as in A1111
    (chunk,) = parse_prompt("(cat BREAK dog)", tok).chunks
    assert chunk.tokens[:4] == (START, cat, tok.encode("break")[0], dog)
    assert chunk.weights[:4] == (1.0, 1.1, -1.1, 1.1)


def test_an_embedding_takes_its_vectors_positions_with_its_weight(tok):
    cat, dog = tok.encode("cat")[0], tok.encode("dog")[0]
    (chunk,) = parse_prompt("cat (myemb:1.2) dog", tok, {"myemb": 3}).chunks
    assert chunk.tokens[:6] == (START, cat, 0, 0, 0, dog)
    assert chunk.weights[:6] == (1.0, 1.0, 1.2, 1.2, 1.2, 1.0)
    assert chunk.embeddings == ((2, "myemb"),)


def test_an_embedding_that_does_not_fit_starts_the_next_chunk(tok):
    first, second = parse_prompt(words("cat", 73) + " myemb", tok, {"myemb": 3}).chunks
    assert first.tokens[74:] == (END, END, END) and first.embeddings == ()
    assert second.tokens[:5] == (START, 0, 0, 0, END) and second.embeddings == ((1, "myemb"),)
    first, second = parse_prompt("cat ng_deepnegative_v1_75t", tok, EMBEDDINGS).chunks
    assert second.embeddings == ((1, "ng_deepnegative_v1_75t"),)
    assert second.tokens == (START,) + (0,) * 75 + (END,)


def test_embedding_names_match_whole_tokens_longest_first_case_folded(tok):
    sizes = {"bad": 1, "bad-hands-5": 2}
    names = [parse_prompt(text, tok, sizes).embeddings for text in
             ("bad-hands-5", "BAD-Hands-5", "bad hands", "badhands", "bad-hands")]
    assert names == [("bad-hands-5",), ("bad-hands-5",), ("bad",), (), ("bad",)]


def test_the_comma_rule_moves_embedding_vectors_with_their_positions(tok):
    # 60 words, a comma, a 3-vector embedding, 20 words: the embedding sits after the comma and moves
    first, second = parse_prompt(words("cat", 60) + ", myemb " + words("dog", 20), tok, {"myemb": 3}).chunks
    assert first.embeddings == () and second.embeddings == ((1, "myemb"),)
    assert second.tokens[1:4] == (0, 0, 0)


def test_a_bad_embedding_size_is_refused_naming_it(tok):
    with pytest.raises(InvalidField, match=r"^embeddings\['big'\]: has 76 vectors; accepted: .* 1 to 75"):
        parse_prompt("big", tok, {"big": 76})
    with pytest.raises(InvalidField, match=r"^embeddings\['  '\]: has a name with no tokens"):
        parse_prompt("x", tok, {"  ": 1})


# -- emphasis: A1111's mean-restoring weighting ------------------------------------------------------------

def test_emphasis_scales_then_restores_the_mean_exactly():
    # mean 2; weighted [[2, 2], [6, 6]] has mean 4; times 2 / 4
    assert torch.equal(emphasize(torch.full((2, 2), 2.0), (1.0, 3.0)), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    # mean 1.5; weighted [[2, -2], [1, 2]] has mean 0.75; times 2
    states = torch.tensor([[1.0, -1.0], [2.0, 4.0]])
    assert torch.equal(emphasize(states, (2.0, 0.5)), torch.tensor([[4.0, -4.0], [2.0, 4.0]]))


def test_emphasis_with_every_weight_one_returns_the_states_untouched():
    states = torch.randn(77, 8)
    assert emphasize(states, (1.0,) * 77) is states


def test_emphasis_keeps_the_states_dtype():
    states = torch.randn(4, 8).half()
    assert emphasize(states, (1.0, 1.1, 0.9, 1.0)).dtype == torch.float16


# -- the pipeline ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tokenizer_folder):
    return build_models(tiny_clip(), tiny_unet(), tiny_vae(), tokenizer_folder).ours


def contexts(pipe, run):
    """(latent rows, context) of every U-Net call made by run()."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append((args[0].shape[0],
                                                                                     args[2].clone())))
    try:
        result = run()
    finally:
        handle.remove()
    return calls, result


def encode_ids(pipe, ids: list[int], clip_skip=1) -> torch.Tensor:
    with torch.inference_mode():
        return pipe.text_encoder(torch.tensor([ids]), clip_skip=clip_skip)[0]


def assert_close(ours, expected):
    """For states encoded in batches of other sizes (the CPU's matmuls round a batch of one differently)."""
    assert ours.shape == expected.shape and (ours - expected).abs().max() < 1e-5


FAST = dict(steps=2, sampler="euler_a", width=64, height=64, progress=False)
LONG = words("cat", 60) + ", " + words("dog", 40)  # 2 chunks
LONGER = words("tree", 200)  # 3 chunks


def test_a_weighted_prompt_is_the_plain_prompts_states_weighted(pipe, tok):
    plain = encode_ids(pipe, tok(["a red car"])[0].tolist()).double()
    weighted = pipe.encode_text(["a (red:1.5) [car]"])[0].double()
    weights = torch.ones(77, dtype=torch.float64)
    weights[2], weights[3] = 1.5, 1 / 1.1
    scaled = plain * weights[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    # fp32 against fp64: the states' mean is near 0, so the two fp32 means put ~1e-5 into the factor
    assert (weighted - expected).abs().max() < 1e-4
    assert abs(weighted.mean() - plain.mean()) < 1e-6


def test_a_long_prompt_is_its_chunks_each_encoded_alone_then_concatenated(pipe, tok):
    chunks = parse_prompt(LONG, tok).chunks
    context = pipe.encode_text([LONG])
    assert context.shape == (1, 154, 64)
    for k, chunk in enumerate(chunks):
        assert_close(context[0, 77 * k:77 * (k + 1)], encode_ids(pipe, list(chunk.tokens)))


def test_prompt_and_negative_are_padded_to_the_same_chunks_with_the_empty_prompt(pipe, tok):
    empty = encode_ids(pipe, list(empty_chunk(tok).tokens))
    calls, _ = contexts(pipe, lambda: pipe.generate([LONG], [1], **FAST))
    (rows, context), *_ = calls
    assert rows == 2 and context.shape == (2, 154, 64)
    assert torch.equal(context[0, :77], empty) and torch.equal(context[0, 77:], empty)  # uncond: "" padded
    calls, _ = contexts(pipe, lambda: pipe.generate(["a cat"], [1], negative_prompts=[LONGER], **FAST))
    context = calls[0][1]
    assert context.shape == (2, 231, 64)
    assert torch.equal(context[1, 77:154], empty) and torch.equal(context[1, 154:], empty)  # cond padded


def test_without_guidance_the_negative_prompt_does_not_lengthen_the_context(pipe):
    calls, _ = contexts(pipe, lambda: pipe.generate(["a cat"], [1], negative_prompts=[LONGER],
                                                    guidance_scale=1.0, **FAST))
    assert {tuple(context.shape) for _, context in calls} == {(1, 77, 64)}


def test_requests_of_different_chunk_counts_run_apart_and_each_image_is_as_if_alone(pipe):
    prompts = ["a red car", LONG, "a forest", LONGER, "a (blue:1.2) boat"]
    negatives = ["", "", "blurry", "", LONG]  # the last request has 2 chunks through its negative prompt
    seeds = [1, 2, 3, 4, 5]
    calls, images = contexts(pipe, lambda: pipe.generate(prompts, seeds, negative_prompts=negatives, **FAST))
    # batches in order of first appearance: 1 chunk (requests 0, 2), 2 chunks (1, 4), 3 chunks (3)
    assert [(rows, context.shape[1]) for rows, context in calls] == \
        [(4, 77)] * 2 + [(4, 154)] * 2 + [(2, 231)] * 2
    for prompt, negative, seed, image in zip(prompts, negatives, seeds, images, strict=True):
        alone = pipe.generate([prompt], [seed], negative_prompts=[negative], **FAST)[0]
        assert max_level_difference(np.array(image), np.array(alone)) <= 1


def test_plain_prompts_give_the_context_of_the_77_token_encoder_call(pipe, tok):
    """What the pipeline fed the U-Net before prompt parsing: the tokenizer's [n, 77] ids of each distinct
    text, the empty prompt encoded on its own, in one text-encoder call: bit for bit the same."""
    prompts, negatives = ["a lighthouse at dusk", "a red car", "a lighthouse at dusk"], ["", "blurry", ""]
    calls, _ = contexts(pipe, lambda: pipe.generate(prompts, [1, 2, 3], negative_prompts=negatives, **FAST))
    with torch.inference_mode():
        table = {"": pipe.text_encoder(tok([""]))[0]}
        distinct = [text for text in dict.fromkeys(negatives + prompts) if text not in table]
        table.update(zip(distinct, pipe.text_encoder(tok(distinct)), strict=True))
        before = torch.stack([table[text] for text in negatives + prompts])
    assert all(torch.equal(context, before) for _, context in calls)


def test_clip_skip_feeds_the_unet_the_earlier_layer_for_prompt_and_negative(pipe, tok):
    calls, _ = contexts(pipe, lambda: pipe.generate(["a cat"], [1], negative_prompts=["ugly"], clip_skip=2,
                                                    **FAST))
    context = calls[0][1]
    assert_close(context[0], encode_ids(pipe, tok(["ugly"])[0].tolist(), clip_skip=2))
    assert_close(context[1], encode_ids(pipe, tok(["a cat"])[0].tolist(), clip_skip=2))
    assert (context[1] - encode_ids(pipe, tok(["a cat"])[0].tolist())).abs().max() > 0.1
    padded = pipe.encode_text([LONG, "x"], clip_skip=2)[1, 77:]  # the empty chunk, at clip_skip 2
    assert torch.equal(padded, encode_ids(pipe, list(empty_chunk(tok).tokens), clip_skip=2))


@pytest.mark.parametrize(("value", "message"), [
    (0, r"^clip_skip: 0 is out of range; accepted: an integer from 1 to 12"),
    (13, r"^clip_skip: 13 is out of range"),
    ("2", r"^clip_skip: '2' is a str"),
    (True, r"^clip_skip: True is a bool"),
])  # fmt: skip
def test_clip_skip_is_checked_naming_the_range(value, message):
    with pytest.raises(InvalidField, match=message):
        Generation(clip_skip=value)


def test_clip_skip_beyond_the_text_encoders_layers_is_refused(pipe):
    with pytest.raises(ValueError, match=r"clip_skip 4 is out of range for a 2-layer text encoder; accepted: "
                                         r"an integer from 1 to 3"):
        pipe.generate(["a cat"], [1], clip_skip=4, **FAST)


def test_clip_skip_equals_transformers_hidden_states_through_the_final_layer_norm():
    """At SD 1.5's text-encoder size (12 x 768), random weights: A1111's clip skip n is transformers'
    hidden_states[-n] through final_layer_norm (what diffusers calls clip_skip=n - 1)."""
    cfg = CLIPConfig()
    theirs = reference_text_encoder(cfg, seed=5)
    ours = sdcore_model("text_encoder", theirs, cfg)
    ids = CLIPTokenizer.bundled()(["a lighthouse on a cliff at dusk, oil painting", ""])
    final_layer_norm = getattr(theirs, "text_model", theirs).final_layer_norm  # transformers 5: no text_model
    with torch.no_grad():
        outputs = theirs(input_ids=ids, output_hidden_states=True)
        states = {}
        for clip_skip in (1, 2, 3, 12):
            expected = outputs.last_hidden_state if clip_skip == 1 else \
                final_layer_norm(outputs.hidden_states[-clip_skip])
            states[clip_skip] = ours(ids, clip_skip=clip_skip)
            error = (states[clip_skip] - expected).abs().max().item()
            assert error < 1e-5, (clip_skip, error)  # measured: 0 (the same operations in the same order)
    assert (states[2] - states[1]).abs().max() > 0.1 and 0.5 < states[2].std() < 2


def test_embedding_vectors_stand_for_the_word(pipe, tok):
    """An embedding whose vectors are the token embeddings of "red car" reads exactly as "red car"."""
    ids = tok.encode("red car")
    pipe.embeddings = {"myemb": pipe.text_encoder.embeddings.token_embedding.weight[ids].detach().clone()}
    try:
        pairs = [("a myemb", "a red car"), ("a (myemb:1.3), sky", "a (red car:1.3), sky"),
                 ("MyEmb " + LONG, "red car " + LONG)]
        for with_embedding, with_words in pairs:
            assert torch.equal(pipe.encode_text([with_embedding]), pipe.encode_text([with_words]))
        negative_embedding = pipe.generate(["a cat"], [1], negative_prompts=["myemb"], **FAST)[0]
        negative_words = pipe.generate(["a cat"], [1], negative_prompts=["red car"], **FAST)[0]
        assert np.array_equal(np.array(negative_embedding), np.array(negative_words))
    finally:
        pipe.embeddings = {}


def test_random_embedding_vectors_change_the_states_and_count_toward_the_75(pipe, tok):
    pipe.embeddings = {"noise": torch.randn(4, 64, generator=torch.Generator().manual_seed(0))}
    try:
        parsed = pipe.parse(Request(words("cat", 72) + " noise", 1, "noise"))
        assert len(parsed.prompt.chunks) == 2 and parsed.negative.embeddings == ("noise",)
        assert not torch.equal(pipe.encode_text(["a noise"]), pipe.encode_text(["a"]))
    finally:
        pipe.embeddings = {}


def test_an_embedding_of_the_wrong_shape_is_refused_naming_it(pipe):
    pipe.embeddings = {"wide": torch.zeros(3, 65)}
    try:
        with pytest.raises(InvalidField, match=r"^embeddings\['wide'\]: is a tensor \[3, 65\]; accepted: a "
                                               r"tensor \[n, 64\]"):
            pipe.generate(["wide"], [1], **FAST)
    finally:
        pipe.embeddings = {}


def test_lora_tags_are_listed_per_request_and_cut_from_the_prompt(pipe):
    request = Request("a cat <lora:film_grain:0.6>, <lyco:style:0.5:0.2>", 1, "<lora:neg:1> blurry")
    parsed = pipe.parse(request)
    assert [(t.kind, t.name, t.weight, t.unet_weight) for t in parsed.prompt.networks] == \
        [("lora", "film_grain", 0.6, 0.6), ("lyco", "style", 0.5, 0.2)]
    assert all(tag.is_lora for tag in parsed.prompt.networks)
    assert parsed.negative.networks == ()  # A1111 reads tags in the positive prompt only
    assert parsed.prompt.chunks == pipe.parse(Request("a cat , ", 1)).prompt.chunks
    # a tag is a LoRA to merge (tests/test_adapters.py), so one the pipeline lacks is refused, not dropped
    with pytest.raises(InvalidField, match=r"^requests\[0\]\.loras: LoRA 'film_grain' is not loaded"):
        pipe.generate(["a cat <lora:film_grain:0.6>"], [1], **FAST)


def test_a_bad_prompt_fails_the_call_before_any_image_naming_the_request(pipe):
    steps = []
    fast = Generation(steps=2, width=64, height=64)
    with pytest.raises(InvalidField, match=r"^requests\[1\]\.prompt: has the emphasis weight '1\.2\.3'"):
        pipe.run([Request("a cat", 1, generation=fast), Request("(a:1.2.3)", 2, generation=fast)],
                 callback=lambda *args: steps.append(args))
    assert steps == []
    with pytest.raises(InvalidField, match=r"^requests\[0\]\.negative_prompt: has the emphasis weight"):
        pipe.generate(["a cat"], [1], negative_prompts=["(ugly:1.2.3)"], **FAST)
    with pytest.raises(InvalidField, match=r"^requests\[0\]\.prompt: the tag <lora:x:abc> has weight 'abc'"):
        pipe.generate(["<lora:x:abc>"], [1], **FAST)


def test_long_prompts_are_not_truncated_and_do_not_warn(pipe, recwarn):
    pipe.generate([LONGER], [1], **FAST)
    assert not [w for w in recwarn if "tokens" in str(w.message)]


# -- the command line --------------------------------------------------------------------------------------

def test_cli_clip_skip_is_recorded_and_reproduced(tmp_path):
    from PIL import Image

    from sdcore.cli import main
    from sdcore.png import read_settings

    out, again = tmp_path / "skip.png", tmp_path / "again.png"
    fast = ["--steps", "2", "--width", "64", "--height", "64", "--no-progress"]
    assert main(["generate", "a cat", "--checkpoint", "tiny-random", "--seed", "3", "--clip-skip", "2",
                 *fast, "--out", str(out)]) == 0
    assert read_settings(out)["clip_skip"] == 2
    assert ", Clip skip: 2, " in Image.open(out).text["parameters"]
    assert main(["generate", "--from-png", str(out), "--no-progress", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_parse_results_are_plain_data(tok):
    parsed = parse_prompt("a (b:1.2) <lora:x:0.5> BREAK c", tok, {"b": 1})
    json.dumps([[list(c.tokens), list(c.weights), list(c.embeddings)] for c in parsed.chunks])
    assert BREAK == ("BREAK", -1.0) and hash(parsed)
