"""Prompt files -> validated jobs -> micro-batches -> task messages.

Prompt files (UTF-8; the extension picks the format):
- `.txt`: one prompt a line. Blank lines (empty or only whitespace) are skipped, so files can be spaced out
  freely; every other line is a prompt taken verbatim. There is no comment syntax: `#` is legal in prompts.
- `.jsonl`: one JSON object a line (blank lines skipped): `prompt` (required), `negative_prompt`, `seed`,
  `images`, and any of the generation settings `sampler steps guidance_scale width height eta`, which override
  the config for that line. Unknown keys are refused.
- `.csv`: a header row naming any of the `.jsonl` keys (`prompt` required); empty cells mean "not given".

Every line is checked before anything is enqueued; every bad line is reported with its number and reason.

Ids: a run id is 1-64 characters of [A-Za-z0-9_-] (it becomes part of storage keys). A job is one image:
`job_id = f"{line:07d}-{image:03d}"` (input line number, image number within the line), so job ids sort in
input order and name the line they came from. Seeds: a line's `seed` is the seed of its first image, image k
gets seed + k; without one, seed = a hash of (run base seed, line, image), reproducible whatever else the
file holds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass

from worker.validate import (
    GENERATION_FIELDS,
    SEED_MAX,
    InvalidField,
    Limits,
    check_generation,
    check_int,
    check_job_id,
    check_run_id,
    check_seed,
    check_text,
)

FORMATS = (".txt", ".jsonl", ".csv")
RECORD_FIELDS = ("prompt", "negative_prompt", "seed", "images", *GENERATION_FIELDS)
INT_FIELDS = ("seed", "images", "steps", "width", "height")
FLOAT_FIELDS = ("guidance_scale", "eta")
MESSAGE_VERSION = 1
ONE_OBJECT = "one JSON object per line"
JOB_FIELDS = ("job_id", "index", "line", "image", "prompt", "negative_prompt", "seed")


class PromptFileError(ValueError):
    """Every bad line of a prompt file, one `FILE:LINE: field: problem; accepted: ...` per line."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(f"{len(errors)} invalid line(s):\n" + "\n".join(errors))


class MessageError(ValueError):
    """A task message that cannot be processed at all (not a dict, unknown version, bad envelope)."""


@dataclass(frozen=True)
class Entry:
    """One valid input line, before it is expanded into one job per image."""

    line: int
    prompt: str
    negative_prompt: str
    seed: int | None
    images: int
    generation: dict


@dataclass(frozen=True)
class Job:
    """One image to make."""

    job_id: str
    index: int  # position in the run, 0-based
    line: int
    image: int
    prompt: str
    negative_prompt: str
    seed: int
    sampler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    eta: float

    def generation(self) -> dict:
        return {name: getattr(self, name) for name in GENERATION_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)


# --- reading and checking input -----------------------------------------------------------------------------

