"""Prompt files -> jobs: every bad line is reported with its number and reason, ids sort in input order,
seeds are reproducible, micro-batches share their settings, and task messages are checked again."""

import json
import math
import re
import subprocess
import sys

import pytest

from sdcore import params
from sdcore.params import Generation
from worker import jobs, messages
from worker.jobs import PromptFileError, derive_seed, expand, micro_batches, read_prompt_file
from worker.messages import MessageError
from worker.validate import Limits

DEFAULTS = {"sampler": "ddim", "steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "eta": 0.0,
            "clip_skip": 1, "loras": [], "vae": None}
GENERATION = Generation(**DEFAULTS)
LIMITS = Limits(max_pixels=512 * 512, max_steps=150, max_prompt_chars=2000, max_images_per_prompt=16)


def read(tmp_path, name: str, content: str | bytes, **options):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return read_prompt_file(path, GENERATION, LIMITS, **options)


def errors_of(tmp_path, name: str, content: str | bytes) -> list[str]:
    with pytest.raises(PromptFileError) as refused:
        read(tmp_path, name, content)
    return refused.value.errors


def jsonl(record: dict) -> str:
    return json.dumps(record) + "\n"


# Every kind of bad input a prompt file can hold (empty, oversized or non-text prompts, out-of-range or
# mistyped settings, unknown keys, lines that are not JSON objects), one line each, with the message it must
# produce.
BAD_LINES = [
    ("empty prompt", jsonl({"prompt": ""}), "prompt: is empty or only whitespace"),
    ("whitespace prompt", jsonl({"prompt": " \t "}), "prompt: is empty or only whitespace"),
    ("100 KB prompt", jsonl({"prompt": "x" * 100_000}), "prompt: has 100000 characters; accepted: non-blank "
                                                         "UTF-8 text of at most 2000 characters"),
    ("NUL in prompt", jsonl({"prompt": "a\x00b"}), "prompt: contains a NUL character at position 1"),
    ("NUL in negative", jsonl({"prompt": "a", "negative_prompt": "\x00"}), "negative_prompt: contains a NUL"),
    ("lone surrogate", '{"prompt": "bad \\udc80 text"}\n', "prompt: is not valid UTF-8"),
    ("prompt not text", jsonl({"prompt": 42}), "prompt: 42 is a int; accepted: non-blank UTF-8 text"),
    ("prompt missing", jsonl({"negative_prompt": "x"}), "prompt: is missing"),
    ("steps 0", jsonl({"prompt": "a", "steps": 0}),
     "steps: 0 is out of range; accepted: an integer from 1 to 150"),
    ("steps negative", jsonl({"prompt": "a", "steps": -5}), "steps: -5 is out of range"),
    ("steps 100000", jsonl({"prompt": "a", "steps": 100000}), "steps: 100000 is out of range"),
    ("steps float", jsonl({"prompt": "a", "steps": 20.5}), "steps: 20.5 is a float; accepted: an integer"),
    ("steps bool", jsonl({"prompt": "a", "steps": True}), "steps: True is a bool; accepted: an integer"),
    ("steps text", jsonl({"prompt": "a", "steps": "20"}), "steps: '20' is a str; accepted: an integer"),
    ("width not multiple of 8", jsonl({"prompt": "a", "width": 100}),
     "width: 100 is not a multiple of 8; accepted: a multiple of 8 from 64"),
    ("height not multiple of 8", jsonl({"prompt": "a", "height": 65}), "height: 65 is not a multiple of 8"),
    ("width too small", jsonl({"prompt": "a", "width": 8}), "width: 8 is out of range"),
    ("8192x8192", jsonl({"prompt": "a", "width": 8192, "height": 8192}),
     "width: 8192 is out of range; accepted: an integer from 64 to 2048"),
    ("over the pixel budget", jsonl({"prompt": "a", "width": 1024, "height": 1024}),
     "width: 1024x1024 is 1048576 pixels, over the budget; accepted: width * height <= limits.max_pixels = "
     "262144"),
    ("guidance NaN", '{"prompt": "a", "guidance_scale": NaN}\n',
     "guidance_scale: nan is not finite; accepted: a finite number from 0 to 100"),
    ("guidance inf", '{"prompt": "a", "guidance_scale": Infinity}\n', "guidance_scale: inf is not finite"),
    ("guidance negative", jsonl({"prompt": "a", "guidance_scale": -1}), "guidance_scale: -1 is out of range"),
    ("guidance text", jsonl({"prompt": "a", "guidance_scale": "high"}), "guidance_scale: 'high' is a str"),
    ("eta out of range", jsonl({"prompt": "a", "eta": 2}),
     "eta: 2 is out of range; accepted: a finite number "
                                                          "from 0 to 1"),
    ("unknown sampler", jsonl({"prompt": "a", "sampler": "k_lms"}),
     "sampler: 'k_lms' is not a known sampler; accepted: ddpm, ddim, euler_a, dpmpp_2m, dpmpp_2m_karras"),
    ("seed negative", jsonl({"prompt": "a", "seed": -1}),
     "seed: -1 is out of range; accepted: an integer from 0 to 18446744073709551615"),
    ("seed 2**64", jsonl({"prompt": "a", "seed": 2**64}), "seed: 18446744073709551616 is out of range"),
    ("seed float", jsonl({"prompt": "a", "seed": 1.5}), "seed: 1.5 is a float"),
    ("seed + images past 2**64-1", jsonl({"prompt": "a", "seed": 2**64 - 1, "images": 2}),
     "seed: 18446744073709551615 + 1 (one seed per image) passes 2**64-1"),
    ("images 0", jsonl({"prompt": "a", "images": 0}),
     "images: 0 is out of range; accepted: an integer from 1 to 16"),
    ("images huge", jsonl({"prompt": "a", "images": 10**9}), "images: 1000000000 is out of range"),
    ("unknown key", jsonl({"prompt": "a", "cfg": 7}),
     "cfg: is not a known field; accepted: prompt, negative_prompt, seed, images, model, sampler, steps"),
    ("micro_batch is not per line", jsonl({"prompt": "a", "micro_batch": 2}),
     "micro_batch: is not a known field"),
    ("strength is img2img's", jsonl({"prompt": "a", "strength": 0.5}), "strength: is not a known field"),
    ("eta with a sampler without one", jsonl({"prompt": "a", "sampler": "ddpm", "eta": 0.5}),
     "eta: 0.5 with sampler ddpm, which has no eta; accepted: 0, or a sampler that takes one: ddim"),
    ("not JSON", "{prompt: a}\n",
     "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("not an object", "[\"a\"]\n", "a JSON list, not an object; accepted: one JSON object per line"),
    ("JSON string", "\"just a prompt\"\n", "a JSON str, not an object"),
]


@pytest.mark.parametrize(("line", "expected"), [case[1:] for case in BAD_LINES],
                         ids=[case[0] for case in BAD_LINES])
def test_a_bad_jsonl_line_is_reported_with_its_number_and_reason(tmp_path, line, expected):
    content = jsonl({"prompt": "a good line"}) + line + jsonl({"prompt": "another good line"})

    errors = errors_of(tmp_path, "prompts.jsonl", content)

    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'prompts.jsonl'}:2: ")
    assert expected in errors[0]


