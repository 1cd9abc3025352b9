"""scripts/plot_metrics.py: pretraining and SPIN metrics files become a PNG with one panel
per metric present; malformed input is an error naming FILE:LINE."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "plot_metrics.py"
_spec = importlib.util.spec_from_file_location("plot_metrics", SCRIPT)
pm = importlib.util.module_from_spec(_spec)
sys.modules["plot_metrics"] = pm   # dataclasses look their module up there
_spec.loader.exec_module(pm)


def write_jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain_records(n=60):
    out = []
    for step in range(1, n + 1):
        out.append({"step": step, "loss": 10.0 / step ** 0.3, "lr": 4e-4 * min(1, step / 10),
                    "tokens_per_sec": 1000.0 + step % 7, "mfu": None})
        if step % 20 == 0:
            out.append({"step": step, "val_loss": 9.0 / step ** 0.3, "val_ppl": 100.0})
    return out


def spin_records():
    return [{"step": s, "iteration": it, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.1 * s,
             "rewards/accuracies": min(1.0, 0.5 + 0.05 * s), "rewards/real": 0.05 * s,
             "rewards/generated": -0.05 * s} for it in range(2) for s in range(1, 11)]


def drawn_figure(monkeypatch) -> dict:
    """Spies on Figure.savefig (which still writes the PNG): returns a dict that then holds, per
    visible panel title, the (x, y) data of every curve drawn in it (in data coordinates, so
    not the zero line of the margin panel), as matplotlib has it."""
    from matplotlib.figure import Figure

    drawn, save = {}, Figure.savefig

    def spy(fig, *args, **kwargs):
        for ax in fig.axes:
            if ax.get_visible():
                curves = [line for line in ax.get_lines() if line.get_transform() != ax.get_yaxis_transform()]
                drawn[ax.get_title()] = [(list(line.get_xdata()), list(line.get_ydata())) for line in curves]
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return drawn


def test_pretrain_and_spin_metrics_make_a_png(tmp_path, monkeypatch):
    import matplotlib.image as mpimg

    drawn = drawn_figure(monkeypatch)
    pre = write_jsonl(tmp_path / "pretrain.jsonl", pretrain_records(), extra_lines=["", "   "])
    spin = write_jsonl(tmp_path / "spin.jsonl", spin_records())
    out = pm.plot_metrics([pre, spin], tmp_path / "plots" / "m.png", title="quickstart")
    assert out == tmp_path / "plots" / "m.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    image = mpimg.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05          # not a blank canvas
    # Written out here, not taken from the script's table: the six groups with numbers each get
    # a visible panel with lines in it; MFU (all null) gets none.
    assert set(drawn) == {"loss", "tokens / s", "learning rate", "reward margin (real - generated)",
                          "reward accuracy", "rewards"}
    assert all(drawn.values()), {title: len(lines) for title, lines in drawn.items()}
    steps = [float(s) for s in range(1, 61)]
    # 60 noisy points: drawn faint, with the moving average over them (two lines of 60 points)
    assert (steps, [4e-4 * min(1, s / 10) for s in range(1, 61)]) in drawn["learning rate"]
    assert [len(x) for x, _ in drawn["tokens / s"]] == [60, 60]
    # loss: pretraining (raw + trend), its validation (3 markers), SPIN iterations 0 and 1 (10 each)
    assert sorted(len(x) for x, _ in drawn["loss"]) == [3, 10, 10, 60, 60]
    assert ([20.0, 40.0, 60.0], [9.0 / s ** 0.3 for s in (20, 40, 60)]) in drawn["loss"]
    spin_steps = [float(s) for s in range(1, 11)]
    accuracy = [min(1.0, 0.5 + 0.05 * s) for s in range(1, 11)]
    assert drawn["reward accuracy"] == [(spin_steps, accuracy)] * 2      # one curve per iteration
    assert sorted(ys for _, ys in drawn["rewards"]) == sorted(
        [[0.05 * s for s in range(1, 11)]] * 2 + [[-0.05 * s for s in range(1, 11)]] * 2)
    assert (spin_steps, [0.1 * s for s in range(1, 11)]) in drawn["reward margin (real - generated)"]


def test_validation_and_iterations_are_read(tmp_path):
    spin = write_jsonl(tmp_path / "spin.jsonl", spin_records())
    records = pm.read_metrics(spin, "spin")
    assert {r.iteration for r in records} == {0, 1}
    pre = write_jsonl(tmp_path / "pre.jsonl", pretrain_records(40))
    val = [r for r in pm.read_metrics(pre, "pre") if "val_loss" in r.values]
    assert [r.step for r in val] == [20.0, 40.0]
    assert all("mfu" not in r.values for r in pm.read_metrics(pre, "pre"))   # nulls skipped


def test_cli_prints_png_path(tmp_path):
    pre = write_jsonl(tmp_path / "metrics.jsonl", pretrain_records(30))
    result = subprocess.run([sys.executable, str(SCRIPT), str(pre), "--out", str(tmp_path / "o.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "o.png")
    assert (tmp_path / "o.png").stat().st_size > 10_000


@pytest.mark.parametrize("bad_line, message", [
    ('{"step": 3, "loss": ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"step": 3, "loss": "high"}', "'loss' must be a number"),
    ('{"loss": 2.0}', "no numeric 'step'"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "metrics.jsonl", pretrain_records(2), extra_lines=["", bad_line])
    # pretrain_records(2) is 2 lines, then a blank line 3, so the bad one is line 4.
    with pytest.raises(pm.MetricsError, match=message) as info:
        pm.plot_metrics([path], tmp_path / "x.png")
    assert f"{path}:4:" in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_no_plottable_metric_is_a_clear_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "note": "start"}, {"config": {"n": 1}}])
    assert pm.main([str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no plottable metric" in err and str(path) in err
    assert not (tmp_path / "x.png").exists()
