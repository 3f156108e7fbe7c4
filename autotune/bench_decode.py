"""`python -m autotune bench decode`: one decode step of TurboKVCache against SDPA over an fp16 cache.

Providers, same process, same inputs (random K/V with outlier key channels, made on the GPU):
- `turbo` (bit_mix 0, 0.5, 1): `TurboKVCache._step(commit=False)` on a cache filled by prefill to
  `ctx` tokens, i.e. what `decode` launches for a step that does not flush (the split-KV kernel,
  which also appends the new token to the fp16 buffer, and the reduction). The flush that one
  step in n_b pays is outside the timed region, and so is the quantization of the prompt.
- `sdpa_flash`, `sdpa_cudnn`: torch SDPA with that backend, q [B, Hq, 1, D] against an fp16 K/V
  cache of ctx + 1 tokens, enable_gqa=True (K/V repeated outside the timed region only if the
  backend refuses GQA; column kv_repeated_for_peer).
Every provider is captured in a CUDA graph and timed by replaying it (a decode step is a few
microseconds of GPU work, less than its launch cost from Python; serving engines replay graphs
too); `graph` says False where capture failed and the eager call was timed. Times: triton's
do_bench (L2 flushed before every call), p20/p50/p80.

Columns beyond DESIGN section 7's: speedup_vs_sdpa_flash / _cudnn (peer us_p50 / ours), bytes_read
(turbo: `TurboKVCache.decode_bytes_read`, every byte the step reads; peers: the fp16 K/V of
ctx + 1 tokens and q), gbps = bytes_read / us_p50, pct_copy_bw = gbps against a device-to-device
copy measured once in this process (bytes read + written / time, like the 3.0 TB/s in DESIGN),
kv_compression = fp16 bytes of the same geometry / cache.nbytes() (all metadata counted), cosine
and rel_l1 against fp32 exact attention of the same q over the same full-precision history.
tops = 4 * B * Hq * ctx * D / time, for completeness. Rows are appended to
reports/bench/decode-<gpu>.csv.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import pathlib
import sys

from .bench import SEED_MODELS, _git_sha, gpu_key, time_ms, write_rows

DECODE_COLUMNS = ["kernel", "provider", "model", "batch", "hq", "hkv", "ctx", "d", "dtype", "causal", "config",
                  "bit_mix", "ms_p20", "ms_p50", "ms_p80", "us_p50", "tops", "cosine", "rel_l1", "bytes_read", "gbps",
                  "pct_copy_bw", "kv_compression", "speedup_vs_sdpa_flash", "speedup_vs_sdpa_cudnn", "graph",
                  "kv_repeated_for_peer", "flush_in_timed_region", "gpu", "torch", "triton", "git_sha", "date"]
DEFAULT_CTX = (4096, 32768, 131072)
DEFAULT_BATCH = (1, 4, 16)
DEFAULT_BIT_MIX = (0.0, 0.5, 1.0)
QUICK = dict(models=("llama3-8b",), ctx=(4096, 32768), batch=(1, 4), bit_mix=DEFAULT_BIT_MIX)
MEMORY_HEADROOM = 0.85  # use at most this fraction of free GPU memory for one point
OUTLIER_CHANNELS = 4
OUTLIER_SCALE = (10.0, 20.0)  # the project's default outlier inputs (reference.outlier_qkv)


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    _, p50, _ = time_ms(lambda: dst.copy_(src), warmup=5, rep=50)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def make_inputs(b: int, hq: int, hkv: int, n: int, d: int, seed: int):
    """q [B, Hq, 1, D] and K/V [B, Hkv, n, D] fp16 on the GPU, keys with reference.outlier_qkv's
    outlier channels (a few channels scaled 10-20x and offset), made in place to spare memory."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16, generator=gen)
    channels = torch.randperm(d, generator=gen, device="cuda")[:OUTLIER_CHANNELS]
    lo, hi = OUTLIER_SCALE
    factors = lo + (hi - lo) * torch.rand(OUTLIER_CHANNELS, generator=gen, device="cuda")
    for c, f in zip(channels.tolist(), factors.tolist()):
        k[..., c].mul_(f).add_(f)
    return q, k, v


def exact_decode(q, k, v):
    """fp32 softmax(q K^T / sqrt(D)) V per sequence and head group, without an fp32 copy of the cache."""
    import torch

    b, hq, _, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    for i in range(b):
        for h in range(hkv):
            kk = k[i, h].float()
            s = (q[i, h * group:(h + 1) * group, 0].float() @ kk.T) / math.sqrt(d)
            del kk
            p = torch.softmax(s, dim=-1)
            out[i, h * group:(h + 1) * group, 0] = p @ v[i, h].float()
    return out


