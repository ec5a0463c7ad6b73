"""One NCA step in plain PyTorch, written to read like the definition in DESIGN.md.

Backward re-runs this forward under autograd from the saved inputs: the reference keeps
the same memory contract as the fused kernels (only inputs are saved).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype
from . import no_autocast
from .fire_mask import fire_mask

_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def perceive(x, pw, pb, groups, padding):
    """P = cat([x, conv3x3(pad(x), pw, pb)]) -- [B, (F+1)C, H, W]."""
    conv = F.conv2d(F.pad(x, (1, 1, 1, 1), mode=_PAD_MODE[padding]), pw, pb, groups=groups)
    return torch.cat([x, conv], dim=1)


def _pad_adjoint(n: int, padding: str, device, dtype) -> torch.Tensor:
    """[n, n+2] matrix R with R[src, p] = 1 when padded index p reads source index src;
    the adjoint of padding one axis is then d_src = R @ d_padded."""
    r = torch.zeros(n, n + 2, dtype=dtype, device=device)
    for p in range(-1, n + 1):
        if 0 <= p < n:
            src = p
        elif padding == "reflect":
            src = -p if p < 0 else 2 * (n - 1) - p
        elif padding == "replicate":
            src = 0 if p < 0 else n - 1
        elif padding == "circular":
            src = p % n
        else:
            continue  # zeros: the padded read is a constant
        r[src, p + 1] += 1
    return r


def _prepare(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step):
    """Everything the step computes, in the compute dtype (float32, float64 for float64)."""
    ct = compute_dtype(state.dtype)
    x = state.to(ct)
    pw, pb, w1, b1, w2, b2 = (t.to(ct) for t in (pw, pb, w1, b1, w2, b2))
    p = perceive(x, pw, pb, groups, padding)
    z = torch.einsum("bkhw,jk->bjhw", p, w1) + b1[:, None, None]
    h = torch.relu(z)
    B, _, H, W = x.shape
    m = fire_mask(B, H, W, update_prob, seed, step, x.device)[:, None].to(ct)
    return x, (pw, pb, w1, b1, w2, b2), p, z, h, m


@no_autocast
def forward(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen):
    x, (_, _, _, _, w2, b2), _, _, h, m = _prepare(
        state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step)
    delta = torch.einsum("bjhw,cj->bchw", h, w2) + b2[:, None, None]
    out = torch.empty_like(state)
    # state + m * delta, where cells that do not fire keep their state exactly, as the fused
    # kernels (which never compute their delta) do, also when a delta is not finite
    kept = x[:, frozen:]
    out.copy_(torch.cat([x[:, :frozen], torch.where(m != 0, kept + delta, kept)], dim=1))
    return out


@no_autocast
def backward(grad_out, state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen):
    """Gradients of every input, recomputing the forward's intermediates (nothing saved)."""
    x, (pw_, _, w1_, _, w2_, _), p, z, h, m = _prepare(
        state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step)
    C, H, W = x.shape[1:]
    g = grad_out.to(x.dtype)
    # Cells that do not fire take no part in the weight gradients: their output gradient,
    # activations and dP are left out (where), not multiplied by a zero, so that a NaN or
    # inf only idle cells hold, compute or read does not reach the sums (the fused kernels
    # skip them; autograd of the forward's where gives the idle branch exact zeros).
    fires = m != 0
    gd = torch.where(fires, g[:, frozen:], 0)  # gradient of delta
    d_w2 = torch.einsum("bchw,bjhw->cj", gd, torch.where(fires, h, 0))
    d_b2 = gd.sum((0, 2, 3))
    dz = torch.einsum("bchw,cj->bjhw", gd, w2_) * (z > 0)
    d_w1 = torch.einsum("bjhw,bkhw->jk", dz, torch.where(fires, p, 0))
    d_b1 = dz.sum((0, 2, 3))
    dp = torch.where(fires, torch.einsum("bjhw,jk->bkhw", dz, w1_), 0)
    dconv = dp[:, C:]
    ry = _pad_adjoint(H, padding, x.device, x.dtype)
    rx = _pad_adjoint(W, padding, x.device, x.dtype)
    # the same for the conv's weight gradient: source cells that no firing cell reads
    read = torch.nn.grad.conv2d_input((x.shape[0], 1, H + 2, W + 2), x.new_ones(1, 1, 3, 3), m)
    def unpad(t):  # the adjoint of padding: a padded-grid tensor summed onto the cells it reads
        return torch.einsum("yp,bcpq,xq->bcyx", ry, t, rx)

    read = unpad(read) > 0
    xp = F.pad(torch.where(read, x, 0), (1, 1, 1, 1), mode=_PAD_MODE[padding])
    d_pw = torch.nn.grad.conv2d_weight(xp, pw_.shape, dconv, groups=groups)
    d_pb = dconv.sum((0, 2, 3))
    d_xp = torch.nn.grad.conv2d_input(xp.shape, pw_, dconv, groups=groups)
    dx = g + dp[:, :C] + unpad(d_xp)
    d_state = torch.empty_like(state).copy_(dx)
    # weight gradients contiguous, as every backend returns them (the custom op's fake says so)
    return (d_state, *(d.to(t.dtype).contiguous() for d, t in zip((d_pw, d_pb, d_w1, d_b1, d_w2, d_b2),
                                                                   (pw, pb, w1, b1, w2, b2))))
