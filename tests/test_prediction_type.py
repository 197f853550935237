"""The prediction type travels with the adapter: an adapter trained for v-prediction on an epsilon base samples as
v-prediction in `sample`, in the merged export's scheduler config and in the model card, and stock peft still loads
it without a word."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from safetensors import safe_open

from waveft_train.adapter.files import PREDICTION_TYPE_KEY, read_adapter
from waveft_train.cli import main as cli
from waveft_train.config import load_config
from waveft_train.train import run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tests" / "data" / "tiny.yaml"


def train(output_dir: Path, **extra) -> Path:
    values = {"model.pretrained": "tiny", "output.dir": output_dir, "prior.enabled": False, "data.resolution": 32,
              "train.max_steps": 1, "train.checkpoint_every": 0, "validation.every": 0, "validation.prompts": "[]",
              "waveft.n_frequency": 64, **extra}
    return run.train_from_config(load_config(DEMO, [f"{key}={value}" for key, value in values.items()]),
                                 progress=False) / "adapter"


@pytest.fixture(scope="module")
def v_adapter(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("v") / "run", **{"train.prediction_type": "v_prediction"})


def test_the_adapter_records_a_prediction_type_that_differs_from_its_base(v_adapter, tmp_path):
    with safe_open(str(v_adapter / "adapter_model.safetensors"), framework="pt") as weights:
        assert weights.metadata()[PREDICTION_TYPE_KEY] == "v_prediction"
    assert read_adapter(v_adapter).prediction_type == "v_prediction"
    assert "prediction_type" not in json.loads((v_adapter / "adapter_config.json").read_text())
    card = (v_adapter / "README.md").read_text()
    assert 'prediction_type="v_prediction"' in card and "| prediction type | v_prediction |" in card
    checkpoint = v_adapter.parent / "checkpoints" / "step-000001"
    assert read_adapter(checkpoint).prediction_type == "v_prediction"  # checkpoints carry it too

    same = train(tmp_path / "run", **{"train.prediction_type": "epsilon"})  # the base's own: nothing to record
    assert read_adapter(same).prediction_type is None


def test_sample_and_the_merged_export_use_it(v_adapter, tmp_path):
    from diffusers import EulerDiscreteScheduler

    from waveft_train.adapter.load import load_adapter_unet

    components, _ = load_adapter_unet(v_adapter, None)
    assert components.scheduler.config.prediction_type == "v_prediction"  # what `sample` builds its pipeline with
    base_components, _ = load_adapter_unet(train(tmp_path / "eps"), None)
    assert base_components.scheduler.config.prediction_type == "epsilon"

    out = tmp_path / "merged"
    cli.main(["export", "--adapter", str(v_adapter), "--out", str(out), "--dtype", "fp32"])  # returns on success
    scheduler = EulerDiscreteScheduler.from_pretrained(out)
    assert scheduler.config.prediction_type == "v_prediction"


def test_stock_peft_loads_it_without_a_warning(v_adapter, tiny_model_dir):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from waveft_train.waveft import register, unregister

    unregister()
    try:
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unknown key in adapter_config.json would warn here
            PeftModel.from_pretrained(unet, v_adapter)
    finally:
        register()


def test_the_one_file_exports_record_it(v_adapter, tmp_path):
    out = tmp_path / "subject.safetensors"
    cli.main(["export", "--adapter", str(v_adapter), "--format", "comfyui", "--out", str(out)])
    with safe_open(str(out), framework="pt") as exported:
        metadata = exported.metadata()
    assert metadata["waveft.prediction_type"] == "v_prediction" and metadata["ss_v_parameterization"] == "True"
