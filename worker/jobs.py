"""Prompt files -> validated jobs -> micro-batches, and the run record that lets a run be rebuilt.

Prompt files (UTF-8; the extension picks the format):
- `.txt`: one prompt a line. Blank lines (empty or only whitespace) are skipped, so files can be spaced out
  freely; every other line is a prompt taken verbatim. There is no comment syntax: `#` is legal in prompts.
- `.jsonl`: one JSON object a line (blank lines skipped): `prompt` (required), `negative_prompt`, `seed`,
  `images`, `model` (a model of the fleet, worker.config's `models:`; default the config's own), and any
  generation setting (worker.validate.GENERATION_FIELDS: the fields of
  sdcore.params.Generation such as sampler, steps, width, but img2img's strength), which override the config
  for that line. Unknown keys are refused.
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
from dataclasses import dataclass

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, Generation, Request, check_int, parse_text
from worker.config import FileRefused, check_model_name, read_regular_file, shown
from worker.validate import GENERATION_FIELDS, Limits, check_generation, check_job_id, check_prompts

FORMATS = (".txt", ".jsonl", ".csv")
RECORD_FIELDS = ("prompt", "negative_prompt", "seed", "images", "model", *GENERATION_FIELDS)
RECORD_INT_FIELDS = ("seed", "images")  # the record's own numbers; a Generation field's type is its own
RUN_RECORD_VERSION = 1
ONE_OBJECT = "one JSON object per line"


class PromptFileError(ValueError):
    """Every bad line of a prompt file, one `FILE:LINE: field: problem; accepted: ...` per line."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(f"{len(errors)} invalid line(s):\n" + "\n".join(errors))


@dataclass(frozen=True)
class Entry:
    """One valid input line, before it is expanded into one job per image."""

    line: int
    prompt: str
    negative_prompt: str
    seed: int | None
    images: int
    generation: Generation
    model: str | None = None  # None: the config's own model


