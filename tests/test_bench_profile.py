"""benchmarks.profile and its forcing helpers: the forced kernel is the one that runs, and is undone; the launch-light
path's operation count stays within issue 35's bound."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import layer, profile
from benchmarks.common import sampled_kernel
from waveft_train.waveft import SparseIDWT, coefficient_locations, functional


def test_sampled_kernel_forces_the_kernel_inside_and_restores_the_default(monkeypatch):
    original = functional.sampled_products
    used = []

    def recording(rows_t, cols_t, transform, scaling=1.0, kernel=functional.AUTO):
        used.append(kernel)
        return original(rows_t, cols_t, transform, scaling, kernel)

    monkeypatch.setattr(functional, "sampled_products", recording)
    locations = coefficient_locations(16, 12, 20, 0)
    transform = SparseIDWT(16, 12, locations, "db1", True)
    torch.manual_seed(0)
    x, g = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    spectrum = torch.randn(20, dtype=torch.float64, requires_grad=True)
    adapters = [(spectrum, transform, 2.0)]
    weight = torch.randn(16, 12, dtype=torch.float64)
    results = {}
    for kernel in ("dense", "gather", "csr"):
        with sampled_kernel(kernel):
            spectrum.grad = None
            functional.waveft_linear(x, weight, None, adapters).backward(g)
            results[kernel] = spectrum.grad.clone()
        assert functional.sampled_products is recording  # put back on leaving
    assert used == ["dense", "gather", "csr"]
    torch.testing.assert_close(results["dense"], results["gather"])
    torch.testing.assert_close(results["csr"], results["gather"])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_launch_light_path_calls_at_most_one_and_a_half_times_loras_operations(bf16):
    """Issue 35's bound, counted as BENCHMARKS §6 counts it (aten calls per layer step, nested ones too) at the three
    SDXL shapes, with the accelerator path forced on the CPU. A count, not a time: it is the same on any machine."""
    args = argparse.Namespace(n_frequency=2592, family="db1", bf16=bf16)
    for shape in layer.SHAPES.values():
        setup = layer.build(shape, ["lora", "ours"], "cpu", args)
        calls = {method: profile.measure(setup, method, steps=1, device="cpu")["aten_calls"]
                 for method in ("lora", "ours-light")}
        assert calls["ours-light"] <= 1.5 * calls["lora"], (shape, calls)