def read_prompt_file(path: str | os.PathLike, defaults: dict, limits: Limits, images: int = 1,
                     skip_invalid: bool = False) -> tuple[list[Entry], list[str]]:
    """Parse and check every line of `path`. Returns (valid entries, errors of skipped lines); raises
    PromptFileError listing every bad line unless `skip_invalid`."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise PromptFileError([f"{path}: unknown prompt file type {extension!r}; "
                               f"accepted: {', '.join(FORMATS)}"])
    with open(path, "rb") as f:
        # surrogateescape keeps a line with invalid UTF-8 readable; check_text then reports exactly that line
        text = f.read().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    records = {".txt": _txt_records, ".jsonl": _jsonl_records, ".csv": _csv_records}[extension](text)
    return check_records(records, path, defaults, limits, images, skip_invalid)


def check_records(records, source: str, defaults: dict, limits: Limits, images: int = 1,
                  skip_invalid: bool = False) -> tuple[list[Entry], list[str]]:
    """Check (line, record-dict or error message) pairs; see read_prompt_file."""
    entries, errors = [], []
    for line, record in records:
        if isinstance(record, str):  # the line could not be read as a record; the text says why
            errors.append(f"{source}:{line}: {record}")
            continue
        try:
            entries.append(check_record(line, record, defaults, limits, images))
        except InvalidField as error:
            errors.append(f"{source}:{line}: {error}")
    total = sum(entry.images for entry in entries)
    if total > limits.max_jobs_per_run:
        errors.append(f"{source}: {total} images in one run; accepted: at most limits.max_jobs_per_run = "
                      f"{limits.max_jobs_per_run}")
        skip_invalid = False
    if not entries and not errors:
        errors.append(f"{source}: no prompts found; accepted: at least one non-blank line")
    if errors and not skip_invalid:
        raise PromptFileError(errors)
    return entries, errors


def check_record(line: int, record: dict, defaults: dict, limits: Limits, images: int = 1) -> Entry:
    """One input record (a dict of RECORD_FIELDS) checked against the limits, config defaults filled in."""
    unknown = [key for key in record if key not in RECORD_FIELDS]
    if unknown:
        raise InvalidField(str(unknown[0]), "is not a known field", ", ".join(RECORD_FIELDS))
    if "prompt" not in record:
        raise InvalidField("prompt", "is missing", "every record has a prompt")
    prompt = check_text("prompt", record["prompt"], limits.max_prompt_chars, allow_blank=False)
    negative = check_text("negative_prompt", record.get("negative_prompt", ""), limits.max_prompt_chars,
                          allow_blank=True)
    count = check_int("images", record.get("images", images), 1, limits.max_images_per_prompt)
    seed = record.get("seed")
    if seed is not None:
        seed = check_seed("seed", seed)
        if seed + count - 1 > SEED_MAX:
            raise InvalidField("seed", f"{seed} + {count - 1} (one seed per image) passes 2**64-1",
                               f"a seed from 0 to {SEED_MAX - count + 1} for {count} images")
    generation = check_generation({**defaults, **{k: record[k] for k in GENERATION_FIELDS if k in record}},
                                  limits)
    return Entry(line, prompt, negative, seed, count, generation)


def _lines(text: str):
    # split on "\n" only: str.splitlines would also split inside prompts at \x0b, \x1c, \u2028 ...
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _txt_records(text: str):
    for number, line in _lines(text):
        yield number, {"prompt": line}


def _jsonl_records(text: str):
    for number, line in _lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, f"not valid JSON ({error.msg} at column {error.colno}); accepted: {ONE_OBJECT}"
            continue
        if not isinstance(record, dict):
            record = f"a JSON {type(record).__name__}, not an object; accepted: {ONE_OBJECT}"
        yield number, record


def _csv_records(text: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    columns = [name.strip() for name in header]
    unknown = [name for name in columns if name not in RECORD_FIELDS]
    if unknown or "prompt" not in columns:
        problem = f"column {unknown[0]!r} is not a known field" if unknown else "has no 'prompt' column"
        yield 1, f"the header {problem}; accepted columns: {', '.join(RECORD_FIELDS)}"
        return
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            yield line, (f"has {len(row)} cells but the header has {len(columns)}; accepted: one cell per "
                         "column (quote cells that hold commas)")
            continue
        yield line, {name: _csv_value(name, cell)
                     for name, cell in zip(columns, row, strict=True) if cell != ""}


def _csv_value(name: str, cell: str):
    # CSV cells are text; numbers are parsed here and a cell that is not one stays text, so the field check
    # reports it as the wrong type.
    try:
        if name in INT_FIELDS:
            return int(cell)
        if name in FLOAT_FIELDS:
            return float(cell)
    except ValueError:
        pass
    return cell


# --- ids, seeds, jobs, micro-batches ------------------------------------------------------------------------

def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def job_id(line: int, image: int) -> str:
    return f"{line:07d}-{image:03d}"


def derive_seed(base_seed: int, line: int, image: int) -> int:
    """A 32-bit seed (the size people copy between tools) fixed by (base seed, line, image)."""
    digest = hashlib.sha256(f"sdbatch/{base_seed}/{line}/{image}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def expand(entries: list[Entry], base_seed: int) -> list[Job]:
    """One job per image, in input order."""
    jobs = []
    for entry in entries:
        for image in range(entry.images):
            seed = entry.seed + image if entry.seed is not None else derive_seed(base_seed, entry.line, image)
            jobs.append(Job(job_id(entry.line, image), len(jobs), entry.line, image, entry.prompt,
                            entry.negative_prompt, seed, **entry.generation))
    return jobs


def micro_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs with identical generation settings, in chunks of at most `size`, ordered by their first job."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.generation().values()), []).append(job)
    batches = [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]
    return sorted(batches, key=lambda batch: batch[0].index)


# --- task messages ------------------------------------------------------------------------------------------

def to_message(run_id: str, batch: list[Job]) -> dict:
    """The JSON task message for one micro-batch (all jobs share the batch's generation settings)."""
    return {"version": MESSAGE_VERSION, "run_id": run_id, "generation": batch[0].generation(),
            "jobs": [{name: getattr(job, name) for name in JOB_FIELDS} for job in batch]}


def from_message(message: object, limits: Limits) -> tuple[str, list[Job], list[tuple[str, str]]]:
    """Check a task message from any client. Returns (run_id, valid jobs, [(job_id, reason)] of bad jobs
    whose id is readable); raises MessageError when the message as a whole is unusable."""
    if not isinstance(message, dict):
        raise MessageError(f"message is a {type(message).__name__}; accepted: a JSON object")
    if message.get("version") != MESSAGE_VERSION:
        raise MessageError(f"version {message.get('version')!r} is not supported; "
                           f"accepted: {MESSAGE_VERSION}")
    if sorted(message) != sorted(("version", "run_id", "generation", "jobs")):
        raise MessageError(f"message keys {sorted(message)}; accepted: version, run_id, generation, jobs")
    try:
        run_id = check_run_id(message["run_id"])
        generation = message["generation"]
        if not isinstance(generation, dict) or set(generation) != set(GENERATION_FIELDS):
            raise InvalidField("generation", "does not hold exactly the generation settings",
                               ", ".join(GENERATION_FIELDS))
        generation = check_generation(generation, limits)
    except InvalidField as error:
        raise MessageError(str(error)) from None
    if not isinstance(message["jobs"], list) or not 1 <= len(message["jobs"]) <= 256:
        raise MessageError("jobs: not a list of 1 to 256 jobs; accepted: the jobs of one micro-batch")
    jobs, rejected = [], []
    for raw in message["jobs"]:
        try:
            jobs.append(_job_from_message(raw, generation, limits))
        except InvalidField as error:
            readable = isinstance(raw, dict) and isinstance(raw.get("job_id"), str)
            if readable and _is_job_id(raw["job_id"]):
                rejected.append((raw["job_id"], f"invalid job: {error}"))
            else:
                rejected.append(("", f"invalid job without a usable job_id: {error}"))
    return run_id, jobs, rejected


def _is_job_id(value: str) -> bool:
    try:
        check_job_id(value)
        return True
    except InvalidField:
        return False


def _job_from_message(raw: object, generation: dict, limits: Limits) -> Job:
    if not isinstance(raw, dict) or sorted(raw) != sorted(JOB_FIELDS):
        raise InvalidField("job", "does not hold exactly the job fields", ", ".join(JOB_FIELDS))
    return Job(
        job_id=check_job_id(raw["job_id"]),
        index=check_int("index", raw["index"], 0, 10**12),
        line=check_int("line", raw["line"], 1, 10**12),
        image=check_int("image", raw["image"], 0, 998),
        prompt=check_text("prompt", raw["prompt"], limits.max_prompt_chars, allow_blank=False),
        negative_prompt=check_text("negative_prompt", raw["negative_prompt"], limits.max_prompt_chars,
                                   allow_blank=True),
        seed=check_seed("seed", raw["seed"]),
        **generation,
    )


# --- the run record (storage: {run_id}/run.jsonl) -----------------------------------------------------------

def run_record(run_id: str, header: dict, jobs: list[Job]) -> bytes:
    """The whole run as JSON lines: a header (settings), then one job per line. Enough to rebuild the run
    from storage alone (`sdbatch resume`)."""
    lines = [json.dumps({"run_id": run_id, "version": MESSAGE_VERSION, **header}, sort_keys=True)]
    lines += [json.dumps(job.to_dict(), sort_keys=True, ensure_ascii=False) for job in jobs]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_run_record(data: bytes) -> tuple[dict, list[Job]]:
    # split on "\n" only: prompts written with ensure_ascii=False may hold \u2028, which splitlines() cuts at
    header, *rows = data.decode("utf-8").rstrip("\n").split("\n")
    return json.loads(header), [Job(**json.loads(row)) for row in rows]
