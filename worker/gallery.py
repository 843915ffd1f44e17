"""`sdbatch gallery RUN`: one self-contained HTML page of a run, stored next to its images.

The page, `{run_id}/index.html`, is built from what storage holds: the run record (every job in input
order, with its prompt, seed and settings) and one listing each of `images/` and `meta/`; no image or
metadata file is read, so a 10,000-image run in a bucket costs three requests and a few listing pages. The
states that only Redis knows (failed with a reason, cancelled) come in as arguments; without them
(`failures=None`: Redis unreachable, or the run's counters gone) a job without an image is shown as
"no image", reason unknown.

Self-contained: inline CSS and a small inline script, no external resources, and only relative links
(`images/JOB.png`, `meta/JOB.json`), so the same page works from a local folder (file://), offline, and served
from the bucket (an S3 website endpoint serves it for `RUN/`; the viewer needs read access to the run's
prefix: a presigned URL signs the page alone, not the images it links).

Thumbnails are the full PNGs shown in a fixed square: at SD sizes (a 512x512 PNG is ~0.4 MB) a screenful
costs a few MB, so no second set of thumbnail files is written. Every card is in the HTML (links that work
without the script, and that html.parser can check); the script shows one page of PAGE_SIZE cards at a time,
which keeps the browser's layout work to one page however large the run, and gives a page's images their
`src` when it shows it; with `loading="lazy"` a browser then fetches those on screen (BENCHMARKS.md,
"Gallery page").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from html import escape

from worker.jobs import Job, RunRecordError, read_run_record
from worker.storage import Storage

GALLERY_NAME = "index.html"
PAGE_SIZE = 200
THUMBNAIL_PX = 192


@dataclass(frozen=True)
class Card:
    """One job as the page shows it."""

    job: Job
    state: str  # done | failed | cancelled | pending | unknown (no image, and Redis's word is missing)
    reason: str  # why it failed, or "" for the other states
    image: bool  # images/JOB.png is stored
    meta: bool  # meta/JOB.json is stored


STATE_LABELS = {"done": "done", "failed": "failed", "cancelled": "cancelled", "pending": "pending",
                "unknown": "no image"}


def build_gallery(store: Storage, run_id: str, failures: dict[str, str] | None,
                  cancelled: frozenset[str] | set[str] = frozenset()) -> str:
    """Write `{run_id}/index.html` into `store`; returns its key. `failures`: job id -> reason (Redis's
    failed hash), None when unknown; `cancelled`: the job ids of Redis's cancelled set."""
    record_key = f"{run_id}/run.jsonl"
    try:
        record = store.get(record_key)
    except KeyError:
        raise RunRecordError(f"run {run_id}: no run record at {store.location(record_key)}; accepted: the id "
                             "`sdbatch enqueue` printed, with the same storage settings") from None
    header, jobs = read_run_record(record, store.location(record_key))
    images, metas = set(store.list(f"{run_id}/images")), set(store.list(f"{run_id}/meta"))
    cards = [_card(run_id, job, images, metas, failures, cancelled)
             for job in sorted(jobs, key=lambda job: job.index)]
    key = f"{run_id}/{GALLERY_NAME}"
    store.put(key, render(run_id, header, cards, failures is not None).encode("utf-8"),
              "text/html; charset=utf-8")
    return key


def _card(run_id: str, job: Job, images: set[str], metas: set[str], failures: dict[str, str] | None,
          cancelled: frozenset[str] | set[str]) -> Card:
    image = f"{run_id}/images/{job.job_id}.png" in images
    meta = f"{run_id}/meta/{job.job_id}.json" in metas
    if image and meta:  # what `sdbatch resume` counts as complete
        return Card(job, "done", "", image, meta)
    if failures is None:
        return Card(job, "unknown", "", image, meta)
    if job.job_id in failures:
        return Card(job, "failed", failures[job.job_id], image, meta)
    return Card(job, "cancelled" if job.job_id in cancelled else "pending", "", image, meta)


def render(run_id: str, header: dict, cards: list[Card], states_known: bool) -> str:
    """The page: a summary, a page index, and every card in sections of PAGE_SIZE."""
    counts = {state: 0 for state in STATE_LABELS}
    for card in cards:
        counts[card.state] += 1
    pages = [cards[start:start + PAGE_SIZE] for start in range(0, len(cards), PAGE_SIZE)] or [[]]
    summary = ", ".join(f"{count} {STATE_LABELS[state]}" for state, count in counts.items() if count)
    created = header.get("created")
    details = [f"model {header.get('model', '?')} ({header.get('precision', '?')})",
               f"base seed {header.get('base_seed', '?')}", f"source {header.get('source', '?')}"]
    if isinstance(created, int | float):
        details.insert(0, "enqueued " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created)))
    note = "" if states_known else (
        '<p class="note">Failure reasons unknown: Redis was not reachable or holds no counters for this run; '
        'jobs without an image are shown as "no image".</p>')
    index = "".join(f'<a href="#page-{number}">{number}</a>' for number in range(1, len(pages) + 1))
    sections = "\n".join(_section(number, page, len(cards)) for number, page in enumerate(pages, start=1))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdbatch run {escape(run_id)}</title>
