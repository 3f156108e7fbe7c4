"""HTML/PNG report of a tuning run: reports/<gpu>-<model>/index.html with its figures beside it.

Data first, drawing second (STYLE.md "Plots"): each figure's data is a plain NamedTuple computed by
a `*_data` function (unit-tested on synthetic studies), and a thin `_draw_*` function turns it into
a PNG with matplotlib's Agg canvas (no global backend change). The page:

  summary     the winner's config, its time against the default config and SDPA at every
              workload point, accuracy (cosine, SQNR), KV compression, NVML telemetry
  roofline    the GPU's roofs (memory, INT8 and FP16 tensor cores, SFU) with every trial placed at
              the workload's largest prefill point, the winner and the SDPA baseline marked
  history     latency per trial and the best feasible so far
  importance  optuna.importance.get_param_importances on the latency
  pareto      latency against error, colour = KV bytes (3-objective studies only)
  prediction  roofline prediction against measured time (live runs only), with MAPE
  provenance  GPU, driver, toolchain, storage (password masked), trials, mode, command

It opens from disk with no network: images are relative files, the CSS and the one script (which
marks broken images, see IMAGE_CHECK_SCRIPT) are inline. A banner says so when times are predicted.

`python -m autotune report --storage URL --study-name NAME [--out DIR]` regenerates a report from a
stored study. Numbers that only the tuning process knew (the measured default and SDPA times, the
NVML identity, the toolchain) are saved on the study by the report written at the end of the run
(study user attr REPORT_ATTR) and reused; without them they are recomputed where the roofline model
can (predict mode) and shown as missing otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import pathlib
import platform
import sys
import warnings
from typing import Any, Iterable, NamedTuple, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT_ATTR = "report_run"  # study user attr: what write_report saw at the end of the tuning run
MIN_TRIALS_FOR_IMPORTANCE = 5  # PED-ANOVA splits the trials into a top quantile and the rest
FIGURE_DPI = 110


# ============================================================================ data

def _feasible(trial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraint", [1.0]))


def _complete(trial) -> bool:
    values = trial.values or []
    return (trial.state.name == "COMPLETE" and bool(values)
            and all(v is not None and math.isfinite(v) for v in values))


def trial_status(trial) -> str:
    """"feasible" | "infeasible" (over an error budget) | "failed" | "pruned" | "running"."""
    state = trial.state.name
    if state == "PRUNED":
        return "pruned"
    if state == "FAIL" or (state == "COMPLETE" and not _complete(trial)):
        return "failed"
    if state != "COMPLETE":
        return "running"
    return "feasible" if _feasible(trial) else "infeasible"


def point_key(point) -> str:
    """The per_point_ms key of a workload point (as autotune.objective writes it)."""
    return f"{point.kernel}_{point.seq_len}x{point.batch}"


def workload_from_study(study):
    """The autotune.objective.Workload a study was tuned for (study user attrs), or None."""
    from .objective import Point, Workload

    attrs = study.user_attrs
    points = attrs.get("workload")
    if not points:
        return None
    geometry = attrs.get("geometry")
    if not geometry:
        from roofline import resolve_model

        spec = resolve_model(attrs.get("model", ""))
        geometry = {"num_q_heads": spec.num_q_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    return Workload(attrs.get("model", "?"), int(geometry["num_q_heads"]), int(geometry["num_kv_heads"]),
                    int(geometry["head_dim"]),
                    tuple(Point(str(k), int(n), int(b), float(w)) for k, n, b, w in points))


def _calibration(gpu: str):
    """The roofline calibration the tuner's PredictTimer uses (datasheet ceilings when none is saved)."""
    from roofline import CalibrationWarning, load_calibration

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return load_calibration(gpu)


class HistoryData(NamedTuple):
    numbers: list[int]
    values: list[float]  # latency (first objective) per feasible complete trial, nan otherwise
    best_so_far: list[float]  # best feasible latency up to each trial, nan before the first
    status: list[str]  # trial_status per trial
    infeasible_values: list[float]  # latency of trials over an error budget, nan otherwise


def history_data(trials) -> HistoryData:
    """Latency per trial (by number) and the best feasible latency so far."""
    numbers, values, best, status, infeasible = [], [], [], [], []
    current = math.nan
    for t in sorted(trials, key=lambda t: t.number):
        s = trial_status(t)
        v = t.values[0] if s == "feasible" else math.nan
        if s == "feasible" and (math.isnan(current) or v < current):
            current = v
        numbers.append(t.number)
        values.append(v)
        best.append(current)
        status.append(s)
        infeasible.append(t.values[0] if s == "infeasible" else math.nan)
    return HistoryData(numbers, values, best, status, infeasible)


class RooflinePoint(NamedTuple):
    label: str
    trial: int | None  # None for the baseline
    intensity: float  # nominal ops per DRAM byte
    achieved_tops: float  # nominal ops / time, 10^12/s
    ms: float  # the time behind achieved_tops
    time_source: str  # "measured" | "predicted"
    feasible: bool


