"""`python -m autotune`: tune TurboAttention kernel configs for one GPU and one model.

    python -m autotune --gpu a100 --model phi3            # tune, export JSON, write a report
    python -m autotune show                               # list installed tuned configs
    python -m autotune report --storage URL --study-name NAME
    python -m autotune bench prefill|decode ...           # peers in the same process (GPU)
    python -m autotune capture ... / eval-ppl ...         # real-model activations and perplexity
    python -m autotune sparsity ...                       # KV tiles SAS's threshold skips on them
"""

from __future__ import annotations

import argparse
import math
import sys

DESCRIPTION = """\
Search the TurboAttention kernels' parameters (tile sizes Br x Bc, warps, pipeline stages, SAS,
sparsity threshold, Q/K balance, KV bit mix, cache buffer, decode splits) for one GPU and one model
with Optuna, minimising the workload-weighted attention time per layer while the output error
stays within budget. The best config is exported as JSON (kernels/configs/ by default), which
kernels.turbo_attention and kernels.TurboKVCache load at run time, and a report is written.

Modes: live times each trial on the local GPU (CUDA events, medians, L2 flushed); predict uses
the roofline model (no GPU needed); auto picks live when the named GPU is the one present.
Interrupt at any time: rerunning the same command resumes the same study.

Several GPUs or hosts: --workers N / --devices 0,1,... start one worker process per GPU on one study
(a journal file on one host by default); with --storage postgresql://... every host can run the same
command, and a trial whose worker dies is failed by its heartbeat and retried.
"""

