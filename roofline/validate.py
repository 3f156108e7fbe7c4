"""Validation of the roofline cost model against measured kernel timings (GitHub issue 5).

  python -m roofline validate --gpu h100 [--records PATH ...] [--out reports/roofline]
  python -m roofline.validate measure --gpu h100 [--out reports/roofline/records-h100-sxm.json]   (on a GPU)

Records are the JSON documents that roofline/calibrations/<gpu>.validation.json holds: a header
(gpu, date, torch, triton, timing) and "records", each {"kernel", "shape" (AttentionShape fields),
"config" (the knobs of the kernel; for the SDPA baselines {"backend": ...} or null), "ms"}, plus,
from measure_records, "model" and "timing" ("cuda_graph" or "events").

Every record is predicted under several variants of the model (VARIANTS). Two are the issue's
"before" and "after" (the CSV's calibrated false/true):
  datasheet   datasheet peaks with DEFAULT_EFFICIENCY (datasheet_calibration);
  calibrated  the saved calibration of the GPU (measured ceilings, fitted efficiency factors).
On the H100 both sets of factors were FITTED ON THE SAME TIMINGS they are checked against
(cost.DEFAULT_EFFICIENCY's comment, the calibration's notes), so both are in-sample figures.
The other variants say what the model does without that:
  naive       datasheet peaks, every efficiency factor 1.0 (the textbook roofline; nothing fitted);
  ceilings    the calibration's measured ceilings (copy, cuBLAS matmuls), factors 1.0: the start
              of the fits below, which uses no attention timing;
  refit       fit_efficiency(per_kernel=True) from `ceilings` on every used record (in-sample,
              the held-out fits' procedure, for comparison with them);
  heldout_by_shape, heldout_alternating
              two-fold cross-validation of that fit: each record is predicted with the factors
              fitted on the other fold only. by_shape: per kernel, its shapes sorted (model, N,
              batch) and dealt to the folds alternately, so a record's shape is never seen by
              its fit; alternating: every other record of each kernel in file order.
The structural constants of cost.py (loop and program overheads, overlaps) were also chosen on
these timings; the held-out figures do not undo that, only the fit of the efficiency factors.

Records used for the metrics: feasible by check_feasible (the model cannot predict the others)
and, unless timed with CUDA graphs, measured >= min_ms (default 0.1 ms: below it the SDPA
timings are host overhead, which the model does not describe; tests/test_roofline.py and the
calibration's fit use the same filter). Metrics: MAPE (mean |predicted - measured| / measured, in
%), Spearman rank correlation (average ranks for ties), overall, per kernel, and for prefill per
shape (the ranking of configs within a shape is what the tuner relies on) with the regret of the
predicted-best config.

Outputs (out/<name>-<gpu>.*): validation CSV (one row per (record, calibrated), DESIGN.md section 7
columns plus ape and the shape's fields), validation-variants CSV (one row per (record, variant)),
summary JSON and markdown, the predicted-vs-measured PNG and the roofline PNG of the measured
prefill configs. Nothing here imports pandas or scipy; matplotlib only when drawing, torch and
the kernels only in measure_records.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from .calibrate import (Calibration, EfficiencyFit, calibration_dir, calibration_path, datasheet_calibration,
                        fit_efficiency, load_calibration, save_calibration)
from .cost import KERNELS, ROOFS, AttentionShape, Prediction, check_feasible, predict
from .gpus import GPUSpec, resolve_gpu
from .models import MODELS, default_workload, resolve_model

# The models the autotuner is seeded with (autotune/bench.py SEED_MODELS; roofline imports nothing
# of autotune). Issue 5 asks for >= 60 configs over them, prefill and decode, several N.
SEED_MODELS = ("llama3-8b", "phi3-mini", "qwen2.5-7b")
# A shape names the first preset with its (Hq, Hkv, D) in this order: llama3-8b and mistral-7b
# share one geometry, and the seed models come first.
MODEL_ORDER = SEED_MODELS + tuple(k for k in MODELS if k not in SEED_MODELS)
TARGET_MAPE_PCT = 15.0
TARGET_SPEARMAN = 0.85
TARGET_SEED_CONFIGS = 60
DEFAULT_MIN_MS = 0.1
GRAPH_TIMING = "cuda_graph"
# The records file cost.DEFAULT_EFFICIENCY was fitted on (see its comment in cost.py).
DEFAULT_EFFICIENCY_FITTED_ON = ("h100-sxm.validation.json",)

# Kernel groups of the per-kernel metrics: each kernel of cost.KERNELS plus both baselines together.
KERNEL_GROUPS: Mapping[str, tuple] = dict({k: (k,) for k in KERNELS}, sdpa=("sdpa_prefill_fp16", "sdpa_decode_fp16"))

VARIANTS: Mapping[str, str] = {
    "naive": "datasheet peaks, every efficiency factor 1.0 (nothing fitted)",
    "ceilings": "measured ceilings of the calibration, every efficiency factor 1.0 (no attention timing used)",
    "datasheet": "datasheet peaks, cost.DEFAULT_EFFICIENCY (datasheet_calibration): the uncalibrated model",
    "calibrated": "the saved calibration (measured ceilings, fitted per-kernel efficiency factors)",
    "refit": "fit_efficiency(per_kernel=True) from 'ceilings' on every used record (in-sample)",
    "heldout_by_shape": "2-fold cross-validated fit, folds by shape (each record predicted by the other fold's fit)",
    "heldout_alternating": "2-fold cross-validated fit, every other record of each kernel",
}
CALIBRATED_VARIANTS = ("calibrated", "refit", "heldout_by_shape", "heldout_alternating")
HELDOUT_SPLITS = ("by_shape", "alternating")

VALIDATION_COLUMNS = ["kernel", "model", "shape", "config", "predicted_ms", "measured_ms", "calibrated", "bound", "ape",
                      "variant", "used", "excluded", "in_fit", "record", "records_file", "gpu",
                      "batch", "hq", "hkv", "n", "d", "causal"]
VARIANT_COLUMNS = ["kernel", "model", "shape", "config", "variant", "calibrated", "fold", "in_fit", "predicted_ms",
                   "measured_ms", "bound", "ape", "used", "record"]


# ----------------------------------------------------------------------------- metrics

def _finite_pairs(predicted: Sequence[float], measured: Sequence[float]) -> tuple[list, list]:
    if len(predicted) != len(measured):
        raise ValueError(f"predicted and measured differ in length ({len(predicted)} vs {len(measured)})")
    return [float(v) for v in predicted], [float(v) for v in measured]


def absolute_percentage_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """100 * |p - m| / m per pair; measured values must be positive."""
    p, m = _finite_pairs(predicted, measured)
    if any(not v > 0 for v in m):
        raise ValueError("measured values must be positive for a percentage error")
    return [100.0 * abs(a - b) / b for a, b in zip(p, m)]


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error in %, NaN for no pairs."""
    errors = absolute_percentage_errors(predicted, measured)
    return sum(errors) / len(errors) if errors else math.nan