class RooflineData(NamedTuple):
    chart: Any  # roofline.RooflineChartData: the roofs (every point below included in its x range)
    point: str  # the workload point every trial is placed at, e.g. "prefill_16384x1"
    trials: tuple  # RooflinePoint per trial with a time
    winner: RooflinePoint | None
    baseline: RooflinePoint | None  # SDPA fp16 at the same point
    skipped: int  # trials with a time whose config the roofline model rejects


def roofline_point(workload):
    """The largest prefill point (the one nearest the compute roofs), else the largest decode point."""
    prefill = [p for p in workload.points if p.kernel == "prefill"]
    pool = prefill or list(workload.points)
    return max(pool, key=lambda p: (p.seq_len, p.batch)) if pool else None


def roofline_data(trials, workload, gpu: str, calibration=None, winner: int | None = None,
                  baseline_ms: float | None = None) -> RooflineData | None:
    """Every trial with a time at roofline_point(workload): intensity = nominal ops / DRAM bytes of
    the timed kernels (prefill: the quantization pass and the attention kernel, as the objective
    times them), achieved = nominal ops / the trial's time at that point (measured in live runs,
    the roofline prediction otherwise). The SDPA baseline ("sdpa_prefill_fp16", or
    "sdpa_decode_fp16" for a decode-only workload) is placed at `baseline_ms` when that is finite
    (a measurement), else at its prediction. None when the workload has no points."""
    from kernels.config import KernelConfig
    from roofline import AttentionShape, InfeasibleConfigError, predict, roofline_chart_data

    point = roofline_point(workload) if workload is not None else None
    if point is None:
        return None
    key = point_key(point)
    shape = AttentionShape(point.batch, workload.num_q_heads, workload.num_kv_heads, point.seq_len,
                           workload.head_dim, causal=workload.causal)
    kernels = ("prefill", "quantize") if point.kernel == "prefill" else ("decode",)
    pts, skipped = [], 0
    for t in sorted(trials, key=lambda t: t.number):
        ms = (t.user_attrs.get("per_point_ms") or {}).get(key)
        if "config" not in t.user_attrs or ms is None or not math.isfinite(ms) or ms <= 0:
            continue
        try:
            config = KernelConfig.from_dict(t.user_attrs["config"])
            preds = [predict(k, shape, config, gpu, calibration) for k in kernels]
        except (InfeasibleConfigError, ValueError, TypeError):
            skipped += 1
            continue
        source = "measured" if t.user_attrs.get("source") == "measured" else "predicted"
        flops = preds[0].flops
        pts.append(RooflinePoint(f"trial {t.number}", t.number, flops / sum(p.bytes for p in preds),
                                 flops / (ms * 1e-3) / 1e12, float(ms), source, _feasible(t)))
    sdpa = predict("sdpa_prefill_fp16" if point.kernel == "prefill" else "sdpa_decode_fp16", shape, None, gpu,
                   calibration)
    measured = baseline_ms is not None and math.isfinite(baseline_ms) and baseline_ms > 0
    base_ms = float(baseline_ms) if measured else sdpa.time_ms
    baseline = RooflinePoint("SDPA fp16", None, sdpa.intensity, sdpa.flops / (base_ms * 1e-3) / 1e12, base_ms,
                             "measured" if measured else "predicted", True)
    chart = roofline_chart_data(gpu, [(p.label, p.intensity, p.achieved_tops) for p in (*pts, baseline)],
                                calibration, head_dim=workload.head_dim)
    win = next((p for p in pts if p.trial == winner), None) if winner is not None else None
    return RooflineData(chart, key, tuple(pts), win, baseline, skipped)


class ImportanceData(NamedTuple):
    names: tuple  # most important first
    values: tuple  # normalised to sum 1
    note: str  # why there are none, or what was evaluated


