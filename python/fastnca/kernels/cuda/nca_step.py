"""Launchers of the CUDA nca_step kernels (csrc/cuda/nca_step.cu).

The kernels take raw pointers, element strides and fp32 weights in the layouts below; this
module checks every assumption they make, arranges the weights and allocates the backward's
workspaces with torch (so they come from the caching allocator).

Weight layouts (kChunk = 32 outputs per register pass; padding is zero):
  pw   groups=1: [ceil(FC/32)][C][9][32]   pw[oc][c][t][i] = W[oc*32+i][c][t]
       depthwise: [FC][9]
  pb   [ceil(FC/32)*32]
  w1   [HDP/32][K][32]                     w1[jc][k][i] = fc1_weight[jc*32+i][k]
  b1   [HDP]
  w2   [HDP/32][Cu][32]                    w2[jc][c][i] = fc2_weight[c][jc*32+i]
  b2   [Cu]
  pwt  (backward) groups=1: [ceil(C/32)][9][FC][32]   pwt[cc][t][o][i] = W[o][cc*32+i][t]
       depthwise: [FC][9]
with FC = F*C, K = (F+1)*C, HDP = hidden rounded up to 32, Cu = C - frozen.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ... import _backend, _ext
from .. import _common
from . import _launch

_CHUNK = 32
_MAX_DEPTHWISE_F = _backend.NCA_LIMITS["cuda"]["depthwise_filters"]
_MAX_HIDDEN = _backend.NCA_LIMITS["cuda"]["hidden"]




def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _check(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen):
    """Sizes of the call, after checking what the kernels assume."""
    _launch.check_tensor(state, "state", "nca_step")
    if state.dim() != 4:
        raise ValueError(f"state must be [B, C, H, W], got shape {tuple(state.shape)}")
    if any(s < 0 for s in state.stride()):
        raise ValueError("state must not have negative strides")
    B, C, H, W = state.shape
    for name, t in (("perception_weight", pw), ("perception_bias", pb), ("fc1_weight", w1),
                    ("fc1_bias", b1), ("fc2_weight", w2), ("fc2_bias", b2)):
        if t.device != state.device:
            raise ValueError(f"{name} is on {t.device} but state is on {state.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if pw.shape[0] % C or tuple(pw.shape[1:]) != (C // groups, 3, 3):
        raise ValueError(f"perception_weight must be [F*{C}, {C // groups}, 3, 3], got {tuple(pw.shape)}")
    nf = pw.shape[0] // C
    hidden = w1.shape[0]
    if groups not in (1, C):
        raise ValueError(f"groups must be 1 or C={C}, got {groups}")
    depthwise = groups == C and not (C == 1 and groups == 1)
    if depthwise and nf > _MAX_DEPTHWISE_F:
        raise ValueError(f"the CUDA kernels support at most {_MAX_DEPTHWISE_F} depthwise filters per channel, got {nf}")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"the CUDA kernels support a hidden size of at most {_MAX_HIDDEN}, got {hidden}")
    if tuple(w1.shape) != (hidden, (nf + 1) * C) or tuple(b1.shape) != (hidden,):
        raise ValueError(f"fc1 must be [hidden, {(nf + 1) * C}] with bias [hidden], got {tuple(w1.shape)}, {tuple(b1.shape)}")
    if tuple(w2.shape) != (C - frozen, hidden) or tuple(b2.shape) != (C - frozen,):
        raise ValueError(f"fc2 must be [{C - frozen}, {hidden}] with bias [{C - frozen}], got {tuple(w2.shape)}, {tuple(b2.shape)}")
    if tuple(pb.shape) != (nf * C,):
        raise ValueError(f"perception_bias must be [{nf * C}], got {tuple(pb.shape)}")
    if padding not in _ext.PADDING_CODES:
        raise ValueError(f"unknown padding {padding!r}")
    if padding == "reflect" and (H < 2 or W < 2):
        raise ValueError("padding='reflect' needs height and width >= 2")
    if not 0 <= frozen <= C:
        raise ValueError(f"frozen_channels must be in [0, {C}], got {frozen}")
    return B, C, H, W, nf, hidden, depthwise


def _frozen_rows(w2, b2, C, frozen):
    """The public layer passes fc2 without the frozen rows; accept the full [C, hidden] too."""
    if frozen and w2.shape[0] == C:
        w2, b2 = w2[frozen:], b2[frozen:]
    return w2, b2


def _arrange(pw, pb, w1, b1, w2, b2, C, nf, hidden, depthwise, backward):
    """The fp32 weight layouts of the kernels (module docstring), contiguous on the device."""
    f32 = torch.float32
    FC, K = nf * C, (nf + 1) * C
    och = _round_up(FC, _CHUNK) // _CHUNK
    jch = _round_up(hidden, _CHUNK) // _CHUNK
    Cu = w2.shape[0]
    pwf = pw.detach().to(f32).reshape(FC, -1, 9)  # [FC, C/groups, 9]
    if depthwise:
        pw_a = pwf.reshape(FC, 9).contiguous()
        pwt = pw_a
    else:
        pw_a = F.pad(pwf, (0, 0, 0, 0, 0, och * _CHUNK - FC)).view(och, _CHUNK, C, 9).permute(0, 2, 3, 1).contiguous()
        pwt = None
        if backward:
            cch = _round_up(C, _CHUNK) // _CHUNK
            pwt = F.pad(pwf, (0, 0, 0, cch * _CHUNK - C)).view(FC, cch, _CHUNK, 9).permute(1, 3, 0, 2).contiguous()
    pb_a = F.pad(pb.detach().to(f32), (0, och * _CHUNK - FC)).contiguous()
    w1_a = F.pad(w1.detach().to(f32), (0, 0, 0, jch * _CHUNK - hidden)).view(jch, _CHUNK, K).permute(0, 2, 1).contiguous()
    b1_a = F.pad(b1.detach().to(f32), (0, jch * _CHUNK - hidden)).contiguous()
    w2_a = F.pad(w2.detach().to(f32), (0, jch * _CHUNK - hidden)).view(Cu, jch, _CHUNK).permute(1, 0, 2).contiguous()
    b2_a = b2.detach().to(f32).contiguous()
    tensors = [pw_a, pb_a, w1_a, b1_a, w2_a, b2_a, pwt if pwt is not None else pw_a]
    return tensors, [t.data_ptr() for t in tensors]


def _cells_per_thread() -> int:
    """FASTNCA_CUDA_NCA_CPT=1|2 pins the forward's cells per thread (benchmarking knob)."""
    v = os.environ.get("FASTNCA_CUDA_NCA_CPT", "") or "0"
    if v not in ("0", "1", "2"):
        raise ValueError(f"FASTNCA_CUDA_NCA_CPT must be 0 (automatic), 1 or 2, got {v!r}")
    return int(v)


