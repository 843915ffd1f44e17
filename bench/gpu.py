"""GPU throughput: sdcore at 512x512, 50 steps, with CFG, fp16 and bf16, micro-batch 1/4/8/16, eager vs
torch.compile, against diffusers' StableDiffusionPipeline on the same weights in the same run. First, the
checks that only a GPU can make (seconds, on tiny-random): CUDA fp32/fp16/bf16 images against CPU fp32, batch
invariance and identical reruns in fp16, and the fp16 VAE overflow guard.

    python -m bench.gpu --out bench-out/gpu.json          # on a CUDA machine; bench/gpu.sh wraps it
    python -m bench.gpu --tiny --device cpu --steps 2     # smoke test of the script itself

Images/s counts whole images (text encoding, all steps, VAE decode). The fraction of peak uses the bf16
matmul rate measured at the start of the run and 70 TFLOP per 512x512 image at 50 steps with CFG.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sdcore
from bench.common import PROMPT, Report, diffusers_pipeline, reference_models, sdcore_pipeline, sync, timed

FLOP_PER_IMAGE = 70e12  # SD 1.5, 512x512, 50 steps with CFG (U-Net 677 GFLOP/image-step x 2 rows + VAE)


def matmul_peak(device, dtype=torch.bfloat16, n=8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(10)], device) / 10
    return 2 * n**3 / seconds


def levels(a, b) -> dict:
    d = np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))
    return {"max": int(d.max()), "mean": round(float(d.mean()), 4)}


def correctness_checks(report: Report, device) -> None:
    """What CPU tests cannot show: precision on the device, batch invariance there, the fp16 decode guard."""
    prompts, seeds = ["a lighthouse at dusk", "a red car", "a forest", "a cat"], [1, 2, 3, 4]
    kw = dict(steps=8, sampler="dpmpp_2m", width=64, height=64, progress=False)
    reference = sdcore.load("tiny-random", device="cpu").generate(prompts, seeds, **kw)
    for precision in ("fp32", "fp16", "bf16"):
        pipe = sdcore.load("tiny-random", device=device, dtype=precision)
        got = pipe.generate(prompts, seeds, **kw)
        report.add(check=f"tiny-random {precision} on {device.type} vs CPU fp32",
                   levels=[levels(g, r) for g, r in zip(got, reference, strict=True)])
    pipe = sdcore.load("tiny-random", device=device, dtype="fp16")
    alone = pipe.generate([prompts[0]], [42], **kw)[0]
    in_3 = pipe.generate(["x", prompts[0], "y"], [5, 42, 6], **kw)
    in_8 = pipe.generate([f"n{i}" for i in range(5)] + [prompts[0], "n6", "n7"],
                         [9, 8, 7, 6, 5, 42, 4, 3], **kw)
    rerun = pipe.generate(["x", prompts[0], "y"], [5, 42, 6], **kw)
    report.add(check="fp16 batch invariance (same prompt+seed in batches of 3 and 8 vs alone)",
               batch_3=levels(in_3[1], alone), batch_8=levels(in_8[5], alone),
               rerun_identical=bool(np.array_equal(np.asarray(rerun[1]), np.asarray(in_3[1]))))
    # A decoder whose first conv overflows fp16 must still give finite pixels (redone in fp32).
    with torch.no_grad():
        weight = pipe.vae.decoder.conv_in.weight
        weight *= 60000 / weight.abs().max().item()
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(device)
        raw_finite = bool(torch.isfinite(pipe.vae.decode(latents.half())).all())
        guarded_finite = bool(torch.isfinite(pipe.decode(latents * 0.18215)).all())
    report.add(check="fp16 VAE overflow guard", raw_fp16_decode_finite=raw_finite,
               guarded_decode_finite=guarded_finite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--budget", type=float, default=420, help="seconds; skip what would not fit")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the script, not the GPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    report = Report(args.out)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    correctness_checks(report, device)
    peak = matmul_peak(device) if device.type == "cuda" else float("nan")
    report.data["bf16_matmul_flops"] = peak
    print(f"bf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s", flush=True)

    references = reference_models(tiny=args.tiny)
    size, steps = args.size, args.steps

    def run_sdcore(pipe, mb, n_steps):
        return pipe.generate([PROMPT] * mb, seeds=list(range(mb)), steps=n_steps, sampler="ddpm",
                             width=size, height=size, progress=False)

    def run_diffusers(pipe, mb, n_steps):
        gens = [torch.Generator().manual_seed(s) for s in range(mb)]
        return pipe([PROMPT] * mb, num_inference_steps=n_steps, width=size, height=size, generator=gens,
                    output_type="np").images

    def measure(label, fn, pipe, mb, **extra):
        try:
            fn(pipe, mb, 2)  # warm-up: kernels, cudnn autotune, compile for this shape
            seconds = timed(lambda: fn(pipe, mb, steps), device)
        except Exception as error:  # one failed variant must not cost the rest of a scarce GPU run
            report.add(impl=label, micro_batch=mb, error=f"{type(error).__name__}: {error}"[:500], **extra)
            return None
        ips = mb / seconds
        report.add(impl=label, micro_batch=mb, steps=steps, size=size, seconds=round(seconds, 3),
                   images_per_s=round(ips, 3), fraction_of_bf16_peak=round(ips * FLOP_PER_IMAGE / peak, 3),
                   **extra)
        return seconds

    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        pipe = sdcore_pipeline(references, device, dtype, tiny=args.tiny)
        for mb in batches:
            if left() < 30:
                print(f"skipping sdcore {precision} mb {mb}: budget", flush=True)
                continue
            measure("sdcore eager", run_sdcore, pipe, mb, precision=precision)
        if precision == "fp16":
            # Same weights, same seed: how far sdcore's fp16 image is from diffusers' fp16 image.
            dpipe = diffusers_pipeline(references, device, dtype)
            ours = np.stack([np.asarray(im) for im in run_sdcore(pipe, 1, 20)]).astype(int)
            theirs = np.round(run_diffusers(dpipe, 1, 20) * 255).astype(int)
            report.add(check="fp16 20-step image sdcore vs diffusers",
                       max_level_diff=int(abs(ours - theirs).max()),
                       mean_level_diff=float(abs(ours - theirs).mean()))
            for mb in (1, batches[-1]):
                if left() > 40:
                    measure("diffusers eager", run_diffusers, dpipe, mb, precision=precision)
            del dpipe
        pipe.unet = pipe.unet.to(memory_format=torch.channels_last)
        if left() > 40:
            measure("sdcore eager channels_last", run_sdcore, pipe, batches[-1], precision=precision)
        pipe.unet = pipe.unet.to(memory_format=torch.contiguous_format)
        compiled = torch.compile(pipe.unet)
        eager_unet, pipe.unet = pipe.unet, compiled
        for mb in (batches[-1],):
            if left() > 150:
                t0 = time.perf_counter()
                try:
                    run_sdcore(pipe, mb, 2)
                except Exception as error:
                    report.add(impl="sdcore torch.compile", micro_batch=mb, precision=precision,
                               error=f"{type(error).__name__}: {error}"[:500])
                    continue
                sync(device)
                compile_s = time.perf_counter() - t0
                measure("sdcore torch.compile", run_sdcore, pipe, mb, precision=precision,
                        compile_seconds=round(compile_s, 1))
            else:
                print(f"skipping compile {precision} mb {mb}: budget", flush=True)
        pipe.unet = eager_unet
        del pipe, compiled
        torch.cuda.empty_cache() if device.type == "cuda" else None
    report.data["wall_seconds"] = round(time.perf_counter() - start, 1)
    report.save()
    print(f"done in {report.data['wall_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
