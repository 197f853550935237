"""Sizing experiment, not part of the product: what would a compiled, fused spectrum-gradient kernel buy on CPU?

The layer-step targets of issue 3 are missed on CPU at 8192 and 154 tokens (BENCHMARKS.md §3-4): the spectrum
gradient reads x and g twice (a transposing analysis, then the sampled product). This script compiles a small C++
kernel for db1 (Haar) that does analysis, transposition and sampled product in one pass, swaps it in for
`functional._spectrum_grads`, and times one layer step — frozen, ours, ours with the kernel — interleaved as
bench_layer.py does. The kernel is a prototype for a decision (ship compiled code or not), so it lives here only.

Two kernel variants (`--variant`): "tiles" analyzes and transposes chunks of tokens into small per-thread buffers,
then takes contiguous dot products; "rows" walks tokens in their own layout and gathers per coefficient.

Needs a C++ compiler and `pip install ninja`; first use compiles for ~30 s (cached by torch under
~/.cache/torch_extensions).

Usage:
    python scripts/bench_fused_prototype.py                    # the three SDXL shapes, 31 rounds
    python scripts/bench_fused_prototype.py --shapes 2 --rounds 61
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_layer import SHAPES, median_ratio, time_interleaved, waveft_config  # noqa: E402

from waveft_train.waveft import functional  # noqa: E402

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// ds[k] = sum_t gR[t, gi[k]] * xC[t, xi[k]] for the Haar analysis (taps = stride = 2, no crop), float32.
torch::Tensor haar_sampled(torch::Tensor g, torch::Tensor x, torch::Tensor gi, torch::Tensor xi,
                           torch::Tensor filters, int64_t chunk, bool tiles) {
  const int64_t T = g.size(0), D1 = g.size(1), D2 = x.size(1), n = gi.size(0);
  const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>();
  const int *gip = gi.data_ptr<int>(), *xip = xi.data_ptr<int>();
  auto f = filters.accessor<float, 2>();
  const float f00 = f[0][0], f01 = f[0][1], f10 = f[1][0], f11 = f[1][1];
  const int64_t chunks = (T + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
  std::vector<std::vector<float>> acc(threads, std::vector<float>(n, 0.f));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    float* a = acc[at::get_thread_num()].data();
    if (tiles) {  // per chunk: analyze + transpose into (slots, chunk) buffers, then contiguous dot products
      std::vector<float> gt(D1 * chunk), xt(D2 * chunk);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t t0 = c * chunk, tc = std::min(chunk, T - t0);
        auto analyze = [&](const float* src, int64_t D, float* dst) {
          for (int64_t p = 0; p < D / 2; ++p) {
            float *lo = dst + 2 * p * chunk, *hi = lo + chunk;
            const float* col = src + t0 * D + 2 * p;
            #pragma omp simd
            for (int64_t t = 0; t < tc; ++t) {
              const float u = col[t * D], v = col[t * D + 1];
              lo[t] = f00 * u + f01 * v;
              hi[t] = f10 * u + f11 * v;
            }
          }
        };
        analyze(gp, D1, gt.data());
        analyze(xp, D2, xt.data());
        for (int64_t k = 0; k < n; ++k) {
          const float *u = gt.data() + (int64_t)gip[k] * chunk, *v = xt.data() + (int64_t)xip[k] * chunk;
          float s = 0.f;
          #pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < tc; ++t) s += u[t] * v[t];
          a[k] += s;
        }
      }
    } else {  // per token: analyze its rows in place, then gather per coefficient
      std::vector<float> gr(D1), xr(D2);
      float *G = gr.data(), *X = xr.data();
      for (int64_t t = begin * chunk; t < std::min(T, end * chunk); ++t) {
        const float *grow = gp + t * D1, *xrow = xp + t * D2;
        #pragma omp simd
        for (int64_t p = 0; p < D1 / 2; ++p) {
          const float u = grow[2 * p], v = grow[2 * p + 1];
          G[2 * p] = f00 * u + f01 * v;
          G[2 * p + 1] = f10 * u + f11 * v;
        }
        #pragma omp simd
        for (int64_t p = 0; p < D2 / 2; ++p) {
          const float u = xrow[2 * p], v = xrow[2 * p + 1];
          X[2 * p] = f00 * u + f01 * v;
          X[2 * p + 1] = f10 * u + f11 * v;
        }
        #pragma omp simd
        for (int64_t k = 0; k < n; ++k) a[k] += G[gip[k]] * X[xip[k]];
      }
    }
  });
  auto out = torch::zeros({n}, g.options());
  float* o = out.data_ptr<float>();
  for (int i = 0; i < threads; ++i)
    for (int64_t k = 0; k < n; ++k) o[k] += acc[i][k];
  return out;
}
"""


