"""Launcher of the fused C++ CPU nca_step kernels (csrc/cpu/nca_step.cpp).

The kernels read the state in place through its element strides (NCHW, channels_last or
any other view) and take the weights pre-arranged here, in the compute dtype (float32, or
float64 for a float64 state), contiguous, with column counts padded to a multiple of 8 so
every GEMM column block is a whole vector. Everything the kernel assumes is checked here.
"""
from __future__ import annotations

import torch

from ... import _backend, _ext
from .._common import Prepared, arranged, backward_out, compute_dtype, cpu_threads

_PAD = 8  # must match kPadTo in csrc/cpu/nca_step.cpp
_TILE_W = 0  # cells per tile; 0 = the kernel's tuned default (kTileW), for experiments
_LIMITS = _backend.NCA_LIMITS["cpu"]


def _pad(n: int) -> int:
    return (n + _PAD - 1) // _PAD * _PAD


def _check_view(t: torch.Tensor, name: str, shape, dtype) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"fastnca cpu nca_step: {name} must be a CPU tensor, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fastnca cpu nca_step: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"fastnca cpu nca_step: {name} must have dtype {dtype}, got {t.dtype}")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"fastnca cpu nca_step: {name} has a negative stride {t.stride()}")
    # The kernel indexes data_ptr + sum(i_d * stride_d); that must stay inside the storage.
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    limit = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    if last >= limit:
        raise ValueError(f"fastnca cpu nca_step: {name} view reaches outside its storage")


def _sizes(state, pw, w1, w2, groups, frozen):
    B, C, H, W = state.shape
    if min(B, C, H, W) < 1:
        raise ValueError(f"fastnca cpu nca_step: empty state {tuple(state.shape)}")
    if max(H, W) > _LIMITS["side"]:
        raise ValueError(f"fastnca cpu nca_step: height and width must be at most {_LIMITS['side']}, got {H}x{W}")
    if groups not in (1, C):
        raise ValueError(f"fastnca cpu nca_step: groups must be 1 or {C}, got {groups}")
    if pw.dim() != 4 or pw.shape[0] % C or pw.shape[0] == 0 or tuple(pw.shape[1:]) != (C // groups, 3, 3):
        raise ValueError(f"fastnca cpu nca_step: bad perception weight shape {tuple(pw.shape)}")
    F = pw.shape[0] // C
    if not 1 <= F <= _LIMITS["filters"]:
        raise ValueError(f"fastnca cpu nca_step: supports 1..{_LIMITS['filters']} filters per channel, got {F}")
    Hd = w1.shape[0]
    if w1.dim() != 2 or w1.shape[1] != (F + 1) * C or Hd < 1:
        raise ValueError(f"fastnca cpu nca_step: fc1 weight must be [hidden, {(F + 1) * C}], got {tuple(w1.shape)}")
    if Hd > _LIMITS["hidden"]:
        raise ValueError(f"fastnca cpu nca_step: supports a hidden size of at most {_LIMITS['hidden']}, got {Hd}")
    if not 0 <= frozen <= C:
        raise ValueError(f"fastnca cpu nca_step: frozen channels {frozen} not in [0, {C}]")
    if w2.dim() != 2 or tuple(w2.shape) != (C - frozen, Hd):
        raise ValueError(f"fastnca cpu nca_step: fc2 weight must be [{C - frozen}, {Hd}], got {tuple(w2.shape)}")
    return B, C, H, W, F, Hd


def _weights(state, pw, pb, w1, b1, w2, b2, groups, frozen, backward):
    """The kernel's weight layouts (see the header of csrc/cpu/nca_step.cpp)."""
    ct = compute_dtype(state.dtype)
    B, C, H, W, F, Hd = _sizes(state, pw, w1, w2, groups, frozen)
    K, Co = F * C, C - frozen
    Kp, Hdp, Cop, Cp, LDP = _pad(K), _pad(Hd), _pad(Co), _pad(C), _pad(C + _pad(K))
    for name, b, n in (("perception bias", pb, K), ("fc1 bias", b1, Hd), ("fc2 bias", b2, Co)):
        if b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"fastnca cpu nca_step: {name} must have shape ({n},), got {tuple(b.shape)}")
    for t in (pw, pb, w1, b1, w2, b2):
        if t.device.type != "cpu":
            raise ValueError(f"fastnca cpu nca_step: weights must be CPU tensors, got {t.device}")
    z = dict(dtype=ct, device=state.device)
    pw_, w1_, w2_ = pw.detach().to(ct), w1.detach().to(ct), w2.detach().to(ct)
    rows = 9 * C if groups == 1 else 9
    wc = torch.zeros(rows, Kp, **z)
    if groups == 1:
        wc[:, :K] = pw_.permute(2, 3, 1, 0).reshape(9 * C, K)  # [(ky, kx, c), o]
    else:
        wc[:, :K] = pw_.reshape(K, 9).t()  # [(ky, kx), o]
    pbp = torch.zeros(Kp, **z)
    pbp[:K] = pb.detach()
    w1t = torch.zeros((F + 1) * C, Hdp, **z)
    w1t[:, :Hd] = w1_.t()
    b1p = torch.zeros(Hdp, **z)
    b1p[:Hd] = b1.detach()
    w2t = torch.zeros(Hd, Cop, **z)
    w2t[:, :Co] = w2_.t()
    b2p = torch.zeros(Cop, **z)
    b2p[:Co] = b2.detach()
    ws = [wc, pbp, w1t, b1p, w2t, b2p]
    if backward:
        w2p = torch.zeros(Co, Hdp, **z)
        w2p[:, :Hd] = w2_
        w1p = torch.zeros(Hd, LDP, **z)
        w1p[:, :(F + 1) * C] = w1_
        if groups == 1:
            wcb = torch.zeros(9 * K, Cp, **z)
            wcb[:, :C] = pw_.permute(2, 3, 0, 1).reshape(9 * K, C)  # [(ky, kx, o), c]
        else:
            wcb = torch.zeros(1, **z)  # unused by the depthwise path
        ws += [w2p, w1p, wcb]
    for t in ws:
        assert t.is_contiguous() and t.dtype == ct
    dims = dict(B=B, C=C, H=H, W=W, F=F, K=K, Hd=Hd, Co=Co, Kp=Kp, Hdp=Hdp, Cop=Cop, LDP=LDP, rows=rows)
    return ws, dims