def importance_data(study, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE) -> ImportanceData:
    """optuna.importance.get_param_importances of the latency (first objective) over completed
    trials; empty with a note when there are too few trials or Optuna cannot evaluate them."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if _complete(t) and t.params]
    if len(complete) < min_trials:
        return ImportanceData((), (), f"too few completed trials for parameter importances "
                                      f"({len(complete)}, need {min_trials})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study, target=lambda t: t.values[0])
    except Exception as exc:  # e.g. every trial has the same parameters
        return ImportanceData((), (), f"parameter importances not available: {type(exc).__name__}: {exc}")
    if not imp:
        return ImportanceData((), (), "no parameter varied across completed trials")
    return ImportanceData(tuple(imp), tuple(float(v) for v in imp.values()),
                          f"PED-ANOVA importance of latency over {len(complete)} completed trials")


class ParetoData(NamedTuple):
    numbers: tuple
    latency_ms: tuple
    error: tuple  # max(prefill error, KV error), 1 - cosine
    kv_bytes: tuple  # KV cache bytes relative to fp16 (1 / compression)
    front: tuple  # bool per trial: not dominated in all three objectives
    infeasible: int  # completed trials over an error budget (not shown)


def pareto_front(values: Sequence[Sequence[float]]) -> list[bool]:
    """True where no other vector is <= in every objective and < in one (all minimised)."""
    out = []
    for i, a in enumerate(values):
        dominated = any(all(b_k <= a_k for a_k, b_k in zip(a, b)) and any(b_k < a_k for a_k, b_k in zip(a, b))
                        for j, b in enumerate(values) if j != i)
        out.append(not dominated)
    return out


def pareto_data(study) -> ParetoData | None:
    """Feasible completed trials of a 3-objective (latency, error, KV bytes) study; None otherwise."""
    if len(study.directions) != 3:
        return None
    trials = [t for t in study.get_trials(deepcopy=False) if _complete(t) and len(t.values) == 3]
    ok = sorted((t for t in trials if _feasible(t)), key=lambda t: t.number)
    values = [tuple(t.values) for t in ok]
    return ParetoData(tuple(t.number for t in ok), tuple(v[0] for v in values), tuple(v[1] for v in values),
                      tuple(v[2] for v in values), tuple(pareto_front(values)), len(trials) - len(ok))


class PredictionRow(NamedTuple):
    trial: int
    point: str
    predicted_ms: float
    measured_ms: float


class PredictionData(NamedTuple):
    rows: tuple  # PredictionRow
    mape_pct: float  # mean |predicted - measured| / measured, in %, over every row
    mape_by_point: dict  # point -> MAPE in %
    skipped: int  # measured (trial, point) pairs the roofline model rejects


def prediction_data(trials, workload, gpu: str, calibration=None) -> PredictionData | None:
    """Roofline prediction (the tuner's PredictTimer) against the measured per-point time of each
    live trial (user attr source "measured"); None when no trial was measured."""
    from kernels.config import KernelConfig
    from roofline import InfeasibleConfigError

    from .objective import PredictTimer

    measured = [t for t in trials if t.user_attrs.get("source") == "measured" and t.user_attrs.get("per_point_ms")
                and "config" in t.user_attrs]
    if not measured or workload is None:
        return None
    timer = PredictTimer(gpu, calibration if calibration is not None else _calibration(gpu))
    rows, skipped = [], 0
    for t in sorted(measured, key=lambda t: t.number):
        config = KernelConfig.from_dict(t.user_attrs["config"])
        for p in workload.points:
            ms = t.user_attrs["per_point_ms"].get(point_key(p))
            if ms is None or not math.isfinite(ms) or ms <= 0:
                continue
            try:
                rows.append(PredictionRow(t.number, point_key(p), timer.point_ms(config, workload, p), float(ms)))
            except (InfeasibleConfigError, ValueError):
                skipped += 1
    by_point: dict[str, list[float]] = {}
    for r in rows:
        by_point.setdefault(r.point, []).append(abs(r.predicted_ms - r.measured_ms) / r.measured_ms)
    all_errors = [e for errs in by_point.values() for e in errs]
    return PredictionData(tuple(rows), 100.0 * sum(all_errors) / len(all_errors) if all_errors else math.nan,
                          {k: 100.0 * sum(v) / len(v) for k, v in by_point.items()}, skipped)


class SummaryRow(NamedTuple):
    point: str
    weight: float
    winner_ms: float
    default_ms: float
    sdpa_ms: float
    speedup_vs_default: float
    speedup_vs_sdpa: float


class SummaryData(NamedTuple):
    winner: int | None  # trial number
    config: dict  # the winner's KernelConfig fields
    changed: dict  # fields that differ from the default KernelConfig
    rows: tuple  # SummaryRow per workload point, then the weighted total ("total")
    time_source: str  # "measured" | "predicted"
    origin: str  # where default_ms / sdpa_ms come from
    accuracy: dict  # cosine, sqnr_db, kv_cosine, budgets, kv_compression (nan where unknown)


def _ratio(a: float, b: float) -> float:
    return a / b if (math.isfinite(a) and math.isfinite(b) and b > 0) else math.nan


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _summary_row(point: str, weight, winner_ms, default_ms, sdpa_ms) -> SummaryRow:
    w, d, s = _num(winner_ms), _num(default_ms), _num(sdpa_ms)
    return SummaryRow(point, _num(weight), w, d, s, _ratio(d, w), _ratio(s, w))


def summary_data(study, workload, gpu: str, summary_rows: list[dict] | None = None, calibration=None,
                 best=None) -> SummaryData:
    """The winner against the default config and SDPA per workload point, and its accuracy.

    Rows come from `summary_rows` (cli.finish: winner_ms, default_ms, sdpa_ms per point) when given,
    else from the rows a previous report saved on the study for the same winner, else recomputed:
    winner times from the winner's per_point_ms; the default config from a trial that ran it
    (the warm start enqueues it) or, in predict mode, from the roofline model; SDPA from the
    roofline model in predict mode only (a live SDPA time needs the GPU).
    """
    from kernels.config import KernelConfig

    from .export import best_trial

    best = best if best is not None else best_trial(study)
    mode = study.user_attrs.get("mode", "predict")
    time_source = "measured" if mode == "live" else "predicted"
    default_dict = KernelConfig().to_dict()
    accuracy = {k: math.nan for k in ("cosine", "sqnr_db", "kv_cosine", "prefill_budget", "kv_budget",
                                      "kv_compression")}
    if best is None:
        return SummaryData(None, {}, {}, (), time_source, "no feasible trial", accuracy)
    attrs = best.user_attrs
    config = dict(attrs.get("config", {}))
    changed = {k: v for k, v in config.items() if default_dict.get(k) != v}
    prefill_error, kv_error = _num(attrs.get("prefill_error")), _num(attrs.get("kv_error"))
    constraint = list(attrs.get("constraint", [])) + [math.nan, math.nan]
    accuracy = {"cosine": 1.0 - prefill_error, "sqnr_db": _num(attrs.get("prefill_sqnr_db")),
                "kv_cosine": 1.0 - kv_error,
                # constraint = error - budget (objective.Objective.constraints)
                "prefill_budget": prefill_error - _num(constraint[0]), "kv_budget": kv_error - _num(constraint[1]),
                "kv_compression": _num(attrs.get("kv_compression"))}

    saved = study.user_attrs.get(REPORT_ATTR) or {}
    if summary_rows:
        origin = "this run (cli)"
        source_rows = summary_rows
    elif saved.get("summary_rows") and saved.get("winner") == best.number:
        origin = "saved by the tuning run"
        source_rows = saved["summary_rows"]
    else:
        source_rows, origin = _recompute_rows(study, workload, gpu, best, calibration, mode)
    rows = [_summary_row(r.get("point", "?"), r.get("weight"), r.get("winner_ms"), r.get("default_ms"),
                         r.get("sdpa_ms")) for r in source_rows]
    if rows:
        def total(field: str) -> float:
            return sum(r.weight * getattr(r, field) for r in rows)

        rows.append(_summary_row("total", math.nan, total("winner_ms"), total("default_ms"), total("sdpa_ms")))
    return SummaryData(best.number, config, changed, tuple(rows), time_source, origin, accuracy)


def _recompute_rows(study, workload, gpu, best, calibration, mode) -> tuple[list[dict], str]:
    from kernels.config import KernelConfig

    from .objective import PredictTimer

    if workload is None:
        return [], "no workload saved on the study"
    winner = best.user_attrs.get("per_point_ms", {})
    default_dict = KernelConfig().to_dict()
    ran_default = [t for t in study.get_trials(deepcopy=False)
                   if _complete(t) and t.user_attrs.get("config") == default_dict and t.user_attrs.get("per_point_ms")]
    default_times = ran_default[0].user_attrs["per_point_ms"] if ran_default else {}
    timer = None
    if mode != "live":
        try:
            timer = PredictTimer(gpu, calibration if calibration is not None else _calibration(gpu))
        except ValueError:  # a GPU the roofline model does not know
            timer = None
    rows = []
    for p in workload.points:
        key = point_key(p)
        default_ms = default_times.get(key, math.nan)
        sdpa_ms = math.nan
        if timer is not None:
            try:
                if not ran_default:
                    default_ms = timer.point_ms(KernelConfig(), workload, p)
                sdpa_ms = timer.baseline_ms(workload, p)
            except Exception:  # an infeasible default on this GPU: leave it blank
                pass
        rows.append({"point": key, "weight": p.weight, "winner_ms": winner.get(key, math.nan),
                     "default_ms": default_ms, "sdpa_ms": sdpa_ms})
    default_from = f"trial {ran_default[0].number}" if ran_default else ("roofline model" if timer else "not run")
    parts = [f"default config: {default_from}",
             f"SDPA: {'roofline model' if timer else 'not measured (regenerated without the GPU run)'}"]
    return rows, "recomputed from the study (" + "; ".join(parts) + ")"


class TelemetryData(NamedTuple):
    summary: dict  # autotune.telemetry.summarize over every before/after sample
    samples: int
    trials_sampled: int
    trials_throttled: int


def telemetry_data(trials) -> TelemetryData | None:
    """NVML samples of live trials (user attr telemetry {before, after}); None when there are none."""
    from .telemetry import summarize

    samples, sampled, throttled = [], 0, 0
    for t in trials:
        tel = t.user_attrs.get("telemetry") or {}
        got = [s for s in (tel.get("before"), tel.get("after")) if s]
        if got:
            sampled += 1
            samples += got
            throttled += bool(t.user_attrs.get("throttled") or any(s.get("throttled") for s in got))
    if not samples:
        return None
    return TelemetryData(summarize(samples), len(samples), sampled, throttled)


class Provenance(NamedTuple):
    items: tuple  # (label, text) pairs, in page order
    predicted: bool  # times come from the roofline model (show the banner)


def toolchain_versions() -> dict:
    """Versions of what ran the tuner (and draws this report)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "optuna", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "not installed"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda or "none")
    except Exception:
        pass
    return out


