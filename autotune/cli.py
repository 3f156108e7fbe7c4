"""Command line of the autotuner (placeholder until the tuner lands: it explains and exits 0)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autotune",
        description="Tune TurboAttention kernel configs (tile sizes, warps, stages, bit mix, sparsity "
        "threshold) for one GPU and one model, export the winner as JSON and write a report.",
    )
    parser.add_argument("--gpu", default=None, help="GPU key or alias (a100, h100, ...); default: the local GPU")
    parser.add_argument("--model", default="llama3-8b", help="model preset (phi3, llama3-8b, ...) or a config.json path")
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    print(
        f"autotune: the search for gpu={args.gpu or 'local'} model={args.model} is not built yet.\n"
        "When it is, this command will search tile sizes, warps, stages, bit mix and sparsity threshold "
        "with Optuna (live on a matching GPU, roofline-predicted otherwise), export the winner to "
        "kernels/configs/ as JSON and write reports/<gpu>-<model>/index.html."
    )
    return 0
