"""The tuner on CPU: predict mode end to end, resume, errors, export -> loader, objective logic."""

import json
import math
import subprocess
import sys
import warnings

import optuna
import pytest

from autotune import export, objective as O, space
from kernels import loader
from kernels.config import KernelConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SMALL_WORKLOAD = "prefill=1024,4096;decode=4096x1"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "autotune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture
def tmp_config_dir(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    monkeypatch.setenv(loader.ENV_DIR, str(folder))
    monkeypatch.setattr(loader, "PACKAGED_DIR", tmp_path / "empty")
    loader._said.clear()
    loader._read.cache_clear()
    return folder


def test_cli_predict_end_to_end_and_resume(tmp_path):
    db = tmp_path / "s.db"
    common = ["--gpu", "a100", "--model", "phi3", "--storage", f"sqlite:///{db}", "--workload", SMALL_WORKLOAD,
              "--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "report")]
    first = run_cli(*common, "--trials", "8")
    assert first.returncode == 0, first.stderr
    assert "mode=predict" in first.stdout and "roofline" in first.stdout
    doc = json.loads((tmp_path / "out" / "a100-sxm-80gb--phi3-mini.json").read_text())
    loader.validate_document(doc)
    assert doc["source"] == "predicted" and doc["model"] == "phi3-mini"
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "history.png").exists()
    second = run_cli(*common, "--trials", "3")
    assert second.returncode == 0, second.stderr
    assert "resuming: " in second.stdout
    study = optuna.load_study(study_name="a100-sxm-80gb-phi3-mini-latency", storage=f"sqlite:///{db}")
    # 8 + 3 trials run; the warm-start queue is consumed by the first run's trials
    assert len(study.trials) == 11


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "tpu-v9"], "a100"),
    (["--model", "gpt-17"], "llama3-8b"),
    (["--storage", "redis://x"], "unsupported URL"),
    (["--storage", "postgresql://u:hunter2@127.0.0.1:1/db"], "cannot open"),
])
def test_cli_bad_arguments_give_one_line_errors(args, needle, tmp_path):
    base = {"--gpu": "a100", "--model": "phi3", "--storage": f"sqlite:///{tmp_path}/x.db"}
    argv = []
    for key, value in base.items():
        argv += [key, args[args.index(key) + 1] if key in args else value]
    out = run_cli(*argv, "--trials", "1", "--no-export", "--no-report")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert needle in lines[0]
    assert "hunter2" not in out.stderr


def test_help_explains_the_tool():
    out = run_cli("--help")
    assert out.returncode == 0 and "--gpu" in out.stdout and "resumes" in out.stdout


