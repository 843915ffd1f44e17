"""Shared set-up for the benchmarks: full SD 1.5 sized models with the same random weights in sdcore and in
diffusers (no pretrained weights can be downloaded here), and small timing helpers.

Benchmarks import the test helpers (tests/reference.py) for the diffusers side, so run them from the
repository root: `python -m bench.NAME`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from sdcore.checkpoints import Components
from sdcore.config import CLIPConfig, UNetConfig, VAEConfig, tiny_clip, tiny_unet, tiny_vae
from sdcore.pipeline import Pipeline
from sdcore.tokenizer import CLIPTokenizer

SEEDS = {"unet": 11, "vae": 12, "text_encoder": 13}
PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic light"


def configs(tiny: bool):
    if tiny:
        return {"unet": tiny_unet(), "vae": tiny_vae(), "text_encoder": tiny_clip()}
    return {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": CLIPConfig()}


def reference_models(tiny: bool = False) -> dict[str, torch.nn.Module]:
    """diffusers/transformers models with scaled random weights, fp32 on the CPU."""
    from tests.reference import reference_text_encoder, reference_unet, reference_vae

    cfg = configs(tiny)
    return {
        "unet": reference_unet(cfg["unet"], SEEDS["unet"]),
        "vae": reference_vae(cfg["vae"], SEEDS["vae"]),
        "text_encoder": reference_text_encoder(cfg["text_encoder"], SEEDS["text_encoder"]),
    }


def sdcore_pipeline(references: dict, device, dtype, tiny: bool = False) -> Pipeline:
    """An sdcore Pipeline with the same weights as `references`, loaded by name from the original layout."""
    from tests.reference import sdcore_model

    cfg = configs(tiny)
    models = {c: sdcore_model(c, references[c], cfg[c]) for c in references}
    # .to() copies, so the sdcore models stop sharing storage with the references here.
    models = {c: m.to(device=device, dtype=dtype).requires_grad_(False) for c, m in models.items()}
    parts = Components(tokenizer=CLIPTokenizer.bundled(), text_encoder=models["text_encoder"],
                       unet=models["unet"], vae=models["vae"], name="sd15-random", weight_files=(),
                       is_random=True)
    return Pipeline(parts)


def diffusers_pipeline(references: dict, device, dtype):
    """diffusers' StableDiffusionPipeline on the same weights, with SD 1.5's DDPM scheduler config."""
    import copy

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from tests.fixtures_tokenizer import reference_tokenizer, write_clip_tokenizer_folder

    folder = write_clip_tokenizer_folder(Path(tempfile.mkdtemp(prefix="bench-tok-")))
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    tokenizer = reference_tokenizer(folder)
    tokenizer.model_max_length = 77  # what SD 1.5's tokenizer_config.json sets; the pipeline pads to it
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(references["vae"]), text_encoder=copy.deepcopy(references["text_encoder"]),
        tokenizer=tokenizer, unet=copy.deepcopy(references["unet"]), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "prediction_type": "epsilon",
}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls, in seconds, with the device synchronized around each."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Report:
    """Results written to a JSON file after every measurement, so a run cut short keeps what it measured."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.data = {"machine": machine(), "results": []}

    def add(self, **row) -> None:
        self.data["results"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))