def _graphed(fn):
    """(callable replaying a CUDA graph of fn, True), or (fn, False) if capture fails."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        return (lambda: (graph.replay(), out)[1]), True
    except Exception as exc:  # a backend that cannot be captured is timed eagerly
        print(f"    graph capture failed ({type(exc).__name__}: {str(exc)[:80]}); timing eagerly")
        torch.cuda.synchronize()
        return fn, False


def _peer(q, k, v, backend):
    """(fn, kv_repeated) for one SDPA backend, or None if it refuses this shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]
    last = None
    for gqa in (True, False):
        if gqa:
            kk, vv = k, v
        else:
            if group == 1:
                break
            kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def run(kk=kk, vv=vv, gqa=gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa and group > 1)
        try:
            run()
            torch.cuda.synchronize()
            return run, not gqa
        except Exception as exc:
            last = exc
    print(f"    {backend}: unavailable ({type(last).__name__}: {str(last)[:80]})")
    return None


SCORE_PATHS = {None: "f16", 8: "i8", 16: "i8x2"}  # decode_score_bits -> label (fp16 products, INT8 scores)


def config_label(config, block_n: int, splits: int, score_bits: int | None = None) -> str:
    return (f"nb{config.buffer_tokens}-vg{config.v_group}-bn{block_n}-w{config.decode_num_warps}-"
            f"s{config.decode_num_stages}-splits{splits}{'-smooth' if config.smooth_k else ''}-{SCORE_PATHS[score_bits]}")


def _fits(b, hq, hkv, ctx, d, config) -> tuple[bool, float]:
    import torch

    from kernels.cache import expected_nbytes

    fp16_kv = 2 * b * hkv * (ctx + 1) * d * 2
    ours = expected_nbytes(b, hkv, d, ctx + config.buffer_tokens, config, 0)
    temps = 2 * b * ctx * d * 4 + 2 * ctx * d * 4 + (256 << 20)  # priority per head, exact reference, L2 flush
    need = fp16_kv + ours + temps
    free, _ = torch.cuda.mem_get_info()
    return need <= MEMORY_HEADROOM * free, need / 2**30


