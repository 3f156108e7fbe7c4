"""Tuner efficiency: how many trials TPE needs to reach 97% of an exhaustively measured grid's best.

`python -m autotune.efficiency --grid reports/tuner/grid-prefill-llama3-8b-h100.csv` replays the
recorded grid (one measurement per launch config of the prefill kernel, llama3-8b, N=4096, B=4,
on an H100) for several sampler seeds, with and without the roofline warm start and pruning, and
writes one row per (variant, seed) to reports/tuner/efficiency-<gpu>-<model>.csv:
  trials_to_target: trials started until the best measured time is within 97% of the grid's best
    throughput (time <= best / 0.97), every trial counted (pruned ones too);
  gpu_trials_to_target: the same counting only trials that would have run on the GPU (pruned
    trials cost a roofline evaluation, not a compile and a timing).
Configs the grid lacks or that failed to compile count as failed trials, as in a live run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import pathlib
import statistics
import sys

from kernels.config import KernelConfig

SPACE = {"block_m": (32, 64, 128), "block_n": (32, 64, 128, 256), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3, 4)}
TARGET = 0.97


def load_grid(path: str | pathlib.Path) -> dict[tuple, float]:
    """{(block_m, block_n, num_warps, num_stages): ms} for the configs measured without failure."""
    grid = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "ok":
                key = tuple(int(row[k]) for k in SPACE)
                grid[key] = float(row["ms_p50"])
    return grid


@functools.lru_cache(maxsize=8)
def roofline_best(gpu: str = "h100-sxm", head_dim: int = 128, top: int = 4) -> tuple[tuple, ...]:
    """The `top` launch configs of SPACE the calibrated roofline predicts fastest (feasible ones only);
    the same for every seed, so computed once."""
    import itertools

    from roofline import AttentionShape, check_feasible, load_calibration, predict

    shape = AttentionShape(4, 32, 8, 4096, head_dim)
    calibration = load_calibration(gpu)
    scored = []
    for key in itertools.product(*SPACE.values()):
        cfg = KernelConfig(**dict(zip(SPACE, key)))
        if check_feasible("prefill", cfg, gpu, head_dim)[0]:
            scored.append((predict("prefill", shape, cfg, gpu, calibration).time_s, key))
    return tuple(key for _, key in sorted(scored)[:top])


def replay(grid: dict[tuple, float], seed: int, warm_start: bool, gpu: str = "h100-sxm", head_dim: int = 128,
           max_trials: int = 400) -> tuple[int, int]:
    """(trials_to_target, gpu_trials_to_target) for one TPE run over the recorded grid."""
    import math

    import optuna

    from roofline import check_feasible

    best = min(grid.values())
    target = best / TARGET
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True))
    if warm_start:
        for key in roofline_best(gpu, head_dim):
            study.enqueue_trial(dict(zip(SPACE, key)))
    trials = gpu_trials = 0
    reached = None
    while trials < max_trials:
        trial = study.ask()
        key = tuple(trial.suggest_categorical(k, list(v)) for k, v in SPACE.items())
        trials += 1
        cfg = KernelConfig(**dict(zip(SPACE, key)))
        if warm_start and not check_feasible("prefill", cfg, gpu, head_dim)[0]:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        gpu_trials += 1
        ms = grid.get(key, math.nan)
        if math.isnan(ms):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, ms)
        if ms <= target:
            reached = (trials, gpu_trials)
            break
    return reached or (max_trials, gpu_trials)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autotune.efficiency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="reports/tuner/grid-prefill-llama3-8b-h100.csv")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="reports/tuner/efficiency-h100-llama3-8b.csv")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    size = 1
    for v in SPACE.values():
        size *= len(v)
    rows = []
    for warm in (False, True):
        for seed in range(args.seeds):
            t, g = replay(grid, seed, warm)
            rows.append({"variant": "tpe+roofline_warm_start+pruning" if warm else "tpe", "seed": seed,
                         "trials_to_target": t, "gpu_trials_to_target": g, "grid_size": size,
                         "grid_measured": len(grid), "target": TARGET, "best_ms": min(grid.values())})
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for variant in ("tpe", "tpe+roofline_warm_start+pruning"):
        sel = [r for r in rows if r["variant"] == variant]
        med_t = statistics.median(r["trials_to_target"] for r in sel)
        med_g = statistics.median(r["gpu_trials_to_target"] for r in sel)
        print(f"{variant:34s} median trials to 97% of the grid's best: {med_t:g} ({100 * med_t / size:.1f}% of "
              f"{size}); GPU trials {med_g:g} ({100 * med_g / size:.1f}%)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
