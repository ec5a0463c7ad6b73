"""neighborhood_attention2d against the unfold-based 3x3 attention GeCA's code uses,
FlexAttention with a neighbourhood block mask, and NATTEN when importable."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastnca

from .._checks import dtype_name
from . import common
from .common import (Result, env, graph_times, median_ms, peak_mb, release, saved_mb, selected, timed_backends,
                     tuned_now, tuned_since)


def unfold_attention(q, k, v):
    """GeCA-style local attention: unfold K and V into their 9 zero-padded neighbours."""
    B, H, W, nh, D = q.shape
    to_grid = lambda t: t.permute(0, 3, 4, 1, 2).reshape(B, nh * D, H, W)  # noqa: E731
    kk = F.unfold(to_grid(k), 3, padding=1).view(B, nh, D, 9, H, W).permute(0, 4, 5, 1, 3, 2)
    vv = F.unfold(to_grid(v), 3, padding=1).view(B, nh, D, 9, H, W).permute(0, 4, 5, 1, 3, 2)
    s = torch.einsum("bhwnd,bhwnjd->bhwnj", q, kk) * D ** -0.5
    return torch.einsum("bhwnj,bhwnjd->bhwnd", s.float().softmax(-1).to(q.dtype), vv)


def flex_attention_fn(B, H, W, nh, D, device):
    """FlexAttention with a 3x3 neighbourhood block mask (``mask`` border semantics), compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def neighbours(b, h, qi, ki):
        return ((qi // W - ki // W).abs() <= 1) & ((qi % W - ki % W).abs() <= 1)

    block_mask = create_block_mask(neighbours, None, None, H * W, H * W, device=str(device))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        qt, kt, vt = (t.reshape(B, H * W, nh, D).transpose(1, 2) for t in (q, k, v))
        return compiled(qt, kt, vt, block_mask=block_mask).transpose(1, 2).reshape(B, H, W, nh, D)

    return run


def natten_fn():
    try:
        import natten  # noqa: F401
        from natten.functional import na2d
    except Exception:
        return None
    return lambda q, k, v: na2d(q, k, v, kernel_size=3)


def attention_bytes(B: int, H: int, W: int, nh: int, D: int, elem: int) -> tuple[int, int]:
    """The least bytes a fused kernel moves, forward and fwd+bwd's backward: forward reads
    q, k, v and writes o (``elem`` bytes a value) and the float32 lse; backward reads q, k,
    v, o, grad_o and lse and writes dq, dk, dv. Each cell's neighbours come from cache."""
    n, queries = B * H * W * nh * D, B * H * W * nh
    return 4 * n * elem + 4 * queries, 8 * n * elem + 4 * queries


def triton_knobs(variants: bool) -> dict:
    """The Triton rows of a GPU run, each with its environment knobs (every knob set, None
    for unset, whatever the caller's environment holds): fastnca:triton, and with
    ``variants`` (fastnca bench --variants) the opt-in formulations."""
    base = dict(FASTNCA_TRITON_NA_FORWARD=None, FASTNCA_TRITON_NA_BACKWARD=None, FASTNCA_TRITON_NA_HALO_TILE=None)
    knobs = {"fastnca:triton": base}
    if variants:
        halo = dict(base, FASTNCA_TRITON_NA_FORWARD="halo", FASTNCA_TRITON_NA_BACKWARD="halo")
        knobs.update({"fastnca:triton halo": halo,  # tensor cores, 8x8-query tiles
                      "fastnca:triton halo 4x8": dict(halo, FASTNCA_TRITON_NA_HALO_TILE="4x8"),  # half the scores
                      "fastnca:triton split": dict(base, FASTNCA_TRITON_NA_BACKWARD="split")})  # dk/dv from p, ds
    return knobs


def run(device: torch.device, dtype: torch.dtype, quick: bool, roofs: dict, log=print) -> list[Result]:
    results = []
    dname = dtype_name(dtype)
    if device.type == "cuda":
        shapes = [("GeCA-S", 32, 32, 32, 12, 64), ("GeCA-XS", 32, 32, 32, 6, 64), ("high-res", 4, 128, 128, 4, 32)]
    elif quick:
        shapes = [("GeCA-XS", 4, 32, 32, 6, 64)]
    else:
        shapes = [("GeCA-S", 8, 32, 32, 12, 64), ("GeCA-XS", 8, 32, 32, 6, 64), ("high-res", 1, 128, 128, 4, 32)]
    backends = timed_backends(device, "neighborhood_attention")
    bw = roofs.get("copy_gbs")
    for name, B, H, W, nh, D in shapes:
        label = f"{name} B={B} {H}x{W} heads={nh} D={D}"
        qkv = torch.randn(B, H, W, 3, nh, D, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(B, H, W, nh, D, device=device, dtype=dtype)
        bytes_fwd, bytes_bwd = attention_bytes(B, H, W, nh, D, qkv.element_size())
        impls = [("unfold (GeCA)", unfold_attention, True)]
        if not quick or device.type == "cuda":
            try:
                impls.append(("flex_attention", flex_attention_fn(B, H, W, nh, D, device), device.type == "cuda"))
            except Exception as e:  # not every torch / device has it
                results.append(Result("neighborhood_attention", label, "flex_attention", dname,
                                      note=f"unavailable: {type(e).__name__}"))
        nat = natten_fn()
        if nat is not None:
            impls.append(("natten", nat, True))
        for b in backends:
            impls.append((f"fastnca:{b}", lambda q, k, v, b=b: fastnca.neighborhood_attention2d(q, k, v, backend=b), True))
        knobs = triton_knobs(common.VARIANTS) if "triton" in backends and device.type == "cuda" else {}
        for impl in list(knobs)[1:]:  # "fastnca:triton" itself is in impls already
            impls.append((impl, lambda q, k, v: fastnca.neighborhood_attention2d(q, k, v, backend="triton"), True))
        reps = 5 if quick else 9
        for impl, fn, has_bwd in selected(impls):
            log(f"  attention {name} {impl} ...")
            with env(**knobs[impl]) if impl in knobs else contextlib.nullcontext():
                results.append(_measure(label, impl, fn, has_bwd, qkv, do, dname, device, reps,
                                        bytes_fwd, bytes_bwd, bw))
            qkv.grad = None
            release(device)
    return results


def _measure(label, impl, fn, has_bwd, qkv, do, dname, device, reps, bytes_fwd, bytes_bwd, bw):
    """One implementation's row: times, GB/s, saved bytes and peak memory (or the error).
    Each call takes its q, k, v views of the packed qkv itself: an autograd node made once
    outside (the views' UnbindBackward) records the stream it was made on, the legacy default
    stream, and a CUDA-graph capture of a backward that reaches it fails (the engine makes
    that stream wait on the capturing one)."""
    before = tuned_now()
    try:
        def fwd():  # detached inputs: FlexAttention on CPU refuses requires_grad ones
            with torch.no_grad():
                return fn(*qkv.detach().unbind(3))

        def fwd_bwd():  # the op's own backward: gradients to the q, k, v views, not stacked
            q, k, v = qkv.unbind(3)  # into the packed tensor nor accumulated into qkv.grad
            o = fn(q, k, v)
            torch.autograd.grad(o, (q, k, v), do)
            return o

        f_ms = median_ms(fwd, device, reps=reps)
        fb_ms = median_ms(fwd_bwd, device, reps=reps) if has_bwd else None
        extra = {"gbs_fwd": bytes_fwd / (f_ms * 1e-3) / 1e9}
        if fb_ms:
            extra["gbs_fwd_bwd"] = (bytes_fwd + bytes_bwd) / (fb_ms * 1e-3) / 1e9
        if bw:
            extra["bw_fraction_fwd"] = extra["gbs_fwd"] / bw
            if fb_ms:
                extra["bw_fraction_fwd_bwd"] = extra["gbs_fwd_bwd"] / bw
        extra.update(graph_times(fwd, fwd_bwd if has_bwd else None, device, reps))  # kernels alone
        g_f, g_fb = extra.get("fwd_graph_ms"), extra.get("fwd_bwd_graph_ms")
        if bw and g_f:
            extra["bw_fraction_fwd_graph"] = bytes_fwd / (g_f * 1e-3) / 1e9 / bw
            if g_fb:
                extra["bw_fraction_fwd_bwd_graph"] = (bytes_fwd + bytes_bwd) / (g_fb * 1e-3) / 1e9 / bw
        smb = saved_mb(lambda: fn(*qkv.unbind(3))) if has_bwd else None
        extra.update(tuned_since(before))  # the tiles the Triton autotuner picked (none on a CPU)
        note = "" if has_bwd else "no backward on this device"
        if impl == "flex_attention":
            note = (note + "; " if note else "") + "mask-border semantics"
        return Result("neighborhood_attention", label, impl, dname, f_ms, fb_ms, smb,
                      peak_mb(fwd_bwd, device) if has_bwd else None, note, extra)
    except Exception as e:
        return Result("neighborhood_attention", label, impl, dname, note=f"error: {type(e).__name__}: {e}"[:120])
