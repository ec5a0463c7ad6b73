"""Triton kernels for ``fastnca.neighborhood_attention2d`` (DESIGN.md, Op 3).

Assumptions (the launchers enforce them):
  - q, k, v [B, H, W, heads, D] float32/float16/bfloat16 with stride(-1) == 1; every
    other stride is free, so views of one packed qkv tensor run without a copy.
    grad_o and grad_lse may have any strides (even 0, e.g. the gradient of ``o.sum()``).
  - o, dq, dk, dv are written contiguous in the input dtype; lse contiguous float32.
  - Softmax and all accumulations in float32. No atomics: every output element is
    written by exactly one program, so gradients are bitwise reproducible.

Tiling. One program owns a BLOCK_Y x BLOCK_X tile of cells of one image times BLOCK_H
heads, held as a [BLOCK_M, NSPLIT, BLOCK_D / NSPLIT] register block: BLOCK_M = BLOCK_Y *
BLOCK_X * BLOCK_H rows, row m = (ty * BLOCK_X + tx) * BLOCK_H + h (heads fastest, so for
small D the rows of neighbouring heads, adjacent in memory, load together), D padded to a
power of two with masks, each D-row in NSPLIT column chunks so that a thread holds
vectors of one row only (_cols, _nsplit). bfloat16 rows load as int32 words of two values
and widen with one shift or mask each (_f32). Every window load is a gather of whole rows through the border map; the
kernel_size^2 shifted copies of a tile overlap, so after the first they hit L1/L2 and
DRAM sees q, k, v and o about once each. The op is memory-bound (~36*D FLOP per
query-head at k=3 against >= 8*D bytes in fp16); 2-D tiles (BLOCK_Y > 1) cut the
vertical halo re-read from L2 from (1 + 2r)x to (1 + 2r / BLOCK_Y)x.

Forward: online softmax in fp32 over the window, row by row of offsets.
Backward: `_na2d_backward_preprocess_kernel` writes a float32 workspace (lse_i,
Di = <do_i, o_i> - dlse_i) per (cell, head); `_na2d_backward_kernel` then, per tile,
gathers dq over each query's window and dk, dv over each key's inverse neighbourhood,
recomputing p_ij = exp(s_ij - lse_i) from q_i and k_j. One program does both passes,
so its own q, k, v, do tiles come from DRAM once: 9 D-rows of traffic per query-head for
the whole backward (o, do; q, k, v, do; dq, dk, dv) instead of 12 for a dq kernel that
also computes Di plus a separate dk/dv kernel.

Forward, tensor-core candidate (FASTNCA_TRITON_NA_FORWARD=halo, opt-in until a GPU has
timed it): `_na2d_forward_halo_kernel` takes an 8 x 8 query tile of one head, loads the
keys and values of its (8 + 2r)^2 halo once, and computes the [64, halo] scores as one
dot, weighting each (query, key) by how many window offsets read that key: a dense
masked softmax instead of k^2 row reductions per query (the per-window kernel above was
at 7-24% of the H100's copy bandwidth; benchmarks/README.md).

The halo backward (FASTNCA_TRITON_NA_BACKWARD=halo, also opt-in) reuses the preprocess
workspace: `_na2d_backward_dq_halo_kernel` recomputes a query tile's p and ds against its
key halo (dq = scale ds @ K); `_na2d_backward_dkv_halo_kernel` takes a key tile against
its query halo (radius r; 2r for shift, whose windows shift inward at the borders) for
dv = P^T dO and dk = scale dS^T Q. Each (query, offset) pair has exactly one halo slot, so
the weights count it once, also on circular grids smaller than the window.

Border maps mirror csrc/include/fastnca/borders.h (key_index; codes from fastnca._ext).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ... import _ext
from ._runtime import (autotune, autotuning, cdiv, const, fp32_dot_precision, interpreting, next_pow2, on_device,
                       triton_version)

_ZEROS = const(_ext.BORDER_CODES["zeros"])
_MASK = const(_ext.BORDER_CODES["mask"])
_CIRCULAR = const(_ext.BORDER_CODES["circular"])
_SHIFT = const(_ext.BORDER_CODES["shift"])
# exp as one ex2.approx.ftz on NVIDIA GPUs (_exp); the interpreter runs tl.exp
_FAST_EXP = const(not interpreting() and torch.version.hip is None)


# ---- shared index math ---------------------------------------------------------------
@triton.jit
def _wrap(v, n):
    """v mod n in [0, n) (borders.h wrap_index): % keeps the dividend's sign in Triton, as in C.
    Neither (v + R*n) % n nor (v % n + n) % n: both overflow int32 on axes past 2^29 / 2^30."""
    m = v % n
    return tl.where(m < 0, m + n, m)


@triton.jit
def _key_index(i, a, n, R: tl.constexpr, BORDER: tl.constexpr):
    """Key coordinate read by query coordinate i through offset a, or -1 (outside)."""
    if BORDER == _CIRCULAR:
        k = _wrap(i + a, n)
    elif BORDER == _SHIFT:
        k = tl.minimum(tl.maximum(i, R), n - 1 - R) + a
    else:
        k = i + a
        k = tl.where((k >= 0) & (k < n), k, -1)
    return k


@triton.jit
def _query_index(j, a, n, R: tl.constexpr, BORDER: tl.constexpr):
    """The query coordinate reading key j through offset a (zeros/mask/circular), or -1."""
    if BORDER == _CIRCULAR:
        i = _wrap(j - a, n)
    else:
        i = j - a
        i = tl.where((i >= 0) & (i < n), i, -1)
    return i


@triton.jit
def _shift_query_range(j, n, R: tl.constexpr):
    """border="shift": the queries whose clamped window holds key j form the range
    [lo, hi] (clamp is monotone): 2r+1 of them inside the grid, up to 4r+1 near edges
    (a subset of borders.h's query_range [j-2r, j+2r])."""
    lo = tl.where(j <= 2 * R, 0, j - R)
    hi = tl.where(j >= n - 1 - 2 * R, n - 1, j + R)
    return lo, hi


@triton.jit
def _tile_origin(H, W, n_head_tiles, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's (image b, tile row ty, tile column tx, head tile th). Head tiles vary
    fastest in the program order, so programs sharing cells run together (L2 reuse)."""
    pid = tl.program_id(0)
    n_tx = tl.cdiv(W, BLOCK_X)
    n_ty = tl.cdiv(H, BLOCK_Y)
    th = pid % n_head_tiles
    rest = pid // n_head_tiles
    tx = rest % n_tx
    rest = rest // n_tx
    ty = rest % n_ty
    return rest // n_ty, ty, tx, th


@triton.jit
def _tile(H, W, NH, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's image b and per-row (y, x, head) coordinates (_tile_origin's order)."""
    b, ty, tx, th = _tile_origin(H, W, tl.cdiv(NH, BLOCK_H), BLOCK_Y, BLOCK_X)
    m = tl.arange(0, BLOCK_Y * BLOCK_X * BLOCK_H)
    h = th * BLOCK_H + m % BLOCK_H
    x = tx * BLOCK_X + (m // BLOCK_H) % BLOCK_X
    y = ty * BLOCK_Y + m // (BLOCK_H * BLOCK_X)
    ok = (y < H) & (x < W) & (h < NH)
    return b, y, x, h, ok


@triton.jit
def _ptrs(ptr, base, y, x, sy, sx, d, sd, VEC: tl.constexpr):
    """[BLOCK_M, NSPLIT, DC] pointers of the D-rows of cells (y, x), d the columns (_cols or
    _load_cols); base = b*sb + h*sh in the offset type (int64 where a tensor spans 2^31
    elements, else int32: _wide), which the row offsets take. The launcher proves every
    row offset a multiple of VEC load units, so gathered rows load as 16-byte vectors even
    where the compiler cannot see it (head stride 8, say). sd is the last-dim stride: 1
    (specialised away) except for a strided grad_o."""
    off = tl.multiple_of(base + y.to(base.dtype) * sy + x.to(base.dtype) * sx, VEC)
    return ptr + off[:, None, None] + d.to(base.dtype) * sd


@triton.jit
def _wide(i, OFF64: tl.constexpr):
    """i in the window kernels' offset type: int64 where a tensor spans 2^31 elements or
    more (_off64), else int32 (sm_90, GeCA-S bf16: 5-6% fewer instructions, backward
    registers 108 -> 80)."""
    if OFF64:
        return i.to(tl.int64)
    else:
        return i


@triton.jit
def _out_rows(b64, y, x, h, H, W, NH):
    """Row index ((b*H + y)*W + x)*NH + h of the contiguous outputs and workspaces."""
    return ((b64 * H + y) * W + x) * NH + h


@triton.jit
def _cols(NSPLIT: tl.constexpr, DC: tl.constexpr):
    """[1, NSPLIT, DC] column indices of the window kernels' [BLOCK_M, NSPLIT, DC] blocks:
    chunk c holds columns c*DC .. c*DC + DC - 1 of every row. Triton's load layout takes
    the contiguous last dim first, then the rows (dim 0; dims of equal contiguity go in
    index order), and repeats the chunk dim in each thread: with DC = VEC * 32 * num_warps
    / BLOCK_M (_nsplit) a thread holds whole vectors of ONE row, so the per-row work
    (window addresses, softmax, the reductions' shuffles) runs once per row, not once per
    row and vector group. (Chunks as the leading dim got threads of their own.)"""
    return (tl.arange(0, NSPLIT) * DC)[None, :, None] + tl.arange(0, DC)[None, None, :]


@triton.jit
def _f32(t, PAIRS: tl.constexpr):
    """A loaded [BLOCK_M, NSPLIT, DC] block in float32. PAIRS: t holds int32 words of two
    bfloat16 values each (the launcher passes int32 views of bfloat16 tensors): the low
    half is the even column. A bfloat16 is the top half of its float32, so each value
    takes one shift or mask, where the compiler's conversion takes ~1.5 instructions a value
    (a byte permute for the high half, then a shift). The join + reshape interleaves the
    halves back into column order in registers."""
    if PAIRS:
        lo = (t << 16).to(tl.float32, bitcast=True)
        hi = (t & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [t.shape[0], t.shape[1], 2 * t.shape[2]])
    else:
        return t.to(tl.float32)


@triton.jit
def _load_cols(NSPLIT: tl.constexpr, DC: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr):
    """(columns, mask) of the window kernels' loads: _cols in elements, or in int32 words
    of two bfloat16 values (PAIRS; D is even then)."""
    if PAIRS:
        dl = _cols(NSPLIT, DC // 2)
        return dl, dl < D // 2
    else:
        dl = _cols(NSPLIT, DC)
        return dl, dl < D


@triton.jit
def _window_tile(H, W, NH, D: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr, PAIRS: tl.constexpr, OFF64: tl.constexpr):
    """A window kernel's tile: b (offset type, _wide), per-row y, x, h and ok (_tile); the
    coordinates its loads use, clamped into the grid for padded rows (ok = 0, never
    stored), and the clamped head in the offset type; the store columns and mask (_cols);
    the load columns and mask (_load_cols)."""
    b, y, x, h, ok = _tile(H, W, NH, BLOCK_Y, BLOCK_X, BLOCK_H)
    hl = tl.minimum(h, NH - 1)
    d = _cols(NSPLIT, BLOCK_D // NSPLIT)
    dl, dml = _load_cols(NSPLIT, BLOCK_D // NSPLIT, D, PAIRS)
    return (_wide(b, OFF64), y, x, h, ok, tl.minimum(y, H - 1), tl.minimum(x, W - 1), hl, _wide(hl, OFF64), d,
            ok[:, None, None] & (d < D), dl, dml)


@triton.jit
def _in_grid(k, own, BORDER: tl.constexpr):
    """A coordinate to load from: k, or `own` (the tile cell's own clamped coordinate: the
    query's in the forward and dq pass, the key's in the dk/dv pass) where k is negative (outside the grid: zeros / mask borders, and shift on a grid smaller than
    the window, whose kernels read a zero key there), so that every window load is in
    bounds and needs no mask; the logit and value of an outside key are set apart
    (zeros and shift: a zero key; mask: left out)."""
    if BORDER == _CIRCULAR:
        return k
    else:
        return tl.where(k >= 0, k, own)


@triton.jit
def _load_rows(ptrs, dm, FULL: tl.constexpr):
    """A window load: unmasked when the D-row has no padded columns (FULL), every row
    address being in bounds (_in_grid, clamped padded rows)."""
    if FULL:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=dm, other=0)


@triton.jit
def _exp(x):
    """exp(x) of the window softmax: one MUFU.EX2 (ex2.approx.ftz; results below 2^-126
    flush to 0, probabilities no softmax term notices). tl.exp lowers to the non-ftz ex2,
    which ptxas wraps in a 4-instruction range fix-up for denormal results (sm_90 SASS);
    the window kernels take 9 to 27 exponentials a row."""
    if _FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _rowsum(t):
    """Row sums [BLOCK_M] of a [BLOCK_M, NSPLIT, DC] block."""
    return tl.sum(tl.sum(t, 2), 1)


# ---- forward -------------------------------------------------------------------------
@triton.jit
def _fwd_row(a, m_i, l_i, acc, q, y, x, yl, xl, ok, d, dm, k_ptr, k_base, sky, skx, v_ptr, v_base, svy, svx,
             H, W, scale, KS: tl.constexpr, BORDER: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr,
             FULL: tl.constexpr):
    """Online-softmax update with the KS keys of window row a (offsets (a, -r..r)), loaded
    in the grid (_in_grid: yl, xl the query's own coordinates, clamped)."""
    R: tl.constexpr = KS // 2
    ky = _key_index(y, a, H, R, BORDER)
    kyl = _in_grid(ky, yl, BORDER)
    for bi in tl.static_range(KS):
        kx = _key_index(x, bi - R, W, R, BORDER)
        inside = (ky >= 0) & (kx >= 0)
        kxl = _in_grid(kx, xl, BORDER)
        k = _f32(_load_rows(_ptrs(k_ptr, k_base, kyl, kxl, sky, skx, d, 1, VEC), dm, FULL), PAIRS)
        v = _f32(_load_rows(_ptrs(v_ptr, v_base, kyl, kxl, svy, svx, d, 1, VEC), dm, FULL), PAIRS)
        s = _rowsum(q * k) * scale
        if BORDER == _MASK:
            # Outside keys take s = m_i (the max stays put) and p = 0. Padded rows
            # (ok = 0, never stored) count as inside, with the finite logit of a
            # clamped real cell, so nothing turns NaN.
            keep = inside | (ok == 0)
            s = tl.where(keep, s, m_i)
        elif BORDER == _ZEROS or BORDER == _SHIFT:
            s = tl.where(inside, s, 0.0)  # a zero key: logit exactly 0, still in the softmax
        m_new = tl.maximum(m_i, s)
        alpha = _exp(m_i - m_new)  # exactly 0 at the first key (m_i = -FLT_MAX)
        p = _exp(s - m_new)
        if BORDER == _MASK:
            p = tl.where(keep, p, 0.0)
        l_i = l_i * alpha + p
        if BORDER == _ZEROS or BORDER == _SHIFT:  # a zero value outside the grid
            p = tl.where(inside, p, 0.0)
        acc = acc * alpha[:, None, None] + p[:, None, None] * v
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _lse(m, l):
    """log-sum-exp from the window's max logit m and its sum of exp(s - m): m itself where
    m is infinite (a +inf logit, or every logit -inf), as torch.logsumexp gives, where
    m + log(l) would be NaN."""
    return tl.where(tl.abs(m) == float("inf"), m, m + tl.log(l))


@triton.jit
def _window_score(q, ky, kx, inside, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER: tl.constexpr,
                  VEC: tl.constexpr, PAIRS: tl.constexpr, FULL: tl.constexpr):
    """The logit of each query row's key, loaded at (ky, kx) (in the grid: _in_grid);
    inside: whether the window's key is in the grid. An outside key under border="mask"
    gets -inf: its probability is exactly 0 against the window's max, which the always-
    inside centre key keeps above -inf unless every logit inside the grid is -inf (then
    the output is NaN and lse -inf, as the reference's; -FLT_MAX here gave those keys
    p = 1, a finite output of the clamped cell's values). Under "zeros" it is a zero key,
    logit exactly 0. Padded rows (ok = 0, never stored) count as inside."""
    k = _load_rows(_ptrs(k_ptr, k_base, ky, kx, sky, skx, d, 1, VEC), dm, FULL)
    s = _rowsum(q * _f32(k, PAIRS)) * scale
    if BORDER == _MASK:
        s = tl.where(inside | (ok == 0), s, -float("inf"))
    elif BORDER == _ZEROS or BORDER == _SHIFT:
        s = tl.where(inside, s, 0.0)  # a zero key: logit exactly 0, still in the softmax
    return s


@triton.jit
def _window_value(acc, p, ky, kx, inside, d, dm, v_ptr, v_base, svy, svx, BORDER: tl.constexpr,
                  VEC: tl.constexpr, PAIRS: tl.constexpr, FULL: tl.constexpr):
    """acc + p * v of the key loaded at (ky, kx): a zero value where the window's key is
    outside the grid (zeros, and shift on grids smaller than the window; under mask its
    p is 0 already)."""
    v = _load_rows(_ptrs(v_ptr, v_base, ky, kx, svy, svx, d, 1, VEC), dm, FULL)
    if BORDER == _ZEROS or BORDER == _SHIFT:
        p = tl.where(inside, p, 0.0)
    return acc + p[:, None, None] * _f32(v, PAIRS)


@triton.jit
def _fwd_window3(q, y, x, yl, xl, ok, d, dm, k_ptr, k_base, sky, skx, v_ptr, v_base, svy, svx, H, W, scale,
                 BORDER: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr, FULL: tl.constexpr):
    """(max logit, softmax denominator, unnormalised output) of a whole 3x3 window in two
    passes: its 9 logits and their max, then the probabilities and the output. Per query
    and head that is 18 D-length multiply-add rows and 9 exponentials, against 27 and 18
    for the online update (_fwd_row), which rescales the output at every key (sm_90 SASS of
    the GeCA-S kernel: 1808 instructions against 2048 in bf16, 2176 against 2512 in fp32)."""
    ya = _key_index(y, -1, H, 1, BORDER)
    yb = _key_index(y, 0, H, 1, BORDER)
    yc = _key_index(y, 1, H, 1, BORDER)
    xa = _key_index(x, -1, W, 1, BORDER)
    xb = _key_index(x, 0, W, 1, BORDER)
    xc = _key_index(x, 1, W, 1, BORDER)
    # load coordinates, in the grid (yl, xl: the query's own, clamped for padded rows)
    la, lb, lc = _in_grid(ya, yl, BORDER), _in_grid(yb, yl, BORDER), _in_grid(yc, yl, BORDER)
    ma, mb, mc = _in_grid(xa, xl, BORDER), _in_grid(xb, xl, BORDER), _in_grid(xc, xl, BORDER)
    i0, i1, i2 = (ya >= 0) & (xa >= 0), (ya >= 0) & (xb >= 0), (ya >= 0) & (xc >= 0)
    i3, i4, i5 = (yb >= 0) & (xa >= 0), (yb >= 0) & (xb >= 0), (yb >= 0) & (xc >= 0)
    i6, i7, i8 = (yc >= 0) & (xa >= 0), (yc >= 0) & (xb >= 0), (yc >= 0) & (xc >= 0)
    s0 = _window_score(q, la, ma, i0, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s1 = _window_score(q, la, mb, i1, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s2 = _window_score(q, la, mc, i2, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s3 = _window_score(q, lb, ma, i3, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s4 = _window_score(q, lb, mb, i4, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s5 = _window_score(q, lb, mc, i5, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s6 = _window_score(q, lc, ma, i6, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s7 = _window_score(q, lc, mb, i7, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    s8 = _window_score(q, lc, mc, i8, ok, d, dm, k_ptr, k_base, sky, skx, scale, BORDER, VEC, PAIRS, FULL)
    m = tl.maximum(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)),
                   tl.maximum(tl.maximum(s4, s5), tl.maximum(tl.maximum(s6, s7), s8)))
    p0 = _exp(s0 - m)
    p1 = _exp(s1 - m)
    p2 = _exp(s2 - m)
    p3 = _exp(s3 - m)
    p4 = _exp(s4 - m)
    p5 = _exp(s5 - m)
    p6 = _exp(s6 - m)
    p7 = _exp(s7 - m)
    p8 = _exp(s8 - m)
    den = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)) + p8
    acc = tl.zeros_like(q)
    acc = _window_value(acc, p0, la, ma, i0, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p1, la, mb, i1, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p2, la, mc, i2, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p3, lb, ma, i3, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p4, lb, mb, i4, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p5, lb, mc, i5, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p6, lc, ma, i6, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p7, lc, mb, i7, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    acc = _window_value(acc, p8, lc, mc, i8, d, dm, v_ptr, v_base, svy, svx, BORDER, VEC, PAIRS, FULL)
    return m, den, acc


@triton.jit
def _na2d_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
    H, W, NH, scale, D: tl.constexpr,
    KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr, VEC: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr,
    PAIRS: tl.constexpr, OFF64: tl.constexpr,
):
    """q, k, v: bfloat16 as int32 words under PAIRS (_f32); strides in load units."""
    R: tl.constexpr = KS // 2
    BLOCK_M: tl.constexpr = BLOCK_Y * BLOCK_X * BLOCK_H
    VL: tl.constexpr = VEC // (1 + PAIRS)  # load units per vector
    FULL: tl.constexpr = D == BLOCK_D  # no padded columns: unmasked loads
    b64, y, x, h, ok, yl, xl, hl, h64, d, tile_mask, dl, dml = _window_tile(
        H, W, NH, D, BLOCK_Y, BLOCK_X, BLOCK_H, BLOCK_D, NSPLIT, PAIRS, OFF64)
    k_base = b64 * skb + h64 * skh
    v_base = b64 * svb + h64 * svh
    q = _load_rows(_ptrs(q_ptr, b64 * sqb + h64 * sqh, yl, xl, sqy, sqx, dl, 1, VL), dml, FULL)
    q = _f32(q, PAIRS)  # the logits are scale * <q, k> (the rounding of every backend)

    # UNROLL (k=3): the whole window unrolled, in two passes (_fwd_window3), lets the
    # compiler issue all its loads at once. At k=5/7 that hoisting spills (sm_90, 8 warps:
    # 255 regs + 6 KB stack at k=7 fwd), so window rows run as a loop with an online softmax
    # and only the KS loads of one row are unrolled (128 regs).
    if UNROLL:
        m_i, l_i, acc = _fwd_window3(q, y, x, yl, xl, ok, dl, dml, k_ptr, k_base, sky, skx, v_ptr, v_base, svy, svx,
                                     H, W, scale, BORDER, VL, PAIRS, FULL)
    else:
        # The running max starts at -FLT_MAX, not -inf: under border="mask" a window may
        # open with outside keys, and -inf - -inf would be NaN.
        m_i = tl.full([BLOCK_M], -3.4028234663852886e38, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros_like(q)
        for ai in range(KS):
            m_i, l_i, acc = _fwd_row(ai - R, m_i, l_i, acc, q, y, x, yl, xl, ok, dl, dml, k_ptr, k_base, sky, skx,
                                     v_ptr, v_base, svy, svx, H, W, scale, KS, BORDER, VL, PAIRS, FULL)

    row = _out_rows(b64, y, x, h, H, W, NH)
    out = tl.multiple_of(row * D, VEC)
    tl.store(o_ptr + out[:, None, None] + d, (acc / l_i[:, None, None]).to(o_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + row, _lse(m_i, l_i), mask=ok)



# ---- forward, tensor-core formulation (opt-in: FASTNCA_TRITON_NA_FORWARD=halo) ---------
@triton.jit
def _window_read(qc, a, n, R: tl.constexpr, BORDER: tl.constexpr):
    """(key coordinate, read) of query coordinate qc through window offset a - R along one
    axis, in unwrapped coordinates: zeros / circular read qc + a - R (the halo loads
    zero-fill or wrap it), mask drops reads outside the grid, shift reads the window
    shifted into the grid. The halo kernels' counterpart of _key_index."""
    if BORDER == _SHIFT:
        kc = tl.minimum(tl.maximum(qc, R), n - 1 - R) + (a - R)
        hit = kc >= 0
    elif BORDER == _MASK:
        kc = qc + (a - R)
        hit = (kc >= 0) & (kc < n)
    else:
        kc = qc + (a - R)
        hit = kc == kc
    return kc, hit


@triton.jit
def _halo_counts(qc, a0, n, R: tl.constexpr, BORDER: tl.constexpr, slot_c):
    """[BLOCK_M, HALO] number of window offsets along one axis through which query
    coordinate qc reads halo coordinate slot_c (unwrapped, halo origin a0)."""
    cnt = tl.zeros([qc.shape[0], slot_c.shape[0]], tl.int32)
    for a in tl.static_range(2 * R + 1):
        kc, hit = _window_read(qc, a, n, R, BORDER)
        cnt += (((kc - a0)[:, None] == slot_c[None, :]) & hit[:, None]).to(tl.int32)
    return cnt


@triton.jit
def _halo_scores(a, b, scale, DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr):
    """scale * a @ b^T in fp32. Half inputs: a native half dot (products of half values are
    exact in fp32, summed in fp32); fp32 inputs: DOT_PREC (tf32x3 on a GPU). HALF_DOT is
    off under the interpreter, whose bfloat16 dot is wrong (the same exact products in
    fp32 there)."""
    if HALF_DOT and a.dtype != tl.float32:
        s = tl.dot(a, tl.trans(b))
    else:
        s = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision=DOT_PREC)
    return s * scale


@triton.jit
def _na2d_forward_halo_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
    H, W, NH, scale, D: tl.constexpr,
    KS: tl.constexpr, BORDER: tl.constexpr, DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, HALO: tl.constexpr, BLOCK_D: tl.constexpr,
    RH: tl.constexpr,
):
    """One program = a BLOCK_Y x BLOCK_X tile of queries of one (image, head). Its keys are
    the (BLOCK_Y + 2RH) x (BLOCK_X + 2RH) halo around the tile (RH = R; 2R for shift, whose
    windows near the far border reach back up to 2R), loaded once (HALO rows, a power of
    two, the rest masked): scores are a dense [tile, halo] tensor-core product, each (query,
    halo key) weighted by how many of the query's window offsets read that key (0: not in
    the window; > 1: a circular window on a grid smaller than itself), so the softmax over
    the halo equals the one over the window, border rules included."""
    R: tl.constexpr = KS // 2
    b, hd, y, x, ok, sy, sx, in_halo, y0, x0, gy, gx, load = _halo_geometry(
        H, W, NH, BLOCK_Y, BLOCK_X, RH, HALO, BORDER == _CIRCULAR)
    s = tl.arange(0, HALO)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    b64 = b.to(tl.int64)
    h64 = hd.to(tl.int64)
    q = tl.load(_halo_rows(q_ptr, b64, h64, y, x, sqb, sqh, sqy, sqx) + d[None, :],
                mask=ok[:, None] & dm[None, :], other=0.0)
    kv_mask = load[:, None] & dm[None, :]
    k = tl.load(_halo_rows(k_ptr, b64, h64, gy, gx, skb, skh, sky, skx) + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(_halo_rows(v_ptr, b64, h64, gy, gx, svb, svh, svy, svx) + d[None, :], mask=kv_mask,
                other=0.0).to(tl.float32)
    scores = _halo_scores(q, k, scale, DOT_PREC, HALF_DOT)  # p @ v below: fp32 at DOT_PREC
    if BORDER == _ZEROS:  # a zero key's logit is exactly 0, also beside an infinite query (not inf * 0)
        scores = tl.where(load[None, :], scores, 0.0)
    cnt = (_halo_counts(y, y0, H, R, BORDER, sy) * _halo_counts(x, x0, W, R, BORDER, sx)).to(tl.float32)
    cnt = tl.where(in_halo[None, :] & ok[:, None], cnt, 0.0)
    cnt = tl.where(ok[:, None] | (s[None, :] > 0), cnt, 1.0)  # padded query rows: one dummy key
    logit = tl.where(cnt > 0, scores, -float("inf"))
    mx = tl.max(logit, 1)
    p = cnt * tl.exp(logit - mx[:, None])
    l_i = tl.sum(p, 1)
    acc = tl.dot(p, v, input_precision=DOT_PREC)
    row = _out_rows(b64, y, x, hd, H, W, NH)
    tl.store(o_ptr + (row * D)[:, None] + d[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=ok[:, None] & dm[None, :])
    tl.store(lse_ptr + row, _lse(mx, l_i), mask=ok)



@triton.jit
def _halo_counts_t(kc, u0, n, R: tl.constexpr, BORDER: tl.constexpr, slot_c):
    """[BLOCK_K, HALO] transpose of _halo_counts for the key-side backward: how many window
    offsets of the query at unwrapped halo coordinate u0 + slot_c read key coordinate kc
    (in the grid). Every (query, offset) pair that reads kc has exactly one slot, at
    kc - offset (the halo radius covers it: R, or 2R for shift), also on circular grids
    smaller than the window; slots outside the grid hold no query except for circular."""
    u = u0 + slot_c
    if BORDER == _CIRCULAR:
        qv = u == u
    else:
        qv = (u >= 0) & (u < n)
    cnt = tl.zeros([kc.shape[0], slot_c.shape[0]], tl.int32)
    for a in tl.static_range(2 * R + 1):
        key, hit = _window_read(u, a, n, R, BORDER)
        cnt += ((key[None, :] == kc[:, None]) & (hit & qv)[None, :]).to(tl.int32)
    return cnt


@triton.jit
def _halo_geometry(H, W, NH, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, RH: tl.constexpr,
                   HALO: tl.constexpr, CIRC: tl.constexpr):
    """This program's (image, head), its tile's cells and its halo of radius RH: tile rows
    (y, x, ok), halo slots (sy, sx, in_halo), unwrapped halo origin (y0, x0), the halo cells'
    grid coordinates (gy, gx) and which of them exist (load)."""
    HX: tl.constexpr = BLOCK_X + 2 * RH
    b, ty, tx, hd = _tile_origin(H, W, NH, BLOCK_Y, BLOCK_X)
    m = tl.arange(0, BLOCK_Y * BLOCK_X)
    y = ty * BLOCK_Y + m // BLOCK_X
    x = tx * BLOCK_X + m % BLOCK_X
    ok = (y < H) & (x < W)
    s = tl.arange(0, HALO)
    y0 = ty * BLOCK_Y - RH
    x0 = tx * BLOCK_X - RH
    sy = s // HX
    sx = s % HX
    in_halo = sy < BLOCK_Y + 2 * RH
    hy = y0 + sy
    hx = x0 + sx
    if CIRC:
        gy = _wrap(hy, H)
        gx = _wrap(hx, W)
        load = in_halo
    else:
        gy = hy
        gx = hx
        load = in_halo & (hy >= 0) & (hy < H) & (hx >= 0) & (hx < W)
    return b, hd, y, x, ok, sy, sx, in_halo, y0, x0, gy, gx, load


@triton.jit
def _halo_rows(ptr, b64, h64, y, x, sb, sh, sy, sx):
    """[BLOCK, 1] pointers to the D-rows of cells (y, x) of image b64, head h64 (int64
    offsets); the halo kernels add the head-dim offsets themselves: _ptrs' int64 ones cost
    them spills (sm_90 compile, GeCA-S: forward 0 -> 8 bytes, dq 280 -> 672, dk/dv 928 ->
    1176)."""
    return ptr + (b64 * sb + h64 * sh + y.to(tl.int64) * sy + x.to(tl.int64) * sx)[:, None]


@triton.jit
def _na2d_backward_dq_halo_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, dq_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdb, sdy, sdx, sdh, sdd,
    H, W, NH, scale, D: tl.constexpr,
    KS: tl.constexpr, BORDER: tl.constexpr, DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, HALO: tl.constexpr, BLOCK_D: tl.constexpr,
    RH: tl.constexpr,
):
    """dq of a query tile against its key halo (the forward's tiling, radius RH): p = n_ij
    exp(s_ij - lse_i), ds = p (do_i . v_j - Di), dq = scale ds @ K."""
    R: tl.constexpr = KS // 2
    b, hd, y, x, ok, sy, sx, in_halo, y0, x0, gy, gx, load = _halo_geometry(
        H, W, NH, BLOCK_Y, BLOCK_X, RH, HALO, BORDER == _CIRCULAR)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    b64 = b.to(tl.int64)
    h64 = hd.to(tl.int64)
    qm = ok[:, None] & dm[None, :]
    q = tl.load(_halo_rows(q_ptr, b64, h64, y, x, sqb, sqh, sqy, sqx) + d[None, :], mask=qm, other=0.0)
    do = tl.load(_halo_rows(do_ptr, b64, h64, y, x, sdb, sdh, sdy, sdx) + d[None, :].to(tl.int64) * sdd,
                 mask=qm, other=0.0).to(tl.float32)
    kv_mask = load[:, None] & dm[None, :]
    k = tl.load(_halo_rows(k_ptr, b64, h64, gy, gx, skb, skh, sky, skx) + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(_halo_rows(v_ptr, b64, h64, gy, gx, svb, svh, svy, svx) + d[None, :], mask=kv_mask,
                other=0.0).to(tl.float32)
    row = _out_rows(b64, y, x, hd, H, W, NH)
    lse = tl.load(ws_ptr + 2 * row, mask=ok, other=0.0)
    di = tl.load(ws_ptr + 2 * row + 1, mask=ok, other=0.0)
    scores = _halo_scores(q, k, scale, DOT_PREC, HALF_DOT)
    if BORDER == _ZEROS:  # as in the forward: zero keys at logit exactly 0
        scores = tl.where(load[None, :], scores, 0.0)
    cnt = (_halo_counts(y, y0, H, R, BORDER, sy) * _halo_counts(x, x0, W, R, BORDER, sx)).to(tl.float32)
    live = (cnt > 0) & in_halo[None, :] & ok[:, None]
    p = tl.where(live, cnt * tl.exp(tl.where(live, scores, 0.0) - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - di[:, None])
    dq = tl.dot(ds, k.to(tl.float32), input_precision=DOT_PREC) * scale
    tl.store(dq_ptr + (row * D)[:, None] + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qm)


@triton.jit
def _na2d_backward_dkv_halo_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, dk_ptr, dv_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdb, sdy, sdx, sdh, sdd,
    H, W, NH, scale, D: tl.constexpr,
    KS: tl.constexpr, BORDER: tl.constexpr, DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, HALO: tl.constexpr, BLOCK_D: tl.constexpr,
    RH: tl.constexpr,
):
    """dk, dv of a key tile against its query halo (radius RH = R; 2R for shift, whose
    windows shift inward at the borders): dv = P^T @ dO, dk = scale dS^T @ Q, with P and dS
    recomputed per (key, query) pair and weighted by the number of offsets that read it."""
    R: tl.constexpr = KS // 2
    b, hd, ky, kx, kok, sy, sx, in_halo, y0, x0, gy, gx, load = _halo_geometry(
        H, W, NH, BLOCK_Y, BLOCK_X, RH, HALO, BORDER == _CIRCULAR)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    b64 = b.to(tl.int64)
    h64 = hd.to(tl.int64)
    km = kok[:, None] & dm[None, :]
    k = tl.load(_halo_rows(k_ptr, b64, h64, ky, kx, skb, skh, sky, skx) + d[None, :], mask=km, other=0.0)
    v = tl.load(_halo_rows(v_ptr, b64, h64, ky, kx, svb, svh, svy, svx) + d[None, :], mask=km,
                other=0.0).to(tl.float32)
    qh_mask = load[:, None] & dm[None, :]
    q = tl.load(_halo_rows(q_ptr, b64, h64, gy, gx, sqb, sqh, sqy, sqx) + d[None, :], mask=qh_mask, other=0.0)
    do = tl.load(_halo_rows(do_ptr, b64, h64, gy, gx, sdb, sdh, sdy, sdx) + d[None, :].to(tl.int64) * sdd,
                 mask=qh_mask, other=0.0).to(tl.float32)
    qrow = _out_rows(b64, gy, gx, hd, H, W, NH)
    lse = tl.load(ws_ptr + 2 * qrow, mask=load, other=0.0)
    di = tl.load(ws_ptr + 2 * qrow + 1, mask=load, other=0.0)
    scores = _halo_scores(k, q, scale, DOT_PREC, HALF_DOT)
    cnt = (_halo_counts_t(ky, y0, H, R, BORDER, sy) * _halo_counts_t(kx, x0, W, R, BORDER, sx)).to(tl.float32)
    live = (cnt > 0) & (in_halo & load)[None, :] & kok[:, None]
    p = tl.where(live, cnt * tl.exp(tl.where(live, scores, 0.0) - lse[None, :]), 0.0)
    dv = tl.dot(p, do, input_precision=DOT_PREC)
    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds = p * (dp - di[None, :])
    dk = tl.dot(ds, q.to(tl.float32), input_precision=DOT_PREC) * scale
    row = _out_rows(b64, ky, kx, hd, H, W, NH)
    tl.store(dk_ptr + (row * D)[:, None] + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=km)
    tl.store(dv_ptr + (row * D)[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=km)


# ---- backward ------------------------------------------------------------------------
@triton.jit
def _na2d_backward_preprocess_kernel(
    o_ptr, do_ptr, lse_ptr, dlse_ptr, ws_ptr,
    sob, soy, sox, soh, sdob, sdoy, sdox, sdoh, sdod, slb, sly, slx, slh, sgb, sgy, sgx, sgh,
    H, W, NH, D: tl.constexpr,
    HAS_DLSE: tl.constexpr, VEC: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr,
    PAIRS: tl.constexpr, OFF64: tl.constexpr,
):
    """ws[row] = (lse_i, Di = <do_i, o_i> - dlse_i) in float32. o, do: bfloat16 as int32
    words under PAIRS (_f32); strides in load units."""
    VL: tl.constexpr = VEC // (1 + PAIRS)
    b, y, x, h, ok = _tile(H, W, NH, BLOCK_Y, BLOCK_X, BLOCK_H)
    dl, dml = _load_cols(NSPLIT, BLOCK_D // NSPLIT, D, PAIRS)
    tile_mask = ok[:, None, None] & dml
    b64 = _wide(b, OFF64)  # b, h in the offset type (int64 when OFF64)
    h64 = _wide(h, OFF64)
    o = tl.load(_ptrs(o_ptr, b64 * sob + h64 * soh, y, x, soy, sox, dl, 1, VL), mask=tile_mask, other=0)
    do = tl.load(_ptrs(do_ptr, b64 * sdob + h64 * sdoh, y, x, sdoy, sdox, dl, sdod, VL), mask=tile_mask, other=0)
    di = _rowsum(_f32(o, PAIRS) * _f32(do, PAIRS))
    if HAS_DLSE:
        dlse = tl.load(dlse_ptr + b64 * sgb + h64 * sgh + y.to(b64.dtype) * sgy + x.to(b64.dtype) * sgx,
                       mask=ok, other=0.0)
        di -= dlse.to(tl.float32)
    lse = tl.load(lse_ptr + b64 * slb + h64 * slh + y.to(b64.dtype) * sly + x.to(b64.dtype) * slx, mask=ok,
                  other=0.0)
    row = _out_rows(b64, y, x, h, H, W, NH)
    tl.store(ws_ptr + 2 * row, lse, mask=ok)
    tl.store(ws_ptr + 2 * row + 1, di, mask=ok)


@triton.jit
def _dq_row(a, dq, q, do, lse, di, y, x, yl, xl, ok, d, dm, k_ptr, k_base, sky, skx, v_ptr, v_base, svy, svx,
            pds_ptr, row, n_rows, H, W, scale, KS: tl.constexpr, BORDER: tl.constexpr, VEC: tl.constexpr,
            PAIRS: tl.constexpr, STORE_PDS: tl.constexpr, FULL: tl.constexpr):
    """dq_i (unscaled) += sum over window row a of p_ij (dp_ij - Di) k_j. Outside keys add
    nothing: p_ij = 0 (their k_j is loaded from an in-grid cell, _in_grid). STORE_PDS: also writes p_ij and ds_ij
    for the split backward's dk/dv pass, slot-major so that a tile's rows are contiguous:
    p at pds[2 * slot * n_rows + row], ds n_rows further (slot = (a + r) * KS + column; 0
    for keys outside the grid, which that pass never reads)."""
    R: tl.constexpr = KS // 2
    ky = _key_index(y, a, H, R, BORDER)
    kyl = _in_grid(ky, yl, BORDER)  # load coordinates (outside keys: p = 0 below)
    for bi in tl.static_range(KS):
        kx = _key_index(x, bi - R, W, R, BORDER)
        inside = ok & (ky >= 0) & (kx >= 0)
        kxl = _in_grid(kx, xl, BORDER)
        k = _f32(_load_rows(_ptrs(k_ptr, k_base, kyl, kxl, sky, skx, d, 1, VEC), dm, FULL), PAIRS)
        v = _f32(_load_rows(_ptrs(v_ptr, v_base, kyl, kxl, svy, svx, d, 1, VEC), dm, FULL), PAIRS)
        p = tl.where(inside, _exp(_rowsum(q * k) * scale - lse), 0.0)
        ds = p * (_rowsum(do * v) - di)
        dq += ds[:, None, None] * k
        if STORE_PDS:
            at = 2 * ((a + R) * KS + bi) * n_rows + row
            tl.store(pds_ptr + at, p, mask=ok)
            tl.store(pds_ptr + at + n_rows, ds, mask=ok)
    return dq


@triton.jit
def _dkv_update(dk, dv, kj, vj, iy, ix, valid, slot, b64, h, H, W, NH, q_ptr, q_base, sqy, sqx,
                do_ptr, do_base, sdoy, sdox, sdod, ws_ptr, pds_ptr, n_rows, d, dm, scale, VEC: tl.constexpr,
                PAIRS: tl.constexpr, FROM_PDS: tl.constexpr, FULL: tl.constexpr):
    """Adds query (iy, ix)'s share to dk_j (unscaled) and dv_j; rows with valid = 0 add 0.
    (iy, ix) and h: where the query is loaded from, always in the grid (_in_grid, clamped
    head); valid: whether it is a real query of key j. FROM_PDS: p_ij and ds_ij come from
    the split backward's pds[row_i, slot] (key j's slot in query i's window; see _dq_row)
    instead of being recomputed from q_i . k_j and do_i . v_j (those loads stay masked)."""
    qi = _f32(_load_rows(_ptrs(q_ptr, q_base, iy, ix, sqy, sqx, d, 1, VEC), dm, FULL), PAIRS)
    doi = _f32(_load_rows(_ptrs(do_ptr, do_base, iy, ix, sdoy, sdox, d, sdod, VEC), dm, FULL), PAIRS)
    row = _out_rows(b64, iy, ix, h, H, W, NH)
    if FROM_PDS:
        at = 2 * slot * n_rows + row
        # masked: under shift an invalid lane's slot may lie outside [0, KS^2)
        p = tl.load(pds_ptr + at, mask=valid, other=0.0)
        ds = tl.load(pds_ptr + at + n_rows, mask=valid, other=0.0)
    else:
        lse_i = tl.load(ws_ptr + 2 * row)
        di_i = tl.load(ws_ptr + 2 * row + 1)
        p = tl.where(valid, _exp(_rowsum(qi * kj) * scale - lse_i), 0.0)
        ds = p * (_rowsum(doi * vj) - di_i)
    dk += ds[:, None, None] * qi
    dv += p[:, None, None] * doi
    return dk, dv


@triton.jit
def _dkv_row(a, dk, dv, kj, vj, y, x, yl, xl, ok, b64, h, H, W, NH, q_ptr, q_base, sqy, sqx, do_ptr, do_base,
             sdoy, sdox, sdod, ws_ptr, pds_ptr, n_rows, d, dm, scale, KS: tl.constexpr, BORDER: tl.constexpr,
             VEC: tl.constexpr, PAIRS: tl.constexpr, FROM_PDS: tl.constexpr, FULL: tl.constexpr):
    """dk_j, dv_j from the queries reading key j through window row a: one per offset for
    zeros/mask/circular (circular grids smaller than the window repeat a pair once per
    offset, exactly as the forward counts it)."""
    R: tl.constexpr = KS // 2
    iy = _query_index(y, a, H, R, BORDER)
    iyl = _in_grid(iy, yl, BORDER)
    for bi in tl.static_range(KS):
        ix = _query_index(x, bi - R, W, R, BORDER)
        valid = ok & (iy >= 0) & (ix >= 0)
        dk, dv = _dkv_update(dk, dv, kj, vj, iyl, _in_grid(ix, xl, BORDER), valid, (a + R) * KS + bi, b64, h,
                             H, W, NH, q_ptr, q_base, sqy, sqx, do_ptr, do_base, sdoy, sdox, sdod, ws_ptr, pds_ptr,
                             n_rows, d, dm, scale, VEC, PAIRS, FROM_PDS, FULL)
    return dk, dv


@triton.jit
def _dq_pass(q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, pds_ptr, n_rows, dq_ptr, b64, y, x, yl, xl, ok, d, dm, smask,
             row, rowl, out, q_base, k_base, v_base, do_base, sqy, sqx, sky, skx, svy, svx, sdoy, sdox, sdod,
             H, W, scale, KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr, VEC: tl.constexpr,
             PAIRS: tl.constexpr, STORE_PDS: tl.constexpr, FULL: tl.constexpr):
    """The tile as queries: dq_i = scale * sum_j p_ij (dp_ij - Di) k_j over the window.
    d, dm, VEC: the loads' columns, mask and vector (_load_cols); smask: the stores'.
    Loads read at (yl, xl) and row rowl: in the grid also for padded rows."""
    R: tl.constexpr = KS // 2
    q = _load_rows(_ptrs(q_ptr, q_base, yl, xl, sqy, sqx, d, 1, VEC), dm, FULL)
    q = _f32(q, PAIRS)
    do = _load_rows(_ptrs(do_ptr, do_base, yl, xl, sdoy, sdox, d, sdod, VEC), dm, FULL)
    do = _f32(do, PAIRS)
    lse = tl.load(ws_ptr + 2 * rowl)
    di = tl.load(ws_ptr + 2 * rowl + 1)
    dq = tl.zeros_like(q)
    if UNROLL:  # as in the forward kernel
        for ai in tl.static_range(KS):
            dq = _dq_row(ai - R, dq, q, do, lse, di, y, x, yl, xl, ok, d, dm, k_ptr, k_base, sky, skx,
                         v_ptr, v_base, svy, svx, pds_ptr, row, n_rows, H, W, scale, KS, BORDER, VEC, PAIRS, STORE_PDS,
                         FULL)
    else:
        for ai in range(KS):
            dq = _dq_row(ai - R, dq, q, do, lse, di, y, x, yl, xl, ok, d, dm, k_ptr, k_base, sky, skx,
                         v_ptr, v_base, svy, svx, pds_ptr, row, n_rows, H, W, scale, KS, BORDER, VEC, PAIRS, STORE_PDS,
                         FULL)
    tl.store(dq_ptr + out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _dkv_pass(q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, pds_ptr, n_rows, dk_ptr, dv_ptr, b64, y, x, yl, xl, hl, ok, d,
              dm, smask, out, q_base, k_base, v_base, do_base, sqy, sqx, sky, skx, svy, svx, sdoy, sdox, sdod,
              H, W, NH, scale, KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr, VEC: tl.constexpr,
              PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr,
              FROM_PDS: tl.constexpr, FULL: tl.constexpr):
    """The tile as keys: dk_j, dv_j gathered over the queries whose window holds key j.
    d, dm, VEC: the loads' columns, mask and vector (_load_cols); smask: the stores'.
    Loads read in the grid: (yl, xl, hl) clamped for padded rows, queries via _in_grid."""
    R: tl.constexpr = KS // 2
    if FROM_PDS:  # p and ds come from pds: no key or value needed
        kj = tl.zeros([BLOCK_M, NSPLIT, BLOCK_D // NSPLIT], tl.float32)
        vj = kj
    else:
        kj = _load_rows(_ptrs(k_ptr, k_base, yl, xl, sky, skx, d, 1, VEC), dm, FULL)
        kj = _f32(kj, PAIRS)
        vj = _load_rows(_ptrs(v_ptr, v_base, yl, xl, svy, svx, d, 1, VEC), dm, FULL)
        vj = _f32(vj, PAIRS)
    dk = tl.zeros([BLOCK_M, NSPLIT, BLOCK_D // NSPLIT], tl.float32)
    dv = tl.zeros([BLOCK_M, NSPLIT, BLOCK_D // NSPLIT], tl.float32)
    if BORDER == _SHIFT:
        # Window keys are distinct under shift, so each (query, key) pair counts once:
        # scan the per-axis query ranges. Interior tiles run (2r+1)^2 steps, edge tiles up
        # to (4r+1)^2 (the tile-wide longest range). Key j's slot in query i's window is
        # its offset from the window's clamped start.
        lo_y, hi_y = _shift_query_range(y, H, R)
        lo_x, hi_x = _shift_query_range(x, W, R)
        n_y = tl.max(tl.where(ok, hi_y - lo_y + 1, 0), 0)
        n_x = tl.max(tl.where(ok, hi_x - lo_x + 1, 0), 0)
        for u in range(0, n_y):
            iy = lo_y + u
            sy = y - tl.minimum(tl.maximum(iy, R), H - 1 - R) + R
            for w in range(0, n_x):
                ix = lo_x + w
                valid = ok & (iy <= hi_y) & (ix <= hi_x)
                slot = sy * KS + x - tl.minimum(tl.maximum(ix, R), W - 1 - R) + R
                # iy, ix >= 0; past the grid only beyond a row's own range (valid = 0)
                dk, dv = _dkv_update(dk, dv, kj, vj, tl.minimum(iy, H - 1), tl.minimum(ix, W - 1), valid, slot,
                                     b64, hl, H, W, NH, q_ptr, q_base, sqy, sqx, do_ptr, do_base, sdoy, sdox, sdod,
                                     ws_ptr, pds_ptr, n_rows, d, dm, scale, VEC, PAIRS, FROM_PDS, FULL)
    elif UNROLL:
        for ai in tl.static_range(KS):
            dk, dv = _dkv_row(ai - R, dk, dv, kj, vj, y, x, yl, xl, ok, b64, hl, H, W, NH, q_ptr, q_base, sqy, sqx,
                              do_ptr, do_base, sdoy, sdox, sdod, ws_ptr, pds_ptr, n_rows, d, dm, scale, KS, BORDER, VEC,
                              PAIRS, FROM_PDS, FULL)
    else:
        for ai in range(KS):
            dk, dv = _dkv_row(ai - R, dk, dv, kj, vj, y, x, yl, xl, ok, b64, hl, H, W, NH, q_ptr, q_base, sqy, sqx,
                              do_ptr, do_base, sdoy, sdox, sdod, ws_ptr, pds_ptr, n_rows, d, dm, scale, KS, BORDER, VEC,
                              PAIRS, FROM_PDS, FULL)
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=smask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=smask)


@triton.jit(do_not_specialize=["n_rows"])  # a tensor even at 1 row: cast to int64 below
def _na2d_backward_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, pds_ptr, n_rows, dq_ptr, dk_ptr, dv_ptr,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh, sdob, sdoy, sdox, sdoh, sdod,
    H, W, NH, scale, D: tl.constexpr,
    KS: tl.constexpr, BORDER: tl.constexpr, UNROLL: tl.constexpr, VEC: tl.constexpr, PASS: tl.constexpr,
    # the autotuned parameters after every autotune key (PASS included): Triton 3.0/3.1's
    # Autotuner finds its keys by position among the arguments the configs do not supply
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NSPLIT: tl.constexpr,
    PAIRS: tl.constexpr, OFF64: tl.constexpr,
):
    """The window backward of a tile. PASS 0: both passes in one program (the default,
    "window"). The split formulation ("split") launches PASS 1 (dq, and p_ij, ds_ij of
    every window slot to pds) and then PASS 2 (dk, dv from pds and the queries' q, do: no
    dot products recomputed). q, k, v, do: bfloat16 as int32 words under PAIRS (_f32),
    strides in load units; dq, dk, dv written in elements."""
    BLOCK_M: tl.constexpr = BLOCK_Y * BLOCK_X * BLOCK_H
    VL: tl.constexpr = VEC // (1 + PAIRS)
    FULL: tl.constexpr = D == BLOCK_D  # no padded columns: unmasked loads
    b64, y, x, h, ok, yl, xl, hl, h64, d, smask, dl, dml = _window_tile(
        H, W, NH, D, BLOCK_Y, BLOCK_X, BLOCK_H, BLOCK_D, NSPLIT, PAIRS, OFF64)
    q_base = b64 * sqb + h64 * sqh
    k_base = b64 * skb + h64 * skh
    v_base = b64 * svb + h64 * svh
    do_base = b64 * sdob + h64 * sdoh
    row = _out_rows(b64, y, x, h, H, W, NH)
    rowl = _out_rows(b64, yl, xl, hl, H, W, NH)
    out = tl.multiple_of(row * D, VEC)[:, None, None] + d
    n_rows = n_rows.to(tl.int64)  # pds offsets reach 2 * KS^2 * n_rows
    if PASS != 2:
        _dq_pass(q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, pds_ptr, n_rows, dq_ptr, b64, y, x, yl, xl, ok, dl, dml, smask,
                 row, rowl, out, q_base, k_base, v_base, do_base, sqy, sqx, sky, skx, svy, svx, sdoy, sdox, sdod,
                 H, W, scale, KS, BORDER, UNROLL, VL, PAIRS, PASS == 1, FULL)
    if PASS != 1:
        _dkv_pass(q_ptr, k_ptr, v_ptr, do_ptr, ws_ptr, pds_ptr, n_rows, dk_ptr, dv_ptr, b64, y, x, yl, xl, hl, ok,
                  dl, dml, smask, out, q_base, k_base, v_base, do_base, sqy, sqx, sky, skx, svy, svx, sdoy, sdox,
                  sdod, H, W, NH, scale, KS, BORDER, UNROLL, VL, PAIRS, BLOCK_M, BLOCK_D, NSPLIT, PASS == 2, FULL)


# ---- launch configuration ------------------------------------------------------------
def _head_tile(nh: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): D padded to a power of two (>= 2, no size-1 blocks) and enough
    heads per cell that its slice spans >= 128 elements, so small-D tiles still read whole
    lines when the heads are adjacent in memory (qkv from a Linear)."""
    block_d = max(2, next_pow2(D))
    block_h = min(next_pow2(nh), max(1, 128 // block_d))
    return block_h, block_d


def _vec(D: int, tensors) -> int:
    """Largest power of two (<= 16 bytes) dividing D and every stride but the last, i.e.
    every row offset the kernels form (base pointer alignment is Triton's own check)."""
    g = D
    for t in tensors:
        g = math.gcd(g, *t.stride()[:-1])
    vec = 1
    while vec * 2 <= 16 // tensors[0].element_size() and g % (vec * 2) == 0:
        vec *= 2
    return vec


# _f32's word loads from Triton 3.6 on. Triton 3.0 placed the join in another layout than
# the reshape wants: 43 layout conversions in the GeCA-S backward (sm_90: 4096
# instructions, 255 registers + 168 bytes of stack, against 2288 and 150 without them);
# 3.6 and 3.9 compile it with none. Versions in between were not tried.
_PAIRS_OK = triton_version() >= (3, 6)


def _pairs(vec: int, tensors) -> bool:
    """Whether the window kernels load these bfloat16 tensors as int32 words of two values
    (_f32): rows of whole pairs (vec >= 2: D and every row stride even) at 4-byte aligned
    addresses, so that their int32 views exist, on a Triton that compiles it well."""
    return (_PAIRS_OK and tensors[0].dtype == torch.bfloat16 and vec >= 2
            and all(t.data_ptr() % 4 == 0 for t in tensors))


def _load_views(pairs: bool, tensors) -> tuple:
    """The tensors as the window kernels load them: int32 views under pairs (strides halve)."""
    return tuple(t.view(torch.int32) for t in tensors) if pairs else tuple(tensors)


def _off64(tensors) -> bool:
    """Whether the window kernels need int64 offsets (_wide): some tensor's storage holds
    2^31 elements or more, so an element may lie that far past its data pointer (a bound
    read in ~0.1 us a tensor; the exact span took ~0.7). Offsets to padded rows (masked)
    may wrap."""
    return any(t.untyped_storage().nbytes() >= (2 ** 31 - 1) * t.element_size() for t in tensors)


def _unroll(kernel_size: int, vec: int) -> bool:
    # Fully unrolled k=3 windows: fine with vector loads (109 regs fwd / 159 bwd on sm_90
    # at D=64), but scalar loads (unaligned D) carry a 64-bit address per element and the
    # hoisted loads of 9 offsets spill (fp32 D=5: 255 regs + 248 B stack).
    return kernel_size == 3 and vec > 1


def _nsplit(block_m: int, block_d: int, vec: int, num_warps: int) -> int:
    """NSPLIT of a window-kernel tile (_cols): the D-row in chunks of VEC x (threads per
    row) columns, where block_m rows on num_warps warps give each row 32 * num_warps /
    block_m threads. sm_90 SASS of the GeCA-S forward (bf16, 64 rows on 8 warps, triton
    3.6): one chunk (a warp 4 rows x 8 threads, each thread 8 columns of 2 rows) 1752
    instructions a thread; two chunks of 32 columns (8 rows x 4 threads, each thread 16
    columns of 1 row) 1552, and 1408 with the word loads of _f32. Untimed."""
    threads_per_row = max(1, 32 * num_warps // block_m)
    return max(1, block_d // (threads_per_row * vec))


def _tile_configs(H: int, W: int, block_h: int, block_d: int, backward: bool, vec: int = 8) -> list[triton.Config]:
    """Candidates (BLOCK_Y, BLOCK_X, NSPLIT, num_warps) for cells of BLOCK_H heads of BLOCK_D.

    Full budget per [BLOCK_M, BLOCK_D] block: 4096 elements forward (live fp32 blocks q,
    acc, k, v), 2048 backward (k/v/dk/dv + the gathered q/do), at 8 warps, then at 4 warps
    (half the threads a row: fewer of them repeat a row's softmax and index work, more
    registers), then half and quarter tiles at 4 warps for more resident programs. Unaligned
    rows (vec = 1) load element by element, each with a 64-bit address: a quarter of the
    budget (fp32 D=5 forward at 4096 spilled: 255 regs + stack). Tiles are capped at the
    grid (no program made only of padding). The autotuner picks; the benchmark records its
    pick (tuned_configs).

    sm_90 compiles (triton 3.6, 2026-11-28; registers, SASS instructions a thread x threads
    a query row): GeCA-S bf16 forward at 8 warps 79-93 regs, 1208-1232 x 4; the full budget
    at 4 warps 92-96 regs, 1936-1952 x 2 (21% fewer instructions a row); the half and
    quarter tiles 63-85 regs, 1208 x 4 and 832-856 x 8. Backward at 8 warps 80 regs, 1712 x
    8; full at 4 warps 141-144 regs, 2728 x 4 (20% fewer); 1352 x 16 at the quarter tile.
    The 4-warp full tiles compile without spills at the high-res shape (D=32), in float32,
    at k=7 (shift) and at D=5 (8 bytes of stack in one forward). Untimed on a GPU.
    """
    hp, wp = next_pow2(H), next_pow2(W)
    width = block_h * block_d
    full = (2048 if backward else 4096) // (4 if vec == 1 else 1)
    out, seen = [], set()
    for budget, nw, rows in ((full, 8, (1, 2, 4)), (full, 4, (1, 2)), (full // 2, 4, (1, 2)), (full // 4, 4, (1, 2))):
        cells = max(1, budget // width)
        for by in rows:
            by_ = min(by, hp)
            bx = min(max(1, cells // by_), wp)
            if (by_, bx, nw) not in seen:
                seen.add((by_, bx, nw))
                nsplit = _nsplit(by_ * bx * block_h, block_d, vec, nw)
                out.append(triton.Config({"BLOCK_Y": by_, "BLOCK_X": bx, "NSPLIT": nsplit}, num_warps=nw))
    return out


def _default_config(H: int, W: int, block_h: int, block_d: int, backward: bool, vec: int) -> dict:
    if interpreting():
        # The interpreter pays per program and per op, not per element: one tile per image.
        by, bx = min(next_pow2(H), 8), min(next_pow2(W), 32)
        return {"BLOCK_Y": by, "BLOCK_X": bx, "NSPLIT": _nsplit(by * bx * block_h, block_d, vec, 4), "num_warps": 4}
    # full budget on 8 warps, 2 rows of cells (1 on a grid of one row)
    eight = [c for c in _tile_configs(H, W, block_h, block_d, backward, vec) if c.num_warps == 8]
    cfg = eight[min(1, len(eight) - 1)]
    return {**cfg.kwargs, "num_warps": cfg.num_warps}


_AUTOTUNE_KEY = ["H", "W", "NH", "D", "KS", "BORDER", "VEC"]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, hp: int, wp: int, block_h: int, block_d: int, backward: bool, vec: int):
    # One Autotuner per candidate list (it depends on the head tile, grid caps and vec).
    configs = _tile_configs(hp, wp, block_h, block_d, backward, vec)
    key = _AUTOTUNE_KEY + (["PASS"] if kernel_name == "_na2d_backward_kernel" else [])
    return autotune(globals()[kernel_name], configs=configs, key=key)


def _launch(kernel_name, backward, B, H, W, NH, args, consts):
    def grid(meta):
        return (B * cdiv(H, meta["BLOCK_Y"]) * cdiv(W, meta["BLOCK_X"])
                * cdiv(NH, meta["BLOCK_H"]),)

    if autotuning():
        hp, wp = next_pow2(H), next_pow2(W)
        _tuned(kernel_name, hp, wp, consts["BLOCK_H"], consts["BLOCK_D"], backward, consts["VEC"])[grid](
            *args, **consts)
    else:
        cfg = _default_config(H, W, consts["BLOCK_H"], consts["BLOCK_D"], backward, consts["VEC"])
        globals()[kernel_name][grid](*args, **consts, **cfg)


def _check(q, k, v):
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, got {q.dtype}; "
                        "use backend='cpu' or 'reference' for float64")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


# ---- host launchers (backend interface) ----------------------------------------------
def _forward_formulation() -> str:
    """FASTNCA_TRITON_NA_FORWARD=halo selects the tensor-core forward (_na2d_forward_halo_kernel),
    an opt-in candidate until a GPU has timed it; default: the per-window kernel."""
    v = os.environ.get("FASTNCA_TRITON_NA_FORWARD", "")
    if v not in ("", "window", "halo"):
        raise ValueError(f"FASTNCA_TRITON_NA_FORWARD must be 'window' or 'halo', got {v!r}")
    return v or "window"


def _halo_tile(H: int, W: int, radius: int, block_d: int) -> tuple[int, int, int] | None:
    """(BLOCK_Y, BLOCK_X, HALO) of a halo kernel: the largest of 8 x 8, 4 x 8 and 4 x 4 tiles
    (fewer rows or columns on small grids, at least 16 cells for tl.dot) whose halo block
    HALO x BLOCK_D stays within 16384 elements, HALO = the halo's cells rounded up to a
    power of two; None if none fits (the per-window kernels run instead). sm_90 compiles:
    a 256 x 128 halo block took 256 KB of shared memory, over an H100's 227 KB.
    FASTNCA_TRITON_NA_HALO_TILE=4x8 or 4x4 (a benchmarking knob) starts the search at that
    tile: fewer wasted scores per query (k=3: 64 halo slots for 32 or 16 queries, against
    128 for 64), on mma.sync instead of wgmma."""
    tiles = ((8, 8), (4, 8), (4, 4))
    knob = os.environ.get("FASTNCA_TRITON_NA_HALO_TILE", "")
    if knob:
        first = dict(zip(("8x8", "4x8", "4x4"), range(3))).get(knob)
        if first is None:
            raise ValueError(f"FASTNCA_TRITON_NA_HALO_TILE must be '8x8', '4x8' or '4x4', got {knob!r}")
        tiles = tiles[first:]
    for ty, tx in tiles:
        by = min(ty, next_pow2(H))
        bx = max(min(tx, next_pow2(W)), 16 // by)
        halo = next_pow2((by + 2 * radius) * (bx + 2 * radius))
        if halo * block_d <= 16384:
            return by, bx, halo
    return None


def _halo_radius(kernel_size: int, border: str) -> int:
    """Halo radius covering every window that reads or is read by a tile: r, and 2r for
    shift (a window near the far border starts 2r cells before the last query)."""
    r = kernel_size // 2
    return 2 * r if border == "shift" else r


def _halo_setup(q, kernel_size, border):
    """(tile, constexprs) of the halo kernels for q's shape, or None when no tile's halo
    block fits (the per-window kernels run instead). The forward, dq and dk/dv kernels
    share them: one radius (r; 2r for shift) covers every window each of them reads."""
    H, W, D = q.shape[1], q.shape[2], q.shape[-1]
    rh = _halo_radius(kernel_size, border)
    # tl.dot needs K >= 16. Half inputs take K >= 32: on an H100 (triton 3.6) the half dot
    # of K = 16 against a 256-slot halo (8 warps) ended in an illegal memory access (D <= 16
    # with kernel_size >= 5 or shift, fp16 and bf16; fp32, D >= 32 and the 128-slot halo of
    # kernel_size 3 passed); the padded columns are masked, so only the K width changes.
    block_d = max(16 if q.dtype == torch.float32 else 32, next_pow2(D))
    tile = _halo_tile(H, W, rh, block_d)
    if tile is None:
        return None
    prec = "ieee" if interpreting() else fp32_dot_precision(q.device)
    return tile, dict(KS=kernel_size, BORDER=_ext.BORDER_CODES[border], DOT_PREC=prec, HALF_DOT=not interpreting(),
                      BLOCK_D=block_d, RH=rh)


def _halo_launch(name, setup, B, H, W, NH, args):
    (by, bx, halo), consts = setup
    # 4 warps, one warp group: a tile holds at most 64 queries (_halo_tile), and 8 warps on
    # 64 rows compiled to wgmma layouts that split N (down to N=8) or repeat the rows (see
    # nca_step._wgmma_safe), though larger halo blocks spill at 4 (sm_90 compiles, triton
    # 3.9: GeCA-S, halo 128 x D 64, 255 registers and no spills; k=7 shift at D=32, 5 KB of
    # stack in the dk/dv kernel).
    globals()[name][(B * cdiv(H, by) * cdiv(W, bx) * NH,)](
        *args, **consts, BLOCK_Y=by, BLOCK_X=bx, HALO=halo, num_warps=4)


def forward(q, k, v, kernel_size, border, scale):
    _check(q, k, v)
    B, H, W, NH, D = q.shape
    o = torch.empty((B, H, W, NH, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W, NH), dtype=torch.float32, device=q.device)
    setup = _halo_setup(q, kernel_size, border) if _forward_formulation() == "halo" else None
    if setup is not None:
        args = (q, k, v, o, lse, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], H, W, NH, float(scale), D)
        with on_device(q.device):
            _halo_launch("_na2d_forward_halo_kernel", setup, B, H, W, NH, args)
        return o, lse
    block_h, block_d = _head_tile(NH, D)
    vec = _vec(D, (q, k, v))
    pairs = _pairs(vec, (q, k, v))
    lq, lk, lv = _load_views(pairs, (q, k, v))
    args = (lq, lk, lv, o, lse, *lq.stride()[:4], *lk.stride()[:4], *lv.stride()[:4], H, W, NH, float(scale), D)
    with on_device(q.device):
        _launch("_na2d_forward_kernel", False, B, H, W, NH, args,
                dict(KS=kernel_size, BORDER=_ext.BORDER_CODES[border], UNROLL=_unroll(kernel_size, vec), VEC=vec,
                     BLOCK_H=block_h, BLOCK_D=block_d, PAIRS=pairs, OFF64=_off64((q, k, v, o, lse))))
    return o, lse


def _backward_formulation() -> str:
    """FASTNCA_TRITON_NA_BACKWARD=halo selects the tensor-core backward (dq against the key
    halo, dk/dv against the query halo); =split the window backward in two launches, the
    second reading p_ij and ds_ij from the first instead of recomputing them (a transient
    float32 workspace of 2 x kernel_size^2 values per query and head). Both are opt-in
    candidates until a GPU has timed them."""
    v = os.environ.get("FASTNCA_TRITON_NA_BACKWARD", "")
    if v not in ("", "window", "halo", "split"):
        raise ValueError(f"FASTNCA_TRITON_NA_BACKWARD must be 'window', 'halo' or 'split', got {v!r}")
    return v or "window"


def _backward_halo(grad_o, q, k, v, ws, dq, dk, dv, scale, setup):
    B, H, W, NH, D = q.shape
    head = (q, k, v, grad_o, ws)
    tail = (*q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *grad_o.stride(), H, W, NH, float(scale), D)
    _halo_launch("_na2d_backward_dq_halo_kernel", setup, B, H, W, NH, (*head, dq, *tail))
    _halo_launch("_na2d_backward_dkv_halo_kernel", setup, B, H, W, NH, (*head, dk, dv, *tail))


def backward(grad_o, grad_lse, q, k, v, o, lse, kernel_size, border, scale):
    _check(q, k, v)
    formulation = _backward_formulation()
    halo = _halo_setup(q, kernel_size, border) if formulation == "halo" else None
    if o.stride(-1) != 1:  # o is ours (contiguous) unless a caller mixes backends
        o = o.contiguous()
    B, H, W, NH, D = q.shape
    block_h, block_d = _head_tile(NH, D)
    width = block_h * block_d
    # grad_o's last stride may be anything (0 for the gradient of o.sum()): then no vectors.
    vec = _vec(D, (q, k, v, o, grad_o)) if grad_o.stride(-1) == 1 else 1
    pairs = _pairs(vec, (q, k, v, o, grad_o))
    lq, lk, lv, lo, ldo = _load_views(pairs, (q, k, v, o, grad_o))
    ws = torch.empty((B, H, W, NH, 2), dtype=torch.float32, device=q.device)  # (lse, Di)
    has_dlse = grad_lse is not None
    dlse = grad_lse if has_dlse else lse  # placeholder, never read
    dq = torch.empty((B, H, W, NH, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    off64 = _off64((q, k, v, o, grad_o, lse, dlse, ws, dq))
    with on_device(q.device):
        # Preprocess: a streaming reduction over o and do, one image row of cells per program.
        if interpreting():
            pre = {"BLOCK_Y": min(next_pow2(H), 8), "BLOCK_X": min(next_pow2(W), 32)}
        else:
            pre = {"BLOCK_Y": 1, "BLOCK_X": min(max(1, 4096 // width), next_pow2(W))}
        grid = (B * cdiv(H, pre["BLOCK_Y"]) * cdiv(W, pre["BLOCK_X"]) * cdiv(NH, block_h),)
        _na2d_backward_preprocess_kernel[grid](
            lo, ldo, lse, dlse, ws, *lo.stride()[:4], *ldo.stride(), *lse.stride(), *dlse.stride(),
            H, W, NH, D, HAS_DLSE=has_dlse, VEC=vec, PAIRS=pairs, OFF64=off64, BLOCK_H=block_h, BLOCK_D=block_d,
            NSPLIT=_nsplit(pre["BLOCK_Y"] * pre["BLOCK_X"] * block_h, block_d, vec, 4), num_warps=4, **pre)
        if halo is not None:
            _backward_halo(grad_o, q, k, v, ws, dq, dk, dv, scale, halo)
            return dq, dk, dv
        split = formulation == "split"
        # split: p_ij, ds_ij of every window slot, float32, pass 1 -> pass 2 (else unused)
        pds = torch.empty(B * H * W * NH * kernel_size ** 2 * 2 if split else 1, dtype=torch.float32,
                          device=q.device)
        for pass_ in ((1, 2) if split else (0,)):
            _launch("_na2d_backward_kernel", True, B, H, W, NH,
                    (lq, lk, lv, ldo, ws, pds, B * H * W * NH, dq, dk, dv, *lq.stride()[:4], *lk.stride()[:4],
                     *lv.stride()[:4], *ldo.stride(), H, W, NH, float(scale), D),
                    dict(KS=kernel_size, BORDER=_ext.BORDER_CODES[border], UNROLL=_unroll(kernel_size, vec),
                         VEC=vec, BLOCK_H=block_h, BLOCK_D=block_d, PAIRS=pairs, OFF64=off64, PASS=pass_))
    return dq, dk, dv
