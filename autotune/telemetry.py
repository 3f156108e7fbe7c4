"""NVML telemetry (nvidia-ml-py): GPU identity, and per-trial clocks, power, temperature, throttling.

Without NVML or a GPU every function returns None, and the tuner records nothing.
"""

from __future__ import annotations

from typing import Any

# Throttle reasons that mean the measurement ran below the clocks it would normally get
# (GPU idle and application-clock settings are not slowdowns).
_SLOWDOWN_REASONS = {
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}


class Telemetry:
    """Samples one GPU through NVML; `Telemetry.open()` returns None when NVML is unavailable."""

    def __init__(self, nvml, handle):
        self._nvml = nvml
        self._handle = handle

    @classmethod
    def open(cls, index: int = 0) -> "Telemetry | None":
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:
            return None

    def identity(self) -> dict[str, Any]:
        n, h = self._nvml, self._handle
        name = n.nvmlDeviceGetName(h)
        driver = n.nvmlSystemGetDriverVersion()
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "max_sm_clock_mhz": n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM)}

    def sample(self) -> dict[str, Any] | None:
        n, h = self._nvml, self._handle
        try:
            reasons = n.nvmlDeviceGetCurrentClocksEventReasons(h) if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons") \
                else n.nvmlDeviceGetCurrentClocksThrottleReasons(h)
            active = [name for name, bit in _SLOWDOWN_REASONS.items() if reasons & bit]
            return {
                "sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                "mem_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
                "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "temperature_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
                "throttle_reasons": active,
                "throttled": bool(active),
            }
        except Exception:
            return None


def summarize(samples: list[dict]) -> dict[str, Any]:
    """Min/median/max of clocks, power and temperature over trial samples, and the throttled share."""
    samples = [s for s in samples if s]
    if not samples:
        return {}
    out: dict[str, Any] = {}
    for key in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c"):
        values = sorted(float(s[key]) for s in samples if key in s)
        if values:
            out[key] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
    out["throttled_share"] = sum(1 for s in samples if s.get("throttled")) / len(samples)
    return out
