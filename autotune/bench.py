"""`python -m autotune bench prefill`: TurboAttention against its peers, same process, same inputs.

Providers: `turbo` (quantization pass + attention kernel, the headline), `turbo_kernel` (attention
kernel on pre-quantized tiles) and `turbo_quant` (the quantization pass alone), for the time
breakdown; `turbo_loaded` (turbo_attention with config=None: the tuned document the loader finds
for this GPU and head dim, when it differs from the benchmarked config); `turbo_gluon` (the
quantization pass + kernels/prefill_gluon.py's kernel, where it applies: D = 64/128, exp2); `sdpa_flash` and `sdpa_cudnn` (torch SDPA backends, fp16) and `sage1`
(SageAttention 1.0.6 when importable). With `--kv-cache BIT_MIX`: `turbo_fill_cache` (the prefill
also storing the prompt into a TurboKVCache, its by-product) and `turbo_then_cache_prefill` (the
prefill, then a separate `cache.prefill` that reads K and V again). TOPS = 4 * B * Hq * N^2 * D, halved for causal, for every
provider. Times: triton.testing.do_bench (L2 flushed before each run, warm-up excluded),
p20/p50/p80 in ms. Accuracy: cosine and relative L1 of each output against fp32 attention of the
same inputs. Rows go to reports/bench/prefill-<gpu>.csv (appended; one row per measurement).
Inputs (`--data`): dense with outlier key channels (the headline), or sparse ("sink": an attention
sink and retrieved spans), where a sparsity threshold lets SAS skip most KV tiles; the turbo rows
then record the share skipped (`tiles_skipped_pct`, counted by the kernel).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import pathlib
import subprocess
import sys
import time

from roofline import resolve_model

SEED_MODELS = {
    # name: (Hq, Hkv, D), from the roofline's model table
    name: (spec.num_q_heads, spec.num_kv_heads, spec.head_dim)
    for name, spec in ((n, resolve_model(n)) for n in ("phi3-mini", "llama3-8b", "qwen2.5-7b"))
}
DEFAULT_TOKENS = 16384  # batch = tokens // N, as in DESIGN section 7 (N=4k with B=4, N=16k with B=1)
PREFILL_COLUMNS = ["kernel", "provider", "model", "batch", "hq", "hkv", "n", "d", "dtype", "causal", "config",
                   "ms_p20", "ms_p50", "ms_p80", "tops", "cosine", "rel_l1", "quant_in_timed_region",
                   "kv_repeated_for_peer", "gpu", "torch", "triton", "git_sha", "date", "data", "tiles_skipped_pct"]
# --data: "outlier" = reference.outlier_qkv (dense attention, keys with outlier channels, as real
# models have; no tile is ever below a sparsity threshold); "sink" = reference.sink_qkv (an attention
# sink plus one retrieved 128-token span per 4096 tokens: with a threshold most KV tiles are skipped)
DATA_KINDS = ("outlier", "sink")


def _git_sha() -> str:
    if os.environ.get("TURBO_GIT_SHA"):
        return os.environ["TURBO_GIT_SHA"]  # the GPU machine gets a copy of the tree without .git
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def gpu_key(name: str) -> str:
    n = name.lower()
    for token, key in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("l40s", "l40s"), ("l4", "l4")):
        if token in n:
            return key
    return "".join(c if c.isalnum() else "-" for c in n).strip("-")


def time_ms(fn, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(p20, p50, p80) in ms; do_bench clears L2 before every timed call."""
    import triton

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return float(p20), float(p50), float(p80)


def exact_reference(q, k, v, causal: bool):
    """fp32 attention on the GPU, head-group by head-group, without materialising N x N for all heads."""
    import torch
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    for b in range(q.shape[0]):
        for h0 in range(0, q.shape[1], 8):
            h1 = min(h0 + 8, q.shape[1])
            heads = torch.arange(h0, h1, device=q.device) // group
            out[b, h0:h1] = F.scaled_dot_product_attention(
                q[b, h0:h1].float()[None], k[b, heads].float()[None], v[b, heads].float()[None], is_causal=causal)[0]
    return out


