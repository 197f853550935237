"""The tuner behaves like a peft tuner: entry points, adapter format, merging, several adapters, dtypes, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, WaveFTConfig, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file

from waveft_train.waveft import WaveFTLinear, register, stock_peft_reproduces_family, unregister


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(24, 24, bias=False)
        self.to_v = torch.nn.Linear(24, 20)
        self.norm = torch.nn.LayerNorm(20)
        self.conv = torch.nn.Conv1d(20, 20, 1)

    def forward(self, x):
        return self.norm(self.to_v(torch.relu(self.to_q(x))))


def config(**overrides) -> WaveFTConfig:
    options = dict(n_frequency=48, target_modules=["to_q", "to_v"], wavelet_family="db2")
    options.update(overrides)
    return WaveFTConfig(**options)


def randomize(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "waveft_" in name:
                parameter.normal_(0, 0.05)


@pytest.fixture(autouse=True)
def registered():
    register()
    yield
    register()


@pytest.fixture
def stock_peft():
    """peft's own WaveFT while the test body runs; ours again afterwards."""
    unregister()
    yield
    register()


def test_peft_entry_points_build_our_layers():
    torch.manual_seed(0)
    unregister()
    assert not isinstance(get_peft_model(Block(), config()).base_model.model.to_q, WaveFTLinear)
    register()
    assert isinstance(get_peft_model(Block(), config()).base_model.model.to_q, WaveFTLinear)
    injected = inject_adapter_in_model(config(), Block())
    assert isinstance(injected.to_v, WaveFTLinear)
    register()  # idempotent
    assert isinstance(get_peft_model(Block(), config()).base_model.model.to_v, WaveFTLinear)


def test_adapter_format_and_round_trip_with_stock_peft(tmp_path):
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(3, 24)
    ours = get_peft_model(copy.deepcopy(base), config(random_loc_seed=5, scaling=7.0))
    randomize(ours)
    expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")

    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "WAVEFT" and saved["random_loc_seed"] == 5 and saved["wavelet_family"] == "db2"
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.to_q.waveft_spectrum", "base_model.model.to_v.waveft_spectrum"]
    assert all(t.dtype == torch.float32 and t.shape == (48,) for t in tensors.values())

    unregister()
    try:  # stock peft loads our adapter and computes the same outputs
        stock = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert not isinstance(stock.base_model.model.to_q, WaveFTLinear)
        torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)
        randomize(stock)
        stock_output = stock(x)
        stock.save_pretrained(tmp_path / "stock")
    finally:
        register()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "stock")  # and the reverse
    assert isinstance(loaded.base_model.model.to_q, WaveFTLinear)
    torch.testing.assert_close(loaded(x), stock_output, atol=1e-5, rtol=1e-5)


def test_requires_grad_on_load(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Block(), config())
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(Block(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(Block(), tmp_path, is_trainable=True)
    names = sorted(n for n, p in trainable.named_parameters() if p.requires_grad)
    assert names == ["base_model.model.to_q.waveft_spectrum.default", "base_model.model.to_v.waveft_spectrum.default"]


def test_merge_unmerge_disable_and_merge_and_unload():
    torch.manual_seed(0)
    model = get_peft_model(Block(), config())
    x = torch.randn(4, 24)
    base_output = model(x)  # zero init: the base model's output
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_output)
    randomize(model)
    adapted = model(x)
    assert not torch.allclose(adapted, base_output, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_output)

    layer = model.base_model.model.to_v
    original = layer.base_layer.weight.detach().clone()
    layer.merge(safe_merge=True)
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original + layer.get_delta_weight("default"))
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=1e-6)

    merged = model.merge_and_unload()
    assert isinstance(merged.to_q, torch.nn.Linear) and not isinstance(merged.to_q, WaveFTLinear)
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_weights():
    model = get_peft_model(Block(), config())
    layer = model.base_model.model.to_q
    with torch.no_grad():
        layer.waveft_spectrum["default"][0] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    torch.testing.assert_close(layer.base_layer.weight, before)
    assert not layer.merged


