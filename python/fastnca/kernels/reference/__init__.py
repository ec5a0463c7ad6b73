"""Pure-PyTorch ground truth of every op: written for clarity, used by the tests and as the fallback."""
from __future__ import annotations

import functools

import torch


def no_autocast(fn):
    """Run a reference kernel with autocast off on its first tensor's device: it computes in
    float32 (float64 for float64 inputs) as the fused kernels do, where an enclosing
    ``torch.autocast`` would otherwise run its convolutions and einsums in bf16/fp16 (and
    feed the convolution backward mixed dtypes)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or not _autocasting(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def _autocasting(device: str) -> bool:
    """Whether autocast is on for ``device`` (False for devices autocast does not know, e.g.
    "meta", where entering even a disabled torch.autocast raises)."""
    try:
        return bool(torch.is_autocast_enabled(device))
    except TypeError:  # torch 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device == "cpu" else
                    device == "cuda" and torch.is_autocast_enabled())
    except RuntimeError:
        return False