def _peers(q, k, v, causal: bool, sage: bool = True):
    """name -> (callable, kv_repeated) for each peer that runs here (SageAttention too when `sage`)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    kr = k.repeat_interleave(group, dim=1) if group > 1 else k
    vr = v.repeat_interleave(group, dim=1) if group > 1 else v
    peers = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (kr, vr)

            def run(backend=backend, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa and group > 1)
            try:
                run()
                torch.cuda.synchronize()
                peers[name] = (run, not gqa and group > 1)
                break
            except Exception as exc:  # backend refuses this shape/GQA: try the repeated-KV form
                last = exc
        else:
            print(f"  {name}: unavailable ({type(last).__name__}: {str(last)[:80]})")
    if not sage:
        return peers
    try:
        from sageattention import sageattn

        def run_sage():
            return sageattn(q, kr, vr, tensor_layout="HND", is_causal=causal)
        run_sage()
        torch.cuda.synchronize()
        peers["sage1"] = (run_sage, group > 1)
    except Exception as exc:
        print(f"  sage1: unavailable ({type(exc).__name__}: {str(exc)[:80]})")
    return peers


def make_inputs(data: str, batch: int, hq: int, hkv: int, n: int, d: int, dtype, seed: int):
    """The benchmark's Q, K, V on the GPU (see DATA_KINDS)."""
    from kernels import reference

    if data == "sink":
        spans = [(0, 64)] + [(lo, lo + 128) for lo in range(2048, n, 4096)]
        return reference.sink_qkv(batch, hq, hkv, n, d, dtype=dtype, device="cuda", seed=seed, live_tiles=spans)
    if data != "outlier":
        raise ValueError(f"data must be one of {DATA_KINDS}, got {data!r}")
    return reference.outlier_qkv(batch, hq, hkv, n, d, dtype=dtype, device="cuda", seed=seed)


def tiles_skipped_pct(q, tiles, causal: bool, config, scale: float) -> float | str:
    """Share of the attention kernel's KV tiles that the sparsity threshold skipped ("" without one)."""
    import torch

    from kernels.prefill import launch_flashq

    if config.sparsity_threshold is None:
        return ""
    skips = torch.zeros(2, dtype=torch.int64, device=q.device)
    launch_flashq(q, tiles, torch.empty_like(q), causal, config, scale, skips=skips)
    skipped, visited = skips.tolist()
    return round(100.0 * skipped / max(visited, 1), 2)


