"""The tuner's objective: workload-weighted attention time per layer, with accuracy as a constraint.

time(config) = sum over prefill points of w * (quantization pass + attention kernel)
             + sum over decode points of w * (one decode step),  in ms per layer.
Timers: `PredictTimer` (the roofline model, no GPU), `LiveTimer` (CUDA, do_bench medians with L2
flushed and warm-up excluded) and `ReplayTimer` (recorded measurements, for tests and for the
tuner-efficiency study). Accuracy: the reference numerics (kernels/reference.py) on realistic
inputs, captured activations when given (`autotune capture`), synthetic ones with outlier key
channels otherwise: prefill error = 1 - cosine of the prefill output against fp32 attention;
KV error = 1 - cosine of causal attention whose earlier blocks come from the compressed cache.
A trial whose error exceeds its budget is infeasible (optuna constraints: value <= 0 is feasible).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from kernels import reference
from kernels.config import KernelConfig
from roofline.models import WorkloadPoint as Point  # (kernel, seq_len, batch, weight)

from .space import WorkloadKinds, numeric_key, suggest_config

DEFAULT_PREFILL_ERROR_BUDGET = 1e-3  # 1 - cosine: the DESIGN floor, cosine >= 0.999
DEFAULT_KV_ERROR_BUDGET = 3e-2  # 1 - cosine with the compressed cache: all-4-bit passes (1.7e-2 on synthetic
# outlier inputs), all-2-bit does not (0.26); real-model perplexity is in reports/accuracy/
ACCURACY_TOKENS = 256  # prefill accuracy check: N (the reference runs on CPU)
KV_ACCURACY_TOKENS = 512  # KV accuracy check: enough tokens for several cache blocks


def point_key(point: Point) -> str:
    """'prefill_4096x4': the name of a workload point in per-point results."""
    return f"{point.kernel}_{point.seq_len}x{point.batch}"


@dataclass(frozen=True)
class Workload:
    """Shapes the tuner optimises for, with weights (the model's geometry alongside)."""

    model: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    points: tuple[Point, ...]
    causal: bool = True

    @property
    def kinds(self) -> WorkloadKinds:
        return WorkloadKinds(prefill=any(p.kernel == "prefill" for p in self.points),
                             decode=any(p.kernel == "decode" for p in self.points))

    @property
    def max_prefill_len(self) -> int:
        return max([p.seq_len for p in self.points if p.kernel == "prefill"], default=0)

    @property
    def max_decode_ctx(self) -> int:
        return max([p.seq_len for p in self.points if p.kernel == "decode"], default=0)


def workload_from_spec(model, spec: str | None = None) -> Workload:
    """The model's default workload (roofline.default_workload), or a spec such as
    'prefill=1024,4096:2;decode=32768x8,4096x1' (N[:weight]; decode CTXxBATCH[:weight]).
    Prefill batch = max(1, 16384 // N). Weights of each kernel are normalised to sum to 1.
    """
    from roofline import default_workload

    defaults = default_workload(model)
    m = defaults.model
    if not spec:
        return Workload(m.key, m.num_q_heads, m.num_kv_heads, m.head_dim, defaults.points)
    points: list[Point] = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        kind, sep, items = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in ("prefill", "decode"):
            raise ValueError(f"--workload: expected 'prefill=...' or 'decode=...' parts, got {part!r}")
        raw = []
        for item in items.split(","):
            item = item.strip()
            if not item:
                continue
            shape, _, weight = item.partition(":")
            try:
                w = float(weight) if weight else 1.0
                if kind == "prefill":
                    n = int(shape)
                    b = max(1, 16384 // n)
                else:
                    ctx, _, batch = shape.partition("x")
                    n, b = int(ctx), int(batch or 1)
            except ValueError:
                raise ValueError(f"--workload: cannot read {item!r} (prefill N[:weight], decode CTXxBATCH[:weight])") from None
            if n < 1 or b < 1 or w <= 0:
                raise ValueError(f"--workload: lengths, batches and weights must be positive, got {item!r}")
            raw.append((n, b, w))
        total = sum(w for _, _, w in raw)
        points += [Point(kind, n, b, w / total) for n, b, w in raw]
    if not points:
        raise ValueError("--workload: no points")
    return Workload(m.key, m.num_q_heads, m.num_kv_heads, m.head_dim, tuple(points))


# ----------------------------------------------------------------------------- timers

class PredictTimer:
    """Times from the roofline model (roofline.predict), in ms; infeasible configs raise InfeasibleConfigError."""

    source = "predicted"

    def __init__(self, gpu: str, calibration=None):
        from roofline import load_calibration

        self.gpu = gpu
        self.calibration = calibration if calibration is not None else load_calibration(gpu)

    def feasible(self, config: KernelConfig, workload: Workload) -> tuple[bool, str]:
        from roofline import check_feasible

        for kernel in ("prefill",) if workload.kinds.prefill else ():
            ok, reason = check_feasible(kernel, config, self.gpu, workload.head_dim)
            if not ok:
                return ok, reason
        if workload.kinds.decode:
            ok, reason = check_feasible("decode", config, self.gpu, workload.head_dim)
            if not ok:
                return ok, reason
        return True, ""

    def point_ms(self, config: KernelConfig, workload: Workload, point: Point) -> float:
        from roofline import AttentionShape, predict

        shape = AttentionShape(point.batch, workload.num_q_heads, workload.num_kv_heads, point.seq_len,
                               workload.head_dim, causal=workload.causal)
        if point.kernel == "prefill":
            t = predict("prefill", shape, config, self.gpu, self.calibration).time_s
            t += predict("quantize", shape, config, self.gpu, self.calibration).time_s
        else:
            t = predict("decode", shape, config, self.gpu, self.calibration).time_s
        return t * 1e3

    def baseline_ms(self, workload: Workload, point: Point) -> float:
        from roofline import AttentionShape, predict

        shape = AttentionShape(point.batch, workload.num_q_heads, workload.num_kv_heads, point.seq_len,
                               workload.head_dim, causal=workload.causal)
        kernel = "sdpa_prefill_fp16" if point.kernel == "prefill" else "sdpa_decode_fp16"
        return predict(kernel, shape, None, self.gpu, self.calibration).time_s * 1e3


class LiveTimer:
    """Measured times on the local CUDA GPU: do_bench medians (L2 flushed, warm-up excluded)."""

    source = "measured"

    def __init__(self, gpu: str, seed: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("live mode needs a CUDA GPU; use --mode predict")
        self.gpu = gpu
        self.seed = seed
        self._inputs: dict = {}
        self._predict = None

    def feasible(self, config: KernelConfig, workload: Workload) -> tuple[bool, str]:
        if self._predict is None:
            self._predict = PredictTimer(self.gpu)
        return self._predict.feasible(config, workload)

    def _qkv(self, workload: Workload, point: Point):
        key = (point.kernel, point.seq_len, point.batch)
        if key not in self._inputs:
            self._inputs.clear()  # one shape's tensors at a time keeps memory flat
            torch.cuda.empty_cache()
            self._inputs[key] = reference.outlier_qkv(point.batch, workload.num_q_heads, workload.num_kv_heads,
                                                      point.seq_len, workload.head_dim, device="cuda",
                                                      seed=self.seed + point.seq_len)
        return self._inputs[key]

    def point_ms(self, config: KernelConfig, workload: Workload, point: Point) -> float:
        from .bench import time_ms

        if point.kernel == "prefill":
            from kernels.prefill import turbo_attention

            q, k, v = self._qkv(workload, point)
            fn = lambda: turbo_attention(q, k, v, causal=workload.causal, config=config)  # noqa: E731
            out = fn()
            torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                raise FloatingPointError("prefill output has NaN or Inf")
            return time_ms(fn, warmup=5, rep=30)[1]
        from kernels.cache import TurboKVCache

        q, k, v = self._qkv(workload, Point("decode", point.seq_len, point.batch, 1.0))
        cache = TurboKVCache(point.batch, workload.num_kv_heads, workload.head_dim, point.seq_len + 4096,
                             device="cuda", dtype=q.dtype, config=config)
        cache.prefill(k, v)
        q1, k1, v1 = q[:, :, -1:].contiguous(), k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
        out = cache.decode(q1, k1, v1)
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            raise FloatingPointError("decode output has NaN or Inf")
        return time_ms(lambda: cache.decode(q1, k1, v1), warmup=5, rep=30)[1]

    def baseline_ms(self, workload: Workload, point: Point) -> float:
        """The faster of SDPA's flash and cuDNN backends on the same inputs (bench's peers)."""
        from .bench import _peers, time_ms

        q, k, v = self._qkv(workload, point)
        if point.kernel == "decode":
            q = q[:, :, -1:].contiguous()
        peers = _peers(q, k, v, causal=point.kernel == "prefill" and workload.causal, sage=False)
        return min((time_ms(fn, warmup=5, rep=30)[1] for fn, _ in peers.values()), default=math.inf)


class ReplayTimer:
    """Times looked up from recorded measurements: {config label or params key: {point: ms}} or a callable."""

    source = "replayed"

    def __init__(self, lookup: Callable[[KernelConfig, Point], float], feasible: Callable | None = None):
        self.lookup = lookup
        self._feasible = feasible

    def feasible(self, config: KernelConfig, workload: Workload) -> tuple[bool, str]:
        return self._feasible(config, workload) if self._feasible else (True, "")

    def point_ms(self, config: KernelConfig, workload: Workload, point: Point) -> float:
        return float(self.lookup(config, point))

    def baseline_ms(self, workload: Workload, point: Point) -> float:
        return math.nan


# ----------------------------------------------------------------------------- accuracy

class AccuracyInputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sm_scale: float | None
    source: str  # "synthetic" | the calibration file


def synthetic_inputs(workload: Workload, seed: int = 0, tokens: int = ACCURACY_TOKENS) -> AccuracyInputs:
    """A reduced copy of the model's attention (<= 2 KV heads, its GQA ratio up to 4) with outlier keys."""
    hkv = min(workload.num_kv_heads, 2)
    group = min(workload.num_q_heads // workload.num_kv_heads, 4)
    q, k, v = reference.outlier_qkv(1, hkv * group, hkv, tokens, workload.head_dim, dtype=torch.float32, seed=seed)
    return AccuracyInputs(q, k, v, None, "synthetic")


def calibration_inputs(path: str, tokens: int = ACCURACY_TOKENS, max_layers: int = 4) -> list[AccuracyInputs]:
    """Captured activations (`python -m autotune capture`): up to `max_layers` samples spread over the
    file's layers, the first `tokens` tokens of each (real outlier channels and attention sinks)."""
    from .capture import load_calibration

    samples = load_calibration(path)
    if not samples:
        raise ValueError(f"{path} holds no samples")
    step = max(1, len(samples) // max_layers)
    out = []
    for sample in samples[::step][:max_layers]:
        out.append(AccuracyInputs(sample.q[:1, :, :tokens].float(), sample.k[:1, :, :tokens].float(),
                                  sample.v[:1, :, :tokens].float(), float(sample.sm_scale), str(path)))
    return out


class AccuracyResult(NamedTuple):
    prefill_error: float  # 1 - cosine (worst over inputs)
    kv_error: float  # 1 - cosine with the compressed cache (worst over inputs); 0 without decode
    prefill_sqnr_db: float
    kv_compression: float


class AccuracyEvaluator:
    """Errors of a config's numerics, cached on the fields that change them (space.NUMERIC_FIELDS)."""

    def __init__(self, workload: Workload, inputs: Sequence[AccuracyInputs] | None = None, seed: int = 0):
        self.workload = workload
        self.inputs = list(inputs) if inputs else [synthetic_inputs(workload, seed)]
        self.kv_inputs = ([synthetic_inputs(workload, seed + 1, KV_ACCURACY_TOKENS)] if not inputs else self.inputs)
        self._cache: dict = {}

    def __call__(self, config: KernelConfig) -> AccuracyResult:
        key = numeric_key(config)
        if key not in self._cache:
            self._cache[key] = self._evaluate(config)
        return self._cache[key]

    def _evaluate(self, config: KernelConfig) -> AccuracyResult:
        prefill_err, sqnr = 0.0, math.inf
        if self.workload.kinds.prefill:
            for inp in self.inputs:
                out = reference.turbo_attention_reference(inp.q, inp.k, inp.v, True, config, inp.sm_scale)
                err = reference.attention_error(out, reference.exact_attention(inp.q, inp.k, inp.v, True, inp.sm_scale))
                prefill_err = max(prefill_err, 1.0 - err.cosine)
                sqnr = min(sqnr, err.sqnr_db)
        kv_err, compression = 0.0, math.nan
        if self.workload.kinds.decode:
            from . import kvsim

            for inp in self.kv_inputs:
                cache = kvsim.fake_quantize_kv(inp.k, inp.v, config)
                out = kvsim.cached_exact_attention(inp.q, inp.k, inp.v, cache, config.buffer_tokens, inp.sm_scale)
                err = reference.attention_error(out, reference.exact_attention(inp.q, inp.k, inp.v, True, inp.sm_scale))
                kv_err = max(kv_err, 1.0 - err.cosine)
            compression = kvsim.kv_compression(config, self.workload.num_kv_heads, self.workload.head_dim,
                                               max(self.workload.max_decode_ctx, config.buffer_tokens))
        return AccuracyResult(prefill_err, kv_err, sqnr, compression)


# ----------------------------------------------------------------------------- objective

class TrialFailure(Exception):
    """A config that compiled badly or produced NaN: the trial fails, the study goes on."""


@dataclass
class Objective:
    """Callable for study.optimize; objective "latency" returns ms, "pareto" (ms, error, KV bytes ratio)."""

    workload: Workload
    timer: Any
    accuracy: AccuracyEvaluator
    prefill_error_budget: float = DEFAULT_PREFILL_ERROR_BUDGET
    kv_error_budget: float = DEFAULT_KV_ERROR_BUDGET
    objective: str = "latency"
    telemetry: Any = None
    base: KernelConfig = field(default_factory=KernelConfig)

    def workload_ms(self, timer, config: KernelConfig) -> float:
        """Workload-weighted time of `config` by `timer`, ms per layer."""
        return sum(p.weight * timer.point_ms(config, self.workload, p) for p in self.workload.points)

    def evaluate(self, config: KernelConfig) -> dict:
        """Time and errors of one config (no trial): used for the default-config row and baselines."""
        ok, reason = self.timer.feasible(config, self.workload)
        if not ok:
            return {"feasible": False, "reason": reason}
        per_point = {point_key(p): self.timer.point_ms(config, self.workload, p) for p in self.workload.points}
        total = sum(p.weight * per_point[point_key(p)] for p in self.workload.points)
        return {"feasible": True, "ms": total, "per_point_ms": per_point, "accuracy": self.accuracy(config)}

    def constraints(self, acc: AccuracyResult) -> list[float]:
        return [acc.prefill_error - self.prefill_error_budget, acc.kv_error - self.kv_error_budget]

    def __call__(self, trial):
        import optuna

        config = suggest_config(trial, self.workload.kinds, self.base)
        ok, reason = self.timer.feasible(config, self.workload)
        if not ok:
            trial.set_user_attr("pruned_reason", reason)
            raise optuna.TrialPruned(f"infeasible: {reason}")
        acc = self.accuracy(config)
        trial.set_user_attr("prefill_error", acc.prefill_error)
        trial.set_user_attr("kv_error", acc.kv_error)
        trial.set_user_attr("prefill_sqnr_db", acc.prefill_sqnr_db)
        trial.set_user_attr("kv_compression", acc.kv_compression)
        constraint = self.constraints(acc)
        trial.set_user_attr("constraint", constraint)
        if hasattr(trial, "set_constraint"):  # Optuna >= 5: the samplers read it from the trial
            trial.set_constraint("prefill_error_over_budget", constraint[0])
            trial.set_constraint("kv_error_over_budget", constraint[1])
        trial.set_user_attr("config", config.to_dict())
        before = self.telemetry.sample() if self.telemetry else None
        t0 = time.perf_counter()
        try:
            per_point = {point_key(p): self.timer.point_ms(config, self.workload, p) for p in self.workload.points}
        except Exception as exc:  # compile failure (OutOfResources), NaN output, launch error
            trial.set_user_attr("failure", f"{type(exc).__name__}: {str(exc)[:300]}")
            return (math.nan,) * 3 if self.objective == "pareto" else math.nan
        trial.set_user_attr("timing_s", time.perf_counter() - t0)
        trial.set_user_attr("per_point_ms", per_point)
        trial.set_user_attr("source", self.timer.source)
        if self.telemetry:
            after = self.telemetry.sample()
            trial.set_user_attr("telemetry", {"before": before, "after": after})
            trial.set_user_attr("throttled", bool((before or {}).get("throttled") or (after or {}).get("throttled")))
        total = sum(p.weight * per_point[point_key(p)] for p in self.workload.points)
        if not math.isfinite(total):
            trial.set_user_attr("failure", "non-finite time")
            return (math.nan,) * 3 if self.objective == "pareto" else math.nan
        if self.objective == "pareto":
            kv_ratio = 1.0 / acc.kv_compression if math.isfinite(acc.kv_compression) and acc.kv_compression > 0 else 1.0
            return total, max(acc.prefill_error, acc.kv_error), kv_ratio
        return total


def constraints_func(frozen_trial) -> list[float]:
    """Optuna constraints: the values stored by Objective (<= 0 feasible); a trial without them is infeasible."""
    return list(frozen_trial.user_attrs.get("constraint", [1.0, 1.0]))