@dataclass(frozen=True)
class Job:
    """One image to make: what sdcore makes it from, with which model, and where it sits in its run."""

    job_id: str
    index: int  # position in the run, 0-based
    line: int
    image: int
    request: Request
    model: str | None = None  # a model name of the fleet (worker.config.Settings.models); None: any

    def to_dict(self) -> dict:
        """Flat, as the run record holds it: the ids, the model, then the request's fields."""
        return {"job_id": self.job_id, "index": self.index, "line": self.line, "image": self.image,
                **({"model": self.model} if self.model is not None else {}), **self.request.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> Job:
        return cls(values["job_id"], values["index"], values["line"], values["image"],
                   Request.from_dict(values), values.get("model"))


# --- reading and checking input -----------------------------------------------------------------------------

def read_prompt_file(path: str | os.PathLike, defaults: Generation, limits: Limits, images: int = 1,
                     skip_invalid: bool = False, check_entry=None) -> tuple[list[Entry], list[str]]:
    """Parse and check every line of `path`. Returns (valid entries, errors of skipped lines); raises
    PromptFileError listing every bad line unless `skip_invalid`. `check_entry(entry)`, when given, checks a
    valid line further (the client: its LoRAs exist) and raises InvalidField to refuse it."""
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise PromptFileError([f"{path}: unknown prompt file type {extension!r}; "
                               f"accepted: {', '.join(FORMATS)}"])
    try:
        data = read_regular_file(path, limits.max_prompt_file_bytes, "a regular file of at most "
                                 f"limits.max_prompt_file_bytes = {limits.max_prompt_file_bytes} bytes")
    except FileRefused as error:
        raise PromptFileError([f"{path}: cannot read the prompt file ({error.problem}); accepted: "
                               f"{error.accepted}"]) from None
    # surrogateescape keeps a line with invalid UTF-8 readable; check_text then reports exactly that line
    text = data.decode("utf-8", "surrogateescape")
    text = text.removeprefix("\ufeff")
    records = {".txt": _txt_records, ".jsonl": _jsonl_records, ".csv": _csv_records}[extension](text)
    return check_records(records, path, defaults, limits, images, skip_invalid, check_entry)


def check_records(records, source: str, defaults: Generation, limits: Limits, images: int = 1,
                  skip_invalid: bool = False, check_entry=None) -> tuple[list[Entry], list[str]]:
    """Check (line, record-dict or error message) pairs; see read_prompt_file."""
    entries, errors = [], []
    for line, record in records:
        if isinstance(record, str):  # the line could not be read as a record; the text says why
            errors.append(f"{source}:{line}: {record}")
            continue
        try:
            try:
                entry = check_record(line, record, defaults, limits, images)
            except InvalidField:
                raise
            except (ValueError, RecursionError) as error:
                # a value Python cannot even show (an int past its 4300-digit str limit, a list nested past
                # the recursion limit): the checks' own messages fail on it
                raise InvalidField("record", f"holds a value that cannot be read ({type(error).__name__})",
                                   f"the fields {', '.join(RECORD_FIELDS)}, each of its type") from None
            if check_entry is not None:
                check_entry(entry)
            entries.append(entry)
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


def check_record(line: int, record: dict, defaults: Generation, limits: Limits, images: int = 1) -> Entry:
    """One input record (a dict of RECORD_FIELDS) checked against the limits, config defaults filled in."""
    unknown = [key for key in record if key not in RECORD_FIELDS]
    if unknown:
        raise InvalidField(str(unknown[0])[:60], "is not a known field", ", ".join(RECORD_FIELDS))
    if "prompt" not in record:
        raise InvalidField("prompt", "is missing", "every record has a prompt")
    prompt, negative = record["prompt"], record.get("negative_prompt", "")
    check_prompts(prompt, negative, limits)
    count = check_int("images", record.get("images", images), 1, limits.max_images_per_prompt)
    seed = record.get("seed")
    if seed is not None:
        seed = check_int("seed", seed, 0, MAX_SEED)
        if seed + count - 1 > MAX_SEED:
            raise InvalidField("seed", f"{seed} + {count - 1} (one seed per image) passes 2**64-1",
                               f"a seed from 0 to {MAX_SEED - count + 1} for {count} images")
    generation = check_generation({k: record[k] for k in GENERATION_FIELDS if k in record}, limits, defaults)
    model = check_model_name("model", record["model"]) if "model" in record else None
    return Entry(line, prompt, negative, seed, count, generation, model)


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
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _RepeatedKey as repeated:
            yield number, f"key {str(repeated)[:60]!r} appears twice in one object; accepted: each key once"
            continue
        except json.JSONDecodeError as error:
            yield number, f"not valid JSON ({error.msg} at column {error.colno}); accepted: {ONE_OBJECT}"
            continue
        except ValueError as error:  # an integer of more digits than Python converts (int_max_str_digits)
            yield number, f"not readable JSON ({str(error)[:120]}); accepted: {ONE_OBJECT}"
            continue
        except RecursionError:
            yield number, f"not readable JSON (nested too deeply); accepted: {ONE_OBJECT}"
            continue
        if not isinstance(record, dict):
            record = f"a JSON {type(record).__name__}, not an object; accepted: {ONE_OBJECT}"
        yield number, record


class _RepeatedKey(Exception):
    """A JSON object naming one key twice: json.loads would keep the last value without a word."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise _RepeatedKey(key)
        record[key] = value
    return record


def _csv_records(text: str):
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as error:
        yield 1, f"the header cannot be read as CSV ({error}); accepted columns: {', '.join(RECORD_FIELDS)}"
        return
    if header is None:
        return
    columns = [name.strip() for name in header]
    unknown = [name for name in columns if name not in RECORD_FIELDS]
    repeated = [name for index, name in enumerate(columns) if name in columns[:index]]
    if unknown or repeated or "prompt" not in columns:
        problem = f"column {shown(unknown[0])} is not a known field" if unknown \
            else f"names column {repeated[0]!r} twice" if repeated else "has no 'prompt' column"
        once = ", each once" if repeated and not unknown else ""
        yield 1, f"the header {problem}; accepted columns: {', '.join(RECORD_FIELDS)}{once}"
        return
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:  # a cell over the csv module's field limit (131072 characters), ...
            line, start = start, reader.line_num + 1
            yield line, f"cannot be read as CSV ({error}); accepted: cells of at most a prompt's length"
            continue
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
    if name in GENERATION_FIELDS:
        return parse_text(name, cell)
    if name in RECORD_INT_FIELDS:
        try:
            return int(cell)
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


def expand(entries: list[Entry], base_seed: int, model: str | None = None) -> list[Job]:
    """One job per image, in input order; `model` for the entries that name none."""
    jobs = []
    for entry in entries:
        for image in range(entry.images):
            seed = entry.seed + image if entry.seed is not None else derive_seed(base_seed, entry.line, image)
            request = Request(entry.prompt, seed, entry.negative_prompt, entry.generation)
            jobs.append(Job(job_id(entry.line, image), len(jobs), entry.line, image, request,
                            entry.model or model))
    return jobs


def micro_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs of one model with equal generation settings, in chunks of at most `size`, ordered by their first
    job."""
    groups: dict[tuple[str | None, Generation], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.model, job.request.generation), []).append(job)
    batches = [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]
    return sorted(batches, key=lambda batch: batch[0].index)