<style>{STYLE}</style>
<script>document.documentElement.classList.add("paged")</script>
</head>
<body>
<header>
<h1>Run {escape(run_id)}</h1>
<p class="summary">{len(cards)} jobs: {escape(summary or "none")}</p>
<p class="details">{escape(" · ".join(str(detail) for detail in details))}</p>
{note}
<nav class="pager" aria-label="pages">{index}</nav>
</header>
<main>
{sections}
</main>
<script>{PAGER}</script>
</body>
</html>
"""


def _section(number: int, cards: list[Card], total: int) -> str:
    first = (number - 1) * PAGE_SIZE + 1
    heading = f"Jobs {first}–{first + len(cards) - 1} of {total}" if cards else "No jobs"
    # only the first page's images have a src in the markup: the script gives a page's images theirs when it
    # shows the page, so a browser without lazy loading (headless Chromium loads every lazy image) fetches
    # one page of images, not the run's
    source = "src" if number == 1 else "data-src"
    body = "\n".join(_figure(card, source) for card in cards)
    return f'<section class="page" id="page-{number}">\n<h2>{heading}</h2>\n{body}\n</section>'


def _figure(card: Card, source: str) -> str:
    job = card.job
    image_path = f"images/{job.job_id}.png"
    if card.image:  # shown in the stylesheet's fixed square, whatever the image's own size
        picture = (f'<a href="{image_path}"><img {source}="{image_path}" loading="lazy" decoding="async" '
                   f'alt="image {job.job_id}"></a>')
    else:
        picture = f'<div class="placeholder">{STATE_LABELS[card.state]}</div>'
    state = "" if card.state == "done" else f' <span class="state">{STATE_LABELS[card.state]}</span>'
    reason = f'<p class="reason">{escape(card.reason)}</p>' if card.reason else ""
    meta = f' <a href="meta/{job.job_id}.json">meta</a>' if card.meta else ""
    return (f'<figure class="card {card.state}" id="job-{job.job_id}" title="{escape(_tooltip(card))}">'
            f'{picture}<figcaption><p class="ids"><span>#{job.index + 1} {job.job_id}</span>{state}</p>'
            f'{reason}<p class="prompt">{escape(job.request.prompt)}</p>'
            f'<p class="settings">{escape(_settings_line(job))}{meta}</p></figcaption></figure>')


def _settings_line(job: Job) -> str:
    generation = job.request.generation
    return (f"seed {job.request.seed} · {generation.sampler} {generation.steps} steps · "
            f"cfg {generation.guidance_scale:g} · {generation.width}×{generation.height}")


def _tooltip(card: Card) -> str:
    """Every setting of the job, one a line: the hover text of its card."""
    job = card.job
    values = job.request.to_dict()
    lines = [f"job {job.job_id} (input line {job.line}, image {job.image}): {STATE_LABELS[card.state]}"]
    if card.reason:
        lines.append(f"reason: {card.reason}")
    for name, value in values.items():
        if name == "loras":
            value = ", ".join(f"{lora['name']}:{lora['weight']:g}" for lora in value) or "none"
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


STYLE = f"""
:root {{ color-scheme: light dark; --card: {THUMBNAIL_PX}px; }}
body {{ font: 14px/1.35 system-ui, sans-serif; margin: 0 16px 32px; }}
h1 {{ font-size: 20px; margin: 12px 0 4px; }}
h2 {{ font-size: 14px; font-weight: 600; margin: 12px 0 6px; grid-column: 1 / -1; }}
header p {{ margin: 2px 0; }}
.details {{ opacity: .75; }}
.note {{ color: #b45309; }}
.pager {{ display: flex; flex-wrap: wrap; gap: 4px; margin: 8px 0; }}
.pager a {{ padding: 2px 8px; border: 1px solid #8884; border-radius: 4px; text-decoration: none; }}
.pager a[aria-current] {{ background: #2563eb; color: #fff; }}
.page {{ display: grid; grid-template-columns: repeat(auto-fill, var(--card)); gap: 12px; }}
.paged .page:not(.current) {{ display: none; }}
.card {{ margin: 0; width: var(--card); }}
.card img, .placeholder {{ display: block; width: var(--card); height: var(--card); object-fit: contain;
  background: #8882; border-radius: 4px; }}
.placeholder {{ display: flex; align-items: center; justify-content: center; font-weight: 600; opacity: .7; }}
.failed .placeholder {{ background: #dc262633; color: #dc2626; opacity: 1; }}
.cancelled .placeholder {{ background: #8884; }}
figcaption p {{ margin: 2px 0; overflow-wrap: anywhere; }}
.ids {{ display: flex; justify-content: space-between; font-size: 12px; opacity: .8; }}
.state {{ font-weight: 600; }}
.failed .state, .reason {{ color: #dc2626; }}
.reason {{ font-size: 12px; display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical;
  overflow: hidden; }}
.prompt {{ display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden; }}
.settings {{ font-size: 12px; opacity: .8; }}
"""

# Shows the page named by the address's #page-N, or the one holding #job-ID (a link to one card), else the
# first; plain anchors, so a page or a card can be linked and the back button works.
PAGER = """
(function () {
  var pages = document.querySelectorAll("main > .page");
  var links = document.querySelectorAll(".pager a");
  function show() {
    var target = location.hash ? document.getElementById(decodeURIComponent(location.hash.slice(1))) : null;
    var page = target ? target.closest(".page") : null;
    page = page || pages[0];
    var images = page.querySelectorAll("img[data-src]");
    for (var j = 0; j < images.length; j++) {
      images[j].src = images[j].getAttribute("data-src");
      images[j].removeAttribute("data-src");
    }
    for (var i = 0; i < pages.length; i++) {
      pages[i].classList.toggle("current", pages[i] === page);
      if (pages[i] === page) { links[i].setAttribute("aria-current", "page"); }
      else { links[i].removeAttribute("aria-current"); }
    }
    if (target) { target.scrollIntoView(); }
  }
  window.addEventListener("hashchange", show);
  show();
})();
"""
