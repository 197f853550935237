"""waveft-train: personalize Stable Diffusion XL with WaveFT (wavelet fine-tuning)."""

__version__ = "0.1.0"