def test_several_adapters_set_and_delete():
    torch.manual_seed(0)
    model = get_peft_model(Block(), config(), adapter_name="first")
    model.add_adapter("second", config(random_loc_seed=99, wavelet_family="sym3"))
    randomize(model)
    x = torch.randn(2, 24)
    layer = model.base_model.model.to_q
    assert not torch.equal(layer.waveft_indices["first"], layer.waveft_indices["second"])

    model.set_adapter("first")
    first = model(x)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".first" in n for n in trainable)
    model.set_adapter("second")
    second = model(x)
    assert not torch.allclose(first, second, atol=1e-4)
    assert all(".second" in n for n, p in model.named_parameters() if p.requires_grad)

    model.base_model.set_adapter(["first", "second"])  # both at once: ΔWs add up
    for name in ("to_q", "to_v"):
        module = model.base_model.model.get_submodule(name)
        module.merge(adapter_names=["first", "second"])
    merged_both = model(x)
    for name in ("to_q", "to_v"):
        model.base_model.model.get_submodule(name).unmerge()
    torch.testing.assert_close(model(x), merged_both, atol=1e-5, rtol=1e-5)

    model.delete_adapter("second")
    assert "second" not in layer.waveft_spectrum and "second" not in layer.waveft_indices
    assert "second" not in layer.waveft_transform
    model.set_adapter("first")
    torch.testing.assert_close(model(x), first)


def trainable_names(model) -> list[str]:
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)


def test_waveft_only_trains_the_existing_biases_of_adapted_layers_as_stock_peft_does():
    """peft's `<method>_only`: the adapted layers' own biases become trainable (to_q has none); nothing is added."""
    torch.manual_seed(0)
    ours = get_peft_model(Block(), config(bias="waveft_only"))
    unregister()
    try:
        stock = get_peft_model(Block(), config(bias="waveft_only"))
    finally:
        register()
    assert trainable_names(ours) == trainable_names(stock) == [
        "base_model.model.to_q.waveft_spectrum.default",
        "base_model.model.to_v.base_layer.bias",
        "base_model.model.to_v.waveft_spectrum.default",
    ]
    assert ours.base_model.model.to_q.base_layer.bias is None  # no bias is created for a layer without one
    assert not any("waveft_bias" in name for name in ours.state_dict())


def train_biases(model) -> None:
    """A random spectrum and a changed bias on every trainable base bias, as a few training steps would give."""
    randomize(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.endswith("base_layer.bias"):
                parameter.add_(torch.randn_like(parameter))


def test_waveft_only_adapter_round_trips_through_stock_peft(tmp_path):
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(3, 24)
    ours = get_peft_model(copy.deepcopy(base), config(bias="waveft_only"))
    train_biases(ours)
    expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(saved) == [
        "base_model.model.to_q.waveft_spectrum",
        "base_model.model.to_v.base_layer.bias",
        "base_model.model.to_v.waveft_spectrum",
    ]
    assert not torch.equal(saved["base_model.model.to_v.base_layer.bias"], base.to_v.bias)
    assert all(saved[key].abs().min() > 0 for key in saved if key.endswith("waveft_spectrum"))

    unregister()
    try:  # stock peft loads the trained bias and the spectra: the same outputs
        stock = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert not isinstance(stock.base_model.model.to_v, WaveFTLinear)
        torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)
        stock_trained = get_peft_model(copy.deepcopy(base), config(bias="waveft_only"))
        train_biases(stock_trained)
        stock_expected = stock_trained(x)
        stock_trained.save_pretrained(tmp_path / "stock")
    finally:
        register()
    assert sorted(load_file(tmp_path / "stock" / "adapter_model.safetensors")) == sorted(saved)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "stock")  # and ours loads stock's
    assert isinstance(loaded.base_model.model.to_v, WaveFTLinear)
    torch.testing.assert_close(loaded(x), stock_expected, atol=1e-5, rtol=1e-5)
    merged = loaded.merge_and_unload()
    assert merged.to_q.bias is None
    torch.testing.assert_close(merged(x), stock_expected, atol=1e-5, rtol=1e-5)


