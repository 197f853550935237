"""Adapter folders and checkpoints: peft format, atomic writes, pruning, resume state without pickle, safe loading."""

from __future__ import annotations

import copy
import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel, WaveFTConfig, inject_adapter_in_model
from safetensors.torch import load_file
from torch import nn

from waveft_train.adapter.files import adapter_state_dict, load_adapter_weights_into, read_adapter, save_adapter
from waveft_train.common import files
from waveft_train.common.errors import UserError
from waveft_train.train.checkpoint import (
    find_latest_checkpoint,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)
from waveft_train.waveft import register, unregister

CHECKPOINT_FILES = ["adapter_config.json", "adapter_model.safetensors", "training_state.json",
                    "training_state.safetensors"]


@pytest.fixture(autouse=True)
def registered():
    register()
    yield
    register()


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 16, bias=False)
        self.to_k = nn.Linear(16, 16)
        self.to_v = nn.Linear(16, 16)

    def forward(self, x):
        return self.to_v(torch.tanh(self.to_q(x) + self.to_k(x)))


class TinyNet(nn.Module):
    """Stands in for the UNet where only checkpoint mechanics matter (fast)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def adapted_net(seed: int = 0, target_modules=("to_q", "to_k")) -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    inject_adapter_in_model(WaveFTConfig(n_frequency=20, target_modules=list(target_modules)), net)
    randomize(net, seed)
    return net


def randomize(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "waveft_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def spectra(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()
            if "waveft_spectrum" in name}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def save_step(output_dir: Path, step: int, net: nn.Module | None = None, keep: int | None = None) -> Path:
    return save_checkpoint(output_dir, step, unet=net or adapted_net(step), base_model_name_or_path="tiny",
                           training_state={"step": step, "fingerprint": "abc123", "rng": torch.arange(6),
                                           "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": step}},
                           keep=keep)


# ------------------------------------------------------------------------------------ adapter format


def unet_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(1, 4, 8, 8, generator=generator), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 64, generator=generator),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=generator),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])})


@pytest.mark.filterwarnings("ignore:Could not find a config file in org/sdxl")  # peft's writer asks the hub
def test_save_adapter_is_what_stock_peft_loads_and_writes(tiny_components, tmp_path):
    unet = tiny_components.unet
    base = copy.deepcopy(unet)
    config = WaveFTConfig(n_frequency=24, target_modules=["to_q", "to_k"], wavelet_family="db2", random_loc_seed=3,
                          scaling=5.0)
    unet.add_adapter(config)
    randomize(unet, seed=7)
    with torch.no_grad():
        expected = unet(**unet_inputs()).sample
    adapter_dir = save_adapter(tmp_path / "adapter", unet, base_model_name_or_path="org/sdxl", model_card="# card\n")

    assert sorted(p.name for p in adapter_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                             "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp sibling left behind
    assert (adapter_dir / "README.md").read_text() == "# card\n"
    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "WAVEFT" and saved_config["base_model_name_or_path"] == "org/sdxl"
    assert saved_config["inference_mode"] is True and saved_config["n_frequency"] == 24
    assert unet.peft_config["default"].inference_mode is False  # the live config is untouched
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(saved) == 32 and all(key.startswith("base_model.model.") for key in saved)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    ours = spectra(unet)
    theirs = {name.removeprefix("base_model.model."): value for name, value in spectra(loaded).items()}
    assert sorted(theirs) == sorted(ours) and len(ours) == 32
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**unet_inputs()).sample, expected, atol=1e-5, rtol=1e-5)

    loaded.save_pretrained(tmp_path / "by_peft")  # peft's own writer: same tensors, same config
    by_peft = load_file(tmp_path / "by_peft" / "adapter_model.safetensors")
    assert sorted(by_peft) == sorted(saved) and all(torch.equal(by_peft[key], saved[key]) for key in saved)
    peft_config = json.loads((tmp_path / "by_peft" / "adapter_config.json").read_text())
    for written in (peft_config, saved_config):
        written["target_modules"] = sorted(written["target_modules"])
    assert peft_config == saved_config

    unregister()  # peft's reference WaveFT tuner loads it too, with the same outputs
    try:
        stock = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
        with torch.no_grad():
            torch.testing.assert_close(stock(**unet_inputs()).sample, expected, atol=1e-5, rtol=1e-5)
    finally:
        register()


def test_save_adapter_replaces_an_existing_folder(tmp_path):
    save_adapter(tmp_path / "adapter", adapted_net(1), base_model_name_or_path="tiny", model_card="old")
    net = adapted_net(2)
    save_adapter(tmp_path / "adapter", net, base_model_name_or_path="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    adapter = read_adapter(tmp_path / "adapter")
    config, tensors = adapter.config, adapter.load_tensors()
    assert isinstance(config, WaveFTConfig) and config.base_model_name_or_path == "tiny"
    expected = adapter_state_dict(net)
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------ checkpoint folders


def test_checkpoint_files_and_adapter_round_trip(tmp_path):
    net = adapted_net(3)
    x = torch.randn(2, 16)
    folder = save_checkpoint(tmp_path, 7, unet=net, base_model_name_or_path="tiny",
                             training_state={"step": 7, "fingerprint": "f00d"}, keep=3)
    assert folder == tmp_path / "checkpoints" / "step-000007"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]
    assert sorted(p.name for p in folder.iterdir()) == CHECKPOINT_FILES

    adapter_tensors, state = load_checkpoint(folder)
    assert state == {"step": 7, "fingerprint": "f00d"}
    assert sorted(adapter_tensors) == [f"base_model.model.blocks.{i}.{name}.waveft_spectrum"
                                       for i in (0, 1) for name in ("to_k", "to_q")]
    fresh = adapted_net(99)
    assert not torch.allclose(fresh(x), net(x))
    load_adapter_weights_into(fresh, adapter_tensors)
    assert all(torch.equal(a, b) for a, b in zip(spectra(fresh).values(), spectra(net).values()))
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_adapters_get_the_modes_of_normal_files(tmp_path, umask):
    import os
    import stat

    previous = os.umask(umask)
    try:
        net = adapted_net(3)
        folder = save_checkpoint(tmp_path, 7, unet=net, base_model_name_or_path="tiny", training_state={"step": 7},
                                 keep=3)
        adapter = save_adapter(tmp_path / "adapter", net, base_model_name_or_path="tiny", model_card="card")
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    for made in (folder, tmp_path / "checkpoints", adapter):
        assert mode(made) == 0o777 & ~umask, made
    for file in [*folder.iterdir(), *adapter.iterdir()]:
        assert mode(file) == 0o666 & ~umask, file


def test_loading_adapter_weights_that_do_not_fit_is_refused(tmp_path):
    tensors = adapter_state_dict(adapted_net(1))
    with pytest.raises(UserError, match=r"2 unexpected \(layer 'blocks.0.to_k' "
                                         r"\(base_model.model.blocks.0.to_k.waveft_spectrum"):
        load_adapter_weights_into(adapted_net(2, target_modules=["to_q"]), tensors)
    incomplete = dict(tensors)
    del incomplete["base_model.model.blocks.1.to_q.waveft_spectrum"]
    before = spectra(net := adapted_net(2))
    with pytest.raises(UserError, match=r"1 missing \(the file has no weights for layer 'blocks.1.to_q' "
                                         r"\(base_model.model.blocks.1.to_q.waveft_spectrum\)"):
        load_adapter_weights_into(net, incomplete)
    assert all(torch.equal(before[k], v) for k, v in spectra(net).items())  # nothing half-loaded
    resized = {key: torch.zeros(5) for key in tensors}
    with pytest.raises(UserError, match=r"wrong shape .*saved waveft_spectrum of shape \[5\], but the model's "
                                         r"layer takes \[20\]"):
        load_adapter_weights_into(adapted_net(2), resized)


def test_keep_last_n_prunes_oldest_and_stale_temp_folders(tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-000009-dead").mkdir()  # left by a crashed run
    save_step(tmp_path, 5, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoints" / f"step-00000{i}" for i in (4, 5)]

    for step in (10, 20, 30):
        save_step(tmp_path / "all", step, keep=None)
    assert [p.name for p in list_checkpoints(tmp_path / "all")] == ["step-000010", "step-000020", "step-000030"]


def test_pruning_keeps_the_checkpoint_the_run_s_scores_name_best(tmp_path):
    """`--checkpoint best` loads the folder evaluation.json names; keep-last-N must not delete it."""
    for step in (1, 2):
        save_step(tmp_path, step, keep=2)
    (tmp_path / "evaluation.json").write_text(json.dumps({"best": {"step": 2, "checkpoint": "checkpoints/step-000002"}}))
    for step in (3, 4, 5):
        save_step(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000005"]
    (tmp_path / "evaluation.json").write_text("{not json")  # unreadable scores protect nothing and break nothing
    save_step(tmp_path, 6, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-000006"]


def test_find_latest_skips_temp_and_incomplete_checkpoints(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    good = save_step(tmp_path, 10)
    root = tmp_path / "checkpoints"
    for name in ("step-000020", "step-000030", "step-000040", "step-000050", ".tmp-step-000060-abcd"):
        shutil.copytree(good, root / name)
    (root / "step-000020" / "training_state.json").unlink()
    (root / "step-000030" / "adapter_config.json").write_text("{broken")
    weights = root / "step-000040" / "training_state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    (root / "step-000050" / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    assert find_latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    shutil.copytree(good, root / "step-000070")
    assert find_latest_checkpoint(tmp_path) == root / "step-000070"


class HalfWriter:
    """A file whose write stores half the bytes, then fails like a full disk."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    previous = save_step(tmp_path, 1, keep=1)
    before = folder_bytes(previous)

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return HalfWriter(file) if Path(path).name == "training_state.safetensors" and "w" in mode else file

    monkeypatch.setattr(files, "open", open_on_full_disk, raising=False)
    with pytest.raises(OSError) as raised:
        save_step(tmp_path, 2, keep=1)
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert folder_bytes(previous) == before
    assert find_latest_checkpoint(tmp_path) == previous


