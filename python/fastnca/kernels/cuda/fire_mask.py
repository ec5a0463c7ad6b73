from __future__ import annotations

import torch

from ... import _ext
from . import _launch


def fire_mask(batch, height, width, update_prob, seed, step, device):
    out = torch.empty(batch, height, width, dtype=torch.bool, device=device)
    with _launch.device_guard(out.device):
        _launch.module().fire_mask(out.data_ptr(), out.numel(), seed, step, _ext.fire_threshold(update_prob),
                                   _launch.stream(out.device))
    return out