def provenance_data(study, storage_url: str | None, command: str, run: dict | None = None) -> Provenance:
    """What produced the numbers. `run`: what the tuning run saved (REPORT_ATTR: toolchain, NVML
    identity, command); the report's own toolchain is used where it is missing."""
    from roofline import GPUS

    from .bench import _git_sha
    from .export import mask_url

    attrs = study.user_attrs
    run = run or {}
    gpu = attrs.get("gpu", "?")
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        s = trial_status(t)
        states[s] = states.get(s, 0) + 1
    sources = {t.user_attrs.get("source") for t in trials if t.user_attrs.get("source")}
    mode = attrs.get("mode", "?")
    predicted = mode != "live" or bool(sources - {"measured"})
    identity = run.get("nvml") or {}
    spec = GPUS.get(gpu)
    gpu_text = f"{gpu} ({spec.name})" if spec is not None else gpu
    if identity.get("name"):
        gpu_text += f"; NVML: {identity['name']}"
    tool = run.get("toolchain") or toolchain_versions()
    geometry = attrs.get("geometry") or {}
    workload = attrs.get("workload") or []
    items = [
        ("GPU", gpu_text),
        ("driver", identity.get("driver") or ("not recorded (no NVML)" if mode == "live" else "none (predict mode)")),
        ("model", f"{attrs.get('model', '?')}" + (f" (Hq={geometry.get('num_q_heads')}, "
                                                  f"Hkv={geometry.get('num_kv_heads')}, D={geometry.get('head_dim')})"
                                                  if geometry else "")),
        ("workload", ", ".join(f"{k} {n}x{b} w={w:.2f}" for k, n, b, w in workload) or "not recorded"),
        ("mode", f"{mode}: " + ("times measured on the GPU (CUDA events)" if not predicted
                                else "times predicted by the roofline model")),
        ("toolchain", ", ".join(f"{k} {v}" for k, v in tool.items())),
        ("storage", str(mask_url(storage_url) or "not given")),
        ("study", f"{study.study_name}; objectives: {len(study.directions)}"),
        ("trials", f"{len(trials)} (" + ", ".join(f"{v} {k}" for k, v in sorted(states.items())) + ")"),
        ("command", mask_url(run.get("command") or command) or "not recorded"),
    ]
    if run.get("command") and command and command != run.get("command"):
        items.append(("report command", mask_url(command)))
    sha = _git_sha()
    if sha != "unknown":
        items.append(("git", sha))
    items.append(("written", _dt.datetime.now().astimezone().isoformat(timespec="seconds")
                  + f" on {platform.node() or 'unknown host'}"))
    return Provenance(tuple((k, str(v)) for k, v in items), predicted)