def test_failed_fsync_keeps_the_existing_adapter(tmp_path, monkeypatch):
    save_adapter(tmp_path / "adapter", adapted_net(1), base_model_name_or_path="tiny")
    before = folder_bytes(tmp_path / "adapter")

    def fsync_on_full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fsync_on_full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(tmp_path / "adapter", adapted_net(2), base_model_name_or_path="tiny")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert folder_bytes(tmp_path / "adapter") == before


# ------------------------------------------------------------------------------------ training state


def train_step(model, optimizer, scheduler, seed: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_optimizer_and_scheduler_state_resume_identically(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.95), weight_decay=0.02)
    warmup = lambda step: min(1.0, (step + 1) / 4)  # noqa: E731 - what diffusers' schedulers look like
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    train_step(model, optimizer, scheduler, seed=1)
    train_step(model, optimizer, scheduler, seed=2)
    extra = {7: [1.5, None, True, "x"], "pair": (1, 2.0), -1: {"inf": math.inf}, "__tensor__": "not a tensor"}
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "step": 2,
             "fingerprint": "0123abcd", "extra": extra, "rng": torch.get_rng_state()}

    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton, allow_nan=True)  # plain JSON, no default= needed
    assert {"optimizer/state/0/exp_avg", "optimizer/state/3/exp_avg_sq", "optimizer/state/0/step", "rng"} <= set(tensors)

    folder = save_checkpoint(tmp_path, 2, unet=adapted_net(), base_model_name_or_path="tiny", training_state=state,
                             keep=None)
    _, restored = load_checkpoint(folder)
    assert restored["extra"] == extra and isinstance(restored["extra"]["pair"], tuple)
    assert sorted(restored["optimizer"]["state"]) == [0, 1, 2, 3]  # int parameter ids stay ints
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert restored["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert restored["lr_scheduler"] == scheduler.state_dict()
    assert torch.equal(restored["rng"], state["rng"]) and restored["step"] == 2

    resumed_model = copy.deepcopy(model)
    resumed_optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=0.05)
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, warmup)
    resumed_optimizer.load_state_dict(restored["optimizer"])
    resumed_scheduler.load_state_dict(restored["lr_scheduler"])
    train_step(model, optimizer, scheduler, seed=3)
    train_step(resumed_model, resumed_optimizer, resumed_scheduler, seed=3)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    for original, resumed in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(original, resumed)


