"""The fast training path (waveft_train/waveft/functional.py) against its oracles.

Oracles: torch.autograd.gradcheck in float64 (every custom function, both paths, both ways of building ΔW), and
peft's reference WaveFT layer with plain autograd (outputs and gradients to 1e-5 relative). Speed is measured by
benchmarks/layer.py and benchmarks/step.py, never here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import WaveFTConfig
from peft.tuners.waveft.layer import WaveFTLinear as ReferenceLinear
from torch.utils.checkpoint import checkpoint

from waveft_train.waveft import SparseIDWT, WaveFTLinear, coefficient_locations, functional
from waveft_train.waveft.functional import FACTORIZED, MERGED, choose_path, sampled_products, waveft_linear

PATHS = [MERGED, FACTORIZED]
# (family, use_idwt); None = use_idwt off (the spectrum placed directly).
FAMILIES = {"db1": ("db1", True), "db2": ("db2", True), "sym3": ("sym3", True), "coif1": ("coif1", True),
            "no_idwt": ("db1", False)}  # fmt: skip


def transform(out_features, in_features, n, family="db1", use_idwt=True, seed=3) -> SparseIDWT:
    locations = coefficient_locations(out_features, in_features, n, seed)
    return SparseIDWT(out_features, in_features, locations, family, use_idwt)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def pair(family: str, use_idwt: bool, shape=(40, 48), n=150, bias=True, seed=0):
    """(peft reference layer, our layer) around one shared frozen base layer, with the same random spectrum."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(shape[1], shape[0], bias=bias).requires_grad_(False)
    config = WaveFTConfig(n_frequency=n, wavelet_family=family, use_idwt=use_idwt, init_weights=False, scaling=7.0)
    reference = ReferenceLinear(base, "default", config, n_frequency=n)
    ours = WaveFTLinear(base, "default", config, n_frequency=n)
    with torch.no_grad():
        ours.waveft_spectrum["default"].copy_(reference.waveft_spectrum["default"])
    return reference, ours


def assert_matches_reference(reference, ours: WaveFTLinear, x: torch.Tensor, path: str) -> None:
    """Output, dx and the spectrum gradient of `waveft_linear` on `path` against the reference layer's autograd."""
    x.requires_grad_(True)
    grad = torch.randn(*x.shape[:-1], ours.out_features)
    expected = reference(x)
    expected.backward(grad)
    expected_dx, x.grad = x.grad, None
    actual = waveft_linear(x, ours.base_layer.weight, ours.base_layer.bias, adapters_of(ours), path=path)
    actual.backward(grad)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-6)
    assert relative_error(ours.waveft_spectrum["default"].grad, reference.waveft_spectrum["default"].grad) < 1e-5


def adapters_of(layer: WaveFTLinear, names=("default",)):
    return [(layer.waveft_spectrum[n], layer.waveft_transform[n], layer.waveft_scaling[n]) for n in names]


# ---- gradcheck ---------------------------------------------------------------------------------------------------

# (shape, n): 24x20 with few coefficients builds ΔW from patches for the short filters; n=60 forces the separable
# build for every family, so both builders are checked on both paths.
@pytest.mark.parametrize("sizes", [((24, 20), 12), ((7, 10), 9), ((24, 20), 60)], ids=["patches", "odd", "separable"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_float64(path, family, sizes):
    (out_features, in_features), n = sizes
    name, use_idwt = FAMILIES[family]
    t = transform(out_features, in_features, n, name, use_idwt).double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, requires_grad=family == "db2")
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    spectrum = torch.randn(n, dtype=torch.float64, requires_grad=True)

    def function(x, weight, bias, spectrum):
        return waveft_linear(x, weight, bias, [(spectrum, t, 1.5)], path=path)

    assert torch.autograd.gradcheck(function, (x, weight, bias, spectrum))


def test_both_builders_are_exercised():
    assert transform(24, 20, 12, "db1").use_patches and transform(24, 20, 12, "sym3", False).use_patches
    assert not any(transform(24, 20, 60, family).use_patches for family in ("db1", "db2", "sym3", "coif1"))


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_two_adapters(path):
    first = transform(12, 10, 8, "db1", seed=1).double()
    second = transform(12, 10, 20, "sym2", seed=2).double()
    torch.manual_seed(2)
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 10, dtype=torch.float64)
    spectra = [torch.randn(size, dtype=torch.float64, requires_grad=True) for size in (8, 20)]

    def function(x, a, b):
        return waveft_linear(x, weight, None, [(a, first, 2.0), (b, second, -0.5)], path=path)

    assert torch.autograd.gradcheck(function, (x, *spectra))


