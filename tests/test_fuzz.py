"""Seeded fuzzing of what sdbatch reads from people and from the queue: prompt-file lines, YAML configs and
task messages, mutated at random from valid ones. Every input either loads or is refused with the error
that names it (PromptFileError lines start with FILE:LINE, ConfigError with the config's path, a refused
message keeps its run and job ids so the worker can record its jobs as failed), quickly and with a short
message; no other exception escapes. Seeded, so a failure replays: the case number and seed are in it."""

import json
import math
import random
import time
from pathlib import Path

import pytest
import yaml

from sdcore.params import Generation
from worker.config import ConfigError, load_config
from worker.jobs import PromptFileError, expand, read_prompt_file
from worker.messages import MessageError, from_message, to_message
from worker.validate import JOB_ID_PATTERN, Limits

SEED = 20261203
LIMITS = Limits()
CASE_SECONDS = 5.0  # generous for a loaded 2-core machine; a hang or a blow-up takes far longer
MAX_MESSAGE = 4000  # characters in one error line: bounded, whatever the input held

VALID_LINE = {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "images": 2, "sampler": "ddim",
              "steps": 20, "guidance_scale": 7.5, "width": 512, "height": 512, "eta": 0.0, "clip_skip": 1,
              "loras": []}
VALID_CONFIG = {
    "model": {"checkpoint": "tiny-random", "precision": "fp32", "device": "cpu"},
    "sampling": {"sampler": "ddim", "steps": 4, "width": 64, "height": 64, "micro_batch": 4, "seed": 0},
    "broker": {"url": "redis://127.0.0.1:6379/0", "queue": "sdbatch"},
    "storage": {"url": "file://./outputs"},
    "limits": {"max_pixels": 262144, "batch_time_limit": 30, "step_seconds": 0.05},
}


def hostile_value(rng: random.Random, depth: int = 0):
    """A JSON-able value of any type and size that is troublesome somewhere."""
    choices = [
        lambda: None, lambda: True, lambda: rng.randint(-2**70, 2**70), lambda: 10**rng.randint(0, 400),
        lambda: rng.choice([0.5, -1.0, 1e308, 1e-320]), lambda: "",
        lambda: rng.choice(["x", " ", "\t", "a\x00b", "\u2028", "é" * 3, "(((", "<lora:x:1>", "../../x"]),
        lambda: "y" * rng.choice([1, 80, 2001, 70_000]), lambda: rng.choice(["ddim", "k_lms", "euler_a"]),
    ]
    if depth < 3:
        choices += [lambda: [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    lambda: {rng.choice(["name", "weight", "x"]): hostile_value(rng, depth + 1)}]
    return rng.choice(choices)()


def mutated_text(rng: random.Random, text: str) -> str:
    """`text` with a few random edits: characters that matter to JSON, CSV, YAML or the prompt syntax."""
    pieces = ['"', "'", ",", "{", "}", "[", "]", ":", "\\", "\n", "\r", "\x00", "#", "&a", "*a", "\ufeff",
              "9" * rng.choice([3, 5000]), "[" * rng.choice([2, 3000])]
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        if rng.random() < 0.3 and text:
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + rng.choice(pieces) + text[at:]
    return text


def prompt_file(rng: random.Random, folder: Path, case: int) -> Path:
    kind = rng.choice([".txt", ".jsonl", ".csv"])
    lines = []
    for _ in range(rng.randint(1, 6)):
        record = dict(VALID_LINE)
        for _ in range(rng.randint(0, 3)):
            record[rng.choice([*VALID_LINE, "strength", "cfg", "vae"])] = hostile_value(rng)
        lines.append(record)
    if kind == ".txt":
        text = "\n".join(str(line["prompt"]) for line in lines)
    elif kind == ".jsonl":
        text = "\n".join(json.dumps(line) for line in lines)
    else:
        columns = list(lines[0])
        text = "\n".join([",".join(columns), *(",".join(json.dumps(line.get(c, ""), ensure_ascii=False)
                                                         for c in columns) for line in lines)])
    if rng.random() < 0.5:
        text = mutated_text(rng, text)
    path = folder / f"case{case}{kind}"
    # invalid UTF-8 too: the readers take bytes
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        data += b"\xff\xfe"
    path.write_bytes(data)
    return path


def timed(case: int, what: str):
    class Clock:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *_):
            spent = time.perf_counter() - self.start
            assert spent < CASE_SECONDS, f"case {case} (seed {SEED}): {what} took {spent:.1f} s"

    return Clock()


