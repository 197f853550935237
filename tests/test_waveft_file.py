"""The single-file WaveFT export (`export --format waveft`), the ComfyUI node that reads it (integrations/comfyui,
pure torch), and `waveft_train.load_adapter` on a stock diffusers pipeline.

Oracles: the exact `.diff` export (every layer's scale·ΔW from the tuner itself) for what the node rebuilds, and
`waveft-train sample` for what load_adapter draws. ComfyUI itself cannot be installed here; its weight-adapter API
is stood in for by a three-name stub, and the run inside ComfyUI's real loader code is recorded in docs/export.md.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_interop import make_adapter

import waveft_train
from benchmarks.file_sizes import ADAPTER, sdxl_sizes
from waveft_train.adapter.export import export
from waveft_train.adapter.sampling import generate_grid_images
from waveft_train.common.errors import UserError
from waveft_train.models.loading import build_pipeline, load_components
from waveft_train.waveft import WaveFTLayer

PLUGIN = REPO / "integrations" / "comfyui" / "comfyui_waveft"
SIZE, STEPS, PROMPT, SEED = 64, 2, "a photo of sks dog in the snow", 3


def import_node(monkeypatch, *, inside_comfyui: bool):
    """The node package imported from its folder as ComfyUI imports custom nodes; inside_comfyui: with a stand-in for
    the three names of `comfy.weight_adapter` it uses."""
    for name in [name for name in sys.modules if name.startswith("comfyui_waveft")]:
        monkeypatch.delitem(sys.modules, name)
    if inside_comfyui:
        comfy, weight_adapter, base = (types.ModuleType(name) for name in
                                       ("comfy", "comfy.weight_adapter", "comfy.weight_adapter.base"))
        base.WeightAdapterBase = type("WeightAdapterBase", (), {})
        weight_adapter.adapters, weight_adapter.base, comfy.weight_adapter = [object], base, weight_adapter
        for module in (comfy, weight_adapter, base):
            monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = importlib.util.spec_from_file_location("comfyui_waveft", PLUGIN / "__init__.py",
                                                  submodule_search_locations=[str(PLUGIN)])
    node = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "comfyui_waveft", node)
    spec.loader.exec_module(node)
    return node


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("waveft-file")
    return {"db1": make_adapter(tiny_model_dir, root / "db1"),
            "sym8": make_adapter(tiny_model_dir, root / "sym8", wavelet_family="sym8"),
            "no_idwt": make_adapter(tiny_model_dir, root / "no_idwt", use_idwt=False),
            "bias": make_adapter(tiny_model_dir, root / "bias", bias="waveft_only")}


def exports(adapter: Path, tmp_path: Path) -> tuple[dict, dict]:
    """(the exact .diff export, the waveft file), both fp32."""
    diff = export(adapter, tmp_path / "diff.safetensors", format="comfyui", dtype="fp32")
    single = export(adapter, tmp_path / "waveft.safetensors", format="waveft", dtype="fp32")
    assert single.layers == diff.layers == 64
    return load_file(diff.path), load_file(single.path)


@pytest.mark.parametrize("kind", ["db1", "sym8", "no_idwt", "bias"])
def test_the_node_rebuilds_every_layer_as_the_exact_export_does(kind, adapters, tmp_path, monkeypatch):
    node = import_node(monkeypatch, inside_comfyui=False)
    diff, single = exports(adapters[kind], tmp_path)
    for key, expected in diff.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix == "diff_b":
            assert torch.equal(single[key], expected), key  # trained biases travel as the apps' own diff_b
            continue
        rebuilt = node.delta_weight(node.read_layer(single, prefix), expected.shape)
        assert (rebuilt - expected).norm() <= 1e-6 * expected.norm(), key
    assert (kind == "bias") == any(key.endswith(".diff_b") for key in diff)
    assert (kind == "no_idwt") == (not any(key.endswith(".waveft_filters") for key in single))


def test_the_node_applies_the_file_through_comfyuis_weight_adapter_api(adapters, tmp_path, monkeypatch):
    """Registered once in comfy.weight_adapter.adapters; load() claims exactly its keys; calculate_weight adds
    strength·ΔW in place (0.5 = half the update); bypass mode's h() gives x·ΔWᵀ."""
    node = import_node(monkeypatch, inside_comfyui=True)
    registry = sys.modules["comfy.weight_adapter"].adapters
    assert [adapter.name for adapter in registry[1:]] == ["waveft"]
    node.__spec__.loader.exec_module(node)  # importing it again does not register it twice
    assert len(registry) == 2
    adapter_class = registry[1]
    diff, single = exports(adapters["db1"], tmp_path)
    key = next(iter(diff))
    prefix = key.removesuffix(".diff")
    loaded_keys: set[str] = set()
    assert adapter_class.load("lora_unet_not_a_layer", single, None, None, loaded_keys) is None and not loaded_keys
    adapter = adapter_class.load(prefix, single, None, None, loaded_keys)
    assert loaded_keys == {f"{prefix}.{suffix}" for suffix in ("waveft_spectrum", "waveft_locations", "waveft_filters",
                                                                "waveft_scaling", "waveft_version")}
    weight = torch.randn(diff[key].shape)
    target = weight.clone()
    result = adapter.calculate_weight(target, "diffusion_model.x.weight", 0.5, 1.0, None, lambda tensor: tensor)
    assert result is target  # in place, as ComfyUI needs for narrowed views of fused weights
    torch.testing.assert_close(result, weight + 0.5 * diff[key], rtol=0, atol=1e-6)
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(adapter.h(x, torch.zeros(3, weight.shape[0])), x @ diff[key].T, rtol=1e-5, atol=1e-6)