def test_every_bad_line_is_reported_not_just_the_first(tmp_path):
    content = "".join(case[1] for case in BAD_LINES)

    errors = errors_of(tmp_path, "prompts.jsonl", content)

    assert [int(error.split(":")[1]) for error in errors] == list(range(1, len(BAD_LINES) + 1))


def test_skip_invalid_keeps_the_good_lines_and_returns_the_bad_ones(tmp_path):
    entries, errors = read(tmp_path, "p.jsonl", jsonl({"prompt": "a"}) + jsonl({"prompt": ""}) +
                           jsonl({"prompt": "c"}), skip_invalid=True)

    assert [entry.line for entry in entries] == [1, 3]
    assert len(errors) == 1 and ":2: prompt: is empty" in errors[0]


def test_invalid_utf8_in_a_txt_file_names_its_line(tmp_path):
    errors = errors_of(tmp_path, "p.txt", b"fine\nbro\xffken\nfine too\n")

    assert len(errors) == 1 and ":2: prompt: is not valid UTF-8 (bad data at character 3)" in errors[0]


def test_nul_bytes_in_a_txt_file_name_their_line(tmp_path):
    errors = errors_of(tmp_path, "p.txt", b"fine\nnul\x00here\n")

    assert len(errors) == 1 and ":2: prompt: contains a NUL character at position 3" in errors[0]


