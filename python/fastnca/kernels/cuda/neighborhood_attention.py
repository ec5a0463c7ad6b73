"""Launchers of the CUDA neighbourhood-attention kernels (csrc/cuda/neighborhood_attention.cu).

q, k, v are read through their strides (only stride(-1) == 1 is required, so views of a
packed QKV tensor need no copy); grad_o may have any strides. o, dq, dk, dv are contiguous
in the input dtype, lse contiguous float32. The backward needs one float32 workspace
[B, H, W, heads] (D_i of every query).

The kernels read rows as 16-byte vectors when every row of q, k, v (and grad_o) starts on a
16-byte boundary, else element by element. The backward copies a grad_o whose rows are not
vectors when q's are, so that it runs at the forward's width (and recomputes its logits bit
for bit).
"""
from __future__ import annotations

import torch

from ... import _ext
from . import _launch


def _rows_are_vectors(t):
    """Whether the kernels read every [..., D] row of t as 16-byte vectors (their own test:
    the strides of size-1 dimensions are never used)."""
    return _launch.module().na2d_rows_are_vectors(t.data_ptr(), list(t.stride()), list(t.shape),
                                                  t.element_size())


def _check(q, k, v, kernel_size, border):
    for name, t in (("query", q), ("key", k), ("value", v)):
        _launch.check_tensor(t, name, "neighborhood_attention2d")
        if t.dim() != 5 or tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"q, k, v must share the shape [B, H, W, heads, D], got {tuple(t.shape)} for {name}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError("q, k, v must share dtype and device")
        if t.stride(-1) != 1 or any(s < 0 for s in t.stride()):
            raise ValueError(f"{name} must have stride(-1) == 1 and non-negative strides, got {tuple(t.stride())}")
    if kernel_size not in (3, 5, 7):
        raise ValueError(f"kernel_size must be 3, 5 or 7, got {kernel_size}")
    if border not in _ext.BORDER_CODES:
        raise ValueError(f"unknown border {border!r}")
    B, H, W = q.shape[:3]
    if border == "shift" and (H < kernel_size or W < kernel_size):
        raise ValueError(f"border='shift' needs H, W >= kernel_size={kernel_size}, got {H}x{W}")
    return tuple(q.shape)


def forward(q, k, v, kernel_size, border, scale):
    B, H, W, nh, D = _check(q, k, v, kernel_size, border)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    with _launch.device_guard(q.device):
        _launch.module().na2d_forward(
            q.data_ptr(), list(q.stride()), k.data_ptr(), list(k.stride()), v.data_ptr(), list(v.stride()),
            o.data_ptr(), lse.data_ptr(), B, H, W, nh, D, kernel_size, _ext.BORDER_CODES[border],
            float(scale), _ext.DTYPE_CODES[q.dtype], _launch.stream(q.device))
    return o, lse


def backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale):
    """o is not read: D_i = sum_j p_ij dp_ij is formed from the fp32 recomputation."""
    B, H, W, nh, D = _check(q, k, v, kernel_size, border)
    if tuple(grad_o.shape) != tuple(q.shape) or grad_o.device != q.device:
        raise ValueError(f"grad_o must be a {tuple(q.shape)} tensor on {q.device}, got {tuple(grad_o.shape)} on {grad_o.device}")
    if grad_o.dtype != q.dtype:
        grad_o = grad_o.to(q.dtype)
    if any(s < 0 for s in grad_o.stride()) or (
            not _rows_are_vectors(grad_o) and all(_rows_are_vectors(t) for t in (q, k, v))):
        # a fresh copy: .contiguous() hands back a contiguous view as it is, whatever its
        # alignment (a storage offset, or odd strides of size-1 dimensions)
        grad_o = torch.empty(grad_o.shape, dtype=grad_o.dtype, device=grad_o.device).copy_(grad_o)
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()
    if tuple(lse.shape) != (B, H, W, nh):
        raise ValueError(f"lse must be [{B}, {H}, {W}, {nh}], got {tuple(lse.shape)}")
    if grad_lse is not None:
        grad_lse = grad_lse.to(device=q.device, dtype=torch.float32).contiguous()
        if tuple(grad_lse.shape) != (B, H, W, nh):
            raise ValueError(f"grad_lse must be [{B}, {H}, {W}, {nh}], got {tuple(grad_lse.shape)}")
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty((B, H, W, nh), dtype=torch.float32, device=q.device)
    with _launch.device_guard(q.device):
        _launch.module().na2d_backward(
            grad_o.data_ptr(), list(grad_o.stride()), 0 if grad_lse is None else grad_lse.data_ptr(),
            q.data_ptr(), list(q.stride()), k.data_ptr(), list(k.stride()), v.data_ptr(), list(v.stride()),
            lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            B, H, W, nh, D, kernel_size, _ext.BORDER_CODES[border], float(scale),
            _ext.DTYPE_CODES[q.dtype], _launch.stream(q.device))
    return dq, dk, dv