def test_a_file_of_a_newer_format_is_refused_with_what_to_do(adapters, tmp_path, monkeypatch):
    node = import_node(monkeypatch, inside_comfyui=False)
    _, single = exports(adapters["db1"], tmp_path)
    prefix = next(key for key in single if key.endswith(".waveft_version")).removesuffix(".waveft_version")
    single[f"{prefix}.waveft_version"] = torch.tensor(2, dtype=torch.int32)
    with pytest.raises(node.UnsupportedWaveFTFile, match="format version 2, newer than this reader's 1: update"):
        node.read_layer(single, prefix)
    del single[f"{prefix}.waveft_scaling"]
    with pytest.raises(node.UnsupportedWaveFTFile, match="lacks .*waveft_scaling"):
        node.read_layer(single, prefix)


def test_the_file_is_within_twice_the_adapter_for_sdxl_with_the_papers_settings():
    """SDXL-base's 560 attention linears at n_frequency 2592 (shapes from the real config, on the meta device)."""
    layers, sizes = sdxl_sizes(2592)
    adapter = sizes[ADAPTER]
    assert layers == 560 and adapter > 560 * 2592 * 4
    assert sizes["--format waveft --dtype fp16"] <= 2 * adapter < sizes["--format comfyui --dtype fp16 (full updates)"] / 100
    assert sizes["--format waveft --dtype fp32"] <= 2.1 * adapter  # locations cost as much as an fp32 spectrum; + header


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return build_pipeline(load_components(str(tiny_model_dir)))


def image(pipe) -> np.ndarray:
    tile = generate_grid_images(pipe, [PROMPT], [SEED], steps=STEPS, guidance=5.0, height=SIZE, width=SIZE,
                                progress=False)[0][0]
    return np.asarray(tile.convert("RGB"))