def spectrum_dtypes(model) -> set[torch.dtype]:
    return {parameter.dtype for name, parameter in model.named_parameters() if "waveft_spectrum" in name}


def build_through(entry_point: str, autocast: bool, dtype: torch.dtype, folder) -> torch.nn.Module:
    """Adapter weights on a `dtype` Block through one of peft's entry points (`folder` holds a saved adapter)."""
    torch.manual_seed(0)
    if entry_point == "get_peft_model":
        return get_peft_model(Block().to(dtype), config(), autocast_adapter_dtype=autocast)
    if entry_point == "from_pretrained":
        return PeftModel.from_pretrained(Block().to(dtype), folder, is_trainable=True, autocast_adapter_dtype=autocast)
    if entry_point == "add_adapter":
        model = get_peft_model(Block().to(dtype), config(), autocast_adapter_dtype=autocast)
        model.add_adapter("second", config(random_loc_seed=3), autocast_adapter_dtype=autocast)
        model.set_adapter("second")  # the new adapter is the one that trains
        return model
    if entry_point == "load_adapter":
        model = PeftModel.from_pretrained(Block().to(dtype), folder, is_trainable=True, autocast_adapter_dtype=autocast)
        model.load_adapter(folder, adapter_name="second", is_trainable=True, autocast_adapter_dtype=autocast)
        model.set_adapter("second")
        return model
    if entry_point == "inject_adapter_in_model":  # no autocast argument: peft leaves the base dtype
        return inject_adapter_in_model(config(), Block().to(dtype))
    raise ValueError(entry_point)