# ---- against peft's reference (autograd) -------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(40, 48), (33, 25)])
def test_matches_reference_autograd(path, family, shape):
    reference, ours = pair(*FAMILIES[family], shape=shape)
    assert_matches_reference(reference, ours, torch.randn(3, 21, shape[1]), path)


def test_several_adapters_match_reference():
    reference, ours = pair("db1", True, n=120)
    second = WaveFTConfig(n_frequency=90, wavelet_family="sym3", random_loc_seed=5, init_weights=False, scaling=3.0)
    reference.update_layer("second", 90, second)
    ours.update_layer("second", 90, second)
    with torch.no_grad():
        ours.waveft_spectrum["second"].copy_(reference.waveft_spectrum["second"])
    reference.set_adapter(["default", "second"])
    ours.set_adapter(["default", "second"])
    x = torch.randn(50, 48)
    grad = torch.randn(50, 40)
    reference(x).backward(grad)
    for path in PATHS:
        for parameter in ours.waveft_spectrum.values():
            parameter.grad = None
        adapters = adapters_of(ours, ("default", "second"))
        output = waveft_linear(x, ours.base_layer.weight, ours.base_layer.bias, adapters, path=path)
        torch.testing.assert_close(output, reference(x), rtol=1e-5, atol=1e-6)
        output.backward(grad)
        for name in ("default", "second"):
            assert relative_error(ours.waveft_spectrum[name].grad, reference.waveft_spectrum[name].grad) < 1e-5
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)  # and through the layer itself


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_weights_equal_the_reference(family):
    reference, ours = pair(*FAMILIES[family], shape=(64, 72), n=200)  # patches for short filters at this size
    before = ours.base_layer.weight.detach().clone()
    expected_delta = reference.get_delta_weight("default")
    torch.testing.assert_close(ours.get_delta_weight("default"), expected_delta, rtol=1e-5, atol=1e-6)
    ours.merge()
    torch.testing.assert_close(ours.base_layer.weight, before + expected_delta, rtol=0, atol=1e-6)


# ---- the merged path leaves W alone ------------------------------------------------------------------------------


