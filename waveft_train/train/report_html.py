"""report.html: one self-contained page per run folder, built from the folder's files alone.

It reads metrics.jsonl, samples/step-*.png, config.yaml, summary.json and, when an evaluation wrote them,
evaluation.jsonl (one line per scored checkpoint: step, checkpoint, scores, score) and evaluation.json (the best
one), so it can be rebuilt for any run folder, old ones included (`waveft-train report OUTPUT_DIR`). The run rewrites
it at each validation and at the end; `write_report(output_dir)` is the one entry point. Images are inlined
(base64); a grid wider than `MAX_INLINE_WIDTH` is inlined as a reduced JPEG and links to its full PNG. A JSON block
(`<script id="report-data">`) holds the series each chart was drawn from, read back from the figures.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from waveft_train.common.errors import UserError
from waveft_train.common.files import atomic_write_text, writing
from waveft_train.train.charts import SMOOTHING, Chart, draw_chart, evaluation_charts, is_number, score_names, training_charts

REPORT_NAME = "report.html"
MAX_INLINE_WIDTH = 2048  # pixels; wider grids (real SDXL: 8 × 1024) are inlined reduced
MAX_INLINE_BYTES = 2 * 1024 * 1024
GRID_NAME = re.compile(r"step-(\d+)\.png")
NO_MATPLOTLIB = ("Plots need matplotlib, which is not installed: <code>pip install 'waveft-train[report]'</code>, then "
                 "<code>waveft-train report OUTPUT_DIR</code> rebuilds this page.")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
img { max-width: 100%; } figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; }
th { background: #f4f4f4; text-align: left; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.note { color: #555; } .best { background: #fff7d6; padding: 0.6em 1em; border-left: 4px solid #e0b000; }
"""


