"""Winograd against oneDNN's direct convolution, per convolution shape of the SD 1.5 U-Net, CPU fp32.

    flock /tmp/sd-heavy.lock python -m bench.winograd [--repeat 7] [--out bench-out/winograd.json]

For each shape (batch 2 = one CFG step): the direct convolution, F(2x2, 3x3) and F(4x4, 3x3) in alternating
rounds (best of --repeat each), the speed-up over direct, which algorithm `WinogradConv2d` picks for it, and
each algorithm's largest error against a float64 convolution on unit-scale outputs.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import Report
from sdcore.models.winograd import F4_MIN_PIXELS, MIN_WORK, transform_weight, winograd_conv3x3

# (Cin, Cout, side): the resnet and upsampler convolutions of each U-Net level at 256x256 and 512x512.
SHAPES = [
    (320, 320, 32), (640, 640, 16), (1280, 1280, 8), (1280, 1280, 4),  # 256x256
    (320, 320, 64), (640, 640, 32), (1280, 1280, 16),  # 512x512 (8x8 as above)
    (960, 320, 64), (1920, 640, 32), (2560, 1280, 16),  # first convolutions of decoder blocks
    (320, 320, 9),  # under MIN_WORK: stays direct
]
BATCH = 2


def best_times(calls: list, repeat: int) -> list[float]:
    for call in calls:
        call()
    best = [float("inf")] * len(calls)
    for _ in range(repeat):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def chosen(c_in: int, c_out: int, side: int) -> str:
    if BATCH * c_in * c_out * side * side < MIN_WORK:
        return "direct"
    return "F(4x4)" if side * side >= F4_MIN_PIXELS else "F(2x2)"


def measure(c_in: int, c_out: int, side: int, repeat: int, generator: torch.Generator) -> dict:
    x = torch.randn(BATCH, c_in, side, side, generator=generator)
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator) / (9 * c_in) ** 0.5
    bias = torch.randn(c_out, generator=generator)
    calls = [partial(F.conv2d, x, weight, bias, padding=1),
             partial(winograd_conv3x3, x, transform_weight(weight, 2), bias, 2),
             partial(winograd_conv3x3, x, transform_weight(weight, 4), bias, 4)]
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    errors = [(call().double() - exact).abs().max().item() for call in calls]
    direct, f2, f4 = best_times(calls, repeat)
    return dict(bench="winograd_conv", batch=BATCH, c_in=c_in, c_out=c_out, side=side, direct_ms=direct * 1e3,
                f2_ms=f2 * 1e3, f4_ms=f4 * 1e3, f2_speedup=direct / f2, f4_speedup=direct / f4,
                chosen=chosen(c_in, c_out, side), max_abs_error_direct=errors[0], max_abs_error_f2=errors[1],
                max_abs_error_f4=errors[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    report = Report(args.out)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for c_in, c_out, side in SHAPES:
            report.add(**measure(c_in, c_out, side, args.repeat, generator))
    print(f"{'conv':>20} {'direct ms':>10} {'F(2x2)':>8} {'F(4x4)':>8}  chosen   errors direct/F2/F4")
    for row in report.data["results"]:
        print(f"{row['c_in']:>5} -> {row['c_out']:<5} {row['side']:>3}^2 {row['direct_ms']:>10.1f} "
              f"{row['f2_speedup']:>7.2f}x {row['f4_speedup']:>7.2f}x  {row['chosen']:<8} "
              f"{row['max_abs_error_direct']:.0e}/{row['max_abs_error_f2']:.0e}/{row['max_abs_error_f4']:.0e}")


if __name__ == "__main__":
    main()
