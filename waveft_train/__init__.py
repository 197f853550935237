"""waveft-train: personalize Stable Diffusion XL with WaveFT (wavelet fine-tuning).

One folder per concern, stacked from the ground up (docs/architecture.md says why, and tests/test_layout.py holds
every import to it): common, waveft (the tuner), models, config, data, adapter, toy, train, cli.

`waveft_train.load_adapter(pipe, path, scale=1.0)`, `set_adapter_scale` and `unload_adapter` put a trained adapter
on a stock diffusers pipeline (adapter/pipeline.py). They load on first use, so `import waveft_train` (and the
torch-free config) stays light.
"""

from typing import Any

__version__ = "0.1.0"
_PIPELINE_FUNCTIONS = ("load_adapter", "set_adapter_scale", "unload_adapter")
__all__ = ["__version__", *_PIPELINE_FUNCTIONS]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE_FUNCTIONS:
        from waveft_train.adapter import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'waveft_train' has no attribute {name!r}")
