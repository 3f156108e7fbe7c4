"""Perplexity of a real model with its attention replaced by TurboAttention, against the model as is.

`python -m autotune eval-ppl --hf-model smollm2 [--config default|exact|JSON|FILE] [--mode full]
[--text FILE] [--max-tokens N] [--window N] [--out CSV]` evaluates one configuration;
`--sweep` evaluates the bit-mix x sparsity-threshold grid and writes
reports/accuracy/ppl-<model>.csv, a per-layer CSV beside it and a PNG plot.

What replaces the model's attention (through transformers' AttentionInterface, see
autotune.hfmodel) depends on the mode:
- "full": the TurboAttention prefill numerics (kernels.reference on CPU, kernels.turbo_attention on
  CUDA: INT8 QK^T and PV, SAS softmax with the sparsity threshold) over K/V read back from the
  4/2-bit cache (autotune.kvsim: the blocks before a query's own come from the cache, its own
  block is full precision), so perplexity reflects prefill numerics and the compressed cache;
- "prefill": the prefill numerics alone, K/V unquantized (what a prompt's first pass sees);
- "cache": exact fp32 attention over the compressed cache alone (comparable to KIVI-style studies);
- "exact": exact fp32 attention, nothing quantized (equals the unmodified model).
Perplexity is exp(mean next-token NLL) over non-overlapping windows of the text, each evaluated
from an empty context. Per layer, the attention output is compared with exact fp32 attention on
the same q, k, v (cosine, SQNR, relative L1).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fractions
import json
import math
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from kernels.config import KernelConfig
from kernels.reference import (AttentionError, attention_error, exact_attention, num_low_bit_heads,
                               turbo_attention_reference)

from . import kvsim
from .bench import _git_sha
from .hfmodel import AttentionCall, attention_handler, encode_text, load_model, model_shape

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TEXT = pathlib.Path(__file__).resolve().parent / "data" / "a-case-of-identity.txt"
REPORT_DIR = ROOT / "reports" / "accuracy"
MODES = ("full", "prefill", "cache", "exact")
SWEEP_BIT_MIXES = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)
SWEEP_THRESHOLDS = (None, 16.0, 8.0, 4.0)
DEFAULT_TOKENS, SWEEP_TOKENS, DEFAULT_WINDOW = 1024, 2048, 512
SWEEP_FINE_BUFFER_TOKENS = 32  # K groups of 32 tokens, as the KIVI-style peer's
# Peer numbers (DESIGN.md section 7): KIVI-style fake quantization on SmolLM2-135M, exact attention.
KIVI_PEER = ((0.0, 0.8), (1.0 / 3.0, 4.7), (1.0, 34.0))  # (fraction of KV heads at 2 bits, ppl increase %)
CSV_COLUMNS = ("config", "mode", "bit_mix", "sparsity_threshold", "use_sas", "kv_compression", "ppl", "ppl_baseline",
               "ppl_increase_pct", "min_layer_cosine", "mean_layer_cosine", "min_layer_sqnr_db", "tokens",
               "windows", "window_tokens", "buffer_tokens", "v_group", "model", "text", "device", "seconds",
               "torch", "transformers", "git_sha", "date")
LAYER_COLUMNS = ("config", "mode", "layer", "cosine", "sqnr_db", "rel_l1", "max_abs")


@dataclass(frozen=True)
class Numerics:
    """What replaces the model's attention: a KernelConfig and which of its parts are simulated."""

    name: str
    config: KernelConfig = field(default_factory=KernelConfig)
    mode: str = "full"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")

    @property
    def prefill(self) -> bool:
        """TurboAttention prefill numerics (INT8 products, SAS) instead of exact attention."""
        return self.mode in ("full", "prefill")

    @property
    def cache(self) -> bool:
        """K/V of earlier blocks read back from the 4/2-bit cache."""
        return self.mode in ("full", "cache")


