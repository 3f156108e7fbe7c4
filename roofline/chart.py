"""Roofline chart: the data as a small named tuple first (tested), the drawing second (thin).

Axes: arithmetic intensity (nominal ops per DRAM byte) against nominal ops per second (TOPS),
both logarithmic. Roofs: the memory roof (bandwidth x intensity, up to the highest compute roof),
INT8 and FP16 tensor-core peaks, and the SFU roof of attention: an exponential per score element
and 4*D nominal ops per score element, so the SFU caps attention at sfu_tops * 4 * D.
matplotlib is imported only inside draw_roofline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .cost import Prediction, ceilings
from .gpus import resolve_gpu


class RoofLine(NamedTuple):
    name: str
    peak_tops: float  # the flat part, 10^12 ops/s (the memory roof: its value at the right end)
    x: tuple  # intensities (ops/byte), ascending
    y: tuple  # attainable TOPS at each x


class ChartPoint(NamedTuple):
    label: str
    intensity: float
    achieved_tops: float
    bound: str


class RooflineChartData(NamedTuple):
    gpu: str
    title: str
    memory_gbps: float
    ridge_intensity: dict  # roof name -> intensity where the memory roof meets it
    roofs: tuple  # RoofLine, the memory roof first
    points: tuple  # ChartPoint
    x_range: tuple  # (min, max) intensity shown


def _as_point(item: Any) -> ChartPoint:
    if isinstance(item, ChartPoint):
        return item
    if isinstance(item, Prediction):
        return ChartPoint(item.label, item.intensity, item.achieved_tops, item.bound)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Prediction):
        label, p = item
        return ChartPoint(str(label), p.intensity, p.achieved_tops, p.bound)
    if isinstance(item, tuple) and len(item) in (3, 4):
        label, intensity, tops = item[:3]
        return ChartPoint(str(label), float(intensity), float(tops), item[3] if len(item) == 4 else "")
    raise TypeError(f"points: expected Prediction, (label, Prediction), (label, intensity, tops) or ChartPoint, "
                    f"got {item!r}")


def roofline_chart_data(gpu, points: Iterable = (), calibration=None, head_dim: int = 128,
                        samples: int = 64) -> RooflineChartData:
    """Roof lines of `gpu` (measured ceilings from `calibration` where it has them) and the points.

    Each roof is sampled at `samples` log-spaced intensities over x_range, attainable =
    min(peak, bandwidth * intensity); x_range spans two decades either side of the ridges and
    covers every point.
    """
    spec = resolve_gpu(gpu)
    peaks, _efficiency, source = ceilings(spec, calibration)
    bandwidth_tops_per_intensity = peaks["memory"] / 1e12  # TOPS per (op/byte)
    compute = {"INT8 tensor core": peaks["int8_tc"] / 1e12, "FP16 tensor core": peaks["fp16_tc"] / 1e12,
               f"SFU exp2 (D={head_dim})": peaks["sfu"] / 1e12 * 4 * head_dim}
    pts = tuple(_as_point(p) for p in points)
    ridges = {name: peak / bandwidth_tops_per_intensity for name, peak in compute.items()}
    finite = [p.intensity for p in pts if p.intensity > 0 and math.isfinite(p.intensity)]
    x_lo = min([min(ridges.values()) / 100] + [v / 2 for v in finite])
    x_hi = max([max(ridges.values()) * 100] + [v * 2 for v in finite])
    step = (math.log10(x_hi) - math.log10(x_lo)) / (samples - 1)
    xs = tuple(10 ** (math.log10(x_lo) + i * step) for i in range(samples))
    top = max(compute.values())
    roofs = [RoofLine("memory", min(top, bandwidth_tops_per_intensity * xs[-1]), xs,
                      tuple(min(top, bandwidth_tops_per_intensity * x) for x in xs))]
    for name, peak in compute.items():
        roofs.append(RoofLine(name, peak, xs, tuple(min(peak, bandwidth_tops_per_intensity * x) for x in xs)))
    title = f"{spec.name} roofline ({source} ceilings, {peaks['memory'] / 1e9:.0f} GB/s)"
    return RooflineChartData(gpu=spec.key, title=title, memory_gbps=peaks["memory"] / 1e9, ridge_intensity=ridges,
                             roofs=tuple(roofs), points=pts, x_range=(x_lo, x_hi))


def draw_roofline(data: RooflineChartData, path) -> Path:
    """Write `data` as a log-log PNG at `path` (matplotlib's Agg canvas; no global backend change)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # optional dependency of the report only
        raise ImportError("draw_roofline needs matplotlib (pip install matplotlib)") from exc
    path = Path(path)
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for roof in data.roofs:
        style = "-" if roof.name == "memory" else "--"
        ax.plot(roof.x, roof.y, style, linewidth=1.5, label=roof.name)
    # one colour and legend entry per group of points (their `bound` field), labels alternately
    # above and below their point so that neighbours overlap less
    shown = [p for p in data.points if p.intensity > 0 and p.achieved_tops > 0]
    groups: dict = {}
    for point in shown:
        groups.setdefault(point.bound, []).append(point)
    markers = "osD^v<>ph*"
    for k, (group, members) in enumerate(groups.items()):
        ax.plot([p.intensity for p in members], [p.achieved_tops for p in members], markers[k % len(markers)],
                markersize=5, alpha=0.8, label=group or None)
    for k, point in enumerate(p for p in shown if p.label):
        ax.annotate(point.label, (point.intensity, point.achieved_tops), fontsize=7,
                    textcoords="offset points", xytext=(4, 4 if k % 2 == 0 else -10))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*data.x_range)
    ax.set_xlabel("arithmetic intensity (ops / DRAM byte)")
    ax.set_ylabel("TOPS (nominal attention ops)")
    ax.set_title(data.title, fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