def write_report(output_dir: Path) -> Path:
    """Build `<output_dir>/report.html` from the run folder's files and write it atomically; returns its path."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or not any((output_dir / name).exists() for name in ("config.yaml", "metrics.jsonl")):
        raise UserError(f"{output_dir} holds no waveft-train run (no config.yaml or metrics.jsonl there); give the "
                        "output.dir of a run.")
    path = output_dir / REPORT_NAME
    page = report_page(output_dir)
    with writing(path, "the run report"):
        atomic_write_text(path, page)
    return path


def read_json_lines(path: Path) -> list[dict]:
    """Every line of a JSON-lines file that is a JSON object (a damaged line is skipped); [] when it is missing."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_config(path: Path) -> tuple[str | None, dict]:
    """config.yaml's text and its mapping ({} when it is missing or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None, {}
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError:
        settings = None
    return text, settings if isinstance(settings, dict) else {}


def grid_files(samples_dir: Path) -> list[tuple[int, Path]]:
    """samples/step-NNNNNN.png in step order."""
    found = [(int(match.group(1)), path) for path in samples_dir.glob("step-*.png")
             if (match := GRID_NAME.fullmatch(path.name))] if samples_dir.is_dir() else []
    return sorted(found)


def inline_image(path: Path) -> tuple[str, tuple[int, int]]:
    """A data: URI of the image (a reduced JPEG when it is wide or large) and its full size; raises OSError or
    UnidentifiedImageError when it cannot be read."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        size = image.size
        if image.width <= MAX_INLINE_WIDTH and len(data) <= MAX_INLINE_BYTES:
            return data_uri(data, "image/png"), size
        width = min(image.width, MAX_INLINE_WIDTH)
        reduced = image.convert("RGB").resize((width, max(1, round(image.height * width / image.width))),
                                              Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    reduced.save(buffer, format="JPEG", quality=88)
    return data_uri(buffer.getvalue(), "image/jpeg"), size


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def table(rows: list[tuple[str, object]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# ------------------------------------------------------------------------------------------ the page's sections
def status_section(name: str, records: list[dict], settings: dict, summary: dict | None) -> str:
    max_steps = (settings.get("train") or {}).get("max_steps")
    last = records[-1]["step"] if records else 0
    if summary is not None and summary.get("steps") == last:
        minutes = (summary.get("wall_seconds") or 0) / 60
        state = f"Finished: {last} steps in {minutes:.1f} minutes."
    else:
        state = f"In progress: step {last} of {max_steps}." if max_steps else f"Step {last}."
    try:
        writer = f"waveft-train {version('waveft-train')}"
    except PackageNotFoundError:
        writer = "waveft-train"
    written = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"<h1>waveft-train run: {html.escape(name)}</h1><p>{html.escape(state)}</p>"
            f"<p class='note'>Written by {html.escape(writer)} at {written}; rewritten at each validation and at the "
            "end of the run.</p>")


def charts_section(title: str, charts: list[Chart], note: str, plotted: dict, not_drawn: list) -> str:
    """The charts' images, or the note on what is missing. `plotted[title]` gets each chart's series: read back from
    the figure when drawn, else as they would have been drawn (and the title goes to `not_drawn`)."""
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p class='note'>{note}</p>" if note else ""]
    missing = False
    for chart in charts:
        drawn = draw_chart(chart)
        if drawn is None:
            missing = True
            plotted[chart.title] = chart.as_data()
            not_drawn.append(chart.title)
            continue
        png, plotted[chart.title] = drawn
        parts.append(f"<figure><img alt='{html.escape(chart.title)}' src='{data_uri(png, 'image/png')}'></figure>")
    if missing:
        parts.append(f"<p class='note'>{NO_MATPLOTLIB}</p>")
    return "".join(parts)


def best_section(best_record: dict | None) -> str:
    if best_record is None or not isinstance(best_record.get("best"), dict):
        return ""
    best = best_record["best"]
    rule = f" Rule: {html.escape(str(best_record['rule']))}." if best_record.get("rule") else ""
    return (f"<p class='best'>Best checkpoint: <code>{html.escape(str(best.get('checkpoint')))}</code> "
            f"(step {html.escape(shown(best.get('step')))}, score {html.escape(shown(best.get('score')))}).{rule}</p>")


def evaluation_table(records: list[dict]) -> str:
    names = score_names(records)  # the base model's twins are in the charts
    rows = [(shown(record.get("step")), str(record.get("checkpoint")),
             *(shown((record.get("scores") or {}).get(name, "")) for name in names), shown(record.get("score")))
            for record in sorted(records, key=lambda record: record["step"] if is_number(record.get("step")) else math.inf)]
    return table(rows, ("step", "checkpoint", *names, "ranking score"))


def grids_section(output_dir: Path, settings: dict) -> tuple[str, list[dict]]:
    grids = grid_files(output_dir / "samples")
    prompts = (settings.get("validation") or {}).get("prompts") or []
    parts = ["<h2>Validation grids</h2>"]
    if not grids:
        parts.append("<p class='note'>No validation grid yet.</p>")
    else:
        rows = "".join(f"<li>{html.escape(str(prompt))}</li>" for prompt in prompts)
        parts.append("<p class='note'>One row per prompt: the base model's images, then the adapter's, with the same "
                     f"seeds. Click a grid for its full-size PNG.</p><ol>{rows}</ol>")
    listed = []
    for step, path in grids:
        relative = path.relative_to(output_dir).as_posix()
        try:
            uri, (width, height) = inline_image(path)
        except (OSError, UnidentifiedImageError) as error:
            problem = html.escape(f"{relative} could not be read ({error})")
            parts.append(f"<p class='note'>Step {step}: {problem}.</p>")
            continue
        listed.append({"step": step, "file": relative})
        parts.append(f"<figure><a href='{html.escape(relative)}'><img alt='validation grid, step {step}' src='{uri}'>"
                     f"</a><figcaption>Step {step} ({width}×{height}, {html.escape(relative)})</figcaption></figure>")
    return "".join(parts), listed


def summary_section(summary: dict | None) -> str:
    if summary is None:
        return "<h2>Summary</h2><p class='note'>summary.json is written when the run ends.</p>"
    rows = [(key, shown(value)) for key, value in summary.items() if key != "invocations"]
    invocations = summary.get("invocations") or []
    keys = list(dict.fromkeys(key for record in invocations if isinstance(record, dict) for key in record))
    runs = table([tuple(shown(record.get(key)) for key in keys) for record in invocations if isinstance(record, dict)],
                 tuple(keys)) if keys else ""
    return f"<h2>Summary</h2>{table(rows)}" + (f"<h3>Invocations</h3>{runs}" if runs else "")


def report_page(output_dir: Path) -> str:
    """The whole page as text."""
    records = read_json_lines(output_dir / "metrics.jsonl")
    records.sort(key=lambda record: record.get("step") if isinstance(record.get("step"), int) else -1)
    config_text, settings = read_config(output_dir / "config.yaml")
    summary = read_json(output_dir / "summary.json")
    evaluation = read_json_lines(output_dir / "evaluation.jsonl")
    best_record = read_json(output_dir / "evaluation.json")
    best = best_record.get("best") if best_record and isinstance(best_record.get("best"), dict) else None
    plotted, not_drawn = {}, []
    smoothing = (f"Smoothed: exponential moving average of the logged losses with weight {SMOOTHING}, debiased "
                 "(TensorBoard's smoothing).")
    parts = [status_section(output_dir.name, records, settings, summary), best_section(best_record)]
    charts = training_charts(records)
    parts.append(charts_section("Training", charts, smoothing, plotted, not_drawn) if charts
                 else "<h2>Training</h2><p class='note'>No metrics logged yet.</p>")
    if evaluation:
        parts.append(charts_section("Evaluation", evaluation_charts(evaluation, best), "From evaluation.jsonl; higher "
                                    "is better for the ranking score.", plotted, not_drawn)
                     + evaluation_table(evaluation))
    grids_html, grids = grids_section(output_dir, settings)
    parts += [grids_html, summary_section(summary), "<h2>Settings</h2>",
              f"<pre>{html.escape(config_text)}</pre>" if config_text else "<p class='note'>No config.yaml.</p>"]
    data = {"charts": plotted, "not_drawn": not_drawn, "smoothing": SMOOTHING, "grids": grids, "best": best}
    block = json.dumps(data).replace("<", "\\u003c")  # no "</script>" inside the block
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>waveft-train: {html.escape(output_dir.name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(part for part in parts if part)
            + f"\n<script type='application/json' id='report-data'>{block}</script>\n</body></html>\n")
