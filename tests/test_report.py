"""A run you can watch: report.html (checked against metrics.jsonl and the grids' files) and the trackers, each read
back by its own reader: TensorBoard's EventAccumulator, W&B's offline run file through W&B's own protobuf records."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import sys
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wandb
from PIL import Image
from test_train import DEMO, fast_overrides

from waveft_train.cli import main as cli
from waveft_train.common.errors import UserError
from waveft_train.config import TrainSection, load_config
from waveft_train.train import run
from waveft_train.train.charts import SMOOTHING
from waveft_train.train.report_html import MAX_INLINE_WIDTH, write_report
from waveft_train.train.reporting import start_trackers

PROMPTS = ["a photo of sks toy", "a toy on the beach"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, str]:
    """A tiny run (4 steps, grids of two prompts at steps 2 and 4) reporting to TensorBoard and W&B (offline, its
    files in output.dir/wandb by default); the run folder and what the run printed."""
    root = tmp_path_factory.mktemp("tracked")
    overrides = fast_overrides(root / "run", root / "class", **{"train.report_to": "[tensorboard, wandb]",
                                                                "validation.prompts": json.dumps(PROMPTS)})
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_CONSOLE", "off")  # W&B would otherwise wrap this process's stdout and stderr
        patch.delenv("WANDB_DIR", raising=False)
        for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(variable, str(root / variable.lower()))
        with redirect_stdout(printed):
            output_dir = run.train_from_config(load_config(DEMO, overrides), progress=False)
        wandb.teardown()  # W&B keeps its settings (offline mode included) process-wide until torn down
    return output_dir, printed.getvalue()


def metrics_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def report_data(page: str) -> dict:
    return json.loads(re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)[1])


def inlined_image(page: str, alt: str) -> Image.Image:
    uri = re.search(rf"<img alt='{re.escape(alt)}' src='data:image/(?:png|jpeg);base64,([^']+)'", page)[1]
    return Image.open(io.BytesIO(base64.b64decode(uri)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def grids_of(output_dir: Path) -> dict[int, Path]:
    return {int(path.stem.removeprefix("step-")): path for path in sorted((output_dir / "samples").glob("step-*.png"))}


def copy_of_run(output_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb", "waveft-train"))
    return copy


# ------------------------------------------------------------------------------------------------ report.html
def test_the_run_ends_by_naming_its_report(tracked_run):
    output_dir, printed = tracked_run
    lines = printed.strip().splitlines()
    assert lines[-2].startswith("Done: adapter in") and lines[-1] == f"Report: {output_dir / 'report.html'}"


def test_the_report_plots_what_metrics_jsonl_holds(tracked_run):
    output_dir, _ = tracked_run
    page = (output_dir / "report.html").read_text()
    charts, metrics = report_data(page)["charts"], metrics_of(output_dir)
    steps = [record["step"] for record in metrics]
    assert steps == [1, 2, 3, 4]
    assert charts["Loss"]["loss"] == {"steps": steps, "values": [record["loss"] for record in metrics]}
    assert charts["Learning rate"]["learning rate"] == {"steps": steps, "values": [record["lr"] for record in metrics]}
    assert charts["Seconds per step"]["seconds per step"] == {"steps": steps,
                                                              "values": [record["seconds"] for record in metrics]}
    # the documented smoothing: TensorBoard's debiased moving average, which is pandas' adjusted EWM
    expected = pd.Series([record["loss"] for record in metrics]).ewm(alpha=1 - SMOOTHING, adjust=True).mean()
    assert charts["Loss"]["loss (smoothed)"]["steps"] == steps
    assert charts["Loss"]["loss (smoothed)"]["values"] == pytest.approx(expected.tolist(), rel=1e-12)
    for title in charts:  # every chart is an image in the page
        assert inlined_image(page, title).format == "PNG"
    assert "<h2>Summary</h2>" in page and "trainable_params" in page and "report_to" in page  # summary, settings


def test_the_report_holds_every_validation_grid_in_step_order(tracked_run):
    output_dir, _ = tracked_run
    page = (output_dir / "report.html").read_text()
    grids = grids_of(output_dir)
    assert sorted(grids) == [2, 4]
    assert report_data(page)["grids"] == [{"step": step, "file": f"samples/step-{step:06d}.png"} for step in grids]
    for step, path in grids.items():
        assert np.array_equal(pixels(inlined_image(page, f"validation grid, step {step}")), pixels(Image.open(path)))
        assert f"<a href='samples/step-{step:06d}.png'>" in page
    assert page.index("validation grid, step 2") < page.index("validation grid, step 4")
    assert all(prompt in page for prompt in PROMPTS)


def test_the_report_plots_evaluation_scores_and_marks_the_best_checkpoint(tracked_run, tmp_path):
    folder = copy_of_run(tracked_run[0], tmp_path)
    scored = [  # the evaluation's contract: one line per scored checkpoint, in any order
        {"step": 4, "checkpoint": "adapter", "scores": {"judge": 0.5, "clip_i": 0.71, "base_clip_i": 0.6}, "score": 0.5},
        {"step": 2, "checkpoint": "checkpoints/step-000002", "scores": {"judge": 0.75, "clip_i": 0.69}, "score": 0.75},
        {"step": 4, "checkpoint": "checkpoints/step-000004", "scores": {"judge": 0.25, "clip_i": 0.7}, "score": 0.25},
    ]
    (folder / "evaluation.jsonl").write_text("".join(json.dumps(line) + "\n" for line in scored))
    best = {"step": 2, "checkpoint": "checkpoints/step-000002", "score": 0.75}
    (folder / "evaluation.json").write_text(json.dumps({"best": best, "rule": "highest judge accuracy"}))
    page = write_report(folder).read_text()
    data = report_data(page)
    assert data["best"] == best
    ordered = sorted(scored, key=lambda line: line["step"])
    steps = [line["step"] for line in ordered]
    assert data["charts"]["Ranking score"] == {"ranking score": {"steps": steps, "values": [line["score"] for line in ordered]},
                                               "best checkpoint": {"steps": [2], "values": [0.75]}}
    for name in ("judge", "clip_i"):
        expected = {name: {"steps": steps, "values": [line["scores"][name] for line in ordered]},
                    "best checkpoint": {"steps": [2], "values": [scored[1]["scores"][name]]}}
        if name == "clip_i":  # the base model's twin is drawn beside it, where it was scored
            expected["base model"] = {"steps": [4], "values": [0.6]}
        assert data["charts"][f"Score: {name}"] == expected
        assert inlined_image(page, f"Score: {name}").format == "PNG"
    assert "Score: base_clip_i" not in data["charts"] and "<th>base_clip_i</th>" not in page
    assert "Best checkpoint: <code>checkpoints/step-000002</code> (step 2, score 0.75). Rule: highest judge accuracy." in page


def test_without_matplotlib_the_report_keeps_grids_and_summary_and_says_what_to_install(tracked_run, tmp_path,
                                                                                         monkeypatch):
    folder = copy_of_run(tracked_run[0], tmp_path)
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib` now fails as if it were not installed
    page = write_report(folder).read_text()
    data = report_data(page)
    assert "pip install 'waveft-train[report]'" in page and "<img alt='Loss'" not in page
    assert data["not_drawn"] == ["Loss", "Learning rate", "Seconds per step"]
    assert data["charts"]["Loss"]["loss"]["values"] == [record["loss"] for record in metrics_of(folder)]
    assert [grid["step"] for grid in data["grids"]] == [2, 4] and "validation grid, step 4" in page
    assert "<h2>Summary</h2>" in page and "trainable_params" in page


def test_a_wide_grid_is_inlined_reduced_and_links_to_its_full_png(tmp_path):
    folder = tmp_path / "old-run"  # a run folder from the files alone: no training needed
    (folder / "samples").mkdir(parents=True)
    (folder / "config.yaml").write_text("validation:\n  prompts: [a photo of sks dog]\ntrain:\n  max_steps: 100\n")
    (folder / "metrics.jsonl").write_text('{"step": 10, "loss": 0.25, "lr": 0.0001, "seconds": 1.5}\n')
    wide = np.random.default_rng(0).integers(0, 256, (256, 4 * MAX_INLINE_WIDTH, 3), dtype=np.uint8)
    Image.fromarray(wide).save(folder / "samples" / "step-000010.png")
    page = write_report(folder).read_text()
    inlined = inlined_image(page, "validation grid, step 10")
    assert inlined.format == "JPEG" and inlined.size == (MAX_INLINE_WIDTH, 64)
    assert "<a href='samples/step-000010.png'>" in page and "In progress: step 10 of 100." in page


def test_the_report_command_rebuilds_a_run_s_page_and_refuses_other_folders(tracked_run, tmp_path, capsys):
    folder = copy_of_run(tracked_run[0], tmp_path)
    (folder / "report.html").unlink()
    cli.main(["report", str(folder)])
    assert capsys.readouterr().out == f"Wrote {folder / 'report.html'}\n"
    assert report_data((folder / "report.html").read_text())["grids"][-1]["step"] == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "holds no waveft-train run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the trackers
def test_tensorboard_gets_the_scalars_and_the_grids(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = tracked_run
    events = EventAccumulator(str(output_dir / "waveft-train"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    metrics = metrics_of(output_dir)
    for name in ("loss", "lr", "grad_norm", "prior_loss"):
        logged = events.Scalars(name)
        assert [event.step for event in logged] == [record["step"] for record in metrics]
        assert [event.value for event in logged] == pytest.approx([record[name] for record in metrics], rel=1e-6)  # fp32
    images = events.Images("validation")
    grids = grids_of(output_dir)
    assert [image.step for image in images] == sorted(grids)
    for image in images:
        assert np.array_equal(pixels(Image.open(io.BytesIO(image.encoded_image_string))),
                              pixels(Image.open(grids[image.step])))


def test_a_wandb_that_cannot_start_is_one_paragraph_with_what_to_do(tmp_path, monkeypatch):
    from accelerate import Accelerator

    for variable in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    train = TrainSection(report_to="wandb")
    wandb.teardown()  # W&B reads its settings again from here
    with pytest.raises(UserError) as error:
        start_trackers(Accelerator(log_with=train.report_to, project_dir=tmp_path), train, tmp_path, {})
    assert "train.report_to: wandb could not start a W&B run" in str(error.value)
    assert "`wandb login`" in str(error.value) and "WANDB_MODE=offline" in str(error.value)


def wandb_records(path: Path):
    """The protobuf records of a W&B run file: a 7-byte header, then leveldb-log records (crc32 of type and data,
    length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in 32 KiB blocks, parsed with W&B's own Record message."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    position, pending = header, b""
    while position + header <= len(data):
        left = block - position % block
        if left < header:  # a block's tail too short for a record header is padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        if kind == 0:
            position += left
            continue
        chunk = data[position + header:position + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum
        position, pending = position + header + length, pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_files_hold_the_scalars_and_the_grids(tracked_run):
    output_dir, _ = tracked_run
    (run_dir,) = (output_dir / "wandb").glob("offline-run-*")
    history: dict[int, dict] = {}
    settings = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            assert (record.run.project, record.run.display_name) == ("waveft-train", output_dir.name)
        elif kind == "config":
            settings.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert settings["output.dir"] == str(output_dir) and settings["train.report_to"] == '["tensorboard", "wandb"]'
    metrics = metrics_of(output_dir)
    for record in metrics:
        assert {name: history[record["step"]][name] for name in ("loss", "lr", "grad_norm", "seconds")} == {
            name: record[name] for name in ("loss", "lr", "grad_norm", "seconds")}
    grids = grids_of(output_dir)
    # newer W&B writes an image's fields as nested keys ("validation/filenames"), older releases one JSON value
    logged = {step: row.get("validation/filenames") or row["validation"]["filenames"] for step, row in history.items()
              if "validation/filenames" in row or isinstance(row.get("validation"), dict)}
    assert sorted(logged) == sorted(grids)
    for step, (filename,) in logged.items():
        assert np.array_equal(pixels(Image.open(run_dir / "files" / filename)), pixels(Image.open(grids[step])))