def _common(state, padding, update_prob, seed, step):
    if state.dtype not in _ext.DTYPE_CODES:
        raise TypeError(f"fastnca cpu nca_step: unsupported state dtype {state.dtype}")
    if padding not in _ext.PADDING_CODES:
        raise ValueError(f"fastnca cpu nca_step: unknown padding {padding!r}")
    if padding == "reflect" and (state.shape[2] < 2 or state.shape[3] < 2):
        raise ValueError("fastnca cpu nca_step: reflect padding needs H, W >= 2")
    if not 0 <= seed < 1 << 64 or not 0 <= step < 1 << 32:
        raise ValueError("fastnca cpu nca_step: seed must be in [0, 2^64), step in [0, 2^32)")
    return _ext.DTYPE_CODES[state.dtype], _ext.PADDING_CODES[padding], _ext.fire_threshold(update_prob)


def prepare(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen):
    """The weights arranged once for many steps with the same rule (nca_rollout): pass the
    result as ``prepared`` to forward and backward to skip their per-call arrangement."""
    return Prepared(_weights(state, pw, pb, w1, b1, w2, b2, groups, frozen, backward=True),
                    state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)


def forward(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen, prepared=None):
    dtype, pad, thr = _common(state, padding, update_prob, seed, step)
    ws, d = (arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
             or _weights(state, pw, pb, w1, b1, w2, b2, groups, frozen, backward=False))
    _check_view(state, "state", state.shape, state.dtype)
    out = torch.empty_like(state)
    _check_view(out, "out", state.shape, state.dtype)
    if thr == 0 or d["Co"] == 0:  # nothing updates: out = state exactly
        return out.copy_(state)
    _ext.load("_C").nca_step_forward(
        state.data_ptr(), list(state.stride()), out.data_ptr(), list(out.stride()), dtype,
        list(state.shape), d["F"], groups, d["Hd"], frozen, pad, seed, step, thr,
        *(t.data_ptr() for t in ws[:6]), cpu_threads(), _TILE_W)
    return out


# backward(..., out=grad_out) is safe: pass 2, the only writer of d_state, reads each
# tile's grad_out right before writing that tile, after pass 1 has read all of it.
BACKWARD_OUT_MAY_BE_GRAD = True


def backward(grad_out, state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen,
             prepared=None, out=None):
    dtype, pad, thr = _common(state, padding, update_prob, seed, step)
    ws, d = (arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
             or _weights(state, pw, pb, w1, b1, w2, b2, groups, frozen, backward=True))
    _check_view(state, "state", state.shape, state.dtype)
    if grad_out.dtype != state.dtype:
        grad_out = grad_out.to(state.dtype)
    _check_view(grad_out, "grad_out", state.shape, state.dtype)
    d_state = backward_out(out, state, grad_out)
    _check_view(d_state, "d_state", state.shape, state.dtype)
    ct = compute_dtype(state.dtype)
    if thr == 0 or d["Co"] == 0:  # out = state: only the identity path carries gradient
        d_state.copy_(grad_out)
        # contiguous, as the kernels' gradients (zeros_like would keep a channels_last weight's layout)
        return (d_state, *(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (pw, pb, w1, b1, w2, b2)))
    z = dict(dtype=ct, device=state.device)
    C, K, Hd, Co = d["C"], d["K"], d["Hd"], d["Co"]
    dwc = torch.empty(d["rows"], d["Kp"], **z)
    dpb = torch.empty(d["Kp"], **z)
    dw1 = torch.empty(Hd, d["LDP"], **z)
    db1 = torch.empty(d["Hdp"], **z)
    dw2 = torch.empty(Co, d["Hdp"], **z)
    db2 = torch.empty(d["Cop"], **z)
    mod = _ext.load("_C")
    # The dP workspace comes from torch's allocator, so memory tools (and the benchmark's
    # CPU peak) see it.
    scratch = torch.empty(mod.nca_step_backward_workspace(dtype, list(state.shape), d["F"], groups, Hd,
                                                          frozen, pad), **z)
    mod.nca_step_backward(
        grad_out.data_ptr(), list(grad_out.stride()), state.data_ptr(), list(state.stride()),
        d_state.data_ptr(), list(d_state.stride()), dtype, list(state.shape), d["F"], groups, Hd,
        frozen, pad, seed, step, thr, [t.data_ptr() for t in ws],
        [t.data_ptr() for t in (dwc, dpb, dw1, db1, dw2, db2)], cpu_threads(), _TILE_W, scratch.data_ptr())
    del scratch
    if groups == 1:
        d_pw = dwc[:, :K].reshape(3, 3, C, K).permute(3, 2, 0, 1)
    else:
        d_pw = dwc[:, :K].t().reshape(K, 1, 3, 3)
    grads = (d_pw, dpb[:K], dw1[:, :(d["F"] + 1) * C], db1[:Hd], dw2[:, :Hd], db2[:Co])
    return (d_state, *(g.to(w.dtype).contiguous().view(w.shape)
                       for g, w in zip(grads, (pw, pb, w1, b1, w2, b2))))
