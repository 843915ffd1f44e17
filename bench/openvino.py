"""sdcore on OpenVINO vs diffusers vs diffusers' U-Net on OpenVINO, CPU, full SD 1.5 dimensions (issue 16).

    flock /tmp/sd-heavy.lock python -m bench.openvino [--sizes 256,512] [--repeat 3]
        [--full-image-sizes 256,512] [--precisions bf16,int8] [--out bench-out/openvino.json]
    flock /tmp/sd-heavy.lock python -m bench.openvino --start-up [--out bench-out/openvino-start.json]
    flock /tmp/sd-heavy.lock python -m bench.openvino --service [--out bench-out/openvino-service.json]

Measures, in one process, on the same random weights (sdcore's modules share the diffusers models' storage):
- one U-Net step with CFG (batch 2) at each size: sdcore with backend "openvino", diffusers eager, and
  diffusers' UNet2DConditionModel converted the same way (openvino.convert_model, dynamic shapes, CPU f32):
  alternating rounds, medians, max abs difference to diffusers;
- a full image (text encode + 20 DDPM steps + VAE decode) at each size: sdcore on OpenVINO vs diffusers, and
  the two images' difference in uint8 levels; with --precisions also sdcore on OpenVINO in bf16 / int8,
  against fp32 and diffusers;
- RSS after each phase.
--service runs `sdbatch run` (the worker's own batch code, in one process) on a full-size checkpoint file with
the CPU worker config's settings at 256x256, backend torch (winograd on and off) and openvino, and reports
seconds per image from the images' metadata (generate + upload) and the command's wall time.
--start-up writes a full-size checkpoint file and times fresh processes from start to a first U-Net step:
torch, OpenVINO with an empty cache, OpenVINO from the cache; and each one's RSS. It also pages the torch
weights out (MADV_PAGEOUT, what memory pressure does) and times a step again, for weights loaded as sdcore
loads them now (copies) and as they were (views of the file's mapping).
Each row records the load average seen while it ran.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import PROMPT, SD15_SCHEDULER, Report, configs, reference_models
from bench.cpu_vs_diffusers import STEPS, interleaved

START_UP_SIZE = 256


def rss_gib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def sdcore_on_openvino(references: dict, precision: str = "fp32"):
    """An sdcore Pipeline over the references' own tensors (no copy), U-Net and VAE on OpenVINO."""
    from sdcore.checkpoints import Components
    from sdcore.pipeline import Pipeline
    from sdcore.tokenizer import CLIPTokenizer
    from tests.reference import sdcore_model

    cfg = configs(tiny=False)
    models = {c: sdcore_model(c, references[c], cfg[c]).requires_grad_(False) for c in references}
    pipe = Pipeline(Components(tokenizer=CLIPTokenizer.bundled(), text_encoder=models["text_encoder"],
                               unet=models["unet"], vae=models["vae"], name="sd15-random", weight_files=(),
                               is_random=True))
    pipe.use_openvino(precision)
    return pipe


def diffusers_pipeline(references: dict):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder

    tokenizer = reference_tokenizer(write_clip_tokenizer_folder(Path(tempfile.mkdtemp(prefix="bench-tok-"))))
    tokenizer.model_max_length = 77
    pipe = StableDiffusionPipeline(
        vae=references["vae"], text_encoder=references["text_encoder"], tokenizer=tokenizer,
        unet=references["unet"], scheduler=DDPMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_unet_on_openvino(unet):
    """diffusers' U-Net converted as sdcore.openvino converts sdcore's: traced, dynamic shapes, CPU f32."""
    import openvino as ov

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, context):
            return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    example = (torch.zeros(2, 4, 8, 8), torch.full((2,), 500.0), torch.zeros(2, 77, 768))
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Call(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example,
                                 input=[ov.PartialShape(s) for s in ([-1, 4, -1, -1], [-1], [-1, -1, 768])])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    return lambda x, t, c: torch.from_numpy(request.infer([x.numpy(), t.numpy(), c.numpy()])[0].copy())


def unet_step(ours, theirs, raw, size: int, repeat: int, report: Report) -> None:
    latent = size // 8
    x = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    xx, t = torch.cat([x, x]), torch.full((2,), 500.0)
    calls = {
        "sdcore_openvino": lambda: ours.unet(xx, t, context),
        "diffusers": lambda: theirs.unet(xx, t, encoder_hidden_states=context).sample,
        "diffusers_openvino": lambda: raw(xx, t, context),
    }
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        outputs = {name: call() for name, call in calls.items()}
        times = interleaved(calls, repeat)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    reference = outputs["diffusers"]
    # The best round too: on a shared machine it is the least disturbed one.
    row = dict(bench="unet_step", size=size, batch=2, repeat=repeat, **{f"{n}_s": s for n, s in med.items()},
               **{f"{name}_best_s": min(ts) for name, ts in times.items()},
               ratio_vs_diffusers=med["sdcore_openvino"] / med["diffusers"],
               ratio_vs_diffusers_openvino=med["sdcore_openvino"] / med["diffusers_openvino"],
               diffusers_openvino_vs_diffusers=med["diffusers_openvino"] / med["diffusers"],
               max_abs_diff=(outputs["sdcore_openvino"] - reference).abs().max().item(),
               max_abs_diff_diffusers_openvino=(outputs["diffusers_openvino"] - reference).abs().max().item(),
               output_std=reference.std().item(), times=times, rss_gib=rss_gib(),
               load_avg=[load_before, os.getloadavg()[0]])
    report.add(**row)


