"""sdcore vs diffusers on the CPU, fp32, full SD 1.5 dimensions, the same random weights, side by side.

    flock /tmp/sd-heavy.lock python -m bench.cpu_vs_diffusers [--sizes 256,512] [--repeat 3]
        [--full-image-size 256] [--full-image-repeat 2] [--winograd both|off|on] [--out bench-out/cpu.json]

Measures, in one process and at the same torch thread count:
- the machine's fp32 matmul peak (2048^3 sgemm), the yardstick for achieved GFLOP/s;
- one U-Net step with CFG (batch 2) at each size, called as each pipeline calls its U-Net;
- a full image (text encode + 20 DDPM steps + VAE decode) through `Pipeline.generate` and diffusers'
  `StableDiffusionPipeline` (set --full-image-size 0 to skip).
Each is measured with sdcore's default direct convolutions and again with `use_winograd` (--winograd both),
each time against diffusers in the same interleaved rounds. Runs alternate (sdcore, diffusers, sdcore, ...)
and report medians, because other processes share this machine; each row records the load average seen
while it ran. Target: ratio sdcore/diffusers <= 0.8.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
import torch

from bench.common import PROMPT, Report, diffusers_pipeline, reference_models, sdcore_pipeline

# SD 1.5 U-Net forward cost per image (design.md): 677 GFLOP at 512x512, 172 at 256x256; it scales with the
# number of latent pixels (the attention part a little faster), so other sizes are not estimated.
UNET_GFLOP_PER_IMAGE = {512: 677.0, 256: 172.0}
STEPS = 20


def matmul_peak_gflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and MKL buffers
    best = min(_seconds(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(calls: dict, repeat: int) -> dict[str, list[float]]:
    """Wall times of `repeat` alternating rounds over `calls` (name -> fn), after one warm-up call each."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            gc.collect()
            times[name].append(_seconds(fn))
    return times


def unet_step(ours, theirs, size: int, repeat: int, peak: float, report: Report) -> None:
    """One U-Net step with CFG, both models called as their pipelines call them."""
    latent = size // 8
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    ours_x = ours.cfg_latents(x)  # repeated as diffusers' are, or once in the Winograd mode
    calls = {
        "sdcore": lambda: ours.unet(ours_x, t.expand(len(ours_x)), context),
        "diffusers": lambda: theirs.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample,
    }
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        max_abs = (calls["sdcore"]() - calls["diffusers"]()).abs().max().item()
        times = interleaved(calls, repeat)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = dict(bench="unet_step", size=size, batch=2, winograd=ours.winograd, repeat=repeat,
               sdcore_s=med["sdcore"],
               diffusers_s=med["diffusers"], ratio=med["sdcore"] / med["diffusers"], times=times,
               max_abs_diff=max_abs, load_avg=[load_before, os.getloadavg()[0]], peak_gflops=peak)
    if size in UNET_GFLOP_PER_IMAGE:
        flops = 2 * UNET_GFLOP_PER_IMAGE[size]
        row.update(sdcore_gflops=flops / med["sdcore"], diffusers_gflops=flops / med["diffusers"],
                   sdcore_fraction_of_peak=flops / med["sdcore"] / peak,
                   diffusers_fraction_of_peak=flops / med["diffusers"] / peak)
    report.add(**row)
    mode = " (winograd)" if ours.winograd else ""
    line = (f"U-Net step {size}x{size} batch 2: sdcore{mode} {med['sdcore']:.2f} s, diffusers "
            f"{med['diffusers']:.2f} s, ratio {row['ratio']:.3f}")
    if "sdcore_gflops" in row:
        line += f"; {row['sdcore_gflops']:.0f} vs {row['diffusers_gflops']:.0f} GFLOP/s (peak {peak:.0f})"
    print(line, flush=True)


def full_image(ours, theirs, size: int, repeat: int, report: Report) -> None:
    images = {}

    def run_sdcore():
        images["sdcore"] = ours.generate([PROMPT], [1], steps=STEPS, sampler="ddpm", guidance_scale=7.5,
                                         width=size, height=size, progress=False)[0]

    def run_diffusers():
        images["diffusers"] = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, width=size,
                                     height=size, generator=torch.Generator().manual_seed(1)).images[0]

    load_before = os.getloadavg()[0]
    times = interleaved({"sdcore": run_sdcore, "diffusers": run_diffusers}, repeat)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    levels = np.abs(np.asarray(images["sdcore"], dtype=int) - np.asarray(images["diffusers"], dtype=int))
    row = dict(bench="full_image", size=size, steps=STEPS, sampler="ddpm", winograd=ours.winograd,
               repeat=repeat,
               sdcore_s=med["sdcore"], diffusers_s=med["diffusers"], ratio=med["sdcore"] / med["diffusers"],
               times=times, max_uint8_diff=int(levels.max()), mean_uint8_diff=float(levels.mean()),
               load_avg=[load_before, os.getloadavg()[0]])
    report.add(**row)
    mode = " (winograd)" if ours.winograd else ""
    print(f"full image {size}x{size}, {STEPS} steps: sdcore{mode} {med['sdcore']:.1f} s, diffusers "
          f"{med['diffusers']:.1f} s, ratio {row['ratio']:.3f}, images {row['max_uint8_diff']} levels apart",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="U-Net step image sizes, comma separated")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per U-Net step size")
    parser.add_argument("--full-image-size", type=int, default=256, help="0 skips the full-image run")
    parser.add_argument("--full-image-repeat", type=int, default=2)
    parser.add_argument("--winograd", choices=("both", "off", "on"), default="both",
                        help="measure sdcore with direct convolutions (off), Winograd (on) or both")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    report = Report(args.out)
    peak = matmul_peak_gflops()
    report.add(bench="fp32_matmul_peak", n=2048, gflops=peak, threads=torch.get_num_threads(),
               load_avg=os.getloadavg()[0])
    references = reference_models()
    ours = sdcore_pipeline(references, "cpu", torch.float32)
    theirs = diffusers_pipeline(references, "cpu", torch.float32)
    del references
    gc.collect()
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.winograd]
    for size in (int(s) for s in args.sizes.split(",") if s):
        # Measured again next to each step: a busy moment at the start would understate the peak.
        peak = max(peak, matmul_peak_gflops())
        for winograd in modes:
            ours.use_winograd(winograd)
            unet_step(ours, theirs, size, args.repeat, peak, report)
    if args.full_image_size:
        for winograd in modes:
            ours.use_winograd(winograd)
            full_image(ours, theirs, args.full_image_size, args.full_image_repeat, report)


if __name__ == "__main__":
    main()
