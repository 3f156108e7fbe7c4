"""Input validation shared by the public functions: every error names the argument and what was expected."""

from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, x, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")


def check_qkv(q, k, v, dtypes=FLOAT_DTYPES, head_dims=SUPPORTED_HEAD_DIMS, same_len: bool = False) -> tuple[int, int, int, int, int, int]:
    """Validate attention inputs in SDPA layout; return (B, Hq, Hkv, Nq, Nk, D).

    q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; Hq % Hkv == 0 (GQA); one dtype and device.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, ndim=4, dtypes=dtypes)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    b, hq, nq, d = q.shape
    bk, hkv, nk, dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"k must have q's batch size {b} in dim 0, got {bk}")
    if dk != d:
        raise ValueError(f"k and v must have q's head dim {d} in dim 3, got {dk}")
    if d not in head_dims:
        raise ValueError(f"head dim (q.shape[3]) must be one of {list(head_dims)}, got {d}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q's head count ({hq}) must be a multiple of k/v's head count ({hkv}) for GQA")
    if nq < 1 or nk < 1:
        raise ValueError(f"sequence lengths must be >= 1, got q: {nq}, k/v: {nk}")
    if same_len and nq != nk:
        raise ValueError(f"q and k/v must have the same sequence length here, got {nq} and {nk}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(x.stride())}")
    return b, hq, hkv, nq, nk, d


def check_kernel_device(device, subject: str) -> None:
    """Triton kernels run on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1 set before
    triton is imported); anything else raises ValueError starting with `subject`."""
    import os

    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return
    raise ValueError(f"{subject} (or on the CPU with TRITON_INTERPRET=1 set before triton is imported), "
                     f"got {device}")


def check_sm_scale(sm_scale) -> None:
    if sm_scale is None:
        return
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not sm_scale > 0 or sm_scale != sm_scale:
        raise ValueError(f"sm_scale must be a positive float or None, got {sm_scale!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_config(config):
    from .config import KernelConfig

    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a kernels.KernelConfig or None, got {type(config).__name__}")
    return config
