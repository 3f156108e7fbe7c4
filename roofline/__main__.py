"""python -m roofline: print predictions, GPUs and models.

  python -m roofline predict --gpu h100 --model llama3-8b --n 4096 [--batch 4] [--kernel all]
  python -m roofline gpus
  python -m roofline models
  python -m roofline validate --gpu h100 [--records PATH] [--out reports/roofline]
      (model against measured timings; measuring them on a GPU: python -m roofline.validate measure)
"""

from __future__ import annotations

import argparse
import sys

from .calibrate import load_calibration
from .cost import KERNELS, AttentionShape, check_feasible, predict
from .gpus import GPUS, UnknownGPUError, resolve_gpu
from .models import MODELS, UnknownModelError, resolve_model


def _predict(args: argparse.Namespace) -> int:
    gpu = resolve_gpu(args.gpu)
    model = resolve_model(args.model)
    calibration = load_calibration(gpu) if args.calibrated else None
    config = {k: v for k, v in (("block_m", args.block_m), ("block_n", args.block_n), ("num_warps", args.num_warps),
                                ("num_stages", args.num_stages), ("bit_mix", args.bit_mix),
                                ("num_splits", args.num_splits)) if v is not None}
    kernels = KERNELS if args.kernel == "all" else (args.kernel,)
    print(f"{gpu.name} ({gpu.key}), {model.name}: B={args.batch} Hq={model.num_q_heads} Hkv={model.num_kv_heads} "
          f"D={model.head_dim} N/ctx={args.n} causal={not args.non_causal} config={config or 'defaults'}")
    print(f"{'kernel':<18} {'time ms':>10} {'bound':>8} {'TOPS':>8} {'GB/s':>8} {'ops/B':>8} {'waves':>6}")
    for kernel in kernels:
        shape = AttentionShape(args.batch, model.num_q_heads, model.num_kv_heads, args.n, model.head_dim,
                               causal=not args.non_causal)
        ok, reason = check_feasible(kernel, config, gpu, model.head_dim)
        if not ok:
            print(f"{kernel:<18} infeasible: {reason}")
            continue
        p = predict(kernel, shape, config, gpu, calibration)
        print(f"{kernel:<18} {p.time_ms:>10.4f} {p.bound:>8} {p.achieved_tops:>8.1f} {p.achieved_gbps:>8.0f} "
              f"{p.intensity:>8.1f} {p.waves:>6}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roofline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predicted time of each kernel for one model shape")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--n", type=int, default=4096, help="prefill length N, or decode context length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kernel", default="all", choices=("all",) + KERNELS)
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--calibrated", action="store_true", help="use the saved calibration of the GPU")
    for name in ("block-m", "block-n", "num-warps", "num-stages", "num-splits"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--bit-mix", type=float, default=None)
    sub.add_parser("gpus", help="list the GPU table")
    sub.add_parser("models", help="list the model presets")
    from .validate import add_validate_arguments, validate_command

    add_validate_arguments(sub.add_parser("validate", help="predicted against measured timings: CSV, summary, charts"))
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate_command(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "gpus":
            for spec in GPUS.values():
                print(f"{spec.key:<16} {spec.name:<26} sm_{spec.compute_capability[0]}{spec.compute_capability[1]} "
                      f"{spec.int8_tops:>7.1f} INT8 TOPS {spec.fp16_tflops:>6.1f} FP16 TFLOPS "
                      f"{spec.hbm_gbps:>5.0f} GB/s {spec.sfu_tops:>5.2f} SFU T/s")
            return 0
        for spec in MODELS.values():
            print(f"{spec.key:<14} {spec.name:<34} L={spec.layers:<3} Hq={spec.num_q_heads:<3} Hkv={spec.num_kv_heads:<3} "
                  f"D={spec.head_dim:<4} ctx={spec.max_context}")
        return 0
    except (UnknownGPUError, UnknownModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
