"""roofline.validate: metrics on hand-made data, the held-out split, the CSV, the committed report
(reports/roofline/validation-h100-sxm.*) against a recomputation, and the GPU measuring path's plan."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from roofline import AttentionShape, calibrate, load_calibration, predict
from roofline import validate as V

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "reports" / "roofline"
DESIGN_COLUMNS = ["kernel", "model", "shape", "config", "predicted_ms", "measured_ms", "calibrated", "bound"]


# ----------------------------------------------------------------------------- metrics

def test_mape_known_values():
    assert V.mape([110.0, 90.0], [100.0, 100.0]) == pytest.approx(10.0)
    assert V.mape([1.5, 1.0, 0.5], [1.0, 1.0, 1.0]) == pytest.approx(100.0 / 3)
    assert V.absolute_percentage_errors([3.0], [2.0]) == [pytest.approx(50.0)]
    assert math.isnan(V.mape([], []))
    with pytest.raises(ValueError, match="positive"):
        V.mape([1.0], [0.0])
    with pytest.raises(ValueError, match="length"):
        V.mape([1.0, 2.0], [1.0])


def test_rank_averages_ties():
    assert V.rank([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    assert V.rank([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert V.rank([5, 5, 5]) == [2.0, 2.0, 2.0]
    assert V.rank([]) == []


def test_spearman_known_values():
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    assert V.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # monotone but not linear: a rank correlation of exactly 1, and -1 reversed
    assert V.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert V.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # ties: y ranks (1, 2, 3.5, 5, 3.5) against 1..5: 8 / sqrt(10 * 9.5) (scipy.stats.spearmanr: 0.8207826816681233)
    assert V.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(V.spearman([1, 2, 3], [4, 4, 4]))  # a constant side has no rank order
    assert math.isnan(V.spearman([1], [2]))


def test_spearman_agrees_with_pandas_on_ties():
    pd = pytest.importorskip("pandas")
    rng = random.Random(5)
    for _ in range(20):
        n = rng.randint(3, 40)
        x = [rng.randint(0, 6) for _ in range(n)]  # many ties
        y = [v + rng.randint(-3, 3) for v in x]
        expected = pd.Series(x, dtype=float).corr(pd.Series(y, dtype=float), method="spearman")
        got = V.spearman(x, y)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_metrics_fields():
    m = V.metrics([1.0, 2.2, 2.5], [1.0, 2.0, 3.0])
    assert m["n"] == 3
    assert m["mape_pct"] == pytest.approx((0 + 10 + 100 / 6) / 3)
    assert m["median_ape_pct"] == pytest.approx(10.0)
    assert m["within_15pct"] == pytest.approx(2 / 3)
    assert m["spearman"] == pytest.approx(1.0)
    logs = [0.0, math.log(1.1), math.log(2.5 / 3)]
    assert m["rms_log_error"] == pytest.approx(math.sqrt(sum(v * v for v in logs) / 3))
    assert m["mean_log_ratio"] == pytest.approx(sum(logs) / 3)


# ----------------------------------------------------------------------------- records and splits

LLAMA = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, causal=True)
PREFILL_CONFIGS = [{"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 3},
                   {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
                   {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}]
PLANTED = {"prefill.int8_tc": 0.6}  # the roof that binds from the start; the others stay at 1.0


def _record(i, kernel, shape, config, ms, source="synthetic.json", timing=""):
    return V.Record(i, kernel, V.model_for_shape(shape), shape, config, ms, source, timing)


def _synthetic_prefill(scale_fold1: float = 1.0) -> list:
    """Prefill records over 4 llama3-8b shapes whose times follow the model with PLANTED factors
    (ceilings of the packaged calibration); shapes dealt to fold 1 by the by_shape split are
    `scale_fold1` times slower."""
    base = V.unit_efficiency_calibration(load_calibration("h100", calibrate.PACKAGED_CALIBRATION_DIR), "h100")
    shapes = [AttentionShape(batch=16384 // n, seq_len=n, **LLAMA) for n in (1024, 2048, 4096, 8192)]
    records = []
    for j, shape in enumerate(shapes):  # sorted by N: the by_shape split deals them 0, 1, 0, 1
        for config in PREFILL_CONFIGS:
            ms = predict("prefill", shape, config, "h100", base).retime(PLANTED) * 1e3
            records.append(_record(len(records), "prefill", shape, config, ms * (scale_fold1 if j % 2 else 1.0)))
    return records


def test_model_for_shape_prefers_seed_models():
    assert V.model_for_shape(AttentionShape(1, 32, 8, 64, 128)) == "llama3-8b"  # not mistral-7b (same geometry)
    assert V.model_for_shape(AttentionShape(1, 28, 4, 64, 128)) == "qwen2.5-7b"
    assert V.model_for_shape(AttentionShape(1, 32, 32, 64, 96)) == "phi3-mini"
    assert V.model_for_shape(AttentionShape(1, 6, 2, 64, 64)) == "custom"


def test_heldout_folds():
    records = _synthetic_prefill()
    s = AttentionShape(8, seq_len=2048, **LLAMA)
    records += [_record(len(records) + i, "sdpa_prefill_fp16", AttentionShape(b, seq_len=n, **LLAMA), None, 1.0)
                for i, (b, n) in enumerate(((16, 1024), (8, 2048), (4, 4096)))]
    by_shape = V.heldout_folds(records, "by_shape")
    for shape in {r.shape for r in records}:
        for kernel in ("prefill", "sdpa_prefill_fp16"):
            folds = {f for r, f in zip(records, by_shape) if r.shape == shape and r.kernel == kernel}
            assert len(folds) <= 1  # a shape is never split across the folds of one kernel
    for kernel in ("prefill", "sdpa_prefill_fp16"):
        assert {f for r, f in zip(records, by_shape) if r.kernel == kernel} == {0, 1}
    # by N: 1024 -> 0, 2048 -> 1, 4096 -> 0, 8192 -> 1
    assert [by_shape[i] for i in range(0, 12, 3)] == [0, 1, 0, 1]
    assert {by_shape[i] for i, r in enumerate(records) if r.shape == s and r.kernel == "prefill"} == {1}
    alternating = V.heldout_folds(records, "alternating")
    assert alternating[:12] == [0, 1] * 6  # every other record of a kernel, in file order
    assert alternating[12:] == [0, 1, 0]  # counted per kernel
    with pytest.raises(ValueError, match="split"):
        V.heldout_folds(records, "random")


def test_heldout_prediction_uses_only_the_other_fold():
    cal = load_calibration("h100", calibrate.PACKAGED_CALIBRATION_DIR)
    # consistent data: every fit recovers the planted factors, held-out errors vanish
    v = V.evaluate(_synthetic_prefill(), "h100", cal)
    for name in ("refit", "heldout_by_shape", "heldout_alternating"):
        result = v.variants[name]
        for r, p in zip(v.records, result.predictions):
            assert p.time_ms == pytest.approx(r.measured_ms, rel=2e-3), name
    assert not any(v.variants["heldout_by_shape"].in_fit) and all(v.variants["refit"].in_fit)
    # fold 1's shapes twice as slow: each fold is predicted from the other's fit only, so fold 0
    # comes out ~2x slow and fold 1 ~2x fast (not exactly: only the binding roof's factor is fitted,
    # the partly overlapped other roofs and the launch overhead do not scale); an in-sample fit
    # would split the difference (~1.4x either way)
    v = V.evaluate(_synthetic_prefill(scale_fold1=2.0), "h100", cal)
    result = v.variants["heldout_by_shape"]
    for r, p, fold in zip(v.records, result.predictions, result.folds):
        ratio = p.time_ms / r.measured_ms
        assert (1.75 < ratio < 2.05) if fold == 0 else (0.48 < ratio < 0.57), (fold, ratio)
    assert len(result.fits) == 2 and all(f.records == 6 for f in result.fits)


def test_exclusions():
    shape = AttentionShape(4, seq_len=4096, **LLAMA)
    ok = _record(0, "prefill", shape, PREFILL_CONFIGS[0], 1.0)
    assert V.exclusion(ok, "h100") == ""
    fast = _record(1, "sdpa_decode_fp16", shape, {"backend": "CUDNN_ATTENTION"}, 0.05)
    assert "0.1 ms" in V.exclusion(fast, "h100")
    assert V.exclusion(dataclasses.replace(fast, timing=V.GRAPH_TIMING), "h100") == ""  # no host overhead
    spills = _record(2, "prefill", shape, {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 2}, 2.0)
    assert V.exclusion(spills, "h100").startswith("infeasible")
    assert V.prediction_config(fast) is None and V.prediction_config(ok) == PREFILL_CONFIGS[0]


def test_coverage_names_what_is_missing():
    records = _synthetic_prefill()
    cov = V.coverage(records, [""] * len(records))
    assert not cov["complete"]
    missing = "\n".join(cov["missing"])
    assert "qwen2.5-7b: no used records" in missing and "phi3-mini: no used records" in missing
    assert "llama3-8b: no TurboAttention decode records" in missing
    assert f"only 12 prefill/decode configs over the seed models (target {V.TARGET_SEED_CONFIGS})" in missing
    assert cov["per_model"]["llama3-8b"]["prefill"]["seq_lens"] == [1024, 2048, 4096, 8192]


# ----------------------------------------------------------------------------- outputs

def _write_records(path: Path, records) -> Path:
    doc = {"gpu": "h100-sxm", "records": [{"kernel": r.kernel, "shape": dataclasses.asdict(r.shape),
                                           "config": r.config, "ms": r.measured_ms} for r in records]}
    path.write_text(json.dumps(doc))
    return path


def test_run_validation_writes_design_columns(tmp_path):
    records = _synthetic_prefill()
    shape = AttentionShape(4, seq_len=4096, **LLAMA)
    records.append(_record(len(records), "prefill", shape, {"block_m": 128, "block_n": 128, "num_warps": 4,
                                                            "num_stages": 2}, 2.0))  # infeasible by the model
    records.append(_record(len(records), "sdpa_decode_fp16", shape, {"backend": "FLASH_ATTENTION"}, 0.05))
    path = _write_records(tmp_path / "records.json", records)
    result = V.run_validation("h100", [path], tmp_path / "out", draw=True,
                              calibration_directory=calibrate.PACKAGED_CALIBRATION_DIR)
    paths = {k: Path(p) for k, p in result["paths"].items()}
    rows = V.read_csv(paths["csv"])
    assert list(rows[0])[:len(DESIGN_COLUMNS)] == DESIGN_COLUMNS and "ape" in rows[0]
    assert len(rows) == 2 * len(records)  # one row per (record, calibrated)
    assert sorted({(r["record"], r["calibrated"]) for r in rows}) == sorted(
        {(str(i), c) for i in range(len(records)) for c in ("true", "false")})
    for r in rows:
        assert r["calibrated"] in ("true", "false")
        if r["predicted_ms"]:
            p, m = float(r["predicted_ms"]), float(r["measured_ms"])
            assert float(r["ape"]) == pytest.approx(100 * abs(p - m) / m, rel=1e-4, abs=1e-3)  # 6 digits
            assert r["bound"] in ("memory", "int8_tc", "fp16_tc", "sfu_fma")
    infeasible = [r for r in rows if r["record"] == str(len(records) - 2)]
    assert all(r["predicted_ms"] == "" and r["used"] == "false" and r["excluded"].startswith("infeasible")
               for r in infeasible)
    fast = [r for r in rows if r["record"] == str(len(records) - 1)]
    assert all(r["predicted_ms"] != "" and r["used"] == "false" for r in fast)
    variants = V.read_csv(paths["variants_csv"])
    assert len(variants) == len(V.VARIANTS) * len(records)
    doc = json.loads(paths["summary_json"].read_text())
    assert doc["used"] == len(records) - 2 and doc["excluded"] == {"infeasible": 1, "below_min_ms": 1}
    assert doc["variants"]["heldout_by_shape"]["overall"]["mape_pct"] < 1.0
    assert "Missing for the issue's target" in paths["summary_md"].read_text()
    for key in ("validation_png", "roofline_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_validate(tmp_path, capsys):
    from roofline.__main__ import main

    path = _write_records(tmp_path / "records.json", _synthetic_prefill()[:6])
    assert main(["validate", "--gpu", "h100", "--records", str(path), "--out", str(tmp_path), "--no-charts",
                 "--no-heldout"]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and (tmp_path / "validation-h100-sxm.csv").is_file()
    assert not (tmp_path / "validation-h100-sxm.png").exists()


def _committed(name: str) -> Path:
    path = REPORT / name
    if not path.is_file():
        pytest.skip(f"{path} not committed")
    return path


def test_committed_summary_matches_the_committed_csv():
    doc = json.loads(_committed("validation-h100-sxm.json").read_text())
    rows = V.read_csv(_committed("validation-h100-sxm.csv"))
    variant_rows = V.read_csv(_committed("validation-h100-sxm-variants.csv"))
    assert list(rows[0])[:len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    assert len(rows) == 2 * doc["records"] and len(variant_rows) == len(doc["variants"]) * doc["records"]
    for calibrated, name in (("false", "datasheet"), ("true", "calibrated")):
        mine = [r for r in rows if r["calibrated"] == calibrated]
        used = [r for r in mine if r["used"] == "true"]
        assert len(used) == doc["used"] == doc["variants"][name]["overall"]["n"]
        # independent of summarize_rows: the mean of the ape column and pandas' Spearman
        mape = sum(float(r["ape"]) for r in used) / len(used)
        assert mape == pytest.approx(doc["variants"][name]["overall"]["mape_pct"], rel=1e-4)
        pd = pytest.importorskip("pandas")
        rho = pd.Series([float(r["predicted_ms"]) for r in used]).corr(
            pd.Series([float(r["measured_ms"]) for r in used]), method="spearman")
        assert rho == pytest.approx(doc["variants"][name]["overall"]["spearman"], abs=1e-4)
    for name, entry in doc["variants"].items():
        again = V._json_safe(V.summarize_rows([r for r in variant_rows if r["variant"] == name]))
        for key in ("overall", "per_kernel", "prefill_per_shape"):
            assert _close(again[key], entry[key]), (name, key)
    targets = doc["targets"]["after, in-sample (calibrated)"]
    assert targets["mape_met"] == (targets["mape_pct"] <= V.TARGET_MAPE_PCT)
    assert targets["spearman_met"] == (targets["spearman"] >= V.TARGET_SPEARMAN)


def _close(a, b) -> bool:
    """Nested dicts equal, numbers within 1e-4 relative (the CSV holds 6 significant digits)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    return a == b


