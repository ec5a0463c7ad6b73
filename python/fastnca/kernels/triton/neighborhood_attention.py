"""Triton kernels for ``fastnca.neighborhood_attention2d`` (DESIGN.md, Op 3).

Assumptions (the launchers enforce them):
  - q, k, v [B, H, W, heads, D] float32/float16/bfloat16 with stride(-1) == 1; every
    other stride is free, so views of one packed qkv tensor run without a copy.
    grad_o and grad_lse may have any strides (even 0, e.g. the gradient of ``o.sum()``).
  - o, dq, dk, dv are written contiguous in the input dtype; lse contiguous float32.
  - Softmax and all accumulations in float32. No atomics: every output element is
    written by exactly one program, so gradients are bitwise reproducible.

Tiling. One program owns a BLOCK_Y x BLOCK_X tile of cells of one image times BLOCK_H
heads; the tile is a [BLOCK_M, BLOCK_D] register block with BLOCK_M = BLOCK_Y * BLOCK_X *
BLOCK_H rows, row m = (ty * BLOCK_X + tx) * BLOCK_H + h (heads fastest, so for small D
the rows of neighbouring heads -- adjacent in memory -- are loaded together), and D padded
to a power of two with masks. Every window load is a gather of whole rows: the
kernel_size^2 shifted copies of a tile overlap, so after the first they come from L1/L2
and DRAM sees each of q, k, v, o about once (the op is memory-bound: ~36*D FLOP per
query-head for k=3 against >= 8*D bytes in fp16). 2-D tiles (BLOCK_Y > 1) cut the
vertical halo re-read from L2 from (1 + 2r)x to (1 + 2r / BLOCK_Y)x.

Forward: online softmax over the window, the centre offset first so the running max is
finite from the start even under border="mask" (the centre key is always inside).
Backward: `_na2d_backward_preprocess_kernel` writes the per-(cell, head) float32
workspace (lse_i, Di = <do_i, o_i> - dlse_i); `_na2d_backward_kernel` then, per tile,
gathers dq over each query's window and dk, dv over each key's inverse neighbourhood
(recomputing p_ij = exp(s_ij - lse_i) from q_i, k_j). Fusing the dq and dk/dv passes
into one program reads each own q/k/v/do tile from DRAM once instead of twice.

Border maps mirror csrc/include/fastnca/borders.h (key_index; codes from fastnca._ext).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from ... import _ext

_ZEROS = tl.constexpr(_ext.BORDER_CODES["zeros"])
_MASK = tl.constexpr(_ext.BORDER_CODES["mask"])
_CIRCULAR = tl.constexpr(_ext.BORDER_CODES["circular"])
_SHIFT = tl.constexpr(_ext.BORDER_CODES["shift"])


# ---- shared index math ---------------------------------------------------------------
@triton.jit
def _key_index(i, a, n, R: tl.constexpr, BORDER: tl.constexpr):
    """Key coordinate read by query coordinate i through offset a, or -1 (outside)."""
    if BORDER == _CIRCULAR:
        k = (i + a + R * n) % n  # + R*n keeps the dividend >= 0 (C and Python % agree)
    elif BORDER == _SHIFT:
        k = tl.minimum(tl.maximum(i, R), n - 1 - R) + a
    else:
        k = i + a
        k = tl.where((k >= 0) & (k < n), k, -1)
    return k


@triton.jit
def _query_index(j, a, n, R: tl.constexpr, BORDER: tl.constexpr):
    """The query coordinate that reads key j through offset a (zeros/mask/circular), or -1."""
    if BORDER == _CIRCULAR:
        i = (j - a + R * n) % n
    else:
        i = j - a
        i = tl.where((i >= 0) & (i < n), i, -1)
    return i


@triton.jit
def _shift_query_range(j, n, R: tl.constexpr):
    """border="shift": the queries whose clamped window holds key j form the contiguous
    range [lo, hi] (clamp is monotone): at most 2r+1 cells inside, up to 4r+1 at edges."""
    lo = tl.where(j <= 2 * R, 0, j - R)
    hi = tl.where(j >= n - 1 - 2 * R, n - 1, j + R)
    return lo, hi


@triton.jit
def _tile(H, W, NH, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's image b and per-row (y, x, head) coordinates; heads fastest in the
    program order too, so programs sharing cells run together (L2 reuse)."""
    pid = tl.program_id(0)
    n_th = tl.cdiv(NH, BLOCK_H)
    n_tx = tl.cdiv(W, BLOCK_X)
    n_ty = tl.cdiv(H, BLOCK_Y)
    th = pid % n_th
    rest = pid // n_th
    tx = rest % n_tx
    rest = rest // n_tx
    ty = rest % n_ty
    b = rest // n_ty
    m = tl.arange(0, BLOCK_Y * BLOCK_X * BLOCK_H)
    h = th * BLOCK_H + m % BLOCK_H
    x = tx * BLOCK_X + (m // BLOCK_H) % BLOCK_X
    y = ty * BLOCK_Y + m // (BLOCK_H * BLOCK_X)
    ok = (y < H) & (x < W) & (h < NH)
    return b, y, x, h, ok


@triton.jit
def _cell(y, x, sy, sx):
    """Row offset of cell (y, x) in int64 (large batches overflow int32)."""
    return y.to(tl.int64) * sy + x.to(tl.int64) * sx


# ---- forward -------------------------------------------------------------------------
@triton.jit
def _fwd_row(a, m_i, l_i, acc, q, y, x, ok, d, dm, k_base, sky, skx, v_base, svy, svx, H, W,
             KS: tl.constexpr, BORDER: tl.constexpr):
    """Online-softmax update with the KS keys of window row a (offsets (a, -r..r))."""
    R: tl.constexpr = KS // 2
    ky = _key_index(y, a, H, R, BORDER)
    for bi in tl.static_range(KS):
        kx = _key_index(x, bi - R, W, R, BORDER)
        inside = (ky >= 0) & (kx >= 0)
        m2 = (ok & inside)[:, None] & dm[None, :]
        k = tl.load(k_base[:, None] + _cell(ky, kx, sky, skx)[:, None] + d[None, :], mask=m2, other=0.0)
        v = tl.load(v_base[:, None] + _cell(ky, kx, svy, svx)[:, None] + d[None, :], mask=m2, other=0.0)
        s = tl.sum(q * k.to(tl.float32), 1)
        if BORDER == _MASK:
            # Outside keys take s = m_i (the max stays put) and p = 0. Padded rows
            # (ok = 0, never stored) count as inside with s = 0, so nothing turns NaN.
            keep = inside | (ok == 0)
            s = tl.where(keep, s, m_i)
        elif BORDER == _ZEROS:
            s = tl.where(inside, s, 0.0)  # a zero key: logit exactly 0, still in the softmax
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)  # exactly 0 at the first key (m_i = -FLT_MAX)
        p = tl.exp(s - m_new)
        if BORDER == _MASK:
            p = tl.where(keep, p, 0.0)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _na2d_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
    H, W, NH, D, scale,
    KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    BLOCK_M: tl.constexpr = BLOCK_Y * BLOCK_X * BLOCK_H
    b, y, x, h, ok = _tile(H, W, NH, BLOCK_Y, BLOCK_X, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    tile_mask = ok[:, None] & dm[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    k_base = k_ptr + b64 * skb + h64 * skh
    v_base = v_ptr + b64 * svb + h64 * svh
    q = tl.load((q_ptr + b64 * sqb + h64 * sqh + _cell(y, x, sqy, sqx))[:, None] + d[None, :],
                mask=tile_mask, other=0.0).to(tl.float32) * scale

    # Running max starts at -FLT_MAX, not -inf: with border="mask" a row may begin with
    # outside keys, and -inf - -inf would be NaN.
    m_i = tl.full([BLOCK_M], -3.4028234663852886e38, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # UNROLL: the whole window unrolled lets the compiler issue all of its loads at once
    # (k=3); for k=5/7 that hoisting spills (sm_90: 255 regs + stack at k=7), so window
    # rows run as a loop and only the KS loads of one row are unrolled.
    if UNROLL:
        for ai in tl.static_range(KS):
            m_i, l_i, acc = _fwd_row(ai - R, m_i, l_i, acc, q, y, x, ok, d, dm, k_base, sky, skx,
                                     v_base, svy, svx, H, W, KS, BORDER)
    else:
        for ai in range(KS):
            m_i, l_i, acc = _fwd_row(ai - R, m_i, l_i, acc, q, y, x, ok, d, dm, k_base, sky, skx,
                                     v_base, svy, svx, H, W, KS, BORDER)

    # Outputs are contiguous: row index ((b*H + y)*W + x)*NH + h.
    row = ((b64 * H + y) * W + x) * NH + h
    o = acc / l_i[:, None]
    tl.store(o_ptr + row[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + row, m_i + tl.log(l_i), mask=ok)


# ---- backward ------------------------------------------------------------------------
@triton.jit
def _na2d_backward_preprocess_kernel(
    o_ptr, do_ptr, lse_ptr, dlse_ptr, ws_ptr,
    sob, soy, sox, soh, sdob, sdoy, sdox, sdoh, sdod, slb, sly, slx, slh, sgb, sgy, sgx, sgh,
    H, W, NH, D,
    HAS_DLSE: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ws[row] = (lse_i, Di = <do_i, o_i> - dlse_i), float32, row = ((b*H + y)*W + x)*NH + h."""
    b, y, x, h, ok = _tile(H, W, NH, BLOCK_Y, BLOCK_X, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    tile_mask = ok[:, None] & (d < D)[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = tl.load((o_ptr + b64 * sob + h64 * soh + _cell(y, x, soy, sox))[:, None] + d[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load((do_ptr + b64 * sdob + h64 * sdoh + _cell(y, x, sdoy, sdox))[:, None] + d[None, :].to(tl.int64) * sdod,
                 mask=tile_mask, other=0.0)
    di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        di -= tl.load(dlse_ptr + b64 * sgb + h64 * sgh + _cell(y, x, sgy, sgx), mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + b64 * slb + h64 * slh + _cell(y, x, sly, slx), mask=ok, other=0.0)
    row = ((b64 * H + y) * W + x) * NH + h
    tl.store(ws_ptr + 2 * row, lse, mask=ok)
    tl.store(ws_ptr + 2 * row + 1, di, mask=ok)


@triton.jit
def _dq_row(a, dq, q, do, lse, di, y, x, ok, d, dm, k_base, sky, skx, v_base, svy, svx, H, W,
            KS: tl.constexpr, BORDER: tl.constexpr):
    """dq_i (unscaled) += sum over window row a of p_ij (dp_ij - Di) k_j. Outside keys add
    nothing (zeros border: k = 0; mask: p = 0)."""
    R: tl.constexpr = KS // 2
    ky = _key_index(y, a, H, R, BORDER)
    for bi in tl.static_range(KS):
        kx = _key_index(x, bi - R, W, R, BORDER)
        inside = ok & (ky >= 0) & (kx >= 0)
        m2 = inside[:, None] & dm[None, :]
        k = tl.load(k_base[:, None] + _cell(ky, kx, sky, skx)[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(v_base[:, None] + _cell(ky, kx, svy, svx)[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
        p = tl.where(inside, tl.exp(tl.sum(q * k, 1) - lse), 0.0)  # q carries the scale
        ds = p * (tl.sum(do * v, 1) - di)
        dq += ds[:, None] * k
    return dq


@triton.jit
def _dkv_update(dk, dv, kj, vj, iy, ix, valid, b64, h, H, W, NH, q_base, sqy, sqx,
                do_base, sdoy, sdox, sdod, ws_ptr, d, dm):
    """Adds query (iy, ix)'s share to dk_j (unscaled) and dv_j; rows with valid=False add 0."""
    m2 = valid[:, None] & dm[None, :]
    qi = tl.load(q_base[:, None] + _cell(iy, ix, sqy, sqx)[:, None] + d[None, :], mask=m2, other=0.0).to(tl.float32)
    doi = tl.load(do_base[:, None] + _cell(iy, ix, sdoy, sdox)[:, None] + d[None, :].to(tl.int64) * sdod,
                  mask=m2, other=0.0).to(tl.float32)
    row = ((b64 * H + iy) * W + ix) * NH + h
    lse_i = tl.load(ws_ptr + 2 * row, mask=valid, other=0.0)
    di_i = tl.load(ws_ptr + 2 * row + 1, mask=valid, other=0.0)
    p = tl.where(valid, tl.exp(tl.sum(qi * kj, 1) - lse_i), 0.0)  # kj carries the scale
    ds = p * (tl.sum(doi * vj, 1) - di_i)
    dk += ds[:, None] * qi
    dv += p[:, None] * doi
    return dk, dv


@triton.jit
def _dkv_row(a, dk, dv, kj, vj, y, x, ok, b64, h, H, W, NH, q_base, sqy, sqx, do_base, sdoy, sdox, sdod,
             ws_ptr, d, dm, KS: tl.constexpr, BORDER: tl.constexpr):
    """dk_j, dv_j from the queries that read key j through window row a (zeros/mask/circular:
    one query per offset; circular grids smaller than the window repeat a pair once per
    offset, exactly as the forward counts it)."""
    R: tl.constexpr = KS // 2
    iy = _query_index(y, a, H, R, BORDER)
    for bi in tl.static_range(KS):
        ix = _query_index(x, bi - R, W, R, BORDER)
        valid = ok & (iy >= 0) & (ix >= 0)
        dk, dv = _dkv_update(dk, dv, kj, vj, iy, ix, valid, b64, h, H, W, NH, q_base, sqy, sqx,
                             do_base, sdoy, sdox, sdod, ws_ptr, d, dm)
    return dk, dv


@triton.jit
def _na2d_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, dq_ptr, dk_ptr, dv_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh, sdod,
    H, W, NH, D, scale,
    KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    R: tl.constexpr = KS // 2
    BLOCK_M: tl.constexpr = BLOCK_Y * BLOCK_X * BLOCK_H
    b, y, x, h, ok = _tile(H, W, NH, BLOCK_Y, BLOCK_X, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    tile_mask = ok[:, None] & dm[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = q_ptr + b64 * sqb + h64 * sqh
    k_base = k_ptr + b64 * skb + h64 * skh
    v_base = v_ptr + b64 * svb + h64 * svh
    do_base = do_ptr + b64 * sdob + h64 * sdoh
    row = ((b64 * H + y) * W + x) * NH + h
    out_off = row[:, None] * D + d[None, :]

    # Pass 1, this tile as queries: dq_i = scale * sum_j p_ij (dp_ij - Di) k_j over the window.
    q = tl.load(q_base[:, None] + _cell(y, x, sqy, sqx)[:, None] + d[None, :], mask=tile_mask,
                other=0.0).to(tl.float32) * scale
    do = tl.load(do_base[:, None] + _cell(y, x, sdoy, sdox)[:, None] + d[None, :].to(tl.int64) * sdod,
                 mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(ws_ptr + 2 * row, mask=ok, other=0.0)
    di = tl.load(ws_ptr + 2 * row + 1, mask=ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if UNROLL:  # see the forward kernel
        for ai in tl.static_range(KS):
            dq = _dq_row(ai - R, dq, q, do, lse, di, y, x, ok, d, dm, k_base, sky, skx, v_base, svy, svx,
                         H, W, KS, BORDER)
    else:
        for ai in range(KS):
            dq = _dq_row(ai - R, dq, q, do, lse, di, y, x, ok, d, dm, k_base, sky, skx, v_base, svy, svx,
                         H, W, KS, BORDER)
    tl.store(dq_ptr + out_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)

    # Pass 2, this tile as keys: gather over the queries whose window holds key j.
    kj = tl.load(k_base[:, None] + _cell(y, x, sky, skx)[:, None] + d[None, :], mask=tile_mask,
                 other=0.0).to(tl.float32) * scale
    vj = tl.load(v_base[:, None] + _cell(y, x, svy, svx)[:, None] + d[None, :], mask=tile_mask,
                 other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BORDER == _SHIFT:
        # Window keys are distinct under shift, so each (query, key) pair counts once and
        # the offset need not be known: scan the per-axis query ranges. Interior tiles run
        # (2r+1)^2 iterations, edge tiles up to (4r+1)^2 (tile-wide maximum range).
        lo_y, hi_y = _shift_query_range(y, H, R)
        lo_x, hi_x = _shift_query_range(x, W, R)
        n_y = tl.max(tl.where(ok, hi_y - lo_y + 1, 0), 0)
        n_x = tl.max(tl.where(ok, hi_x - lo_x + 1, 0), 0)
        for u in range(0, n_y):
            iy = lo_y + u
            for w in range(0, n_x):
                ix = lo_x + w
                valid = ok & (iy <= hi_y) & (ix <= hi_x)
                dk, dv = _dkv_update(dk, dv, kj, vj, iy, ix, valid, b64, h, H, W, NH, q_base, sqy, sqx,
                                     do_base, sdoy, sdox, sdod, ws_ptr, d, dm)
    elif UNROLL:
        for ai in tl.static_range(KS):
            dk, dv = _dkv_row(ai - R, dk, dv, kj, vj, y, x, ok, b64, h, H, W, NH, q_base, sqy, sqx,
                              do_base, sdoy, sdox, sdod, ws_ptr, d, dm, KS, BORDER)
    else:
        for ai in range(KS):
            dk, dv = _dkv_row(ai - R, dk, dv, kj, vj, y, x, ok, b64, h, H, W, NH, q_base, sqy, sqx,
                              do_base, sdoy, sdox, sdod, ws_ptr, d, dm, KS, BORDER)
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)


# ---- launch configuration ------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _autotuning() -> bool:
    # FASTNCA_TRITON_AUTOTUNE=0 pins the default tile (bitwise-identical results across
    # processes; autotuning may pick a different reduction layout per process).
    return os.environ.get("FASTNCA_TRITON_AUTOTUNE", "1") not in ("", "0") and not _interpreting()


def _head_tile(nh: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): D padded to a power of two (>= 2: size-1 blocks are avoided),
    and enough heads per row group that a cell's slice spans >= 128 elements, so small-D
    tiles still read whole 128-byte lines when the heads are adjacent in memory."""
    block_d = max(2, triton.next_power_of_2(D))
    block_h = min(triton.next_power_of_2(nh), max(1, 128 // block_d))
    return block_h, block_d


def _tile_configs(width: int, backward: bool) -> list[triton.Config]:
    """Candidate (BLOCK_Y, BLOCK_X, num_warps) for a cell slice of `width` elements.

    Forward keeps 4 live [BLOCK_M, BLOCK_D] fp32 blocks (q, acc, k, v), backward 6
    (q/do/dq then k/v/dk/dv + gathered q/do): aim at 4096 (fwd) / 2048 (bwd) elements per
    block, i.e. 16-32 fp32 registers per block and thread at 4-8 warps, which leaves room
    for several programs per SM to keep loads in flight. Tiles of 2-4 rows trade the
    vertical halo re-read against the horizontal one. Unmeasured on a GPU so far.
    """
    budget = 2048 if backward else 4096
    cells = max(1, budget // width)
    out = []
    for by in (1, 2, 4):
        bx = max(1, cells // by)
        for nw in ((4, 8) if cells * width >= 2048 else (2, 4)):
            out.append(triton.Config({"BLOCK_Y": by, "BLOCK_X": bx}, num_warps=nw))
    return out


def _default_config(H: int, W: int, width: int, backward: bool) -> dict:
    if _interpreting():
        # The interpreter pays per program and per op, not per element: cover small grids
        # with one tile.
        return {"BLOCK_Y": min(triton.next_power_of_2(H), 8),
                "BLOCK_X": min(triton.next_power_of_2(W), 32), "num_warps": 4}
    cfg = _tile_configs(width, backward)[2]  # BLOCK_Y = 2, mid-size warps
    return {**cfg.kwargs, "num_warps": cfg.num_warps}


def _unroll(kernel_size: int) -> bool:
    return kernel_size == 3


_AUTOTUNE_KEY = ["H", "W", "NH", "D", "KS", "BORDER"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, width: int, backward: bool):
    # One Autotuner per (kernel, cell-slice width): the candidate list depends on width.
    return triton.autotune(configs=_tile_configs(width, backward), key=_AUTOTUNE_KEY)(globals()[kernel_name])


def _launch(kernel_name, backward, B, H, W, NH, width, args, consts):
    def grid(meta):
        return (B * triton.cdiv(H, meta["BLOCK_Y"]) * triton.cdiv(W, meta["BLOCK_X"])
                * triton.cdiv(NH, meta["BLOCK_H"]),)

    if _autotuning():
        _tuned(kernel_name, width, backward)[grid](*args, **consts)
    else:
        cfg = _default_config(H, W, width, backward)
        globals()[kernel_name][grid](*args, **consts, **cfg)


def _check(q, k, v):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, got {q.dtype}; "
                        "use backend='cpu' or 'reference' for float64")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ---- host launchers (backend interface) ----------------------------------------------
def forward(q, k, v, kernel_size, border, scale):
    _check(q, k, v)
    B, H, W, NH, D = q.shape
    o = torch.empty((B, H, W, NH, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W, NH), dtype=torch.float32, device=q.device)
    block_h, block_d = _head_tile(NH, D)
    with _device_guard(q):
        _launch("_na2d_forward_kernel", False, B, H, W, NH, block_h * block_d,
                (q, k, v, o, lse, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], H, W, NH, D, float(scale)),
                dict(KS=kernel_size, BORDER=_ext.BORDER_CODES[border], UNROLL=_unroll(kernel_size), BLOCK_H=block_h,
                     BLOCK_D=block_d))
    return o, lse


def backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale):
    _check(q, k, v)
    if o.stride(-1) != 1:  # o is ours (contiguous) unless a caller mixes backends
        o = o.contiguous()
    B, H, W, NH, D = q.shape
    block_h, block_d = _head_tile(NH, D)
    width = block_h * block_d
    ws = torch.empty((B, H, W, NH, 2), dtype=torch.float32, device=q.device)  # (lse, Di)
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse  # placeholder pointer, never read
    dq = torch.empty((B, H, W, NH, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    with _device_guard(q):
        # The preprocess pass is a plain streaming reduction: fixed tile, no tuning.
        pre = {"BLOCK_Y": 1, "BLOCK_X": max(1, 4096 // width) if not _interpreting()
               else min(triton.next_power_of_2(W), 32), "num_warps": 4}
        if _interpreting():
            pre["BLOCK_Y"] = min(triton.next_power_of_2(H), 8)
        grid = (B * triton.cdiv(H, pre["BLOCK_Y"]) * triton.cdiv(W, pre["BLOCK_X"]) * triton.cdiv(NH, block_h),)
        _na2d_backward_preprocess_kernel[grid](
            o, grad_o, lse, dlse, ws, *o.stride()[:4], *grad_o.stride(), *lse.stride(), *dlse.stride(),
            H, W, NH, D, HAS_DLSE=has_dlse, BLOCK_H=block_h, BLOCK_D=block_d, **pre)
        _launch("_na2d_backward_kernel", True, B, H, W, NH, width,
                (q, k, v, grad_o, ws, dq, dk, dv, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4],
                 *grad_o.stride(), H, W, NH, D, float(scale)),
                dict(KS=kernel_size, BORDER=_ext.BORDER_CODES[border], UNROLL=_unroll(kernel_size), BLOCK_H=block_h,
                     BLOCK_D=block_d))
    return dq, dk, dv
