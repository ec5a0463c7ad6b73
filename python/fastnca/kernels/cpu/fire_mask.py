from __future__ import annotations

import torch

from ... import _ext


def fire_mask(batch, height, width, update_prob, seed, step, device):
    out = torch.empty(batch, height, width, dtype=torch.bool, device=device)
    _ext.load("_C").fire_mask(out.data_ptr(), out.numel(), seed, step, _ext.fire_threshold(update_prob))
    return out
