"""Hostile and broken input (issue #14, round 2): every bad input ends as a named error (sdbatch exits 3 with
one line, sdcore generate/convert exit 1 with one line), never a traceback, a hang or a leaked secret; and
every job a worker consumes ends done, failed with its reason, or cancelled. Real Redis, SeaweedFS and
worker processes where a part of the service is involved (tests/fixtures_servers.py)."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from PIL import Image

from sdcore.cli import main as sdcore_main
from sdcore.params import Generation
from sdcore.png import png_bytes, read_settings
from tests.fixtures_servers import WorkerProcesses, _claim_shared_db, sdbatch_env, wait_for
from tests.test_worker_run import Recorder
from worker import cli, client, progress
from worker.app import make_app
from worker.config import ConfigError, load_config, redact_url
from worker.jobs import PromptFileError, read_prompt_file, read_run_record, run_record
from worker.messages import TASK_NAME, MessageError, capped_time_limits, from_message, queue_list, to_message
from worker.storage import LocalStorage
from worker.validate import Limits

pytest_plugins = ["tests.fixtures_servers"]

REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits()
MINIMAL = "model: {checkpoint: tiny-random, device: cpu}\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def local_config(tmp_path: Path, extra: str = "", storage: str | None = None) -> Path:
    storage = storage or f"file://{tmp_path / 'out'}"
    return write(tmp_path / "sdbatch.yaml", textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 4}}
        storage: {{url: "{storage}"}}
        """) + extra)


def sdbatch_main(capsys, *args) -> tuple[int, str]:
    """`sdbatch ARGS` in this process: (exit status, stderr). A traceback would fail the test by itself."""
    status = cli.main([str(arg) for arg in args])
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, expected: str, code: int = cli.EXIT_INPUT) -> None:
    assert status == code, err
    assert expected in err, err
    assert "Traceback" not in err



# --- 8. sdcore generate / convert: one line and status 1 for every broken file or argument ------------------

def sdcore_error(capsys, *args) -> str:
    status = sdcore_main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.startswith("sdcore ") and err.count("\n") == 1, err
    return err


def png_with_chunk(path: Path, text: str) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sdcore", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A small file whose PNG header claims width x height: what a decompression bomb looks like to PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def valid_settings() -> dict:
    image = Image.new("RGB", (64, 64))
    made = png_bytes(image, {"prompt": "x", "negative_prompt": "", "seed": 1, **Generation().to_dict(),
                             "model": "tiny-random", "model_hash": None, "precision": "fp32",
                             "random_model": True})
    return read_settings(made)