def bench_prefill(models, ns, tokens: int, causal: bool, out_dir: pathlib.Path, config=None, dtype_name="float16",
                  providers=None, kv_cache_mix: float | None = None, data: str = "outlier") -> list[dict]:
    """kv_cache_mix: also time `turbo_fill_cache` (the prefill storing the prompt into a TurboKVCache
    with this bit_mix as its by-product) and `turbo_then_cache_prefill` (the prefill, then a
    separate `cache.prefill(k, v)` that reads K and V again). data: see DATA_KINDS."""
    import torch
    import triton

    from kernels import KernelConfig, TurboKVCache, reference
    from kernels.loader import load_config
    from kernels.prefill import launch_flashq, turbo_attention
    from kernels.prefill_gluon import check_gluon_config, turbo_attention_gluon
    from kernels.quant import quantize_kv_for

    if not torch.cuda.is_available():
        raise SystemExit("bench prefill needs a CUDA GPU (timings are measured, never predicted here)")
    dtype = getattr(torch, dtype_name)
    config = config or KernelConfig()
    gpu_name = torch.cuda.get_device_name()
    meta = dict(gpu=gpu_name, torch=torch.__version__, triton=triton.__version__, git_sha=_git_sha(),
                date=_dt.date.today().isoformat())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"prefill-{gpu_key(gpu_name)}.csv"
    rows = []
    for model in models:
        hq, hkv, d = SEED_MODELS[model]
        for n in ns:
            batch = max(1, tokens // n)
            q, k, v = make_inputs(data, batch, hq, hkv, n, d, dtype, seed=n)
            ref = exact_reference(q, k, v, causal)
            flops = 4.0 * batch * hq * n * n * d / (2.0 if causal else 1.0)
            scale = 1.0 / math.sqrt(d)
            tiles = quantize_kv_for(q, k, v, config, scale)
            skipped_pct = tiles_skipped_pct(q, tiles, causal, config, scale)
            out = torch.empty_like(q)
            fns = {
                "turbo": (lambda: turbo_attention(q, k, v, causal=causal, config=config), False),
                "turbo_kernel": (lambda: launch_flashq(q, tiles, out, causal, config, scale), False),
                "turbo_quant": (lambda: quantize_kv_for(q, k, v, config, scale), False),
            }
            try:  # the experimental kernel: a failure to compile or launch costs its row, not the run
                check_gluon_config(config, d)
                turbo_attention_gluon(q, k, v, causal=causal, config=config)
                torch.cuda.synchronize()
                fns["turbo_gluon"] = (lambda: turbo_attention_gluon(q, k, v, causal=causal, config=config), False)
            except Exception as exc:
                print(f"  turbo_gluon: not run ({type(exc).__name__}: {str(exc)[:120]})")
            loaded = load_config(head_dim=d, seq_len=n)  # what turbo_attention(config=None) runs here
            if loaded != config:
                fns["turbo_loaded"] = (lambda: turbo_attention(q, k, v, causal=causal), False)
            if kv_cache_mix is not None:
                cache = TurboKVCache(batch, hkv, d, n, device="cuda", dtype=dtype,
                                     config=KernelConfig(bit_mix=kv_cache_mix))

                def then_prefill():
                    res = turbo_attention(q, k, v, causal=causal, config=config)
                    cache.prefill(k, v)
                    return res
                fns["turbo_fill_cache"] = (lambda: turbo_attention(q, k, v, causal=causal, config=config,
                                                                   kv_cache=cache), False)
                fns["turbo_then_cache_prefill"] = (then_prefill, False)
            fns.update(_peers(q, k, v, causal))
            for provider, (fn, repeated) in fns.items():
                if providers and provider not in providers:
                    continue
                p20, p50, p80 = time_ms(fn)
                res = fn()
                if provider == "turbo_quant":
                    cos = rel = float("nan")
                else:
                    err = reference.attention_error(res.float(), ref)
                    cos, rel = err.cosine, err.rel_l1
                row = dict(kernel="prefill", provider=provider, model=model, batch=batch, hq=hq, hkv=hkv, n=n, d=d,
                           dtype=dtype_name, causal=causal,
                           config=(config_label(loaded if provider == "turbo_loaded" else config)
                                   if provider.startswith("turbo") else ""),
                           ms_p20=round(p20, 5), ms_p50=round(p50, 5), ms_p80=round(p80, 5),
                           tops=round(flops / (p50 * 1e-3) / 1e12, 1) if provider != "turbo_quant" else "",
                           cosine=round(cos, 6), rel_l1=round(rel, 6),
                           quant_in_timed_region=provider in ("turbo", "turbo_loaded", "turbo_gluon", "turbo_fill_cache",
                                                              "turbo_then_cache_prefill"),
                           kv_repeated_for_peer=repeated, data=data,
                           tiles_skipped_pct=(skipped_pct if provider.startswith("turbo") and provider != "turbo_loaded"
                                              else ""), **meta)
                rows.append(row)
                print(f"{model:11s} N={n:6d} B={batch:2d} {provider:24s} {p50:8.3f} ms  {row['tops']!s:>7} TOPS  cos={cos:.5f}", flush=True)
            del q, k, v, ref, tiles, out, fns
            torch.cuda.empty_cache()
    write_rows(path, rows, PREFILL_COLUMNS)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


def config_label(config) -> str:
    thr = "none" if config.sparsity_threshold is None else f"{config.sparsity_threshold:g}"
    return (f"bm{config.block_m}-bn{config.block_n}-w{config.num_warps}-s{config.num_stages}-"
            f"{'sas' if config.use_sas else 'exp2'}-p{config.p_scale}-t{thr}"
            f"{'-smooth-' + config.balance if config.smooth_k else ''}"
            f"{'' if config.max_registers is None else f'-r{config.max_registers}'}"
            f"{'' if config.compute_format == 'int8' else '-' + config.compute_format}")


def write_rows(path: pathlib.Path, rows: list[dict], columns: list[str]) -> None:
    """Append rows; a file written with fewer columns is rewritten once with the new header (its
    rows keep their values, the new columns empty), so that the CSV stays one table."""
    if path.exists():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            old_columns = list(reader.fieldnames or [])
            old_rows = list(reader) if set(columns) - set(old_columns) else None
        if old_rows is not None:
            header = old_columns + [c for c in columns if c not in old_columns]
            with path.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old_rows)
            columns = header
        else:
            columns = old_columns
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def sweep_prefill(model: str, n: int, tokens: int, causal: bool, grid: dict, out_dir: pathlib.Path) -> list[dict]:
    """Time many configs of the attention kernel (quantization pass included) on one shape."""
    import itertools

    import torch
    import triton

    from kernels import KernelConfig, reference
    from kernels.prefill import turbo_attention

    hq, hkv, d = SEED_MODELS[model]
    batch = max(1, tokens // n)
    q, k, v = reference.outlier_qkv(batch, hq, hkv, n, d, dtype=torch.float16, device="cuda", seed=n)
    ref = exact_reference(q, k, v, causal)
    flops = 4.0 * batch * hq * n * n * d / (2.0 if causal else 1.0)
    keys = list(grid)
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                git_sha=_git_sha(), date=_dt.date.today().isoformat())
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = KernelConfig(**dict(zip(keys, values)))
        t0 = time.time()
        try:
            res = turbo_attention(q, k, v, causal=causal, config=cfg)
            torch.cuda.synchronize()
            p20, p50, p80 = time_ms(lambda: turbo_attention(q, k, v, causal=causal, config=cfg), warmup=10, rep=50)
        except Exception as exc:
            print(f"  {config_label(cfg)}: failed {type(exc).__name__}: {str(exc)[:100]}")
            continue
        err = reference.attention_error(res.float(), ref)
        row = dict(kernel="prefill", provider="turbo", model=model, batch=batch, hq=hq, hkv=hkv, n=n, d=d,
                   dtype="float16", causal=causal, config=config_label(cfg), ms_p20=round(p20, 5),
                   ms_p50=round(p50, 5), ms_p80=round(p80, 5), tops=round(flops / (p50 * 1e-3) / 1e12, 1),
                   cosine=round(err.cosine, 6), rel_l1=round(err.rel_l1, 6), quant_in_timed_region=True,
                   kv_repeated_for_peer=False, **meta)
        rows.append(row)
        # one row at a time, so a sweep cut short by a time limit keeps what it measured
        write_rows(out_dir / f"sweep-prefill-{gpu_key(meta['gpu'])}.csv", [row], PREFILL_COLUMNS)
        print(f"  {config_label(cfg):52s} {p50:7.3f} ms {row['tops']:6.1f} TOPS cos={err.cosine:.5f} ({time.time() - t0:.1f}s)", flush=True)
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "decode":
        from .bench_decode import main as decode_main  # the decode benchmark lives beside this one

        return decode_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m autotune bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["prefill", "sweep-prefill", "sass", "quant-parts"])
    parser.add_argument("--models", default=",".join(SEED_MODELS), help="comma-separated: " + ", ".join(SEED_MODELS))
    parser.add_argument("--n", default="1024,4096,16384", help="sequence lengths, comma-separated")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="batch = tokens // N (default %(default)s)")
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--out", default="reports/bench", help="folder for the CSV (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="KernelConfig field for turbo (repeatable), e.g. --set block_n=128")
    parser.add_argument("--providers", default="", help="only these providers (comma-separated)")
    parser.add_argument("--kv-cache", type=float, default=None, metavar="BIT_MIX",
                        help="prefill: also time filling a TurboKVCache of this bit_mix as the prefill's by-product "
                             "(turbo_fill_cache) against a separate cache.prefill (turbo_then_cache_prefill)")
    parser.add_argument("--data", choices=DATA_KINDS, default="outlier",
                        help="prefill inputs: outlier (dense, the headline) or sink (sparse: measures SAS tile "
                             "skipping with a sparsity threshold, e.g. --set sparsity_threshold=8)")
    parser.add_argument("--grid", default="", help="sweep grid, e.g. 'block_m=64,128;block_n=128;use_sas=false'")
    parser.add_argument("--sass-of", choices=["prefill", "decode"], default="prefill",
                        help="sass: the kernel to compile for sm_90 and count (no GPU needed; the first --models "
                             "entry gives the shape; decode loops in code order: buffer, 4-bit pool, 2-bit pool)")
    parser.add_argument("--bits", type=int, choices=[4, 2], default=4, help="sass of decode: the cache's pool")
    args = parser.parse_args(argv)
    from kernels import KernelConfig

    changes = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        changes[key] = _parse_value(raw)
    config = KernelConfig().replace(**changes) if changes else KernelConfig()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SEED_MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {', '.join(SEED_MODELS)}")
    ns = [int(x) for x in args.n.split(",") if x]
    out = pathlib.Path(args.out)
    if args.kernel == "prefill":
        bench_prefill(models, ns, args.tokens, not args.non_causal, out, config,
                      providers=set(p for p in args.providers.split(",") if p) or None, kv_cache_mix=args.kv_cache,
                      data=args.data)
    elif args.kernel == "sweep-prefill":
        grid = {"block_m": [64, 128], "block_n": [64, 128], "num_warps": [4, 8], "num_stages": [2, 3],
                "use_sas": [False, True]}
        if args.grid:
            grid = {key: [_parse_value(v) for v in values.split(",")]
                    for key, _, values in (part.partition("=") for part in args.grid.split(";") if part)}
        base = config.to_dict()
        grid = {key: grid.get(key, [base[key]]) for key in base}
        for m in models:
            for n in ns:
                sweep_prefill(m, n, args.tokens, not args.non_causal, grid, out)
    elif args.kernel == "quant-parts":
        for m in models:
            for n in ns:
                quant_parts(m, n, args.tokens, config)
    else:
        from .sass import format_report, offline_sass

        print(format_report(offline_sass(args.sass_of, changes, SEED_MODELS[models[0]], not args.non_causal,
                                         args.bits)))
    return 0


