"""Calibration: measured ceilings and fitted efficiency factors for one GPU, as JSON.

A Calibration replaces datasheet peaks with measured ones (copy bandwidth, cuBLAS matmul rates)
and the default efficiency factors with fitted ones. Files live in one folder, one per GPU key:
$ROOFLINE_CALIBRATION_DIR/<gpu>.json when the variable is set, else roofline/calibrations/<gpu>.json.

  cal = load_calibration("h100")          # saved file, or datasheet defaults (warned once)
  cal = measure_ceilings()                # on a GPU: copy, fp16, int8 (and fp8) matmul rates
  fit = fit_efficiency(records)           # records: (Prediction, measured_ms) pairs
  save_calibration(cal.with_efficiency(fit.efficiency))
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from .cost import DEFAULT_EFFICIENCY, DEFAULT_EFFICIENCY_VS_MEASURED, ROOFS, Prediction, check_efficiency_key
from .gpus import GPUSpec, UnknownGPUError, detect_gpu, normalize_gpu_name, resolve_gpu

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ENV_CALIBRATION_DIR = "ROOFLINE_CALIBRATION_DIR"
PACKAGED_CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"
SOURCES = ("measured", "datasheet")
EFFICIENCY_RANGE = (0.01, 2.0)  # above 1 is allowed: a ceiling may be measured below the real peak


class CalibrationWarning(UserWarning):
    """No saved calibration for a GPU: datasheet peaks and default efficiencies are used."""


def _today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Calibration:
    """Ceilings (None = use the datasheet figure) and efficiency factors per roof of one GPU.

    copy_gbps: device-to-device copy, (read + write bytes) / s in 10^9; int8_tops, fp16_tflops,
    fp8_tflops: dense matmul rates in 10^12/s. efficiency: roof -> fraction of the ceiling a
    kernel reaches, plus optional "<kernel>.<roof>" keys for one kernel (missing roofs take
    DEFAULT_EFFICIENCY_VS_MEASURED when source is "measured", DEFAULT_EFFICIENCY otherwise).
    """

    gpu: str
    copy_gbps: float | None = None
    int8_tops: float | None = None
    fp16_tflops: float | None = None
    fp8_tflops: float | None = None
    efficiency: dict = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    source: str = "datasheet"
    created: str = field(default_factory=_today)
    notes: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu", normalize_gpu_name(self.gpu))
        if self.source not in SOURCES:
            raise ValueError(f"Calibration.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"Calibration.schema_version must be {SCHEMA_VERSION}, got {self.schema_version!r}")
        for name in ("copy_gbps", "int8_tops", "fp16_tflops", "fp8_tflops"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"Calibration.{name} must be a positive number or None, got {value!r}")
        if not isinstance(self.efficiency, Mapping):
            raise ValueError(f"Calibration.efficiency must be a mapping roof -> factor, got {self.efficiency!r}")
        lo, hi = EFFICIENCY_RANGE
        for key, value in self.efficiency.items():
            try:
                check_efficiency_key(key)
            except ValueError as exc:
                raise ValueError(f"Calibration.efficiency: {exc}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"Calibration.efficiency[{key!r}] must be in [{lo}, {hi}], got {value!r}")
        object.__setattr__(self, "efficiency", {r: float(v) for r, v in self.efficiency.items()})

    def with_efficiency(self, efficiency: Mapping[str, float], notes: str | None = None) -> "Calibration":
        """A copy with efficiency factors replaced (merged over this one's) and a fresh date."""
        merged = dict(self.efficiency)
        merged.update(efficiency)
        return dataclasses.replace(self, efficiency=merged, created=_today(),
                                   notes=self.notes if notes is None else notes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibration":
        if not isinstance(data, Mapping):
            raise ValueError(f"a calibration must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown calibration field(s) {sorted(unknown)}; fields: {sorted(known)}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"calibration schema_version {data.get('schema_version')!r} is not supported "
                             f"(this roofline reads version {SCHEMA_VERSION})")
        return cls(**dict(data))


def datasheet_calibration(gpu: "str | GPUSpec") -> Calibration:
    """No measured ceilings, DEFAULT_EFFICIENCY, source "datasheet"."""
    return Calibration(gpu=resolve_gpu(gpu).key, efficiency=dict(DEFAULT_EFFICIENCY), source="datasheet",
                       notes="datasheet peaks with default efficiency factors")


def calibration_dir(directory: "str | os.PathLike | None" = None) -> Path:
    """`directory`, else $ROOFLINE_CALIBRATION_DIR, else the packaged roofline/calibrations/."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(ENV_CALIBRATION_DIR)
    return Path(env) if env else PACKAGED_CALIBRATION_DIR


def calibration_path(gpu: "str | GPUSpec", directory: "str | os.PathLike | None" = None) -> Path:
    return calibration_dir(directory) / f"{resolve_gpu(gpu).key}.json"


def save_calibration(calibration: Calibration, directory: "str | os.PathLike | None" = None) -> Path:
    """Write `calibration` as <dir>/<gpu>.json (atomically: a temporary file, then a rename)."""
    path = calibration_path(calibration.gpu, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    logger.info("saved roofline calibration for %s to %s", calibration.gpu, path)
    return path


_warned_missing: set[str] = set()


def load_calibration(gpu: "str | GPUSpec", directory: "str | os.PathLike | None" = None) -> Calibration:
    """The saved calibration of `gpu`, or datasheet_calibration(gpu) with a CalibrationWarning
    (once per GPU and process) when no file exists. A file that does not validate, or that names
    another GPU, raises ValueError naming the file."""
    key = resolve_gpu(gpu).key
    path = calibration_path(key, directory)
    if not path.is_file():
        if key not in _warned_missing:
            _warned_missing.add(key)
            warnings.warn(f"no roofline calibration for {key} at {path}; using datasheet peaks with default "
                          f"efficiency factors (run roofline.calibrate.measure_ceilings on that GPU)",
                          CalibrationWarning, stacklevel=2)
        return datasheet_calibration(key)
    try:
        data = json.loads(path.read_text())
        calibration = Calibration.from_dict(data)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid roofline calibration file {path}: {exc}") from exc
    if calibration.gpu != key:
        raise ValueError(f"calibration file {path} is for gpu {calibration.gpu!r}, not {key!r}")
    return calibration


# ----------------------------------------------------------------------------- measuring

def _time_cuda_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() between CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(device: str = "cuda", gpu: "str | None" = None, copy_bytes: int = 1 << 30,
                     matmul_size: int = 8192, warmup: int = 3, repeats: int = 10) -> Calibration | None:
    """Measure the ceilings of a CUDA device; None (logged) when CUDA is unavailable.

    copy: dst.copy_(src) of `copy_bytes`, GB/s = 2 * copy_bytes / t (read + write).
    fp16: torch.matmul of two [S, S] fp16 matrices, 2*S^3 / t.
    int8: torch._int_mm(a [S, S], b) with b column-major (K-major, the fast INT8 layout), 2*S^3 / t.
    fp8 (cc >= 8.9, when torch._scaled_mm works): e4m3 x e4m3 -> bf16, 2*S^3 / t.
    Efficiency factors start at DEFAULT_EFFICIENCY_VS_MEASURED; fit them with fit_efficiency.
    """
    try:
        import torch
    except ImportError:
        logger.info("measure_ceilings: torch is not installed; skipped")
        return None
    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        logger.info("measure_ceilings: no CUDA device (%s); skipped", device)
        return None
    index = torch.device(device).index or 0
    key = normalize_gpu_name(gpu) if gpu else detect_gpu(index)
    if key is None:
        raise UnknownGPUError(f"measure_ceilings: GPU {torch.cuda.get_device_name(index)!r} is not in roofline.GPUS; "
                              f"pass gpu= one of the known keys to label the measurement")
    dev = torch.device("cuda", index)
    with torch.cuda.device(dev):
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_ms = _time_cuda_ms(lambda: dst.copy_(src), warmup, repeats)
        copy_gbps = 2 * copy_bytes / (copy_ms * 1e-3) / 1e9
        del src, dst
        s = matmul_size
        flops = 2.0 * s ** 3
        a = torch.randn(s, s, device=dev, dtype=torch.float16)
        b = torch.randn(s, s, device=dev, dtype=torch.float16)
        fp16_tflops = flops / (_time_cuda_ms(lambda: torch.matmul(a, b), warmup, repeats) * 1e-3) / 1e12
        int8_tops = fp8_tflops = None
        try:
            ai = torch.randint(-127, 128, (s, s), device=dev, dtype=torch.int8)
            bi = torch.randint(-127, 128, (s, s), device=dev, dtype=torch.int8).t()  # column-major [K, N]
            int8_tops = flops / (_time_cuda_ms(lambda: torch._int_mm(ai, bi), warmup, repeats) * 1e-3) / 1e12
        except (RuntimeError, AttributeError) as exc:
            logger.info("measure_ceilings: int8 matmul unavailable (%s)", exc)
        if torch.cuda.get_device_capability(dev) >= (8, 9) and hasattr(torch, "float8_e4m3fn"):
            try:
                af = a.to(torch.float8_e4m3fn)
                bf = b.to(torch.float8_e4m3fn).t()  # column-major second operand, as _scaled_mm requires
                one = torch.ones((), device=dev, dtype=torch.float32)
                run = lambda: torch._scaled_mm(af, bf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                fp8_tflops = flops / (_time_cuda_ms(run, warmup, repeats) * 1e-3) / 1e12
            except (RuntimeError, AttributeError, TypeError) as exc:
                logger.info("measure_ceilings: fp8 matmul unavailable (%s)", exc)
    return Calibration(gpu=key, copy_gbps=copy_gbps, int8_tops=int8_tops, fp16_tflops=fp16_tflops,
                       fp8_tflops=fp8_tflops, efficiency=dict(DEFAULT_EFFICIENCY_VS_MEASURED), source="measured",
                       notes=f"measure_ceilings on {torch.cuda.get_device_name(index)}, torch {torch.__version__}")


# ----------------------------------------------------------------------------- fitting

class EfficiencyFit(NamedTuple):
    """efficiency: fitted factors, keyed by roof (or "<kernel>.<roof>" with per_kernel); keys no
    record constrains keep their starting value (per_kernel: are left out); rms_log_error:
    sqrt(mean((ln predicted - ln measured)^2)) at the fit; fitted_roofs: the keys the records
    constrained; records: how many records were used."""

    efficiency: dict
    rms_log_error: float
    fitted_roofs: tuple
    records: int


def _as_records(records: Iterable) -> list[tuple[Prediction, float]]:
    out = []
    for i, record in enumerate(records):
        if isinstance(record, Mapping):
            prediction, measured = record.get("prediction"), record.get("measured_ms")
        else:
            prediction, measured = record
        if not isinstance(prediction, Prediction):
            raise TypeError(f"records[{i}]: expected a roofline Prediction, got {type(prediction).__name__}")
        if isinstance(measured, bool) or not isinstance(measured, (int, float)) or not measured > 0:
            raise ValueError(f"records[{i}]: measured_ms must be a positive number, got {measured!r}")
        out.append((prediction, float(measured) * 1e-3))
    if not out:
        raise ValueError("fit_efficiency needs at least one (prediction, measured_ms) record")
    return out


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are at most 4 x 4)."""
    n = len(rhs)
    a = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                factor = a[r][col] / a[col][col]
                a[r] = [x - factor * y for x, y in zip(a[r], a[col])]
    return [a[i][n] / a[i][i] if abs(a[i][i]) > 1e-300 else 0.0 for i in range(n)]


def fit_efficiency(records: Iterable, start: Mapping[str, float] | None = None, per_kernel: bool = False,
                   prior_weight: float = 1e-4, max_iterations: int = 200, tolerance: float = 1e-14) -> EfficiencyFit:
    """Fit efficiency factors to measured times by least squares in log space.

    records: (Prediction, measured_ms) pairs or {"prediction": ..., "measured_ms": ...} mappings.
    Minimises sum_i (ln T_i(e) - ln measured_i)^2 over x = ln e, where T_i(e) = Prediction.retime(e)
    re-evaluates the roofline with each prediction's own structural terms (overlaps, waves,
    overheads). One factor per roof, or with per_kernel one per (kernel, roof) as "<kernel>.<roof>".
    Levenberg-Marquardt with a forward-difference Jacobian; factors kept in EFFICIENCY_RANGE.
    Only factors of roofs that bound at least one record are fitted (the set grows when the fit
    makes another roof binding); the rest keep their start (`start`, else the predictions' own).
    prior_weight * sum (x - x_start)^2 is added to the loss so that factors the records barely
    separate stay near their start instead of drifting along a valley of the loss. rms_log_error
    reports the data term alone. Jacobian steps alternate with a derivative-free search along
    each factor, because the roofline's max() has kinks where Levenberg-Marquardt stalls.
    """
    pairs = _as_records(records)
    start = dict(start or {})

    def name(kernel: str, roof: str) -> str:
        return f"{kernel}.{roof}" if per_kernel else roof

    lo, hi = (math.log(v) for v in EFFICIENCY_RANGE)
    x: dict[str, float] = {}
    for prediction, _ in pairs:
        for roof in ROOFS:
            key = name(prediction.kernel, roof)
            if key not in x:
                value = start.get(key, start.get(roof, prediction.efficiency[roof]))
                x[key] = min(hi, max(lo, math.log(value)))
    keys_of = [{roof: name(p.kernel, roof) for roof in ROOFS} for p, _ in pairs]
    targets = [math.log(t) for _, t in pairs]
    x_start = dict(x)
    prior = math.sqrt(prior_weight)

    def residuals(params: Mapping[str, float]) -> list[float]:
        data = [math.log(p.retime({roof: math.exp(params[k]) for roof, k in keys.items()})) - y
                for (p, _), keys, y in zip(pairs, keys_of, targets)]
        return data + [prior * (params[k] - x_start[k]) for k in x_start]

    def loss(res: list[float]) -> float:
        return sum(v * v for v in res)

    h = 1e-6
    res = residuals(x)
    current = loss(res)

    def binding(params: Mapping[str, float]) -> set:
        """Keys of the roofs that bound at least one record under `params`."""
        keys = set()
        for (p, _), names in zip(pairs, keys_of):
            times = {roof: p.ideal_roof_times[roof] / math.exp(params[names[roof]]) for roof in ROOFS}
            keys.add(names[max(ROOFS, key=times.__getitem__)])
        return keys
    def levenberg_marquardt(x, res, current):
        lam = 1e-3
        for _ in range(max_iterations):
            if not fitted or current < tolerance:
                break
            columns = []
            for key in fitted:
                shifted = dict(x, **{key: x[key] + h})
                columns.append([(a - b) / h for a, b in zip(residuals(shifted), res)])
            jtj = [[sum(ci * cj for ci, cj in zip(a, b)) for b in columns] for a in columns]
            jtr = [sum(ci * ri for ci, ri in zip(a, res)) for a in columns]
            improved = converged = False
            for _attempt in range(30):
                damped = [[jtj[i][j] + (lam * (jtj[i][i] + 1e-12) if i == j else 0.0) for j in range(len(fitted))]
                          for i in range(len(fitted))]
                step = _solve(damped, [-v for v in jtr])
                trial = dict(x)
                for key, dx in zip(fitted, step):
                    trial[key] = min(hi, max(lo, x[key] + dx))
                trial_res = residuals(trial)
                trial_loss = loss(trial_res)
                if trial_loss < current:
                    converged = current - trial_loss < tolerance * max(1.0, current)
                    x, res, current = trial, trial_res, trial_loss
                    lam = max(lam / 3.0, 1e-12)
                    improved = True
                    break
                lam *= 4.0
            if not improved or converged:
                break
        return x, res, current

    def coordinate_search(x, res, current):
        """Derivative-free 1-D minimisation per factor (a grid over the whole range, then golden
        section in the best cell): the roofline's max() has kinks where Jacobian steps stall."""
        grid = [lo + (hi - lo) * i / 48 for i in range(49)]
        for key in fitted:
            def f(v):
                return loss(residuals(dict(x, **{key: v})))
            values = [f(v) for v in grid]
            i = min(range(len(grid)), key=values.__getitem__)
            a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
            g = (math.sqrt(5) - 1) / 2
            c, d = b - g * (b - a), a + g * (b - a)
            fc, fd = f(c), f(d)
            for _ in range(60):
                if fc < fd:
                    b, d, fd = d, c, fc
                    c = b - g * (b - a)
                    fc = f(c)
                else:
                    a, c, fc = c, d, fd
                    d = a + g * (b - a)
                    fd = f(d)
            best = min(((fc, c), (fd, d), (values[i], grid[i]), (current, x[key])))
            if best[0] < current:
                x = dict(x, **{key: best[1]})
                res = residuals(x)
                current = loss(res)
        return x, res, current

    # Only the factors of roofs that bound some record are fitted: the others enter the times
    # only through the partial-overlap terms, too weakly to be told apart (they would drift along
    # valleys of the loss). The set grows when a fit makes another roof binding.
    fitted: tuple = ()
    for _growth in range(len(x)):
        wanted = tuple(k for k in x if k in binding(x) or k in fitted)
        if wanted == fitted:
            break
        fitted = wanted
        x, res, current = levenberg_marquardt(x, res, current)
        for _round in range(20):  # alternate until neither method improves
            if current < tolerance:
                break
            before = current
            x, res, current = coordinate_search(x, res, current)
            x, res, current = levenberg_marquardt(x, res, current)
            if before - current <= tolerance * max(1.0, before):
                break
    keep = fitted if per_kernel else tuple(x)
    efficiency = {k: math.exp(x[k]) for k in keep}
    data_loss = sum(v * v for v in res[:len(pairs)])
    return EfficiencyFit(efficiency=efficiency, rms_log_error=math.sqrt(data_loss / len(pairs)),
                         fitted_roofs=fitted, records=len(pairs))