def prepare(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen):
    """The weights arranged once for many steps (nca_rollout): pass as ``prepared``."""
    weights = (pw, pb, w1, b1, w2, b2)
    w2, b2 = _frozen_rows(w2, b2, state.shape[1], frozen)
    B, C, H, W, nf, hidden, depthwise = _check(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen)
    with _launch.device_guard(state.device):
        return _common.Prepared(_arrange(pw, pb, w1, b1, w2, b2, C, nf, hidden, depthwise, backward=True),
                                state, weights, groups, padding, frozen)


def forward(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen, prepared=None):
    prepared = _common.arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
    w2, b2 = _frozen_rows(w2, b2, state.shape[1], frozen)
    B, C, H, W, nf, hidden, depthwise = _check(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen)
    out = torch.empty_like(state)
    with _launch.device_guard(state.device):
        keep, ptrs = prepared or _arrange(pw, pb, w1, b1, w2, b2, C, nf, hidden, depthwise, backward=False)
        _launch.module().nca_step_forward(
            state.data_ptr(), list(state.stride()), out.data_ptr(), list(out.stride()),
            B, C, H, W, nf, hidden, frozen, depthwise, _ext.PADDING_CODES[padding],
            int(seed), int(step) & 0xFFFFFFFF, _ext.fire_threshold(update_prob), ptrs,
            _ext.DTYPE_CODES[state.dtype], _launch.stream(state.device), _cells_per_thread())
        del keep  # the caching allocator orders the free after the kernel on this stream
    return out


# backward(..., out=grad_out) is safe: d_state is written only after grad_out is read.
BACKWARD_OUT_MAY_BE_GRAD = True


class GradSink:
    """The weight gradients of many backward calls with one rule and one state shape (the
    steps of nca_rollout's backward), summed in float32 in the kernels' flat layouts in call
    order; result() unpacks them once into the weights' layouts and dtypes."""

    def __init__(self):
        self._sums = None  # [d_fc, d_conv]
        self._finish = None

    def _add(self, d_fc, d_conv):
        if self._sums is None:
            self._sums = [d_fc, d_conv]
        elif self._sums[0].shape != d_fc.shape or self._sums[1].shape != d_conv.shape:
            raise ValueError("a GradSink sums the gradients of one rule layout; got sums of sizes "
                             f"{d_fc.numel()}, {d_conv.numel()} after {[t.numel() for t in self._sums]}")
        else:
            self._sums[0].add_(d_fc)
            self._sums[1].add_(d_conv)

    def result(self):
        """The summed weight gradients (pw, pb, w1, b1, w2, b2), in the weights' dtypes."""
        if self._finish is None:
            raise RuntimeError("GradSink.result(): no backward has added to this sink")
        return self._finish(*self._sums)