@pytest.mark.parametrize(("chunk", "expected"), [
    ("[1, 2]", "is a JSON list, not an object"),
    ('"text"', "is a JSON str, not an object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("1" * 5000, "not valid JSON"),
    (json.dumps({**valid_settings(), "steps": "many"}), "steps: 'many' is a str"),
    (json.dumps({**valid_settings(), "loras": "detail"}), "loras"),
    (json.dumps({**valid_settings(), "loras": [["a", 1]]}), "loras"),
    (json.dumps({**valid_settings(), "embeddings": [1]}), "embeddings"),
    (json.dumps({**valid_settings(), "vae_file": "x"}), "vae_file"),
    (json.dumps({**valid_settings(), "prompt": 5}), "prompt: 5 is a int"),
], ids=["list", "string", "deep", "huge-int", "steps-str", "loras-str", "loras-pairs", "embeddings-int",
        "vae-file-str", "prompt-int"])  # fmt: skip
def test_from_png_with_a_malformed_sdcore_chunk_is_one_line(tmp_path, capsys, chunk, expected):
    png = png_with_chunk(tmp_path / "odd.png", chunk)

    err = sdcore_error(capsys, "generate", "--from-png", png, "--out", tmp_path / "x.png")

    assert str(png) in err and expected in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--from-png", "--init-image", "--checkpoint", "--lora", "--vae"])
def test_a_fifo_given_for_any_input_file_is_refused_without_waiting(tmp_path, capsys, flag):
    fifo = tmp_path / "input.png"
    os.mkfifo(fifo)
    checkpoint = [] if flag == "--checkpoint" else ["--checkpoint", "tiny-random"]

    err = sdcore_error(capsys, "generate", "x", *checkpoint, flag, fifo, "--device", "cpu", "--steps", "2",
                       "--width", "64", "--height", "64", "--no-progress", "--out", tmp_path / "x.png")

    assert str(fifo) in err and ("not a regular file" in err or "no such" in err)


def test_an_unknown_device_is_one_line(tmp_path, capsys):
    err = sdcore_error(capsys, "generate", "x", "--checkpoint", "tiny-random", "--device", "foo",
                       "--out", tmp_path / "x.png")

    assert "--device: 'foo' is not a device" in err


def test_a_decompression_bomb_init_image_is_one_line(tmp_path, capsys):
    bomb = png_claiming_size(tmp_path / "bomb.png", 50_000, 50_000)

    err = sdcore_error(capsys, "generate", "x", "--checkpoint", "tiny-random", "--init-image", bomb,
                       "--steps", "2", "--width", "64", "--height", "64", "--out", tmp_path / "x.png")

    assert f"--init-image {bomb}" in err and "(2500000000 pixels)" in err


@pytest.mark.parametrize(("config", "expected"), [
    (b"[]", "is a JSON list, not an object"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_a_diffusers_folder_with_a_broken_config_names_the_file(tmp_path, capsys, config, expected):
    unet = tmp_path / "model" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_bytes(config)

    err = sdcore_error(capsys, "generate", "x", "--checkpoint", tmp_path / "model", "--device", "cpu",
                       "--out", tmp_path / "x.png")

    assert str(unet / "config.json") in err and expected in err


@pytest.mark.parametrize("content", [b"\x80" + b"\x00" * 64, b"\x80\x02}q\x00(X"])
def test_a_corrupt_legacy_pickle_is_one_line(tmp_path, capsys, content):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(content)

    err = sdcore_error(capsys, "generate", "x", "--checkpoint", broken, "--device", "cpu",
                       "--out", tmp_path / "x.png")

    assert str(broken) in err


def safetensors_with_header_length(path: Path, length_low_byte: int, data: bytes) -> Path:
    """A safetensors file whose 8-byte header length starts with `length_low_byte` (the header is padded
    with spaces, which the format allows): 0x80 is also how a legacy PyTorch pickle starts."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((length_low_byte - len(header)) % 256)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_read_as_safetensors(tmp_path):
    from sdcore.checkpoints.read import read_file

    made = safetensors_with_header_length(tmp_path / "w.safetensors", 0x80, struct.pack("<2f", 1.5, -2.0))

    tensors, mapped = read_file(made)

    assert made.read_bytes()[0] == 0x80 and tensors["w"].tolist() == [1.5, -2.0] and mapped


def test_a_corrupt_safetensors_file_whose_first_byte_is_0x80_is_one_line(tmp_path, capsys):
    broken = safetensors_with_header_length(tmp_path / "broken.safetensors", 0x80, b"\0" * 3)

    err = sdcore_error(capsys, "generate", "x", "--checkpoint", broken, "--device", "cpu",
                       "--out", tmp_path / "x.png")

    assert str(broken) in err and "corrupt" in err


def test_a_corrupt_safetensors_file_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    broken.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)

    err = sdcore_error(capsys, "generate", "x", "--checkpoint", broken, "--device", "cpu",
                       "--out", tmp_path / "x.png")

    assert str(broken) in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from sdcore.checkpoints import convert_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    made = folder / "made.png"
    assert sdcore_main(["generate", "x", "--checkpoint", "tiny-random", "--steps", "1", "--width", "64",
                        "--height", "64", "--no-progress", "--out", str(made)]) == 0
    from safetensors.torch import save_file

    import sdcore
    from sdcore.checkpoints.layout import ORIGINAL_PREFIXES

    pipe = sdcore.load("tiny-random")
    modules = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    tensors = {ORIGINAL_PREFIXES[name] + key: value.contiguous()
               for name, module in modules.items() for key, value in module.state_dict().items()}
    original = folder / "tiny.safetensors"
    save_file(tensors, original)
    convert_checkpoint(original, folder / "check.safetensors")
    return original


def test_convert_into_a_missing_folder_is_one_line(tmp_path, capsys, tiny_checkpoint):
    err = sdcore_error(capsys, "convert", tiny_checkpoint, tmp_path / "no" / "such" / "out.safetensors")

    assert str(tmp_path / "no" / "such") in err and "no such folder" in err


def test_convert_onto_a_directory_is_one_line_and_leaves_nothing(tmp_path, capsys, tiny_checkpoint):
    target = tmp_path / "a-folder"
    target.mkdir()

    err = sdcore_error(capsys, "convert", tiny_checkpoint, target)

    assert str(target) in err and "is a folder" in err
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


# --- 2. YAML alias bombs and values whose repr never ends ---------------------------------------------------

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, from a few hundred bytes of YAML
BOMB = ("[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
        "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
        "&f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], "
        "[*h,*h,*h,*h,*h,*h,*h,*h,*h]]")
BOMBED_FIELDS = [("model", "checkpoint"), ("model", "vae"), ("model", "device"), ("sampling", "sampler"),
                 ("sampling", "steps"), ("broker", "url"), ("broker", "queue"), ("storage", "url"),
                 ("storage", "endpoint_url"), ("limits", "max_steps"), ("adapters", "dir")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("section", "key"), BOMBED_FIELDS, ids=[".".join(f) for f in BOMBED_FIELDS])
def test_an_alias_bomb_in_any_config_field_is_refused_at_once(tmp_path, section, key):
    sections = {"model": {"checkpoint": "tiny-random", "device": "cpu"}}
    sections.setdefault(section, {})[key] = "BOMB"
    text = "".join(f"{name}: {{{', '.join(f'{k}: {v}' for k, v in values.items())}}}\n"
                   for name, values in sections.items()).replace("BOMB", BOMB)
    config = write(tmp_path / "bomb.yaml", text)
    assert len(text) < 600

    result = subprocess.run([sys.executable, "-m", "worker.cli", "status", "r1", "--config", str(config)],
                            capture_output=True, text=True, timeout=50, cwd=REPO)

    assert result.returncode == 3, result.stderr
    assert "more than 100000 values once its YAML aliases are expanded" in result.stderr
    assert len(result.stderr) < 500 and "Traceback" not in result.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("model: {checkpoint: " + "1" * 5000 + "}\n", "not valid YAML (Exceeds the limit"),
    ("model: {checkpoint: " + "[" * 100_000 + "}\n", "not valid YAML"),
    ("model: {checkpoint: " + "[" * 3000 + "]" * 3000 + "}\n", "not valid YAML (nested too deeply)"),
    ("model: {checkpoint: tiny-random}\nlimits: {max_steps: " + "9" * 4000 + "}\n",
     "limits.max_steps: an integer of 13288 bits is out of range"),
    ("model: {checkpoint: tiny-random, device: " + "x" * 5000 + "}\n", "model.device: 'xxxxx"),
    ("model: {checkpoint: tiny-random}\nsampling: {" + "k" * 1000 + ": 1}\n", "sampling.kkkkk"),
    ("model: {checkpoint: tiny-random}\nsampling: {" + "k" * 5000 + ": 1}\n", "not valid YAML"),
], ids=["huge-int", "unclosed", "deep", "huge-limit", "long-device", "long-key", "too-long-key"])
def test_a_config_value_too_big_to_show_is_a_short_named_error(tmp_path, text, expected):
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path / "odd.yaml", text), environ={})

    assert expected in str(refused.value) and len(str(refused.value)) < 1000


def test_a_config_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    config = write(tmp_path / "twice.yaml", MINIMAL + "sampling: {steps: 20, steps: 50}\n")

    with pytest.raises(ConfigError, match="key 'steps' appears twice in one mapping"):
        load_config(config, environ={})


def test_a_config_that_is_a_fifo_or_a_device_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)

    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ConfigError, match="cannot read config \\(not a regular file\\)"):
            load_config(path, environ={})


# --- 3. secrets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["redis://:pa#ss@host:6379/0", "redis://:p/ss@host:6379/0",
                                 "redis://:pa?ss@host:6379/0", "redis://user:a#b/c?d@host:6380/1",
                                 "rediss://:plain@host:6380/0"])
def test_redact_url_hides_a_password_holding_url_delimiters(url):
    password = url.split("@")[0].split(":")[-1]

    shown = redact_url(url)

    assert password not in shown and shown.endswith("***@" + url.rpartition("@")[2])


def test_a_bad_scheme_broker_url_with_such_a_password_is_not_printed(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path / "c.yaml", MINIMAL),
                    environ={"SDBATCH_BROKER_URL": "amqp://u:se#cr/et@h/"})

    assert "se#cr" not in str(refused.value) and "et@h" not in str(refused.value)
    assert "SDBATCH_BROKER_URL: 'amqp://u:***@h/' is not a Redis URL" in str(refused.value)


def test_credentials_in_the_s3_endpoint_url_are_refused_unprinted(tmp_path):
    config = write(tmp_path / "c.yaml", MINIMAL + 'storage: {url: "s3://bucket/p", endpoint_url: '
                   '"http://AKIAKEY:TOPSECRET@s3.internal:9000"}\n')

    with pytest.raises(ConfigError) as refused:
        load_config(config, environ={})

    assert "TOPSECRET" not in str(refused.value) and "AKIAKEY" not in str(refused.value)
    assert "storage.endpoint_url: holds credentials" in str(refused.value)
    assert "AWS_ACCESS_KEY_ID" in str(refused.value)


def test_a_password_in_the_yaml_broker_url_is_refused_with_where_it_belongs(tmp_path):
    config = write(tmp_path / "c.yaml", MINIMAL + 'broker: {url: "redis://:hunter2@redis:6379/0"}\n')

    with pytest.raises(ConfigError) as refused:
        load_config(config, environ={})

    assert "hunter2" not in str(refused.value)
    assert "broker.url: holds a password" in str(refused.value)
    assert "SDBATCH_BROKER_URL=redis://:PASSWORD@HOST:PORT/DB" in str(refused.value)


def test_the_settings_repr_holds_no_broker_password(tmp_path):
    settings = load_config(write(tmp_path / "c.yaml", MINIMAL),
                           environ={"SDBATCH_BROKER_URL": "redis://:hunter2@redis:6379/0"})

    assert settings.broker.url == "redis://:hunter2@redis:6379/0"
    assert "hunter" not in repr(settings) and "redis://:***@redis:6379/0" in repr(settings)


@pytest.mark.parametrize("url", ["redis://:hunter#2@redis:6379/0", "redis://:hun/ter2@redis:6379/0",
                                 "redis://:hunter2@redis:65536/0", "redis://:hunter2@redis:port/0"])
def test_a_broker_url_redis_would_misread_is_refused_unprinted(tmp_path, url):
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path / "c.yaml", MINIMAL), environ={"SDBATCH_BROKER_URL": url})

    assert "hun" not in str(refused.value) and "redis://:***@" in str(refused.value)
    assert "percent-encoded" in str(refused.value) or "has a bad port" in str(refused.value)


# --- 4. prompt files: bounded reads of regular files only --------------------------------------------------

@pytest.mark.timeout(30)
def test_a_prompt_file_linked_to_dev_zero_is_refused_without_reading_it(tmp_path):
    link = tmp_path / "prompts.txt"
    link.symlink_to("/dev/zero")

    with pytest.raises(PromptFileError, match="cannot read the prompt file \\(not a regular file\\)"):
        read_prompt_file(link, Generation(), LIMITS)


@pytest.mark.timeout(30)
def test_a_fifo_prompt_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)

    with pytest.raises(PromptFileError, match="not a regular file"):
        read_prompt_file(fifo, Generation(), LIMITS)


def test_a_prompt_file_over_the_configured_byte_limit_is_refused(tmp_path, capsys):
    prompts = write(tmp_path / "prompts.txt", "a red fox\n" * 100)
    config = local_config(tmp_path, "limits: {max_prompt_file_bytes: 500}\n")

    status, err = sdbatch_main(capsys, "enqueue", prompts, "--config", config)

    assert_one_line_error(status, err, f"{prompts}: cannot read the prompt file (larger than 500 bytes); "
                                       "accepted: a regular file of at most limits.max_prompt_file_bytes")
    assert load_config(config, environ={}).limits.max_prompt_file_bytes == 500


# --- 5. input errors are exit 3 with one line, never a traceback -------------------------------------------

@pytest.mark.parametrize("name", ["missing.txt", "folder.txt"])
def test_a_missing_or_folder_prompt_file_exits_3(tmp_path, capsys, name):
    (tmp_path / "folder.txt").mkdir()

    status, err = sdbatch_main(capsys, "enqueue", tmp_path / name, "--config", local_config(tmp_path))

    expected = "No such file or directory" if name == "missing.txt" else "not a regular file"
    assert_one_line_error(status, err, f"{tmp_path / name}: cannot read the prompt file ({expected}")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("p.csv", "prompt\n" + "x" * 131_073 + "\nfine\n", "p.csv:2: cannot be read as CSV (field larger than"),
    ("p.jsonl", "[" * 200_000 + "\n", "p.jsonl:1: not readable JSON (nested too deeply)"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "seed": ' + "7" * 5000 + "}\n",
     "p.jsonl:2: not readable JSON (Exceeds the limit (4300 digits)"),
    ("p.csv", "prompt,prompt\na,b\n", "p.csv:1: the header names column 'prompt' twice"),
    ("p.jsonl", '{"prompt": "a", "steps": 20, "steps": 50}\n', "p.jsonl:1: key 'steps' appears twice"),
], ids=["csv-huge-cell", "jsonl-deep", "jsonl-huge-int", "csv-repeated-column", "jsonl-repeated-key"])
def test_an_unreadable_line_is_named_and_the_others_still_count(tmp_path, name, text, expected):
    path = write(tmp_path / name, text)

    with pytest.raises(PromptFileError) as refused:
        read_prompt_file(path, Generation(), LIMITS)

    assert expected in str(refused.value).replace(str(tmp_path) + "/", "")


def test_skip_invalid_keeps_the_good_lines_around_a_5000_digit_seed(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "seed": ' + "7" * 5000 + '}\n'
                 '{"prompt": "c"}\n')

    entries, errors = read_prompt_file(path, Generation(), LIMITS, skip_invalid=True)

    assert [entry.prompt for entry in entries] == ["a", "c"]
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: not readable JSON")


def test_an_int_too_long_to_show_from_python_is_a_named_error():
    with pytest.raises(PromptFileError, match="prompts:1: record: holds a value that cannot be read"):
        client.prepare([{"prompt": "x", "seed": 10**5000}], load_config(REPO / "configs" / "demo.yaml"))


@pytest.mark.parametrize("out", ["a-file", "/sys/kernel/sdbatch-out"], ids=["file", "read-only"])
def test_run_into_an_output_that_is_not_a_writable_folder_exits_3(tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("x")
    out = out if out.startswith("/") else tmp_path / out
    prompts = write(tmp_path / "prompts.txt", "a red fox\n")

    status, err = sdbatch_main(capsys, "run", prompts, "--config", local_config(tmp_path), "--out", out,
                               "--run-id", "r1")

    assert_one_line_error(status, err, f"sdbatch: storage: put {out}/r1/run.jsonl: ")


def test_an_output_folder_replaced_by_a_file_mid_run_fails_each_job_with_its_reason(tmp_path):
    from worker.batch import BatchRunner, load_pipeline, process

    settings = load_config(local_config(tmp_path), environ={})
    store = LocalStorage(tmp_path / "out")
    run_id, jobs, _, _ = client.prepare(["a red fox", "a blue bird"], settings, run_id="swapped")
    store.put(f"{run_id}/images/0000000-000.png", b"earlier")
    (tmp_path / "out" / run_id / "images").rename(tmp_path / "moved")
    (tmp_path / "out" / run_id / "images").write_text("not a folder any more")
    recorder = Recorder()
    runner = BatchRunner(load_pipeline(settings.model), store, "test")
    process(to_message(run_id, jobs), runner, settings.limits, lambda _: recorder)
    failures = recorder.failures

    assert recorder.finished == [] and sorted(failures) == ["0000001-000", "0000002-000"]
    assert all(reason.startswith(f"storage: put {tmp_path / 'out' / run_id / 'images'}") for reason in
               failures.values())


def run_record_with(tmp_path, rows: list[str]) -> bytes:
    settings = load_config(local_config(tmp_path), environ={})
    run_id, jobs, _, header = client.prepare(["a red fox", "a blue bird"], settings, run_id="edited")
    header_line, *_ = run_record(run_id, header, jobs).decode().split("\n")
    return ("\n".join([header_line, *rows]) + "\n").encode()


def good_row(tmp_path, **changes) -> str:
    settings = load_config(local_config(tmp_path), environ={})
    _, jobs, _, _ = client.prepare(["a red fox"], settings, run_id="edited")
    return json.dumps({**jobs[0].to_dict(), **changes})


@pytest.mark.parametrize(("row", "expected"), [
    ("not json", "run.jsonl:2: not readable JSON (JSONDecodeError"),
    ("[1]", "run.jsonl:2: a JSON list, not an object"),
    ("EXTRA", "run.jsonl:2: colour: is not a known field"),
    ("BAD_ID", "run.jsonl:2: job_id: '../x' is not a valid job id"),
    ("NO_ID", "run.jsonl:2: job_id: is missing"),
    ("BAD_LORAS", "run.jsonl:2: "),
    ("TWICE", "run.jsonl:3: job_id '0000001-000' appears twice"),
], ids=["not-json", "list", "extra-key", "bad-id", "no-id", "bad-loras", "repeated-id"])
def test_a_run_record_with_a_bad_line_names_the_file_and_line(tmp_path, row, expected):
    rows = {"EXTRA": [good_row(tmp_path, colour="red")], "BAD_ID": [good_row(tmp_path, job_id="../x")],
            "NO_ID": [json.dumps({k: v for k, v in json.loads(good_row(tmp_path)).items() if k != "job_id"})],
            "BAD_LORAS": [good_row(tmp_path, loras=[["a"]])],
            "TWICE": [good_row(tmp_path), good_row(tmp_path)]}.get(row, [row])
    data = run_record_with(tmp_path, rows)

    with pytest.raises(ValueError) as refused:
        read_run_record(data, "s3://b/runs/edited/run.jsonl")

    assert f"s3://b/runs/edited/{expected}" in str(refused.value)


def test_resume_over_an_edited_run_record_exits_3_naming_its_line(tmp_path, capsys):
    config = local_config(tmp_path)
    LocalStorage(tmp_path / "out").put("edited/run.jsonl", run_record_with(tmp_path, [good_row(tmp_path,
                                                                                               job_id="x")]))

    status, err = sdbatch_main(capsys, "resume", "edited", "--config", config)

    assert_one_line_error(status, err, f"{tmp_path / 'out' / 'edited' / 'run.jsonl'}:2: job_id: 'x' is not")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_concurrent_enqueues_of_one_run_id_create_the_run_once(tmp_path, redis_url, s3_server, monkeypatch,
                                                               backend):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage = f"s3://{s3_server.create_bucket()}/runs" if backend == "s3" else None
    settings = load_config(local_config(tmp_path, storage=storage), environ=sdbatch_env("x", redis_url,
                                                                                         s3_server))
    start, outcomes = threading.Barrier(6), []

    def enqueue() -> None:
        start.wait()
        try:
            outcomes.append(client.enqueue(["a red fox", "a blue bird"], settings, run_id="same"))
        except client.RunError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=enqueue) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count("same") == 1
    assert all("run same already exists" in str(o) for o in outcomes if o != "same")
    assert redis.Redis.from_url(redis_url).llen(queue_list(settings.broker.queue)) == 1  # 1 micro-batch of 2


# --- 9. silent or unclear -----------------------------------------------------------------------------------

def test_a_bad_broker_port_exits_3_before_any_run_is_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDBATCH_BROKER_URL", "redis://:pw@127.0.0.1:99999/0")
    prompts = write(tmp_path / "prompts.txt", "a red fox\n")

    status, err = sdbatch_main(capsys, "enqueue", prompts, "--config", local_config(tmp_path))

    assert_one_line_error(status, err, "SDBATCH_BROKER_URL: 'redis://:***@127.0.0.1:99999/0' has a bad port "
                                       "(not a number from 0 to 65535)")
    assert not (tmp_path / "out").exists()


def test_run_on_a_missing_gpu_exits_3_before_any_run_is_recorded(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = write(tmp_path / "gpu.yaml", "model: {checkpoint: tiny-random, device: cuda, precision: fp16}\n"
                   f"storage: {{url: \"file://{tmp_path / 'out'}\"}}\n")
    prompts = write(tmp_path / "prompts.txt", "a red fox\n")

    status, err = sdbatch_main(capsys, "run", prompts, "--config", config, "--run-id", "gpu")

    assert_one_line_error(status, err, "device 'cuda' is not available")
    assert not (tmp_path / "out" / "gpu").exists()


@pytest.mark.parametrize("item", [None, 7, ["a"], b"bytes"], ids=["none", "int", "list", "bytes"])
def test_enqueue_from_python_names_an_item_that_is_no_prompt(item):
    with pytest.raises(PromptFileError) as refused:
        client.prepare(["ok", item], load_config(REPO / "configs" / "demo.yaml"))

    assert f"prompts:2: {item!r} is a {type(item).__name__}; accepted: a prompt string, or a dict" \
        in str(refused.value)


def test_a_message_refused_whole_still_names_its_run_and_jobs(tmp_path):
    settings = load_config(local_config(tmp_path, "limits: {max_steps: 999}\n"), environ={})
    _, jobs, _, _ = client.prepare([{"prompt": "x", "steps": 600}, "y"], settings, run_id="steep")
    message = to_message("steep", [jobs[0]])

    with pytest.raises(MessageError) as refused:
        from_message(message, Limits(max_steps=500))

    assert "steps: 600 is out of range; accepted: an integer from 1 to 500" in str(refused.value)
    assert (refused.value.run_id, refused.value.job_ids) == ("steep", ("0000001-000",))


@pytest.mark.parametrize(("requested", "expected"), [
    ((1e9, 1e9), (30, 27)), ((-5, -5), (30, 27)), ((10, 50), (10, 9)), ((10, 8), (10, 8)),
    (("x", None), (30, 27)), ((float("nan"), 5), (30, 5)), ((True, 1), (30, 1)), (None, (30, 27)),
    ((5, 0.5), (5, 0.5)),
])
def test_a_message_cannot_lift_or_break_the_deployments_time_limit(requested, expected):
    assert capped_time_limits(requested, 30) == expected


# --- the service: a worker stricter than its client (1, 7, 9) ----------------------------------------------

@dataclass
class Service:
    worker: object
    env: dict
    strict: object  # the worker's settings: limits.max_steps 500
    lenient: object  # a client's settings for the same queue, allowing 999 steps
    lenient_config: Path

    def counters(self, run_id: str) -> progress.RunProgress:
        return progress.RunProgress(progress.connect(self.strict.broker.url), run_id)

    def wait(self, what: str, ready) -> None:
        wait_for(ready, what, 120, self.worker.process, self.worker.log_path)


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_server):
    """One CPU worker (tiny-random, limits.max_steps 500) on a Redis db and an S3 bucket of its own, shared
    by this module's tests, which use run ids of their own."""
    folder = tmp_path_factory.mktemp("strict")
    db, lock = _claim_shared_db()
    broker = f"redis://127.0.0.1:6379/{db}"
    redis.Redis.from_url(broker).flushdb()
    s3_server.start()
    bucket = s3_server.create_bucket()
    base = textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 4}}
        broker: {{queue: sdbatch-hostile}}
        storage: {{url: "s3://{bucket}/runs"}}
        """)
    strict = write(folder / "worker.yaml", base + "limits: {max_steps: 500, batch_time_limit: 30}\n")
    lenient = write(folder / "client.yaml", base + "limits: {max_steps: 999, batch_time_limit: 30}\n")
    env = sdbatch_env(strict, broker, s3_server)
    workers = WorkerProcesses(folder)
    try:
        worker, = workers.start(1, strict, env)
        yield Service(worker, env, load_config(strict, environ=env), load_config(lenient, environ=env),
                      lenient)
    finally:
        workers.kill_all()
        redis.Redis.from_url(broker).flushdb()
        lock.close()


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


@pytest.mark.integration
def test_a_message_the_worker_refuses_whole_ends_its_jobs_failed_with_the_reason(service, aws_env):
    run_id = client.enqueue([{"prompt": "steep", "steps": 600}, "fine"], service.lenient, run_id="steep")
    counters = service.counters(run_id)

    service.wait("the refused message's jobs recorded", lambda: counters.status().finished)
    waited = subprocess.run([sys.executable, "-m", "worker.cli", "status", run_id, "--config",
                             str(service.lenient_config), "--wait"], env=service.env, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    listed = subprocess.run([sys.executable, "-m", "worker.cli", "failed", run_id, "--config",
                             str(service.lenient_config)], env=service.env, capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    retried = client.retry(service.lenient, run_id)
    service.wait("the retried job refused again", lambda: counters.failures())

    assert waited.returncode == cli.EXIT_FAILED
    assert f"{run_id}: 1/2 done, 1 failed, 0 pending" in waited.stdout
    assert "0000001-000\tline 1\tmessage refused by the worker: steps: 600 is out of range; accepted: an " \
           "integer from 1 to 500" in listed.stdout
    assert retried == 1 and list(counters.failures()) == ["0000001-000"]


@pytest.mark.integration
def test_a_message_asking_for_a_negative_time_limit_still_runs(service, aws_env):
    run_id, jobs, _, header = client.prepare(["a red fox", "a blue bird"], service.strict, run_id="negative")
    counters = service.counters(run_id)
    counters.begin(len(jobs))

    make_app(service.strict).send_task(TASK_NAME, args=[to_message(run_id, jobs)],
                                       queue=service.strict.broker.queue, soft_time_limit=-5, time_limit=-5)
    service.wait("the batch with a -5 s time limit", lambda: counters.status().finished)

    assert counters.status().done == 2 and counters.failures() == {}


@pytest.mark.integration
def test_celerys_built_in_tasks_are_not_served(service, aws_env):
    log = service.worker.log_path
    app = make_app(service.strict)

    app.send_task("celery.accumulate", args=[1, 2], queue=service.strict.broker.queue)
    service.wait("the built-in task refused", lambda: "celery.accumulate" in log.read_text())

    assert "Received unregistered task of type 'celery.accumulate'" in log.read_text()


def sdbatch_bounded(env: dict, *args) -> subprocess.CompletedProcess:
    """`sdbatch ARGS` in a session of its own, killed whole (a worker's Celery children too) if it is still
    running after 120 s: what a regression that lets the command start would do."""
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", *map(str, args)], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.integration
def test_missing_s3_credentials_are_a_config_error_at_enqueue_and_at_worker_start(service, tmp_path):
    env = {k: v for k, v in service.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    prompts = write(tmp_path / "prompts.txt", "a red fox\n")

    enqueued = sdbatch_bounded(env, "enqueue", str(prompts), "--config", service.lenient_config)
    started = sdbatch_bounded(env, "worker", "--devices", "cpu", "--config", service.lenient_config)

    for result in (enqueued, started):
        assert result.returncode == cli.EXIT_INPUT, result.stderr
        assert "no S3 credentials" in result.stderr and "AWS_ACCESS_KEY_ID" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_refused_s3_credentials_are_a_config_error_at_enqueue_and_at_worker_start(service, tmp_path):
    env = {**service.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    prompts = write(tmp_path / "prompts.txt", "a red fox\n")

    enqueued = sdbatch_bounded(env, "enqueue", str(prompts), "--config", service.lenient_config)
    started = sdbatch_bounded(env, "worker", "--devices", "cpu", "--config", service.lenient_config)

    for result in (enqueued, started):
        assert result.returncode == cli.EXIT_INPUT, result.stderr
        assert "the store refused the credentials (SignatureDoesNotMatch)" in result.stderr
        assert "wrong-secret" not in result.stderr and "Traceback" not in result.stderr
