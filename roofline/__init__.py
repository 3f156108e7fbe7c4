"""Roofline cost model of the TurboAttention kernels: GPU and model specifications as data,
per-kernel operation and byte counts, feasibility, predicted time, calibration and charts.

Imports nothing of this project's other packages (kernels, autotune); a KernelConfig is read
through its attributes. matplotlib is imported only when a chart is drawn.
"""

from .calibrate import (Calibration, CalibrationWarning, EfficiencyFit, calibration_dir, calibration_path,
                        datasheet_calibration, fit_efficiency, load_calibration, measure_ceilings, save_calibration)
from .chart import ChartPoint, RoofLine, RooflineChartData, draw_roofline, roofline_chart_data
from .cost import (CONFIG_DEFAULTS, DEFAULT_EFFICIENCY, DEFAULT_EFFICIENCY_VS_MEASURED, KERNELS, ROOFS, UNITS,
                   AttentionShape, Cost, InfeasibleConfigError, Prediction, ResourceUsage, check_feasible,
                   compute_head_dim, decode_num_splits, efficiency_for, kernel_cost, padded_head_dim, predict,
                   resource_usage)
from .gpus import GPUS, GPUSpec, UnknownGPUError, detect_gpu, detect_gpu_name, normalize_gpu_name, resolve_gpu
from .models import (MODELS, ModelSpec, UnknownModelError, Workload, WorkloadPoint, default_workload,
                     model_from_hf_config, resolve_model)

__all__ = [
    "GPUS", "GPUSpec", "UnknownGPUError", "detect_gpu", "detect_gpu_name", "normalize_gpu_name", "resolve_gpu",
    "MODELS", "ModelSpec", "UnknownModelError", "Workload", "WorkloadPoint", "default_workload",
    "model_from_hf_config", "resolve_model",
    "CONFIG_DEFAULTS", "DEFAULT_EFFICIENCY", "DEFAULT_EFFICIENCY_VS_MEASURED", "KERNELS", "ROOFS", "UNITS",
    "AttentionShape", "Cost", "InfeasibleConfigError", "Prediction", "ResourceUsage", "check_feasible",
    "compute_head_dim", "decode_num_splits", "efficiency_for", "kernel_cost", "padded_head_dim", "predict",
    "resource_usage",
    "Calibration", "CalibrationWarning", "EfficiencyFit", "calibration_dir", "calibration_path",
    "datasheet_calibration", "fit_efficiency", "load_calibration", "measure_ceilings", "save_calibration",
    "ChartPoint", "RoofLine", "RooflineChartData", "draw_roofline", "roofline_chart_data",
]