def _doc(gpu="h100-sxm", model="llama3-8b", schema=1, triton_version="3.6.0", block_m=64, q_split=False,
         max_registers=None):
    wl = O.Workload("llama3-8b", 32, 8, 128, (O.Point("prefill", 4096, 4, 1.0), O.Point("decode", 32768, 8, 1.0)))
    doc = export.build_document(KernelConfig(block_m=block_m, bit_mix=0.25, decode_q_split=q_split,
                                             max_registers=max_registers), gpu=gpu, gpu_name="NVIDIA H100 80GB HBM3",
                                model=model, geometry={"num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128},
                                source="measured", study={"storage": "postgresql://u:pw@h/db", "name": "s",
                                                          "trials": 3, "best_trial": 1},
                                workload=wl, metrics={})
    doc["schema_version"] = schema
    doc["toolchain"]["triton"] = triton_version
    return doc


def test_export_loader_round_trip(tmp_config_dir):
    doc = _doc(block_m=32, q_split=True)
    assert doc["decode"][0]["q_split"] is True
    path = export.write_document(doc, tmp_config_dir)
    assert "pw" not in path.read_text()  # the storage password is masked
    cfg = loader.load_config(gpu="h100-sxm", model="llama3-8b")
    assert cfg.block_m == 32 and cfg.bit_mix == 0.25 and cfg.decode_q_split is True
    # by the device name too, and by head_dim without a model
    assert loader.load_config(gpu="NVIDIA H100 80GB HBM3", head_dim=128).block_m == 32
    assert "maxnreg" not in doc["prefill"][0] and cfg.max_registers is None


def test_export_loader_round_trip_register_cap(tmp_config_dir):
    doc = _doc(max_registers=168)
    assert doc["prefill"][0]["maxnreg"] == 168
    export.write_document(doc, tmp_config_dir)
    assert loader.load_config(gpu="h100-sxm", model="llama3-8b").max_registers == 168


def test_loader_fallbacks_warn_once(tmp_config_dir):
    export.write_document(_doc(gpu="a100-sxm-80gb", block_m=32), tmp_config_dir / "a.json")
    with pytest.warns(UserWarning, match="another GPU"):
        cfg = loader.load_config(gpu="h100-sxm", model="llama3-8b")
    assert cfg == loader.heuristic_config()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once already
        loader.load_config(gpu="h100-sxm", model="llama3-8b")
    # unknown schema version: refused loudly, not used
    (tmp_config_dir / "b.json").write_text(json.dumps(_doc(schema=99, block_m=32)))
    with pytest.warns(UserWarning, match="schema_version"):
        assert loader.load_config(gpu="h100-sxm", model="llama3-8b").block_m == 64
    # another major Triton version: not used
    export.write_document(_doc(triton_version="2.1.0", block_m=32), tmp_config_dir / "c.json")
    with pytest.warns(UserWarning, match="Triton"):
        assert loader.load_config(gpu="h100-sxm", model="llama3-8b").block_m == 64


def test_loader_missing_file_uses_heuristic(tmp_config_dir):
    assert loader.load_config(gpu="h100-sxm", model="qwen2.5-7b") == loader.heuristic_config()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    export.write_document(_doc(), tmp_path)
    export.write_document(_doc(block_m=128), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["h100-sxm--llama3-8b.json"]
    assert json.loads((tmp_path / "h100-sxm--llama3-8b.json").read_text())["prefill"][0]["BLOCK_M"] == 128


def test_mask_url():
    assert export.mask_url("postgresql://alice:s3cret@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert "s3cret" not in export.mask_url("postgresql://db/x?password=s3cret")


# ------------------------------------------------------------------ objective logic

def _workload():
    return O.workload_from_spec("llama3-8b", "prefill=1024;decode=4096x1")


def test_fixed_trial_objective_with_prediction():
    wl = _workload()
    obj = O.Objective(wl, O.PredictTimer("h100"), O.AccuracyEvaluator(wl))
    params = space.config_params(KernelConfig(), wl.kinds)
    value = obj(optuna.trial.FixedTrial(params))
    direct = sum(p.weight * obj.timer.point_ms(KernelConfig(), wl, p) for p in wl.points)
    assert math.isclose(value, direct, rel_tol=1e-9)


def test_infeasible_config_is_pruned_not_run():
    wl = _workload()
    obj = O.Objective(wl, O.PredictTimer("h100"), O.AccuracyEvaluator(wl))
    params = space.config_params(KernelConfig(block_m=128, block_n=256, num_warps=2, num_stages=4), wl.kinds)
    with pytest.raises(optuna.TrialPruned):
        obj(optuna.trial.FixedTrial(params))


def test_replayed_measurements_and_failures():
    """Replay recorded times: the objective sums them by weight; a failing config is a failed trial."""
    wl = _workload()
    recorded = {(64, "prefill"): 2.0, (64, "decode"): 0.5, (128, "prefill"): 1.0, (128, "decode"): 0.25}

    def lookup(config, point):
        if config.block_m == 32:
            raise RuntimeError("OutOfResources: shared memory")
        return recorded[(config.block_m, point.kernel)]

    obj = O.Objective(wl, O.ReplayTimer(lookup), O.AccuracyEvaluator(wl))
    study = optuna.create_study()
    for bm in (64, 128, 32):
        study.enqueue_trial(space.config_params(KernelConfig(block_m=bm), wl.kinds))
    study.optimize(obj, n_trials=3)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    assert study.trials[0].value == pytest.approx(2.5) and study.trials[1].value == pytest.approx(1.25)
    assert "OutOfResources" in study.trials[2].user_attrs["failure"]
    assert export.best_trial(study).number == 1


def test_error_budget_makes_trials_infeasible():
    wl = _workload()
    obj = O.Objective(wl, O.PredictTimer("h100"), O.AccuracyEvaluator(wl), prefill_error_budget=1e-9)
    study = optuna.create_study()
    study.enqueue_trial(space.config_params(KernelConfig(), wl.kinds))
    study.optimize(obj, n_trials=1)
    assert study.trials[0].user_attrs["constraint"][0] > 0
    assert export.best_trial(study) is None


def test_accuracy_is_cached_on_numeric_fields():
    wl = _workload()
    ev = O.AccuracyEvaluator(wl)
    a = ev(KernelConfig(num_warps=4))
    b = ev(KernelConfig(num_warps=8))  # launch parameter only: same numerics
    assert a is b and len(ev._cache) == 1
    c = ev(KernelConfig(bit_mix=1.0))
    assert c.kv_error > a.kv_error and c.kv_compression > a.kv_compression


def test_workload_spec_parsing():
    wl = O.workload_from_spec("llama3-8b", "prefill=1024,4096:3;decode=32768x8")
    pre = [p for p in wl.points if p.kernel == "prefill"]
    assert [p.weight for p in pre] == [0.25, 0.75] and pre[1].batch == 4
    with pytest.raises(ValueError, match="workload"):
        O.workload_from_spec("llama3-8b", "prefil=1024")


def test_show_lists_installed(tmp_config_dir):
    export.write_document(_doc(), tmp_config_dir)
    out = run_cli("show", env={**__import__("os").environ})
    assert out.returncode == 0 and "h100-sxm" in out.stdout


def test_efficiency_replay_on_a_planted_grid(tmp_path):
    """Replay a recorded grid: the run stops at the first config within 97% of the best."""
    from autotune import efficiency

    path = tmp_path / "grid.csv"
    import csv as _csv
    with path.open("w", newline="") as fh:
        w = _csv.DictWriter(fh, fieldnames=["block_m", "block_n", "num_warps", "num_stages", "ms_p50", "status"])
        w.writeheader()
        for bm in (32, 64, 128):
            for bn in (32, 64, 128, 256):
                for nw in (2, 4, 8):
                    for ns in (1, 2, 3, 4):
                        ms = 1.0 if (bm, bn, nw, ns) == (64, 128, 4, 3) else 2.0 + bm / 64 + ns / 10
                        w.writerow({"block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns,
                                    "ms_p50": ms, "status": "ok"})
    grid = efficiency.load_grid(path)
    assert len(grid) == 144 and min(grid.values()) == 1.0
    trials, gpu_trials = efficiency.replay(grid, seed=0, warm_start=False, max_trials=144)
    assert 1 <= trials <= 144 and gpu_trials == trials
    warm, warm_gpu = efficiency.replay(grid, seed=0, warm_start=True, max_trials=144)
    assert warm_gpu <= warm


def test_heuristic_fits_small_shared_memory_gpus():
    from roofline import check_feasible

    big = loader.heuristic_config(128, 4096, smem_per_block=227 * 1024)
    small = loader.heuristic_config(128, 4096, smem_per_block=99 * 1024)
    assert big == KernelConfig() and small.num_stages == 2
    assert check_feasible("prefill", small, "l4", 128)[0]
    assert loader.heuristic_config(64, 17, smem_per_block=227 * 1024).block_m == 32


def test_calibration_file_feeds_the_accuracy_objective(tmp_path):
    """A file in `autotune capture`'s format (written here with synthetic tensors) drives --calibration."""
    import torch

    from autotune import capture
    from kernels import reference

    samples = []
    for layer in range(6):
        q, k, v = reference.outlier_qkv(1, 9, 3, 300, 64, dtype=torch.float16, seed=layer)
        samples.append({"layer": layer, "prompt": 0, "q": q, "k": k, "v": v, "sm_scale": 0.125, "causal": True})
    path = tmp_path / "calib.pt"
    torch.save({"format": capture.FORMAT, "version": capture.VERSION, "model": "synthetic", "samples": samples}, path)
    inputs = O.calibration_inputs(str(path), tokens=128, max_layers=3)
    assert len(inputs) == 3 and inputs[0].q.shape == (1, 9, 128, 64) and inputs[0].sm_scale == 0.125
    wl = O.workload_from_spec("smollm2-135m", "prefill=1024")
    acc = O.AccuracyEvaluator(wl, inputs)(KernelConfig())
    assert 0 < acc.prefill_error < 1e-2


def test_cli_pareto_objective(tmp_path):
    """--objective pareto: a 3-objective study (latency, error, KV bytes); the export takes the fastest feasible."""
    db = tmp_path / "p.db"
    out = run_cli("--gpu", "h100", "--model", "llama3-8b", "--objective", "pareto", "--trials", "8",
                  "--storage", f"sqlite:///{db}", "--workload", "prefill=1024;decode=4096x1",
                  "--out", str(tmp_path / "cfg.json"), "--report-dir", str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr
    study = optuna.load_study(study_name="h100-sxm-llama3-8b-pareto", storage=f"sqlite:///{db}")
    assert len(study.directions) == 3 and len(study.trials) == 8
    doc = json.loads((tmp_path / "cfg.json").read_text())
    best = export.best_trial(study)
    assert doc["study"]["best_trial"] == best.number
    assert (tmp_path / "rep" / "index.html").exists()


def test_bench_csv_gains_new_columns_without_losing_rows(tmp_path):
    """A results file written before a column was added is rewritten once with the wider header."""
    import csv

    from autotune.bench import write_rows

    path = tmp_path / "prefill-h100.csv"
    write_rows(path, [dict(provider="turbo", ms_p50=1.5)], ["provider", "ms_p50"])
    write_rows(path, [dict(provider="sdpa_cudnn", ms_p50=1.2, data="sink")], ["provider", "ms_p50", "data"])
    write_rows(path, [dict(provider="sage1", data="outlier", ms_p50=2.0)], ["provider", "data", "ms_p50"])
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["provider"] for r in rows] == ["turbo", "sdpa_cudnn", "sage1"]
    assert [r["data"] for r in rows] == ["", "sink", "outlier"]
    assert [r["ms_p50"] for r in rows] == ["1.5", "1.2", "2.0"]
    assert path.read_text().splitlines()[0] == "provider,ms_p50,data"


def test_bench_sink_inputs_make_tiles_dead():
    """The sparse benchmark inputs (`--data sink`): every query scores the live span more than 16
    octaves above any other key, so a threshold of up to 16 drops every score outside it."""
    from kernels import reference as R

    q, k, v = R.sink_qkv(1, 1, 1, 256, 128, live_tiles=((0, 64),))
    s = (q.float() @ k.float().transpose(-1, -2))[0, 0] * 128 ** -0.5 * R.LOG2E
    assert float(s[:, :64].min()) - float(s[:, 64:].max()) > 16.0


def test_sparsity_counts_skippable_tiles_of_captured_layers(tmp_path, capsys):
    """`python -m autotune sparsity` on a calibration file: per layer, tile shape and threshold, the
    kernel's skip count as kernels.reference models it (the kernel matches it in test_prefill)."""
    import csv

    import torch

    from autotune import capture, sparsity
    from kernels import reference as R

    q, k, v = R.sink_qkv(1, 2, 1, 192, 64, dtype=torch.float32)
    samples = [{"layer": layer, "prompt": 0, "q": q, "k": k, "v": v, "sm_scale": 64 ** -0.5, "causal": True}
               for layer in (0, 3)]
    path = tmp_path / "calib.pt"
    torch.save({"format": capture.FORMAT, "version": capture.VERSION, "model": "toy", "samples": samples}, path)
    out = tmp_path / "skips.csv"
    assert sparsity.main(["--calibration", str(path), "--thresholds", "4,60", "--tiles", "32x32,64x32",
                          "--layers", "3", "--out", str(out)]) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layer"], r["block_m"], r["sparsity_threshold"]) for r in rows] == [
        ("3", "32", "4.0"), ("3", "32", "60.0"), ("3", "64", "4.0"), ("3", "64", "60.0")]
    cfg = KernelConfig(block_m=32, block_n=32, sparsity_threshold=4.0)
    skipped, visited = R.threshold_tile_skips(R.quantize_qkv(q, k, v, cfg, 64 ** -0.5), True, cfg)
    assert (int(rows[0]["tiles_skipped"]), int(rows[0]["tiles_visited"])) == (skipped, visited) and skipped > 0
    assert int(rows[1]["tiles_skipped"]) == 0  # T = 60 octaves keeps everything
    assert "of KV tiles skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--tiles"):
        sparsity.main(["--calibration", str(path), "--tiles", "64by128"])
    with pytest.raises(SystemExit, match="sparsity_threshold"):
        sparsity.main(["--calibration", str(path), "--thresholds", "0.5"])
