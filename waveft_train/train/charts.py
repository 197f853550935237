"""The report's charts: series read from a run's records, the loss smoothing, and matplotlib's drawing of them.

matplotlib is an optional extra (`pip install 'waveft-train[report]'`); without it `draw_chart` returns None and the
report says what is missing. Each chart is its own matplotlib `Figure` saved as PNG by the Agg canvas: no pyplot, no
display, no global state. What a drawn chart returns beside its PNG is read back from the figure's lines, so the
report's data block holds exactly the values that were plotted.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

SMOOTHING = 0.9  # weight of the loss's moving average (TensorBoard's smoothing slider, debiased as TensorBoard does)


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: point i is Σ_{j≤i} weight^(i-j)·x_j / Σ_{j≤i} weight^(i-j).

    The same as TensorBoard's smoothing and pandas' `ewm(alpha=1-weight, adjust=True).mean()`; the first point is the
    first value, so the curve does not start at zero."""
    averaged, numerator, denominator = [], 0.0, 0.0
    for value in values:
        numerator = weight * numerator + value
        denominator = weight * denominator + 1.0
        averaged.append(numerator / denominator)
    return averaged


@dataclass
class Series:
    label: str
    steps: list[int]
    values: list[float]
    style: str = "line"  # "line", "faint" (the raw values under their smoothed curve) or "marker"

    def as_data(self) -> dict:
        return {"steps": list(self.steps), "values": list(self.values)}


@dataclass
class Chart:
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)

    def as_data(self) -> dict:
        return {series.label: series.as_data() for series in self.series}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(records: Sequence[dict], key: str, label: str | None = None, style: str = "line") -> Series:
    """Step and value of every record whose `key` is a finite number (metrics.jsonl writes non-finite values as null)."""
    points = [(record["step"], float(record[key])) for record in records
              if is_number(record.get("step")) and is_number(record.get(key))]
    return Series(label or key, [int(step) for step, _ in points], [value for _, value in points], style)


def training_charts(records: Sequence[dict]) -> list[Chart]:
    """Loss (raw and smoothed), learning rate and seconds per step against steps, from metrics.jsonl's records."""
    loss = metric_series(records, "loss", style="faint")
    charts = [
        Chart("Loss", "loss", [loss, Series("loss (smoothed)", loss.steps, smoothed(loss.values))]),
        Chart("Learning rate", "learning rate", [metric_series(records, "lr", "learning rate")]),
        Chart("Seconds per step", "seconds", [metric_series(records, "seconds", "seconds per step")]),
    ]
    return [chart for chart in charts if chart.series[0].steps]


BASE = "base_"  # the prefix of the base model's twin of a score


def score_names(records: Sequence[dict]) -> list[str]:
    """The score names of evaluation.jsonl records, in first-seen order, without the base model's twins."""
    names = dict.fromkeys(name for record in records for name in (record.get("scores") or {}))
    return [name for name in names if not (name.startswith(BASE) and name[len(BASE):] in names)]


def evaluation_charts(records: Sequence[dict], best: dict | None) -> list[Chart]:
    """One chart per score name of evaluation.jsonl (the ranking score first) against steps; the best checkpoint
    (evaluation.json) marked on each. A `base_<name>` score (the base model's, the same at every step) is drawn in
    `<name>`'s chart, not in one of its own."""
    names = ["score", *score_names(records)]
    flat = [{"step": record.get("step"), "checkpoint": record.get("checkpoint"), "score": record.get("score"),
             **{name: value for name, value in (record.get("scores") or {}).items() if name != "score"}}
            for record in records]
    flat.sort(key=lambda record: record["step"] if is_number(record["step"]) else math.inf)
    charts = []
    for name in names:
        series = [metric_series(flat, name, "ranking score" if name == "score" else name)]
        if any(is_number(record.get(BASE + name)) for record in flat):
            series.append(metric_series(flat, BASE + name, "base model"))
        if best is not None:
            chosen = [record for record in flat if record["checkpoint"] == best.get("checkpoint")]
            series.append(metric_series(chosen, name, "best checkpoint", style="marker"))
        if series[0].steps:
            charts.append(Chart("Ranking score" if name == "score" else f"Score: {name}", name, series))
    return charts


def draw_chart(chart: Chart) -> tuple[bytes, dict] | None:
    """The chart as PNG bytes and the plotted series read back from the figure; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(7.5, 2.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    styles = {"line": {"linewidth": 1.8}, "faint": {"linewidth": 0.8, "alpha": 0.35},
              "marker": {"linestyle": "none", "marker": "*", "markersize": 14, "color": "tab:red"}}
    for series in chart.series:
        axes.plot(series.steps, series.values, label=series.label, **styles[series.style])
    axes.set_title(chart.title, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(chart.ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)  # steps
    axes.grid(alpha=0.3)
    if len(chart.series) > 1:
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plotted = {line.get_label(): {"steps": [int(x) if float(x).is_integer() else float(x) for x in line.get_xdata()],
                                  "values": [float(y) for y in line.get_ydata()]}
               for line in axes.get_lines()}
    return buffer.getvalue(), plotted
