"""Stable Diffusion 1.5 from scratch in PyTorch.

    import sdcore
    pipe = sdcore.load("v1-5-pruned-emaonly.safetensors")   # device "auto": CUDA in fp16 when there is one
    images = pipe.generate(["a lighthouse at dusk"], seeds=[1], steps=20, sampler="euler_a")

`import sdcore` does not import torch: `Pipeline` and `load` are imported on first use, so torch-free code
(sdcore.params, sdcore.png) serves clients that only check requests.
"""

__all__ = ["Pipeline", "load"]


def __getattr__(name: str):
    if name in __all__:
        from sdcore import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdcore' has no attribute {name!r}")