# --- the run record (storage: {run_id}/run.jsonl) -----------------------------------------------------------

def run_record(run_id: str, header: dict, jobs: list[Job]) -> bytes:
    """The whole run as JSON lines: a header (settings), then one job per line. Enough to rebuild the run
    from storage alone (`sdbatch resume`)."""
    lines = [json.dumps({"run_id": run_id, "version": RUN_RECORD_VERSION, **header}, sort_keys=True)]
    lines += [json.dumps(job.to_dict(), sort_keys=True, ensure_ascii=False) for job in jobs]
    return ("\n".join(lines) + "\n").encode("utf-8")


class RunRecordError(ValueError):
    """A run record that cannot be read back whole: its location, line and problem."""


RUN_RECORD_JOB_KEYS = ("job_id", "index", "line", "image", "model", "prompt", "negative_prompt", "seed",
                       *GENERATION_FIELDS)


def read_run_record(data: bytes, source: str = "run.jsonl") -> tuple[dict, list[Job]]:
    """The header and jobs of a run record (`source` names it in errors). Every line is checked as the
    worker will check it, so that a resumed run never sends a job that a worker could not record (a bad or
    repeated job id would leave the run pending for ever)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RunRecordError(f"{source}: not UTF-8 (byte {error.start}); accepted: the run.jsonl that "
                             "`sdbatch enqueue` wrote") from None
    # split on "\n" only: prompts written with ensure_ascii=False may hold \u2028, which splitlines() cuts at
    header, *rows = text.rstrip("\n").split("\n")
    values = _record_line(source, 1, header)
    jobs, seen = [], set()
    for number, row in enumerate(rows, start=2):
        job = _record_job(source, number, _record_line(source, number, row))
        if job.job_id in seen:
            raise RunRecordError(f"{source}:{number}: job_id {job.job_id!r} appears twice; accepted: "
                                 "each job once")
        seen.add(job.job_id)
        jobs.append(job)
    return values, jobs


def _record_line(source: str, number: int, row: str) -> dict:
    try:
        values = json.loads(row)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, too many digits, nested too deeply
        raise RunRecordError(f"{source}:{number}: not readable JSON ({type(error).__name__}: "
                             f"{str(error)[:120]}); accepted: {ONE_OBJECT}") from None
    if not isinstance(values, dict):
        raise RunRecordError(f"{source}:{number}: a JSON {type(values).__name__}, not an object; "
                             f"accepted: {ONE_OBJECT}")
    return values


def _record_job(source: str, number: int, values: dict) -> Job:
    unknown = [key for key in values if key not in RUN_RECORD_JOB_KEYS]
    try:
        if unknown:
            raise InvalidField(str(unknown[0])[:60], "is not a known field",
                               ", ".join(RUN_RECORD_JOB_KEYS))
        missing = [key for key in ("job_id", "index", "line", "image") if key not in values]
        if missing:
            raise InvalidField(missing[0], "is missing", "job_id, index, line and image on every job line")
        check_job_id(values["job_id"])
        check_int("index", values["index"], 0, 10**12)
        check_int("line", values["line"], 1, 10**12)
        check_int("image", values["image"], 0, 998)
        if "model" in values:
            check_model_name("model", values["model"])
        return Job.from_dict(values)
    except (InvalidField, TypeError) as error:  # TypeError: a Generation field of a shape it cannot take
        raise RunRecordError(f"{source}:{number}: {error}") from None