def test_a_100kb_line_in_a_csv_is_refused(tmp_path):
    errors = errors_of(tmp_path, "p.csv", "prompt,steps\nok,4\n" + "y" * 100_000 + ",4\n")

    assert len(errors) == 1 and ":3: prompt: has 100000 characters" in errors[0]


def test_csv_numbers_are_parsed_and_non_numbers_reported_as_the_wrong_type(tmp_path):
    errors = errors_of(tmp_path, "p.csv", "prompt,steps,guidance_scale\na,many,7\nb,4,nan\n")

    assert ":2: steps: 'many' is a str; accepted: an integer" in errors[0]
    assert ":3: guidance_scale: nan is not finite" in errors[1]


def test_csv_header_with_an_unknown_column_is_refused(tmp_path):
    errors = errors_of(tmp_path, "p.csv", "prompt,cfg\na,7\n")

    assert errors == [f"{tmp_path / 'p.csv'}:1: the header column 'cfg' is not a known field; "
                      "accepted columns: prompt, negative_prompt, seed, images, model, sampler, steps, "
                      "guidance_scale, width, height, eta, clip_skip, loras, vae"]


def test_csv_row_with_too_many_cells_is_refused(tmp_path):
    errors = errors_of(tmp_path, "p.csv", "prompt\n\"a, b\"\nc,d\n")

    assert len(errors) == 1
    assert ":3: has 2 cells but the header has 1; accepted: one cell per column" in errors[0]


def test_unknown_file_type_is_refused(tmp_path):
    errors = errors_of(tmp_path, "p.yaml", "prompt: a\n")

    assert errors[0].endswith("unknown prompt file type '.yaml'; accepted: .txt, .jsonl, .csv")


def test_a_file_without_prompts_is_refused(tmp_path):
    assert "no prompts found" in errors_of(tmp_path, "p.txt", "\n  \n\n")[0]


def test_txt_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    entries, _ = read(tmp_path, "p.txt", "first\n\n   \nsecond # not a comment\r\n")

    assert [(entry.line, entry.prompt) for entry in entries] == [(1, "first"), (4, "second # not a comment")]


def test_txt_lines_split_only_at_newlines(tmp_path):
    entries, _ = read(tmp_path, "p.txt", "one\u2028still one\x0bstill\nTwo\n")

    assert [entry.prompt for entry in entries] == ["one\u2028still one\x0bstill", "Two"]


def test_jsonl_fields_override_the_config_per_line(tmp_path):
    line = jsonl({"prompt": "a", "steps": 9, "sampler": "euler_a", "images": 3})

    entries, _ = read(tmp_path, "p.jsonl", line)

    assert entries[0].generation == Generation(**{**DEFAULTS, "steps": 9, "sampler": "euler_a"})
    assert entries[0].images == 3


def test_csv_empty_cells_mean_not_given(tmp_path):
    entries, _ = read(tmp_path, "p.csv", "prompt,negative_prompt,seed,steps\n\"a, b\",,,\nc,blurry,5,8\n")

    assert [(e.prompt, e.negative_prompt, e.seed, e.generation.steps) for e in entries] == \
        [("a, b", "", None, 4), ("c", "blurry", 5, 8)]


