"""`sdbatch gallery RUN`: one self-contained page holding every job of a run in input order, with links that
resolve, user text shown as text, and failures with their reasons; checked as a headless Chromium renders it.

The runs here are made without the model: small colorful PNGs and metadata written in the workers' layout,
and the run record that enqueue writes."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sdcore.params import Generation, Request
from worker import cli, client, progress
from worker.gallery import GALLERY_NAME, PAGE_SIZE, build_gallery
from worker.jobs import Job, job_id, run_record
from worker.storage import LocalStorage

pytest_plugins = ["tests.fixtures_servers"]

RUN = "gallery-run"
HOSTILE_PROMPT = '<script>alert("x")</script> & "quotes" <b>not bold</b>'
SUBJECTS = ("lighthouse at dusk", "red fox in the snow", "blue whale", "castle on a hill", "field of poppies")


def fake_run(store: LocalStorage, run_id: str, count: int, missing: set[int] = frozenset()) -> list[Job]:
    """`count` jobs of one image each; every job but those at the indices in `missing` has its PNG and
    metadata stored, as a worker writes them (64x64, tiny-random's demo size). Job 3's prompt is HTML."""
    from PIL import Image

    jobs = []
    for index in range(count):
        prompt = HOSTILE_PROMPT if index == 3 else f"a {SUBJECTS[index % len(SUBJECTS)]}, study {index}"
        generation = Generation(sampler="ddim", steps=4 + index % 3, width=64, height=64)
        jobs.append(Job(job_id(index + 1, 0), index, index + 1, 0, Request(prompt, 1000 + index, "blurry",
                                                                            generation)))
    header = {"created": 1764000000.0, "base_seed": 0, "jobs": count, "source": "prompts.txt",
              "model": "tiny-random", "precision": "fp32"}
    store.put(f"{run_id}/run.jsonl", run_record(run_id, header, jobs), "application/x-ndjson")
    gradient = Image.linear_gradient("L").resize((64, 64))
    for job in jobs:
        if job.index in missing:
            continue
        hue = Image.new("L", (64, 64), job.index * 47 % 256)
        image = Image.merge("RGB", (gradient, gradient.rotate(90), hue))
        png = io.BytesIO()
        image.save(png, format="PNG")
        image_key = f"{run_id}/images/{job.job_id}.png"
        store.put(image_key, png.getvalue(), "image/png")
        meta = {**job.request.to_dict(), "run_id": run_id, "job_id": job.job_id, "index": job.index,
                "line": job.line, "image": job.image, "image_key": image_key}
        store.put(f"{run_id}/meta/{job.job_id}.json", json.dumps(meta).encode(), "application/json")
    return jobs


class Page(HTMLParser):
    """A gallery page's cards in document order (id, state, links, images, the images with a src, hover
    text, text), and its pages that the script marked current."""

    def __init__(self, html: str):
        super().__init__()
        self.cards, self.current_pages, self.in_card = [], [], False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "current" in classes:
            self.current_pages.append(attrs["id"])
        if tag == "figure":
            self.cards.append({"id": attrs["id"], "state": classes[1], "links": [], "images": [], "shown": [],
                               "title": attrs["title"], "text": ""})
            self.in_card = True
        elif tag == "a" and self.cards and attrs["href"].startswith(("images/", "meta/")):
            self.cards[-1]["links"].append(attrs["href"])
        elif tag == "img":  # a page the script has not shown yet holds its images' sources in data-src
            self.cards[-1]["images"].append(attrs.get("src") or attrs["data-src"])
            self.cards[-1]["shown"] += [attrs["src"]] if "src" in attrs else []

    def handle_endtag(self, tag):
        if tag == "figure":
            self.in_card = False

    def handle_data(self, data):
        if self.in_card:
            self.cards[-1]["text"] += data


# 210 jobs: 200 images, 8 failed, 1 cancelled, 1 pending; two pages of cards
FAILED = {5: "out of memory: CUDA out of memory", 17: "ValueError: <lora:x> is not loaded",
          **{index: "non-finite output" for index in range(60, 66)}}
CANCELLED, PENDING = 100, 205


@pytest.fixture
def run(tmp_path):
    store = LocalStorage(tmp_path / "out")
    jobs = fake_run(store, RUN, 210, missing={*FAILED, CANCELLED, PENDING})
    failures = {jobs[index].job_id: reason for index, reason in FAILED.items()}
    return store, jobs, failures, {jobs[CANCELLED].job_id}


def test_the_page_has_every_job_in_input_order_with_links_to_stored_files(run):
    store, jobs, failures, cancelled = run

    key = build_gallery(store, RUN, failures, cancelled)

    assert key == f"{RUN}/{GALLERY_NAME}"
    page = Page(store.get(key).decode())
    assert [card["id"] for card in page.cards] == [f"job-{job.job_id}" for job in jobs]
    pictured = [card for card in page.cards if card["images"]]
    assert len(pictured) == 200
    for card in page.cards:
        for link in card["links"] + card["images"]:
            assert (store.root / RUN / link).is_file(), link
    done = page.cards[0]
    assert done["images"] == [f"images/{jobs[0].job_id}.png"]
    assert done["links"] == [f"images/{jobs[0].job_id}.png", f"meta/{jobs[0].job_id}.json"]


def test_failed_cancelled_and_pending_jobs_are_cards_with_their_state_and_reason(run):
    store, jobs, failures, cancelled = run

    page = Page(store.get(build_gallery(store, RUN, failures, cancelled)).decode())

    states = {card["id"].removeprefix("job-"): card for card in page.cards}
    for index, reason in FAILED.items():
        card = states[jobs[index].job_id]
        assert card["state"] == "failed" and reason in card["text"] and card["images"] == []
    assert states[jobs[CANCELLED].job_id]["state"] == "cancelled"
    assert states[jobs[PENDING].job_id]["state"] == "pending"
    assert sum(card["state"] == "done" for card in page.cards) == 200


def test_prompts_and_reasons_render_as_text_never_as_markup(run):
    store, jobs, failures, cancelled = run

    html = store.get(build_gallery(store, RUN, failures, cancelled)).decode()

    assert "<script>alert" not in html and "<b>not bold" not in html
    assert html.count("<script>") == 2  # the page's own two
    card = Page(html).cards[3]
    assert HOSTILE_PROMPT in card["text"] and HOSTILE_PROMPT in card["title"]
    assert "<lora:x> is not loaded" in Page(html).cards[17]["text"]


def test_each_card_says_seed_and_settings_and_its_hover_text_has_every_setting(run):
    store, jobs, failures, cancelled = run

    card = Page(store.get(build_gallery(store, RUN, failures, cancelled)).decode()).cards[1]

    assert "seed 1001 · ddim 5 steps · cfg 7.5 · 64×64" in card["text"]
    for line in ("negative_prompt: blurry", "seed: 1001", "sampler: ddim", "steps: 5", "guidance_scale: 7.5",
                 "width: 64", "eta: 0.0", "clip_skip: 1", "loras: none"):
        assert line in card["title"].split("\n"), line


def test_without_redis_state_jobs_without_an_image_are_shown_as_no_image(run):
    store, jobs, _, _ = run

    html = store.get(build_gallery(store, RUN, None)).decode()

    assert "Failure reasons unknown" in html
    assert {card["state"] for card in Page(html).cards} == {"done", "unknown"}


def test_a_missing_run_record_is_an_error_naming_where_it_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"no run record at .*nothing/run.jsonl"):
        build_gallery(LocalStorage(tmp_path), "nothing", {})


# --- the page as a browser renders it --------------------------------------------------------------------

def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    return subprocess.run([binary, "--headless", "--disable-gpu", "--no-sandbox",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def script_errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]


def test_chromium_renders_the_first_page_of_cards_with_its_images(run, tmp_path):
    store, jobs, failures, cancelled = run
    page_file = store.root / build_gallery(store, RUN, failures, cancelled)

    result = chromium("--dump-dom", page_file.as_uri(), profile=tmp_path / "profile")

    assert script_errors(result) == []
    rendered = Page(result.stdout)
    assert rendered.current_pages == ["page-1"]
    first_page, second_page = rendered.cards[:PAGE_SIZE], rendered.cards[PAGE_SIZE:]
    done_on_first = sum(job.index not in {*FAILED, CANCELLED, PENDING} for job in jobs[:PAGE_SIZE])
    assert sum(len(card["shown"]) for card in first_page) == done_on_first == 191
    assert sum(len(card["shown"]) for card in second_page) == 0  # fetched when its page is shown
    assert re.search(r'<a href="#page-1" aria-current="page">1</a>', result.stdout)


def test_chromium_opens_the_page_holding_a_linked_card(run, tmp_path):
    store, jobs, failures, cancelled = run
    page_file = store.root / build_gallery(store, RUN, failures, cancelled)

    result = chromium("--dump-dom", f"{page_file.as_uri()}#job-{jobs[PENDING].job_id}",
                      profile=tmp_path / "profile")

    assert script_errors(result) == []
    rendered = Page(result.stdout)
    assert rendered.current_pages == ["page-2"]
    assert sum(len(card["shown"]) for card in rendered.cards[PAGE_SIZE:]) == 9


# --- sdbatch gallery --------------------------------------------------------------------------------------

@pytest.mark.integration
def test_sdbatch_gallery_writes_the_page_with_redis_failures_and_prints_where(tmp_path, redis_url, capsys,
                                                                               monkeypatch):
    store = LocalStorage(tmp_path / "out")
    jobs = fake_run(store, RUN, 6, missing={1, 2, 4})
    counters = progress.RunProgress(progress.connect(redis_url), RUN)
    counters.begin(len(jobs))
    counters.failed(jobs[1].job_id, "out of memory: <tried 9 GiB>")
    counters.cancelled([jobs[2].job_id])
    config = tmp_path / "sdbatch.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        storage: {{url: "file://{tmp_path / 'out'}"}}
        """))
    monkeypatch.setenv("SDBATCH_BROKER_URL", redis_url)

    status = cli.main(["gallery", RUN, "--config", str(config)])

    out, err = capsys.readouterr()
    assert status == cli.EXIT_OK, err
    assert out.strip() == str(store.root / RUN / GALLERY_NAME)
    states = [card["state"] for card in Page(Path(out.strip()).read_text()).cards]
    assert states == ["done", "failed", "cancelled", "done", "pending", "done"]
    assert "out of memory: &lt;tried 9 GiB&gt;" in Path(out.strip()).read_text()


def test_gallery_without_redis_writes_the_page_from_storage_and_warns(tmp_path, monkeypatch):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    store = LocalStorage(tmp_path / "out")
    fake_run(store, RUN, 3, missing={1})
    config = tmp_path / "sdbatch.yaml"
    config.write_text(f'model: {{checkpoint: tiny-random}}\nstorage: {{url: "file://{tmp_path / "out"}"}}\n')
    # a Redis that refuses at once, instead of progress.connect's ~40 s of retries
    monkeypatch.setattr(progress, "connect",
                        lambda url, master_name=None: redis.Redis(port=1, retry=Retry(NoBackoff(), 0)))
    warnings = []

    location = client.gallery(config, RUN, warnings.append)

    assert location == str(store.root / RUN / GALLERY_NAME)
    assert len(warnings) == 1 and "failure reasons unknown" in warnings[0]
    assert [card["state"] for card in Page(Path(location).read_text()).cards] == ["done", "unknown", "done"]