def build_extension():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "waveft_fused_prototype", CPP, functions=["haar_sampled"], extra_cflags=["-O3", "-march=native", "-fopenmp-simd"]
    )


def fused_spectrum_grads(extension, variant: str):
    """A drop-in for functional._spectrum_grads (db1, float32, CPU only), using the compiled kernel."""
    chunk = 32 if variant == "tiles" else 64

    def spectrum_grads(g, x, plan, needed):
        grads = []
        for transform, scaling, need in zip(plan.transforms, plan.scalings, needed):
            if not need:
                grads.append(None)
                continue
            even = transform.rows.crop == transform.cols.crop == 0 and g.shape[1] % 2 == x.shape[1] % 2 == 0
            if transform.family not in ("db1", "haar") or g.dtype != torch.float32 or not even:
                raise SystemExit("the prototype kernel covers db1 in float32 on even-sized layers only")
            grads.append(
                extension.haar_sampled(
                    g.contiguous(), x.contiguous(), transform.row_slot, transform.col_slot, transform.filters,
                    chunk, variant == "tiles",
                ) * scaling
            )  # fmt: skip
        return grads

    return spectrum_grads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=["tiles", "rows", "best"], default="best",
                        help="best: tiles at >= 4096 tokens, rows below (each variant's better range)")  # fmt: skip
    parser.add_argument("--shapes", nargs="*", type=int, help="indices into bench_layer's shape table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from waveft_train.waveft.layer import WaveFTLinear

    extension = build_extension()
    original = functional._spectrum_grads
    names = list(SHAPES)
    for index in args.shapes if args.shapes is not None else range(len(names)):
        tokens, in_features, out_features = SHAPES[names[index]]
        variant = args.variant if args.variant != "best" else ("tiles" if tokens >= 4096 else "rows")
        kernel_grads = fused_spectrum_grads(extension, variant)
        torch.manual_seed(0)
        base = torch.nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
        layer = WaveFTLinear(base, "default", waveft_config(2592, "db1"), n_frequency=2592)
        torch.nn.init.normal_(layer.waveft_spectrum["default"], std=0.01)
        x = torch.randn(tokens, in_features, requires_grad=True)
        grad = torch.randn(tokens, out_features)
        spectrum = layer.waveft_spectrum["default"]

        def step(label):
            x.grad = spectrum.grad = None
            functional._spectrum_grads = kernel_grads if label == "fused" else original
            try:
                (base if label == "frozen" else layer)(x).backward(grad)
            finally:
                functional._spectrum_grads = original

        step("ours")
        expected = spectrum.grad.clone()
        step("fused")
        error = ((spectrum.grad - expected).norm() / expected.norm()).item()
        times = time_interleaved(step, ["frozen", "ours", "fused"], args.rounds)

        ours, fused = median_ratio(times, "ours", "frozen"), median_ratio(times, "fused", "frozen")
        print(
            f"{names[index]}: frozen {statistics.median(times['frozen']) * 1e3:.2f} ms; ours x{ours:.3f}, "
            f"with the fused kernel ({variant}) x{fused:.3f} frozen; "
            f"fused/ours {median_ratio(times, 'fused', 'ours'):.3f}; "
            f"spectrum-gradient difference {error:.1e} (relative)"
        )


if __name__ == "__main__":
    main()