def test_committed_csv_matches_the_current_model():
    """The committed predictions are what the model in this tree predicts (else rerun
    `python -m roofline validate --gpu h100` and commit reports/roofline)."""
    doc = json.loads(_committed("validation-h100-sxm.json").read_text())
    rows = V.read_csv(_committed("validation-h100-sxm.csv"))
    paths = [calibrate.PACKAGED_CALIBRATION_DIR / name if name.endswith(".validation.json") else REPORT / name
             for name in doc["records_files"]]
    records = V.load_records(paths, "h100")
    cal = load_calibration("h100", calibrate.PACKAGED_CALIBRATION_DIR)
    v = V.evaluate(records, "h100", cal, min_ms=doc["min_ms"], heldout=False)
    fresh = {(str(r["record"]), r["calibrated"]): r for r in V.validation_rows(v)}
    assert len(fresh) == len(rows)
    for r in rows:
        f = fresh[(r["record"], r["calibrated"])]
        assert (f["kernel"], f["shape"], f["config"], f["used"], f["bound"]) == (
            r["kernel"], r["shape"], r["config"], r["used"], r["bound"]), "rerun python -m roofline validate"
        if r["predicted_ms"]:
            assert float(f["predicted_ms"]) == pytest.approx(float(r["predicted_ms"]), rel=1e-5), \
                "the model changed: rerun python -m roofline validate --gpu h100 and commit reports/roofline"


