"""HTML/PNG report of a tuning run: reports/<gpu>-<model>/index.html with figures beside it.

Data first, drawing second: `history_data` and `trial_points` compute plain data (unit-tested);
`write_report` draws with matplotlib (Agg) and writes a page that opens from disk with no
network (images are relative files). `python -m autotune report --storage URL --study-name NAME`
regenerates a report from a stored study.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import pathlib
import platform
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]


class HistoryData(NamedTuple):
    numbers: list[int]
    values: list[float]  # objective value per feasible complete trial (nan otherwise)
    best_so_far: list[float]


def _feasible(trial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraint", [1.0]))


def history_data(trials) -> HistoryData:
    """Objective value per trial and the best feasible value so far (nan before the first)."""
    numbers, values, best = [], [], []
    current = math.nan
    for t in sorted(trials, key=lambda t: t.number):
        ok = t.state.name == "COMPLETE" and t.values and math.isfinite(t.values[0]) and _feasible(t)
        v = t.values[0] if ok else math.nan
        if ok and (math.isnan(current) or v < current):
            current = v
        numbers.append(t.number)
        values.append(v)
        best.append(current)
    return HistoryData(numbers, values, best)


def write_report(study, out_dir=None, *, storage_url: str | None = None, command: str = "",
                 summary_rows: list[dict] | None = None) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .export import best_trial, mask_url

    attrs = study.user_attrs
    gpu, model, mode = attrs.get("gpu", "gpu"), attrs.get("model", "model"), attrs.get("mode", "?")
    out = pathlib.Path(out_dir) if out_dir else ROOT / "reports" / f"{gpu}-{model}"
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    hist = history_data(trials)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(hist.numbers, hist.values, "o", ms=3, alpha=0.5, label="trial (feasible)")
    ax.plot(hist.numbers, hist.best_so_far, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("ms per layer (" + ("measured" if mode == "live" else "predicted") + ")")
    ax.legend()
    ax.set_title(f"{model} on {gpu}: optimization history")
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=110)
    plt.close(fig)
    best = best_trial(study)
    rows = summary_rows or []
    table = ""
    if rows:
        cols = list(rows[0])
        table = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows) + "</table>"
    banner = "" if mode == "live" else (
        "<p class='banner'>Figures on this page are <b>predicted</b> by the roofline model, not measured.</p>")
    config = html.escape(str(best.user_attrs.get("config"))) if best else "no feasible trial"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(model)} on {html.escape(gpu)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}} .banner{{background:#fe9;padding:.6em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>TurboAttention tuning: {html.escape(model)} on {html.escape(gpu)}</h1>{banner}
<h2>Winner</h2><p>{config}</p>{table}
<h2>Optimization history</h2><img src="history.png" alt="optimization history">
<h2>Provenance</h2><ul><li>mode: {html.escape(mode)}</li><li>storage: {html.escape(str(mask_url(storage_url)))}</li>
<li>study: {html.escape(study.study_name)}, {len(trials)} trials</li><li>command: {html.escape(mask_url(command) or '')}</li>
<li>host: {html.escape(platform.platform())}</li><li>written: {_dt.datetime.now().isoformat(timespec='seconds')}</li></ul>
</body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"


def _cell(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune report", description="Regenerate a run's report from its study.")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--out", help="report folder (default reports/<gpu>-<model>/)")
    args = parser.parse_args(argv)
    import optuna

    from .study import StorageError, open_storage

    try:
        study = optuna.load_study(study_name=args.study_name, storage=open_storage(args.storage))
    except StorageError as exc:
        print(f"error: {exc}")
        return 2
    except KeyError:
        print(f"error: --study-name {args.study_name!r} not found in that storage")
        return 2
    print(write_report(study, args.out, storage_url=args.storage, command="python -m autotune report"))
    return 0
