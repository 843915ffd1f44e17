"""Stable Diffusion 1.5 from scratch in PyTorch.

    import sdcore
    pipe = sdcore.load("v1-5-pruned-emaonly.safetensors", device="cuda")   # or "tiny-random"
    images = pipe.generate(["a lighthouse at dusk"], seeds=[1], steps=20, sampler="euler_a")
"""

from sdcore.pipeline import Pipeline, load

__all__ = ["Pipeline", "load"]