def turbo_attend(config: KernelConfig, sm_scale: float) -> kvsim.Attend:
    """Causal TurboAttention prefill (bottom-right aligned, Nq <= Nk): the reference numerics on CPU,
    the Triton kernel on CUDA (which takes Nq == Nk: queries are zero-padded in front; zero rows do
    not change the other rows' tiles or the Q/K channel balance, and their outputs are dropped)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not q.is_cuda:
            return turbo_attention_reference(q, k, v, causal=True, config=config, sm_scale=sm_scale)
        from kernels import turbo_attention

        nq, nk = q.shape[2], k.shape[2]
        if nq < nk:
            q = torch.cat([q.new_zeros(*q.shape[:2], nk - nq, q.shape[3]), q], dim=2)
        return turbo_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, sm_scale=sm_scale,
                               config=config)[:, :, nk - nq:].float()

    return attend


class TurboAttentionHandler:
    """An attention handler (autotune.hfmodel) that applies `numerics` and records per-layer errors."""

    def __init__(self, numerics: Numerics, track_errors: bool = True):
        self.numerics = numerics
        self.track_errors = track_errors
        self.errors: dict[int, list[AttentionError]] = {}

    def attention(self, call: AttentionCall) -> torch.Tensor:
        num, cfg = self.numerics, self.numerics.config
        if num.prefill:
            attend = turbo_attend(cfg, call.sm_scale)
        else:
            attend = kvsim.exact_attend(call.sm_scale)
        if num.cache:
            cache = kvsim.fake_quantize_kv(call.k, call.v, cfg)
            if num.prefill:
                return kvsim.cached_attention(call.q, call.k, call.v, cache, cfg.buffer_tokens, attend)
            return kvsim.cached_exact_attention(call.q, call.k, call.v, cache, cfg.buffer_tokens, call.sm_scale)
        return attend(call.q, call.k, call.v)

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        if not call.causal:
            raise ValueError(f"layer {call.layer}: only causal attention is supported")
        out = self.attention(call)
        if self.track_errors:
            ref = exact_attention(call.q, call.k, call.v, causal=True, sm_scale=call.sm_scale)
            self.errors.setdefault(call.layer, []).append(attention_error(out, ref))
        return out

    def layer_errors(self) -> dict[int, AttentionError]:
        """Per layer, the mean of each metric over the forward passes seen (max_abs: the max)."""
        out = {}
        for layer, errs in sorted(self.errors.items()):
            n = len(errs)
            out[layer] = AttentionError(sum(e.cosine for e in errs) / n, sum(e.rel_l1 for e in errs) / n,
                                        sum(e.sqnr_db for e in errs) / n, max(e.max_abs for e in errs))
        return out


# ----------------------------------------------------------------------------- perplexity

def text_windows(ids: torch.Tensor, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """The first `max_tokens` token ids cut into non-overlapping windows: [W, window] (a short tail is dropped)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // window
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens (after --max-tokens), fewer than one window of {window}")
    return ids[: count * window].view(count, window)


def perplexity(model, windows: torch.Tensor, batch_size: int | None = None) -> float:
    """exp(mean NLL of every token but the first of each window, given the tokens before it in the window)."""
    device = next(model.parameters()).device
    batch_size = batch_size or windows.shape[0]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


class EvalResult(NamedTuple):
    numerics: Numerics
    ppl: float
    ppl_baseline: float
    layer_errors: dict  # layer -> AttentionError against exact attention on the same inputs
    seconds: float

    @property
    def increase_pct(self) -> float:
        return 100.0 * (self.ppl / self.ppl_baseline - 1.0)


def evaluate(model, windows: torch.Tensor, numerics: Numerics, ppl_baseline: float,
             batch_size: int | None = None) -> EvalResult:
    """Perplexity with the model's attention replaced according to `numerics`."""
    start = time.perf_counter()
    handler = TurboAttentionHandler(numerics)
    with attention_handler(model, handler):
        ppl = perplexity(model, windows, batch_size)
    return EvalResult(numerics, ppl, ppl_baseline, handler.layer_errors(), time.perf_counter() - start)


