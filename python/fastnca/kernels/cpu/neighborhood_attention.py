"""Launchers of the fused C++ CPU neighbourhood-attention kernels
(csrc/cpu/neighborhood_attention.cpp).

The kernels read q, k, v (and o, grad_o in backward) through their element strides, so
strided views of one packed qkv tensor are used without a copy; only the head dim must be
contiguous. Every assumption the kernels make is checked here, loudly.

Environment: ``FASTNCA_CPU_ISA=base|avx2|avx512`` caps the instruction set (tests use it
to run the portable path on an AVX2 machine); default is the best the CPU supports.
``avx2-wide`` (tests only) runs the AVX-512 variant's 16-lane code compiled for AVX2.
"""
from __future__ import annotations

import os

import torch

from ... import _ext
from .._common import compute_dtype, cpu_threads

_ISA_CODES = {"": -1, "auto": -1, "base": 0, "avx2": 1, "avx512": 2, "avx2-wide": 3}


def _isa() -> int:
    name = os.environ.get("FASTNCA_CPU_ISA", "").strip().lower()
    if name not in _ISA_CODES:
        raise ValueError(f"FASTNCA_CPU_ISA must be one of {sorted(_ISA_CODES)}, got {name!r}")
    return _ISA_CODES[name]


def isa() -> str:
    """The instruction set the kernels run with here (after FASTNCA_CPU_ISA)."""
    return _module().na2d_isa(_isa())


def _module():
    mod = _ext.load("_C")
    if mod is None:
        raise RuntimeError(_ext.error("_C"))
    return mod


# The backward's workspace may always take this much (chunks smaller than this would cost
# more in per-call setup and thread wake-ups than they save).
WORKSPACE_MIN_BYTES = 16 << 20


def _check_qkv(q, k, v, kernel_size, border):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"cpu backend: {name} must be a CPU tensor, got device {t.device}")
        if t.dim() != 5:
            raise ValueError(f"cpu backend: {name} must be [B, H, W, heads, D], got shape {tuple(t.shape)}")
        if t.dtype not in _ext.DTYPE_CODES:
            raise TypeError(f"cpu backend: {name} must be float32/float16/bfloat16/float64, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"cpu backend: {name} must have stride 1 along D, got strides {t.stride()}")
        if t.numel() == 0:
            raise ValueError(f"cpu backend: {name} is empty, shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"cpu backend: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"cpu backend: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if kernel_size not in (3, 5, 7):
        raise ValueError(f"cpu backend: kernel_size must be 3, 5 or 7, got {kernel_size}")
    if border not in _ext.BORDER_CODES:
        raise ValueError(f"cpu backend: unknown border {border!r}")
    H, W = q.shape[1], q.shape[2]
    if border == "shift" and (H < kernel_size or W < kernel_size):
        raise ValueError(f"cpu backend: border='shift' needs H, W >= {kernel_size}, got {H}x{W}")


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:4]]


def forward(q, k, v, kernel_size, border, scale):
    _check_qkv(q, k, v, kernel_size, border)
    # device=: torch.set_default_device must not move the kernel's outputs off the CPU
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device)
    _module().na2d_forward(
        [q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()], _strides(q, k, v),
        list(q.shape), kernel_size, _ext.BORDER_CODES[border], float(scale), _ext.DTYPE_CODES[q.dtype],
        cpu_threads(), _isa())
    return o, lse


def _head_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype with stride 1 along D (copies only when that is not already so)."""
    t = t.to(dtype)
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale):
    _check_qkv(q, k, v, kernel_size, border)
    ct = compute_dtype(q.dtype)
    for name, t in (("grad_o", grad_o), ("o", o)):
        if t.shape != q.shape or t.device.type != "cpu":
            raise ValueError(f"cpu backend: {name} must be a CPU tensor of shape {tuple(q.shape)}, "
                             f"got {tuple(t.shape)} on {t.device}")
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is not None and (t.shape != q.shape[:-1] or t.device.type != "cpu"):
            raise ValueError(f"cpu backend: {name} must be a CPU tensor of shape {tuple(q.shape[:-1])}, "
                             f"got {tuple(t.shape)} on {t.device}")
    # grad_o may come with any strides (e.g. expanded zeros): stride 1 along D is all the
    # kernel needs. lse/grad_lse are small: contiguous in the compute dtype.
    grad_o = _head_contiguous(grad_o, q.dtype)
    lse = lse.to(ct).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(ct).contiguous()
    B, H, W, nh, D = q.shape
    kk = kernel_size * kernel_size
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    # p and scale*ds per window entry: 2*k^2 floats per (cell, head), up to 12x q's bytes at
    # kernel_size 7 and small D. Batch items are independent: in chunks, it stays within q's
    # bytes (or WORKSPACE_MIN_BYTES), with bitwise the same gradients.
    item_ws = H * W * nh * 2 * kk
    budget = max(q.numel() * q.element_size(), WORKSPACE_MIN_BYTES) // (torch.finfo(ct).bits // 8)  # elements
    chunk = max(1, min(B, budget // item_ws))
    ws = torch.empty(chunk * item_ws, dtype=ct, device=q.device)
    for b0 in range(0, B, chunk):
        part = slice(b0, min(B, b0 + chunk))
        ts = [t[part] for t in (q, k, v, grad_o)]  # o is not read (Di = sum_j p_ij dp_ij)
        ptrs = [*(t.data_ptr() for t in ts), lse[part].data_ptr(),
                0 if grad_lse is None else grad_lse[part].data_ptr(), ws.data_ptr(),
                dq[part].data_ptr(), dk[part].data_ptr(), dv[part].data_ptr()]
        _module().na2d_backward(
            ptrs, _strides(*ts), list(ts[0].shape), kernel_size, _ext.BORDER_CODES[border],
            float(scale), _ext.DTYPE_CODES[q.dtype], cpu_threads(), _isa())
    return dq, dk, dv