def test_load_adapter_draws_what_waveft_train_sample_draws(adapters, pipeline, tmp_path, capsys):
    """From the folder and from the single file, on a stock pipeline; the scale changes between generations; unloading
    gives the base model back, biases included."""
    adapter = adapters["bias"]
    base_bias = {name: p.clone() for name, p in pipeline.unet.named_parameters() if name.endswith(".bias")}
    base = image(pipeline)
    code, _, stderr = run_cli(["sample", "--adapter", adapter, "--out", tmp_path / "cli.png", "--steps", STEPS,
                               "--seed", SEED, "--num-images", 1, "--prompt", PROMPT], capsys)
    assert code == 0, stderr
    sampled = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))[-SIZE:]
    single = export(adapter, tmp_path / "dog.safetensors", format="waveft", dtype="fp32").path

    for source in (adapter, single):
        waveft_train.load_adapter(pipeline, source)
        assert np.array_equal(image(pipeline), sampled), source
        waveft_train.set_adapter_scale(pipeline, 0.0)
        assert np.array_equal(image(pipeline), base)
        waveft_train.set_adapter_scale(pipeline, 1.0)
        assert np.array_equal(image(pipeline), sampled)
        with pytest.raises(UserError, match="already holds a WaveFT adapter"):
            waveft_train.load_adapter(pipeline, source)
        waveft_train.unload_adapter(pipeline)
        assert not any(isinstance(module, WaveFTLayer) for module in pipeline.unet.modules())
        assert all(torch.equal(p, base_bias[name]) for name, p in pipeline.unet.named_parameters() if name in base_bias)
        assert np.array_equal(image(pipeline), base)


def test_load_adapter_refuses_what_it_cannot_load_exactly(adapters, pipeline, tmp_path):
    single = export(adapters["db1"], tmp_path / "a.safetensors", format="waveft", dtype="fp32").path
    tensors = load_file(single)
    key = next(key for key in tensors if key.endswith(".waveft_locations"))
    tensors[key] = tensors[key].flip(1)
    with safe_open(str(single), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(tmp_path / "moved.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match="locations of .* differ"):
        waveft_train.load_adapter(pipeline, tmp_path / "moved.safetensors")
    assert not any(isinstance(module, WaveFTLayer) for module in pipeline.unet.modules())  # nothing left behind
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={**metadata, "waveft.format_version": "2"})
    with pytest.raises(UserError, match="newer than this waveft-train reads"):
        waveft_train.load_adapter(pipeline, tmp_path / "newer.safetensors")
    assert not any(isinstance(module, WaveFTLayer) for module in pipeline.unet.modules())


A1111_EXTENSION = REPO / "integrations" / "a1111" / "sd-webui-waveft"


def test_the_a1111_extension_puts_waveft_first_and_applies_the_update(adapters, tmp_path, monkeypatch):
    """The webui's Lora modules stood in for by their interface (network.NetworkModule stores the layer's tensors and
    finalize_updown multiplies by the prompt's number); the real ones ran at development time (docs/export.md)."""

    class NetworkModule:
        def __init__(self, net, weights):
            self.network, self.w = net, weights.w

        def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
            multiplier = self.network.unet_multiplier
            return updown.reshape(output_shape) * multiplier, None if ex_bias is None else ex_bias * multiplier

    full_type = object()
    network = types.SimpleNamespace(NetworkModule=NetworkModule)
    networks = types.SimpleNamespace(module_types=[full_type])
    monkeypatch.setitem(sys.modules, "network", network)
    monkeypatch.setitem(sys.modules, "networks", networks)
    for _ in range(2):  # the webui may run scripts again on reload: the type is added once
        spec = importlib.util.spec_from_file_location("waveft_network", A1111_EXTENSION / "scripts" / "waveft_network.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert len(networks.module_types) == 2 and networks.module_types[1] is full_type
    waveft_type = networks.module_types[0]

    diff, single = exports(adapters["bias"], tmp_path)
    prefix = next(key for key in diff if key.endswith(".diff_b")).removesuffix(".diff_b")
    layer_tensors = {key.removeprefix(prefix + "."): value for key, value in single.items() if key.startswith(prefix + ".")}
    net = types.SimpleNamespace(unet_multiplier=0.5)
    assert waveft_type.create_module(net, types.SimpleNamespace(w={"diff": diff[prefix + ".diff"]})) is None
    module = waveft_type.create_module(net, types.SimpleNamespace(w=layer_tensors))
    weight = torch.randn(diff[prefix + ".diff"].shape)
    updown, bias = module.calc_updown(weight)
    torch.testing.assert_close(updown, 0.5 * diff[prefix + ".diff"], rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, 0.5 * diff[prefix + ".diff_b"])
