"""TurboAttention runtime library: Triton kernels, their plain-torch reference, configs and loader.

Importing this package needs torch only; the Triton kernels load on first use, and Optuna,
pandas and matplotlib are never imported here.
"""

from .config import DEFAULT_CONFIG, KernelConfig

__all__ = ["KernelConfig", "DEFAULT_CONFIG", "turbo_attention", "TurboKVCache", "load_config"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: the kernels import triton, which a user of the reference or config alone does not need.
    if name == "turbo_attention":
        from .prefill import turbo_attention

        return turbo_attention
    if name == "TurboKVCache":
        from .cache import TurboKVCache

        return TurboKVCache
    if name == "load_config":
        from .loader import load_config

        return load_config
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