# ============================================================================ drawing

def _figure(width=7.5, height=4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _draw_roofline(data: RooflineData, path: pathlib.Path, time_source: str) -> pathlib.Path:
    fig, ax = _figure(8, 5.5)
    x_lo, x_hi = data.chart.x_range
    compute = [r for r in data.chart.roofs if r.name != "memory"]
    top = max(r.peak_tops for r in compute)
    ridge_top = max(data.chart.ridge_intensity.values())
    # the memory roof up to the highest compute roof; each compute roof flat from its ridge
    ax.plot([x_lo, ridge_top], [top * x_lo / ridge_top, top], "-", color="black", linewidth=1.6,
            label=f"memory ({data.chart.memory_gbps:.0f} GB/s)")
    for roof in compute:
        ridge = data.chart.ridge_intensity[roof.name]
        ax.plot([ridge, x_hi], [roof.peak_tops, roof.peak_tops], "--", linewidth=1.4,
                label=f"{roof.name} ({roof.peak_tops:.0f} TOPS)")
    ok = [p for p in data.trials if p.feasible]
    bad = [p for p in data.trials if not p.feasible]
    if ok:
        sc = ax.scatter([p.intensity for p in ok], [p.achieved_tops for p in ok], c=[p.trial for p in ok],
                        cmap="viridis", s=18, alpha=0.8, label="trial (feasible)", zorder=3)
        fig.colorbar(sc, ax=ax, label="trial number", pad=0.01)
    if bad:
        ax.scatter([p.intensity for p in bad], [p.achieved_tops for p in bad], marker="x", color="0.6", s=18,
                   label="trial (over error budget)", zorder=3)
    if data.winner:
        w = data.winner
        ax.scatter([w.intensity], [w.achieved_tops], marker="*", s=260, color="crimson", edgecolor="black",
                   zorder=5, label=f"winner: trial {w.trial}, {w.achieved_tops:.0f} TOPS")
    if data.baseline:
        b = data.baseline
        ax.scatter([b.intensity], [b.achieved_tops], marker="D", s=70, color="black", zorder=5,
                   label=f"SDPA fp16 ({b.time_source}), {b.achieved_tops:.0f} TOPS")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    shown = [p.achieved_tops for p in (*data.trials, data.baseline) if p is not None and p.achieved_tops > 0]
    ax.set_ylim(min([min(r.peak_tops for r in compute) / 20] + [v / 8 for v in shown]), top * 1.6)
    ax.set_xlabel("arithmetic intensity (nominal ops / DRAM byte)")
    ax.set_ylabel(f"TOPS (nominal attention ops, {time_source} time)")
    ax.set_title(f"{data.chart.title}\ntrials at {data.point}", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _draw_history(data: HistoryData, path: pathlib.Path, title: str, time_source: str) -> pathlib.Path:
    from matplotlib.transforms import blended_transform_factory

    fig, ax = _figure()
    ax.plot(data.numbers, data.values, "o", ms=4, alpha=0.6, label="trial (feasible)")
    if any(math.isfinite(v) for v in data.infeasible_values):
        ax.plot(data.numbers, data.infeasible_values, "x", ms=4, color="0.6", label="trial (over error budget)")
    ax.step(data.numbers, data.best_so_far, where="post", color="crimson", label="best feasible so far")
    rug = blended_transform_factory(ax.transData, ax.transAxes)
    for status, color in (("failed", "black"), ("pruned", "orange")):
        xs = [n for n, s in zip(data.numbers, data.status) if s == status]
        if xs:
            ax.plot(xs, [0.02] * len(xs), "|", ms=10, color=color, transform=rug, label=f"{status} ({len(xs)})")
    finite = [v for v in data.values + data.infeasible_values if math.isfinite(v)]
    if finite and max(finite) / max(min(finite), 1e-12) > 20:
        ax.set_yscale("log")
    if not data.numbers:
        ax.text(0.5, 0.5, "no trials yet", transform=ax.transAxes, ha="center")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"ms per layer ({time_source})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _draw_importance(data: ImportanceData, path: pathlib.Path) -> pathlib.Path:
    fig, ax = _figure(7, 0.6 + 0.32 * max(len(data.names), 3))
    names, values = list(reversed(data.names)), list(reversed(data.values))
    ax.barh(names, values, color="tab:blue")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.15 if values else 1)
    ax.set_xlabel("importance of latency (normalised)")
    ax.set_title(data.note, fontsize=9)
    return _save(fig, path)


def _draw_pareto(data: ParetoData, path: pathlib.Path, time_source: str) -> pathlib.Path:
    fig, ax = _figure(7.5, 5)
    sc = ax.scatter(data.latency_ms, data.error, c=data.kv_bytes, cmap="viridis", s=22, alpha=0.85, zorder=3)
    front = [i for i, f in enumerate(data.front) if f]
    ax.scatter([data.latency_ms[i] for i in front], [data.error[i] for i in front], facecolor="none",
               edgecolor="crimson", s=90, linewidth=1.4, zorder=4, label=f"Pareto front ({len(front)} trials)")
    fig.colorbar(sc, ax=ax, label="KV cache bytes / fp16")
    if data.error and min(data.error) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(f"ms per layer ({time_source})")
    ax.set_ylabel("error (1 - cosine, worst of prefill and KV)")
    ax.set_title(f"latency / error / KV bytes: {len(data.numbers)} feasible trials"
                 + (f", {data.infeasible} over budget not shown" if data.infeasible else ""), fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    if front:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _draw_prediction(data: PredictionData, path: pathlib.Path) -> pathlib.Path:
    fig, ax = _figure(6.5, 5.5)
    points = sorted(data.mape_by_point)
    for key in points:
        rows = [r for r in data.rows if r.point == key]
        ax.scatter([r.predicted_ms for r in rows], [r.measured_ms for r in rows], s=16, alpha=0.75,
                   label=f"{key}: MAPE {data.mape_by_point[key]:.0f}%")
    values = [v for r in data.rows for v in (r.predicted_ms, r.measured_ms)]
    lo, hi = min(values) / 1.3, max(values) * 1.3
    ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted ms (roofline model)")
    ax.set_ylabel("measured ms")
    ax.set_title(f"roofline prediction against measurement: MAPE {data.mape_pct:.1f}% over {len(data.rows)} "
                 f"(trial, point) pairs", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ============================================================================ page

# Runs before the images load: an image that fails (or loads empty) is replaced by a visible note,
# and when the page has loaded <body data-images> says "ok" or lists the broken files, and
# data-errors collects script errors; tests read both from the DOM of a headless browser.
IMAGE_CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    if (e.target && e.target.tagName === 'IMG') { return; }
    errors.push(String(e.message || e));
  }, true);
  window.addEventListener('load', function () {
    var broken = [], images = Array.prototype.slice.call(document.images);
    document.body.setAttribute('data-image-count', String(images.length));
    images.forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) {
        broken.push(img.getAttribute('src'));
        var note = document.createElement('p');
        note.className = 'missing-figure';
        note.textContent = 'figure missing: ' + img.getAttribute('src');
        img.parentNode.replaceChild(note, img);
      }
    });
    document.body.setAttribute('data-images', broken.length ? 'broken: ' + broken.join(' ') : 'ok');
    document.body.setAttribute('data-errors', errors.join(' | '));
  });
})();
</script>"""

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1000px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.banner{background:#fde68a;border:2px solid #d97706;padding:.6em .9em;font-weight:600}
.subtitle{color:#555;margin-top:0}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f4f6;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;background:#fafafa}
.note{color:#555;font-size:.9em} .missing,.missing-figure{color:#b91c1c;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f3f4f6;padding:0 3px}"""


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Iterable[Sequence], row_class=None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cls = row_class(row) if row_class else ""
        cells = "".join(f"<td class='num'>{_fmt(c)}</td>" if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{_fmt(c)}</td>" for c in row)
        out.append(f"<tr{' class=' + repr(cls) if cls else ''}>{cells}</tr>")
    return "".join(out) + "</table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _summary_html(s: SummaryData, tel: TelemetryData | None) -> str:
    if s.winner is None:
        return "<p class='missing'>No feasible trial yet: every config so far was over an error budget, " \
               "infeasible or failed.</p>"
    parts = [f"<p>Winner: <b>trial {s.winner}</b>. Times are <b>{s.time_source}</b>; default and SDPA columns: "
             f"{html.escape(s.origin)}.</p>"]
    parts.append(_table(["point", "weight", "winner ms", "default ms", "SDPA ms", "speedup vs default",
                         "speedup vs SDPA"], [tuple(r) for r in s.rows],
                        row_class=lambda r: "total" if r[0] == "total" else ""))
    parts.append("<p class='note'>total: the workload-weighted sum, ms per layer (the tuner's objective).</p>")
    a = s.accuracy
    parts.append("<h3>Accuracy</h3>" + _table(["metric", "value", "budget"], [
        ("prefill cosine vs fp32 attention", a["cosine"], f"≥ {_fmt(1 - a['prefill_budget'])}"),
        ("prefill SQNR (dB)", a["sqnr_db"], "-"),
        ("KV-cache cosine (compressed cache)", a["kv_cosine"], f"≥ {_fmt(1 - a['kv_budget'])}"),
        ("KV compression vs fp16 (all metadata)", a["kv_compression"], "-"),
    ]))
    default = {k: v for k, v in s.config.items() if k not in s.changed}
    parts.append("<h3>Winner's configuration</h3>")
    if s.changed:
        parts.append(_table(["field", "winner", "default"],
                            [(k, str(v), str(_default_value(k))) for k, v in s.changed.items()]))
    else:
        parts.append("<p>The winner is the default configuration.</p>")
    parts.append(f"<details><summary>{len(default)} fields at their defaults</summary>"
                 + _table(["field", "value"], [(k, str(v)) for k, v in default.items()]) + "</details>")
    if tel is not None:
        rows = []
        for key, label in (("sm_clock_mhz", "SM clock (MHz)"), ("mem_clock_mhz", "memory clock (MHz)"),
                           ("power_w", "power (W)"), ("temperature_c", "temperature (C)")):
            if key in tel.summary:
                v = tel.summary[key]
                rows.append((label, v["min"], v["median"], v["max"]))
        parts.append("<h3>NVML telemetry</h3>" + _table(["quantity", "min", "median", "max"], rows)
                     + f"<p>{tel.samples} samples over {tel.trials_sampled} trials; throttled (power or thermal "
                       f"slowdown) in {100 * tel.summary.get('throttled_share', 0):.0f}% of samples, "
                       f"{tel.trials_throttled} trials.</p>")
    return "".join(parts)


def _default_value(field: str):
    from kernels.config import KernelConfig

    return getattr(KernelConfig(), field, "?")


def _save_run(study, rows: list[dict], best, command: str, mode: str) -> dict:
    """Keep what only the tuning process knows on the study, for `autotune report` later."""
    from .export import mask_url

    identity = None
    if mode == "live":
        from .telemetry import Telemetry

        tel = Telemetry.open()
        if tel is not None:
            try:
                identity = tel.identity()
            except Exception:
                identity = None
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    run = {"summary_rows": clean, "winner": best.number if best is not None else None, "nvml": identity,
           "toolchain": toolchain_versions(), "command": mask_url(command),
           "written": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        study.set_user_attr(REPORT_ATTR, run)
    except Exception as exc:  # a read-only storage: the report itself still gets written
        print(f"report: could not save the run's summary on the study ({type(exc).__name__})", file=sys.stderr)
    return run


def write_report(study, out_dir=None, *, storage_url: str | None = None, command: str = "",
                 summary_rows: list[dict] | None = None) -> pathlib.Path:
    """Write index.html and its PNG figures to `out_dir` (default reports/<gpu>-<model>/); returns
    the page's path. `summary_rows` (cli.finish) are the per-point winner/default/SDPA times of the
    run; when given they are also saved on the study so that a regenerated report shows them."""
    from .export import best_trial

    attrs = study.user_attrs
    gpu, model, mode = attrs.get("gpu", "gpu"), attrs.get("model", "model"), attrs.get("mode", "?")
    out = pathlib.Path(out_dir) if out_dir else ROOT / "reports" / f"{gpu}-{model}"
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    run = _save_run(study, summary_rows, best, command, mode) if summary_rows else attrs.get(REPORT_ATTR)
    workload = workload_from_study(study)
    from roofline import GPUS

    calibration = _calibration(gpu) if gpu in GPUS else None
    summary = summary_data(study, workload, gpu, summary_rows, calibration, best)
    prov = provenance_data(study, storage_url, command, run)
    time_source = "predicted" if prov.predicted else "measured"
    sections: list[str] = []
    figures: list[str] = []

    # -- roofline
    roof = None
    if calibration is not None and workload is not None:
        point = roofline_point(workload)
        base = None
        if summary.time_source == "measured" and point is not None:
            key = point_key(point)
            base = next((r.sdpa_ms for r in summary.rows if r.point == key), None)
        roof = roofline_data(trials, workload, gpu, calibration, summary.winner, base)
    if roof is not None:
        _draw_roofline(roof, out / "roofline.png", time_source)
        figures.append("roofline.png")
        sections.append(
            "<h2>Roofline</h2>" + _img("roofline.png", "roofline with every trial")
            + f"<p class='note'>Each trial at {html.escape(roof.point)}: intensity = nominal attention ops "
              f"(4&middot;B&middot;Hq&middot;N&sup2;&middot;D, halved when causal) per DRAM byte of the timed "
              f"kernels from the roofline cost model; achieved = those ops / the trial's {time_source} time "
              f"(quantization pass included). Winner: "
              + (f"trial {roof.winner.trial}, {roof.winner.achieved_tops:.0f} TOPS ({roof.winner.ms:.4g} ms)"
                 if roof.winner else "none") + f"; SDPA fp16 ({roof.baseline.time_source}): "
              f"{roof.baseline.achieved_tops:.0f} TOPS ({roof.baseline.ms:.4g} ms)."
            + (f" {roof.skipped} trials the roofline model rejects are left out." if roof.skipped else "") + "</p>")
    else:
        sections.append("<h2>Roofline</h2><p class='note'>No roofline: the study records no workload or the GPU "
                        f"{html.escape(gpu)} is not in the roofline model.</p>")

    # -- history
    hist = history_data(trials)
    _draw_history(hist, out / "history.png", f"{model} on {gpu}: optimization history", time_source)
    figures.append("history.png")
    counts = {s: hist.status.count(s) for s in ("feasible", "infeasible", "failed", "pruned")}
    sections.append("<h2>Optimization history</h2>" + _img("history.png", "optimization history")
                    + "<p class='note'>" + ", ".join(f"{v} {k}" for k, v in counts.items())
                    + " (infeasible: over an error budget; pruned: rejected by the roofline model's resource "
                      "check before running).</p>")

    # -- importances
    imp = importance_data(study)
    if imp.names:
        _draw_importance(imp, out / "importance.png")
        figures.append("importance.png")
        sections.append("<h2>Parameter importances</h2>" + _img("importance.png", "parameter importances")
                        + f"<p class='note'>{html.escape(imp.note)}.</p>")
    else:
        sections.append(f"<h2>Parameter importances</h2><p class='note'>{html.escape(imp.note)}.</p>")

    # -- pareto
    par = pareto_data(study)
    if par is not None:
        if par.numbers:
            _draw_pareto(par, out / "pareto.png", time_source)
            figures.append("pareto.png")
            front = [n for n, f in zip(par.numbers, par.front) if f]
            sections.append("<h2>Pareto front</h2>" + _img("pareto.png", "Pareto front")
                            + f"<p class='note'>Front trials: {', '.join(map(str, front))}.</p>")
        else:
            sections.append("<h2>Pareto front</h2><p class='note'>No feasible completed trial yet.</p>")

    # -- predicted vs measured
    pred = prediction_data(trials, workload, gpu, calibration) if calibration is not None else None
    if pred is not None and pred.rows:
        _draw_prediction(pred, out / "predicted_vs_measured.png")
        figures.append("predicted_vs_measured.png")
        sections.append("<h2>Roofline prediction against measurement</h2>"
                        + _img("predicted_vs_measured.png", "predicted against measured time")
                        + f"<p class='note'>MAPE {pred.mape_pct:.1f}% over {len(pred.rows)} (trial, point) pairs; "
                          "per point: " + ", ".join(f"{html.escape(k)} {v:.1f}%" for k, v in
                                                   sorted(pred.mape_by_point.items())) + ".</p>")

    _remove_stale(out, figures)
    tel = telemetry_data(trials)
    banner = ("<p class='banner' id='predicted-banner'>Predicted, not measured: every time on this page comes "
              "from the roofline model (mode " + html.escape(mode) + "), no GPU was timed.</p>") \
        if prov.predicted else ""
    provenance = "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                                     for k, v in prov.items) + "</table>"
    title = f"TurboAttention tuning: {model} on {gpu}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
{IMAGE_CHECK_SCRIPT}
</head><body>
<h1>{html.escape(title)}</h1>
<p class="subtitle">study {html.escape(study.study_name)}, {len(trials)} trials, {html.escape(time_source)} times</p>
{banner}
<h2>Summary</h2>
{_summary_html(summary, tel)}
{''.join(sections)}
<h2>Provenance</h2>
{provenance}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _remove_stale(out: pathlib.Path, keep: list[str]) -> None:
    """A figure this report did not draw (e.g. pareto.png of an earlier study) must not linger."""
    for name in ("roofline.png", "history.png", "importance.png", "pareto.png", "predicted_vs_measured.png"):
        if name not in keep and (out / name).exists():
            (out / name).unlink()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune report",
                                     description="Regenerate a tuning run's HTML/PNG report from its stored study.")
    parser.add_argument("--storage", required=True, help="the study's storage (sqlite:///FILE, postgresql://..., "
                                                          "journal:FILE)")
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--out", help="report folder (default reports/<gpu>-<model>/)")
    args = parser.parse_args(argv)
    import optuna

    from .export import mask_url
    from .study import StorageError, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study_name, storage=open_storage(args.storage))
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"error: --study-name {args.study_name!r} not found in {mask_url(args.storage)}", file=sys.stderr)
        return 2
    command = "python -m autotune report " + " ".join(mask_url(a) or "" for a in (argv if argv is not None
                                                                                  else sys.argv[2:]))
    print(write_report(study, args.out, storage_url=args.storage, command=command.strip()))
    return 0
