from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _ext
from ._philox import fire_bits
from ._runtime import cdiv, on_device


# Not specialised: Triton would turn a seed or step word equal to 1 into a constant, which
# has no .to(), and compile one kernel per such value.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "threshold"])
def _fire_mask_kernel(out_ptr, numel, seed_lo, seed_hi, step_lo, threshold, BLOCK: tl.constexpr):
    cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bits = fire_bits(cell, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), step_lo.to(tl.uint32))
    tl.store(out_ptr + cell, bits < threshold.to(tl.uint32), mask=cell < numel)


def fire_mask(batch, height, width, update_prob, seed, step, device):
    out = torch.empty(batch, height, width, dtype=torch.bool, device=device)
    numel = out.numel()
    if numel:
        block = 1024
        with on_device(out.device):
            _fire_mask_kernel[(cdiv(numel, block),)](
                out, numel, seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF,
                _ext.fire_threshold(update_prob), BLOCK=block,
            )
    return out