def bench_decode(models, ctxs, batches, bit_mixes, out_dir: pathlib.Path, base_config=None, seed: int = 0) -> list[dict]:
    import torch
    import triton

    from kernels import KernelConfig

    if not torch.cuda.is_available():
        raise SystemExit("bench decode needs a CUDA GPU: it measures time on the device (no CPU or predicted mode)")
    base_config = base_config or KernelConfig()
    gpu_name = torch.cuda.get_device_name()
    meta = dict(gpu=gpu_name, torch=torch.__version__, triton=triton.__version__, git_sha=_git_sha(),
                date=_dt.date.today().isoformat())
    copy_gbps = copy_bandwidth_gbps()
    print(f"{gpu_name}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decode-{gpu_key(gpu_name)}.csv"
    rows = []
    for model in models:
        hq, hkv, d = SEED_MODELS[model]
        for ctx in ctxs:
            for b in batches:
                ok, need_gib = _fits(b, hq, hkv, ctx, d, base_config)
                if not ok:
                    print(f"{model:11s} ctx={ctx:6d} B={b:2d}: skipped (needs ~{need_gib:.0f} GiB)")
                    continue
                rows += _bench_point(model, hq, hkv, d, ctx, b, bit_mixes, base_config, copy_gbps, meta, seed)
                torch.cuda.empty_cache()
    write_rows(path, rows, DECODE_COLUMNS)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


def _measured(p20, p50, p80, flops, nbytes, copy_gbps, err) -> dict:
    """The columns of a row that come from its times, bytes read and error (every provider alike)."""
    return dict(ms_p20=round(p20, 6), ms_p50=round(p50, 6), ms_p80=round(p80, 6), us_p50=round(p50 * 1e3, 2),
                tops=round(flops / (p50 * 1e-3) / 1e12, 3), cosine=round(err.cosine, 6), rel_l1=round(err.rel_l1, 6),
                bytes_read=nbytes, gbps=round(nbytes / (p50 * 1e-3) / 1e9, 1),
                pct_copy_bw=round(100 * nbytes / (p50 * 1e-3) / 1e9 / copy_gbps, 1))


def _bench_point(model, hq, hkv, d, ctx, b, bit_mixes, base_config, copy_gbps, meta, seed) -> list[dict]:
    import torch
    from torch.nn.attention import SDPBackend

    from kernels import reference
    from kernels.cache import TurboKVCache

    q, k, v = make_inputs(b, hq, hkv, ctx + 1, d, seed + ctx + b)
    exact = exact_decode(q, k, v)
    flops = 4.0 * b * hq * (ctx + 1) * d
    common = dict(kernel="decode", model=model, batch=b, hq=hq, hkv=hkv, ctx=ctx, d=d, dtype="float16", causal=False,
                  **meta)
    rows, peer_us = [], {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        peer = _peer(q, k, v, backend)
        if peer is None:
            continue
        fn, repeated = peer
        timed, graphed = _graphed(fn)
        p20, p50, p80 = time_ms(timed)
        err = reference.attention_error(fn().float(), exact)
        nbytes = 2 * b * hkv * (ctx + 1) * d * 2 + q.numel() * 2
        peer_us[name] = p50 * 1e3
        rows.append(dict(common, provider=name, config="", bit_mix="",
                         **_measured(p20, p50, p80, flops, nbytes, copy_gbps, err), kv_compression=1.0,
                         speedup_vs_sdpa_flash="", speedup_vs_sdpa_cudnn="", graph=graphed,
                         kv_repeated_for_peer=repeated, flush_in_timed_region=False))
        print(f"{model:11s} ctx={ctx:6d} B={b:2d} {name:10s}          {p50 * 1e3:9.1f} us  "
              f"{rows[-1]['gbps']:7.0f} GB/s  cos={err.cosine:.5f}", flush=True)
        del timed, fn
    kn, vn = k[:, :, ctx:], v[:, :, ctx:]
    for bit_mix in bit_mixes:
        config = base_config.replace(bit_mix=bit_mix)
        if (ctx + 1) % config.buffer_tokens == 0:
            raise ValueError(f"ctx + 1 = {ctx + 1} would flush inside the timed step; pick another ctx")
        cache = TurboKVCache(b, hkv, d, ctx + config.buffer_tokens, device="cuda", dtype=torch.float16, config=config)
        cache.prefill(k[:, :, :ctx], v[:, :, :ctx])

        def step(cache=cache):
            return cache._step(q, kn, vn, commit=False)
        out = step()
        err = reference.attention_error(out.float(), exact)
        timed, graphed = _graphed(step)
        p20, p50, p80 = time_ms(timed)
        nbytes = cache.decode_bytes_read(hq)
        us = p50 * 1e3
        splits = cache._split_plan([n + 1 for n in cache._lengths])[0]
        rows.append(dict(common, provider="turbo", config=config_label(config, cache.decode_block_n, splits,
                                                                  cache.decode_score_bits(q.dtype, hq)),
                         bit_mix=bit_mix, **_measured(p20, p50, p80, flops, nbytes, copy_gbps, err),
                         kv_compression=round(cache.fp16_nbytes() / cache.nbytes(), 3),
                         speedup_vs_sdpa_flash=round(peer_us["sdpa_flash"] / us, 3) if "sdpa_flash" in peer_us else "",
                         speedup_vs_sdpa_cudnn=round(peer_us["sdpa_cudnn"] / us, 3) if "sdpa_cudnn" in peer_us else "",
                         graph=graphed, kv_repeated_for_peer=False, flush_in_timed_region=False))
        r = rows[-1]
        print(f"{model:11s} ctx={ctx:6d} B={b:2d} turbo mix={bit_mix:<4g}  {us:9.1f} us  {r['gbps']:7.0f} GB/s "
              f"({r['pct_copy_bw']:5.1f}% copy)  x{r['speedup_vs_sdpa_cudnn'] or '-'} cuDNN  "
              f"x{r['speedup_vs_sdpa_flash'] or '-'} flash  {r['kv_compression']:.2f}x smaller  cos={err.cosine:.5f}",
              flush=True)
        del timed, step, cache
        torch.cuda.empty_cache()
    return rows


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m autotune bench decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a subset: llama3-8b, ctx 4k and 32k, batch 1 and 4, every bit mix (about a minute)")
    parser.add_argument("--models", default=",".join(SEED_MODELS), help="comma-separated: " + ", ".join(SEED_MODELS))
    parser.add_argument("--ctx", default=",".join(map(str, DEFAULT_CTX)), help="context lengths (default %(default)s)")
    parser.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCH)), help="batch sizes (default %(default)s)")
    parser.add_argument("--bit-mix", default=",".join(map(str, DEFAULT_BIT_MIX)),
                        help="fractions of KV heads at 2 bits (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="KernelConfig field for turbo (repeatable), e.g. --set decode_block_n=32")
    parser.add_argument("--out", default="reports/bench", help="folder for the CSV (default %(default)s)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench decode needs a CUDA GPU: it measures time on the device (nothing runs on CPU)", file=sys.stderr)
        return 2
    from kernels import KernelConfig

    from .bench import _parse_value

    changes = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        changes[key] = _parse_value(raw)
    config = KernelConfig().replace(**changes) if changes else KernelConfig()
    if args.quick:
        models, ctxs, batches, mixes = QUICK["models"], QUICK["ctx"], QUICK["batch"], QUICK["bit_mix"]
    else:
        models = [m for m in args.models.split(",") if m]
        ctxs, batches, mixes = _ints(args.ctx), _ints(args.batch), _floats(args.bit_mix)
    for m in models:
        if m not in SEED_MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {', '.join(SEED_MODELS)}")
    bench_decode(models, ctxs, batches, mixes, pathlib.Path(args.out), config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
