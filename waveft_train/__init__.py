"""waveft-train: personalize Stable Diffusion XL with WaveFT (wavelet fine-tuning).

One folder per concern, stacked from the ground up (docs/architecture.md says why, and tests/test_layout.py holds
every import to it): common, waveft (the tuner), models, config, data, adapter, toy, train, cli.
"""

__version__ = "0.1.0"