def rank(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span ([10, 20, 20, 30] -> 1, 2.5, 2.5, 4)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN with fewer than 2 pairs or when either side is constant."""
    x, y = _finite_pairs(x, y)
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the tie-averaged ranks (as scipy.stats.spearmanr)."""
    x, y = _finite_pairs(x, y)
    return pearson(rank(x), rank(y))


def metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """n, mape_pct, median_ape_pct, within_15pct (share of pairs), spearman, rms_log_error (ln units),
    mean_log_ratio (ln predicted/measured: > 0 predicts slow). NaN where undefined (JSON: null)."""
    errors = absolute_percentage_errors(predicted, measured)
    logs = [math.log(p / m) for p, m in zip(predicted, measured)] if all(v > 0 for v in predicted) else []
    n = len(errors)
    return {
        "n": n,
        "mape_pct": sum(errors) / n if n else math.nan,
        "median_ape_pct": statistics.median(errors) if n else math.nan,
        "within_15pct": sum(e <= TARGET_MAPE_PCT for e in errors) / n if n else math.nan,
        "spearman": spearman(predicted, measured),
        "rms_log_error": math.sqrt(sum(v * v for v in logs) / len(logs)) if logs else math.nan,
        "mean_log_ratio": sum(logs) / len(logs) if logs else math.nan,
    }


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class Record:
    """One measured kernel call. index: position over all loaded files (the CSV's `record`)."""

    index: int
    kernel: str
    model: str
    shape: AttentionShape
    config: Any  # mapping or None, as recorded
    measured_ms: float
    source: str  # file name the record came from
    timing: str = ""  # "cuda_graph" | "events" | "" (not recorded: events around one eager call)


def model_for_shape(shape: AttentionShape) -> str:
    """The first preset of MODEL_ORDER with the shape's (Hq, Hkv, D), else "custom"."""
    for key in MODEL_ORDER:
        spec = MODELS[key]
        if (spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (shape.num_q_heads, shape.num_kv_heads,
                                                                      shape.head_dim):
            return key
    return "custom"


def shape_label(shape: AttentionShape) -> str:
    return (f"B={shape.batch} Hq={shape.num_q_heads} Hkv={shape.num_kv_heads} N={shape.seq_len} "
            f"D={shape.head_dim} {'causal' if shape.causal else 'full'}")


def config_label(config: Any) -> str:
    """Compact JSON with sorted keys ("" for no config)."""
    return "" if config is None else json.dumps(config, sort_keys=True, separators=(",", ":"))


def default_records_paths(gpu: "str | GPUSpec", out_dir: "str | os.PathLike | None" = None) -> list[Path]:
    """The packaged <gpu>.validation.json, plus out_dir/records-<gpu>.json (measure_records' default
    output) when it exists."""
    key = resolve_gpu(gpu).key
    paths = [calibration_dir() / f"{key}.validation.json"]
    if out_dir is not None and (Path(out_dir) / f"records-{key}.json").is_file():
        paths.append(Path(out_dir) / f"records-{key}.json")
    return paths


def read_records_document(path: "str | os.PathLike") -> dict:
    """A records document as a dict with a "records" list (a bare list is accepted as the records)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        data = {"records": data}
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'records' list")
    return data


def load_records(paths: Iterable["str | os.PathLike"], gpu: "str | GPUSpec | None" = None) -> list[Record]:
    """Records of every file in order. A file whose header names another GPU than `gpu` is an error."""
    key = resolve_gpu(gpu).key if gpu is not None else None
    out: list[Record] = []
    for path in paths:
        doc = read_records_document(path)
        if key is not None and doc.get("gpu") and resolve_gpu(doc["gpu"]).key != key:
            raise ValueError(f"{path}: records of gpu {doc['gpu']!r}, not {key!r}")
        for i, r in enumerate(doc["records"]):
            try:
                kernel = r["kernel"]
                if kernel not in KERNELS:
                    raise ValueError(f"kernel {kernel!r} is not one of {list(KERNELS)}")
                shape = AttentionShape(**r["shape"])
                ms = r["ms"]
                if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms > 0:
                    raise ValueError(f"ms must be a positive number, got {ms!r}")
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: records[{i}]: {exc}") from None
            model = r.get("model") or model_for_shape(shape)
            out.append(Record(len(out), kernel, model, shape, r.get("config"), float(ms), Path(path).name,
                              str(r.get("timing") or "")))
    return out


def prediction_config(record: Record) -> Any:
    """The config the model is given: the record's for the TurboAttention kernels, None for the
    SDPA baselines (their record config names the torch backend; the model uses BASELINE_CONFIG)."""
    return None if record.kernel.startswith("sdpa_") else record.config


def exclusion(record: Record, gpu: "str | GPUSpec", min_ms: float = DEFAULT_MIN_MS) -> str:
    """Why `record` is left out of the metrics ("" when it is used)."""
    ok, reason = check_feasible(record.kernel, prediction_config(record), gpu, record.shape.head_dim)
    if not ok:
        return f"infeasible by the model: {reason.split(';')[0]}"
    if record.timing != GRAPH_TIMING and record.measured_ms < min_ms:
        return f"measured < {min_ms:g} ms with host overhead in the timing"
    return ""


def _shape_order(shape: AttentionShape) -> tuple:
    """Sort key of the by_shape split: model (MODEL_ORDER, then custom), N, batch, the rest."""
    model = model_for_shape(shape)
    return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), shape.seq_len,
            shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.causal)


def heldout_folds(records: Sequence[Record], split: str) -> list[int]:
    """Fold 0/1 of each record (see the module docstring for the two splits)."""
    folds = [0] * len(records)
    by_kernel: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_kernel.setdefault(r.kernel, []).append(i)
    for kernel, indices in by_kernel.items():
        if split == "alternating":
            for j, i in enumerate(indices):
                folds[i] = j % 2
        elif split == "by_shape":
            shapes = sorted({records[i].shape for i in indices}, key=_shape_order)
            fold_of = {s: j % 2 for j, s in enumerate(shapes)}
            for i in indices:
                folds[i] = fold_of[records[i].shape]
        else:
            raise ValueError(f"split must be one of {list(HELDOUT_SPLITS)}, got {split!r}")
    return folds


# ----------------------------------------------------------------------------- predicting

def unit_efficiency_calibration(calibration: Calibration | None, gpu: "str | GPUSpec") -> Calibration:
    """`calibration`'s ceilings (none: the datasheet's) with every roof's efficiency factor 1.0."""
    key = resolve_gpu(gpu).key
    ones = {roof: 1.0 for roof in ROOFS}
    if calibration is None:
        return Calibration(gpu=key, efficiency=ones, source="datasheet", notes="datasheet peaks, efficiency 1")
    return dataclasses.replace(calibration, efficiency=ones, notes="measured ceilings, efficiency 1")


def fitted_calibration(base: Calibration, fit: EfficiencyFit) -> Calibration:
    return dataclasses.replace(base, efficiency=dict(base.efficiency, **fit.efficiency), notes="fitted here")


def _refit(records: Sequence[Record], ceilings_predictions: Sequence, used: Sequence[bool]) -> EfficiencyFit:
    """The `refit` variant's fit: per-kernel factors from the measured ceilings (every factor 1.0)."""
    return fit_efficiency([(p, r.measured_ms) for r, p, u in zip(records, ceilings_predictions, used) if u],
                          per_kernel=True)


def refit_calibration(gpu: "str | GPUSpec", records_paths: Sequence["str | os.PathLike"],
                      min_ms: float = DEFAULT_MIN_MS, calibration_directory: "str | os.PathLike | None" = None) -> Path:
    """Refit the saved calibration's efficiency factors on `records_paths` and save it.

    The measured ceilings stay; the factors become the `refit` variant's: fit_efficiency(per_kernel=
    True) from those ceilings with every factor 1.0, on every used record. The notes name the
    records, so that the validation reports its `calibrated` figures as in-sample."""
    spec = resolve_gpu(gpu)
    paths = [Path(p) for p in records_paths]
    records = load_records(paths, spec)
    calibration = load_calibration(spec, calibration_directory)
    base = unit_efficiency_calibration(calibration, spec)
    used = [not exclusion(r, spec, min_ms) for r in records]
    fit = _refit(records, [_predict(r, spec, base) if u else None for r, u in zip(records, used)], used)
    ceilings_note = (calibration.notes or "").split(" efficiency:")[0].rstrip(". ")
    names = ", ".join(p.name for p in paths)
    fitted = dataclasses.replace(
        base, efficiency=dict(base.efficiency, **fit.efficiency), created=_dt.date.today().isoformat(),
        notes=f"{ceilings_note}. efficiency: fit_efficiency(per_kernel=True) on {names} ({fit.records} timings), "
              f"rms log error {fit.rms_log_error:.3f}")
    return save_calibration(fitted, calibration_directory)


def _predict(record: Record, gpu: GPUSpec, calibration: Calibration | None) -> Prediction:
    # the SDPA baselines' record config names the torch backend, which the model distinguishes
    config = record.config if record.kernel.startswith("sdpa_") else prediction_config(record)
    return predict(record.kernel, record.shape, config, gpu, calibration,
                   label=f"{record.model} {record.kernel} {shape_label(record.shape)}")


class VariantResult(NamedTuple):
    """Predictions of one variant, aligned with the records (None where not predicted)."""

    name: str
    calibrated: bool
    predictions: list  # Prediction | None
    folds: list  # fold per record for the held-out variants, else None entries
    in_fit: list  # bool per record: the record's timing was used to fit this variant's factors
    fits: tuple  # EfficiencyFit per fold (held-out), one for refit, empty otherwise


class Validation(NamedTuple):
    gpu: str
    records: list  # Record
    excluded: list  # str per record ("" = used)
    variants: dict  # name -> VariantResult
    calibration: Calibration
    calibration_file: str
    min_ms: float
    records_files: list  # str


def _calibration_in_sample(calibration: Calibration, record: Record) -> bool:
    return record.source in (calibration.notes or "")


def evaluate(records: Sequence[Record], gpu: "str | GPUSpec", calibration: Calibration, min_ms: float = DEFAULT_MIN_MS,
             heldout: bool = True, calibration_file: str = "", records_files: Sequence[str] = ()) -> Validation:
    """Predict every feasible record under every variant (held-out fits only when `heldout`)."""
    spec = resolve_gpu(gpu)
    records = list(records)
    excluded = [exclusion(r, spec, min_ms) for r in records]
    feasible = [not e.startswith("infeasible") for e in excluded]
    used = [not e for e in excluded]

    def run(cal: Calibration | None) -> list:
        return [_predict(r, spec, cal) if ok else None for r, ok in zip(records, feasible)]

    none = [None] * len(records)
    no = [False] * len(records)
    defaults_in_sample = [r.source in DEFAULT_EFFICIENCY_FITTED_ON for r in records]
    variants = {
        "naive": VariantResult("naive", False, run(unit_efficiency_calibration(None, spec)), none, no, ()),
        "ceilings": VariantResult("ceilings", False, run(unit_efficiency_calibration(calibration, spec)), none, no, ()),
        "datasheet": VariantResult("datasheet", False, run(datasheet_calibration(spec)), none,
                                   [a and b for a, b in zip(defaults_in_sample, used)], ()),
        "calibrated": VariantResult("calibrated", True, run(calibration), none,
                                    [_calibration_in_sample(calibration, r) and u for r, u in zip(records, used)], ()),
    }
    if heldout and any(used):
        base = unit_efficiency_calibration(calibration, spec)
        start = variants["ceilings"].predictions
        fit = _refit(records, start, used)
        variants["refit"] = VariantResult("refit", True, run(fitted_calibration(base, fit)), none, list(used), (fit,))
        for split in HELDOUT_SPLITS:
            folds = heldout_folds(records, split)
            predictions, fits = list(none), []
            for fold in (0, 1):
                train = [u and f != fold for u, f in zip(used, folds)]
                fold_fit = _refit(records, start, train) if any(train) else None
                fits.append(fold_fit)
                cal = fitted_calibration(base, fold_fit) if fold_fit else base
                for i, r in enumerate(records):
                    if feasible[i] and folds[i] == fold:
                        predictions[i] = _predict(r, spec, cal)
            # in_fit is False by construction: a record is predicted by the fit of the other fold
            variants[f"heldout_{split}"] = VariantResult(f"heldout_{split}", True, predictions,
                                                         [f if ok else None for f, ok in zip(folds, feasible)],
                                                         no, tuple(fits))
    return Validation(spec.key, records, excluded, variants, calibration, calibration_file, min_ms,
                      list(records_files))


# ----------------------------------------------------------------------------- rows and summary

def _fmt(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def _prediction_fields(r: Record, p: Prediction | None) -> dict:
    """The columns both CSVs share: the record and its prediction (empty where not predicted)."""
    return {"kernel": r.kernel, "model": r.model, "shape": shape_label(r.shape), "config": config_label(r.config),
            "predicted_ms": _fmt(p.time_ms) if p else "", "measured_ms": _fmt(r.measured_ms),
            "bound": p.bound if p else "",
            "ape": _fmt(100.0 * abs(p.time_ms - r.measured_ms) / r.measured_ms) if p else ""}


def validation_rows(v: Validation) -> list[dict]:
    """One row per (record, calibrated): "datasheet" as calibrated=false, "calibrated" as true."""
    rows = []
    for name in ("datasheet", "calibrated"):
        result = v.variants[name]
        for i, r in enumerate(v.records):
            rows.append({
                **_prediction_fields(r, result.predictions[i]),
                "calibrated": "true" if result.calibrated else "false",
                "variant": name, "used": "false" if v.excluded[i] else "true", "excluded": v.excluded[i],
                "in_fit": "true" if result.in_fit[i] else "false", "record": i, "records_file": r.source,
                "gpu": v.gpu, "batch": r.shape.batch, "hq": r.shape.num_q_heads, "hkv": r.shape.num_kv_heads,
                "n": r.shape.seq_len, "d": r.shape.head_dim, "causal": "true" if r.shape.causal else "false",
            })
    return rows


def variant_rows(v: Validation) -> list[dict]:
    """One row per (record, variant), every variant."""
    rows = []
    for name, result in v.variants.items():
        for i, r in enumerate(v.records):
            rows.append({
                **_prediction_fields(r, result.predictions[i]),
                "variant": name, "calibrated": "true" if result.calibrated else "false",
                "fold": "" if result.folds[i] is None else result.folds[i],
                "in_fit": "true" if result.in_fit[i] else "false",
                "used": "false" if v.excluded[i] else "true", "record": i,
            })
    return rows


def write_csv(path: "str | os.PathLike", rows: Sequence[Mapping], columns: Sequence[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def read_csv(path: "str | os.PathLike") -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _group_metrics(rows: Sequence[Mapping]) -> dict:
    return metrics([float(r["predicted_ms"]) for r in rows], [float(r["measured_ms"]) for r in rows])


def prefill_shape_metrics(rows: Sequence[Mapping]) -> dict:
    """Per prefill shape: metrics, and the regret of the predicted-best config (measured time of the
    config the model ranks fastest over the measured fastest, minus 1; ties: the first)."""
    by_shape: dict[str, list] = {}
    for r in rows:
        if r["kernel"] == "prefill":
            by_shape.setdefault(f"{r['model']} {r['shape']}", []).append(r)
    out = {}
    for key, group in by_shape.items():
        m = _group_metrics(group)
        predicted_best = min(group, key=lambda r: float(r["predicted_ms"]))
        best = min(float(r["measured_ms"]) for r in group)
        m["best_config_regret_pct"] = 100.0 * (float(predicted_best["measured_ms"]) / best - 1.0)
        out[key] = m
    return out


def summarize_rows(rows: Sequence[Mapping]) -> dict:
    """Metrics of rows (CSV dicts with kernel, model, shape, predicted_ms, measured_ms, used) over the
    used rows: overall, per kernel group present, and per prefill shape. Works on either CSV,
    filtered to one variant, so the committed summary can be recomputed from the committed CSV."""
    used = [r for r in rows if r.get("used", "true") == "true" and r["predicted_ms"] != ""]
    per_kernel = {}
    for group, kernels in KERNEL_GROUPS.items():
        members = [r for r in used if r["kernel"] in kernels]
        if members:
            per_kernel[group] = _group_metrics(members)
    shapes = prefill_shape_metrics(used)
    spearmans = [m["spearman"] for m in shapes.values() if not math.isnan(m["spearman"])]
    return {"overall": _group_metrics(used), "per_kernel": per_kernel, "prefill_per_shape": shapes,
            "prefill_mean_spearman_within_shape": sum(spearmans) / len(spearmans) if spearmans else math.nan}


def coverage(records: Sequence[Record], excluded: Sequence[str]) -> dict:
    """What the used records cover of issue 5's target: >= TARGET_SEED_CONFIGS configs over the
    seed models, prefill and decode, several N; and what is missing for it."""
    used = [r for r, e in zip(records, excluded) if not e]
    per_model = {}
    missing = []
    for model in SEED_MODELS:
        mine = [r for r in used if r.model == model]
        entry = {}
        for kernel in KERNELS:
            ks = [r for r in mine if r.kernel == kernel]
            entry[kernel] = {"configs": len({(r.shape, config_label(r.config)) for r in ks}),
                             "seq_lens": sorted({r.shape.seq_len for r in ks}),
                             "batches": sorted({r.shape.batch for r in ks})}
        per_model[model] = entry
        if not mine:
            missing.append(f"{model}: no used records at all")
            continue
        if not entry["prefill"]["configs"]:
            missing.append(f"{model}: no prefill records")
        elif len(entry["prefill"]["seq_lens"]) < 2:
            missing.append(f"{model}: prefill at one N only ({entry['prefill']['seq_lens']})")
        if not entry["decode"]["configs"]:
            missing.append(f"{model}: no TurboAttention decode records")
    seed_configs = sum(per_model[m][k]["configs"] for m in SEED_MODELS for k in ("prefill", "decode"))
    if seed_configs < TARGET_SEED_CONFIGS:
        missing.append(f"only {seed_configs} prefill/decode configs over the seed models (target {TARGET_SEED_CONFIGS})")
    other = sorted({r.model for r in used} - set(SEED_MODELS))
    return {"seed_models": list(SEED_MODELS), "seed_prefill_decode_configs": seed_configs,
            "target_seed_configs": TARGET_SEED_CONFIGS, "per_model": per_model, "other_models": other,
            "decode_records": sum(r.kernel == "decode" for r in used), "missing": missing,
            "complete": not missing}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def summary(v: Validation) -> dict:
    """The summary document: per variant its metrics, the fits, the coverage and the targets."""
    rows = variant_rows(v)
    by_variant: dict[str, list] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    variants = {}
    for name, result in v.variants.items():
        used_idx = [i for i, e in enumerate(v.excluded) if not e and result.predictions[i] is not None]
        in_fit = sum(result.in_fit[i] for i in used_idx)
        entry = {"description": VARIANTS[name], "calibrated": result.calibrated,
                 "records_in_its_fit": in_fit, "in_sample": bool(in_fit) and in_fit == len(used_idx)}
        entry.update(summarize_rows(by_variant[name]))
        predicted_all = [r for r in by_variant[name] if r["predicted_ms"] != ""]
        entry["overall_including_excluded_feasible"] = _group_metrics(predicted_all) if predicted_all else None
        if result.fits:
            entry["fits"] = [None if f is None else {"efficiency": f.efficiency, "rms_log_error": f.rms_log_error,
                                                     "records": f.records} for f in result.fits]
        variants[name] = entry
    counts = {"infeasible": sum(e.startswith("infeasible") for e in v.excluded),
              "below_min_ms": sum(bool(e) and not e.startswith("infeasible") for e in v.excluded)}
    cov = coverage(v.records, v.excluded)

    def verdict(name: str) -> dict | None:
        if name not in variants:
            return None
        o = variants[name]["overall"]
        out = {"mape_pct": o["mape_pct"], "spearman": o["spearman"],
               "mape_met": o["mape_pct"] <= TARGET_MAPE_PCT, "spearman_met": o["spearman"] >= TARGET_SPEARMAN}
        prefill = variants[name]["per_kernel"].get("prefill")
        if prefill:  # the overall Spearman gains from the spread of sizes; within a shape is harder
            out.update(prefill_mape_pct=prefill["mape_pct"], prefill_spearman=prefill["spearman"],
                       prefill_mean_spearman_within_shape=variants[name]["prefill_mean_spearman_within_shape"])
        return out

    return _json_safe({
        "gpu": v.gpu,
        "generated_by": f"python -m roofline validate --gpu {v.gpu}",
        "date": _dt.date.today().isoformat(),
        "records_files": v.records_files,
        "records": len(v.records),
        "used": sum(not e for e in v.excluded),
        "excluded": counts,
        "min_ms": v.min_ms,
        "calibration_file": v.calibration_file,
        "calibration_notes": v.calibration.notes,
        "calibration_efficiency": v.calibration.efficiency,
        "in_sample_note": ("cost.DEFAULT_EFFICIENCY (the 'datasheet' variant) and the saved calibration were fitted "
                           "on these timings: their figures are in-sample. The held-out variants refit the same "
                           "factors on one half and predict the other; the structural constants of cost.py were "
                           "also chosen on these timings, which no variant undoes."),
        "targets": {"mape_pct": TARGET_MAPE_PCT, "spearman": TARGET_SPEARMAN,
                    "before (datasheet)": verdict("datasheet"), "after, in-sample (calibrated)": verdict("calibrated"),
                    "after, held-out by shape": verdict("heldout_by_shape"),
                    "after, held-out alternating": verdict("heldout_alternating")},
        "coverage": cov,
        "variants": variants,
    })


def summary_markdown(doc: Mapping) -> str:
    """A short human-readable page of the summary document."""
    def pct(x):
        return "-" if x is None else f"{x:.1f}%"

    def rho(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"# Roofline validation on {doc['gpu']}", "",
             f"Generated by `{doc['generated_by']}` on {doc['date']} from {', '.join(doc['records_files'])}: "
             f"{doc['records']} records, {doc['used']} used ({doc['excluded']['infeasible']} infeasible by the "
             f"model's resource estimate, {doc['excluded']['below_min_ms']} measured under {doc['min_ms']} ms with "
             f"host overhead). Targets (issue 5): MAPE <= {doc['targets']['mape_pct']:g}%, Spearman >= "
             f"{doc['targets']['spearman']:g}.", "", f"**In-sample warning.** {doc['in_sample_note']}", "",
             "| variant | calibrated | fitted on these records | n | MAPE | median APE | within 15% | Spearman | "
             "prefill Spearman within shape (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in doc["variants"].items():
        o = entry["overall"]
        fitted = "all" if entry["in_sample"] else ("none" if not entry["records_in_its_fit"] else
                                                   f"{entry['records_in_its_fit']}")
        lines.append(f"| {name} | {str(entry['calibrated']).lower()} | {fitted} | {o['n']} | {pct(o['mape_pct'])} | "
                     f"{pct(o['median_ape_pct'])} | {pct(None if o['within_15pct'] is None else 100 * o['within_15pct'])}"
                     f" | {rho(o['spearman'])} | {rho(entry['prefill_mean_spearman_within_shape'])} |")
    lines += ["", "Per kernel (MAPE / Spearman):", "",
              "| variant | " + " | ".join(KERNEL_GROUPS) + " |", "|---" * (len(KERNEL_GROUPS) + 1) + "|"]
    for name, entry in doc["variants"].items():
        cells = []
        for group in KERNEL_GROUPS:
            m = entry["per_kernel"].get(group)
            cells.append("no records" if m is None else f"{pct(m['mape_pct'])} / {rho(m['spearman'])} (n={m['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Prefill per shape (calibrated / held-out by shape): MAPE, Spearman, regret of the predicted-best "
              "config:", "", "| shape | n | calibrated | held-out by shape |", "|---|---|---|---|"]
    cal = doc["variants"]["calibrated"]["prefill_per_shape"]
    held = doc["variants"].get("heldout_by_shape", {}).get("prefill_per_shape", {})
    for key, m in cal.items():
        h = held.get(key)
        cell = lambda x: "-" if x is None else (f"{pct(x['mape_pct'])}, {rho(x['spearman'])}, "
                                                f"{pct(x['best_config_regret_pct'])}")
        lines.append(f"| {key} | {m['n']} | {cell(m)} | {cell(h)} |")
    cov = doc["coverage"]
    lines += ["", f"Coverage: {cov['seed_prefill_decode_configs']} prefill/decode configs over the seed models "
              f"{', '.join(cov['seed_models'])} (target {cov['target_seed_configs']}); TurboAttention decode records: "
              f"{cov['decode_records']}; other models: {', '.join(cov['other_models']) or 'none'}."]
    if cov["missing"]:
        lines += ["", "Missing for the issue's target:", ""] + [f"- {m}" for m in cov["missing"]]
    lines += ["", "Targets:", ""]
    for name, t in doc["targets"].items():
        if isinstance(t, Mapping):
            line = (f"- {name}: MAPE {pct(t['mape_pct'])} ({'met' if t['mape_met'] else 'not met'}), Spearman "
                    f"{rho(t['spearman'])} ({'met' if t['spearman_met'] else 'not met'})")
            if "prefill_mape_pct" in t:
                line += (f"; prefill alone MAPE {pct(t['prefill_mape_pct'])}, Spearman {rho(t['prefill_spearman'])}, "
                         f"within a shape {rho(t['prefill_mean_spearman_within_shape'])} (mean over shapes)")
            lines.append(line)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- charts

class ScatterPanel(NamedTuple):
    title: str
    legend: str  # the overall MAPE / Spearman line
    series: tuple  # (kernel, label with its MAPE, measured_ms tuple, predicted_ms tuple)


PLOT_VARIANTS = ("naive", "datasheet", "calibrated", "heldout_by_shape")
PANEL_TITLES = {"naive": "before: textbook roofline (efficiency 1, datasheet)",
                "datasheet": "before: datasheet defaults (in-sample factors)",
                "calibrated": "after: saved calibration (in-sample)",
                "heldout_by_shape": "after: calibration fitted on the other shapes (held-out)"}


def scatter_panels(rows: Sequence[Mapping], variants: Sequence[str] = PLOT_VARIANTS) -> list[ScatterPanel]:
    """Data of the predicted-vs-measured chart from variant rows (used rows only)."""
    panels = []
    for name in variants:
        mine = [r for r in rows if r["variant"] == name and r["used"] == "true" and r["predicted_ms"] != ""]
        if not mine:
            continue
        o = _group_metrics(mine)
        series = []
        for kernel in KERNELS:
            ks = [r for r in mine if r["kernel"] == kernel]
            if ks:
                m = _group_metrics(ks)
                series.append((kernel, f"{kernel} (n={m['n']}, MAPE {m['mape_pct']:.1f}%)",
                               tuple(float(r["measured_ms"]) for r in ks), tuple(float(r["predicted_ms"]) for r in ks)))
        panels.append(ScatterPanel(PANEL_TITLES.get(name, name),
                                   f"all: MAPE {o['mape_pct']:.1f}%, Spearman {o['spearman']:.3f} (n={o['n']})",
                                   tuple(series)))
    return panels


def draw_validation(panels: Sequence[ScatterPanel], path: "str | os.PathLike", title: str = "") -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.2 * cols, 5.4 * rows), dpi=110)
    FigureCanvasAgg(fig)
    markers = dict(zip(KERNELS, ("s", "o", "^", "D", "v")))
    colors = dict(zip(KERNELS, ("tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple")))
    values = [v for p in panels for s in p.series for v in s[2] + s[3]]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.plot([lo, hi], [lo, hi], "-", color="black", linewidth=0.8)
        ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15)
        handles = [Line2D([], [], color="none", label=panel.legend)]
        for kernel, label, measured, predicted in panel.series:
            h, = ax.plot(measured, predicted, markers[kernel], color=colors[kernel], markersize=4, alpha=0.75,
                         label=label)
            handles.append(h)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured ms")
        ax.set_ylabel("predicted ms")
        ax.set_title(panel.title, fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(handles=handles, fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def measured_roofline_points(v: Validation, variant: str = "calibrated") -> list:
    """Chart points of the used prefill records (and the SDPA prefill baseline): the model's nominal
    intensity, the measured TOPS (nominal ops / measured time). The best config of each shape and the
    baselines are labelled; the group (the `bound` field) is the kernel and its predicted bound."""
    from .chart import ChartPoint

    result = v.variants[variant]
    points = []
    best: dict = {}
    for i, r in enumerate(v.records):
        if r.kernel == "prefill" and not v.excluded[i]:
            if r.shape not in best or r.measured_ms < v.records[best[r.shape]].measured_ms:
                best[r.shape] = i
    for i, r in enumerate(v.records):
        p = result.predictions[i]
        if v.excluded[i] or p is None or r.kernel not in ("prefill", "sdpa_prefill_fp16"):
            continue
        tops = p.flops / (r.measured_ms * 1e-3) / 1e12
        n = f"{r.shape.seq_len // 1024}k" if r.shape.seq_len % 1024 == 0 else str(r.shape.seq_len)
        if r.kernel == "prefill":
            label = f"{r.model} N={n} best" if best.get(r.shape) == i else ""
            group = f"TurboAttention prefill, predicted {p.bound}-bound"
        else:  # no backend in the record: the records file's header names it
            backend = r.config.get("backend", "") if isinstance(r.config, Mapping) else ""
            name = {"CUDNN_ATTENTION": "cuDNN", "FLASH_ATTENTION": "FA2"}.get(backend, backend)
            label = ""
            group = f"SDPA {name} fp16 prefill".replace("  ", " ")
        points.append(ChartPoint(label, p.intensity, tops, group))
    return points


# ----------------------------------------------------------------------------- the command

def run_validation(gpu: "str | GPUSpec" = "h100", records_paths: Sequence["str | os.PathLike"] | None = None,
                   out_dir: "str | os.PathLike" = "reports/roofline", min_ms: float = DEFAULT_MIN_MS,
                   calibration_directory: "str | os.PathLike | None" = None, heldout: bool = True,
                   draw: bool = True) -> dict:
    """Evaluate, write every output, return {"summary": doc, "paths": {...}}."""
    spec = resolve_gpu(gpu)
    out_dir = Path(out_dir)
    paths_in = [Path(p) for p in (records_paths or default_records_paths(spec, out_dir))]
    records = load_records(paths_in, spec)
    calibration = load_calibration(spec, calibration_directory)
    cal_file = calibration_path(spec, calibration_directory)
    v = evaluate(records, spec, calibration, min_ms=min_ms, heldout=heldout, calibration_file=cal_file.name,
                 records_files=[p.name for p in paths_in])
    key = spec.key
    rows = variant_rows(v)
    paths = {
        "csv": write_csv(out_dir / f"validation-{key}.csv", validation_rows(v), VALIDATION_COLUMNS),
        "variants_csv": write_csv(out_dir / f"validation-{key}-variants.csv", rows, VARIANT_COLUMNS),
    }
    doc = summary(v)
    paths["summary_json"] = out_dir / f"validation-{key}.json"
    paths["summary_json"].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    paths["summary_md"] = out_dir / f"validation-{key}.md"
    paths["summary_md"].write_text(summary_markdown(doc))
    if draw:
        from .chart import draw_roofline, roofline_chart_data

        panels = scatter_panels(rows)
        paths["validation_png"] = draw_validation(
            panels, out_dir / f"validation-{key}.png",
            title=f"roofline model vs measured on {spec.name} ({doc['used']} used records of "
                  f"{', '.join(doc['records_files'])}; band: +-15%)")
        chart = roofline_chart_data(spec, measured_roofline_points(v), calibration=calibration, head_dim=128)
        chart = chart._replace(title=f"{spec.name}: measured prefill configs (intensity from the model), "
                                     f"measured ceilings")
        paths["roofline_png"] = draw_roofline(chart, out_dir / f"roofline-{key}.png")
    return {"summary": doc, "paths": {k: str(p) for k, p in paths.items()}}


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--records", action="append", default=None, metavar="PATH",
                        help="records JSON (repeatable); default: roofline/calibrations/<gpu>.validation.json, plus "
                             "<out>/records-<gpu>.json when it exists")
    parser.add_argument("--out", default="reports/roofline", help="output folder")
    parser.add_argument("--min-ms", type=float, default=DEFAULT_MIN_MS,
                        help="leave out timings below this many ms unless CUDA-graph timed (host overhead)")
    parser.add_argument("--calibration-dir", default=None, help="folder of <gpu>.json (default: the packaged one)")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out fits")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNGs (no matplotlib needed)")
    parser.add_argument("--save-calibration", action="store_true",
                        help="first refit the GPU's saved efficiency factors on these records and save them "
                             "(the measured ceilings stay); the `calibrated` figures are then in-sample")


def validate_command(args: argparse.Namespace) -> int:
    if args.save_calibration:
        spec = resolve_gpu(args.gpu)
        paths = args.records or default_records_paths(spec, Path(args.out))
        print(f"saved {refit_calibration(spec, paths, args.min_ms, args.calibration_dir)}")
    result = run_validation(args.gpu, args.records, args.out, args.min_ms, args.calibration_dir,
                            heldout=not args.no_heldout, draw=not args.no_charts)
    doc = result["summary"]
    print(f"{doc['gpu']}: {doc['records']} records, {doc['used']} used")
    def num(x, spec):
        return "n/a" if x is None else format(x, spec)

    for name, entry in doc["variants"].items():
        o = entry["overall"]
        kernels = ", ".join(f"{k} {num(m['mape_pct'], '.1f')}%/{num(m['spearman'], '.3f')}"
                            for k, m in entry["per_kernel"].items() if k != "sdpa")
        print(f"  {name:<20} MAPE {num(o['mape_pct'], '6.1f')}%  Spearman {num(o['spearman'], '.3f')}  [{kernels}]")
    for line in doc["coverage"]["missing"]:
        print(f"  missing: {line}")
    for k, p in result["paths"].items():
        print(f"  wrote {p}")
    return 0


# ----------------------------------------------------------------------------- measuring (GPU)

# The prefill configs the 2026-11-23 H100 records swept (Br, Bc, warps, stages, SAS), so that new
# records compare with them.
PREFILL_GRID = (
    (64, 128, 4, 3, False), (64, 128, 4, 2, False), (64, 64, 4, 2, False), (64, 64, 4, 3, False),
    (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 2, False), (128, 64, 4, 2, False),
    (128, 32, 8, 2, False), (32, 64, 4, 2, False), (32, 128, 4, 2, False), (64, 128, 4, 1, False),
    (64, 256, 4, 2, False), (128, 128, 4, 2, False), (64, 32, 4, 2, False), (16, 64, 2, 2, False),
    (64, 128, 4, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 2, True), (64, 128, 8, 3, False),
)
QUANTIZE_GRID = ((64, True), (64, False), (128, True), (128, False))  # (block_n, smooth_k)
# decode: (decode_block_n, decode_num_warps, decode_num_stages) x bit_mix, buffer_tokens 64, v_group 32
DECODE_LAUNCH_GRID = ((64, 4, 2), (32, 4, 2), (64, 4, 3), (64, 8, 2), (32, 2, 2))
DECODE_BIT_MIXES = (0.0, 0.5)
DECODE_BUFFER_TOKENS = 64
SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION")
MEASURED_KERNELS = KERNELS


def decode_prompt_tokens(context: int, buffer_tokens: int = DECODE_BUFFER_TOKENS) -> int:
    """Tokens to prefill the cache with so that, after the timed step appends one, the fp16 buffer
    is about half full, as cost.BUFFER_FILL_FRACTION assumes: context - buffer_tokens // 2."""
    return context - buffer_tokens // 2


def measurement_plan(gpu: "str | GPUSpec" = "h100", models: Sequence[str] = SEED_MODELS,
                     kernels: Sequence[str] = MEASURED_KERNELS) -> list[dict]:
    """Records to measure (without "ms"): each model's default_workload shapes (prefill N 1k/4k/16k
    with B = 16384 // N, decode context 4k/32k x batch 1/8, capped at the model's context), the
    kernels' grids above, configs the model finds infeasible left out. A TurboAttention decode
    record's seq_len is the context after the timed step (decode_prompt_tokens + 1)."""
    spec_gpu = resolve_gpu(gpu)
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; choose from {list(KERNELS)}")
    plan = []

    def add(kernel, model, shape, config):
        check = None if kernel.startswith("sdpa_") else config
        if check_feasible(kernel, check, spec_gpu, shape.head_dim)[0]:
            plan.append({"kernel": kernel, "model": model, "shape": dataclasses.asdict(shape), "config": config})

    for model in models:
        workload = default_workload(model)
        m = workload.model
        for point in workload.prefill:
            shape = AttentionShape(point.batch, m.num_q_heads, m.num_kv_heads, point.seq_len, m.head_dim, True)
            if "prefill" in kernels:
                for bm, bn, warps, stages, sas in PREFILL_GRID:
                    add("prefill", m.key, shape, {"block_m": bm, "block_n": bn, "num_warps": warps,
                                                  "num_stages": stages, "use_sas": sas, "sparsity_threshold": None})
            if "quantize" in kernels:
                for bn, smooth in QUANTIZE_GRID:
                    add("quantize", m.key, shape, {"block_n": bn, "smooth_k": smooth})
            if "sdpa_prefill_fp16" in kernels:
                for backend in SDPA_BACKENDS:
                    add("sdpa_prefill_fp16", m.key, shape, {"backend": backend})
        for point in workload.decode:
            if "decode" in kernels:
                shape = AttentionShape(point.batch, m.num_q_heads, m.num_kv_heads,
                                       decode_prompt_tokens(point.seq_len) + 1, m.head_dim, True)
                for bn, warps, stages in DECODE_LAUNCH_GRID:
                    for mix in DECODE_BIT_MIXES:
                        add("decode", m.key, shape, {"decode_block_n": bn, "decode_num_warps": warps,
                                                     "decode_num_stages": stages, "bit_mix": mix,
                                                     "buffer_tokens": DECODE_BUFFER_TOKENS, "v_group": 32,
                                                     "num_splits": None, "smooth_k": True})
            if "sdpa_decode_fp16" in kernels:
                shape = AttentionShape(point.batch, m.num_q_heads, m.num_kv_heads, point.seq_len, m.head_dim, True)
                for backend in SDPA_BACKENDS:
                    add("sdpa_decode_fp16", m.key, shape, {"backend": backend})
    return plan


def _record_key(r: Mapping) -> str:
    return json.dumps([r["kernel"], r["shape"], r.get("config")], sort_keys=True)


def _time_ms(fn, repeats: int, flush, use_graph: bool) -> tuple[float, str]:
    """Median ms of fn() over `repeats` timed runs, L2 flushed before each; with use_graph the
    call is captured once in a CUDA graph and the replays are timed (no host overhead), falling
    back to eager calls between CUDA events when capture fails."""
    import torch

    fn()  # compile / plan outside the timed region
    torch.cuda.synchronize()
    timing = "events"
    run = fn
    if use_graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            run, timing = graph.replay, GRAPH_TIMING
        except Exception as exc:  # capture unsupported by this call: time it eagerly
            torch.cuda.synchronize()
            print(f"    cuda graph capture failed ({type(exc).__name__}: {exc}); timing eager calls", file=sys.stderr)
    times = []
    for _ in range(repeats):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), timing


def _callable_for(item: Mapping, device, dtype):
    """(fn, keepalive) timing one planned record's kernel call on fresh random inputs."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.config import KernelConfig

    s = item["shape"]
    b, hq, hkv, n, d = s["batch"], s["num_q_heads"], s["num_kv_heads"], s["seq_len"], s["head_dim"]
    kernel, config = item["kernel"], item["config"]
    gen = dict(device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    if kernel in ("prefill", "quantize"):
        from kernels.prefill import launch_flashq
        from kernels.quant import quantize_kv_for, quantize_kv_tiles

        q, k, v = (torch.randn(b, h, n, d, **gen) for h in (hq, hkv, hkv))
        if kernel == "quantize":
            return (lambda: quantize_kv_tiles(q, k, v, config["block_n"], scale, config["smooth_k"])), (q, k, v)
        cfg = KernelConfig(**{f: config[f] for f in ("block_m", "block_n", "num_warps", "num_stages", "use_sas",
                                                     "sparsity_threshold", "compute_format") if f in config})
        kv = quantize_kv_for(q, k, v, cfg, scale)
        out = torch.empty_like(q)
        return (lambda: launch_flashq(q, kv, out, True, cfg, scale)), (q, k, v, kv, out)
    if kernel == "sdpa_prefill_fp16":
        q, k, v = (torch.randn(b, h, n, d, **gen) for h in (hq, hkv, hkv))
        backend = getattr(SDPBackend, config["backend"])

        def sdpa_prefill():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return sdpa_prefill, (q, k, v)
    if kernel == "sdpa_decode_fp16":
        q = torch.randn(b, hq, 1, d, **gen)
        k, v = (torch.randn(b, hkv, n, d, **gen) for _ in range(2))
        backend = getattr(SDPBackend, config["backend"])

        def sdpa_decode():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
        return sdpa_decode, (q, k, v)
    # TurboAttention decode: a cache holding n - 1 tokens, one step appending the n-th, replayed
    # without committing it (TurboKVCache._step(commit=False), as the decode benchmark does).
    from kernels.cache import TurboKVCache

    fields = {f: config[f] for f in ("decode_block_n", "decode_num_warps", "decode_num_stages", "bit_mix",
                                     "buffer_tokens", "v_group", "num_splits", "smooth_k")}
    cfg = KernelConfig(**fields)
    cache = TurboKVCache(b, hkv, d, max_len=n + cfg.buffer_tokens, device=device, dtype=dtype, config=cfg)
    k, v = (torch.randn(b, hkv, n - 1, d, **gen) for _ in range(2))
    cache.prefill(k, v)
    q = torch.randn(b, hq, 1, d, **gen)
    k_new, v_new = (torch.randn(b, hkv, 1, d, **gen) for _ in range(2))
    if not hasattr(cache, "_step"):
        raise RuntimeError("kernels.cache.TurboKVCache has no _step(commit=False): cannot replay a decode step")
    return (lambda: cache._step(q, k_new, v_new, commit=False)), (cache, k, v, q, k_new, v_new)


def _write_records(path: Path, doc: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def measure_records(out: "str | os.PathLike | None" = None, gpu: str | None = None,
                    models: Sequence[str] = SEED_MODELS, kernels: Sequence[str] = MEASURED_KERNELS,
                    repeats: int = 20, use_graph: bool = True, device: str = "cuda", limit: int | None = None,
                    time_budget_s: float | None = None) -> list[dict]:
    """Time measurement_plan(...) on a CUDA device and append the records to `out` (default
    reports/roofline/records-<gpu>.json), written after every record; records already in the file
    are skipped, so an interrupted run resumes. Returns the records measured in this call.

    prefill = kernels.prefill.launch_flashq on K/V pre-quantized by kernels.quant.quantize_kv_tiles
    (Q quantized inside; the two halves of kernels.turbo_attention, as the model splits them);
    quantize = quantize_kv_tiles; decode = one kernels.TurboKVCache step; sdpa = torch SDPA with the
    named backend, enable_gqa. fp16 inputs, randn. Median of `repeats` CUDA-graph replays with L2
    flushed before each (eager calls between CUDA events where capture fails; the record says which).
    """
    import time

    import torch

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        raise RuntimeError("measure_records needs a CUDA device")
    from .gpus import detect_gpu

    key = resolve_gpu(gpu).key if gpu else detect_gpu(torch.device(device).index or 0)
    if key is None:
        raise RuntimeError(f"GPU {torch.cuda.get_device_name(device)!r} is not in roofline.GPUS; pass gpu=")
    path = Path(out) if out else Path("reports/roofline") / f"records-{key}.json"
    import triton

    if path.is_file():
        doc = read_records_document(path)
        if doc.get("gpu") and resolve_gpu(doc["gpu"]).key != key:
            raise ValueError(f"{path} holds records of {doc['gpu']!r}, not {key!r}")
    else:
        doc = {"gpu": key, "gpu_name": torch.cuda.get_device_name(device), "date": _dt.date.today().isoformat(),
               "torch": torch.__version__, "triton": triton.__version__,
               "timing": ("median of CUDA-graph replays (record 'timing': cuda_graph) or of eager calls between CUDA "
                          "events ('events'), L2 flushed before each; prefill = kernels.prefill.launch_flashq on "
                          "pre-quantized K/V; quantize = kernels.quant.quantize_kv_tiles; decode = one "
                          "TurboKVCache step (_step, commit=False), buffer half full; sdpa = torch SDPA with the "
                          "named backend, enable_gqa=True"),
               "records": []}
    done = {_record_key(r) for r in doc["records"]}
    plan = [item for item in measurement_plan(key, models, kernels) if _record_key(item) not in done]
    if limit is not None:
        plan = plan[:limit]
    flush_buffer = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    flush = flush_buffer.zero_
    measured = []
    started = time.monotonic()
    for j, item in enumerate(plan):
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            print(f"time budget reached after {j} of {len(plan)} records; rerun to resume", file=sys.stderr)
            break
        try:
            fn, keep = _callable_for(item, device, torch.float16)
            ms, timing = _time_ms(fn, repeats, flush, use_graph)
        except Exception as exc:  # one config failing (resources, backend unavailable) must not stop the run
            print(f"  [{j + 1}/{len(plan)}] {item['kernel']} {item['model']} {item['config']}: "
                  f"failed ({type(exc).__name__}: {exc})", file=sys.stderr)
            torch.cuda.synchronize()
            continue
        record = dict(item, ms=ms, timing=timing)
        doc["records"].append(record)
        measured.append(record)
        _write_records(path, doc)
        print(f"  [{j + 1}/{len(plan)}] {item['kernel']:<18} {item['model']:<10} "
              f"{shape_label(AttentionShape(**item['shape']))} {config_label(item['config'])}: {ms:.4f} ms ({timing})")
        del fn, keep
    torch.cuda.empty_cache()
    left = len(plan) - len(measured)
    print(f"measured {len(measured)} records into {path} ({len(doc['records'])} in the file); "
          f"{left} of this plan not measured{' (failed or out of time: rerun to retry)' if left else ''}")
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roofline.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_validate_arguments(sub.add_parser("report", help="evaluate the records and write the reports "
                                                         "(= python -m roofline validate)"))
    m = sub.add_parser("measure", help="time the measurement plan on a CUDA GPU and append records")
    m.add_argument("--gpu", default=None, help="GPU key (default: the detected one)")
    m.add_argument("--out", default=None, help="records JSON (default reports/roofline/records-<gpu>.json)")
    m.add_argument("--models", default=",".join(SEED_MODELS))
    m.add_argument("--kernels", default=",".join(MEASURED_KERNELS))
    m.add_argument("--repeats", type=int, default=20)
    m.add_argument("--eager", action="store_true", help="time eager calls, no CUDA graphs")
    m.add_argument("--limit", type=int, default=None, help="measure at most this many records")
    m.add_argument("--time-budget", type=float, default=None, help="stop starting records after this many s")
    m.add_argument("--plan", action="store_true", help="print the plan's size per kernel and model; measure nothing")
    args = parser.parse_args(argv)
    if args.command == "report":
        return validate_command(args)
    models = [resolve_model(x).key for x in args.models.split(",") if x]
    kernels = [x for x in args.kernels.split(",") if x]
    if args.plan:
        plan = measurement_plan(args.gpu or "h100", models, kernels)
        counts: dict = {}
        for item in plan:
            counts[(item["kernel"], item["model"])] = counts.get((item["kernel"], item["model"]), 0) + 1
        for (kernel, model), count in sorted(counts.items()):
            print(f"{kernel:<18} {model:<12} {count}")
        print(f"total {len(plan)}")
        return 0
    measure_records(args.out, args.gpu, models, kernels, repeats=args.repeats, use_graph=not args.eager,
                    limit=args.limit, time_budget_s=args.time_budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
