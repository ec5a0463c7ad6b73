"""2-D neighbourhood attention in plain PyTorch: gather each query's window of keys and
values (materialising kernel_size^2 copies, which the fused kernels never do), softmax,
weighted sum. Backward re-runs this under autograd from q, k, v."""
from __future__ import annotations

import torch

from .._common import compute_dtype
from . import no_autocast


def key_indices(n: int, kernel_size: int, border: str, device) -> torch.Tensor:
    """[n, kernel_size] key coordinate along one axis for query i and offset a (-1: outside)."""
    r = kernel_size // 2
    i = torch.arange(n, device=device)[:, None]
    a = torch.arange(-r, r + 1, device=device)[None, :]
    if border == "circular":
        return (i + a) % n
    if border == "shift":
        return i.clamp(r, n - 1 - r) + a
    k = i + a
    return torch.where((k >= 0) & (k < n), k, torch.full_like(k, -1))


def _pad_grid(t):
    """t [B, H, W, heads, D] with a zero row H and a zero column W appended (torch.cat, not
    F.pad, which refuses a tensor with a zero-size dimension on torch < 2.5)."""
    B, H, W = t.shape[:3]
    t = torch.cat([t, t.new_zeros(B, 1, *t.shape[2:])], dim=1)
    return torch.cat([t, t.new_zeros(B, H + 1, 1, *t.shape[3:])], dim=2)


def _windows(k, v, kernel_size, border):
    """Each query's window of keys and values, [B, H, W, ks*ks, heads, D] (row-major
    offsets), plus the padded-grid index of every window entry for scattering back."""
    B, H, W, nh, D = k.shape
    iy = key_indices(H, kernel_size, border, k.device)  # [H, ks]
    ix = key_indices(W, kernel_size, border, k.device)  # [W, ks]
    # Row H / column W of the zero-padded grid stands for "outside": zero key and value.
    ry = torch.where(iy < 0, H, iy)[:, None, :, None]  # [H, 1, ks, 1]
    rx = torch.where(ix < 0, W, ix)[None, :, None, :]  # [1, W, 1, ks]
    kk = kernel_size * kernel_size
    kw = _pad_grid(k)[:, ry, rx].reshape(B, H, W, kk, nh, D)
    vw = _pad_grid(v)[:, ry, rx].reshape(B, H, W, kk, nh, D)
    flat = (ry * (W + 1) + rx).reshape(H * W * kk)
    inside = ((iy >= 0)[:, None, :, None] & (ix >= 0)[None, :, None, :]).reshape(H, W, kk)
    return kw, vw, flat, inside


def _attend(q, k, v, kernel_size, border, scale):
    kw, vw, flat, inside = _windows(k, v, kernel_size, border)
    s = torch.einsum("bhwnd,bhwjnd->bhwnj", q, kw) * scale
    if border == "mask":
        s = s.masked_fill(~inside[None, :, :, None, :], float("-inf"))
    elif border == "zeros":  # the zero key's logit is exactly 0, also beside an infinite query
        s = s.masked_fill(~inside[None, :, :, None, :], 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    o = torch.einsum("bhwnj,bhwjnd->bhwnd", p, vw)
    return o, lse, p, kw, vw, flat


def _compute(*ts):
    ct = compute_dtype(ts[0].dtype)
    return [t.to(ct) for t in ts]


@no_autocast
def forward(q, k, v, kernel_size, border, scale):
    o, lse, *_ = _attend(*_compute(q, k, v), kernel_size, border, scale)
    return o.to(q.dtype).contiguous(), lse.contiguous()


def _scatter(window_grad, flat, B, H, W):
    """Sum [B, H, W, kk, nh, D] window gradients into the keys they were read from."""
    nh, D = window_grad.shape[-2:]
    out = window_grad.new_zeros(B, (H + 1) * (W + 1), nh, D)
    out.index_add_(1, flat, window_grad.reshape(B, flat.numel(), nh, D))
    return out.view(B, H + 1, W + 1, nh, D)[:, :H, :W]


@no_autocast
def backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale):
    """dq, dk, dv with the probabilities recomputed from q and k (nothing else needed)."""
    qc, kc, vc, do = _compute(q, k, v, grad_o)
    o_, _, p, kw, vw, flat = _attend(qc, kc, vc, kernel_size, border, scale)
    dp = torch.einsum("bhwnd,bhwjnd->bhwnj", do, vw)
    delta = (do * o_).sum(-1, keepdim=True)  # D_i = sum_j p_ij dp_ij
    if grad_lse is not None:
        delta = delta - grad_lse.to(delta.dtype)[..., None]
    ds = p * (dp - delta) * scale
    B, H, W = q.shape[:3]
    dq = torch.einsum("bhwnj,bhwjnd->bhwnd", ds, kw)
    dk = _scatter(torch.einsum("bhwnj,bhwnd->bhwjnd", ds, qc), flat, B, H, W)
    dv = _scatter(torch.einsum("bhwnj,bhwnd->bhwjnd", p, do), flat, B, H, W)
    return tuple(d.to(q.dtype).contiguous() for d in (dq, dk, dv))