# ----------------------------------------------------------------------------- configs

def _mix_label(bit_mix: float) -> str:
    return str(fractions.Fraction(bit_mix).limit_denominator(12))


def _threshold_label(threshold: float | None) -> str:
    return "none" if threshold is None else f"{threshold:g}"


def sweep_numerics(base: KernelConfig | None = None) -> list[Numerics]:
    """The sweep: exact; prefill alone per threshold; cache alone per bit mix; the full grid of bit
    mix x threshold; and the full mode per bit mix with n_b = 32 (finer K groups, more metadata).

    The full-mode point equal to KernelConfig() is named `default`.
    """
    base = base or KernelConfig()
    out = [Numerics("exact", base, "exact")]
    out += [Numerics(f"prefill-T{_threshold_label(t)}", base.replace(sparsity_threshold=t), "prefill")
            for t in SWEEP_THRESHOLDS]
    out += [Numerics(f"cache-mix{_mix_label(m)}", base.replace(bit_mix=m), "cache") for m in SWEEP_BIT_MIXES]
    for m in SWEEP_BIT_MIXES:
        for t in SWEEP_THRESHOLDS:
            cfg = base.replace(bit_mix=m, sparsity_threshold=t)
            name = "default" if cfg == KernelConfig() else f"mix{_mix_label(m)}-T{_threshold_label(t)}"
            out.append(Numerics(name, cfg, "full"))
    nb = SWEEP_FINE_BUFFER_TOKENS
    out += [Numerics(f"mix{_mix_label(m)}-nb{nb}", base.replace(bit_mix=m, buffer_tokens=nb), "full")
            for m in SWEEP_BIT_MIXES]
    return out


def parse_numerics(spec: str | None, mode: str = "full") -> Numerics:
    """--config: "default", "exact" (attention exact, cache unquantized), a JSON object of
    KernelConfig fields, or a JSON file holding one (or a tuned document, DESIGN.md section 5, whose
    "quant" section and first "prefill" entry are used)."""
    if spec is None or spec == "default":
        return Numerics("default" if mode == "full" else f"default-{mode}", KernelConfig(), mode)
    if spec == "exact":
        return Numerics("exact", KernelConfig(), "exact")
    if spec.lstrip().startswith("{"):
        name, data = "custom", json.loads(spec)
    else:
        path = pathlib.Path(spec)
        if not path.is_file():
            raise ValueError(f"--config {spec!r} is not a preset (default, exact), a JSON object or a JSON file")
        name, data = path.stem, json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config must hold a JSON object, got {type(data).__name__}")
    if "schema_version" in data:
        fields = dict(data.get("quant", {}))
        prefill = (data.get("prefill") or [{}])[0]
        names = {"BLOCK_M": "block_m", "BLOCK_N": "block_n", "num_warps": "num_warps", "num_stages": "num_stages"}
        fields.update({names[k]: v for k, v in prefill.items() if k in names})
        data = fields
    return Numerics(name, KernelConfig.from_dict(data), mode)


# ----------------------------------------------------------------------------- reports

