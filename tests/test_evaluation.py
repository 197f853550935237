"""Scores for real SDXL and the best checkpoint of a run (issue 36, items 3 and 4).

The metric models are tiny random DINO ViT and CLIP checkpoints built in code (models/tiny_metrics.py) and loaded
from their folders with from_pretrained(use_safetensors=True), so the real loading code runs; the metrics are checked
against direct transformers calls. A tiny-model run is then scored during training (validation.evaluate) and by
`waveft-train evaluate --run`, and its best checkpoint is used by `sample --run --checkpoint best`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fast_overrides, run_cli
from PIL import Image

from waveft_train.common.errors import UserError
from waveft_train.config import load_config
from waveft_train.evaluation.colour import colour_histogram, palette_overlap
from waveft_train.evaluation.dreambooth import DreamBoothPrompts, References, dreambooth_scores
from waveft_train.evaluation.metric_models import load_metric_models, split_revision
from waveft_train.evaluation.ranking import best_record, ranking_parts, ranking_score
from waveft_train.models.tiny_metrics import tiny_metric_model_dir
from waveft_train.toy.world import render_image, sample_scene
from waveft_train.train.run import DreamBoothRun

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = REPO / "tests" / "data" / "tiny.yaml"


@pytest.fixture(scope="module")
def metric_folders(waveft_cache_dir) -> dict[str, Path]:
    """The tiny DINO and CLIP folders (the ones `--dino tiny` / `--clip tiny` name)."""
    return {kind: tiny_metric_model_dir(kind, waveft_cache_dir) for kind in ("dino", "clip")}


def pictures(count: int, seed: int, size=(48, 40)) -> list[Image.Image]:
    """Smooth random pictures (not square, so the processors' resize and crop run)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(count, 4, 5, 3), dtype=np.uint8)
    return [Image.fromarray(array).resize(size, Image.Resampling.BILINEAR) for array in small]


# ------------------------------------------------------------------------------------------ the metrics
def test_dreambooth_scores_are_what_transformers_computes(metric_folders):
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    models = load_metric_models(str(metric_folders["dino"]), str(metric_folders["clip"]))
    photos, samples, class_samples = pictures(3, 0), pictures(4, 1), pictures(3, 2)
    prompts = DreamBoothPrompts("a photo of sks toy", "a photo of toy", ("on the beach", "in the snow"))
    scores = dreambooth_scores(models, References.of(models, photos), prompts, samples, class_samples, seeds=2)

    # The oracle: each model called as its model card shows, on the processors' own inputs.
    vit = ViTModel.from_pretrained(metric_folders["dino"], use_safetensors=True, add_pooling_layer=False).eval()
    vit_inputs = AutoImageProcessor.from_pretrained(metric_folders["dino"])
    clip = CLIPModel.from_pretrained(metric_folders["clip"], use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(metric_folders["clip"])
    texts = ["a photo of toy on the beach", "a photo of toy in the snow"]  # the class noun where "sks toy" was

    with torch.no_grad():
        def dino(images):
            cls = vit(**vit_inputs(images=images, return_tensors="pt")).last_hidden_state[:, 0]
            return torch.nn.functional.normalize(cls, dim=-1)

        def clip_out(images):
            return clip(**processor(text=texts, images=images, return_tensors="pt", padding=True))

        generated, real, klass = clip_out(samples), clip_out(photos), clip_out(class_samples)
        cosine_of_logits = generated.logits_per_image / clip.logit_scale.exp()  # image i × text j, cosine
        sample_dino, photo_dino, class_dino = dino(samples), dino(photos), dino(class_samples)
    expected = {
        "dino": (sample_dino @ photo_dino.T).mean(),
        "clip_i": (generated.image_embeds @ real.image_embeds.T).mean(),
        "clip_t": torch.stack([cosine_of_logits[i, i // 2] for i in range(4)]).mean(),  # 2 seeds per context
        "diversity": 1 - torch.stack([sample_dino[0] @ sample_dino[1], sample_dino[2] @ sample_dino[3]]).mean(),
        "class_dino": (class_dino @ photo_dino.T).mean(),
        "class_clip_i": (klass.image_embeds @ real.image_embeds.T).mean(),
    }
    for name, value in expected.items():
        assert scores[name] == pytest.approx(float(value), abs=1e-5), name
    assert scores["subject_similarity"] == pytest.approx((scores["dino"] + scores["clip_i"]) / 2)
    assert scores["prompt_fidelity"] == scores["clip_t"]


def test_colour_histogram_reads_hue_weighted_by_vividness():
    red, grey = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (128, 128, 128))
    assert colour_histogram([red])[0] == pytest.approx(1.0)  # hue 0°: bin 0
    assert not colour_histogram([grey]).any()  # no colour at all: no palette, nothing shared
    assert palette_overlap(colour_histogram([red]), colour_histogram([grey])) == 0.0
    # Pixels count by chroma² (saturation × value): a vivid yellow half outweighs a pale blue half 4 to 1.
    mixed = np.zeros((8, 8, 3), np.uint8)
    mixed[:4] = (255, 255, 0)  # yellow, hue 60°, chroma 1
    mixed[4:] = (64, 64, 128)  # pale blue, hue 240°, chroma 0.5 × 0.5
    palette = colour_histogram([Image.fromarray(mixed)])
    assert palette[2] == pytest.approx(16 / 17, abs=1e-3) and palette[8] == pytest.approx(1 / 17, abs=1e-3)


def test_colour_drift_sees_a_class_sliding_toward_the_subject_colours():
    """The demo's complaint: class samples turning red, orange and yellow (without ever being the striped subject)
    went unseen. Same layouts and contexts, only the colours differ."""
    subject = [render_image(sample_scene(np.random.default_rng([1, i]), shape="ball", colours=("red", "yellow"),
                                         pattern="stripes", context="snow")) for i in range(4)]
    layouts = [sample_scene(np.random.default_rng([2, i]), shape="ball", pattern="solid") for i in range(6)]
    varied = [render_image(replace(scene, colours=(colour,)))
              for scene, colour in zip(layouts, ("purple", "green", "blue", "purple", "green", "blue"))]
    drifted = [render_image(replace(scene, colours=(colour,)))
               for scene, colour in zip(layouts, ("red", "orange", "yellow", "red", "orange", "yellow"))]
    palette = colour_histogram(subject)
    base, adapter = palette_overlap(colour_histogram(varied), palette), palette_overlap(colour_histogram(drifted), palette)
    assert adapter > base + 0.1, (base, adapter)


# ------------------------------------------------------------------------------------------ the ranking
def table(gain: float, class_shift: float = 0.0, colour_shift: float = 0.0, prompt: float = 0.30) -> dict:
    """Scores of a checkpoint against a base model with subject 0.40, class 0.50, colour 0.40, CLIP-T 0.30."""
    return {"subject_similarity": 0.40 + gain, "base_subject_similarity": 0.40,
            "class_subject_similarity": 0.50 + class_shift, "base_class_subject_similarity": 0.50,
            "class_colour_similarity": 0.40 + colour_shift, "base_class_colour_similarity": 0.40,
            "prompt_fidelity": prompt, "base_prompt_fidelity": 0.30}


def test_a_checkpoint_that_drifts_the_class_loses_to_a_slightly_weaker_one_that_does_not():
    drifting = table(gain=0.30, colour_shift=0.10)  # more of the subject, but the class took on its colours
    steady = table(gain=0.25)
    assert ranking_score(drifting) == pytest.approx(0.20) and ranking_score(steady) == pytest.approx(0.25)
    records = [{"step": 200, "score": ranking_score(steady)}, {"step": 400, "score": ranking_score(drifting)}]
    assert best_record(records)["step"] == 200
    # A class that moves away from the subject is no credit; copies count by features too; lost contexts cost.
    assert ranking_parts(table(gain=0.2, class_shift=-0.1))["class_drift"] == 0.0
    assert ranking_score(table(gain=0.2, class_shift=0.05)) == pytest.approx(0.15)
    assert ranking_parts(table(gain=0.2, prompt=0.24))["prompt_loss"] == pytest.approx(0.2)
    assert best_record([{"step": 300, "score": 0.1}, {"step": 100, "score": 0.1}])["step"] == 100  # tie: earlier


# ------------------------------------------------------------------------------------------ metric models
def test_metric_models_that_cannot_be_loaded_are_one_clear_error(metric_folders, tmp_path):
    with pytest.raises(UserError, match=r"no-such/dino.*hf download no-such/dino --revision v2.*--dino"):
        load_metric_models("no-such/dino@v2", str(metric_folders["clip"]))
    pickled = tmp_path / "pickled"  # config.json and no model.safetensors: pickled weights are never loaded
    pickled.mkdir()
    shutil.copy(metric_folders["clip"] / "config.json", pickled / "config.json")
    with pytest.raises(UserError, match="model.safetensors"):
        load_metric_models(str(metric_folders["dino"]), str(pickled))
    with pytest.raises(UserError, match="no folder"):
        load_metric_models(str(tmp_path / "missing"), "tiny")
    assert split_revision("facebook/dino-vits16@refs/pr/1") == ("facebook/dino-vits16", "refs/pr/1")
    assert split_revision(str(tmp_path / "a@b")) == (str(tmp_path / "a@b"), None)  # a folder is never split


def test_scoring_settings_that_cannot_work_are_refused_by_the_config(tmp_path):
    def config(**extra):
        return load_config(TINY_RUN, fast_overrides(tmp_path / "run", tmp_path / "class", **extra))

    with pytest.raises(UserError, match=r"validation.every \(3\) must be a multiple of train.checkpoint_every \(2\)"):
        config(**{"validation.evaluate": "true", "validation.every": 3})
    with pytest.raises(UserError, match="prior.class_prompt"):
        config(**{"validation.evaluate": "true", "prior.enabled": "false", "prior.class_prompt": "null"})
    assert DreamBoothRun(config(**{"validation.evaluate": "true", "validation.every": 4})).scores is not None


# ------------------------------------------------------------------------------------------ a scored run
@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A tiny-model run scored during training (validation.evaluate) with the tiny metric models: 4 steps,
    checkpoints and validation at 2 and 4, every checkpoint kept."""
    from waveft_train.train import run

    folder = tmp_path_factory.mktemp("scored")
    overrides = fast_overrides(folder / "run", folder / "class", **{
        "validation.evaluate": "true", "validation.dino_model": "tiny", "validation.clip_model": "tiny",
        "train.checkpoints_keep": "null"})
    return run.train_from_config(load_config(TINY_RUN, overrides), progress=False)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "evaluation.jsonl").read_text().splitlines()]


def test_training_with_validation_evaluate_scores_each_validation_step(scored_run):
    records = read_log(scored_run)
    assert [(r["step"], r["checkpoint"]) for r in records] == [(2, "checkpoints/step-000002"), (4, "adapter")]
    summary = json.loads((scored_run / "evaluation.json").read_text())
    best = max(records, key=lambda r: r["score"])
    assert summary["best"] == {key: best[key] for key in ("step", "checkpoint", "score")}
    assert summary["settings"]["metrics"] == "dreambooth" and summary["settings"]["models"] == {"dino": "tiny",
                                                                                                 "clip": "tiny"}
    assert "subject_gain - class_drift - prompt_loss" in summary["rule"]
    for record in records:
        assert record["score"] == pytest.approx(ranking_score(record["scores"]))
        assert {"dino", "clip_i", "clip_t", "diversity", "class_colour_similarity", "base_dino"} <= set(record["scores"])


def test_scoring_during_training_leaves_the_trained_adapter_as_it_was(scored_run, tmp_path):
    """Scoring between steps switches the adapter off for the base model and the UNet to eval mode, and back: the run
    must train what it trains without (on the CPU bit for bit; the tolerance is for GPU kernels)."""
    from safetensors.torch import load_file

    from waveft_train.train import run

    overrides = fast_overrides(tmp_path / "run", scored_run.parent / "class", **{"train.checkpoints_keep": "null"})
    plain = run.train_from_config(load_config(TINY_RUN, overrides), progress=False)
    scored, unscored = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (scored_run, plain))
    torch.testing.assert_close(scored, unscored, rtol=1e-4, atol=1e-7)
    assert not (plain / "evaluation.jsonl").exists()


def test_evaluate_run_ranks_every_checkpoint_and_names_the_best(scored_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    for name in ("evaluation.json", "evaluation.jsonl", "report.html"):
        (run_dir / name).unlink()
    code, _, err = run_cli(["sample", "--run", run_dir, "--checkpoint", "best", "-p", "a photo of sks toy", "-o",
                            tmp_path / "g.png"], capsys)
    assert code == 2 and "was not scored" in err and f"waveft-train evaluate --run {run_dir}" in err, err

    code, out, err = run_cli(["evaluate", "--run", run_dir, "--dino", "tiny", "--clip", "tiny", "--seeds", 2,
                              "--class-seeds", 2, "--steps", 2, "--context", "on the beach", "--context",
                              "in the snow"], capsys)
    assert code == 0, err
    records = read_log(run_dir)
    assert [(r["step"], r["checkpoint"]) for r in records] == [(2, "checkpoints/step-000002"), (4, "adapter")]
    best = json.loads((run_dir / "evaluation.json").read_text())["best"]
    assert best["score"] == max(r["score"] for r in records)
    assert f"Best: {best['checkpoint']} (step {best['step']}" in out and "<- best" in out
    assert "evaluation.jsonl" in (run_dir / "report.html").read_text()  # the report shows the new scores
    assert json.loads((run_dir / "evaluation.json").read_text())["settings"]["contexts"] == ["on the beach",
                                                                                            "in the snow"]

    code, out, err = run_cli(["sample", "--run", run_dir, "--checkpoint", "best", "-p", "a photo of sks toy", "-n", 1,
                              "--steps", 2, "-o", tmp_path / "best.png"], capsys)
    assert code == 0 and (tmp_path / "best.png").is_file(), err
    code, _, err = run_cli(["export", "--run", run_dir, "--checkpoint", "7", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "Steps with one" in err and "2, 4" in err, err


def test_evaluate_one_adapter_of_real_sdxl_reports_the_metrics_and_the_base_model(scored_run, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code, printed, err = run_cli(["evaluate", "--adapter", scored_run / "adapter", "--dino", "tiny", "--clip", "tiny",
                                  "--seeds", 2, "--class-seeds", 1, "--steps", 2, "--context", "on the beach",
                                  "--out", out], capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    for name in ("dino", "clip_i", "clip_t", "diversity", "class_colour_similarity"):
        assert name in metrics and name in metrics["base"]
    assert metrics["ranking"]["score"] == pytest.approx(metrics["ranking"]["subject_gain"]
                                                        - metrics["ranking"]["class_drift"]
                                                        - metrics["ranking"]["prompt_loss"])
    assert f"dino {metrics['dino']:.2f} (base {metrics['base']['dino']:.2f})" in printed

    copied = tmp_path / "copied"  # no run config beside it: the photos and prompts must be given
    shutil.copytree(scored_run / "adapter", copied)
    code, _, err = run_cli(["evaluate", "--adapter", copied, "--dino", "tiny", "--clip", "tiny"], capsys)
    assert code == 2 and "--instance-dir" in err and "Traceback" not in err, err