def quant_parts(model: str, n: int, tokens: int, config) -> None:
    """Time the pieces of the prefill separately (where the time goes)."""
    import torch

    from kernels import quant, reference
    from kernels.prefill import launch_flashq

    hq, hkv, d = SEED_MODELS[model]
    batch = max(1, tokens // n)
    q, k, v = reference.outlier_qkv(batch, hq, hkv, n, d, dtype=torch.float16, device="cuda", seed=n)
    dp = quant.padded_head_dim(d)
    scale = d ** -0.5
    kv = quant.quantize_kv_for(q, k, v, config, scale)
    out = torch.empty_like(q)
    parts = {
        "smoothing_vectors": lambda: quant.smoothing_vectors(q, k, scale * reference.LOG2E, dp),
        "quantize_kv_tiles": lambda: quant.quantize_kv_for(q, k, v, config, scale),
        "attention_kernel": lambda: launch_flashq(q, kv, out, True, config, scale),
        "torch_copy_q": lambda: q.clone(),
    }
    for name, fn in parts.items():
        p20, p50, p80 = time_ms(fn)
        print(f"{model:11s} N={n:6d} {name:18s} {p50 * 1e3:8.1f} us", flush=True)


def _parse_value(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


if __name__ == "__main__":
    sys.exit(main())