def result_row(result: EvalResult, windows: torch.Tensor, shape: dict, context: dict) -> dict:
    """One CSV row (CSV_COLUMNS) for an evaluation."""
    num, cfg = result.numerics, result.numerics.config
    errs = list(result.layer_errors.values())
    compression = kvsim.kv_compression(cfg, shape["num_kv_heads"], shape["head_dim"]) if num.cache else 1.0
    return {
        "config": num.name, "mode": num.mode,
        "bit_mix": round(cfg.bit_mix, 6) if num.cache else 0.0,
        "sparsity_threshold": ("" if cfg.sparsity_threshold is None else cfg.sparsity_threshold) if num.prefill else "",
        "use_sas": cfg.use_sas if num.prefill else "",
        "kv_compression": round(compression, 4), "ppl": round(result.ppl, 5),
        "ppl_baseline": round(result.ppl_baseline, 5), "ppl_increase_pct": round(result.increase_pct, 4),
        "min_layer_cosine": round(min(e.cosine for e in errs), 6) if errs else "",
        "mean_layer_cosine": round(sum(e.cosine for e in errs) / len(errs), 6) if errs else "",
        "min_layer_sqnr_db": round(min(e.sqnr_db for e in errs), 3) if errs else "",
        "tokens": windows.numel(), "windows": windows.shape[0], "window_tokens": windows.shape[1],
        "buffer_tokens": cfg.buffer_tokens, "v_group": cfg.v_group, "seconds": round(result.seconds, 1),
        **context,
    }


def layer_rows(result: EvalResult) -> list[dict]:
    return [{"config": result.numerics.name, "mode": result.numerics.mode, "layer": layer,
             "cosine": round(e.cosine, 7), "sqnr_db": round(e.sqnr_db, 3), "rel_l1": round(e.rel_l1, 6),
             "max_abs": round(e.max_abs, 6)} for layer, e in result.layer_errors.items()]


