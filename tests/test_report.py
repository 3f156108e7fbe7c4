"""The tuning report (autotune/report.py) on CPU: each figure's data on small synthetic studies, then
the whole page written to disk and rendered in headless Chromium (no broken image, no script error,
no console message, not blank)."""

import math
import os
import pathlib
import re
import shutil
import subprocess

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from autotune import report as R
from autotune.objective import PredictTimer
from kernels.config import KernelConfig

GPU = "h100-sxm"
GEOMETRY = {"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
WORKLOAD = [["prefill", 1024, 16, 0.5], ["prefill", 4096, 4, 0.5], ["decode", 4096, 8, 1.0]]
LARGEST_PREFILL = "prefill_4096x4"
# live studies "measure" each point at this multiple of the roofline prediction, so the
# predicted-against-measured error is known exactly: |p - 1.25 p| / 1.25 p = 20%
LIVE_FACTOR = 1.25
PARAMS = {"block_m": (32, 64, 128), "block_n": (32, 64, 128), "num_warps": (2, 4, 8), "bit_mix": (0.0, 0.25, 0.5)}
CONFIGS = [  # trial 0 is the default config, as the warm start enqueues it
    {}, {"block_m": 128, "num_warps": 8}, {"block_n": 64}, {"block_m": 32, "num_warps": 2}, {"bit_mix": 0.25},
    {"block_m": 128, "block_n": 64, "num_warps": 8}, {"block_n": 32, "bit_mix": 0.5}, {"num_warps": 8},
    {"block_m": 32, "block_n": 64}, {"bit_mix": 0.5, "num_warps": 8, "block_n": 64},
]
SAMPLE = {"sm_clock_mhz": 1980, "mem_clock_mhz": 2619, "power_w": 610.0, "temperature_c": 61, "throttle_reasons": [],
          "throttled": False}


def workload():
    from autotune.objective import Point, Workload

    return Workload("llama3-8b", 32, 8, 128, tuple(Point(k, n, b, w) for k, n, b, w in WORKLOAD))


def make_study(mode="predict", objectives=1, configs=CONFIGS, storage=None, name="synthetic"):
    """A study as the tuner leaves it: study attrs, complete trials with the objective's user attrs,
    one over the error budget (the fastest of all), one failed and one pruned trial."""
    study = optuna.create_study(directions=["minimize"] * objectives, storage=storage, study_name=name)
    study.set_user_attr("gpu", GPU)
    study.set_user_attr("model", "llama3-8b")
    study.set_user_attr("mode", mode)
    study.set_user_attr("workload", WORKLOAD)
    study.set_user_attr("geometry", GEOMETRY)
    wl, timer = workload(), PredictTimer(GPU)
    dists = {k: CategoricalDistribution(v) for k, v in PARAMS.items()}
    default = KernelConfig()
    for i, changes in enumerate(configs):
        config = default.replace(**changes)
        params = {k: getattr(config, k) for k in PARAMS}
        per_point = {R.point_key(p): timer.point_ms(config, wl, p) * (LIVE_FACTOR if mode == "live" else 1.0)
                     for p in wl.points}
        ms = sum(p.weight * per_point[R.point_key(p)] for p in wl.points)
        prefill_error = 2e-4 + 1e-5 * i
        kv_error = 0.01 + 0.02 * config.bit_mix
        compression = 3.5 + 2 * config.bit_mix
        attrs = {"config": config.to_dict(), "prefill_error": prefill_error, "kv_error": kv_error,
                 "prefill_sqnr_db": 30.0 - i * 0.1, "kv_compression": compression,
                 "constraint": [prefill_error - 1e-3, kv_error - 3e-2], "per_point_ms": per_point,
                 "source": "measured" if mode == "live" else "predicted"}
        if mode == "live":
            attrs["telemetry"] = {"before": dict(SAMPLE), "after": dict(SAMPLE, power_w=650.0 + i,
                                                                        throttled=i == 3)}
            attrs["throttled"] = i == 3
        values = [ms] if objectives == 1 else [ms, max(prefill_error, kv_error), 1 / compression]
        study.add_trial(create_trial(params=params, distributions=dists, values=values, user_attrs=attrs))
    # over the error budget, and faster than every feasible trial: never the winner
    bad = default.replace(block_m=128, block_n=128, num_warps=8)
    bad_ms = {R.point_key(p): timer.point_ms(bad, wl, p) * (LIVE_FACTOR if mode == "live" else 1.0)
              for p in wl.points}
    study.add_trial(create_trial(
        params={k: getattr(bad, k) for k in PARAMS}, distributions=dists, values=[1e-3] * objectives,
        user_attrs={"config": bad.to_dict(), "prefill_error": 0.05, "kv_error": 0.01, "prefill_sqnr_db": 10.0,
                    "kv_compression": 3.5, "constraint": [0.049, -0.02], "per_point_ms": bad_ms,
                    "source": "measured" if mode == "live" else "predicted"}))
    study.add_trial(create_trial(params={"block_m": 64, "block_n": 128, "num_warps": 4, "bit_mix": 0.0},
                                 distributions=dists, state=TrialState.FAIL,
                                 user_attrs={"config": default.to_dict(), "failure": "OutOfResources: shared memory"}))
    study.add_trial(create_trial(params={"block_m": 128, "block_n": 128, "num_warps": 2, "bit_mix": 0.0},
                                 distributions=dists, state=TrialState.PRUNED,
                                 user_attrs={"pruned_reason": "registers per thread over 255"}))
    return study


def best_number(study):
    from autotune.export import best_trial

    return best_trial(study).number


# ----------------------------------------------------------------------------- data

def test_history_marks_every_trial_and_tracks_the_best_feasible():
    study = make_study()
    h = R.history_data(study.trials)
    n = len(CONFIGS)
    assert h.numbers == list(range(n + 3))
    assert h.status == ["feasible"] * n + ["infeasible", "failed", "pruned"]
    feasible = [t.values[0] for t in study.trials[:n]]
    assert h.best_so_far[:n] == [min(feasible[:i + 1]) for i in range(n)]
    # the infeasible trial is the fastest of all but does not move the best
    assert h.best_so_far[n:] == [min(feasible)] * 3
    assert math.isnan(h.values[n]) and h.infeasible_values[n] == 1e-3 < min(feasible)
    assert R.history_data([]) == R.HistoryData([], [], [], [], [])


def test_roofline_places_each_timed_trial_at_the_largest_prefill_point():
    from roofline import AttentionShape, predict

    study = make_study()
    cal = R._calibration(GPU)
    data = R.roofline_data(study.trials, workload(), GPU, cal, winner=best_number(study))
    assert data.point == LARGEST_PREFILL
    # complete trials only (the failed and the pruned trial have no time)
    assert [p.trial for p in data.trials] == list(range(len(CONFIGS) + 1))
    shape = AttentionShape(4, 32, 8, 4096, 128)
    t = study.trials[1]
    config = KernelConfig.from_dict(t.user_attrs["config"])
    pre, quant = predict("prefill", shape, config, GPU, cal), predict("quantize", shape, config, GPU, cal)
    p = data.trials[1]
    assert p.intensity == pytest.approx(pre.flops / (pre.bytes + quant.bytes))
    assert p.achieved_tops == pytest.approx(pre.flops / (t.user_attrs["per_point_ms"][LARGEST_PREFILL] * 1e-3) / 1e12)
    assert p.time_source == "predicted" and p.feasible
    assert not data.trials[-1].feasible  # over the error budget
    assert data.winner.trial == best_number(study)
    sdpa = predict("sdpa_prefill_fp16", shape, None, GPU, cal)
    assert data.baseline.time_source == "predicted" and data.baseline.achieved_tops == pytest.approx(sdpa.achieved_tops)
    lo, hi = data.chart.x_range
    assert all(lo <= q.intensity <= hi for q in data.trials)
    assert {r.name for r in data.chart.roofs} >= {"memory", "INT8 tensor core", "FP16 tensor core"}
    # a measured SDPA time replaces the prediction
    measured = R.roofline_data(study.trials, workload(), GPU, cal, baseline_ms=2 * sdpa.time_ms)
    assert measured.baseline.time_source == "measured"
    assert measured.baseline.achieved_tops == pytest.approx(sdpa.achieved_tops / 2)
    assert measured.winner is None


def test_roofline_of_a_decode_only_workload_uses_the_decode_kernels():
    from autotune.objective import Point, Workload

    wl = Workload("llama3-8b", 32, 8, 128, (Point("decode", 4096, 1, 0.5), Point("decode", 32768, 8, 0.5)))
    config = KernelConfig()
    ms = PredictTimer(GPU).point_ms(config, wl, wl.points[1])
    trial = create_trial(value=ms, user_attrs={"config": config.to_dict(), "constraint": [-1, -1],
                                               "per_point_ms": {"decode_32768x8": ms}})
    data = R.roofline_data([trial], wl, GPU, R._calibration(GPU))
    assert data.point == "decode_32768x8" and len(data.trials) == 1
    assert data.trials[0].achieved_tops == pytest.approx(4 * 8 * 32 * 32768 * 128 / (ms * 1e-3) / 1e12)


def test_importances_need_enough_trials():
    few = make_study(configs=CONFIGS[:3])
    data = R.importance_data(few)
    assert data.names == () and "too few" in data.note
    data = R.importance_data(make_study())
    assert data.names and set(data.names) <= set(PARAMS)
    assert sum(data.values) == pytest.approx(1.0)
    assert list(data.values) == sorted(data.values, reverse=True)


def test_pareto_front_of_three_objectives():
    assert R.pareto_front([(1, 1, 1), (2, 2, 2), (0.5, 3, 1), (1, 1, 1)]) == [True, False, True, True]
    assert R.pareto_data(make_study()) is None
    study = make_study(objectives=3)
    data = R.pareto_data(study)
    n = len(CONFIGS)
    assert data.numbers == tuple(range(n)) and data.infeasible == 1
    values = [tuple(t.values) for t in study.trials[:n]]
    for i, on_front in enumerate(data.front):
        dominated = any(all(b <= a for a, b in zip(values[i], v)) and values[i] != v for v in values)
        assert on_front == (not dominated)
    assert any(data.front) and data.kv_bytes[4] == pytest.approx(1 / 4.0)  # bit_mix 0.25


def test_predicted_against_measured_for_live_runs_only():
    cal = R._calibration(GPU)
    assert R.prediction_data(make_study().trials, workload(), GPU, cal) is None
    data = R.prediction_data(make_study(mode="live").trials, workload(), GPU, cal)
    # every (complete trial, point) pair; the failed and the pruned trial have no measurement
    assert len(data.rows) == (len(CONFIGS) + 1) * len(WORKLOAD) and data.skipped == 0
    assert sorted({r.trial for r in data.rows}) == list(range(len(CONFIGS) + 1))
    for r in data.rows:
        assert r.measured_ms == pytest.approx(r.predicted_ms * LIVE_FACTOR)
    assert set(data.mape_by_point) == {R.point_key(p) for p in workload().points}
    assert data.mape_pct == pytest.approx(20.0)
    assert all(v == pytest.approx(20.0) for v in data.mape_by_point.values())


def test_summary_from_the_run_rows():
    study = make_study()
    rows = [{"point": "prefill_1024x16", "weight": 0.5, "winner_ms": 1.0, "default_ms": 1.5, "sdpa_ms": 2.0},
            {"point": "decode_4096x8", "weight": 1.0, "winner_ms": 0.1, "default_ms": math.nan, "sdpa_ms": 0.3}]
    s = R.summary_data(study, workload(), GPU, rows)
    assert s.winner == best_number(study) and s.origin == "this run (cli)"
    first, second, total = s.rows
    assert first.speedup_vs_default == pytest.approx(1.5) and first.speedup_vs_sdpa == pytest.approx(2.0)
    assert math.isnan(second.speedup_vs_default) and second.speedup_vs_sdpa == pytest.approx(3.0)
    assert total.point == "total" and total.winner_ms == pytest.approx(0.6) and total.sdpa_ms == pytest.approx(1.3)
    best = study.trials[s.winner]
    assert s.accuracy["cosine"] == pytest.approx(1 - best.user_attrs["prefill_error"])
    assert s.accuracy["sqnr_db"] == best.user_attrs["prefill_sqnr_db"]
    assert s.accuracy["prefill_budget"] == pytest.approx(1e-3) and s.accuracy["kv_budget"] == pytest.approx(3e-2)
    assert s.accuracy["kv_compression"] == best.user_attrs["kv_compression"]
    assert s.changed == {k: v for k, v in s.config.items() if KernelConfig().to_dict()[k] != v}


def test_summary_recomputed_from_storage():
    wl = workload()
    predicted = R.summary_data(make_study(), wl, GPU)
    assert predicted.origin.startswith("recomputed") and predicted.time_source == "predicted"
    timer = PredictTimer(GPU)
    for row, p in zip(predicted.rows, wl.points):
        assert row.point == R.point_key(p)
        assert row.default_ms == pytest.approx(timer.point_ms(KernelConfig(), wl, p))  # trial 0 ran it
        assert row.sdpa_ms == pytest.approx(timer.baseline_ms(wl, p))
    live = R.summary_data(make_study(mode="live"), wl, GPU)
    assert live.time_source == "measured"
    assert all(math.isnan(r.sdpa_ms) for r in live.rows)  # SDPA needs the GPU
    assert live.rows[0].default_ms == pytest.approx(timer.point_ms(KernelConfig(), wl, wl.points[0]) * LIVE_FACTOR)
    empty = optuna.create_study()
    assert R.summary_data(empty, None, GPU).winner is None


def test_summary_rows_of_the_run_survive_in_the_study(tmp_path):
    study = make_study(mode="live")
    rows = [{"point": R.point_key(p), "weight": p.weight, "winner_ms": 1.0, "default_ms": 2.0, "sdpa_ms": 4.0}
            for p in workload().points]
    rows[1]["sdpa_ms"] = math.nan
    R.write_report(study, tmp_path / "a", storage_url="sqlite:///x.db", command="python -m autotune", summary_rows=rows)
    again = R.summary_data(study, workload(), GPU)
    assert again.origin == "saved by the tuning run"
    assert again.rows[0].sdpa_ms == 4.0 and math.isnan(again.rows[1].sdpa_ms)  # NaN survives as null
    assert again.rows[0].speedup_vs_sdpa == pytest.approx(4.0)


def test_telemetry_summary_of_live_trials():
    assert R.telemetry_data(make_study().trials) is None
    data = R.telemetry_data(make_study(mode="live").trials)
    assert data.trials_sampled == len(CONFIGS) and data.samples == 2 * len(CONFIGS) and data.trials_throttled == 1
    assert data.summary["sm_clock_mhz"]["median"] == 1980
    assert data.summary["throttled_share"] == pytest.approx(1 / (2 * len(CONFIGS)))
    assert data.summary["power_w"]["max"] == 650.0 + len(CONFIGS) - 1


def test_provenance_masks_credentials_and_names_the_toolchain():
    study = make_study()
    prov = R.provenance_data(study, "postgresql://tuner:hunter2@db.example/studies",
                             "python -m autotune --storage postgresql://tuner:hunter2@db.example/studies")
    text = dict(prov.items)
    assert prov.predicted
    assert "hunter2" not in str(prov.items) and "tuner:***@" in text["storage"]
    for tool in ("torch", "triton", "python", "optuna"):
        assert tool in text["toolchain"]
    assert text["mode"].startswith("predict") and text["GPU"].startswith(GPU)
    assert "13 (" in text["trials"] and "1 pruned" in text["trials"] and "1 failed" in text["trials"]
    assert not R.provenance_data(make_study(mode="live"), None, "").predicted


# ----------------------------------------------------------------------------- the page in a browser

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


def render(page: pathlib.Path, tmp_path: pathlib.Path):
    """(DOM after the load event, console lines, screenshot path) of `page` in headless Chromium."""
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
           "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, LANG="C.UTF-8"))
    assert out.returncode == 0, out.stderr[-2000:]
    # Chromium logs every console message of the page as ...:CONSOLE(line)] "text", source: URL
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    return out.stdout, console, shot


def assert_not_blank(shot: pathlib.Path, expect_banner: bool):
    import matplotlib.image as mpimg
    import numpy as np

    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    # a rendered report is ~87% background; an empty or unstyled error page is ~100% one colour
    assert counts.max() / len(pixels) < 0.97 and len(colors) > 100, (counts.max() / len(pixels), len(colors))
    # the predicted-times banner's amber background (#fde68a) is on screen exactly when expected
    banner = np.all(pixels == (0xfd, 0xe6, 0x8a), axis=1).sum()
    assert (banner > 2000) == expect_banner, banner


@pytest.mark.parametrize("mode,objectives,figures", [
    ("predict", 1, {"roofline.png", "history.png", "importance.png"}),
    ("live", 3, {"roofline.png", "history.png", "importance.png", "pareto.png", "predicted_vs_measured.png"}),
])
def test_report_renders_in_a_headless_browser(tmp_path, mode, objectives, figures):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it in .ci/run; here: apt-get install chromium)")
    study = make_study(mode=mode, objectives=objectives)
    rows = None
    if mode == "live":
        rows = [{"point": R.point_key(p), "weight": p.weight, "winner_ms": 1.0, "default_ms": 1.2, "sdpa_ms": 1.5}
                for p in workload().points]
    page = R.write_report(study, tmp_path / "report", storage_url="postgresql://u:hunter2@h/db",
                          command="python -m autotune --gpu h100", summary_rows=rows)
    assert page == tmp_path / "report" / "index.html"
    source = page.read_text()
    assert {p.name for p in page.parent.glob("*.png")} == figures
    assert set(re.findall(r'<img src="([^"]+)"', source)) == figures
    assert not re.search(r'(src|href)="(https?:)?//', source), "the page must open with no network"
    assert "hunter2" not in source
    assert ("id='predicted-banner'" in source) == (mode == "predict")
    dom, console, shot = render(page, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="ok"' in body, body  # set by the page's script once every image decoded
    assert f'data-image-count="{len(figures)}"' in body, body
    assert 'data-errors=""' in body, body
    assert console == [], console
    assert 'class="missing-figure"' not in dom
    assert_not_blank(shot, expect_banner=mode == "predict")


def test_browser_check_catches_a_broken_image(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it in .ci/run; here: apt-get install chromium)")
    page = R.write_report(make_study(configs=CONFIGS[:2]), tmp_path / "report")
    (page.parent / "history.png").unlink()
    page.write_text(page.read_text().replace("</body>", "<script>console.log('noise')</script></body>"))
    dom, console, _ = render(page, tmp_path)
    assert 'data-images="broken: history.png"' in dom
    assert '<p class="missing-figure">figure missing: history.png</p>' in dom
    assert len(console) == 1 and "noise" in console[0]


# ----------------------------------------------------------------------------- regeneration

def test_report_command_regenerates_from_storage(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_study(storage=url, name="h100-sxm-llama3-8b-latency")
    out = tmp_path / "again"
    assert R.main(["--storage", url, "--study-name", "h100-sxm-llama3-8b-latency", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "saved by the tuning run" not in page and "recomputed from the study" in page
    assert "Predicted, not measured" in page and "python -m autotune report" in page
    assert (out / "roofline.png").exists() and (out / "history.png").exists()
    assert R.main(["--storage", url, "--study-name", "nope", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_study_without_trials_still_gets_a_page(tmp_path):
    study = optuna.create_study()
    for key, value in (("gpu", GPU), ("model", "llama3-8b"), ("mode", "predict"), ("workload", WORKLOAD),
                       ("geometry", GEOMETRY)):
        study.set_user_attr(key, value)
    page = R.write_report(study, tmp_path)
    text = page.read_text()
    assert "No feasible trial yet" in text and "too few completed trials" in text
    assert (tmp_path / "history.png").exists() and not (tmp_path / "importance.png").exists()
