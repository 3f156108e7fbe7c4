"""How many KV tiles SAS's sparsity threshold lets the prefill kernel skip, on real activations.

`python -m autotune sparsity [--calibration FILE | --hf-model smollm2 --max-tokens 2048]
[--thresholds 4,8,16] [--tiles 64x128,128x128] [--layers all] [--out CSV]` counts, for each
captured layer (q, k, v as the model's attention received them; `python -m autotune capture`), the
(Q tile, KV tile) pairs that the prefill kernel visits and those it skips because no row of the tile
keeps a score above its running maximum minus T (kernels.reference.tile_skip_counts, which the
kernel's own count matches exactly in tests/test_prefill.py). No GPU is needed; what a skipped tile
saves in time is measured on a GPU with `python -m autotune bench prefill --data sink`, and what a
threshold costs in accuracy with `python -m autotune eval-ppl --sweep`.

Rows (one per layer, tile shape and threshold) go to the CSV: model, layer, n, block_m, block_n,
sparsity_threshold, tiles_visited, tiles_skipped, skipped_pct, git_sha, date; a summary per tile
shape and threshold (mean and range over layers) is printed.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

from .bench import _git_sha, write_rows

COLUMNS = ["model", "layer", "n", "block_m", "block_n", "sparsity_threshold", "tiles_visited", "tiles_skipped",
           "skipped_pct", "git_sha", "date"]
DEFAULT_THRESHOLDS = "4,8,16"
DEFAULT_TILES = "64x128"


def parse_tiles(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        bm, sep, bn = part.strip().partition("x")
        if not sep or not bm.isdigit() or not bn.isdigit():
            raise ValueError(f"--tiles: expected BMxBN pairs like 64x128, got {part!r}")
        out.append((int(bm), int(bn)))
    return out


def parse_thresholds(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--thresholds: expected comma-separated numbers (octaves), got {spec!r}") from None


def tile_skip_rows(samples, thresholds, tiles, model: str) -> list[dict]:
    """One row per (sample, tile shape, threshold); samples are capture.CalibrationSample."""
    from kernels import KernelConfig, reference

    meta = dict(git_sha=_git_sha(), date=datetime.date.today().isoformat())
    rows = []
    for sample in samples:
        q, k, v = sample.q.float(), sample.k.float(), sample.v.float()
        for bm, bn in tiles:
            base = KernelConfig(block_m=bm, block_n=bn)
            qkv = reference.quantize_qkv(q, k, v, base, sample.sm_scale)
            counts = reference.tile_skip_counts(qkv, sample.causal, bm, bn, thresholds)  # one pass over the scores
            for t, (skipped, visited) in zip(thresholds, counts):
                rows.append(dict(model=model, layer=sample.layer, n=q.shape[2], block_m=bm, block_n=bn,
                                 sparsity_threshold=t, tiles_visited=visited, tiles_skipped=skipped,
                                 skipped_pct=round(100.0 * skipped / max(visited, 1), 2), **meta))
    return rows


def summary(rows: list[dict]) -> str:
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["n"], row["block_m"], row["block_n"], row["sparsity_threshold"]), []).append(row)
    lines = []
    for (n, bm, bn, t), rs in sorted(groups.items()):
        pct = [r["skipped_pct"] for r in rs]
        total = 100.0 * sum(r["tiles_skipped"] for r in rs) / max(1, sum(r["tiles_visited"] for r in rs))
        lines.append(f"N={n:5d} tiles {bm}x{bn} T={t:g}: {total:5.1f}% of KV tiles skipped over {len(rs)} layer(s) "
                     f"(per layer {min(pct):.1f}..{max(pct):.1f}%)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune sparsity", description=__doc__.split("\n\n")[0])
    p.add_argument("--calibration", help="activations from `python -m autotune capture` (default: capture now)")
    p.add_argument("--hf-model", default="smollm2", help="model to capture from when no --calibration is given")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of the capture (default %(default)s)")
    p.add_argument("--layers", default="all", help='"all" or indices/ranges, e.g. "0,14,29"')
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="T values in octaves (default %(default)s)")
    p.add_argument("--tiles", default=DEFAULT_TILES, help="BMxBN tile shapes (default %(default)s)")
    p.add_argument("--out", default=None, help="CSV to append to (default: reports/accuracy/tile-skips-<model>.csv)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        thresholds, tiles = parse_thresholds(args.thresholds), parse_tiles(args.tiles)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    from kernels import KernelConfig

    for bm, bn in tiles:
        try:
            KernelConfig(block_m=bm, block_n=bn)
        except ValueError as exc:
            raise SystemExit(f"--tiles: {exc}") from None
    for t in thresholds:
        try:
            KernelConfig(sparsity_threshold=t)
        except ValueError as exc:
            raise SystemExit(f"--thresholds: {exc}") from None
    from .capture import load_calibration, parse_layers

    if args.calibration:
        samples = load_calibration(args.calibration)
        layers = parse_layers(args.layers, 1 + max(s.layer for s in samples)) if samples else []
        samples = [s for s in samples if s.layer in set(layers)]
        model = samples[0].model if samples else "unknown"
    else:
        import tempfile

        from .capture import main as capture_main

        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "calibration.pt"
            capture_main(["--hf-model", args.hf_model, "--out", str(path), "--max-tokens", str(args.max_tokens),
                          "--layers", args.layers, "--dtype", "float32", "--device", "cpu"])
            samples = load_calibration(path)
        model = samples[0].model if samples else args.hf_model
    if not samples:
        raise SystemExit("no captured layer to count")
    rows = []
    for i, sample in enumerate(samples):
        rows += tile_skip_rows([sample], thresholds, tiles, model)
        print(f"  layer {sample.layer} ({i + 1}/{len(samples)}): " + ", ".join(
            f"T={r['sparsity_threshold']:g} {r['block_m']}x{r['block_n']} {r['skipped_pct']}%" for r in rows[-len(tiles) * len(thresholds):]),
            flush=True)
    out = pathlib.Path(args.out) if args.out else (pathlib.Path(__file__).resolve().parents[1] / "reports" / "accuracy"
                                                   / f"tile-skips-{model}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(out, rows, COLUMNS)
    print(summary(rows))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
