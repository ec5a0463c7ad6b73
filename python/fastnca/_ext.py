"""Loading of the compiled modules and the code tables shared with csrc/.

The compiled modules take raw pointers, element strides and small integer codes; the
tables here must match csrc/include/fastnca/{common,borders}.h.
"""
from __future__ import annotations

import importlib
import math

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
PADDING_CODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
BORDER_CODES = {"zeros": 0, "mask": 1, "circular": 2, "shift": 3}

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}


def load(name: str):
    """Import ``fastnca.<name>`` once; return it, or None with the reason kept in ``error``."""
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"fastnca.{name}")
        except ImportError as e:  # a missing build is a supported configuration
            _errors[name] = f"fastnca.{name} is not importable ({e})"
    return _modules.get(name)


def error(name: str) -> str | None:
    load(name)
    return _errors.get(name)


def fire_threshold(update_prob: float) -> int:
    """Integer threshold t with ``u < update_prob  <=>  (out0 >> 8) < t`` (u = k * 2^-24)."""
    return min(1 << 24, max(0, math.ceil(float(update_prob) * (1 << 24))))


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