def test_shipped_examples_are_valid(tmp_path):
    for name in ("prompts.txt", "prompts.jsonl", "prompts.csv"):
        entries, errors = read_prompt_file(f"examples/{name}", GENERATION, Limits())
        assert entries and not errors
    assert len(read_prompt_file("examples/prompts.txt", GENERATION, Limits())[0]) >= 12


def test_job_ids_sort_in_input_order_and_name_line_and_image(tmp_path):
    lines = "".join(jsonl({"prompt": f"p{i}", "images": 2}) for i in range(12))
    entries, _ = read(tmp_path, "p.jsonl", lines)

    made = expand(entries, base_seed=0)

    ids = [job.job_id for job in made]
    assert ids == sorted(ids) and len(set(ids)) == 24
    assert ids[:3] == ["0000001-000", "0000001-001", "0000002-000"]
    assert [job.index for job in made] == list(range(24))


def test_seeds_given_count_up_per_image(tmp_path):
    entries, _ = read(tmp_path, "p.jsonl", jsonl({"prompt": "a", "seed": 2**64 - 3, "images": 3}))

    assert [job.request.seed for job in expand(entries, base_seed=0)] == [2**64 - 3, 2**64 - 2, 2**64 - 1]


def test_derived_seeds_are_reproducible_and_depend_on_base_seed_line_and_image(tmp_path):
    entries, _ = read(tmp_path, "p.txt", "a\nb\n", images=2)

    first, again, other = expand(entries, 1), expand(entries, 1), expand(entries, 2)

    assert [j.request.seed for j in first] == [j.request.seed for j in again]
    assert len({j.request.seed for j in first}) == 4
    assert all(a.request.seed != b.request.seed for a, b in zip(first, other, strict=True))
    assert first[0].request.seed == derive_seed(1, 1, 0) == 689_131_844  # pinned: a new hash breaks reruns
    assert all(0 <= j.request.seed < 2**32 for j in first)


def test_a_lines_seed_does_not_depend_on_other_lines(tmp_path):
    alone, _ = read(tmp_path, "a.txt", "x\ny\n")
    with_more, _ = read(tmp_path, "b.txt", "extra line\n\nx\ny\n", skip_invalid=True)

    assert expand(alone, 0)[1].request.seed == derive_seed(0, 2, 0)
    assert expand(with_more, 0)[2].request.seed == derive_seed(0, 4, 0)


def test_micro_batches_share_settings_keep_input_order_and_respect_the_size(tmp_path):
    lines = [jsonl({"prompt": f"p{i}", **({"steps": 8} if i % 3 == 0 else {})}) for i in range(10)]
    entries, _ = read(tmp_path, "p.jsonl", "".join(lines))

    batches = micro_batches(expand(entries, 0), size=3)

    assert [[job.request.prompt for job in batch] for batch in batches] == [
        ["p0", "p3", "p6"], ["p1", "p2", "p4"], ["p5", "p7", "p8"], ["p9"]]
    assert all(len({job.request.generation for job in batch}) == 1 for batch in batches)


def test_a_run_record_round_trips_every_job(tmp_path):
    entries, _ = read(tmp_path, "p.jsonl", jsonl({"prompt": "line\u2028sep", "images": 2}))
    made = expand(entries, 0)

    header, back = jobs.read_run_record(jobs.run_record("r1", {"base_seed": 0}, made))

    assert back == made and header["run_id"] == "r1" and header["base_seed"] == 0


def test_the_default_step_limit_is_within_what_sdcore_runs():
    assert Limits().max_steps <= params.MAX_STEPS


# --- task messages: checked again in the worker -------------------------------------------------------------

def test_the_enqueue_side_imports_neither_torch_nor_the_task_module():
    probe = ("import sys, worker.client, worker.cli; "
             "print(sorted({'torch', 'worker.tasks'} & sys.modules.keys()))")

    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)

    assert imported.stdout.strip() == "[]"


def message(tmp_path, **changes) -> dict:
    entries, _ = read(tmp_path, "p.txt", "a\nb\n")
    return {**messages.to_message("run-1", expand(entries, 0)), **changes}


