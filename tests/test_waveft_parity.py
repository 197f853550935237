"""Our WaveFT tuner against its oracles: peft's reference WaveFT, and PyWavelets where the reference cannot run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pywt
import torch
from peft import WaveFTConfig, get_peft_model

from waveft_train.waveft import SparseIDWT, WaveFTLinear, coefficient_locations, register, unregister


class Stack(torch.nn.Module):
    """Linear layers of even and odd shapes, named like attention projections."""

    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(16, 16)
        self.to_k = torch.nn.Linear(16, 15, bias=False)
        self.to_v = torch.nn.Linear(15, 17)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(17, 20)])

    def forward(self, x):
        return self.to_out[0](self.to_v(self.to_k(torch.tanh(self.to_q(x)))))


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES = {
    "db1": dict(wavelet_family="db1"),
    "db2": dict(wavelet_family="db2"),
    "db3": dict(wavelet_family="db3"),
    "db4": dict(wavelet_family="db4"),
    "sym2": dict(wavelet_family="sym2"),
    "sym3": dict(wavelet_family="sym3"),
    "sym4": dict(wavelet_family="sym4"),
    "coif1": dict(wavelet_family="coif1"),
    "coif2": dict(wavelet_family="coif2"),
    "no_idwt": dict(use_idwt=False),
    "seed_and_scaling": dict(random_loc_seed=1234, scaling=3.5, wavelet_family="db2"),
    "n_frequency_pattern": dict(n_frequency_pattern={"to_v": 7, "to_out.0": 200}),
    "proportional": dict(proportional_parameters=True, wavelet_family="sym2"),
}


def _pair(options: dict, seed: int = 0):
    """(reference model, our model) with identical base weights and identical random spectra."""
    torch.manual_seed(seed)
    base = Stack()
    config = dict(n_frequency=40, target_modules=TARGETS, init_weights=False, **options)
    unregister()
    try:
        reference = get_peft_model(copy.deepcopy(base), WaveFTConfig(**config))
    finally:
        register()
    ours = get_peft_model(copy.deepcopy(base), WaveFTConfig(**config))
    assert isinstance(ours.base_model.model.to_q, WaveFTLinear)
    assert not isinstance(reference.base_model.model.to_q, WaveFTLinear)
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all("waveft" not in key for key in missing)
    return reference, ours


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", rtol: float = 1e-5) -> None:
    """Equal up to fp32 summation order: the tolerance scales with the tensor's magnitude, not each element's.

    Two correct implementations sum the same terms in different orders (and torch releases change the order), so an
    entry near zero that cancels large terms can differ by rtol times the large terms, not times itself.
    """
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, atol=rtol * scale, rtol=rtol, msg=msg or None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_and_merge_match_reference(case):
    reference, ours = _pair(CASES[case])
    x = torch.randn(5, 16)
    expected, actual = reference(x), ours(x)
    assert_close_to_scale(actual, expected)
    with ours.disable_adapter():
        assert not torch.allclose(ours(x), actual, atol=1e-3)  # the spectra are random: the adapter matters

    expected.square().sum().backward()
    actual.square().sum().backward()
    for (name, p_ref), (_, p_ours) in zip(reference.named_parameters(), ours.named_parameters()):
        if p_ref.requires_grad:
            assert_close_to_scale(p_ours.grad, p_ref.grad, msg=name)

    for layer in TARGETS:
        ref_layer = reference.get_submodule(f"base_model.model.{layer}")
        our_layer = ours.get_submodule(f"base_model.model.{layer}")
        assert our_layer.waveft_n_frequency == ref_layer.waveft_n_frequency
        torch.testing.assert_close(our_layer.waveft_indices["default"], ref_layer.waveft_indices["default"])
        assert_close_to_scale(our_layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"))
    merged_ref = reference.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_ref.keys() == merged_ours.keys()
    for key in merged_ref:
        assert_close_to_scale(merged_ours[key], merged_ref[key], msg=key)


def test_options_really_change_the_layout():
    """Guard against a table that passes because every case is the same configuration."""
    _, default = _pair({})
    _, pattern = _pair(CASES["n_frequency_pattern"])
    _, proportional = _pair(CASES["proportional"])
    assert default.base_model.model.to_v.waveft_n_frequency["default"] == 40
    assert pattern.base_model.model.to_v.waveft_n_frequency["default"] == 7
    assert pattern.base_model.model.to_out[0].waveft_n_frequency["default"] == 200
    sizes = {name: proportional.get_submodule(f"base_model.model.{name}").waveft_n_frequency["default"] for name in TARGETS}
    assert sizes == {"to_q": 38, "to_k": 35, "to_v": 37, "to_out.0": 50}  # budget 160 split by d_in*d_out


def pywavelets_delta(out_features, in_features, locations, spectrum, family):
    """Independent formulation: dense zero-padded spectrum → pywt.idwt2 → centre crop (the reference's recipe)."""
    wavelet = pywt.Wavelet("db1" if family == "haar" else family)
    length = wavelet.rec_len
    rows = out_features + length - 2 + (out_features + length - 2) % 2
    cols = in_features + length - 2 + (in_features + length - 2) % 2
    dense = np.zeros((rows, cols))
    dense[locations[0] + (rows - out_features) // 2, locations[1] + (cols - in_features) // 2] = spectrum
    h, w = rows // 2, cols // 2
    image = pywt.idwt2((dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:])), wavelet, mode="zero")
    top, left = (image.shape[0] - out_features) // 2, (image.shape[1] - in_features) // 2
    return image[top : top + out_features, left : left + in_features]


@pytest.mark.parametrize(
    "family", ["haar", "db1", "db2", "db5", "db11", "db20", "db38", "sym5", "sym11", "sym20", "coif3", "coif6", "coif17"]
)
@pytest.mark.parametrize("shape", [(16, 16), (15, 17), (9, 40)])
def test_every_family_matches_pywavelets(family, shape):
    out_features, in_features = shape
    locations = coefficient_locations(out_features, in_features, 30, seed=11)
    spectrum = torch.randn(30, dtype=torch.float64)
    transform = SparseIDWT(out_features, in_features, locations, family, use_idwt=True).double()
    expected = pywavelets_delta(out_features, in_features, locations.numpy(), spectrum.numpy(), family)
    np.testing.assert_allclose(transform(spectrum).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["db11", "sym12", "coif6", "coif17"])
def test_families_the_reference_crashes_on_run_and_train_here(family):
    torch.manual_seed(0)
    model = get_peft_model(Stack(), WaveFTConfig(n_frequency=30, target_modules=TARGETS, wavelet_family=family))
    x = torch.randn(4, 16)
    with model.disable_adapter():
        base_output = model(x).detach()
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    if family != "coif17":  # coif17's 102 taps reach these 16-20 wide layers only through its ~0 edge taps
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p -= 10.0 * p.grad
        assert (model(x) - base_output).abs().max() > 1e-4