def write_csv(path: pathlib.Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


class PlotData(NamedTuple):
    """Perplexity increase against KV compression: one series per sparsity threshold (full mode),
    the cache-alone series, and the KIVI-style peer points."""

    series: dict  # label -> list of (kv_compression, ppl_increase_pct, bit_mix), sorted by compression
    peer: list  # (kv_compression, ppl_increase_pct, label)
    title: str


def kivi_compression(bit_mix: float, num_kv_heads: int, group: int = 32) -> float:
    """Compression of the KIVI-style peer's cache: fp16 scale and zero point per group of `group`
    values (1 bit per value), the 64-token residual not counted (long context). An assumption:
    DESIGN.md gives the peer's accuracy, not its byte count."""
    n_low = num_low_bit_heads(num_kv_heads, bit_mix)
    bits = (n_low * (2 + 32 / group) + (num_kv_heads - n_low) * (4 + 32 / group)) / num_kv_heads
    return 16.0 / bits


PLOT_FLOOR_PCT = 0.01
"""Increases below this (including decreases) are drawn at it: the y axis is logarithmic."""


def plot_data(rows: Sequence[dict], model: str, num_kv_heads: int) -> PlotData:
    series: dict = {}
    for row in rows:
        if row["mode"] == "full":
            t = row["sparsity_threshold"]
            label = f"TurboAttention, T = {'none' if t == '' else f'{float(t):g}'}"
            if int(row["buffer_tokens"]) != KernelConfig().buffer_tokens:
                label += f", n_b = {int(row['buffer_tokens'])}"
        elif row["mode"] == "cache":
            label = "cache alone (exact attention)"
        else:
            continue
        pct = max(float(row["ppl_increase_pct"]), PLOT_FLOOR_PCT)
        series.setdefault(label, []).append((float(row["kv_compression"]), pct, float(row["bit_mix"])))
    for points in series.values():
        points.sort()
    peer = []
    for m, pct in KIVI_PEER:
        n_low = num_low_bit_heads(num_kv_heads, m)
        what = "4-bit" if n_low == 0 else "all 2-bit" if n_low == num_kv_heads else f"{n_low} of {num_kv_heads} heads 2-bit"
        peer.append((kivi_compression(m, num_kv_heads), pct, f"KIVI-style {what}"))
    tokens = rows[0]["tokens"] if rows else 0
    return PlotData(series, peer, f"{model}: perplexity increase vs KV-cache compression ({tokens} tokens)")


def draw_plot(data: PlotData, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, points in data.series.items():
        style = "s--" if label.startswith("cache") else "o-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    ax.scatter([p[0] for p in data.peer], [p[1] for p in data.peer], marker="x", color="black", s=60,
               label="KIVI-style peer (DESIGN.md; its size assumed)", zorder=5)
    for x, y, text in data.peer:
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache compression vs fp16 (4096 tokens, metadata and fp16 buffer counted)")
    ax.set_ylabel("perplexity increase over the unmodified model (%)")
    ax.set_title(data.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune eval-ppl", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-model", default="smollm2", help="preset (smollm2, smollm2-135m), model folder or .gguf file")
    p.add_argument("--config", default=None, help="default | exact | a JSON object of KernelConfig fields | a JSON file")
    p.add_argument("--mode", default="full", choices=[m for m in MODES if m != "exact"],
                   help="full: prefill numerics over the compressed cache; prefill or cache: one of them alone")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text to evaluate on (default: the shipped one)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens of the text to use (default {DEFAULT_TOKENS}, with --sweep {SWEEP_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window, each evaluated from empty context")
    p.add_argument("--out", default=None, help="CSV to write (sweep default: reports/accuracy/ppl-<model>.csv)")
    p.add_argument("--layers-out", default=None, help="per-layer CSV (default: next to --out, suffix -layers)")
    p.add_argument("--plot", default=None, help="sweep PNG (default: next to --out, .png)")
    p.add_argument("--sweep", action="store_true", help="evaluate the bit-mix x threshold grid and plot it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    numerics = sweep_numerics() if args.sweep else [parse_numerics(args.config, args.mode)]
    lm = load_model(args.hf_model, device=device)
    shape = model_shape(lm.model)
    text_path = pathlib.Path(args.text)
    windows = text_windows(encode_text(lm.tokenizer, text_path.read_text(encoding="utf-8")), args.window,
                           args.max_tokens or (SWEEP_TOKENS if args.sweep else DEFAULT_TOKENS))
    import transformers

    context = {"model": lm.source.name, "text": text_path.name, "device": device, "torch": torch.__version__,
               "transformers": transformers.__version__, "git_sha": _git_sha(),
               "date": datetime.date.today().isoformat()}
    print(f"{lm.source.name}: {shape['num_layers']} layers, {shape['num_q_heads']} q heads, "
          f"{shape['num_kv_heads']} KV heads, D={shape['head_dim']}; {windows.shape[0]} x {windows.shape[1]} tokens "
          f"of {text_path.name} on {device}")
    start = time.perf_counter()
    baseline = perplexity(lm.model, windows)
    print(f"baseline (unmodified model): ppl {baseline:.4f} ({time.perf_counter() - start:.1f} s)")
    rows, per_layer = [], []
    for num in numerics:
        result = evaluate(lm.model, windows, num, baseline)
        row = result_row(result, windows, shape, context)
        rows.append(row)
        per_layer += layer_rows(result)
        print(f"{num.name:>16} [{num.mode:>7}] bit_mix {row['bit_mix']:.3f} T {row['sparsity_threshold'] or 'none':>4} "
              f"kv x{row['kv_compression']:.2f}: ppl {result.ppl:.4f} ({result.increase_pct:+.3f}%), "
              f"layer cosine min {row['min_layer_cosine']} ({result.seconds:.1f} s)", flush=True)
    out = pathlib.Path(args.out) if args.out else (REPORT_DIR / f"ppl-{lm.source.name}.csv" if args.sweep else None)
    if out is not None:
        write_csv(out, CSV_COLUMNS, rows)
        layers_out = pathlib.Path(args.layers_out) if args.layers_out else out.with_name(out.stem + "-layers.csv")
        write_csv(layers_out, LAYER_COLUMNS, per_layer)
        print(f"wrote {out} and {layers_out}")
        if args.sweep or args.plot:
            plot = pathlib.Path(args.plot) if args.plot else out.with_suffix(".png")
            draw_plot(plot_data(rows, lm.source.name, shape["num_kv_heads"]), plot)
            print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
