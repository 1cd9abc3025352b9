"""Plot training curves from the metrics.jsonl files written by pretrain/ and finetune/.

    python scripts/plot_metrics.py METRICS.jsonl [MORE.jsonl ...] --out PNG [--title T]

Each input has one JSON object per line, e.g.
    {"step": 10, "loss": 3.2, "lr": 0.0004, "tokens_per_sec": 1234.5, "mfu": null}
    {"step": 100, "val_loss": 3.1, "val_ppl": 22.2}
    {"step": 5, "iteration": 1, "loss": 0.6, "rewards/margins": 0.4, "rewards/accuracies": 0.8}

One panel is drawn per metric group that has data: loss (train, plus validation as
markers), tokens/s, learning rate, MFU, and for SPIN runs the reward margin, the reward
accuracy and the real-vs-generated rewards. Lines with an "iteration" key (SPIN
iterations) are drawn as one curve per iteration against their own step, so
iterations can be compared; several files are told apart by their names. Blank lines
are skipped; a line that is not a JSON object, or holds a non-numeric metric, stops the
run with FILE:LINE in the message. Values that are null/NaN are left out of the curve.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# Panel title -> [(series label, key(s) that may hold it: the first present wins)].
PANELS: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = [
    ("loss", [("train", ("loss", "train_loss")), ("validation", ("val_loss",))]),
    ("tokens / s", [("tokens/s", ("tokens_per_sec", "tokens/s"))]),
    ("learning rate", [("lr", ("lr",))]),
    ("MFU", [("mfu", ("mfu",))]),
    ("reward margin (real - generated)", [("margin", ("rewards/margins",))]),
    ("reward accuracy", [("accuracy", ("rewards/accuracies",))]),
    ("rewards", [("real", ("rewards/real", "rewards/chosen")),
                 ("generated", ("rewards/generated", "rewards/rejected"))]),
]
METRIC_KEYS = sorted({k for _, series in PANELS for _, keys in series for k in keys})
SMOOTH_MIN_POINTS = 30   # noisy per-step curves get a moving average drawn over them
SMOOTHED = {"loss", "tokens / s", "MFU", "reward margin (real - generated)", "reward accuracy",
            "rewards"}


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file (and line)."""


@dataclass
class Record:
    source: str          # label of the file it came from
    line: int
    step: float
    iteration: object    # None for pretraining / SFT lines
    values: dict[str, float]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path, label: str) -> list[Record]:
    """The plottable records of one metrics.jsonl file."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{path}: cannot read metrics file ({exc})") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be "
                               f"one JSON object") from exc
        if not isinstance(obj, dict):
            raise MetricsError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        values = {}
        for key in METRIC_KEYS:
            value = obj.get(key)
            if value is None:
                continue
            if not _number(value):
                raise MetricsError(f"{path}:{lineno}: field {key!r} must be a number or null, "
                                   f"got {value!r}")
            if math.isfinite(value):
                values[key] = float(value)
        if not values:
            continue     # e.g. a config or "done" line: nothing to draw
        step = obj.get("step")
        if not _number(step):
            raise MetricsError(f"{path}:{lineno}: metric line has no numeric 'step' field "
                               f"(got {step!r})")
        records.append(Record(label, lineno, float(step), obj.get("iteration"), values))
    return records


def _labels(paths: list[Path]) -> list[str]:
    """Short names telling the files apart: the file name, or parent/file name if needed."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return [p.stem for p in paths] if len(paths) > 1 else [""]
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~5% of the points (window shrinks at the ends, so the
    trend neither lags behind nor starts from a made-up value, unlike an EMA)."""
    half = max(1, len(values) // 40)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot_metrics(paths, out, title: str | None = None) -> Path:
    """Draw every plottable metric of `paths` into the PNG `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")     # files only, never a window
    import matplotlib.pyplot as plt

    paths = [Path(p) for p in paths]
    if not paths:
        raise MetricsError("no metrics files given")
    records = []
    for path, label in zip(paths, _labels(paths)):
        records += read_metrics(path, label)

    # Curves: (panel, series label, source, iteration) -> sorted (step, value) points.
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in records:
        for panel, series in PANELS:
            for name, keys in series:
                key = next((k for k in keys if k in r.values), None)
                if key is not None:
                    curves.setdefault((panel, name, r.source, r.iteration), []).append(
                        (r.step, r.values[key]))
    panels = [p for p, _ in PANELS if any(c[0] == p for c in curves)]
    if not panels:
        raise MetricsError(f"no plottable metric in {', '.join(map(str, paths))}: expected lines "
                           f"with 'step' and one of {', '.join(METRIC_KEYS)}")

    # One colour per run (file, SPIN iteration), the same in every panel; the series of a
    # panel (train/validation, real/generated) differ by line style.
    runs = sorted({(k[2], k[3]) for k in curves}, key=lambda r: (r[0], str(r[1]).zfill(8)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {run: colors[i % len(colors)] for i, run in enumerate(runs)}
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, [p for p in PANELS if p[0] in panels]):
        names = [name for name, _ in series]
        present = {k[1] for k in curves if k[0] == panel}
        for run in runs:
            for style_index, name in enumerate(names):
                points = sorted(curves.get((panel, name, *run), []))
                if not points:
                    continue
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                source, iteration = run
                parts = [source, f"iter {iteration}" if iteration is not None else "",
                         name if len(present) > 1 else ""]
                label = " ".join(p for p in parts if p) or name
                style = dict(color=color_of[run], linestyle="-" if style_index == 0 else "--")
                if name == "validation":
                    ax.plot(xs, ys, marker="o", markersize=4, label=label, **style)
                elif panel in SMOOTHED and len(points) >= SMOOTH_MIN_POINTS:
                    # Per-step values are noisy: draw them faint and the trend on top.
                    ax.plot(xs, ys, alpha=0.25, linewidth=0.8, **style)
                    ax.plot(xs, _smooth(ys), linewidth=1.6, label=label, **style)
                else:
                    ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label, **style)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel == "reward margin (real - generated)":
            ax.axhline(0.0, color="gray", linewidth=0.8)
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(ax.get_legend_handles_labels()[0]) > 1 or len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Save under a temporary name and rename, so a crash never leaves half a PNG.
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl file(s)")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        out = plot_metrics(args.metrics, args.out, args.title)
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
