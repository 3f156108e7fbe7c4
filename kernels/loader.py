"""Runtime loader of tuned configs (placeholder until the JSON loader lands: heuristic defaults)."""

from __future__ import annotations

from .config import KernelConfig


def heuristic_config(head_dim: int | None = None) -> KernelConfig:
    """The documented default: Br=128, Bc=64, 8 warps, 2 stages (KernelConfig's defaults)."""
    return KernelConfig()


def load_config(gpu: str | None = None, model: str | None = None, head_dim: int | None = None) -> KernelConfig:
    return heuristic_config(head_dim)
