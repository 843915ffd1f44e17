"""`sdbatch run` (the embedded default: no Redis, no S3) and the task body it shares with the Celery worker:
images and metadata that match their input lines, byte-identical reruns, bad jobs that fail alone."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdcore.params import Generation, Request
from worker.batch import BatchRunner, load_pipeline, process
from worker.config import load_config
from worker.jobs import Job
from worker.messages import MessageError, to_message
from worker.storage import LocalStorage

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [line for line in (REPO / "examples" / "prompts.txt").read_text().split("\n") if line.strip()]


def sdbatch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`sdbatch run examples/prompts.txt --config configs/demo.yaml` from a fresh copy of the repo's files."""
    clone = tmp_path_factory.mktemp("clone")
    for folder in ("configs", "examples"):
        shutil.copytree(REPO / folder, clone / folder)
    result = sdbatch("run", "examples/prompts.txt", "--config", "configs/demo.yaml", "--run-id", "demo",
                     cwd=clone)
    return clone, result


def test_demo_run_writes_an_image_and_metadata_per_prompt_into_outputs(demo_run):
    clone, result = demo_run

    assert result.returncode == 0, result.stderr
    run = clone / "outputs" / "demo"
    assert len(list((run / "images").glob("*.png"))) == len(PROMPTS) == 12
    assert len(list((run / "meta").glob("*.json"))) == 12
    assert (run / "run.jsonl").exists()
    assert result.stdout.strip().endswith(f"12 images, 0 failed: {Path('outputs') / 'demo'}")


