"""CLIP tokenizer throughput on a batch of SD prompts, in prompts/s.

    python -m bench.tokenizer [--prompts 1000] [--repeat 5] [--out bench-out/tokenizer.json]

The batch is the parity corpus' SD prompts with a seed and a variation number appended, so most words repeat
from prompt to prompt, as in a real queue. "first": a fresh tokenizer on the bundled vocabulary, so each
distinct word goes through BPE once; "warm": the same batch again, every word served from the tokenizer's
word cache (what a long-lived worker sees). Best of --repeat each.
"""

from __future__ import annotations

import argparse
import time

from bench.common import Report
from sdcore.tokenizer import CLIPTokenizer
from tests.tokenizer_corpus import CORPUS_BY_KIND


def prompts(n: int) -> list[str]:
    base = CORPUS_BY_KIND["sd_prompt"]
    return [f"{base[i % len(base)]}, seed {i}, variation {i * 7919 % 1000}" for i in range(n)]


def seconds(tok: CLIPTokenizer, batch: list[str]) -> float:
    start = time.perf_counter()
    tok(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    report = Report(args.out)
    batch, bundled = prompts(args.prompts), CLIPTokenizer.bundled()

    # Fresh tokenizers are built outside the timing; merge_ranks is in rank order.
    fresh = (CLIPTokenizer(bundled.vocab, list(bundled.merge_ranks)) for _ in range(args.repeat))
    first = min(seconds(tok, batch) for tok in fresh)
    seconds(bundled, batch)  # fills its word cache
    warm = min(seconds(bundled, batch) for _ in range(args.repeat))
    for mode, best in (("first", first), ("warm", warm)):
        report.add(bench="tokenizer", mode=mode, prompts=args.prompts, seconds=best,
                   prompts_per_s=args.prompts / best)
    for row in report.data["results"]:
        print(f"{row['mode']:>5}: {row['prompts']} prompts in {row['seconds'] * 1e3:.1f} ms = "
              f"{row['prompts_per_s']:,.0f} prompts/s")


if __name__ == "__main__":
    main()