def full_image(ours, theirs, size: int, report: Report, others: dict) -> None:
    """One round each after the U-Net steps warmed both up: a diffusers image takes minutes here. `others`:
    sdcore on OpenVINO in other precisions (bf16, int8), compared with fp32 and diffusers."""
    images = {}

    def generate(pipe):
        return pipe.generate([PROMPT], [1], steps=STEPS, sampler="ddpm", guidance_scale=7.5, width=size,
                             height=size, progress=False)[0]

    calls = {"sdcore_openvino": lambda: images.update(sdcore_openvino=generate(ours)),
             "diffusers": lambda: images.update(diffusers=theirs(
                 PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, width=size, height=size,
                 generator=torch.Generator().manual_seed(1)).images[0])}
    for precision, pipe in others.items():
        calls[f"sdcore_openvino_{precision}"] = lambda p=pipe, n=precision: images.update(
            {f"sdcore_openvino_{n}": generate(p)})
    load_before = os.getloadavg()[0]
    times = {}
    for name, call in calls.items():
        gc.collect()
        start = time.perf_counter()
        call()
        times[name] = time.perf_counter() - start
    pixels = {name: np.asarray(image, dtype=int) for name, image in images.items()}
    levels = np.abs(pixels["sdcore_openvino"] - pixels["diffusers"])
    row = dict(bench="full_image", size=size, steps=STEPS, sampler="ddpm",
               **{f"{name}_s": seconds for name, seconds in times.items()},
               ratio_vs_diffusers=times["sdcore_openvino"] / times["diffusers"],
               max_uint8_diff=int(levels.max()), mean_uint8_diff=float(levels.mean()), rss_gib=rss_gib(),
               load_avg=[load_before, os.getloadavg()[0]])
    for precision in others:
        name = f"sdcore_openvino_{precision}"
        vs_fp32, vs_diffusers = (np.abs(pixels[name] - pixels[other]) for other in ("sdcore_openvino",
                                                                                    "diffusers"))
        row.update({f"{precision}_ratio_vs_diffusers": times[name] / times["diffusers"],
                    f"{precision}_vs_fp32_max_uint8_diff": int(vs_fp32.max()),
                    f"{precision}_vs_fp32_mean_uint8_diff": float(vs_fp32.mean()),
                    f"{precision}_vs_diffusers_max_uint8_diff": int(vs_diffusers.max())})
    report.add(**row)


# -- start-up and memory pressure, in fresh processes ------------------------------------------------------

_MADV_PAGEOUT = 21