def test_a_message_round_trips_its_jobs(tmp_path):
    entries, _ = read(tmp_path, "p.txt", "a\nb\n")
    made = expand(entries, 0)

    run_id, back, rejected = messages.from_message(json.loads(json.dumps(messages.to_message("run-1", made))),
                                                   LIMITS)

    assert (run_id, back, rejected) == ("run-1", made, [])


@pytest.mark.parametrize(("changes", "expected"), [
    ({"version": 2}, "version 2 is not supported; accepted: 1"),
    ({"run_id": "../../x"}, "run_id: '../../x' is not a valid run id; accepted: 1 to 64 characters"),
    ({"run_id": "a" * 65}, "is not a valid run id"),
    ({"extra": 1}, "message keys ['extra', 'generation', 'jobs', 'run_id', 'version']"),
    ({"generation": {"steps": 4}}, "generation: does not hold exactly the generation settings"),
    ({"generation": {**DEFAULTS, "steps": 100000}}, "steps: 100000 is out of range"),
    ({"generation": {**DEFAULTS, "guidance_scale": math.inf}}, "guidance_scale: inf is not finite"),
    ({"jobs": []}, "jobs: not a list of 1 to 256 jobs"),
    ({"jobs": "0000001-000"}, "jobs: not a list of 1 to 256 jobs"),
])
def test_an_unusable_message_is_refused_whole(tmp_path, changes, expected):
    with pytest.raises(MessageError, match=None) as refused:
        messages.from_message(message(tmp_path, **changes), LIMITS)

    assert expected in str(refused.value)


@pytest.mark.parametrize("raw", [None, [1, 2], "text", 3.5])
def test_a_message_that_is_not_an_object_is_refused(raw):
    with pytest.raises(MessageError, match="accepted: a JSON object"):
        messages.from_message(raw, LIMITS)


def test_a_bad_job_is_rejected_alone_and_its_neighbours_kept(tmp_path):
    bad = message(tmp_path)
    bad["jobs"][0] = {**bad["jobs"][0], "prompt": "a\x00b"}
    bad["jobs"].append({"job_id": "../../etc", "prompt": "x"})

    run_id, kept, rejected = messages.from_message(bad, LIMITS)

    assert [job.job_id for job in kept] == ["0000002-000"]
    assert rejected[0] == ("0000001-000",
                           "invalid job: prompt: contains a NUL character at position 1; accepted: "
                           "non-blank UTF-8 text of at most 2000 characters, without NUL")
    assert rejected[1][0] == "" and "invalid job without a usable job_id" in rejected[1][1]