SUBCOMMANDS = {
    "bench": ("autotune.bench", "main"),
    "capture": ("autotune.capture", "main"),
    "eval-ppl": ("autotune.ppl", "main"),
    "report": ("autotune.report", "main"),
    "show": ("autotune.cli", "show_main"),
    "sparsity": ("autotune.sparsity", "main"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other commands: " + ", ".join(SUBCOMMANDS) + " (each has --help).")
    p.add_argument("--gpu", help="GPU key or alias (a100, h100, h100-pcie, l4, 4090, ...); default: the local GPU (NVML)")
    p.add_argument("--model", default="llama3-8b", help="model preset (phi3, llama3-8b, qwen2.5-7b, ...) or a "
                   "Hugging Face config.json path (default: %(default)s)")
    p.add_argument("--trials", type=int, default=60, help="trials to add to the study (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--mode", choices=["auto", "live", "predict"], default="auto", help="timing source (default: auto)")
    p.add_argument("--storage", help="Optuna storage: sqlite:///FILE (default: studies/<gpu>-<model>.db), "
                   "postgresql://USER:PASS@HOST/DB, or journal:FILE")
    p.add_argument("--study-name", help="default: <gpu>-<model>-<objective>")
    p.add_argument("--objective", choices=["latency", "pareto"], default="latency",
                   help="latency: minimise time under the error budget; pareto: latency / error / KV bytes front")
    p.add_argument("--error-budget", type=float, default=None,
                   help="max prefill error, 1 - cosine against fp32 attention (default 1e-3)")
    p.add_argument("--kv-error-budget", type=float, default=None,
                   help="max error with the compressed KV cache, 1 - cosine (default 1e-2)")
    p.add_argument("--workload", help="e.g. 'prefill=1024,4096:2;decode=32768x8' (N[:weight], CTXxBATCH[:weight]); "
                   "default: the model's (prefill 1k/4k/16k, decode 4k/32k x batch 1/8)")
    p.add_argument("--calibration", help="activations from `python -m autotune capture` for the accuracy check "
                   "(default: synthetic inputs with outlier key channels)")
    p.add_argument("--out", help="where to write the JSON (a folder or a .json path; default kernels/configs/)")
    p.add_argument("--report-dir", help="report folder (default reports/<gpu>-<model>/)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: %(default)s)")
    p.add_argument("--no-export", action="store_true", help="do not write the JSON")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--heartbeat", type=int, default=None,
                   help="seconds between trial heartbeats: a trial whose worker died is failed after twice that and "
                   "retried (default: 30 with several workers or a postgresql/journal storage, else off)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes on one study: one per local GPU in live mode (GPUs 0..N-1), plain "
                   "processes in predict mode; --trials is shared between them (default 1: this process)")
    p.add_argument("--devices", help="CUDA devices, one worker each, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES per worker)")
    return p


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module, func = SUBCOMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return tune(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the study keeps every finished trial; rerun the same command to continue", file=sys.stderr)
        return 130


def resolve_target(args):
    """(GPUSpec, ModelSpec, detected GPU key or None) or a one-line ValueError."""
    from roofline import UnknownGPUError, UnknownModelError, detect_gpu, resolve_gpu, resolve_model

    detected = detect_gpu()
    if args.gpu is None and detected is None:
        from roofline import GPUS

        raise ValueError(f"no GPU found here: pass --gpu (one of {', '.join(sorted(GPUS))})")
    try:
        gpu = resolve_gpu(args.gpu or detected)
    except UnknownGPUError as exc:
        raise ValueError(f"--gpu: {exc}") from None
    try:
        model = resolve_model(args.model)
    except UnknownModelError as exc:
        raise ValueError(f"--model: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model: {exc}") from None
    return gpu, model, detected


def choose_mode(requested: str, gpu_key: str, detected: str | None) -> tuple[str, str]:
    """(mode, why)."""
    if requested == "live":
        if detected is None:
            raise ValueError("--mode live needs a CUDA GPU here; none was found (use --mode predict)")
        if detected != gpu_key:
            raise ValueError(f"--mode live: the local GPU is {detected}, not {gpu_key}")
        return "live", "requested"
    if requested == "predict":
        return "predict", "requested"
    if detected == gpu_key:
        return "live", f"the local GPU is {gpu_key}"
    return "predict", (f"the local GPU is {detected}, not {gpu_key}" if detected else "no GPU here") + \
        ": times come from the roofline model"


def build_objective(args, gpu, model, mode, workload, telemetry_index: int = 0):
    """The Objective for these arguments (the tuner and each worker process); ValueError on a bad --calibration."""
    from .objective import (DEFAULT_KV_ERROR_BUDGET, DEFAULT_PREFILL_ERROR_BUDGET, AccuracyEvaluator, LiveTimer,
                            Objective, PredictTimer, calibration_inputs)

    timer = LiveTimer(gpu.key, args.seed) if mode == "live" else PredictTimer(gpu.key)
    try:
        inputs = calibration_inputs(args.calibration) if args.calibration else None
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"--calibration: {exc}") from None
    telemetry = None
    if mode == "live":
        from .telemetry import Telemetry

        telemetry = Telemetry.open(telemetry_index)
    return Objective(workload, timer, AccuracyEvaluator(workload, inputs, args.seed),
                     args.error_budget if args.error_budget is not None else DEFAULT_PREFILL_ERROR_BUDGET,
                     args.kv_error_budget if args.kv_error_budget is not None else DEFAULT_KV_ERROR_BUDGET,
                     args.objective, telemetry)


def tune(args) -> int:
    from .objective import workload_from_spec
    from .study import StorageError, claim_warm_start, default_storage, open_storage, open_study, warm_start
    from .workers import DEFAULT_HEARTBEAT_S, is_shared_storage, plan_devices

    if args.trials < 0:
        return fail(f"--trials must be >= 0, got {args.trials}")
    if args.heartbeat is not None and args.heartbeat < 1:
        return fail(f"--heartbeat must be >= 1 second, got {args.heartbeat}")
    try:
        gpu, model, detected = resolve_target(args)
        mode, why = choose_mode(args.mode, gpu.key, detected)
        workload = workload_from_spec(model, args.workload)
        devices = plan_devices(args.workers, args.devices, mode, _cuda_count() if mode == "live" else 0)
    except ValueError as exc:
        return fail(str(exc))
    # several writers: never the SQLite default (unsafe with parallel writers), a journal file instead
    storage_url = args.storage or default_storage(gpu.key, model.key, journal=devices is not None)
    study_name = args.study_name or f"{gpu.key}-{model.key}-{args.objective}"
    heartbeat = args.heartbeat or (DEFAULT_HEARTBEAT_S if devices is not None or is_shared_storage(storage_url) else None)
    try:
        storage = open_storage(storage_url, heartbeat)
        study = open_study(storage, study_name, args.objective, args.seed)
    except StorageError as exc:
        return fail(str(exc))
    from .export import mask_url

    print(f"autotune: gpu={gpu.key} ({gpu.name}) model={model.key} mode={mode} ({why})")
    print("  workload: " + ", ".join(f"{p.kernel} {p.seq_len}x{p.batch} w={p.weight:.2f}" for p in workload.points))
    resumed = len(study.trials)
    print(f"  study {study_name} in {mask_url(storage_url)}" + (f" (resuming: {resumed} trials so far)" if resumed else ""))

    try:
        objective = build_objective(args, gpu, model, mode, workload)
    except ValueError as exc:
        return fail(str(exc))
    study.set_user_attr("gpu", gpu.key)
    study.set_user_attr("model", model.key)
    study.set_user_attr("mode", mode)
    study.set_user_attr("workload", [list(p) for p in workload.points])
    study.set_user_attr("geometry", {"num_q_heads": model.num_q_heads, "num_kv_heads": model.num_kv_heads,
                                     "head_dim": model.head_dim})
    if objective.telemetry is not None:
        try:  # GPU identity (name, driver, max SM clock) from NVML, for the report's provenance
            study.set_user_attr("nvml", objective.telemetry.identity())
        except Exception:
            pass
    if not resumed and claim_warm_start(storage, study_name):  # once per study, whoever starts first
        from kernels.loader import documents

        others = [(p, d) for p, d in documents() if d["model"] == model.key and d["gpu"] != gpu.key]
        enq = warm_start(study, objective, gpu.key, args.seed, others)
        print(f"  warm start: {len(enq)} configs enqueued ({'; '.join(enq[:3])}{'; ...' if len(enq) > 3 else ''})")
    if args.trials and devices is not None:
        from .workers import run_workers, summarize

        where = ", ".join(f"gpu {d}" for d in devices) if mode == "live" or devices[0] is not None else "CPU"
        print(f"  {len(devices)} workers ({where}); heartbeat every {heartbeat} s: a dead worker's trial is failed "
              f"after {2 * heartbeat} s and retried")
        problem = run_workers(args, devices, study=study, storage=storage, storage_url=storage_url,
                              study_name=study_name, mode=mode, heartbeat=heartbeat, grace=2 * heartbeat)
        print(f"  workers done: {summarize(study, resumed)}")
        if problem:
            return fail(problem)
        if mode == "live" and devices[0] is not None and devices[0].isdigit():
            import torch

            torch.cuda.set_device(int(devices[0]))  # the default-config and SDPA rows: on a GPU that tuned
    elif args.trials:
        from .study import Progress

        study.optimize(objective, n_trials=args.trials, timeout=args.timeout, callbacks=[Progress(args.trials)],
                       gc_after_trial=mode == "live")
    return finish(args, study, objective, gpu, model, mode, storage_url, study_name)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def finish(args, study, objective, gpu, model, mode, storage_url, study_name) -> int:
    from kernels.config import KernelConfig

    from .export import best_trial, build_document, write_document
    from .objective import point_key
    from .study import summary_table

    best = best_trial(study)
    if best is None:
        print("no feasible trial yet (every config so far was over the error budget, infeasible or failed); "
              "raise --trials or the budgets", file=sys.stderr)
        return 1
    winner = KernelConfig.from_dict(best.user_attrs["config"])
    default = _default_from_study(study) or objective.evaluate(KernelConfig())
    rows = []
    per_point_best = best.user_attrs.get("per_point_ms", {})
    for p in objective.workload.points:
        key = point_key(p)
        try:
            base = objective.timer.baseline_ms(objective.workload, p)
        except Exception:
            base = math.nan
        win = per_point_best.get(key, math.nan)
        dflt = default.get("per_point_ms", {}).get(key, math.nan) if default.get("feasible") else math.nan
        rows.append({"point": key, "weight": round(p.weight, 3), "winner_ms": win, "default_ms": dflt,
                     "sdpa_ms": base, "speedup_vs_default": dflt / win if win else math.nan,
                     "speedup_vs_sdpa": base / win if win else math.nan})
    print()
    print(f"winner: trial {best.number}, {best.values[0]:.4f} ms per layer "
          f"({'measured' if mode == 'live' else 'predicted'}); default config: "
          f"{default['ms']:.4f} ms" if default.get("feasible") else f"winner: trial {best.number}")
    print(summary_table(rows))
    acc = best.user_attrs
    print(f"accuracy: prefill 1-cos={acc.get('prefill_error', math.nan):.2e} (budget {objective.prefill_error_budget:g}), "
          f"KV 1-cos={acc.get('kv_error', math.nan):.2e} (budget {objective.kv_error_budget:g}), "
          f"KV compression {acc.get('kv_compression', math.nan):.2f}x")
    print(f"config: {winner}")
    metrics = {
        "objective_ms": best.values[0],
        "default_ms": default.get("ms"),
        "speedup_vs_default": (default["ms"] / best.values[0]) if default.get("feasible") else None,
        "prefill_error": acc.get("prefill_error"),
        "kv_error": acc.get("kv_error"),
        "kv_compression": acc.get("kv_compression"),
        "cosine": 1.0 - acc.get("prefill_error", 0.0),
    }
    sdpa = [r["sdpa_ms"] for r in rows]
    if all(math.isfinite(x) for x in sdpa):
        metrics["speedup_vs_sdpa"] = sum(p.weight * s for p, s in zip(objective.workload.points, sdpa)) / best.values[0]
    if not args.no_export:
        gpu_name = gpu.name
        if mode == "live":
            import torch

            gpu_name = torch.cuda.get_device_name()
        doc = build_document(
            winner, gpu=gpu.key, gpu_name=gpu_name, model=model.key,
            geometry={"num_q_heads": model.num_q_heads, "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim},
            source="measured" if mode == "live" else "predicted",
            study={"storage": storage_url, "name": study_name, "trials": len(study.trials), "best_trial": best.number},
            workload=objective.workload, metrics=metrics)
        path = write_document(doc, args.out)
        print(f"exported {path}")
    if not args.no_report:
        try:
            from .report import write_report

            out = write_report(study, args.report_dir, storage_url=storage_url, command=" ".join(sys.argv),
                               summary_rows=rows)
            print(f"report {out}")
        except Exception as exc:  # a report must never lose the tuning result
            print(f"report not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


def _default_from_study(study) -> dict | None:
    """The default config's figures from its warm-start trial, when it ran to completion (no re-timing)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("warm_start") == "default config" and t.user_attrs.get("per_point_ms") and t.values:
            return {"feasible": True, "ms": t.values[0], "per_point_ms": t.user_attrs["per_point_ms"]}
    return None


def show_main(argv=None) -> int:
    """List the tuned configs the loader can see, in search order."""
    parser = argparse.ArgumentParser(prog="python -m autotune show", description=show_main.__doc__)
    parser.parse_args(argv)
    from kernels.loader import documents, search_dirs

    docs = documents()
    print("search order: " + ", ".join(str(d) for d in search_dirs()))
    if not docs:
        print("no tuned configs installed")
        return 0
    for path, doc in docs:
        m = doc.get("metrics", {})
        print(f"{path}: gpu={doc['gpu']} model={doc['model']} source={doc['source']} created={doc['created']} "
              f"triton={doc['toolchain'].get('triton')} speedup_vs_default={m.get('speedup_vs_default')}")
    return 0