ENTRY_POINTS = [
    ("get_peft_model", True), ("get_peft_model", False), ("from_pretrained", True), ("from_pretrained", False),
    ("add_adapter", True), ("add_adapter", False), ("load_adapter", True), ("load_adapter", False),
    ("inject_adapter_in_model", None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("entry_point, autocast", ENTRY_POINTS)
def test_adapter_weight_dtype_per_entry_point_is_stock_peft_s(entry_point, autocast, dtype, tmp_path):
    """peft's contract: autocast_adapter_dtype=True (the default) upcasts fp16/bf16 adapter weights to float32;
    False, and inject_adapter_in_model (which has no such argument), leave them in the base model's dtype."""
    torch.manual_seed(0)
    get_peft_model(Block(), config()).save_pretrained(tmp_path / "saved")
    ours = build_through(entry_point, autocast, dtype, tmp_path / "saved")
    unregister()
    try:
        stock = build_through(entry_point, autocast, dtype, tmp_path / "saved")
    finally:
        register()
    assert isinstance(ours.get_submodule("to_q" if entry_point == "inject_adapter_in_model" else "base_model.model.to_q"),
                      WaveFTLinear)
    assert spectrum_dtypes(ours) == spectrum_dtypes(stock) == {torch.float32 if autocast else dtype}
    randomize(ours)
    out = ours(torch.randn(3, 24, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    trainable = [parameter for parameter in ours.parameters() if parameter.requires_grad]
    out.float().square().sum().backward()
    assert trainable and all(p.grad is not None and p.grad.dtype == p.dtype for p in trainable)


@pytest.mark.parametrize("family", ["db1", "db10", "db11", "sym10", "sym11", "coif3", "coif4", "coif5", "db38"])
def test_stock_peft_reproduces_exactly_the_families_we_say(tmp_path, family):
    """The table behind the start-of-run warning and the model card's note, checked against the installed peft:
    where we say stock peft reproduces an adapter, it gives our outputs; elsewhere it fails or differs (db11+,
    sym11+: unknown name; coif4: a wrong filter table; coif5: a ΔW of the wrong shape)."""
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(96, 96)), config(target_modules=["0"], wavelet_family=family))
    randomize(model)
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 96)
    expected = model(x)
    unregister()
    try:
        stock = PeftModel.from_pretrained(torch.nn.Sequential(torch.nn.Linear(96, 96)), tmp_path)
        stock.base_model.model[0].base_layer.load_state_dict(model.base_model.model[0].base_layer.state_dict())
        torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)
        reproduces = True
    except (ValueError, RuntimeError, AssertionError):
        reproduces = False
    finally:
        register()
    assert reproduces == stock_peft_reproduces_family(family)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    torch.manual_seed(0)
    model = get_peft_model(Block().to(dtype), config())
    layer = model.base_model.model.to_q
    assert layer.waveft_spectrum["default"].dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype
    randomize(model)
    x = torch.randn(3, 24, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert layer.waveft_spectrum["default"].grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16  # the base layer's autocast dtype (peft returns the input's)


def test_index_tensors_are_non_persistent_buffers():
    model = get_peft_model(Block(), config())
    layer = model.base_model.model.to_q
    buffer_names = {name for name, _ in layer.named_buffers()}
    assert "waveft_indices.default" in buffer_names
    assert any(name.startswith("waveft_transform.default.") for name in buffer_names)
    assert not any("indices" in key or "transform" in key for key in model.state_dict())
    model.to(torch.float64)
    assert layer.waveft_indices["default"].dtype == torch.int64  # integer buffers are never cast


def test_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"'to_q' of size 24x24 \(allowed: 1 to 576\)"):
        get_peft_model(Block(), config(n_frequency=577))
    with pytest.raises(ValueError, match="positive"):
        get_peft_model(Block(), config(n_frequency=0))
    with pytest.raises(ValueError, match="to_v.*1 to 480"):
        get_peft_model(Block(), config(n_frequency_pattern={"to_v": 481}))
    with pytest.raises(ValueError, match="db39.*(not supported|supports)"):
        get_peft_model(Block(), config(wavelet_family="db39"))
    with pytest.raises(ValueError, match="'to_x'.*matched no module.*to_q, to_v"):
        get_peft_model(Block(), config(target_modules=["to_x"]))
    with pytest.raises(TypeError, match="'conv' is a Conv1d; only torch.nn.Linear"):
        get_peft_model(Block(), config(target_modules=["conv"]))
    with pytest.raises(ValueError, match="bias 'lora_only'.*none, all, waveft_only"):
        get_peft_model(Block(), config(bias="lora_only"))


def test_tiny_sdxl_unet_through_diffusers_add_adapter(tiny_components):
    """diffusers' own entry point on a real (tiny) SDXL UNet: our layers, only spectra trainable, zero init = base."""
    unet = tiny_components.unet
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 16, 16)
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 77, 64),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])},
    )
    with torch.no_grad():
        before = unet(sample, 10, **kwargs).sample
    unet.add_adapter(WaveFTConfig(n_frequency=100, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    adapted = [name for name, module in unet.named_modules() if isinstance(module, WaveFTLinear)]
    assert len(adapted) == 64 and all(name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for name in adapted)
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 64 and all(name.endswith("waveft_spectrum.default") for name in trainable)
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, 10, **kwargs).sample, before)
    unet(sample, 10, **kwargs).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)


def test_diffusers_add_adapter_leaves_the_adapter_in_the_unet_dtype_as_stock_peft_does(tiny_model_dir):
    """diffusers' `unet.add_adapter` goes through inject_adapter_in_model, which never autocasts: a bf16 UNet gets
    bf16 spectra (training code casts trainable parameters to float32 itself, as diffusers' scripts do)."""
    from diffusers import UNet2DConditionModel

    dtypes = []
    for tuner in (register, unregister):
        tuner()
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", torch_dtype=torch.bfloat16)
        unet.add_adapter(WaveFTConfig(n_frequency=100, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        dtypes.append(spectrum_dtypes(unet))
    register()
    assert dtypes[0] == dtypes[1] == {torch.bfloat16}