def test_committed_calibration_figures_are_flagged_in_sample():
    doc = json.loads(_committed("validation-h100-sxm.json").read_text())
    if "h100-sxm.validation.json" not in doc["records_files"]:
        pytest.skip("the committed report does not use the calibration's own records")
    assert doc["variants"]["calibrated"]["records_in_its_fit"] > 0
    assert doc["variants"]["heldout_by_shape"]["records_in_its_fit"] == 0
    assert doc["variants"]["naive"]["records_in_its_fit"] == 0


# ----------------------------------------------------------------------------- measuring

def test_measurement_plan_covers_the_issue_target():
    plan = V.measurement_plan("h100")
    by = {}
    for item in plan:
        by.setdefault((item["kernel"], item["model"]), []).append(item)
        shape = AttentionShape(**item["shape"])
        config = None if item["kernel"].startswith("sdpa_") else item["config"]
        assert predict(item["kernel"], shape, config, "h100").time_ms > 0  # feasible and predictable
    for model in V.SEED_MODELS:
        assert by[("decode", model)] and by[("sdpa_decode_fp16", model)]
        assert len({i["shape"]["seq_len"] for i in by[("prefill", model)]}) >= 2
    seed_configs = sum(len(by[(k, m)]) for k in ("prefill", "decode") for m in V.SEED_MODELS)
    assert seed_configs >= V.TARGET_SEED_CONFIGS
    assert len({V._record_key(i) for i in plan}) == len(plan)
    # the decode step leaves the fp16 buffer half full and does not flush
    for item in by[("decode", "llama3-8b")]:
        assert item["shape"]["seq_len"] % item["config"]["buffer_tokens"] == item["config"]["buffer_tokens"] // 2 + 1
    with pytest.raises(ValueError, match="unknown kernel"):
        V.measurement_plan("h100", kernels=("attention",))