# The bad inputs above again, as a worker receives them from any client: a bad job field rejects
# that job alone (its neighbours run), a bad generation setting refuses the whole micro-batch message.
BAD_JOB_FIELDS = [
    ("prompt", "", "prompt: is empty or only whitespace"),
    ("prompt", " \t ", "prompt: is empty or only whitespace"),
    ("prompt", "x" * 100_000, "prompt: has 100000 characters; accepted: non-blank UTF-8 text of at most"),
    ("prompt", "a\x00b", "prompt: contains a NUL character at position 1"),
    ("prompt", "bad \udc80 text", "prompt: is not valid UTF-8 (bad data at character 4)"),
    ("prompt", 42, "prompt: 42 is a int; accepted: non-blank UTF-8 text"),
    ("prompt", None, "prompt: None is a NoneType"),
    ("negative_prompt", "\x00", "negative_prompt: contains a NUL character at position 0"),
    ("negative_prompt", ["a"], "negative_prompt: ['a'] is a list"),
    ("seed", -1, "seed: -1 is out of range; accepted: an integer from 0 to 18446744073709551615"),
    ("seed", 2**64, "seed: 18446744073709551616 is out of range"),
    ("seed", 1.5, "seed: 1.5 is a float"),
    ("seed", "7", "seed: '7' is a str"),
    ("seed", True, "seed: True is a bool"),
    ("image", 999, "image: 999 is out of range; accepted: an integer from 0 to 998"),
    ("line", 0, "line: 0 is out of range"),
]
BAD_GENERATION = [
    ({"steps": 0}, "steps: 0 is out of range; accepted: an integer from 1 to 150"),
    ({"steps": -5}, "steps: -5 is out of range"),
    ({"steps": 100_000}, "steps: 100000 is out of range"),
    ({"steps": 20.5}, "steps: 20.5 is a float"),
    ({"steps": "20"}, "steps: '20' is a str"),
    ({"width": 100}, "width: 100 is not a multiple of 8"),
    ({"height": 65}, "height: 65 is not a multiple of 8"),
    ({"width": 8192, "height": 8192}, "width: 8192 is out of range; accepted: an integer from 64 to 2048"),
    ({"width": 1024, "height": 1024}, "width: 1024x1024 is 1048576 pixels, over the budget"),
    ({"guidance_scale": math.nan}, "guidance_scale: nan is not finite"),
    ({"guidance_scale": -math.inf}, "guidance_scale: -inf is not finite"),
    ({"guidance_scale": "7"}, "guidance_scale: '7' is a str"),
    ({"sampler": "k_lms"}, "sampler: 'k_lms' is not a known sampler; accepted: ddpm, ddim"),
    ({"sampler": None}, "sampler: None is not a known sampler"),
    ({"eta": 2}, "eta: 2 is out of range"),
    ({"eta": 0.5, "sampler": "euler_a"}, "eta: 0.5 with sampler euler_a, which has no eta"),
    ({"cfg": 7}, "generation: does not hold exactly the generation settings"),
    ({"strength": 0.5}, "generation: does not hold exactly the generation settings"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD_JOB_FIELDS,
                         ids=[f"{case[0]}={case[1]!r:.20}" for case in BAD_JOB_FIELDS])
def test_the_worker_rejects_a_job_with_a_bad_field_alone(tmp_path, field, value, expected):
    bad = message(tmp_path)
    bad["jobs"][0] = {**bad["jobs"][0], field: value}

    _, kept, rejected = messages.from_message(json.loads(json.dumps(bad)), LIMITS)  # as it comes off the wire

    assert [job.job_id for job in kept] == ["0000002-000"]
    assert rejected == [("0000001-000", rejected[0][1])] and expected in rejected[0][1]


def test_the_worker_rejects_a_job_with_unknown_or_missing_keys_alone(tmp_path):
    bad = message(tmp_path)
    bad["jobs"][0] = {**bad["jobs"][0], "steps": 999}
    del bad["jobs"][1]["seed"]

    _, kept, rejected = messages.from_message(bad, LIMITS)

    assert kept == [] and [job_id for job_id, _ in rejected] == ["0000001-000", "0000002-000"]
    assert all("job: does not hold exactly the job fields" in reason for _, reason in rejected)


@pytest.mark.parametrize(("changes", "expected"), BAD_GENERATION,
                         ids=[f"{case[0]!r:.30}" for case in BAD_GENERATION])
def test_the_worker_refuses_a_message_with_a_bad_generation_setting(tmp_path, changes, expected):
    bad = message(tmp_path)
    bad["generation"] = {**bad["generation"], **changes}

    with pytest.raises(MessageError) as refused:
        messages.from_message(bad, LIMITS)

    assert expected in str(refused.value)


def test_the_worker_checks_every_field_the_enqueue_side_checks():
    field = re.compile(r"([a-z_]+): ")
    enqueue_side = {field.match(case[2])[1] for case in BAD_LINES if field.match(case[2])}
    worker_side = {case[0] for case in BAD_JOB_FIELDS} | {field.match(case[1])[1] for case in BAD_GENERATION}

    # `images` is a count at enqueue (a message has one job per image); unknown keys (strength among them: the
    # worker makes txt2img only) refuse the message whole
    assert enqueue_side - worker_side == {"images", "cfg", "micro_batch", "strength"}
    assert len(BAD_JOB_FIELDS) + len(BAD_GENERATION) >= 30

