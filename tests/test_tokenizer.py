"""sdcore's CLIP tokenizer gives transformers' ids, in the shape Stable Diffusion's text encoder reads."""

import warnings

import pytest
import torch

from sdcore.tokenizer import CLIPTokenizer, PromptTruncatedWarning
from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder
from tests.tokenizer_corpus import CORPUS, CORPUS_BY_KIND, STRADDLING_THE_CUT

START, END = 49406, 49407
CASES = [pytest.param(text, id=f"{kind}-{i}") for kind, texts in CORPUS_BY_KIND.items()
         for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_clip_tokenizer_folder(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="module")
def reference(hf_folder):
    return reference_tokenizer(hf_folder)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.bundled()


def reference_batch(reference, prompts):
    """The call diffusers' StableDiffusionPipeline makes."""
    batch = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return batch.input_ids


def test_corpus_is_large_and_varied():
    assert len(CORPUS) >= 300
    assert all(len(texts) >= 5 for texts in CORPUS_BY_KIND.values())


@pytest.mark.parametrize("text", CASES)
def test_encode_gives_transformers_ids(tok, reference, text):
    assert tok.encode(text) == reference(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", CASES)
def test_batch_of_one_gives_the_ids_diffusers_feeds_the_text_encoder(tok, reference, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = tok([text])
    assert torch.equal(ids, reference_batch(reference, [text]))


def test_whole_corpus_in_one_batch_gives_transformers_ids(tok, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = tok(CORPUS)
    assert ids.dtype == torch.long and ids.shape == (len(CORPUS), 77)
    assert torch.equal(ids, reference_batch(reference, CORPUS))


def test_from_folder_gives_the_bundled_ids(tok, hf_folder):
    folder_tok = CLIPTokenizer.from_folder(hf_folder)
    assert folder_tok.vocab == tok.vocab
    assert [folder_tok.encode(text) for text in CORPUS] == [tok.encode(text) for text in CORPUS]


def test_bundled_vocabulary_is_loaded_once(tok):
    assert CLIPTokenizer.bundled() is tok
    assert len(tok.vocab) == 49408 and (tok.start_id, tok.end_id, tok.pad_id) == (START, END, END)


def test_cut_prompts_sit_on_both_sides_of_the_75_token_limit(tok):
    lengths = [len(tok.encode(text)) for text in STRADDLING_THE_CUT[:6]]
    assert lengths == [73, 74, 75, 76, 77, 78]


def test_short_prompt_is_start_ids_end_then_end_as_padding(tok):
    row = tok(["a photo of a cat"])[0].tolist()
    assert row == [START, 320, 1125, 539, 320, 2368, END] + [END] * 70


def test_long_prompt_keeps_its_first_75_tokens_and_the_end_token(tok):
    text = " ".join(f"word{i}" for i in range(100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        row = tok([text])[0].tolist()
    assert row == [START, *tok.encode(text)[:75], END]


def test_truncation_warns_once_per_call_naming_the_prompt_and_the_lost_words(tok):
    prompts = ["a cat", " ".join(["cat"] * 75) + " lost words", " ".join(["dog"] * 80)]
    with pytest.warns(PromptTruncatedWarning) as record:
        tok(prompts)
    assert len(record) == 1
    message = str(record[0].message)
    assert "prompts[1] loses 'lost words'" in message
    assert "prompts[2] loses 'dog dog dog dog dog'" in message
    assert "prompts[0]" not in message


def test_prompts_that_fit_do_not_warn(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok([" ".join(["cat"] * 75)])


def test_a_bare_str_is_refused_naming_the_argument(tok):
    with pytest.raises(TypeError, match=r"prompts must be a list of str, got the str 'a cat'"):
        tok("a cat")


def test_a_non_str_prompt_is_refused_naming_its_index(tok):
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str, got NoneType"):
        tok(["a cat", None])


def test_empty_batch_has_shape_0_by_77(tok):
    assert tok([]).shape == (0, 77)


def test_folder_without_merges_is_refused_naming_the_file(tmp_path, hf_folder):
    (tmp_path / "vocab.json").write_bytes((hf_folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"has no merges\.txt"):
        CLIPTokenizer.from_folder(tmp_path)


def test_the_batch_call_reads_prompt_syntax_as_plain_text(tok):
    # sdcore.prompts reads emphasis, BREAK and tags; the 77-token primitive tokenizes the text as written
    text = "(cat:1.2) BREAK <lora:x:1>"
    assert tok([text])[0].tolist() == [START, *tok.encode(text), END] + [END] * (75 - len(tok.encode(text)))