def test_measure_records_needs_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA"):
        V.measure_records(tmp_path / "r.json")


@pytest.mark.parametrize("kernel", ["quantize", "prefill", "decode"])
def test_measured_callables_run(kernel, device):
    """The calls measure_records times, on a tiny shape (Triton's interpreter without CUDA)."""
    torch = pytest.importorskip("torch")
    shape = dict(batch=1, num_q_heads=4, num_kv_heads=2, head_dim=64, causal=True)
    config = {"quantize": {"block_n": 32, "smooth_k": True},
              "prefill": {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2, "use_sas": False,
                          "sparsity_threshold": None},
              "decode": {"decode_block_n": 32, "decode_num_warps": 4, "decode_num_stages": 2, "bit_mix": 0.5,
                         "buffer_tokens": 64, "v_group": 32, "num_splits": None, "smooth_k": True}}[kernel]
    seq_len = 64 + 32 + 1 if kernel == "decode" else 32
    item = {"kernel": kernel, "shape": dict(shape, seq_len=seq_len), "config": config}
    fn, _keep = V._callable_for(item, device, torch.float16)
    out = fn()
    if kernel == "quantize":
        assert out.k_codes.dtype == torch.int8
    else:
        assert out.shape == (1, 4, 1 if kernel == "decode" else seq_len, 64) and torch.isfinite(out.float()).all()