def test_demo_run_metadata_matches_each_input_line(demo_run):
    from sdcore.png import read_settings

    clone, _ = demo_run
    settings = load_config(clone / "configs" / "demo.yaml")
    lines = (clone / "examples" / "prompts.txt").read_text().split("\n")
    for meta_path in sorted((clone / "outputs" / "demo" / "meta").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        png = read_settings(clone / "outputs" / "demo" / "images" / f"{meta['job_id']}.png")
        assert meta["prompt"] == png["prompt"] == lines[meta["line"] - 1]
        assert meta["job_id"] == png["job_id"] == f"{meta['line']:07d}-000"
        assert (meta["steps"], meta["sampler"], meta["width"], meta["height"]) == \
            (settings.sampling.generation.steps, settings.sampling.generation.sampler, 64, 64)
        assert meta["seed"] == png["seed"] and meta["run_id"] == png["run_id"] == "demo"
        assert meta["random_model"] is png["random_model"] is True  # tiny-random says so everywhere


def test_a_rerun_of_the_same_run_writes_byte_identical_images(demo_run, tmp_path):
    clone, _ = demo_run

    again = sdbatch("run", "examples/prompts.txt", "--config", "configs/demo.yaml", "--run-id", "demo",
                    "--out", str(tmp_path), cwd=clone)

    assert again.returncode == 0, again.stderr
    for image in sorted((clone / "outputs" / "demo" / "images").glob("*.png")):
        assert (tmp_path / "demo" / "images" / image.name).read_bytes() == image.read_bytes()


def test_run_refuses_a_bad_prompt_file_listing_every_bad_line_and_writes_nothing(tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": ""}\n{"prompt": "x", "steps": 0}\n{"prompt": "y"}\n')

    result = sdbatch("run", str(prompts), "--config", str(REPO / "configs" / "demo.yaml"), "--out",
                     str(tmp_path / "out"), cwd=tmp_path)

    assert result.returncode == 3
    assert f"{prompts}:2: prompt: is empty or only whitespace" in result.stderr
    assert f"{prompts}:3: steps: 0 is out of range" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_run_id_that_could_escape_the_output_folder(tmp_path):
    result = sdbatch("run", str(REPO / "examples" / "prompts.txt"), "--config",
                     str(REPO / "configs" / "demo.yaml"), "--run-id", "../../x",
                     "--out", str(tmp_path / "out"), cwd=tmp_path)

    assert result.returncode == 3
    assert "run_id: '../../x' is not a valid run id" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x").exists()


# --- the task body, in-process ------------------------------------------------------------------------------

class Recorder:
    """What a run's progress counters would hold, kept in memory."""

    def __init__(self):
        self.finished, self.failures = [], {}

    def started(self):
        pass

    def state(self):
        return "active"

    def done(self, job_id, image_sha256=None):
        self.finished.append(job_id)

    def failed(self, job_id, reason):
        self.failures[job_id] = reason


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(load_config(REPO / "configs" / "demo.yaml").model)


def jobs_of(seeds: list[int]) -> list[Job]:
    generation = Generation("ddim", 2, 7.5, 64, 64, 0.0)
    return [Job(f"{n + 1:07d}-000", n, n + 1, 0, Request(f"prompt {n}", seed, "", generation))
            for n, seed in enumerate(seeds)]


class FailingOn:
    """The pipeline, except that a pass holding `seed` raises (as a CUDA error would): sdcore refuses a bad
    request when it is made, so no request a job can hold makes the real pipeline raise."""

    def __init__(self, pipe, seed: int):
        self.pipe, self.seed = pipe, seed

    def run(self, requests, **options):
        if any(request.seed == self.seed for request in requests):
            raise RuntimeError(f"seed {self.seed}: CUDA error: an illegal memory access")
        return self.pipe.run(requests, **options)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_a_job_that_raises_fails_alone_and_its_neighbours_are_written(pipe, tmp_path):
    store, recorder = LocalStorage(tmp_path), Recorder()
    batch = jobs_of([1, 2, 3])

    BatchRunner(FailingOn(pipe, seed=2), store, "test@host").run("r", batch, recorder)

    assert recorder.finished == ["0000001-000", "0000003-000"]
    assert list(recorder.failures) == ["0000002-000"] and "seed" in recorder.failures["0000002-000"]
    assert store.list("r/images") == ["r/images/0000001-000.png", "r/images/0000003-000.png"]


def test_process_rejects_a_malformed_message_before_touching_anything(pipe, tmp_path):
    store = LocalStorage(tmp_path)

    with pytest.raises(MessageError, match="version 9 is not supported"):
        process({**to_message("r", jobs_of([1])), "version": 9}, BatchRunner(pipe, store, "h"),
                load_config(REPO / "configs" / "demo.yaml").limits, lambda run_id: None)

    assert store.list("r") == []


def test_a_batch_of_a_run_in_another_store_fails_naming_both_and_writes_nothing(pipe, tmp_path):
    store, limits = LocalStorage(tmp_path / "mine"), load_config(REPO / "configs" / "demo.yaml").limits
    elsewhere, here = Recorder(), Recorder()

    process(to_message("r", jobs_of([1]), storage="s3://their-bucket/runs"), BatchRunner(pipe, store, "h"),
            limits, lambda _: elsewhere)
    process(to_message("r", jobs_of([2]), storage=store.identity), BatchRunner(pipe, store, "h"), limits,
            lambda _: here)

    assert elsewhere.failures == {"0000001-000": (
        f"the run lives in s3://their-bucket/runs, this worker writes to file://{tmp_path / 'mine'}; "
        "accepted: workers whose storage (storage.url, SDBATCH_STORAGE_URL) is the run's")}
    assert here.finished == ["0000001-000"] and store.list("r/images") == ["r/images/0000001-000.png"]


def test_model_winograd_reaches_the_pipeline_and_the_metadata(tmp_path):
    from worker.config import ModelSettings

    fast = load_pipeline(ModelSettings(checkpoint="tiny-random", device="cpu", winograd=True))
    assert fast.winograd
    store, recorder = LocalStorage(tmp_path), Recorder()
    BatchRunner(fast, store, "test@host").run("run-w", jobs_of([5]), recorder)
    meta = json.loads((tmp_path / "run-w" / "meta" / f"{jobs_of([5])[0].job_id}.json").read_text())
    assert meta["winograd"] is True


def test_sdbatch_config_in_the_environment_stands_in_for_config_on_every_command(monkeypatch, capsys):
    from worker.cli import main

    with pytest.raises(SystemExit):
        main(["status", "some-run"])
    assert "the following arguments are required: --config" in capsys.readouterr().err
    monkeypatch.setenv("SDBATCH_CONFIG", str(REPO / "configs" / "demo.yaml"))
    monkeypatch.setenv("SDBATCH_BROKER_URL", "redis://127.0.0.1:6379/15")

    assert main(["status", "no-such-run"]) == 3
    assert "run no-such-run has no counters on redis://127.0.0.1:6379/15" in capsys.readouterr().err


def test_help_lists_the_exit_codes_and_every_sdbatch_variable_the_code_reads(capsys):
    import re

    from worker.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    read = set(re.findall(r"SDBATCH_[A-Z0-9_]*[A-Z0-9]", "".join(
        path.read_text() for path in (REPO / "worker").glob("*.py"))))
    assert read and {name for name in read if name not in shown} == set()
    assert all(f"{code} " in shown for code in range(5))