def page_out(module: torch.nn.Module) -> None:
    """Ask the kernel to reclaim the module's weight pages now, as memory pressure would."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tensor in module.parameters():
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def child(args) -> None:
    """One fresh process: load, time a first CFG U-Net step at START_UP_SIZE, print a JSON line."""
    import sdcore

    start = time.perf_counter()
    if args.child == "mapped":  # the loader before issue 16: fp32 weights stayed views of the file's mapping
        from sdcore.checkpoints.read import MODELS, read_original_layout, select_weights

        weights, _, _ = read_original_layout(Path(args.checkpoint))
        cfg, tensors = select_weights(Path(args.checkpoint), weights, "auto")["unet"]
        with torch.device("meta"):
            unet = MODELS["unet"][0](cfg)
        unet.load_state_dict(tensors, strict=True, assign=True)
        unet.eval().requires_grad_(False)
    else:
        pipe = sdcore.load(args.checkpoint, backend=args.child.split("-")[0])
        unet = pipe.unet
    loaded = time.perf_counter() - start
    latent = START_UP_SIZE // 8
    x, t, context = torch.randn(2, 4, latent, latent), torch.full((2,), 500.0), torch.randn(2, 77, 768)

    def step() -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            unet(x, t, context)
        return time.perf_counter() - began

    row = dict(case=args.child, load_s=loaded, first_step_s=step(), second_step_s=step(), rss_gib=rss_gib())
    if args.child in ("torch", "mapped"):
        page_out(unet)
        row.update(rss_after_page_out_gib=rss_gib(), step_after_page_out_s=step())
    print(json.dumps(row), flush=True)


def start_up(report: Report) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-openvino-", dir=os.environ.get("TMPDIR")))
    try:
        checkpoint = write_checkpoint(folder)
        env = {**os.environ, "SDCORE_OPENVINO_CACHE": str(folder / "cache")}
        for case in ("torch", "mapped", "openvino-empty-cache", "openvino-cached"):
            load_before = os.getloadavg()[0]
            out = subprocess.run([sys.executable, "-m", "bench.openvino", "--child", case, "--checkpoint",
                                  str(checkpoint)], env=env, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            report.add(bench="start_up", size=START_UP_SIZE, **row,
                       load_avg=[load_before, os.getloadavg()[0]])
        cache_bytes = sum(f.stat().st_size for f in (folder / "cache").rglob("*") if f.is_file())
        report.add(bench="cache_size", gib=cache_bytes / 2**30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_checkpoint(folder: Path) -> Path:
    """A full-size random-weight .safetensors in the original layout (the diffusers references' weights)."""
    from tests.fixtures_checkpoints import write_safetensors
    from tests.reference import original_state_dict

    checkpoint = folder / "sd15-random.safetensors"
    references = reference_models()
    write_safetensors(checkpoint, original_state_dict(**references, non_weights=True))
    del references
    gc.collect()
    return checkpoint


SERVICE_CASES = {"torch": dict(backend="torch", winograd=False), "torch-winograd": dict(backend="torch",
                 winograd=True), "openvino": dict(backend="openvino", winograd=False)}


def service(report: Report, images: int, steps: int) -> None:
    """`sdbatch run` per backend, the openvino case after a warm-up run that fills the IR cache."""
    from tests.fixtures_servers import console_script

    folder = Path(tempfile.mkdtemp(prefix="bench-openvino-", dir=os.environ.get("TMPDIR")))
    try:
        checkpoint = write_checkpoint(folder)
        prompts = folder / "prompts.txt"
        prompts.write_text("".join(f"{PROMPT}, variation {n}\n" for n in range(images)))
        env = {**os.environ, "SDCORE_OPENVINO_CACHE": str(folder / "cache")}
        sdbatch = console_script("sdbatch", "pip install -e '.[worker]'")

        def run(case: str, run_id: str) -> dict:
            config = folder / f"{case}.yaml"
            model = SERVICE_CASES[case]
            config.write_text(json.dumps({
                "model": {"checkpoint": str(checkpoint), "device": "cpu", **model},
                "sampling": {"sampler": "dpmpp_2m_karras", "steps": steps, "width": START_UP_SIZE,
                             "height": START_UP_SIZE, "micro_batch": 1},
                "storage": {"url": f"file://{folder / 'out'}"}}))
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run([sdbatch, "run", str(prompts), "--config", str(config), "--run-id", run_id],
                           env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            metas = [json.loads(p.read_text()) for p in (folder / "out" / run_id / "meta").glob("*.json")]
            per_image = [m["timings"]["generate_s"] + m["timings"]["upload_s"] for m in metas]
            return dict(case=case, images=len(metas), wall_s=wall, per_image_s=per_image,
                        median_per_image_s=statistics.median(per_image), backend=metas[0]["backend"]
                        if "backend" in metas[0] else "torch", load_avg=[load_before, os.getloadavg()[0]])

        run("openvino", "warm-up")  # converts the models into the cache, as a worker's first start does
        rows = [run(case, case) for case in SERVICE_CASES]
        torch_s = rows[0]["median_per_image_s"]
        for row in rows:
            report.add(bench="service", size=START_UP_SIZE, steps=steps, **row,
                       vs_torch=row["median_per_image_s"] / torch_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256", help="U-Net step image sizes, comma separated")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per U-Net step size")
    parser.add_argument("--full-image-sizes", default="256", help="full image sizes, comma separated; "
                        "empty skips the full image")
    parser.add_argument("--precisions", default="", help="full image: also sdcore on OpenVINO in these "
                        "precisions, comma separated (bf16 where the CPU has it, int8)")
    parser.add_argument("--start-up", action="store_true", help="start-up and memory-pressure runs only")
    parser.add_argument("--service", action="store_true", help="`sdbatch run` per backend only")
    parser.add_argument("--images", type=int, default=3, help="--service: images per backend")
    parser.add_argument("--steps", type=int, default=10, help="--service: steps per image")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.child:
        return child(args)
    report = Report(args.out)
    if args.start_up:
        return start_up(report)
    if args.service:
        return service(report, args.images, args.steps)
    references = reference_models()
    theirs = diffusers_pipeline(references)
    ours = sdcore_on_openvino(references)
    raw = diffusers_unet_on_openvino(references["unet"])
    report.add(bench="models_ready", rss_gib=rss_gib(), load_avg=os.getloadavg()[0])
    for size in (int(s) for s in args.sizes.split(",") if s):
        unet_step(ours, theirs, raw, size, args.repeat, report)
    del raw
    gc.collect()
    others = {precision: sdcore_on_openvino(references, precision) for precision in args.precisions.split(",")
              if precision}
    report.add(bench="models_ready", precisions=list(others), rss_gib=rss_gib(), load_avg=os.getloadavg()[0])
    for size in (int(s) for s in args.full_image_sizes.split(",") if s):
        full_image(ours, theirs, size, report, others)


if __name__ == "__main__":
    main()