def test_merged_path_restores_w_exactly_and_saves_no_weight_sized_tensor():
    _, ours = pair("db1", True, shape=(64, 72), n=200)
    weight = ours.base_layer.weight
    assert ours.waveft_transform["default"].use_patches
    before, version = weight.detach().clone(), weight._version
    saved = []
    x = torch.randn(40, 72, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = waveft_linear(x, weight, ours.base_layer.bias, adapters_of(ours), path=MERGED)
    assert torch.equal(weight, before) and weight._version == version
    weight_sized = [t for t in saved if t.shape == weight.shape]
    assert all(t.data_ptr() == weight.data_ptr() for t in weight_sized)  # W itself, never W + ΔW
    y.sum().backward()
    assert torch.equal(weight, before) and weight._version == version


def test_patching_twice_per_step_with_overlapping_adapters_and_a_second_backward():
    """Forward and backward each patch W and restore it: the gradients equal the reference's on a second backward
    (retain_graph) too, with two adapters whose patches overlap, and W ends bit-exactly as it started."""
    reference, ours = pair("db1", True, shape=(64, 72), n=250)
    second = WaveFTConfig(n_frequency=250, wavelet_family="db1", random_loc_seed=777, init_weights=False, scaling=3.0)
    for layer in (reference, ours):
        layer.update_layer("second", 250, second)
        layer.set_adapter(["default", "second"])
    with torch.no_grad():
        ours.waveft_spectrum["second"].copy_(reference.waveft_spectrum["second"])
    positions = [set(ours.waveft_transform[name].patch_index.tolist()) for name in ("default", "second")]
    assert positions[0] & positions[1]  # some entries of W are patched by both adapters
    weight = ours.base_layer.weight
    before = weight.detach().clone()
    x = torch.randn(30, 72, requires_grad=True)
    grad = torch.randn(30, 64)
    reference(x).backward(grad)
    expected = (x.grad, *(reference.waveft_spectrum[name].grad for name in ("default", "second")))
    x.grad = None
    y = waveft_linear(x, weight, ours.base_layer.bias, adapters_of(ours, ("default", "second")), path=MERGED)
    for _ in range(2):
        y.backward(grad, retain_graph=True)
        actual = (x.grad, *(ours.waveft_spectrum[name].grad for name in ("default", "second")))
        for a, e in zip(actual, expected):
            assert relative_error(a, e) < 1e-5
        assert torch.equal(weight, before)
        x.grad = None
        for name in ("default", "second"):
            ours.waveft_spectrum[name].grad = None


def test_w_is_restored_when_the_matmul_fails(monkeypatch):
    _, ours = pair("db1", True, shape=(64, 72), n=200)
    before = ours.base_layer.weight.detach().clone()

    def failing_linear(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(functional.F, "linear", failing_linear)
    with pytest.raises(RuntimeError, match="simulated"):
        waveft_linear(torch.randn(4, 72), ours.base_layer.weight, None, adapters_of(ours), path=MERGED)
    assert torch.equal(ours.base_layer.weight, before)


def test_inference_mode_and_no_grad():
    reference, ours = pair("db1", True, shape=(64, 72), n=200)
    x = torch.randn(9, 72)
    before = ours.base_layer.weight.detach().clone()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.base_layer.weight, before)


# ---- checkpointing and autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_gradient_checkpointing(path):
    _, ours = pair("db2", True)
    x = torch.randn(30, 48, requires_grad=True)

    def block(inputs):
        output = waveft_linear(inputs, ours.base_layer.weight, ours.base_layer.bias, adapters_of(ours), path=path)
        return torch.tanh(output)

    block(x).square().sum().backward()
    expected = ours.waveft_spectrum["default"].grad.clone(), x.grad.clone()
    ours.waveft_spectrum["default"].grad, x.grad = None, None
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(ours.waveft_spectrum["default"].grad, expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_is_close_to_float32(path, weight_dtype):
    reference, ours = pair("db1", True, shape=(64, 72), n=200)
    x = torch.randn(40, 72, requires_grad=True)
    grad = torch.randn(40, 64)
    expected = reference(x)
    expected.backward(grad)
    expected_ds = reference.waveft_spectrum["default"].grad
    weight = ours.base_layer.weight.detach().to(weight_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = waveft_linear(x, weight, ours.base_layer.bias, adapters_of(ours), path=path)
    assert actual.dtype == torch.bfloat16  # the autocast dtype, as the frozen nn.Linear returns
    actual.backward(grad)
    spectrum_grad = ours.waveft_spectrum["default"].grad
    assert spectrum_grad.dtype == torch.float32
    assert relative_error(actual, expected) < 2e-2
    assert relative_error(spectrum_grad, expected_ds) < 2e-2
    assert torch.equal(ours.base_layer.weight.detach().to(weight_dtype), weight)  # restored


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("tokens", [3, 300])  # the factorized and the merged path
def test_an_adapter_at_zero_is_the_base_layer_under_bf16_autocast(tokens, training):
    """Dtype and values: the base layer's behaviour is the contract (peft's reference returns the input's dtype)."""
    _, ours = pair("db1", True, shape=(64, 72), n=200)
    torch.nn.init.zeros_(ours.waveft_spectrum["default"])
    base = ours.base_layer
    ours.train(training)
    x = torch.randn(tokens, 72, requires_grad=training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = base(x), ours(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(actual, expected)
    without = ours(x)  # no autocast: the input's dtype, as before
    assert without.dtype == torch.float32 and torch.equal(without, base(x))


def test_the_layer_compiles_without_graph_breaks_and_matches_eager(monkeypatch):
    """torch.compile sees the whole layer step (both paths) as one graph; inductor's result is eager's."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool in the test process
    _, ours = pair("db1", True, shape=(40, 48), n=150)
    for tokens in (3, 100):  # the factorized and the merged path
        assert torch._dynamo.explain(ours)(torch.randn(tokens, 48)).graph_break_count == 0
    x = torch.randn(3, 48, requires_grad=True)
    grad = torch.randn(3, 40)
    ours(x).backward(grad)
    expected = ours.waveft_spectrum["default"].grad.clone(), x.grad.clone()
    ours.waveft_spectrum["default"].grad, x.grad = None, None
    torch._dynamo.reset()
    torch.compile(ours, backend="inductor")(x).backward(grad)
    torch.testing.assert_close(ours.waveft_spectrum["default"].grad, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected[1], rtol=1e-5, atol=1e-6)


# ---- the pieces --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["db1", "db3", "sym4", "coif2", "db20"])
@pytest.mark.parametrize("length", [16, 17, 40])
def test_transposed_synthesis_is_the_adjoint_of_the_transposed_analysis(family, length):
    t = transform(length, length, 10, family).double()
    axis, block = t.rows, t.row_block.double()
    y, z = torch.randn(7, length, dtype=torch.float64), torch.randn(axis.width, 7, dtype=torch.float64)
    analyzed, synthesized = axis.analyze_transposed(y, block), axis.synthesize_transposed(z, block)
    assert analyzed.shape == (axis.width, 7) and analyzed.is_contiguous() and synthesized.shape == (length, 7)
    torch.testing.assert_close((analyzed * z).sum(), (y.t() * synthesized).sum())
    # and the synthesis matches the row-by-row one the dense ΔW is built with
    torch.testing.assert_close(synthesized.t(), axis.synthesize(z.t(), t.filters.double()))


@pytest.mark.parametrize("n", [30, 150])  # sparse, and dense enough for the "dense" kernel to be chosen
def test_sampled_product_kernels_agree(n):
    t = transform(20, 16, n, "db2").double()
    rows_t = torch.randn(t.rows.width, 33, dtype=torch.float64)
    cols_t = torch.randn(t.cols.width, 33, dtype=torch.float64)
    expected = 1.5 * (rows_t @ cols_t.t())[t.row_slot.long(), t.col_slot.long()]
    for kernel in ("auto", "dense", "csr", "gather"):
        torch.testing.assert_close(sampled_products(rows_t, cols_t, t, 1.5, kernel=kernel), expected)


def test_choose_path_by_shape():
    patches = transform(640, 640, 2592, "db1")
    assert patches.use_patches
    for tokens, d_in, d_out in [(8192, 640, 640), (2048, 1280, 1280), (154, 2048, 1280), (77, 2048, 640),
                                (64, 1280, 1280), (32, 640, 640)]:
        assert choose_path(tokens, d_out, d_in, [transform(d_out, d_in, 2592, "db1")]) == MERGED
    assert choose_path(1, 640, 640, [patches]) == FACTORIZED  # one token: no W-sized work at all
    separable = transform(1280, 2048, 2592, "db8")  # 16 taps: patches would be denser than a quarter of W
    assert not separable.use_patches
    assert choose_path(154, 1280, 2048, [separable]) == FACTORIZED
    assert choose_path(8192, 1280, 2048, [separable]) == MERGED


def test_unknown_path_is_rejected():
    t = transform(8, 8, 4)
    with pytest.raises(ValueError, match="path must be one of"):
        waveft_linear(torch.randn(2, 8), torch.randn(8, 8), None, [(torch.zeros(4), t, 1.0)], path="fast")


def test_output_keeps_leading_dims_and_dtype():
    t = transform(8, 6, 5)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    weight, spectrum = torch.randn(8, 6), torch.randn(5)
    out = waveft_linear(x, weight, None, [(spectrum, t, 2.0)])
    assert out.shape == (2, 3, 4, 8) and out.dtype == torch.float64  # computed in the weight's dtype, returned in x's
    torch.testing.assert_close(out, F.linear(x.float(), weight + 2.0 * t(spectrum)).double())


@pytest.mark.parametrize("path", PATHS)
def test_compile_friendly_fallbacks_match_reference(path, monkeypatch):
    """Under torch.compile the sparse kernels and the in-place W patch give way to dense equivalents (dynamo has no
    sparse tensors; with them there are no graph breaks, see BENCHMARKS.md). Run those equivalents eagerly here."""
    reference, ours = pair("db2", True, shape=(64, 72), n=200)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_matches_reference(reference, ours, torch.randn(30, 72), path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("path", PATHS)
def test_the_launch_light_path_of_accelerators_matches_reference(path, family, monkeypatch):
    """Accelerators take the spectrum gradient in one token chunk with the dense sampled product
    (functional.launch_light); forced on the CPU here, over more tokens than a (shrunk) CPU chunk holds."""
    reference, ours = pair(*FAMILIES[family], shape=(64, 72), n=200)
    monkeypatch.setattr(functional, "MAX_CHUNK_TOKENS", 16)
    monkeypatch.setattr(functional, "MIN_CHUNK_TOKENS", 16)
    calls = []
    original = functional.sampled_products
    monkeypatch.setattr(functional, "sampled_products", lambda rows_t, cols_t, transform, *args: calls.append(
        (rows_t.shape[1], functional.auto_kernel(transform, rows_t))) or original(rows_t, cols_t, transform, *args))
    x = torch.randn(2, 40, 72)
    assert_matches_reference(reference, ours, x, path)
    assert calls == [(16, "csr")] * 5  # the CPU path: token chunks, the sparse kernel
    calls.clear()
    reference.waveft_spectrum["default"].grad = ours.waveft_spectrum["default"].grad = None
    monkeypatch.setattr(functional, "launch_light", lambda device: True)
    assert_matches_reference(reference, ours, x.detach().clone(), path)
    assert calls == [(80, "dense")]  # one chunk of all 80 tokens, one dense product


def test_a_trained_layer_can_be_deep_copied_and_pickled():
    """The sampling pattern cached by a backward is a sparse tensor, which deepcopy (e.g. EMA copies) and pickle
    cannot handle: it must not travel with the module."""
    import copy
    import io

    _, ours = pair("db1", True, shape=(64, 72), n=200)
    x = torch.randn(300, 72)
    ours(x).sum().backward()
    assert ours.waveft_transform["default"]._patterns  # the cache is in use
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(ours), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(clone(x), ours(x))
        clone(x).sum().backward()  # and it trains


def test_merged_path_under_deterministic_algorithms():
    """Reproducibility setups (e.g. accelerate's set_seed(deterministic=True)) switch torch to deterministic
    algorithms; every op of the merged path must have one, above all the restore of W."""
    reference, ours = pair("db1", True, shape=(64, 72), n=200)
    before = ours.base_layer.weight.detach().clone()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_matches_reference(reference, ours, torch.randn(30, 72), MERGED)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(ours.base_layer.weight, before)
