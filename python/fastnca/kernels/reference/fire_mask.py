"""Philox4x32-10 and the fire mask in plain PyTorch integer arithmetic.

32-bit words are held in int64 tensors; products of two 32-bit words are split so that no
intermediate leaves int64 (torch has no uint64 multiply-high).
"""
from __future__ import annotations

import torch

from ..._ext import fire_threshold

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a < 2^32 and b in [0, 2^32)."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten Philox rounds on int64 tensors of 32-bit counter words; key words are ints."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def fire_bits(n: int, seed: int, step: int, device=None) -> torch.Tensor:
    """The 24-bit draws of cells 0..n-1 at ``step`` (int64): a cell fires iff its draw is
    below fire_threshold(update_prob)."""
    return fire_bits_of(torch.arange(n, dtype=torch.int64, device=device), seed, step)


def fire_bits_of(cell: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """The 24-bit draws of the cells whose indices (int64, any in [0, 2^63)) ``cell`` holds."""
    zero = torch.zeros_like(cell)
    out0, _, _, _ = philox4x32_10(
        cell & _MASK32, cell >> 32, zero + (step & _MASK32), zero, seed & _MASK32, seed >> 32
    )
    return out0 >> 8


def fire_mask(batch, height, width, update_prob, seed, step, device):
    bits = fire_bits(batch * height * width, seed, step, device)
    return (bits < fire_threshold(update_prob)).view(batch, height, width)
