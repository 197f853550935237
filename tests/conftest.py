"""Shared test fixtures. Tests never touch the network or the user's caches.

HF_HUB_OFFLINE is set before anything imports huggingface_hub (it reads the variable at import), so an
accidental hub access fails fast instead of hanging.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def waveft_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """WAVEFT_TRAIN_CACHE for the whole session: a temp folder, so nothing is written to ~/.cache."""
    cache_dir = tmp_path_factory.mktemp("waveft-train-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WAVEFT_TRAIN_CACHE", str(cache_dir))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache_dir


@pytest.fixture(scope="session")
def tiny_model_dir(waveft_cache_dir: Path) -> Path:
    """The tiny SDXL diffusers folder, built once per session. Read-only: copy it before changing files.

    It is the session cache's own copy, so `model.pretrained: tiny` resolves to this same folder.
    """
    from waveft_train.models.tiny import tiny_model_dir as cached_tiny_model_dir

    return cached_tiny_model_dir(waveft_cache_dir)


@pytest.fixture
def tiny_components(tiny_model_dir: Path):
    """Freshly loaded fp32 SDXLComponents of the tiny model (function scope: tests may modify the modules)."""
    from waveft_train.models.loading import load_components

    return load_components(str(tiny_model_dir))


@pytest.fixture
def trains_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests whose comparisons are properties of the CPU (bit-exact resumes, equal adapters across batch layouts,
    the CPU's precision rules): the trainer runs on the CPU also where a GPU is present, as accelerate's
    ACCELERATE_USE_CPU makes it (processes the test starts inherit it). On an H200 a resumed run differed from an
    uninterrupted one by up to 1.2e-5 and batch 2 from 2 × 1 accumulated by 1e-3 (relative): the GPU's kernels miss
    the CPU's tolerances (BENCHMARKS.md §6). Module-scoped fixtures that train need their own (test_scale_out.py)."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state; tests that train with different precisions need it reset."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """The CLI gives the `waveft_train` logger its own stderr handler and stops propagation (so caplog, which listens
    on the root logger, would see nothing); each test starts from the logger as the previous one found it."""
    import logging

    logger = logging.getLogger("waveft_train")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
