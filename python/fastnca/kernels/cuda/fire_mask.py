from __future__ import annotations

import torch

from ... import _ext


def fire_mask(batch, height, width, update_prob, seed, step, device):
    out = torch.empty(batch, height, width, dtype=torch.bool, device=device)
    with torch.cuda.device(out.device):
        _ext.load("_C_cuda").fire_mask(
            out.data_ptr(), out.numel(), seed, step, _ext.fire_threshold(update_prob),
            _ext.cuda_stream(out.device),
        )
    return out