@pytest.mark.timeout(60)
def test_fuzzed_prompt_files_load_or_name_every_bad_line(tmp_path):
    rng = random.Random(SEED)
    for case in range(600):
        path = prompt_file(rng, tmp_path, case)
        with timed(case, path.name):
            try:
                entries, _ = read_prompt_file(path, Generation(), LIMITS)
            except PromptFileError as error:
                assert error.errors, f"case {case}: an empty PromptFileError"
                for line in error.errors:
                    assert line.startswith(f"{path}:") and len(line) < MAX_MESSAGE, \
                        f"case {case}: {line[:300]}"
                continue
        assert all(entry.prompt.strip() for entry in entries)
        assert len(expand(entries, 0)) == sum(entry.images for entry in entries)


def config_text(rng: random.Random) -> str:
    document = json.loads(json.dumps(VALID_CONFIG))
    for _ in range(rng.randint(0, 3)):
        section = rng.choice([*document, "adapters", "bogus"])
        keys = list(document.get(section, {})) + ["vae", "winograd", "max_steps", "endpoint_url", "dir", "x"]
        document.setdefault(section, {})[rng.choice(keys)] = hostile_value(rng)
    text = yaml.safe_dump(document, allow_unicode=True)
    if rng.random() < 0.2:  # nested aliases: a small bomb, or a big one
        levels = rng.choice([2, 9])
        bomb = "[&l0 [a,a,a,a,a,a,a,a,a]" + "".join(
            f", &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)) + "]"
        text += f"adapters: {{dir: {bomb}}}\n"
    if rng.random() < 0.4:
        text = mutated_text(rng, text)
    return text


@pytest.mark.timeout(60)
def test_fuzzed_configs_load_or_raise_a_named_config_error(tmp_path):
    rng = random.Random(SEED + 1)
    for case in range(600):
        path = tmp_path / f"case{case}.yaml"
        path.write_text(config_text(rng), encoding="utf-8", errors="surrogatepass")
        with timed(case, path.name):
            try:
                load_config(path, environ={})
            except ConfigError as error:
                assert str(error).startswith(f"{path}:") and len(str(error)) < MAX_MESSAGE, \
                    f"case {case}: {str(error)[:300]}"


def mutated_message(rng: random.Random, jobs: list) -> object:
    message = json.loads(json.dumps(to_message("run-1", jobs[:rng.randint(1, len(jobs))])))
    for _ in range(rng.randint(1, 3)):
        target = rng.random()
        if not isinstance(message, dict):
            break
        if target < 0.2:
            message[rng.choice([*message, "extra"])] = hostile_value(rng)
        elif target < 0.5 and isinstance(message.get("generation"), dict):
            message["generation"][rng.choice([*message["generation"], "strength"])] = hostile_value(rng)
        elif target < 0.9 and isinstance(message.get("jobs"), list) and message["jobs"]:
            job = rng.choice(message["jobs"])
            if isinstance(job, dict):
                job[rng.choice([*job, "steps"])] = hostile_value(rng)
        else:
            message = hostile_value(rng)
    return message


@pytest.mark.timeout(60)
def test_fuzzed_messages_account_for_every_job_they_name(tmp_path):
    valid = tmp_path / "valid.txt"
    valid.write_text("a red fox\na blue bird\na green frog\n")
    jobs = expand(read_prompt_file(valid, Generation(), LIMITS)[0], 0)
    rng = random.Random(SEED + 2)
    for case in range(2000):
        message = mutated_message(rng, jobs)
        named = _readable_job_ids(message)
        with timed(case, "from_message"):
            try:
                _, kept, rejected = from_message(message, LIMITS)
            except MessageError as error:
                assert str(error) and len(str(error)) < MAX_MESSAGE, f"case {case}: {str(error)[:300]}"
                if error.run_id is not None:  # whom the worker records the refusal for: every named job
                    assert set(error.job_ids) == named, f"case {case}"
                continue
        ended = {job.job_id for job in kept} | {job_id for job_id, _ in rejected if job_id}
        assert ended == named, f"case {case}: jobs {named - ended} would never end"
        assert all(math.isfinite(job.request.generation.guidance_scale) for job in kept)


def _readable_job_ids(message: object) -> set[str]:
    """The job ids a worker can record an outcome for: well-formed ids of the message's job objects."""
    if not isinstance(message, dict) or not isinstance(message.get("jobs"), list):
        return set()
    return {job["job_id"] for job in message["jobs"] if isinstance(job, dict)
            and isinstance(job.get("job_id"), str) and JOB_ID_PATTERN.fullmatch(job["job_id"])}