def test_objects_json_cannot_hold_become_null():
    import numpy as np

    state = {"fn": lambda: 0, "object": object(), "lambdas": [print], 3: np.float32(0.5),
             "array": np.arange(5, dtype=np.uint32), "scaler": {"scale": 65536.0, "_growth_tracker": 0}}
    tensors, skeleton = flatten_state(state)
    restored = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    assert restored["fn"] is None and restored["object"] is None and restored["lambdas"] == [None]
    assert restored[3] == 0.5 and restored["scaler"] == {"scale": 65536.0, "_growth_tracker": 0}
    assert restored["array"].dtype == np.uint32 and restored["array"].tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------ refusing unsafe or broken files


def test_pickle_only_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "WAVEFT"}))
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UserError, match=r"adapter_model.bin.*pickle files are refused for safety.*safetensors"):
        read_adapter(adapter)
    folder = save_step(tmp_path / "run", 1)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.pt")
    with pytest.raises(UserError, match=r"adapter_model.pt.*pickle files are refused"):
        load_checkpoint(folder)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "training_state.safetensors"])
def test_truncated_safetensors_is_refused(tmp_path, name):
    folder = save_step(tmp_path, 1)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) - 7])
    with pytest.raises(UserError, match=rf"{folder / name} has {len(data) - 7} bytes .* truncated or corrupt"):
        load_checkpoint(folder)
    (folder / name).write_bytes(b"\xff" * 12)
    with pytest.raises(UserError, match=rf"{folder / name} .*truncated or corrupt"):
        load_checkpoint(folder)


def test_grad_scaler_state_round_trips_for_fp16_resume():
    """fp16 runs checkpoint accelerate's GradScaler; a resumed run must continue with the same loss scale."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for grad in (float("inf"), 1.0, 1.0):  # one overflow (the scale halves), then two good steps
        optimizer.zero_grad()
        scaler.scale((weight * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    tensors, skeleton = flatten_state({"scaler": scaler.state_dict(), "step": 3})
    restored = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(restored["scaler"])
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 2.0**15 and restored["step"] == 3