def _weight_grads(d_fc, d_conv, weights, C, nf, hidden, frozen):
    """Unpack the kernels' float32 sums: d_fc = [hidden][K+1] (d_w1 | d_b1) ++ [Cu][hidden+1]
    (d_w2 | d_b2); d_conv = [FC][9C+1] (groups=1) or [FC][10] (depthwise): weight taps | bias."""
    pw, pb, w1, b1, w2, b2 = weights
    FC, K, Cu = nf * C, (nf + 1) * C, C - frozen
    fc1 = d_fc[: hidden * (K + 1)].view(hidden, K + 1)
    fc2 = d_fc[hidden * (K + 1):].view(Cu, hidden + 1)
    conv = d_conv.view(FC, -1)
    d_pw, d_pb = conv[:, :-1].reshape(pw.shape), conv[:, -1]
    d_w2, d_b2 = fc2[:, :hidden], fc2[:, hidden]
    if w2.shape[0] != Cu:  # the full [C, hidden] fc2 was passed: frozen rows get zeros
        d_w2 = torch.cat([d_w2.new_zeros(frozen, hidden), d_w2])
        d_b2 = torch.cat([d_b2.new_zeros(frozen), d_b2])
    grads = (d_pw, d_pb, fc1[:, :K], fc1[:, K], d_w2, d_b2)
    # copies: with one updated channel (C - frozen = 1) d_w2 is a contiguous view of d_fc,
    # and gradients sharing a buffer are refused by the custom op (an error on any rule
    # with a single updated channel until the public ops ran this on the host emulation)
    return tuple(g.to(w.dtype, memory_format=torch.contiguous_format, copy=True).reshape(w.shape)
                 for g, w in zip(grads, weights))


def backward(grad_out, state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen,
             prepared=None, out=None, sink=None):
    """d_state and the weight gradients. ``out``: where d_state goes; it may be ``grad_out``
    itself (the rollout's backward reuses one buffer for every step's gradient). ``sink``:
    a GradSink that collects the weight gradients instead (then returned as None)."""
    prepared = _common.arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
    w2_in, b2_in = w2, b2
    w2, b2 = _frozen_rows(w2, b2, state.shape[1], frozen)
    B, C, H, W, nf, hidden, depthwise = _check(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen)
    if tuple(grad_out.shape) != tuple(state.shape):
        raise ValueError(f"grad_out must have the state's shape {tuple(state.shape)}, got {tuple(grad_out.shape)}")
    if grad_out.device != state.device:
        raise ValueError(f"grad_out is on {grad_out.device} but state is on {state.device}")
    if grad_out.dtype != state.dtype:
        grad_out = grad_out.to(state.dtype)
    if any(s < 0 for s in grad_out.stride()):
        grad_out = grad_out.contiguous()
    d_state = _common.backward_out(out, state, grad_out)
    K = (nf + 1) * C
    dev = state.device
    mod = _launch.module()
    # Batch chunks bound the fp32 workspace [K][cells] (_common.backward_batch_chunk); the
    # chunks' weight gradients are summed in chunk order (deterministic).
    chunk = _common.backward_batch_chunk(state, 4 * K)
    d_fc = d_conv = None
    with _launch.device_guard(dev):
        keep, ptrs = prepared or _arrange(pw, pb, w1, b1, w2, b2, C, nf, hidden, depthwise, backward=True)
        code, pad = _ext.DTYPE_CODES[state.dtype], _ext.PADDING_CODES[padding]
        threshold = _ext.fire_threshold(update_prob)
        ws = None
        for b0 in range(0, B, chunk):
            nb = min(chunk, B - b0)
            g_c, x_c, d_c = grad_out[b0:b0 + nb], state[b0:b0 + nb], d_state[b0:b0 + nb]
            plan = mod.nca_step_backward_plan(nb, C, H, W, nf, hidden, frozen, depthwise, pad, threshold, code)
            if ws is None:
                ws = torch.empty(plan["ws"], dtype=torch.float32, device=dev)
            main_part = torch.zeros(plan["main_blocks"] * plan["main_part"], dtype=torch.float32, device=dev)
            conv_part = torch.empty(plan["conv_parts"] * plan["conv_part"], dtype=torch.float32, device=dev)
            fc_c = torch.empty(plan["main_part"], dtype=torch.float32, device=dev)
            conv_c = torch.empty(plan["conv_part"], dtype=torch.float32, device=dev)
            mod.nca_step_backward(
                g_c.data_ptr(), list(g_c.stride()), x_c.data_ptr(), list(x_c.stride()),
                d_c.data_ptr(), list(d_c.stride()), nb, C, H, W, nf, hidden, frozen, depthwise, pad,
                int(seed), int(step) & 0xFFFFFFFF, threshold, ptrs,
                ws.data_ptr(), main_part.data_ptr(), plan["main_blocks"], conv_part.data_ptr(),
                plan["conv_parts"], fc_c.data_ptr(), conv_c.data_ptr(), code, _launch.stream(dev),
                b0 * H * W)
            d_fc = fc_c if d_fc is None else d_fc.add_(fc_c)
            d_conv = conv_c if d_conv is None else d_conv.add_(conv_c)
            del main_part, conv_part
        del keep, ws
    weights = (pw, pb, w1, b1, w2_in, b2_in)
    if sink is not None:
        sink._add(d_fc, d_conv)
        sink._finish = functools.partial(_weight_grads, weights=weights, C=C, nf=nf, hidden=hidden, frozen=frozen)
        return (d_state,) + (None,) * 6
    return (d_state, *_weight_grads(d_fc, d_conv, weights, C, nf, hidden, frozen))
