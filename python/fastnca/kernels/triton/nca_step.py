"""``nca_step`` in Triton: a fused forward over the firing cells (plus a copy of the idle
ones) and a three-kernel recomputing backward.

On large states both directions draw the step's fire mask first (the Triton fire_mask
kernel, bit-identical to fastnca.fire_mask) and list its firing cells on the device
(`_firing_cells`: cumsum + scatter, the count stays in device memory, no host sync): only
those, about update_prob of the cells, run perception and MLP. Small states, whose steps
are host-bound, run every cell with the mask drawn in the kernels instead: fewer launches
(_COMPACT_FORWARD_CELLS, _COMPACT_BACKWARD_CELLS).

Layout and assumptions (the launchers below enforce them):
- state / grad_out / out / d_state: [B, C, H, W] fp32, fp16 or bf16 with ANY element
  strides (NCHW and channels_last are read in place, never copied). Compute is fp32.
- Cells are flattened as i = (b*H + y)*W + x (the fire-mask counter); a program owns
  BLOCK_M consecutive cells, i.e. a strip along a row that wraps onto the next rows.
  N = B*H*W < 2^31; addresses are computed in int64.
- Weights are re-laid out once per call by one small kernel: fp32, contiguous, zero
  padded to C_PAD, HID_PAD = next_pow2 >= 16 (tl.dot needs every dim >= 16) and FC to a
  multiple of FC_BLK. Channels are processed C_BLK and conv outputs FC_BLK at a time
  (see _DOT_TILE), so a C=128, F=3, hidden=256 rule never holds a [BLOCK_M, 384] conv
  tile nor a 128 KB weight operand:
    w1at [C_PAD, HID_PAD] = w1[:, :C]^T     w1bt [FC_CEIL, HID_PAD] = w1[:, C:]^T
    w2t  [HID_PAD, C_PAD] = w2^T placed in columns frozen..C-1 (frozen columns zero)
    b1p [HID_PAD], b2p [C_PAD] (frozen entries zero), pbp [FC_CEIL]
    pwt  dense (groups=1):      [9, C_PAD, FC_CEIL], pwt[tap, c, o] = pw[o, c, tap]
         depthwise (groups=C):  [9, FC_CEIL],        pwt[tap, o]    = pw[o, 0, tap]
  Padded rows/columns are zero, so padded lanes contribute exact zeros everywhere.
- Padding index maps are those of csrc/include/fastnca/borders.h (pad_index).
- fp32 matmuls run as tf32x3 on sm_80+ (fp32-level accuracy on tensor cores), see
  _dot_precision; plain tf32 only if the user enabled TF32 matmuls in torch. Under tf32x3
  an operand loaded from a half tensor (state, grad_out, the weights) is exact in TF32, so
  its dots take one or two TF32 products instead of three for the same result (_mm,
  _exact_bits); two bfloat16 operands make one bfloat16 dot; with bfloat16 state and
  weights the backward's gradient-only products take one TF32 product (_bwd_tf32).

Backward (nothing but the inputs is saved; everything is recomputed):
- Only the firing cells (about update_prob of them) have dz != 0. On states of at least
  _COMPACT_BACKWARD_CELLS cells the launcher draws the step's mask (the Triton fire_mask
  kernel, bit-identical to the forward's) and lists its firing cells once, in cell order,
  on the device (cumsum + scatter, counts in device memory: no host sync); kernels A and C
  walk each chunk's range of that list (_list_range), B reads the mask for each cell's own
  direct term. On smaller states (LISTED false) A (and A') and C walk every cell, A and C
  drawing the mask themselves, and D (=gemm) reduces over every cell's row: A writes an
  idle cell's rows too (g and a zero dQ; its recomputed activations, zeroed, enter no
  product), C leaves an idle cell's shifted state unread, and B reads every cell's row.
  That saves the mask and list launches and the cumsum and dQ zero-fill kernels a step,
  where the host, not the GPU, sets the pace.
- kernel A (_nca_step_backward_cell_kernel), persistent: each of G programs walks the
  tiles pid, pid+G, ... of listed cells and recomputes x, conv, z, h; then gd = g, dz, dP. It writes
  dP = [g + dP_x | dQ] into a transient fp32 workspace [N, C + FC] (with bfloat16 state
  and weights: g + dP_x to a float32 [N, C] and dQ to a bfloat16 [N, FC_CEIL], _half_dq)
  and sums its fc
  weight-grad partials (d_w1, d_b1, d_w2, d_b2, d_pb) over its tiles in a fixed order:
  in registers, stored once, for rules of one channel and one conv chunk (the Med-NCA
  rule); else read-modify-written in its own slot of a [G, ...] buffer per tile. No
  atomics either way.
- Opt-in (FASTNCA_TRITON_NCA_BWD_ACC=gemm): kernel A keeps no fc weight-grad
  partials. It writes each walked cell's [dz | h | gd | x | conv] to row `pos` (its place
  in the walk) of a second workspace in the state's dtype, the activations autograd would
  save, and kernel D (_nca_step_backward_fc_kernel) reduces them as split-K GEMMs over
  the walk: d_w1 = dz^T [x | conv], d_w2 = gd^T h (half states: half dots, float32 sums).
  sm_90 compile of the Med-NCA rule at kernel A's default 16 rows on 4 warps: its spill
  stack drops from 840 to 48 bytes (bfloat16) and from 1112 to 232 (float32); kernel D
  takes 138 / 203 registers, no stack. The workspace adds 768 bytes a cell in bfloat16
  (50 MB for a 65536-cell chunk).
- Opt-in: under =gemm, rules of one channel and conv chunk (the Med-NCA rule; on a GPU
  with float32 states only, _takes_hidden_chunks: wrong d_state in bfloat16 on an H200)
  run kernel A' (_nca_step_backward_cell_gemm_kernel) instead of A: x, g and the conv
  once a tile, then the hidden units HC (32) at a time, so only [BLOCK_M, HC] activations
  are live and a tile takes 64 rows on one warp group (A spills at 16). With
  FASTNCA_TRITON_NCA_BWD_ACC=chunked it runs without the activation workspace and kernel
  D: each chunk's fc weight-grad partials are read-modify-written in its slot per tile.
- Tried and removed (2191e7d has it): weights kept resident in shared memory across a
  persistent program's tiles (FASTNCA_TRITON_NCA_WEIGHTS=resident) in the forward and
  kernels A and B. H100 (dd6c6c4): backward kernels 2.85 against 2.73 ms staged; H200
  (109ac01): a 64-step rollout's training 157 against 158 ms, and 168 against 140 under
  =gemm. Staging the weights from L2 at every tile costs no more than the lost occupancy.
- kernel C (_nca_step_backward_conv_kernel): d_pw = sum over cells of dQ^T (x)
  shifted state, one program per (tap, conv chunk, cell range), the accumulator in
  registers; dQ comes from the workspace (a split-K GEMM over cells, like the CUDA
  backend's conv_grad). Kept out of kernel A, where its [FC, C] x 9 partial had to be
  read-modify-written in memory every tile: on an H100 that traffic (~2 KB a cell each
  way) and the registers it took made kernel A 3x slower than its arithmetic.
- kernel B (_nca_step_backward_input_kernel): per source cell, gathers dQ over the
  inverse neighbourhood (every (output cell, tap) whose padded read lands on it,
  including the extra reflect/replicate/circular reads at the borders, gathered only in
  tiles that have them) and adds the transposed conv to g + dP_x (to g alone where the
  cell does not fire: in the listed walk A never wrote its workspace row, in the
  every-cell walk A wrote g there). The launcher zeroes the dQ
  columns before A (the listed walk; the every-cell walk has A write them), so readers
  that do not fire add 0 without a fire-bit lookup.
- The [G, ...] and per-range partials are summed by a fixed-order fold, both buffers in
  one launch (_fold_partials_kernel).
- Large states run A, C and B per batch chunk (kernels/_common.backward_batch_chunk: the
  workspace stays within the state's bytes, >= 65536 cells a chunk), each chunk on its
  range of the step's list; A and C add each chunk's sums into the same slots, in chunk
  order.
  d_state may be grad_out itself: B, its only writer, reads grad_out only at the cells it
  then writes, each in the same program, before the store.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ... import _backend, _ext
from .. import _common
from ._philox import fire_bits
from ._runtime import autotune, cdiv, const, fp32_dot_precision, interpreting, next_pow2, on_device
from ._runtime import knob01 as _knob01
from .fire_mask import fire_mask as _fire_mask

# ---------------------------------------------------------------------------------------
# Device helpers. (Few and coarse on purpose: under TRITON_INTERPRET=1 every call of a
# jit helper costs milliseconds, so the hot loops call none.)
# ---------------------------------------------------------------------------------------


@triton.jit
def _pad_index(p, n, PAD: tl.constexpr):
    """borders.h pad_index for p in [-1, n]: (source index, valid). Codes: zeros 0,
    reflect 1, replicate 2, circular 3. For zeros the index is clamped (never read)."""
    if PAD == 1:
        q = tl.where(p < 0, -p, p)
        q = tl.where(q >= n, 2 * (n - 1) - q, q)
        ok = q == q
    elif PAD == 2:
        q = tl.minimum(tl.maximum(p, 0), n - 1)
        ok = q == q
    elif PAD == 3:
        q = tl.where(p < 0, p + n, tl.where(p >= n, p - n, p))
        ok = q == q
    else:
        ok = (p >= 0) & (p < n)
        q = tl.where(ok, p, 0)
    return q, ok


@triton.jit
def _cell_coords(offs_m, H, W):
    hw = H * W
    b = offs_m // hw
    r = offs_m - b * hw
    y = r // W
    return b, y, r - y * W


@triton.jit
def _fire(offs_m, seed_lo, seed_hi, step_lo, threshold):
    """Fire mask of cells offs_m as fp32 0/1, bit-identical to fastnca.fire_mask."""
    bits = fire_bits(offs_m.to(tl.int64), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32),
                     step_lo.to(tl.uint32))
    return (bits < threshold.to(tl.uint32)).to(tl.float32)


# EXACT bits of the kernels (see _mm, _exact_bits): the operand families whose values come
# from a half tensor, and (the same bits shifted by _BF16_SHIFT) those from a bfloat16 one.
_EX_NONE = const(0)  # a computed operand
_EX_STATE = const(1)
_EX_GRAD = const(2)
_EX_PW = const(4)
_EX_W1 = const(8)
_EX_W2 = const(16)
_EX_DQ = const(32)  # the conv-output gradient dQ, from the backward's workspace (_half_dq)
_BF16_SHIFT = const(6)
_TF32_BITS = (1 << _BF16_SHIFT.value) - 1  # EXACT without its bfloat16 bits
# A computed operand of a product that only the backward's gradients depend on (dz, h and
# the conv tile in the weight-gradient products; dz and a float32 dQ in the input-gradient
# ones). With its bit in EXACT (bfloat16 state and weights: _bwd_tf32) such an operand
# enters one TF32 product as it is, instead of being split hi + lo; the forward and its
# recompute, whose z decides each ReLU, keep float32-accurate products. Never shifted.
_EX_BWD = const(1 << 12)


@triton.jit
def _tf32_hi(a):
    """a with its 13 low mantissa bits cleared: exact in TF32, and a - hi is exact in fp32."""
    return (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, acc, DOT_PREC: tl.constexpr, EXACT: tl.constexpr, A_FAM: tl.constexpr, B_FAM: tl.constexpr):
    """acc + a @ b (fp32 operands) at DOT_PREC's accuracy. A_FAM / B_FAM: the operand
    family (_EX_*) an operand's values come from, _EX_NONE for a computed one. Where EXACT marks a
    family as from a half tensor (exact in TF32, a zero low part), tf32x3 needs fewer TF32
    products for the same result: one when both operands are (each product exact in fp32),
    two when one is (the other split hi + lo, tf32x3's terms without the one that is zero).
    Where it marks both as from bfloat16 tensors (by default; FASTNCA_TRITON_NCA_BF16_DOTS=0
    turns it off), the product is one bfloat16 dot: exact products, float32 accumulation,
    the same result at twice TF32's rate with half the operand bytes (K >= 16, the bf16
    MMA's minimum). a, b may be half (a gathered dQ): cast to float32 for the TF32 paths.
    _EX_BWD marks a computed operand of a gradient-only product: with its bit in EXACT
    (_bwd_tf32) it counts as exact here, i.e. enters one TF32 product unsplit."""
    if acc is None:  # Triton 3.0's tl.dot reads a None passed through a jit call as a tensor
        acc = tl.zeros([a.shape[0], b.shape[1]], dtype=tl.float32)
    A_EXACT: tl.constexpr = (A_FAM & EXACT) != 0
    B_EXACT: tl.constexpr = (B_FAM & EXACT) != 0
    BF16: tl.constexpr = (((A_FAM << _BF16_SHIFT) & EXACT) != 0) & (((B_FAM << _BF16_SHIFT) & EXACT) != 0)
    if BF16 and a.shape[1] >= 16:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        return acc
    a = a.to(tl.float32)  # a gathered bfloat16 dQ stays half until here (_input_tap)
    b = b.to(tl.float32)
    if A_EXACT and B_EXACT:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif B_EXACT:
        hi = _tf32_hi(a)
        acc = tl.dot(a - hi, b, acc, input_precision="tf32")
        acc = tl.dot(hi, b, acc, input_precision="tf32")
    elif A_EXACT:
        hi = _tf32_hi(b)
        acc = tl.dot(a, b - hi, acc, input_precision="tf32")
        acc = tl.dot(a, hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _weight_src(ptr, wh_ptr, SEG: tl.constexpr, HALF_W: tl.constexpr, EXACT: tl.constexpr,
                A_FAM: tl.constexpr, B_FAM: tl.constexpr):
    """Where a weight operand of _mm(a, w, ...) is read: ``ptr`` (the float32 arranged
    weights), or its segment SEG of the bfloat16 copy wh (HALF_W, _half_weights) where the
    product is a bfloat16 dot (both families' bfloat16 bits in EXACT, as _mm decides):
    the same values in half the bytes, and no float32 -> bfloat16 conversion in the kernel.
    Products in TF32 keep the float32 copy (a bfloat16 one would cost a conversion a value
    in every tile)."""
    BF16: tl.constexpr = (((A_FAM << _BF16_SHIFT) & EXACT) != 0) & (((B_FAM << _BF16_SHIFT) & EXACT) != 0)
    if HALF_W and BF16:
        src = wh_ptr + SEG
    else:
        src = ptr
    return src


@triton.jit
def _bf16_weight_srcs(w1at_ptr, w2t_ptr, pw_ptr, wh_ptr, HALF_W: tl.constexpr, EXACT: tl.constexpr,
                      C_PAD: tl.constexpr, HID_PAD: tl.constexpr, FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr):
    """_weight_src of the weight operands that can be bfloat16 dots: (fc1's state part, W2
    for the backward's dh = gd W2, pw for the conv); wh has the float32 buffer's layout
    (_weight_segments)."""
    wh_w1a, _, _, wh_w2, _, wh_pw, _ = _weight_segments(wh_ptr, C_PAD, HID_PAD, FC_CEIL, DEPTHWISE)
    return (_weight_src(w1at_ptr, wh_w1a, 0, HALF_W, EXACT, _EX_STATE, _EX_W1),
            _weight_src(w2t_ptr, wh_w2, 0, HALF_W, EXACT, _EX_GRAD, _EX_W2),
            _weight_src(pw_ptr, wh_pw, 0, HALF_W, EXACT, _EX_STATE, _EX_PW))


@triton.jit
def _weight_segments(wf_ptr, C_PAD: tl.constexpr, HID_PAD: tl.constexpr, FC_CEIL: tl.constexpr,
                     DEPTHWISE: tl.constexpr):
    """Pointers to the 7 segments of the arranged float32 weights (_Rule.sizes: w1at, w1bt,
    b1p, w2t, b2p, pwt, pbp), from the buffer's start: one kernel argument, not seven
    (each argument costs launch time on the host: scripts/host_cost.py)."""
    O_W1B: tl.constexpr = C_PAD * HID_PAD
    O_B1: tl.constexpr = O_W1B + FC_CEIL * HID_PAD
    O_W2: tl.constexpr = O_B1 + HID_PAD
    O_B2: tl.constexpr = O_W2 + HID_PAD * C_PAD
    O_PW: tl.constexpr = O_B2 + C_PAD
    O_PB: tl.constexpr = O_PW + (9 * FC_CEIL if DEPTHWISE else 9 * FC_CEIL * C_PAD)
    return (wf_ptr, wf_ptr + O_W1B, wf_ptr + O_B1, wf_ptr + O_W2, wf_ptr + O_B2, wf_ptr + O_PW,
            wf_ptr + O_PB)


@triton.jit
def _program_slot(part_ptr, slot, C_PAD: tl.constexpr, HID_PAD: tl.constexpr, FC_CEIL: tl.constexpr):
    """Pointers to the cell kernel's partials in slot ``slot`` (elements from part_ptr),
    segments d_w1a, d_w1b, d_b1, d_w2, d_b2, d_pb (_cell_slot_sizes: _Rule.sizes without
    d_pw, so d_pb starts where the weights' pw segment does)."""
    # (DEPTHWISE moves only the 7th pointer, dropped here)
    w1a, w1b, b1, w2, b2, pb, _ = _weight_segments(part_ptr + slot, C_PAD, HID_PAD, FC_CEIL, False)
    return w1a, w1b, b1, w2, b2, pb


@triton.jit
def _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, offs_f, fmask,
                pw_ptr, pb_ptr,
                F: tl.constexpr, C_PAD: tl.constexpr, FC_CEIL: tl.constexpr,
                BLOCK_M: tl.constexpr, FC_BLK: tl.constexpr, DEPTHWISE: tl.constexpr,
                DOT_PREC: tl.constexpr, PAD: tl.constexpr, EXACT: tl.constexpr, CH_CONTIG: tl.constexpr):
    """conv[m, o] for the FC_BLK output channels offs_f (bias included).

    Each of the 9 shifted state tiles is loaded straight from global memory (the 3 rows
    a strip touches stay in L1/L2). The tap loop is a runtime loop on purpose. Unrolled (static_range), the compiler
    hoisted all 9 tiles out of the chunk loop (loop-invariant) into shared memory: 320 KB
    for C=128, hidden=256 with tf32x3, over the 227 KB of an H100; and sm_90a compile
    times were ~7x longer (AOT compile here: backward cell kernel 162 s -> 22 s).
    Dense rules of one conv chunk whose pw comes as the bfloat16 copy (HALF_W) take
    _conv_im2col instead, where the state's channels are contiguous (CH_CONTIG,
    channels_last): two bfloat16 dots (K = 8 C_PAD and C_PAD) with no tap loop, their
    weights 32 KB a tile for the Med-NCA rule. An NCHW state keeps the tap loop: its
    [BLOCK_M, 8, C_PAD] gather is one scalar load and one 64-bit address an element, and
    the im2col kernels spilled (sm_90 compiles, Med-NCA rule, bfloat16, 2026-11-28: the
    forward at 64 rows on 4 warps 1592 bytes of stack with triton 3.7, torch 2.13's, against
    16 with the tap loop; the =chunked cell kernel 888 / 2040 bytes with triton 3.6 / 3.7
    against 656 / 400)."""
    # (pairs: Triton 3.0 takes no chained and)
    IM2COL: tl.constexpr = ((CH_CONTIG and (not DEPTHWISE)) and ((FC_BLK == FC_CEIL)
                                                                and (pw_ptr.dtype.element_ty == tl.bfloat16)))
    if IM2COL:
        w_pw8, w_pw9 = _im2col_weights(pw_ptr, offs_c, offs_f, C_PAD, FC_CEIL)
        conv = _conv_im2col(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, w_pw8, w_pw9,
                            tl.load(pb_ptr + offs_f), C_PAD, BLOCK_M, FC_BLK, DOT_PREC, PAD, EXACT)
    else:
        conv = _conv_taps(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, offs_f, fmask, pw_ptr, pb_ptr,
                          F, C_PAD, FC_CEIL, BLOCK_M, FC_BLK, DEPTHWISE, DOT_PREC, PAD, EXACT)
    return conv


@triton.jit
def _conv_taps(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, offs_f, fmask,
               pw_ptr, pb_ptr,
               F: tl.constexpr, C_PAD: tl.constexpr, FC_CEIL: tl.constexpr,
               BLOCK_M: tl.constexpr, FC_BLK: tl.constexpr, DEPTHWISE: tl.constexpr,
               DOT_PREC: tl.constexpr, PAD: tl.constexpr, EXACT: tl.constexpr):
    """_conv_chunk as a loop over the 9 taps."""
    conv = tl.zeros([BLOCK_M, FC_BLK], dtype=tl.float32)
    if DEPTHWISE:
        ch = (offs_f // F).to(tl.int64) * s_c  # groups=C: output channel o reads o // F
        chmask = fmask
    else:
        ch = offs_c.to(tl.int64) * s_c
        chmask = cmask
    for tap in range(9):
        ky = tap // 3
        kx = tap - ky * 3
        # Tap offsets from the cell coordinates, per tap: only xb, y, xx stay live across
        # the tile (not 11 precomputed row/column offset and mask vectors).
        ny, vy = _pad_index(y + (ky - 1), H, PAD)
        nx, vx = _pad_index(xx + (kx - 1), W, PAD)
        off = xb + ny.to(tl.int64) * s_h + nx.to(tl.int64) * s_w
        ok = rows & vy & vx
        t = tl.load(x_ptr + off[:, None] + ch[None, :], mask=ok[:, None] & chmask[None, :],
                    other=0.0).to(tl.float32)
        if DEPTHWISE:
            conv += t * tl.load(pw_ptr + tap * FC_CEIL + offs_f).to(tl.float32)[None, :]
        else:
            w = tl.load(pw_ptr + tap * C_PAD * FC_CEIL + offs_c[:, None] * FC_CEIL + offs_f[None, :])
            conv = _mm(t, w, conv, DOT_PREC, EXACT, _EX_STATE, _EX_PW)
    return conv + tl.load(pb_ptr + offs_f)[None, :]


@triton.jit
def _im2col_weights(pw_ptr, offs_c, offs_f, C_PAD: tl.constexpr, FC_CEIL: tl.constexpr):
    """_conv_im2col's weight operands from pwt: taps 0..7 as [8 * C_PAD, FC] (rows
    tap * C_PAD + c, in order), tap 8 as [C_PAD, FC]."""
    offs_j = tl.arange(0, 8 * C_PAD)
    return (tl.load(pw_ptr + offs_j[:, None] * FC_CEIL + offs_f[None, :]),
            tl.load(pw_ptr + 8 * C_PAD * FC_CEIL + offs_c[:, None] * FC_CEIL + offs_f[None, :]))


@triton.jit
def _conv_im2col(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, w_pw8, w_pw9, pb,
                 C_PAD: tl.constexpr, BLOCK_M: tl.constexpr, FC_BLK: tl.constexpr,
                 DOT_PREC: tl.constexpr, PAD: tl.constexpr, EXACT: tl.constexpr):
    """The dense conv of _conv_chunk for a rule of one channel and conv chunk, with weight
    operands given (loaded once by the caller): taps 0..7 as one dot of K = 8 * C_PAD
    over their im2col tile [BLOCK_M, 8, C_PAD] (pwt's rows tap * C_PAD + c, in order),
    tap 8 as a second dot of K = C_PAD (arange sizes are powers of two)."""
    tap8 = tl.arange(0, 8)
    ny, vy = _pad_index(y[:, None] + (tap8 // 3 - 1)[None, :], H, PAD)
    nx, vx = _pad_index(xx[:, None] + (tap8 % 3 - 1)[None, :], W, PAD)
    off = xb[:, None] + ny.to(tl.int64) * s_h + nx.to(tl.int64) * s_w  # [BLOCK_M, 8]
    ok = rows[:, None] & vy & vx
    ch = offs_c.to(tl.int64) * s_c
    t8 = tl.load(x_ptr + off[:, :, None] + ch[None, None, :], mask=ok[:, :, None] & cmask[None, None, :],
                 other=0.0)  # the state's dtype (_mm casts)
    conv = _mm(tl.reshape(t8, [BLOCK_M, 8 * C_PAD]), w_pw8, tl.zeros([BLOCK_M, FC_BLK], dtype=tl.float32),
               DOT_PREC, EXACT, _EX_STATE, _EX_PW)
    ny9, vy9 = _pad_index(y + 1, H, PAD)
    nx9, vx9 = _pad_index(xx + 1, W, PAD)
    off9 = xb + ny9.to(tl.int64) * s_h + nx9.to(tl.int64) * s_w
    t9 = tl.load(x_ptr + off9[:, None] + ch[None, :], mask=(rows & vy9 & vx9)[:, None] & cmask[None, :],
                 other=0.0)
    return _mm(t9, w_pw9, conv, DOT_PREC, EXACT, _EX_STATE, _EX_PW) + pb[None, :]


@triton.jit
def _hidden(x_ptr, x_row, rows, xb, y, xx, H, W, s_h, s_w, s_c, offs_c, cmask, offs_h,
            w1at_ptr, w1bt_ptr, b1_ptr, pw_ptr, pb_ptr,
            C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, C_PAD: tl.constexpr,
            HID_PAD: tl.constexpr, C_BLK: tl.constexpr, FC_BLK: tl.constexpr, FC_CEIL: tl.constexpr,
            DEPTHWISE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, PAD: tl.constexpr,
            KEEP_CONV: tl.constexpr, EXACT: tl.constexpr, CH_CONTIG: tl.constexpr):
    """(h, conv): h = relu(x @ W1a^T + conv @ W1b^T + b1) for a strip of cells. Channels
    come C_BLK and the conv FC_BLK at a time so no weight operand exceeds 16-32 KB (a
    C=128, hidden=256 rule still fits shared memory) and the perception P never exists
    whole. KEEP_CONV (rules of one conv chunk, FC_CEIL = FC_BLK): conv [BLOCK_M, FC_BLK]
    is returned for the backward's d_w1b; otherwise conv is 0."""
    z = tl.zeros([BLOCK_M, HID_PAD], dtype=tl.float32)
    for k0 in range(0, C, C_BLK):
        offs_k = k0 + tl.arange(0, C_BLK)
        xk = tl.load(x_row + offs_k.to(tl.int64)[None, :] * s_c,
                     mask=rows[:, None] & (offs_k < C)[None, :], other=0.0).to(tl.float32)
        z = _mm(xk, tl.load(w1at_ptr + offs_k[:, None] * HID_PAD + offs_h[None, :]), z,
                DOT_PREC, EXACT, _EX_STATE, _EX_W1)
    if KEEP_CONV:
        offs_f = tl.arange(0, FC_BLK)
        conv = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask,
                           offs_f, offs_f < FC, pw_ptr, pb_ptr,
                           F, C_PAD, FC_CEIL, BLOCK_M, FC_BLK, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
        z = _mm(conv, tl.load(w1bt_ptr + offs_f[:, None] * HID_PAD + offs_h[None, :]), z,
                DOT_PREC, EXACT, _EX_NONE, _EX_W1)
    else:
        for f0 in range(0, FC, FC_BLK):
            offs_f = f0 + tl.arange(0, FC_BLK)
            conv_f = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask,
                                 offs_f, offs_f < FC, pw_ptr, pb_ptr,
                                 F, C_PAD, FC_CEIL, BLOCK_M, FC_BLK, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
            z = _mm(conv_f, tl.load(w1bt_ptr + offs_f[:, None] * HID_PAD + offs_h[None, :]), z,
                    DOT_PREC, EXACT, _EX_NONE, _EX_W1)
        conv = 0.0
    z = z + tl.load(b1_ptr + offs_h)[None, :]
    return tl.where(z < 0.0, 0.0, z), conv  # ReLU that keeps NaN (tl.maximum would drop it), like torch


# ---------------------------------------------------------------------------------------
# Weight layout (one launch per call instead of a dozen small torch ops: a rollout of
# small states is launch-bound)
# ---------------------------------------------------------------------------------------


@triton.jit
def _nca_step_arrange_kernel(
    out_ptr, wh_ptr, pw_ptr, pb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    pw_s0, pw_s1, pw_s2, pw_s3, pb_s, w1_s0, w1_s1, b1_s, w2_s0, w2_s1, b2_s, frozen,
    C: tl.constexpr, FC: tl.constexpr, HID: tl.constexpr, C_PAD: tl.constexpr,
    HID_PAD: tl.constexpr, FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, HALF_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fill the flat fp32 buffer [w1at | w1bt | b1p | w2t | b2p | pwt | pbp] (module
    docstring) from the raw weights (any float dtype, any strides); padding is zero.
    HALF_W: also its bfloat16 copy wh (same layout; the weights are bfloat16, so exact)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    E0 = C_PAD * HID_PAD
    E1 = E0 + FC_CEIL * HID_PAD
    E2 = E1 + HID_PAD
    E3 = E2 + HID_PAD * C_PAD
    E4 = E3 + C_PAD
    if DEPTHWISE:
        E5 = E4 + 9 * FC_CEIL
    else:
        E5 = E4 + 9 * C_PAD * FC_CEIL
    E6 = E5 + FC_CEIL
    # w1at[c, h] = w1[h, c]
    r = i // HID_PAD
    k = i % HID_PAD
    val = tl.load(w1_ptr + k * w1_s0 + r * w1_s1, mask=(i < E0) & (r < C) & (k < HID),
                  other=0.0).to(tl.float32)
    # w1bt[o, h] = w1[h, C + o]
    j = i - E0
    r = j // HID_PAD
    k = j % HID_PAD
    val += tl.load(w1_ptr + k * w1_s0 + (C + r) * w1_s1, mask=(j >= 0) & (i < E1) & (r < FC) & (k < HID),
                   other=0.0).to(tl.float32)
    # b1p
    j = i - E1
    val += tl.load(b1_ptr + j * b1_s, mask=(j >= 0) & (j < HID), other=0.0).to(tl.float32)
    # w2t[h, c] = w2[c - frozen, h] for frozen <= c < C
    j = i - E2
    r = j // C_PAD
    k = j % C_PAD
    val += tl.load(w2_ptr + (k - frozen) * w2_s0 + r * w2_s1,
                   mask=(j >= 0) & (i < E3) & (r < HID) & (k >= frozen) & (k < C), other=0.0).to(tl.float32)
    # b2p[c] = b2[c - frozen]
    j = i - E3
    val += tl.load(b2_ptr + (j - frozen) * b2_s, mask=(j >= frozen) & (j < C) & (i < E4),
                   other=0.0).to(tl.float32)
    # pwt
    j = i - E4
    if DEPTHWISE:  # [9, FC_CEIL]
        tap = j // FC_CEIL
        r = j % FC_CEIL
        src = r * pw_s0 + (tap // 3) * pw_s2 + (tap % 3) * pw_s3
        ok = (j >= 0) & (i < E5) & (r < FC)
    else:  # [9, C_PAD, FC_CEIL]
        tap = j // (C_PAD * FC_CEIL)
        k = (j // FC_CEIL) % C_PAD
        r = j % FC_CEIL
        src = r * pw_s0 + k * pw_s1 + (tap // 3) * pw_s2 + (tap % 3) * pw_s3
        ok = (j >= 0) & (i < E5) & (r < FC) & (k < C)
    val += tl.load(pw_ptr + src, mask=ok, other=0.0).to(tl.float32)
    # pbp
    j = i - E5
    val += tl.load(pb_ptr + j * pb_s, mask=(j >= 0) & (j < FC), other=0.0).to(tl.float32)
    tl.store(out_ptr + i, val, mask=i < E6)
    if HALF_W:
        tl.store(wh_ptr + i, val.to(tl.bfloat16), mask=i < E6)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _stepped(xk, delta, offs_k, frozen, m):
    """The new state of a strip's channels offs_k: xk + delta on the updated channels of the
    cells that fire (m != 0), xk itself elsewhere: idle cells keep their state exactly (not
    xk + 0 * delta: a delta may be inf/NaN)."""
    return tl.where((offs_k[None, :] >= frozen) & (m[:, None] != 0), xk + delta, xk)


@triton.jit
def _hidden_units(x, conv, w1a_ptr, w1bt_ptr, b1_ptr, offs_c, offs_f, offs_h, HID_PAD: tl.constexpr,
                  DOT_PREC: tl.constexpr, EXACT: tl.constexpr):
    """h = relu(x W1a + conv W1b + b1) for the hidden units offs_h of a tile (rules of one
    channel and conv chunk: x [BLOCK_M, C_PAD] in the state's dtype, conv [BLOCK_M, FC_CEIL]);
    the chunk step of _forward_hidden_chunks and _nca_step_backward_cell_gemm_kernel. Each
    z is the sum _hidden forms, over the same inputs."""
    z = _mm(x, tl.load(w1a_ptr + offs_c[:, None] * HID_PAD + offs_h[None, :]), None,
            DOT_PREC, EXACT, _EX_STATE, _EX_W1)
    z = _mm(conv, tl.load(w1bt_ptr + offs_f[:, None] * HID_PAD + offs_h[None, :]), z,
            DOT_PREC, EXACT, _EX_NONE, _EX_W1)
    z = z + tl.load(b1_ptr + offs_h)[None, :]
    return tl.where(z < 0.0, 0.0, z)  # ReLU that keeps NaN, as _hidden's


@triton.jit
def _forward_hidden_chunks(x_ptr, x_row, o_row, rows, m, xb, y, xx, H, W, s_h, s_w, s_c, o_c, offs_c, cmask,
                           w1a_ptr, w1bt_ptr, b1_ptr, w2t_ptr, b2_ptr, pw_ptr, pb_ptr, frozen,
                           F: tl.constexpr, FC: tl.constexpr, C_PAD: tl.constexpr, HID_PAD: tl.constexpr,
                           FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, DOT_PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, PAD: tl.constexpr, EXACT: tl.constexpr, HC: tl.constexpr,
                           CH_CONTIG: tl.constexpr):
    """The forward of a strip of cells for a rule of one channel and one conv chunk, the
    hidden layer HC units at a time (FASTNCA_TRITON_NCA_FWD_HCHUNK): x and the conv are
    loaded and computed once; each chunk's z, h = relu(z) and its product with W2's rows
    add into delta, so only a [BLOCK_M, HC] slice of the hidden layer is live, not
    [BLOCK_M, HID_PAD] (the same walk as the backward's hidden-chunk kernel). Every z is
    the same sum over the same inputs as in _hidden; delta sums the chunks in order.
    m: the fire mask of the rows (1 for every listed cell)."""
    kmask = rows[:, None] & cmask[None, :]
    # x stays in the state's dtype: the operand of bfloat16 dots (_mm casts)
    x = tl.load(x_row + offs_c.to(tl.int64)[None, :] * s_c, mask=kmask, other=0.0)
    offs_f = tl.arange(0, FC_CEIL)
    conv = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, offs_f, offs_f < FC,
                       pw_ptr, pb_ptr, F, C_PAD, FC_CEIL, BLOCK_M, FC_CEIL, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
    offs_j = tl.arange(0, HC)
    delta = tl.zeros([BLOCK_M, C_PAD], dtype=tl.float32)
    for j0 in range(0, HID_PAD, HC):
        offs_h = j0 + offs_j
        h = _hidden_units(x, conv, w1a_ptr, w1bt_ptr, b1_ptr, offs_c, offs_f, offs_h, HID_PAD, DOT_PREC, EXACT)
        delta = _mm(h, tl.load(w2t_ptr + offs_h[:, None] * C_PAD + offs_c[None, :]), delta,
                    DOT_PREC, EXACT, _EX_NONE, _EX_W2)
    delta += tl.load(b2_ptr + offs_c)[None, :]
    new = _stepped(x.to(tl.float32), delta, offs_c, frozen, m)
    tl.store(o_row + offs_c.to(tl.int64)[None, :] * o_c, new.to(o_row.dtype.element_ty), mask=kmask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo", "threshold"])
def _nca_step_forward_kernel(
    x_ptr, out_ptr, idx_ptr, count_ptr, wf_ptr, wh_ptr,
    N, H, W, s_b, s_c, s_h, s_w, o_b, o_c, o_h, o_w, seed_lo, seed_hi, step_lo, threshold, frozen,
    C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, HID: tl.constexpr,
    C_PAD: tl.constexpr, HID_PAD: tl.constexpr, C_BLK: tl.constexpr, FC_BLK: tl.constexpr,
    FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT: tl.constexpr, HALF_W: tl.constexpr, COMPACT: tl.constexpr, HC: tl.constexpr,
    CH_CONTIG: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """COMPACT: out = x + delta at the firing cells idx[0..count) (the copy kernel writes
    the others); programs past the list's last tile do nothing. Otherwise every cell, the
    mask drawn in-kernel (one launch: small states, where launches dominate).
    HC > 0 (FASTNCA_TRITON_NCA_FWD_HCHUNK, rules of one channel and conv chunk; opt-in):
    the hidden layer in chunks of HC units (_forward_hidden_chunks).
    wh: the bfloat16 copy of the arranged weights (HALF_W): the conv and fc1's state part,
    bfloat16 dots, read their weights there."""
    w1at_ptr, w1bt_ptr, b1_ptr, w2t_ptr, b2_ptr, pw_ptr, pb_ptr = _weight_segments(wf_ptr, C_PAD, HID_PAD, FC_CEIL,
                                                                                   DEPTHWISE)
    pid = tl.program_id(0)
    if COMPACT:
        count = tl.load(count_ptr)
    else:
        count = N
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    offs_h = tl.arange(0, HID_PAD)
    if pid < tl.cdiv(count, BLOCK_M):  # the grid covers every cell, the list ~update_prob of them
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pos < count
        if COMPACT:
            offs_m = tl.load(idx_ptr + pos, mask=rows, other=0)
            m = rows.to(tl.float32)
        else:
            offs_m = pos
            m = _fire(offs_m, seed_lo, seed_hi, step_lo, threshold)
        b, y, xx = _cell_coords(offs_m, H, W)
        xb = b.to(tl.int64) * s_b
        x_row = x_ptr + (xb + y.to(tl.int64) * s_h + xx.to(tl.int64) * s_w)[:, None]
        ob = b.to(tl.int64) * o_b + y.to(tl.int64) * o_h + xx.to(tl.int64) * o_w
        o_row = out_ptr + ob[:, None]

        w1a_d, _, pw_d = _bf16_weight_srcs(w1at_ptr, w2t_ptr, pw_ptr, wh_ptr, HALF_W, EXACT, C_PAD, HID_PAD,
                                           FC_CEIL, DEPTHWISE)
        if HC > 0:
            _forward_hidden_chunks(x_ptr, x_row, o_row, rows, m, xb, y, xx, H, W, s_h, s_w, s_c, o_c, offs_c, cmask,
                                   w1a_d, w1bt_ptr, b1_ptr, w2t_ptr, b2_ptr, pw_d, pb_ptr, frozen, F, FC, C_PAD,
                                   HID_PAD, FC_CEIL, DEPTHWISE, DOT_PREC, BLOCK_M, PAD, EXACT, HC, CH_CONTIG)
        else:
            h, _ = _hidden(x_ptr, x_row, rows, xb, y, xx, H, W, s_h, s_w, s_c, offs_c, cmask, offs_h,
                           w1a_d, w1bt_ptr, b1_ptr, pw_d, pb_ptr, C, F, FC, C_PAD, HID_PAD, C_BLK, FC_BLK,
                           FC_CEIL, DEPTHWISE, DOT_PREC, BLOCK_M, PAD, False, EXACT, CH_CONTIG)
            for k0 in range(0, C, C_BLK):
                offs_k = k0 + tl.arange(0, C_BLK)
                kmask = rows[:, None] & (offs_k < C)[None, :]
                xk = tl.load(x_row + offs_k.to(tl.int64)[None, :] * s_c, mask=kmask, other=0.0).to(tl.float32)
                delta = _mm(h, tl.load(w2t_ptr + offs_h[:, None] * C_PAD + offs_k[None, :]), None,
                            DOT_PREC, EXACT, _EX_NONE, _EX_W2)
                delta += tl.load(b2_ptr + offs_k)[None, :]
                new = _stepped(xk, delta, offs_k, frozen, m)
                tl.store(o_row + offs_k.to(tl.int64)[None, :] * o_c, new.to(out_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _nca_step_copy_idle_kernel(
    x_ptr, out_ptr, fire_ptr, N, H, W, s_b, s_c, s_h, s_w, o_b, o_c, o_h, o_w,
    C_PAD: tl.constexpr, C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out = x at the cells that do not fire (the forward kernel writes the others)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < N
    idle = rows & (tl.load(fire_ptr + offs_m, mask=rows, other=1) == 0)
    b, y, xx = _cell_coords(offs_m, H, W)
    offs_c = tl.arange(0, C_PAD).to(tl.int64)
    m = idle[:, None] & (offs_c < C)[None, :]
    xo = b.to(tl.int64) * s_b + y.to(tl.int64) * s_h + xx.to(tl.int64) * s_w
    oo = b.to(tl.int64) * o_b + y.to(tl.int64) * o_h + xx.to(tl.int64) * o_w
    tl.store(out_ptr + oo[:, None] + offs_c[None, :] * o_c,
             tl.load(x_ptr + xo[:, None] + offs_c[None, :] * s_c, mask=m), mask=m)


def _wgmma_safe(block_m: int, num_warps: int) -> bool:
    """False when a [BLOCK_M, N] dot would get more warp groups (4 warps) than it has
    64-row blocks. Hopper wgmma gives each warp group 64 rows; Triton 3.6 spreads spare warp
    groups over N, or repeats the rows, and both went wrong on an H100:
    - N split: BLOCK_M=64 on 8 warps runs N=16 as two N=8 wgmmas, whose operand Triton
      does not pad in shared memory, and the instruction reads past the buffer
      (triton-lang/triton#10629): an illegal memory access in the backward of every rule
      with C <= 16 and hidden 128 (2026-11-26).
    - Rows repeated: the input-gradient kernel at 64 rows on 8 warps compiles its first
      dot with warpsPerCTA [8, 1] (two warp groups on one 64-row tile) and its second
      with [4, 2]. It was suspected of a wrong d_state (Med-NCA rule, float32 state,
      bfloat16 weights), but an H200 run (220af96) gave the same error with the input
      tile at 32/4, 64/4 and 128/8: not this (see _exact_bits). 64 rows on 4 warps
      compiles to [4, 1] throughout (sm_90, offline) and stays, as the safe layout.
    A dot of fewer than 64 rows has no wgmma (mma.sync instead): any warp count is safe.
    BLOCK_M is the dot's row count, which for the backward cell kernel's weight-gradient
    dots is a channel width, not the tile's cells (_cell_tile_safe)."""
    return block_m < 64 or num_warps // 4 <= block_m // 64


def _cell_tile_safe(rule, block_m: int, num_warps: int) -> bool:
    """_wgmma_safe for every dot of the backward cell kernel at this tile: the per-cell dots
    have BLOCK_M rows, the weight-gradient partials (gd^T h, dz^T x, dz^T conv) C_BLK and
    HID_PAD rows; under =gemm the kernel has no partial dots; under =chunked the hidden-chunk
    kernel's (rules of one chunk) have C_PAD and HC rows. sm_90 compile (triton 3.9):
    32 rows on 8 warps for C=64, hidden=64 gave the 64-row dz^T x dot warpsPerCTA [8, 1]
    and [4, 2], the layouts _wgmma_safe avoids."""
    knob = _bwd_acc_knob()
    if knob == "gemm":
        rows = (block_m,)
    elif knob == "chunked" and getattr(rule, "ONE_CHUNK", False):
        rows = (block_m, rule.C_PAD, _hidden_chunk(rule))
    else:
        rows = (block_m, rule.C_BLK, rule.HID_PAD)
    return all(_wgmma_safe(m, num_warps) for m in rows)


def _forward_prune(configs, named_args, **kwargs):
    """Drop tiles whose largest fp32 accumulator ([BLOCK_M, max(HID_PAD or HC, C_PAD, FC_BLK)])
    would need more than ~128 registers per thread (spills), tiles with more warp groups
    than 64-row blocks (_wgmma_safe), and the register-capped candidates where the hidden
    layer is not chunked (HC = 0; see _FORWARD_CONFIGS) or on ROCm (no maxnreg there)."""
    a = {**named_args, **kwargs}
    width = max(a.get("HC") or a["HID_PAD"], a["C_PAD"], a["FC_BLK"])
    capped_ok = bool(a.get("HC")) and torch.version.hip is None  # HIP: no maxnreg option
    safe = [c for c in configs if _wgmma_safe(c.kwargs["BLOCK_M"], c.num_warps)
            and (capped_ok or not getattr(c, "maxnreg", None))]
    keep = [c for c in safe if c.kwargs["BLOCK_M"] * width <= 128 * 32 * c.num_warps]
    return keep or safe[:1]


# Untuned starting set (no GPU was available when this was written): strips of 32-128
# cells, 4 or 8 warps, no software pipelining (num_stages=1: the loops are short and
# extra stages would multiply the shared-memory staging of the dot operands). sm_90a AOT
# compiles (triton 3.9, tf32x3): C=16, F=2, hidden=128 -> 234-255 registers, no spills,
# 16-48 KB shared memory for these tiles; C=128, F=3, hidden=256 at 32/8 warps -> 80 KB,
# 1.4 KB spills.
# The last candidate caps a thread's registers at 168 (ptxas .maxnreg), for the hidden-chunk
# forward only (FASTNCA_TRITON_NCA_FWD_HCHUNK; _forward_prune drops it elsewhere): 3 blocks
# of 4 warps an SM instead of 2. Nsight Compute put the forward at 12.5% occupancy (H100,
# 3a51e20) with the SMs mostly idle (21% SM, 2% DRAM throughput): latency it cannot hide.
# sm_90 compiles, Med-NCA rule, bfloat16, channels_last, 64 rows on 4 warps (triton 3.6,
# scripts/triton_sm90_resources.py, stack bytes a thread): HC=32 takes 209 registers, 0
# stack; capped at 168, 0; at 128 (4 blocks), 184. The whole hidden layer (HC = 0): 254
# registers, 0 stack; at 168, 288; at 128, 672. Untimed.
_FORWARD_CONFIGS = ((32, 4, None), (64, 4, None), (64, 8, None), (128, 8, None), (64, 4, 168))


@functools.lru_cache(maxsize=None)
def _forward_autotuned():
    """The autotuned forward, made on first use: an Autotuner asks the active driver for
    its benchmarker when constructed (triton 3.2), and under TRITON_INTERPRET=1 on a
    machine without a GPU there is none, so building it at import failed there."""
    return autotune(
        _nca_step_forward_kernel,
        configs=[triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1, maxnreg=regs)
                 for bm, w, regs in _FORWARD_CONFIGS],
        key=["C", "F", "HID", "DEPTHWISE", "DOT_PREC", "EXACT", "COMPACT", "HC", "CH_CONTIG"],
        prune_configs_by={"early_config_prune": _forward_prune},
    )


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["c0", "c1", "seed_lo", "seed_hi", "step_lo", "threshold"])
def _nca_step_backward_cell_kernel(
    g_ptr, x_ptr, ws_ptr, wq_ptr, act_ptr, idx_ptr, pos_ptr, c0, c1,
    wf_ptr, wh_ptr,
    part_ptr, SLOT: tl.constexpr,
    H, W, s_b, s_c, s_h, s_w, g_b, g_c, g_h, g_w, seed_lo, seed_hi, step_lo, threshold, frozen,
    LISTED: tl.constexpr, C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, HID: tl.constexpr,
    C_PAD: tl.constexpr, HID_PAD: tl.constexpr, C_BLK: tl.constexpr, FC_BLK: tl.constexpr,
    FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT: tl.constexpr, HALF_W: tl.constexpr, REG_ACC: tl.constexpr, CH_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, K1: tl.constexpr, WQ: tl.constexpr,
):
    """Per tile of firing cells: recompute, then dP -> workspace and the fc weight-grad
    partials (d_w1, d_b1, d_w2, d_b2, d_pb) -> this program's own slot. The firing cells of
    the batch chunk are listed in idx[0..count) (ascending; count in device memory): cells
    that do not fire have dz = 0 and contribute nothing here. LISTED false: the tiles are
    every cell of the chunk, the mask drawn here; an idle cell writes g and a zero dQ.

    REG_ACC (rules of one channel chunk and one conv chunk: C_BLK = C_PAD, FC_BLK =
    FC_CEIL): 1, the partials stay in registers over the program's tiles and are stored
    once at the end, and the conv tile of the recompute is kept for d_w1b; 2, the same but
    d_w1b, the largest, is read-modify-written in the slot per tile. 0: every partial is
    read-modify-written in the slot per tile and chunk, and each conv chunk is recomputed.
    3 (FASTNCA_TRITON_NCA_BWD_ACC=gemm): no fc weight-grad partials here; each walked
    cell's dz, h, gd, x and conv go to row `pos` (its place in the walk) of `act` (the
    state's dtype), for _nca_step_backward_fc_kernel's GEMMs; only the bias partials are
    read-modify-written in the slot per tile.
    wh: the bfloat16 copy of the arranged weights (HALF_W), read by the bfloat16 dots (the
    recompute's conv and fc1 state part, dh = gd W2); the TF32 products read float32."""
    w1at_ptr, w1bt_ptr, b1_ptr, w2t_ptr, b2_ptr, pw_ptr, pb_ptr = _weight_segments(wf_ptr, C_PAD, HID_PAD, FC_CEIL,
                                                                                   DEPTHWISE)
    # act row layout (the same in _nca_step_backward_fc_kernel and _act_row):
    # [dz | h (HID_PAD each) | gd | x (C_PAD each) | conv (FC_CEIL)]. Derived here, not
    # passed: five more constexpr arguments cost ~0.7 us a launch (scripts/host_cost.py).
    A_H: tl.constexpr = HID_PAD
    A_GD: tl.constexpr = 2 * HID_PAD
    A_X: tl.constexpr = 2 * HID_PAD + C_PAD
    A_CV: tl.constexpr = 2 * HID_PAD + 2 * C_PAD
    A_ROW: tl.constexpr = 2 * HID_PAD + 2 * C_PAD + FC_CEIL
    GEMM: tl.constexpr = REG_ACC == 3
    REGS: tl.constexpr = (REG_ACC == 1) | (REG_ACC == 2)  # partials in registers
    KEEP: tl.constexpr = REGS | (GEMM & (FC_BLK == FC_CEIL))  # the recompute's conv tile is kept
    w1a_d, w2_d, pw_d = _bf16_weight_srcs(w1at_ptr, w2t_ptr, pw_ptr, wh_ptr, HALF_W, EXACT, C_PAD, HID_PAD, FC_CEIL,
                                          DEPTHWISE)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dw1a_ptr, dw1b_ptr, db1_ptr, dw2_ptr, db2_ptr, dpb_ptr = _program_slot(
        part_ptr, pid.to(tl.int64) * SLOT, C_PAD, HID_PAD, FC_CEIL)

    # workspace rows: g + dP_x at ws[cell, :C] (row stride K1), dQ at wq[cell, :FC] (stride
    # WQ; wq is ws[:, C:] itself, or a bfloat16 workspace of its own: _half_dq)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    offs_h = tl.arange(0, HID_PAD)
    offs_kb = tl.arange(0, C_BLK)
    offs_fb = tl.arange(0, FC_BLK)
    # Register accumulators (used, and so loop-carried, only with REG_ACC).
    acc_w2 = tl.zeros([C_BLK, HID_PAD], dtype=tl.float32)
    acc_b2 = tl.zeros([C_BLK], dtype=tl.float32)
    acc_b1 = tl.zeros([HID_PAD], dtype=tl.float32)
    acc_w1a = tl.zeros([HID_PAD, C_BLK], dtype=tl.float32)
    acc_w1b = tl.zeros([HID_PAD, FC_BLK], dtype=tl.float32)
    acc_pb = tl.zeros([FC_BLK], dtype=tl.float32)
    start, count = _cell_range(pos_ptr, c0, c1, LISTED)
    for tile in range(pid, tl.cdiv(count, BLOCK_M), nprog):
        pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pos < count
        offs_m = _walked_cells(idx_ptr, start, pos, rows, c0, LISTED)  # in the chunk
        fires = _walked_firing(rows, offs_m, c0, seed_lo, seed_hi, step_lo, threshold, LISTED)
        b, y, xx = _cell_coords(offs_m, H, W)
        ws_row = offs_m.to(tl.int64) * K1
        wq_row = offs_m.to(tl.int64) * WQ
        act_row = act_ptr + (pos.to(tl.int64) * A_ROW)[:, None]
        xb = b.to(tl.int64) * s_b
        x_row = x_ptr + (xb + y.to(tl.int64) * s_h + xx.to(tl.int64) * s_w)[:, None]
        g_row = g_ptr + (b.to(tl.int64) * g_b + y.to(tl.int64) * g_h + xx.to(tl.int64) * g_w)[:, None]

        # ---- recompute the forward up to h (with REG_ACC the single conv chunk is kept for
        # d_w1b; otherwise conv chunks are recomputed below)
        h, conv0 = _hidden(x_ptr, x_row, rows, xb, y, xx, H, W, s_h, s_w, s_c, offs_c, cmask, offs_h,
                           w1a_d, w1bt_ptr, b1_ptr, pw_d, pb_ptr, C, F, FC, C_PAD, HID_PAD, C_BLK,
                           FC_BLK, FC_CEIL, DEPTHWISE, DOT_PREC, BLOCK_M, PAD, KEEP, EXACT, CH_CONTIG)
        if not LISTED:  # an idle cell's recompute (say of NaN neighbours) enters no product
            h = tl.where(fires[:, None], h, 0.0)
            if KEEP:
                conv0 = tl.where(fires[:, None], conv0, 0.0)
        if GEMM:  # stored at once: the kept conv tile is then dead here, not live to the dq loop
            tl.store(act_row + A_H + offs_h[None, :], h.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            if KEEP:
                tl.store(act_row + A_CV + offs_fb[None, :], conv0.to(act_ptr.dtype.element_ty), mask=rows[:, None])

        # ---- gd = g on the updated channels of firing cells (zero on frozen channels, on
        # cells that do not fire, and on dead rows); d_w2, d_b2 partials; dh = gd @ W2. A
        # walked cell that does not fire (not LISTED) has gd = dh = dz = 0: it adds nothing
        # to the partials and writes g + 0 and 0 to the workspace. (Pointer names are
        # distinct on purpose: a name reassigned in a later loop with another shape would
        # become an ill-typed loop-carried value for the compiler.)
        dh = tl.zeros([BLOCK_M, HID_PAD], dtype=tl.float32)
        for k0 in range(0, C, C_BLK):
            offs_k = k0 + offs_kb
            gk = tl.load(g_row + offs_k.to(tl.int64)[None, :] * g_c,
                         mask=rows[:, None] & (offs_k < C)[None, :], other=0.0).to(tl.float32)
            gdk = tl.where(fires[:, None] & (offs_k[None, :] >= frozen), gk, 0.0)
            if GEMM:
                tl.store(act_row + A_GD + offs_k[None, :], gdk.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            elif REGS:
                acc_w2 = _mm(tl.trans(gdk), h, acc_w2, DOT_PREC, EXACT, _EX_GRAD, _EX_BWD)
            else:
                p_w2 = dw2_ptr + offs_k[:, None] * HID_PAD + offs_h[None, :]
                tl.store(p_w2, _mm(tl.trans(gdk), h, tl.load(p_w2), DOT_PREC, EXACT, _EX_GRAD, _EX_BWD))
            if REGS:
                acc_b2 += tl.sum(gdk, axis=0)
            else:
                p_b2 = db2_ptr + offs_k
                tl.store(p_b2, tl.load(p_b2) + tl.sum(gdk, axis=0))
            dh = _mm(gdk, tl.load(w2_d + offs_h[None, :] * C_PAD + offs_k[:, None]), dh,
                     DOT_PREC, EXACT, _EX_GRAD, _EX_W2)
        dz = tl.where(h > 0.0, dh, 0.0)  # relu'(z): z > 0 <=> h > 0
        if GEMM:
            tl.store(act_row + offs_h[None, :], dz.to(act_ptr.dtype.element_ty), mask=rows[:, None])
        if REGS:
            acc_b1 += tl.sum(dz, axis=0)
        else:
            p_b1 = db1_ptr + offs_h
            tl.store(p_b1, tl.load(p_b1) + tl.sum(dz, axis=0))

        # ---- d_w1[:, :C] partial, and the direct part of d_state: g + dP[:, :C]
        for k0 in range(0, C, C_BLK):
            offs_k = k0 + offs_kb
            kmask = rows[:, None] & (offs_k < C)[None, :]
            xk = tl.load(x_row + offs_k.to(tl.int64)[None, :] * s_c, mask=kmask & fires[:, None],
                         other=0.0).to(tl.float32)
            if GEMM:
                tl.store(act_row + A_X + offs_k[None, :], xk.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            elif REGS:
                acc_w1a = _mm(tl.trans(dz), xk, acc_w1a, DOT_PREC, EXACT, _EX_BWD, _EX_STATE)
            else:
                p_w1a = dw1a_ptr + offs_h[:, None] * C_PAD + offs_k[None, :]
                tl.store(p_w1a, _mm(tl.trans(dz), xk, tl.load(p_w1a), DOT_PREC, EXACT, _EX_BWD, _EX_STATE))
            gk = tl.load(g_row + offs_k.to(tl.int64)[None, :] * g_c, mask=kmask, other=0.0).to(tl.float32)
            dpx = _mm(dz, tl.load(w1at_ptr + offs_h[:, None] + offs_k[None, :] * HID_PAD), gk,
                      DOT_PREC, EXACT, _EX_BWD, _EX_W1)
            tl.store(ws_ptr + ws_row[:, None] + offs_k[None, :], dpx, mask=kmask)

        # ---- conv part: dQ = dz @ W1b per chunk -> workspace (d_pw comes from it in the
        # conv-gradient kernel); d_w1b, d_pb partials
        for f0 in range(0, FC, FC_BLK):
            offs_f = f0 + offs_fb
            fmask = offs_f < FC
            dq = _mm(dz, tl.load(w1bt_ptr + offs_f[None, :] * HID_PAD + offs_h[:, None]), None,
                     DOT_PREC, EXACT, _EX_BWD, _EX_W1)
            tl.store(wq_ptr + wq_row[:, None] + offs_f[None, :], dq.to(wq_ptr.dtype.element_ty),
                     mask=rows[:, None] & fmask[None, :])
            if REGS:
                acc_pb += tl.sum(dq, axis=0)
            else:
                p_pb = dpb_ptr + offs_f
                tl.store(p_pb, tl.load(p_pb) + tl.sum(dq, axis=0))
            if GEMM:
                if not KEEP:
                    conv_g = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask,
                                         offs_f, fmask, pw_d, pb_ptr,
                                         F, C_PAD, FC_CEIL, BLOCK_M, FC_BLK, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
                    if not LISTED:
                        conv_g = tl.where(fires[:, None], conv_g, 0.0)
                    tl.store(act_row + A_CV + offs_f[None, :], conv_g.to(act_ptr.dtype.element_ty),
                             mask=rows[:, None])
            elif REGS:
                if REG_ACC == 2:  # d_w1b read-modify-written in the slot: 64 fewer registers (Med-NCA)
                    p_w1b = dw1b_ptr + offs_h[:, None] * FC_CEIL + offs_fb[None, :]
                    tl.store(p_w1b, _mm(tl.trans(dz), conv0, tl.load(p_w1b), DOT_PREC, EXACT, _EX_BWD, _EX_BWD))
                else:
                    acc_w1b = _mm(tl.trans(dz), conv0, acc_w1b, DOT_PREC, EXACT, _EX_BWD, _EX_BWD)
            else:
                conv = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask,
                                   offs_f, fmask, pw_d, pb_ptr,
                                   F, C_PAD, FC_CEIL, BLOCK_M, FC_BLK, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
                if not LISTED:
                    conv = tl.where(fires[:, None], conv, 0.0)
                p_w1b = dw1b_ptr + offs_h[:, None] * FC_CEIL + offs_f[None, :]
                tl.store(p_w1b, _mm(tl.trans(dz), conv, tl.load(p_w1b), DOT_PREC, EXACT, _EX_BWD, _EX_BWD))
        if REG_ACC != 1:
            # The next tile re-reads this tile's partial slots, whose elements may live in
            # other threads than the ones that stored them: make the stores visible CTA-wide.
            tl.debug_barrier()
    if REGS:  # added to the slot once per program (it sums the batch chunks); padded rows/columns hold zeros
        p_w2 = dw2_ptr + offs_kb[:, None] * HID_PAD + offs_h[None, :]
        tl.store(p_w2, tl.load(p_w2) + acc_w2)
        tl.store(db2_ptr + offs_kb, tl.load(db2_ptr + offs_kb) + acc_b2)
        tl.store(db1_ptr + offs_h, tl.load(db1_ptr + offs_h) + acc_b1)
        p_w1a = dw1a_ptr + offs_h[:, None] * C_PAD + offs_kb[None, :]
        tl.store(p_w1a, tl.load(p_w1a) + acc_w1a)
        if REG_ACC == 1:
            p_w1b = dw1b_ptr + offs_h[:, None] * FC_CEIL + offs_fb[None, :]
            tl.store(p_w1b, tl.load(p_w1b) + acc_w1b)
        tl.store(dpb_ptr + offs_fb, tl.load(dpb_ptr + offs_fb) + acc_pb)


@triton.jit(do_not_specialize=["c0", "c1", "seed_lo", "seed_hi", "step_lo", "threshold"])
def _nca_step_backward_cell_gemm_kernel(
    g_ptr, x_ptr, ws_ptr, wq_ptr, act_ptr, idx_ptr, pos_ptr, c0, c1,
    wf_ptr, wh_ptr,
    part_ptr, SLOT: tl.constexpr,
    H, W, s_b, s_c, s_h, s_w, g_b, g_c, g_h, g_w, seed_lo, seed_hi, step_lo, threshold, frozen,
    LISTED: tl.constexpr, C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, HID: tl.constexpr,
    C_PAD: tl.constexpr, HID_PAD: tl.constexpr, C_BLK: tl.constexpr, FC_BLK: tl.constexpr,
    FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    EXACT: tl.constexpr, HALF_W: tl.constexpr, HC: tl.constexpr, PARTIALS: tl.constexpr,
    CH_CONTIG: tl.constexpr, BLOCK_M: tl.constexpr, K1: tl.constexpr, WQ: tl.constexpr,
):
    """The cell kernel of FASTNCA_TRITON_NCA_BWD_ACC=gemm for rules of one channel and one
    conv chunk (C_BLK = C_PAD, FC_BLK = FC_CEIL; the Med-NCA rule), in hidden chunks: per
    tile of listed cells it loads x and g and recomputes the conv once, then walks the
    hidden units HC at a time: z, h, dh and dz of the chunk, whose products add into dP_x
    and dQ ([BLOCK_M, C_PAD] and [BLOCK_M, FC_CEIL] accumulators). Only one chunk's
    [BLOCK_M, HC] activations are live, not [BLOCK_M, HID_PAD] ones, so the tile can be 64
    rows on one warp group (wgmma) where _nca_step_backward_cell_kernel spills at 16 rows
    on 4 warps: a quarter of the weight traffic a cell (the weights are staged again at
    every tile). Writes what the other kernel's =gemm branch writes: g + dP_x to ws, dQ to
    wq, [dz | h | gd | x | conv] to act row `pos`, bias partials (d_b1 read-modify-written
    per tile, d_b2 and d_pb summed in registers) to this program's slot.
    PARTIALS (FASTNCA_TRITON_NCA_BWD_ACC=chunked): no act rows; the fc weight-gradient
    partials of each chunk (d_w1a, d_w1b rows and d_w2 columns of its hidden units) are
    read-modify-written in this program's slot per tile instead (~2 KB a cell of L2
    traffic at 64 rows, no workspace and no fc kernel)."""
    w1at_ptr, w1bt_ptr, b1_ptr, w2t_ptr, b2_ptr, pw_ptr, pb_ptr = _weight_segments(wf_ptr, C_PAD, HID_PAD, FC_CEIL,
                                                                                   DEPTHWISE)
    A_H: tl.constexpr = HID_PAD
    A_GD: tl.constexpr = 2 * HID_PAD
    A_X: tl.constexpr = 2 * HID_PAD + C_PAD
    A_CV: tl.constexpr = 2 * HID_PAD + 2 * C_PAD
    A_ROW: tl.constexpr = 2 * HID_PAD + 2 * C_PAD + FC_CEIL
    w1a_d, w2_d, pw_d = _bf16_weight_srcs(w1at_ptr, w2t_ptr, pw_ptr, wh_ptr, HALF_W, EXACT, C_PAD, HID_PAD, FC_CEIL,
                                          DEPTHWISE)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    dw1a_ptr, dw1b_ptr, db1_ptr, dw2_ptr, db2_ptr, dpb_ptr = _program_slot(
        part_ptr, pid.to(tl.int64) * SLOT, C_PAD, HID_PAD, FC_CEIL)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    offs_f = tl.arange(0, FC_CEIL)
    fmask = offs_f < FC
    offs_j = tl.arange(0, HC)
    acc_b2 = tl.zeros([C_PAD], dtype=tl.float32)
    acc_pb = tl.zeros([FC_CEIL], dtype=tl.float32)
    start, count = _cell_range(pos_ptr, c0, c1, LISTED)
    for tile in range(pid, tl.cdiv(count, BLOCK_M), nprog):
        pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pos < count
        offs_m = _walked_cells(idx_ptr, start, pos, rows, c0, LISTED)  # in the chunk
        fires = _walked_firing(rows, offs_m, c0, seed_lo, seed_hi, step_lo, threshold, LISTED)
        b, y, xx = _cell_coords(offs_m, H, W)
        act_row = act_ptr + (pos.to(tl.int64) * A_ROW)[:, None]
        xb = b.to(tl.int64) * s_b
        kmask = rows[:, None] & cmask[None, :]
        # x and g stay in their storage dtype (half: the operands of bfloat16 dots; _mm casts)
        x = tl.load(x_ptr + (xb + y.to(tl.int64) * s_h + xx.to(tl.int64) * s_w)[:, None]
                    + offs_c.to(tl.int64)[None, :] * s_c, mask=kmask, other=0.0)
        g = tl.load(g_ptr + (b.to(tl.int64) * g_b + y.to(tl.int64) * g_h + xx.to(tl.int64) * g_w)[:, None]
                    + offs_c.to(tl.int64)[None, :] * g_c, mask=kmask, other=0.0)
        gd = tl.where(fires[:, None] & (offs_c[None, :] >= frozen), g, 0.0)  # idle cells: dz = 0
        acc_b2 += tl.sum(gd.to(tl.float32), axis=0)
        conv = _conv_chunk(x_ptr, xb, y, xx, H, W, s_h, s_w, rows, s_c, offs_c, cmask, offs_f, fmask, pw_d, pb_ptr,
                           F, C_PAD, FC_CEIL, BLOCK_M, FC_CEIL, DEPTHWISE, DOT_PREC, PAD, EXACT, CH_CONTIG)
        if not LISTED:  # an idle cell's recompute (say of NaN neighbours) enters no product
            x = tl.where(fires[:, None], x, 0.0)
            conv = tl.where(fires[:, None], conv, 0.0)
        if not PARTIALS:
            tl.store(act_row + A_GD + offs_c[None, :], gd.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            tl.store(act_row + A_X + offs_c[None, :], x.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            tl.store(act_row + A_CV + offs_f[None, :], conv.to(act_ptr.dtype.element_ty), mask=rows[:, None])
        dpx = g.to(tl.float32)  # g + dP_x, dP_x = dz @ W1a summed over the chunks
        dq = tl.zeros([BLOCK_M, FC_CEIL], dtype=tl.float32)
        for j0 in range(0, HID_PAD, HC):
            offs_h = j0 + offs_j
            h = _hidden_units(x, conv, w1a_d, w1bt_ptr, b1_ptr, offs_c, offs_f, offs_h, HID_PAD, DOT_PREC, EXACT)
            dh = _mm(gd, tl.load(w2_d + offs_h[None, :] * C_PAD + offs_c[:, None]), None,
                     DOT_PREC, EXACT, _EX_GRAD, _EX_W2)
            dz = tl.where(h > 0.0, dh, 0.0)  # relu'(z): z > 0 <=> h > 0
            if PARTIALS:  # padded rows have gd = dz = 0 (conv and h hold the biases'): they add nothing
                p_w2 = dw2_ptr + offs_c[:, None] * HID_PAD + offs_h[None, :]
                tl.store(p_w2, _mm(tl.trans(gd), h, tl.load(p_w2), DOT_PREC, EXACT, _EX_GRAD, _EX_BWD))
                p_w1a = dw1a_ptr + offs_h[:, None] * C_PAD + offs_c[None, :]
                tl.store(p_w1a, _mm(tl.trans(dz), x, tl.load(p_w1a), DOT_PREC, EXACT, _EX_BWD, _EX_STATE))
                p_w1b = dw1b_ptr + offs_h[:, None] * FC_CEIL + offs_f[None, :]
                tl.store(p_w1b, _mm(tl.trans(dz), conv, tl.load(p_w1b), DOT_PREC, EXACT, _EX_BWD, _EX_BWD))
            else:
                tl.store(act_row + A_H + offs_h[None, :], h.to(act_ptr.dtype.element_ty), mask=rows[:, None])
                tl.store(act_row + offs_h[None, :], dz.to(act_ptr.dtype.element_ty), mask=rows[:, None])
            p_b1 = db1_ptr + offs_h
            tl.store(p_b1, tl.load(p_b1) + tl.sum(dz, axis=0))
            dpx = _mm(dz, tl.load(w1at_ptr + offs_h[:, None] + offs_c[None, :] * HID_PAD), dpx,
                      DOT_PREC, EXACT, _EX_BWD, _EX_W1)
            dq = _mm(dz, tl.load(w1bt_ptr + offs_h[:, None] + offs_f[None, :] * HID_PAD), dq,
                     DOT_PREC, EXACT, _EX_BWD, _EX_W1)
        tl.store(ws_ptr + (offs_m.to(tl.int64) * K1)[:, None] + offs_c[None, :], dpx, mask=kmask)
        tl.store(wq_ptr + (offs_m.to(tl.int64) * WQ)[:, None] + offs_f[None, :], dq.to(wq_ptr.dtype.element_ty),
                 mask=rows[:, None] & fmask[None, :])
        acc_pb += tl.sum(dq, axis=0)
        # the next tile re-reads d_b1's slot, whose elements other threads may have stored
        tl.debug_barrier()
    tl.store(db2_ptr + offs_c, tl.load(db2_ptr + offs_c) + acc_b2)
    tl.store(dpb_ptr + offs_f, tl.load(dpb_ptr + offs_f) + acc_pb)


@triton.jit(do_not_specialize=["c0", "c1", "seed_lo", "seed_hi", "step_lo", "threshold"])
def _nca_step_backward_conv_kernel(
    wq_ptr, x_ptr, dpw_ptr, idx_ptr, pos_ptr, c0, c1, H, W, s_b, s_c, s_h, s_w, seed_lo, seed_hi, step_lo, threshold,
    LISTED: tl.constexpr, C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, C_PAD: tl.constexpr,
    FC_BLK: tl.constexpr, FC_CEIL: tl.constexpr, DEPTHWISE: tl.constexpr, PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, WQ: tl.constexpr,
):
    """d_pw[tap] partial = dQ^T @ (state shifted by tap) over one range of the firing cells
    idx[0..count) (the others have dQ = 0; LISTED false: of every cell, an idle one's
    shifted state left unread): a split-K GEMM over cells, split evenly by the
    count into as many ranges as axis 1 has programs: deterministic. Program (axis 0) =
    tap * (FC_CEIL / FC_BLK) + conv chunk, (axis 1) = cell range; each adds its sum to its
    own [FC_BLK, C_PAD] (depthwise: [FC_BLK]) block of partial `part` = axis 1 (zeroed once;
    the batch chunks add in order)."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    start, count = _cell_range(pos_ptr, c0, c1, LISTED)
    num_tiles = tl.cdiv(count, BLOCK_M)
    tiles_per_part = tl.cdiv(num_tiles, tl.num_programs(1))
    NF: tl.constexpr = FC_CEIL // FC_BLK
    tap = pid // NF
    f0 = (pid - tap * NF) * FC_BLK
    ky = tap // 3
    kx = tap - ky * 3
    offs_f = f0 + tl.arange(0, FC_BLK)
    fmask = offs_f < FC
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    if DEPTHWISE:
        ch = (offs_f // F).to(tl.int64) * s_c  # output channel o reads input channel o // F
        chmask = fmask
        acc_d = tl.zeros([FC_BLK], dtype=tl.float32)
    else:
        ch = offs_c.to(tl.int64) * s_c
        chmask = cmask
        acc = tl.zeros([FC_BLK, C_PAD], dtype=tl.float32)
    t0 = part * tiles_per_part
    for tile in range(t0, tl.minimum(t0 + tiles_per_part, num_tiles)):
        pos = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = pos < count
        offs_m = _walked_cells(idx_ptr, start, pos, rows, c0, LISTED)
        # every walked cell's dQ row is written (0 where it does not fire); an idle cell's
        # shifted state is not read (a NaN there would make 0 * NaN)
        fires = _walked_firing(rows, offs_m, c0, seed_lo, seed_hi, step_lo, threshold, LISTED)
        b, y, xx = _cell_coords(offs_m, H, W)
        dq = tl.load(wq_ptr + (offs_m.to(tl.int64) * WQ)[:, None] + offs_f[None, :],
                     mask=rows[:, None] & fmask[None, :], other=0.0).to(tl.float32)
        ny, vy = _pad_index(y + (ky - 1), H, PAD)
        nx, vx = _pad_index(xx + (kx - 1), W, PAD)
        off = b.to(tl.int64) * s_b + ny.to(tl.int64) * s_h + nx.to(tl.int64) * s_w
        t = tl.load(x_ptr + off[:, None] + ch[None, :], mask=(fires & vy & vx)[:, None] & chmask[None, :],
                    other=0.0).to(tl.float32)
        if DEPTHWISE:
            acc_d += tl.sum(dq * t, axis=0)
        else:
            # a bfloat16 dQ is exact in TF32: one product (EXACT has no bfloat16 bits here)
            acc = _mm(tl.trans(dq), t, acc, DOT_PREC, EXACT, _EX_DQ, _EX_STATE)
    if DEPTHWISE:  # partial layout [9, FC_CEIL]
        p_d = dpw_ptr + part.to(tl.int64) * (9 * FC_CEIL) + tap * FC_CEIL + offs_f
        tl.store(p_d, tl.load(p_d) + acc_d)
    else:  # partial layout [9, FC_CEIL, C_PAD]
        p_w = (dpw_ptr + part.to(tl.int64) * (9 * FC_CEIL * C_PAD) + tap * FC_CEIL * C_PAD
               + offs_f[:, None] * C_PAD + offs_c[None, :])
        tl.store(p_w, tl.load(p_w) + acc)


@triton.jit
def _fc_grad_tile(act_ptr, out_ptr, p0, p1, A0: tl.constexpr, A_VALID, B0: tl.constexpr, B_VALID,
                  OUT_W: tl.constexpr, ta, tb, TA: tl.constexpr, TB: tl.constexpr, A_ROW: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr):
    """out[ta-th TA rows, tb-th TB columns] (row width OUT_W) += sum over act rows p0..p1
    of act[:, A0 + a]^T act[:, B0 + b]: one tile of one weight gradient over one range of
    the walked cells. Columns a >= A_VALID / b >= B_VALID are read as zero (never written
    by the cell kernel)."""
    offs_a = ta * TA + tl.arange(0, TA)
    offs_b = tb * TB + tl.arange(0, TB)
    amask = (offs_a < A_VALID)[None, :]
    bmask = (offs_b < B_VALID)[None, :]
    acc = tl.zeros([TA, TB], dtype=tl.float32)
    for k0 in range(p0, p1, BLOCK_K):
        pos = k0 + tl.arange(0, BLOCK_K)
        rows = (pos < p1)[:, None]
        row = act_ptr + (pos.to(tl.int64) * A_ROW)[:, None]
        a = tl.load(row + A0 + offs_a[None, :], mask=rows & amask, other=0.0)
        b = tl.load(row + B0 + offs_b[None, :], mask=rows & bmask, other=0.0)
        if HALF_DOT:  # half operands: exact products, float32 sums (as PyTorch for half tensors)
            acc = tl.dot(tl.trans(a), b, acc)
        else:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision=DOT_PREC)
    p = out_ptr + offs_a[:, None] * OUT_W + offs_b[None, :]
    tl.store(p, tl.load(p) + acc)


@triton.jit(do_not_specialize=["c0", "c1"])
def _nca_step_backward_fc_kernel(
    act_ptr, part_ptr, pos_ptr, c0, c1, SLOT, C,
    LISTED: tl.constexpr, C_PAD: tl.constexpr, HID_PAD: tl.constexpr, FC_CEIL: tl.constexpr,
    TH: tl.constexpr, TC: tl.constexpr, TF: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr,
):
    """The fc weight gradients of FASTNCA_TRITON_NCA_BWD_ACC=gemm, as split-K GEMMs over
    the walked cells (listed, or every cell) from the rows the cell kernel wrote to `act`:
    d_w1a = dz^T x, d_w1b = dz^T conv, d_w2 = gd^T h. Axis 0: one output tile of one of
    the three; axis 1: one of an even split of the rows 0..count (in device memory),
    whose sum is added to slot row `part` of the cell kernel's partials (same layout; the
    cell kernel adds only bias partials there in this mode): deterministic, no atomics."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    _, count = _cell_range(pos_ptr, c0, c1, LISTED)
    per = tl.cdiv(tl.cdiv(count, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    p0 = part * per
    p1 = tl.minimum(p0 + per, count)
    d_w1a, d_w1b, _, d_w2, _, _ = _program_slot(part_ptr, part.to(tl.int64) * SLOT, C_PAD, HID_PAD, FC_CEIL)
    # the cell kernel's act row layout
    A_H: tl.constexpr = HID_PAD
    A_GD: tl.constexpr = 2 * HID_PAD
    A_X: tl.constexpr = 2 * HID_PAD + C_PAD
    A_CV: tl.constexpr = 2 * HID_PAD + 2 * C_PAD
    A_ROW: tl.constexpr = 2 * HID_PAD + 2 * C_PAD + FC_CEIL
    NH: tl.constexpr = HID_PAD // TH
    NC: tl.constexpr = C_PAD // TC
    NF: tl.constexpr = FC_CEIL // TF
    if pid < NH * NC:  # d_w1a [HID_PAD, C_PAD]
        _fc_grad_tile(act_ptr, d_w1a, p0, p1, 0, HID_PAD, A_X, C, C_PAD, pid // NC, pid % NC,
                      TH, TC, A_ROW, BLOCK_K, DOT_PREC, HALF_DOT)
    elif pid < NH * (NC + NF):  # d_w1b [HID_PAD, FC_CEIL]
        q = pid - NH * NC
        _fc_grad_tile(act_ptr, d_w1b, p0, p1, 0, HID_PAD, A_CV, FC_CEIL, FC_CEIL, q // NF, q % NF,
                      TH, TF, A_ROW, BLOCK_K, DOT_PREC, HALF_DOT)
    else:  # d_w2 [C_PAD, HID_PAD]
        q = pid - NH * (NC + NF)
        _fc_grad_tile(act_ptr, d_w2, p0, p1, A_GD, C, A_H, HID_PAD, HID_PAD,
                      q // NH, q % NH, TC, TH, A_ROW, BLOCK_K, DOT_PREC, HALF_DOT)


@triton.jit
def _readers(s, n, rows, PAD: tl.constexpr):
    """Inverse neighbourhood along one axis: the output coordinates that read source
    coordinate s through tap k (offset k - 1). In-grid reader d_k = s - (k - 1); for
    k = 0 / 2 also the border reader e = 0 / n-1, whose OUT-of-grid read (-1 / n) the
    padding maps onto s (never for zeros). On tiny grids several readers (and several
    taps of one reader) can hit the same source: each is a separate read, all are summed.
    Returns (d0, d1, d2, e0, e2) and their validity (dv0, dv1, dv2, ev0, ev2)."""
    zero = tl.zeros_like(s)
    lo, lo_ok = _pad_index(zero - 1, n, PAD)
    hi, hi_ok = _pad_index(zero + n, n, PAD)
    return (s + 1, s, s - 1, zero, zero + (n - 1),
            rows & (s + 1 < n), rows, rows & (s >= 1), rows & lo_ok & (s == lo), rows & hi_ok & (s == hi))


@triton.jit
def _gather_one(wq_ptr, cell, valid, cols, cm, WQ: tl.constexpr):
    """wq[cell, cols] (dQ, in the workspace's dtype) where the reader cell exists (the
    launcher zeroes the dQ workspace first: a reader that does not fire contributes 0, with
    no fire-bit load in front of the gather)."""
    return tl.load(wq_ptr + (cell * WQ)[:, None] + cols[None, :], mask=valid[:, None] & cm, other=0.0)


@triton.jit
def _gather_tap(wq_ptr, yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge, cols, colmask, WQ: tl.constexpr,
                PAD: tl.constexpr):
    """Sum of ws[cell, cols] over the (up to 2 x 2) cells that read this source cell through
    one tap; yd/yb are cell-row bases ((b*H + q)*W), xd/xb column coordinates. The border
    readers (yb / xb) are gathered only where some cell of the tile has one for this tap
    (y_edge / x_edge, scalars): elsewhere their masks are all false, and the branch saves
    their address arithmetic and predicated loads (the kernel is instruction-bound)."""
    cm = colmask[None, :]
    acc = _gather_one(wq_ptr, yd + xd, yv & xv, cols, cm, WQ).to(tl.float32)
    if PAD != 0:  # zeros padding has no border readers
        if x_edge:
            acc += _gather_one(wq_ptr, yd + xb, yv & xbv, cols, cm, WQ).to(tl.float32)
        if y_edge:
            acc += _gather_one(wq_ptr, yb + xd, ybv & xv, cols, cm, WQ).to(tl.float32)
            if x_edge:
                acc += _gather_one(wq_ptr, yb + xb, ybv & xbv, cols, cm, WQ).to(tl.float32)
    return acc


@triton.jit
def _tap_readers(ky, kx, yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2, xd0, xd1, xd2, xb0, xb2,
                 xv0, xv1, xv2, xbv0, xbv2, ye0, ye2, xe0, xe2):
    """The readers of tap (ky, kx) from _readers' per-axis ones: the in-grid reader (row
    base yd, column xd, valid yv & xv), the border readers (yb, xb; valid ybv, xbv; none
    for the centre row / column), and whether the tile has any (y_edge, x_edge)."""
    yd = tl.where(ky == 0, yd0, tl.where(ky == 1, yd1, yd2))
    yv = tl.where(ky == 0, yv0, tl.where(ky == 1, yv1, yv2))
    yb = tl.where(ky == 0, yb0, yb2)
    ybv = tl.where(ky == 0, ybv0, tl.where(ky == 1, False, ybv2))
    xd = tl.where(kx == 0, xd0, tl.where(kx == 1, xd1, xd2))
    xv = tl.where(kx == 0, xv0, tl.where(kx == 1, xv1, xv2))
    xb = tl.where(kx == 0, xb0, xb2)
    xbv = tl.where(kx == 0, xbv0, tl.where(kx == 1, False, xbv2))
    y_edge = ((ky == 0) & ye0) | ((ky == 2) & ye2)
    x_edge = ((kx == 0) & xe0) | ((kx == 2) & xe2)
    return yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge


@triton.jit
def _input_tap(acc, w, ky, kx, wq_ptr, yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2,
               xd0, xd1, xd2, xb0, xb2, xv0, xv1, xv2, xbv0, xbv2, ye0, ye2, xe0, xe2, cols, colmask,
               WQ: tl.constexpr, PAD: tl.constexpr, DOT_PREC: tl.constexpr, EXACT: tl.constexpr,
               HALF_DQ: tl.constexpr):
    """acc + (dQ gathered over the readers of tap (ky, kx)) @ w, w = pw[:, :, tap]^T
    [FC_BLK, C_PAD]; ky, kx runtime values or constants (then the selects fold). HALF_DQ
    (a bfloat16 dQ workspace, _half_dq): the gathered tiles stay bfloat16 into the dot (a
    bfloat16 dot with bfloat16 weights, else one TF32 product), one dot per reader, since a
    sum of two readers' values is no longer a bfloat16 value; only edge tiles have more
    than one reader a tap."""
    yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge = _tap_readers(
        ky, kx, yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2, xd0, xd1, xd2, xb0, xb2, xv0, xv1, xv2,
        xbv0, xbv2, ye0, ye2, xe0, xe2)
    if HALF_DQ:
        cm = colmask[None, :]
        acc = _mm(_gather_one(wq_ptr, yd + xd, yv & xv, cols, cm, WQ), w, acc, DOT_PREC, EXACT, _EX_DQ, _EX_PW)
        if PAD != 0:
            if x_edge:
                acc = _mm(_gather_one(wq_ptr, yd + xb, yv & xbv, cols, cm, WQ), w, acc, DOT_PREC, EXACT,
                          _EX_DQ, _EX_PW)
            if y_edge:
                acc = _mm(_gather_one(wq_ptr, yb + xd, ybv & xv, cols, cm, WQ), w, acc, DOT_PREC, EXACT,
                          _EX_DQ, _EX_PW)
                if x_edge:
                    acc = _mm(_gather_one(wq_ptr, yb + xb, ybv & xbv, cols, cm, WQ), w, acc, DOT_PREC, EXACT,
                              _EX_DQ, _EX_PW)
        return acc
    else:
        gq = _gather_tap(wq_ptr, yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge, cols, colmask, WQ, PAD)
        return _mm(gq, w, acc, DOT_PREC, EXACT, _EX_BWD, _EX_PW)


@triton.jit
def _pw_tap_t(pw_ptr, tap, offs_c, offs_f, C_PAD: tl.constexpr, FC_CEIL: tl.constexpr):
    """pw[o, c, tap] as [FC_BLK, C_PAD] (the input kernel's operand for one tap; tap a
    constant or a runtime value)."""
    return tl.load(pw_ptr + tap * C_PAD * FC_CEIL + offs_c[None, :] * FC_CEIL + offs_f[:, None])


@triton.jit
def _nca_step_backward_input_kernel(
    ws_ptr, wq_ptr, pw_ptr, whpw_ptr, dx_ptr, fire_ptr, g_ptr, N, H, W, d_b, d_c, d_h, d_w, g_b, g_c, g_h, g_w,
    C: tl.constexpr, F: tl.constexpr, FC: tl.constexpr, FC_LOOP: tl.constexpr,
    C_PAD: tl.constexpr, FC_BLK: tl.constexpr, FC_CEIL: tl.constexpr,
    DEPTHWISE: tl.constexpr, PAD: tl.constexpr, DOT_PREC: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, K1: tl.constexpr, WQ: tl.constexpr, HALF_DQ: tl.constexpr,
    HALF_W: tl.constexpr, LISTED: tl.constexpr,
):
    """d_state = (g + dP_x) + conv_transpose(dQ) with the padding adjoint, by gathering
    dQ from the readers of each source cell (no atomics; the dQ of a reader that does not
    fire is the launcher's zero fill, or LISTED false the cell kernel's zero). A cell that
    does not fire has dP_x = 0: its direct term is g itself (LISTED: the cell kernel does
    not write its g + dP_x columns; else it writes g there).
    whpw: the pw segment of the bfloat16 weight copy (HALF_W), read where the taps are
    bfloat16 dots."""
    pw_ptr = _weight_src(pw_ptr, whpw_ptr, 0, HALF_W, EXACT, _EX_DQ, _EX_PW)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < N
    b, y, xx = _cell_coords(offs_m, H, W)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    io_mask = rows[:, None] & cmask[None, :]
    ws_tile = ws_ptr + offs_m.to(tl.int64)[:, None] * K1 + offs_c[None, :]
    if LISTED:  # the cell kernel wrote the rows of the firing cells only
        fires = (tl.load(fire_ptr + offs_m, mask=rows, other=0) != 0)[:, None]
        acc = tl.load(ws_tile, mask=io_mask & fires, other=0.0)
        g_row = b.to(tl.int64) * g_b + y.to(tl.int64) * g_h + xx.to(tl.int64) * g_w
        acc += tl.load(g_ptr + g_row[:, None] + offs_c.to(tl.int64)[None, :] * g_c, mask=io_mask & ~fires,
                       other=0.0).to(tl.float32)
    else:  # every cell's row: g + dP_x, or g where the cell does not fire
        acc = tl.load(ws_tile, mask=io_mask, other=0.0)

    cb = b.to(tl.int64) * H
    yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2 = _readers(y, H, rows, PAD)
    yd0 = (cb + yd0) * W  # cell-row bases
    yd1 = (cb + yd1) * W
    yd2 = (cb + yd2) * W
    yb0 = (cb + yb0) * W
    yb2 = (cb + yb2) * W
    xd0, xd1, xd2, xb0, xb2, xv0, xv1, xv2, xbv0, xbv2 = _readers(xx, W, rows, PAD)
    # Whether any cell of this tile has a border reader, per side (scalars): most tiles
    # have none along y, and a strip of a row reaches at most one x border.
    ye0 = tl.max(ybv0.to(tl.int32), axis=0) > 0
    ye2 = tl.max(ybv2.to(tl.int32), axis=0) > 0
    xe0 = tl.max(xbv0.to(tl.int32), axis=0) > 0
    xe2 = tl.max(xbv2.to(tl.int32), axis=0) > 0
    for f0 in range(0, FC_LOOP, FC_BLK):  # depthwise: FC_LOOP = 1, one pass over all taps
        offs_f = f0 + tl.arange(0, FC_BLK)
        fmask = offs_f < FC
        for tap in range(9):  # runtime loop: see _conv_chunk
            ky = tap // 3
            kx = tap - ky * 3
            if DEPTHWISE:
                yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge = _tap_readers(
                    ky, kx, yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2, xd0, xd1, xd2, xb0, xb2,
                    xv0, xv1, xv2, xbv0, xbv2, ye0, ye2, xe0, xe2)
                for f in tl.static_range(F):
                    o = offs_c * F + f  # the output channels that read input channel c
                    gq = _gather_tap(wq_ptr, yd, yv, yb, ybv, xd, xv, xb, xbv, y_edge, x_edge, o, cmask,
                                     WQ, PAD)
                    acc += gq * tl.load(pw_ptr + tap * FC_CEIL + o, mask=cmask,
                                        other=0.0).to(tl.float32)[None, :]
            else:
                w = _pw_tap_t(pw_ptr, tap, offs_c, offs_f, C_PAD, FC_CEIL)
                acc = _input_tap(acc, w, ky, kx, wq_ptr, yd0, yd1, yd2, yb0, yb2, yv0, yv1, yv2, ybv0, ybv2,
                                 xd0, xd1, xd2, xb0, xb2, xv0, xv1, xv2, xbv0, xbv2, ye0, ye2, xe0, xe2,
                                 offs_f, fmask, WQ, PAD, DOT_PREC, EXACT, HALF_DQ)
    db = b.to(tl.int64) * d_b + y.to(tl.int64) * d_h + xx.to(tl.int64) * d_w
    tl.store(dx_ptr + db[:, None] + offs_c.to(tl.int64)[None, :] * d_c,
             acc.to(dx_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
# Channel chunks: every weight operand of a dot stays <= _DOT_TILE fp32 elements (16 KB;
# tf32x3 stages a second, "small" copy): large rules (C=128, hidden=256) then fit in
# shared memory and the per-chunk partial-grad tiles in registers. Small rules
# (C <= 32, hidden <= 128) run in one chunk.
_DOT_TILE = 4096
_PARTIAL_BUDGET = 256 << 20  # bytes of backward weight-grad partials (all programs)
_limits: dict = {}
# Shared memory one block may opt in to, by compute capability, for torch builds whose
# device properties do not report it.
_SMEM_OPTIN = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024}


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, opt-in shared memory bytes per block) of a CUDA device."""
    if device.index not in _limits:
        props = torch.cuda.get_device_properties(device)
        # torch's property (>= 2.7) or the CUDA module's query, as backend selection reads it;
        # without either, by architecture
        smem = _backend._cuda_smem_limit(device.index) or _SMEM_OPTIN.get((props.major, props.minor), 99 * 1024)
        _limits[device.index] = (props.multi_processor_count, smem)
    return _limits[device.index]


# Under TRITON_INTERPRET=1 the cost is per interpreted op, not per element: big strips,
# few programs (still > 1 tile per backward program, so the persistent loop is tested).
_INTERPRET_BLOCK_M, _INTERPRET_PROGRAMS = 256, 3


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _dot_precision(device: torch.device) -> str:
    """fp32 matmul mode. "tf32x3" (3 TF32 tensor-core products, fp32-level error: ~4e-7
    max-norm relative at K=512 in a CPU emulation, same as plain fp32) on sm_80+. "ieee"
    (FMA) compiled to 32 registers + KBs of spills for the C=16, hidden=128 rule on sm_90a
    (ptxas, triton 3.9), so it is only the fallback. "tf32" when the user allowed TF32
    matmuls (torch.backends.cuda.matmul.allow_tf32), like torch."""
    if device.type != "cuda" or interpreting():
        return "ieee"  # interpreter: numpy fp32
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return fp32_dot_precision(device)


def _tile_dims(C: int, FC: int, hid: int) -> tuple[int, int, int, int, int]:
    """(C_PAD, HID_PAD, C_BLK, FC_BLK, FC_CEIL) of a rule: see the module docstring."""
    c_pad, hid_pad = _pow2(C), _pow2(hid)
    c_blk = min(c_pad, max(16, _DOT_TILE // hid_pad))
    fc_blk = min(_pow2(FC), 64, max(16, 2 * _DOT_TILE // hid_pad))
    return c_pad, hid_pad, c_blk, fc_blk, cdiv(FC, fc_blk) * fc_blk


_HALF = (torch.float16, torch.bfloat16)
# EXACT bits by operand family, for the host (the kernels' _EX_* constants)
_EXACT_BITS = dict(state=_EX_STATE.value, grad=_EX_GRAD.value, pw=_EX_PW.value, w1=_EX_W1.value, dq=_EX_DQ.value,
                   w2=_EX_W2.value)


def _exact_bits(prec: str, dtypes: dict) -> int:
    """_tagged_bits of the families, where half weights count only beside a half state.

    Under a float32 state, half weights are not tagged: with them tagged, the backward's
    d_state was off by a relative 1.9e-3 against float64 on an H100 (bf1a97b) and an H200
    (220af96) for the Med-NCA rule, float32 state, bfloat16 weights. Not found why: the
    same with every input-gradient tile; tf32 MMAs throughout in the PTX of triton 3.6 and
    3.9; not reproduced by the interpreter's TF32 emulation (3e-7), where dropping the low
    part of every backward weight product gives 1.2e-3, not 1.9e-3. Untagged, the weights
    (arranged in float32) make the kernels of a float32 rule, which the GPU tests pass at
    the float32 tolerance. A half state keeps them tagged: its outputs round at 2^-9
    (bfloat16) or 2^-11 (float16), and the GPU tests of those pass."""
    if dtypes.get("state") not in _HALF:
        dtypes = {n: t for n, t in dtypes.items() if n not in ("pw", "w1", "w2")}
    return _tagged_bits(prec, dtypes)


def _tagged_bits(prec: str, dtypes: dict) -> int:
    """The EXACT constexpr of the kernels: under tf32x3, a bit per operand family whose
    tensor is float16 / bfloat16 (values exact in TF32: 8 / 11 significant bits, exponents
    within fp32's), so that _mm spends one TF32 product on exact x exact and two on exact x
    fp32 instead of tf32x3's three, with tf32x3's result. Also, shifted by _BF16_SHIFT, a bit
    per bfloat16 family: _mm multiplies two of them as one bfloat16 dot (exact products,
    float32 sums; FASTNCA_TRITON_NCA_BF16_DOTS=0 turns it off). The default since the H200
    (220af96) and H100 (dd6c6c4) runs: a Med-NCA bf16 step 0.27 / 2.68 ms fwd / fwd+bwd in
    graph replay against 0.38 / 2.95, rollout training 225 against 230 ms, and its GPU tests
    passed at the float32 tolerance. Only operands loaded from bfloat16 tensors take it: the
    withdrawn "all" mode, which also rounded computed (MMA-output) operands, broke on Hopper. 0 for other precisions, or with
    FASTNCA_TRITON_NCA_EXACT=0 (every product tf32x3, for comparison)."""
    knob = _knob01("FASTNCA_TRITON_NCA_EXACT")
    # (FASTNCA_TRITON_NCA_BF16_DOTS=all, every dot in bfloat16, was withdrawn: wrong results
    # and an illegal memory access on an H100; benchmarks/README.md, sixth run)
    bf16 = _knob01("FASTNCA_TRITON_NCA_BF16_DOTS")
    if prec != "tf32x3" or knob == "0":
        return 0
    bits = sum(bit for name, bit in _EXACT_BITS.items() if dtypes.get(name) in _HALF)
    if _bwd_tf32(dtypes):
        bits += _EX_BWD.value
    if bf16 != "0" and (_INTERPRETER_BF16_DOTS or not interpreting()):
        bits += sum(bit << _BF16_SHIFT.value for name, bit in _EXACT_BITS.items()
                    if dtypes.get(name) == torch.bfloat16)
    return bits


def _bf16_rule(dtypes: dict) -> bool:
    """State and the three weight matrices bfloat16: every result of the rule's kernels is."""
    return all(dtypes.get(n) == torch.bfloat16 for n in ("state", "pw", "w1", "w2"))


def _bwd_tf32(dtypes: dict) -> bool:
    """Whether the backward's gradient-only products with a computed operand (_EX_BWD) take
    one TF32 product instead of a hi + lo split: where every result they feed is bfloat16
    (state, pw, w1 and w2 bfloat16; FASTNCA_TRITON_NCA_BWD_TF32=0 keeps the split). TF32
    keeps 11 significant bits of dz, h and the conv tile, eager bfloat16 autograd 8 (it
    stores them in bfloat16), and the gradients round to 8 when stored. The forward and its
    recompute keep float32-accurate products, so the ReLU pattern is the forward's. In the
    Med-NCA cell kernel this halves the backward's TF32 MMAs (d_w1b: three products to
    one). Float16 (11 bits stored) keeps the split. On a CPU (interpreter with TF32 dots)
    every gradient's error against float64 stays within eager bfloat16's (tests)."""
    return _knob01("FASTNCA_TRITON_NCA_BWD_TF32") != "0" and _bf16_rule(dtypes)


def _half_weights(dtypes: dict) -> bool:
    """Whether the rule keeps a bfloat16 copy of its arranged weights for the kernels'
    bfloat16 dots (_weight_src): state, pw, w1 and w2 bfloat16 and bfloat16 dots on
    (FASTNCA_TRITON_NCA_HALF_WEIGHTS=0 turns it off; benchmark row `fp32-weights`). Those
    dots (the conv, fc1's state part and dh = gd W2: 29% of the weight bytes of the Med-NCA
    backward cell kernel) then read their weights in half the bytes, without a conversion
    in the kernel. The weights are staged again at every tile: ~185 KB of float32 a 16-cell
    tile of the cell kernel (Med-NCA rule), ~11 KB a cell from L2. With the copy, dense
    rules of one conv chunk also run the conv as an im2col dot (_conv_chunk) instead of a
    loop over the 9 taps. sm_90 compile, Med-NCA rule, instructions a tile (static, plus
    the tap loop's extra trips): forward 3784 -> 3136 at 64 rows (255 registers against
    217, no spills either way); default cell kernel 2395 -> 1832 at 16 rows, stack 672 ->
    608 bytes. The default since the H200 run at 109ac01 (Med-NCA rule, bf16, B=8,
    256x256): backward kernels 1.45 against 1.75 ms, a 64-step rollout's training 134
    against 158 ms (scripts/nca_backward_variants.py, 2 interleaved rounds), a step's
    fwd+bwd 1.50 against 1.85 ms replayed from a CUDA graph; its GPU tests passed. Where
    bfloat16 dots do not run (another precision, the interpreter without a test's bfloat16
    dots), the kernels read the float32 weights and the copy goes unused."""
    return (_knob01("FASTNCA_TRITON_NCA_HALF_WEIGHTS") != "0" and _knob01("FASTNCA_TRITON_NCA_BF16_DOTS") != "0"
            and _bf16_rule(dtypes))


def _half_dq(state_dtype: torch.dtype, pw_dtype: torch.dtype) -> bool:
    """Whether the backward keeps dQ, the gradient of the perception conv's output, in a
    bfloat16 workspace of its own: where both results computed from it, d_state and d_pw,
    are bfloat16 themselves (FASTNCA_TRITON_NCA_HALF_DQ=0 keeps it in float32). Eager
    bfloat16 autograd holds that gradient in bfloat16 too. Float32 weights beside a
    bfloat16 state (master weights) keep a float32 dQ, and their d_pw float32 accuracy.
    The input kernel then gathers half the bytes and multiplies them by the bfloat16
    weights in one bfloat16 dot, where a float32 dQ took two TF32 products; the
    conv-gradient kernel takes one TF32 product instead of two. Untimed; on a CPU the
    gradients' error against float64 stays within eager bfloat16's (tests)."""
    return _knob01("FASTNCA_TRITON_NCA_HALF_DQ") != "0" and state_dtype == torch.bfloat16 and pw_dtype == torch.bfloat16


# The Triton interpreter multiplies bfloat16 dot operands as raw bits: bfloat16 dots stay
# off there unless a test supplies a correct dot (tests/test_nca_step_triton.py, tf32_dots).
_INTERPRETER_BF16_DOTS = False


class _Rule:
    """The rule's weights re-laid out for the kernels, and the constexpr sizes."""

    def __init__(self, state, pw, pb, w1, b1, w2, b2, groups, padding, frozen):
        if state.dtype not in _SUPPORTED:
            raise TypeError(f"triton nca_step supports float32, float16 and bfloat16 states, got {state.dtype}")
        B, C, H, W = state.shape
        problem = _backend.nca_unsupported("triton", C=C, F=pw.shape[0] // max(C, 1), hidden=w1.shape[0],
                                           depthwise=groups != 1, cells=B * H * W, height=H, width=W)
        if problem:  # NCA_LIMITS["triton"]; tile positions (int32) run up to a tile past the last cell
            raise ValueError(f"triton nca_step: {problem}")
        dev = self.device = state.device
        self.dtypes = dict(state=state.dtype, pw=pw.dtype, w1=w1.dtype, w2=w2.dtype,
                           dq=torch.bfloat16 if _half_dq(state.dtype, pw.dtype) else torch.float32)
        FC, hid = pw.shape[0], w1.shape[0]
        self.C, self.F, self.FC, self.HID, self.FROZEN = C, FC // C, FC, hid, frozen
        self.C_PAD, self.HID_PAD, self.C_BLK, self.FC_BLK, self.FC_CEIL = _tile_dims(C, FC, hid)
        # one channel chunk and one conv chunk (register partials, the hidden-chunk kernels)
        self.ONE_CHUNK = self.C_BLK == self.C_PAD and self.FC_BLK == self.FC_CEIL
        self.DEPTHWISE = groups != 1  # C == 1 with groups == 1 == C takes the dense path
        self.PAD = _ext.PADDING_CODES[padding]
        # One flat layout for the arranged weights and, in the backward, for each
        # program's partial-grad slot: [w1a | w1b | b1 | w2 | b2 | pw | pb].
        cp, hp, fcc = self.C_PAD, self.HID_PAD, self.FC_CEIL
        self.sizes = (cp * hp, fcc * hp, hp, hp * cp, cp, 9 * fcc * (1 if self.DEPTHWISE else cp), fcc)
        self.SLOT = sum(self.sizes)  # every size is a multiple of 16: aligned segments
        buf = torch.empty(self.SLOT, dtype=torch.float32, device=dev)
        # the bfloat16 copy of the same layout that bfloat16 dots read (_half_weights)
        self.HALF_W = _half_weights(self.dtypes)
        wh = torch.empty(self.SLOT, dtype=torch.bfloat16, device=dev) if self.HALF_W else buf
        with on_device(dev):
            _nca_step_arrange_kernel[(cdiv(self.SLOT, 1024),)](
                buf, wh, pw, pb, w1, b1, w2, b2, *pw.stride(), *pb.stride(), *w1.stride(), *b1.stride(),
                *w2.stride(), *b2.stride(), frozen, C=C, FC=FC, HID=hid, C_PAD=cp, HID_PAD=hp,
                FC_CEIL=fcc, DEPTHWISE=self.DEPTHWISE, HALF_W=self.HALF_W, BLOCK=1024)
        # the kernels' weight arguments: the 7 float32 segments, then the bfloat16 copy
        self._weights = (*self.split(buf), wh)
        self._buf = buf
        self.half_pw = self.split(wh)[5]  # the input-gradient kernel's pw, for its bfloat16 dots
        self._cx = None  # constexprs(), made at the first call
        self._forward: dict = {}  # forward_setup(), by (compact, ch_contig)

    def split(self, flat):
        """Views of the 7 segments of ``flat`` [..., SLOT] (w1a, w1b, b1, w2, b2, pw, pb)."""
        return flat.split(self.sizes, dim=-1)

    def weights(self):
        """w1at, w1bt, b1p, w2t, b2p, pwt, pbp (float32), wh (their bfloat16 copy, or the
        float32 buffer itself without HALF_W)."""
        return self._weights

    def kernel_weights(self):
        """(the float32 buffer, wh): the nca kernels' two weight arguments, whose segments
        they derive (_weight_segments)."""
        return self._buf, self._weights[7]

    def constexprs(self):
        """The kernels' shared constexpr keywords (a new dict), the knobs read at the first
        call: a rule lives for one op (nca_step's call, or every step of nca_rollout's)."""
        if self._cx is None:
            prec = _dot_precision(self.device)
            self._cx = dict(C=self.C, F=self.F, FC=self.FC, HID=self.HID,
                            C_PAD=self.C_PAD, HID_PAD=self.HID_PAD, C_BLK=self.C_BLK, FC_BLK=self.FC_BLK,
                            FC_CEIL=self.FC_CEIL, DEPTHWISE=self.DEPTHWISE, PAD=self.PAD,
                            DOT_PREC=prec, EXACT=_exact_bits(prec, self.dtypes), HALF_W=self.HALF_W)
        return dict(self._cx)

    def forward_setup(self, compact: bool, ch_contig: bool):
        """(constexpr keywords, pinned tile) of the forward kernel, the knobs read once per
        rule (constexprs); ``ch_contig``: the state's channels are contiguous (CH_CONTIG)."""
        setup = self._forward.get((compact, ch_contig))
        if setup is None:
            cx = dict(self.constexprs(), COMPACT=compact, HC=_forward_hidden_chunk(self), CH_CONTIG=ch_contig)
            setup = self._forward[(compact, ch_contig)] = (cx, _pinned_forward_tile())
        return setup


def prepare(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen):
    """The rule arranged once for many steps (nca_rollout): pass it as ``prepared``."""
    return _common.Prepared(_Rule(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen),
                            state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)


# States of at least this many cells run the forward on the firing cells only (fire mask,
# cumsum, list, copy of the idle cells: four more launches, ~30 us of GPU time on an H100,
# against half the MLP work); smaller ones run every cell in one launch. Estimate from the
# H100 runs (not timed at the threshold): the compact step took ~0.38 ms a 524288-cell
# state, ~1.3 ns a firing cell, so compaction saves ~45 us of GPU time at 65536 cells
# (update_prob 0.5) while its launches cost more host time than that (four Python
# launches); 131072 cells save ~85 us. Below, a rollout is launch-bound anyway (the
# Med-NCA training stages run 8 x 64 x 64 = 32768-cell states).
_COMPACT_FORWARD_CELLS = 131072
# The backward walks the listed firing cells of states of at least this many cells, every
# cell of smaller ones: there the cell and conv kernels draw the mask themselves, and a
# cell that does not fire writes g and a zero dQ to the workspace. That saves the mask and
# list launches and the cumsum and dQ zero-fill kernels (on 2 CPU cores ~8 us of Triton's
# launch path a step, scripts/host_cost.py, besides the two PyTorch kernels and their
# Python) at the cost of the MLP backward of the idle cells, as the forward does.
_COMPACT_BACKWARD_CELLS = 131072


def _fire_args(update_prob, seed, step):
    return (seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, _ext.fire_threshold(update_prob))


def forward(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen, prepared=None):
    """Large states: the MLP runs on the firing cells only (about update_prob of them,
    listed on the device) and a copy kernel writes the others; small states: one kernel
    over every cell (see _COMPACT_FORWARD_CELLS)."""
    rule = (_common.arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
            or _Rule(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen))
    B, C, H, W = state.shape
    N = B * H * W
    out = torch.empty_like(state)
    compact = N >= _COMPACT_FORWARD_CELLS
    if compact:
        fires = _fire_mask(B, H, W, update_prob, seed, step, state.device).reshape(N)
        idx, pos = _firing_cells(fires)
        count = pos[-1:]
        copy_m = _INTERPRET_BLOCK_M if interpreting() else 64
        with on_device(state.device):
            _nca_step_copy_idle_kernel[(cdiv(N, copy_m),)](
                state, out, fires.view(torch.uint8), N, H, W, *state.stride(), *out.stride(),
                C_PAD=rule.C_PAD, C=C, BLOCK_M=copy_m)
    else:
        idx = count = out  # placeholders, never read
    args = (state, out, idx, count, *rule.kernel_weights(), N, H, W, *state.stride(), *out.stride(),
            *_fire_args(update_prob, seed, step), frozen)
    cx, pinned = rule.forward_setup(compact, state.stride(1) == 1)
    if pinned is not None:  # no tuning runs
        block_m, warps, stages, regs = pinned
        with on_device(state.device), _pinned_fit("FASTNCA_TRITON_NCA_FWD_TILE"):
            _nca_step_forward_kernel[(cdiv(N, block_m),)](*args, **cx, BLOCK_M=block_m,
                                                          **_launch_kw(warps, stages, regs))
    else:
        with on_device(state.device):
            grid = lambda meta: (cdiv(N, meta["BLOCK_M"]),)  # noqa: E731
            _forward_autotuned()[grid](*args, **cx)
    return out


def _forward_hidden_chunk(rule: _Rule) -> int:
    """HC of the forward kernel: FASTNCA_TRITON_NCA_FWD_HCHUNK (opt-in, untimed), a power of
    two in 16..256, at most HID_PAD, for rules of one channel and conv chunk (the Med-NCA
    rule); 0 (unset, "0", or other rules) keeps the whole hidden layer of a tile live.
    sm_90 compiles of the Med-NCA rule, bfloat16 (2026-11-28): an NCHW state's
    forward spills 720 / 1920 / 2752 bytes a thread at tiles 32/4, 64/4, 128/8 with triton
    3.9 (48 / 56 / 8 with 3.6, the lent GPUs'); at HC=32 and 64/4, 1216 (3.9) and 0 (3.6).
    A channels_last state (the benchmark's) spills in neither; at 64/4 HC=32 takes 254 ->
    207 registers and 2400 -> 1480 static instructions (3.6; the chunk loop runs 4 times).
    See _forward_hidden_chunks."""
    hc = _chunk_knob("FASTNCA_TRITON_NCA_FWD_HCHUNK", zero_ok=True)
    return min(hc, rule.HID_PAD) if hc and rule.ONE_CHUNK else 0


def _chunk_knob(var: str, zero_ok: bool = False) -> int | None:
    """A hidden-chunk knob's value: None when unset (or "0" with ``zero_ok``: 0), else a power of
    two in 16..256, anything else refused with a ValueError naming ``var``."""
    v = os.environ.get(var, "")
    if not v:
        return None
    if zero_ok and v == "0":
        return 0
    try:
        hc = int(v)
    except ValueError:
        hc = 0
    if hc < 16 or hc & (hc - 1) or hc > 256:
        raise ValueError(f"{var} must be {'0 or ' if zero_ok else ''}a power of two in 16..256, got {v!r}")
    return hc


def _pinned_forward_tile() -> tuple[int, int, int, int] | None:
    """The forward's tile (BLOCK_M, warps, stages, register cap) when it is not autotuned:
    FASTNCA_TRITON_NCA_FWD_TILE=BLOCK_M,WARPS[,STAGES[,REGS]] (a testing and benchmarking
    knob, e.g. to check every autotune candidate on a GPU, or a tile's rows under the
    interpreter), else the interpreter's tile, else 64 rows on 4 warps under
    FASTNCA_TRITON_AUTOTUNE=0; None: autotune. Both knobs are checked in any case."""
    autotune_off = _knob01("FASTNCA_TRITON_AUTOTUNE") == "0"
    pinned = _pinned_tile("FASTNCA_TRITON_NCA_FWD_TILE", _wgmma_safe)
    if pinned:
        return pinned
    if interpreting():
        return _INTERPRET_BLOCK_M, 4, 1, 0
    return (64, 4, 1, 0) if autotune_off else None


_TILE_FORM = "BLOCK_M,WARPS[,STAGES[,REGS]]"


def _pinned_tile(var: str, safe) -> tuple[int, int, int, int] | None:
    """A tile pinned by an environment variable, as (BLOCK_M, warps, stages, register cap):
    FASTNCA_TRITON_NCA_BWD_TILE (the backward cell kernel), FASTNCA_TRITON_NCA_BWD_INPUT_TILE
    (the input-gradient kernel) and FASTNCA_TRITON_NCA_FWD_TILE (the forward), each
    BLOCK_M,WARPS[,STAGES[,REGS]] (benchmarking and testing knobs): BLOCK_M in 16..128, a
    power of two, warps in 1..8, software pipelining stages in 1..4 (default 1), REGS a cap
    on the registers a thread (ptxas .maxnreg, 32..255; 0 or absent: none; see _launch_kw
    and _resident_programs). ``safe(block_m, warps)``: the kernel's warp-group rule
    (_wgmma_safe, _cell_tile_safe); a tile that breaks it is refused. The interpreter takes
    a pinned tile's rows too (its own tile is 256 rows), so CPU tests can run the GPU's
    tiles; it ignores the register cap."""
    v = os.environ.get(var)
    if not v:
        return None
    try:
        block_m, warps, *rest = (int(t) for t in v.split(","))
    except ValueError:
        raise ValueError(f"{var} must be '{_TILE_FORM}', got {v!r}") from None
    if len(rest) > 2:
        raise ValueError(f"{var} must be '{_TILE_FORM}', got {v!r}")
    n_stages = rest[0] if rest else 1
    regs = rest[1] if len(rest) == 2 else 0
    if block_m not in (16, 32, 64, 128) or warps not in (1, 2, 4, 8) or not 1 <= n_stages <= 4 \
            or not (regs == 0 or 32 <= regs <= 255):
        raise ValueError(f"{var}: BLOCK_M in 16/32/64/128, warps in 1/2/4/8, stages in 1..4 and REGS 0 or "
                         f"32..255, got {v!r}")
    if not safe(block_m, warps):
        raise ValueError(f"{var}={block_m},{warps}: a dot of this kernel would get more warp groups than "
                         "64-row blocks (see _wgmma_safe); pick another tile")
    if regs and torch.version.hip is not None:  # Triton's HIP backend has no maxnreg option
        raise ValueError(f"{var}={v}: a register cap (REGS) is an NVIDIA option; on ROCm leave it out")
    return block_m, warps, n_stages, regs


def _launch_kw(warps: int, stages: int, regs: int) -> dict:
    """A kernel's launch keywords for a tile: num_warps, num_stages and, with a register
    cap, maxnreg (ptxas spills what does not fit; Triton >= 3.0 takes it on NVIDIA GPUs, the
    interpreter ignores it)."""
    return dict(num_warps=warps, num_stages=stages, **({"maxnreg": regs} if regs else {}))


def _resident_programs(sms: int, warps: int, regs: int) -> int:
    """The persistent cell kernels' programs under a register cap: as many as the capped
    registers let an SM hold at once (65536 registers an SM, allocated per warp in units of
    256, i.e. a thread's count rounded up to a multiple of 8), within sm_80's and sm_90's
    64 warps and 32 blocks an SM, at least one an SM. A GPU that holds fewer (sm_86 and
    sm_89: 48 warps; shared memory) runs the rest as a second wave: slower, the same sums.
    Uncapped tiles keep 2 an SM: at 255 registers, what 4 warps leave room for. A pure
    function of the tile and the device, as the partial-sum order needs."""
    if not regs:
        return 2 * sms
    per_sm = min(65536 // (cdiv(regs, 8) * 8 * 32 * warps), 64 // warps, 32)
    return max(1, per_sm) * sms


@contextlib.contextmanager
def _pinned_fit(*names: str):
    """Launches at a tile that the variables ``names`` may pin (_pinned_tile), the first of
    them that is set naming it: Triton's OutOfResources of a pinned tile becomes a ValueError
    that names the variable and the bytes (an H200 gives a block 227 KB of shared memory;
    the float32 =chunked cell kernel at 128 rows on 8 warps asks 232 KB). Unpinned tiles
    are the kernels' own choice: their errors pass unchanged."""
    try:
        yield
    except OutOfResources as e:
        var = next((n for n in names if os.environ.get(n)), None)
        if var is None:
            raise
        raise ValueError(f"{var}={os.environ[var]}: the kernel at this tile needs {e.required} bytes of {e.name}, "
                         f"the GPU gives a block {e.limit}; pick a smaller tile") from None


def _backward_tiling(rule: _Rule, device: torch.device, num_cells: int, prec: str = "tf32x3"):
    """(BLOCK_M, num_warps, programs, num_stages, register cap) for the backward with dots of
    precision ``prec``. Not autotuned on purpose: the tile partition fixes the partial-sum
    order, so it must be a pure function of the shapes, the device and the precision for
    grads to be bitwise reproducible across processes. The persistent programs come from
    _resident_programs: 2 an SM, or with a pinned register cap (the 4th field of
    FASTNCA_TRITON_NCA_BWD_TILE) what the SMs hold at once."""
    stages, regs = 1, 0
    pinned = _pinned_tile("FASTNCA_TRITON_NCA_BWD_TILE", functools.partial(_cell_tile_safe, rule))
    if interpreting():
        block_m, warps, programs = _INTERPRET_BLOCK_M, 4, _INTERPRET_PROGRAMS
    else:
        sms, smem = _device_limits(device)
        if _large_rule(rule):
            # dz, h ([BLOCK_M, HID_PAD]) and the [C_PAD, HID_PAD] partial updates dominate.
            # The largest rules (C=128, F=3, hidden=256) take 164 KB of shared memory at
            # BLOCK_M=32 (sm_80/sm_90 compiles): over an A100's 163 KB, so 16 there.
            block_m = 32 if smem >= 200 * 1024 else 16
            warps = 8 if block_m * max(rule.HID_PAD, rule.C_PAD) >= 8192 else 4
            if not _cell_tile_safe(rule, block_m, warps):
                warps = 4
        else:
            # Measured on an H100 (Med-NCA rule, B=8, 256x256, bf16; scripts/
            # nca_backward_variants.py, 2026-11-26): 16 rows on 4 warps 7.3 ms with 3xTF32
            # (64/8: 9.3, 32/8: 9.0, 32/4: 8.1); 32 rows on 4 warps 3.8 ms with TF32 (64/8:
            # 4.4, 32/8: 4.1, 16/4: 4.5). Every kernel sits at 255 registers; narrower
            # tiles spill less.
            block_m, warps = (32 if prec == "tf32" else 16), 4
    if pinned:  # on a GPU and under the interpreter alike
        block_m, warps, stages, regs = pinned
    if not interpreting():
        programs = _resident_programs(sms, warps, regs)
    programs = max(1, min(programs, cdiv(num_cells, block_m), _PARTIAL_BUDGET // (4 * rule.SLOT)))
    return block_m, warps, programs, stages, regs


def _bwd_acc_knob() -> str:
    """FASTNCA_TRITON_NCA_BWD_ACC, checked ('' when unset)."""
    v = os.environ.get("FASTNCA_TRITON_NCA_BWD_ACC", "")
    if v not in ("", "registers", "memory", "mixed", "gemm", "chunked"):
        raise ValueError("FASTNCA_TRITON_NCA_BWD_ACC must be 'registers', 'mixed', 'memory', 'gemm' or 'chunked', "
                         f"got {v!r}")
    return v


# REG_ACC of the backward cell kernels: where the weight-gradient partials are summed.
_ACC_MEMORY, _ACC_REGISTERS, _ACC_MIXED, _ACC_GEMM, _ACC_CHUNKED = 0, 1, 2, 3, 4


def _register_accumulators(rule: _Rule) -> int:
    """REG_ACC of the backward cell kernel: 1 keeps its weight-grad partials in registers,
    for rules of one channel chunk and one conv chunk whose fc partials take at most 16384
    floats (64 registers a thread at 8 warps; the Med-NCA rule is exactly that); 0 reads
    and writes them in memory per tile. FASTNCA_TRITON_NCA_BWD_ACC (benchmarking and
    testing knob): =memory forces 0, =registers asks for 1 where the rule allows, =mixed
    for 2 there (registers except d_w1b: sm_90 compile of the Med-NCA rule, bf16, 16 rows
    on 4 warps: stack 936 -> 616 bytes, 255 registers either way; untimed), =gemm for 3
    on any rule (the fc weight gradients as GEMMs over a workspace of the cells'
    activations, _nca_step_backward_fc_kernel; H100, dd6c6c4, Med-NCA rule, bf16: the
    backward kernels 12% faster than with register partials), =chunked for 4 on rules of
    one channel and conv chunk (the hidden-chunk cell kernel, _nca_step_backward_cell_gemm_kernel,
    with its fc partials read-modify-written in its slot; H200, 109ac01, Med-NCA rule, bf16:
    backward kernels 1.57 ms at 64,4 against the default's 1.75, a 64-step rollout's
    training 137 against 158 ms, both behind half weights' 1.45 and 134), 0 on the others."""
    fits = (rule.ONE_CHUNK
            and rule.HID_PAD * (2 * rule.C_PAD + rule.FC_CEIL) <= 16384)
    v = _bwd_acc_knob()
    if v == "gemm":
        return _ACC_GEMM
    if v == "chunked":
        return _ACC_CHUNKED if rule.ONE_CHUNK else _ACC_MEMORY
    if not fits or v == "memory":
        return _ACC_MEMORY
    return _ACC_MIXED if v == "mixed" else _ACC_REGISTERS


def _takes_hidden_chunks(rule: _Rule, reg_acc: int, gpu: bool) -> bool:
    """Whether the backward's cell kernel is the hidden-chunk one
    (_nca_step_backward_cell_gemm_kernel): under =chunked, and under =gemm on rules of one
    channel and conv chunk, except with a half state on a GPU.
    There, on an H200 (Triton 3.6, 109ac01), =gemm's hidden-chunk kernel gave a wrong
    d_state (relative error 0.75-0.85) in two runs at two tiles (bfloat16, Med-NCA rule,
    40x48: 128,8 with float32 weights, 64,4 with the bfloat16 weight copy; 64,4 with
    float32 weights was right), while =chunked (the same kernel without the activation
    rows) was right at every tile, and the interpreter is right at both. Cause unknown; so
    such a call takes the other cell kernel's =gemm path (REG_ACC 3, the same GEMM weight
    gradients), which passed its GPU tests on rules of several chunks and (with weights
    resident in shared memory, since removed) on this rule; staged on this rule it has not
    run on a GPU yet (a CPU test runs it)."""
    if reg_acc == _ACC_CHUNKED:
        return True
    if reg_acc != _ACC_GEMM or not rule.ONE_CHUNK:
        return False
    return not (gpu and rule.dtypes["state"] in _HALF)


def _large_rule(rule: _Rule) -> bool:
    """Hidden 256 or C 128 (padded): the cell kernel takes its own tile rule, and the input
    and conv kernels take the cell kernel's rows (_backward_tiling, _side_tiles)."""
    return rule.HID_PAD >= 256 or rule.C_PAD >= 128


def _side_tiles(rule: _Rule, device: torch.device, block_m: int, warps: int):
    """((BLOCK_M, warps, stages, register cap) of the input-gradient kernel, BLOCK_M of the
    conv-gradient kernel) given the cell kernel's tile. Stages 1 unless pinned: at 3, the
    sm_90 compile of the Med-NCA rule pipelines the tap loop's gathers with cp.async (72 KB,
    232 registers; untimed). Small rules: 64 rows on 4 warps, one warp group (the
    conv kernel's dot reduces over the rows; the input kernel took 0.27 ms a 65536-cell
    chunk at 64 rows on 8 warps on an H100 against 0.30 at 16/4, but 8 warps on 64 rows
    spread two warp groups over one 64-row dot: _wgmma_safe); large rules and the
    interpreter keep the cell kernel's rows. The conv kernel's dots have 4 warps: always safe."""
    pinned = _pinned_tile("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", _wgmma_safe)
    if interpreting():
        return pinned or (block_m, warps, 1, 0), block_m
    large = _large_rule(rule)
    conv_m = block_m if large else 64
    if pinned:
        return pinned, conv_m
    if large:
        return (block_m, warps, 1, 0), conv_m
    return (64, 4, 1, 0), conv_m


_FC_BLOCK_K = 64  # cells per step of the fc weight-gradient GEMMs' reduction


def _hidden_chunk(rule: _Rule) -> int:
    """HC of _nca_step_backward_cell_gemm_kernel: hidden units a chunk, 32 (at most HID_PAD)
    unless FASTNCA_TRITON_NCA_BWD_HCHUNK pins a power of two in 16..HID_PAD."""
    hc = _chunk_knob("FASTNCA_TRITON_NCA_BWD_HCHUNK")
    return min(32 if hc is None else hc, rule.HID_PAD)


def _hidden_chunk_tiling(rule: _Rule, device: torch.device, num_cells: int, programs: int):
    """(BLOCK_M, warps, programs, stages, register cap) of _nca_step_backward_cell_gemm_kernel:
    half states 64 rows on one warp group (wgmma), float32 ones 32 rows on 4 warps, unless
    FASTNCA_TRITON_NCA_BWD_TILE pins another; programs as the other cell kernel's
    (``programs``), within the tiles. sm_90 compile, Med-NCA rule (untimed): bfloat16 at
    64/4 255 registers + 256 B of stack, at 32/4 231 and none; float32 (tf32x3 products) at
    64/4 720 B of stack, at 32/4 8 B."""
    pinned = _pinned_tile("FASTNCA_TRITON_NCA_BWD_TILE", functools.partial(_cell_tile_safe, rule))
    if interpreting() and not pinned:
        return _INTERPRET_BLOCK_M, 4, programs, 1, 0
    default = (64, 4, 1, 0) if rule.dtypes["state"] in _HALF else (32, 4, 1, 0)
    block_m, warps, stages, regs = pinned or default
    return block_m, warps, max(1, min(programs, cdiv(num_cells, block_m))), stages, regs


def _act_row(rule: _Rule) -> int:
    """The width of the =gemm workspace row the cell kernel writes (its A_ROW)."""
    return 2 * rule.HID_PAD + 2 * rule.C_PAD + rule.FC_CEIL


def _fc_grad_tiles(rule: _Rule, half: bool) -> tuple[dict, int]:
    """(output tile {TH, TC, TF}, programs per cell range) of the fc weight-gradient
    kernel: tiles of at most 128 (half operands) or 64 (float32, whose tf32x3 splits each
    operand in two) hidden x 64 channel / conv rows (<= 64 accumulator registers a thread
    on 4 warps); TF = FC_BLK divides FC_CEIL. sm_90 compile, Med-NCA rule: bfloat16 138
    registers; float32 at 128 hidden rows 255 and 176 bytes of stack."""
    th, tc, tf = min(rule.HID_PAD, 128 if half else 64), min(rule.C_PAD, 64), rule.FC_BLK
    nh, nc, nf = rule.HID_PAD // th, rule.C_PAD // tc, rule.FC_CEIL // tf
    return dict(TH=th, TC=tc, TF=tf), nh * (2 * nc + nf)


def _conv_grad_parts(device: torch.device, programs_per_part: int, num_tiles: int) -> int:
    """Cell ranges of the conv-gradient kernel: about 4 programs per multiprocessor in all
    (2 ranges under the interpreter, so that the reduction over ranges is exercised). A
    pure function of the shapes and the device: it fixes the summation order."""
    if interpreting():
        want = 2
    else:
        want = cdiv(4 * _device_limits(device)[0], programs_per_part)
    return max(1, min(want, num_tiles))


@triton.jit
def _list_firing_kernel(fire_ptr, pos_ptr, idx_ptr, n, BLOCK: tl.constexpr):
    """idx[pos[i] - 1] = i for every firing cell i (pos: inclusive prefix count)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < n
    fires = live & (tl.load(fire_ptr + i, mask=live, other=0) != 0)
    tl.store(idx_ptr + tl.load(pos_ptr + i, mask=fires, other=1) - 1, i, mask=fires)


def _firing_cells(fire):
    """(idx, pos) of a flat bool mask: idx[0..pos[-1]) lists the True positions in ascending
    order (int32), pos is the inclusive prefix count (int32, device memory: no host
    synchronisation); the cells c0..c1 list at idx[pos[c0-1] .. pos[c1-1]) (_list_range).
    8 bytes of temporaries per cell."""
    n = fire.numel()
    pos = torch.cumsum(fire, 0, dtype=torch.int32)
    idx = torch.empty(max(n, 1), dtype=torch.int32, device=fire.device)
    block = 1024
    if n:
        with on_device(fire.device):
            _list_firing_kernel[(cdiv(n, block),)](fire.view(torch.uint8), pos, idx, n, BLOCK=block)
    return idx, pos


@triton.jit
def _list_range(pos_ptr, c0, c1):
    """(start, count): the firing cells of cells c0..c1 are idx[start .. start + count) of
    the step's list (_firing_cells), from its inclusive prefix count pos (device memory)."""
    start = tl.load(pos_ptr + c0 - 1, mask=c0 > 0, other=0)
    return start, tl.load(pos_ptr + c1 - 1) - start


@triton.jit
def _cell_range(pos_ptr, c0, c1, LISTED: tl.constexpr):
    """(start, count) of the cells c0..c1 a kernel walks: their firing cells' range of the
    step's list (LISTED, _list_range), or all of them (count c1 - c0, start unused)."""
    if LISTED:
        return _list_range(pos_ptr, c0, c1)
    else:
        return 0, c1 - c0


@triton.jit
def _walked_cells(idx_ptr, start, pos, rows, c0, LISTED: tl.constexpr):
    """The cells (in the chunk, from c0) at places pos of a kernel's walk (_cell_range):
    listed, or every cell in order."""
    if LISTED:
        return tl.load(idx_ptr + start + pos, mask=rows, other=c0) - c0
    else:
        return pos


@triton.jit
def _walked_firing(rows, offs_m, c0, seed_lo, seed_hi, step_lo, threshold, LISTED: tl.constexpr):
    """Which walked cells fire: every listed one; else the step's mask, drawn here."""
    if LISTED:
        return rows
    else:
        return rows & (_fire(c0 + offs_m, seed_lo, seed_hi, step_lo, threshold) != 0.0)


# backward(..., out=grad_out) is safe: d_state is written only after grad_out is read.
BACKWARD_OUT_MAY_BE_GRAD = True


@triton.jit
def _fold_columns(part_ptr, rows, cols, total_ptr, c, ZERO: tl.constexpr, ADD: tl.constexpr,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """total[c] += sum over r of part[r, c] for the columns c of one program (see
    _fold_partials_kernel); total[c] = that sum where not ADD."""
    live = c < cols
    offs_r = tl.arange(0, ROWS)
    s = tl.zeros([BLOCK], tl.float32)
    for r0 in range(0, rows, ROWS):
        r = r0 + offs_r
        m = (r < rows)[:, None] & live[None, :]
        p = part_ptr + r[:, None] * cols + c[None, :]  # < _PARTIAL_BUDGET / 4 + ROWS * cols: int32
        s += tl.sum(tl.load(p, mask=m, other=0.0), axis=0)
        if ZERO:
            tl.store(p, tl.zeros([ROWS, BLOCK], tl.float32), mask=m)
    if ADD:
        s += tl.load(total_ptr + c, mask=live, other=0.0)
    tl.store(total_ptr + c, s, mask=live)


@triton.jit
def _fold_partials_kernel(part_a, rows_a, cols_a, total_a, part_b, rows_b, cols_b, total_b, programs_a,
                          ZERO: tl.constexpr, ADD: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """total[c] += sum over r of part[r, c] for two buffers in one launch (programs
    0..programs_a-1 fold a, the rest b): ROWS rows a step summed as one fixed tree, the
    steps in order (deterministic, the same order for every call of one shape); ZERO: part
    = 0 after. A step's ROWS loads are in flight together: one row a step, 35 programs on
    the Med-NCA rule's 264 slots, took 74 us a fold on an H200 (109ac01), latency-bound."""
    pid = tl.program_id(0)
    if pid < programs_a:
        _fold_columns(part_a, rows_a, cols_a, total_a, pid * BLOCK + tl.arange(0, BLOCK), ZERO, ADD, BLOCK, ROWS)
    else:
        _fold_columns(part_b, rows_b, cols_b, total_b, (pid - programs_a) * BLOCK + tl.arange(0, BLOCK),
                      ZERO, ADD, BLOCK, ROWS)


def _fold(folds, zero, add=True):
    """total += partials.sum(0) for each (partials, total) of ``folds`` (one or two), each
    column summed over the rows in a fixed order (total = the sum where not ``add``);
    partials zeroed after when ``zero``. One launch: 256 columns a program, 8 rows a step."""
    (pa, ta), (pb, tb) = folds if len(folds) == 2 else (folds[0], folds[0])
    block = 256
    progs_a = cdiv(pa.shape[1], block)
    progs_b = cdiv(pb.shape[1], block) if len(folds) == 2 else 0
    with on_device(pa.device):
        _fold_partials_kernel[(progs_a + progs_b,)](pa, pa.shape[0], pa.shape[1], ta, pb, pb.shape[0], pb.shape[1],
                                                    tb, progs_a, ZERO=zero, ADD=add, BLOCK=block, ROWS=8)


class GradSink:
    """The weight gradients of many backward calls with one rule layout and one tiling (the
    steps of nca_rollout's backward), summed in float32: each call's per-program partials
    are folded into running totals (and zeroed) by one fixed-order reduction a buffer, so
    the sums are bitwise the ones autograd makes of the calls' own gradients in float32
    (nca_rollout equals the loop of nca_step). result() unpacks them once. A step saves
    its unpacking, casts, fills and the caller's accumulation: 16 small launches. The last
    call's weights give the layouts and dtypes."""

    def __init__(self, once: bool = False):
        self._bufs = None  # (partials, dpw_parts, total_a, total_pw) after the first call
        self._finish = None
        self._once = once  # one call's sink (backward without a sink): totals set, not added to
        self._plans: dict = {}  # the backward's plans, by rule and layouts (_BackwardPlan)

    def _plan(self, rule, state, grad_out, keep: bool):
        """The backward plan of this rule, shape and dtypes (no stride enters it: an
        expanded grad_out, as autograd gives for out.sum(), and the dense ones of later
        steps share a plan and its workspaces), made at the first call that has them;
        ``keep``: cached for the next call (a ``prepared`` rule; a rule made for one call
        makes a plan for that call only)."""
        key = (id(rule), state.shape, state.dtype, grad_out.dtype, state.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = _BackwardPlan(rule, state, grad_out, self)
            if keep:
                self._plans[key] = plan
        return plan

    def _slots(self, shapes, device):
        """The partial-sum buffers, zero at every call (the totals hold the sums)."""
        if self._bufs is None:
            total = torch.empty if self._once else torch.zeros
            self._bufs = tuple(torch.zeros(s, dtype=torch.float32, device=device) for s in shapes) + \
                tuple(total(s[1], dtype=torch.float32, device=device) for s in shapes)
        elif tuple(tuple(b.shape) for b in self._bufs[:2]) != tuple(shapes):
            raise ValueError("a GradSink sums the gradients of one rule layout and tiling; got partial "
                             f"slots of shapes {shapes} after {[tuple(b.shape) for b in self._bufs[:2]]}")
        return self._bufs[:2]

    def _fold(self, zero=True):
        """Add the partials of the call just made to the totals; zero them for the next call
        (a sink used once skips that)."""
        partials, dpw_parts, total_a, total_pw = self._bufs
        _fold(((partials, total_a), (dpw_parts, total_pw)), zero, add=not self._once)

    def result(self):
        """The summed weight gradients (pw, pb, w1, b1, w2, b2), in the weights' dtypes."""
        if self._finish is None:
            raise RuntimeError("GradSink.result(): no backward has added to this sink")
        return self._finish(*self._bufs[2:])


def _weight_grads(rule, weights, total_a, total_pw):
    """Unpack the summed partials (the cell kernel's slot layout, and the conv kernel's d_pw)
    into the weights' layouts and dtypes (copies: no two returned grads share a buffer)."""
    pw, pb, w1, b1, w2, b2 = weights
    C, frozen = rule.C, rule.FROZEN
    d_w1a, d_w1b, d_b1, d_w2, d_b2, _, d_pb = total_a.split(_cell_slot_sizes(rule))
    hid, FC, cp, hp, fcc = rule.HID, rule.FC, rule.C_PAD, rule.HID_PAD, rule.FC_CEIL
    g_w1 = torch.cat([d_w1a.view(hp, cp)[:hid, :C], d_w1b.view(hp, fcc)[:hid, :FC]], dim=1)  # a new tensor
    if rule.DEPTHWISE:  # views: [FC, 9], [FC, C, 9]
        g_pw = total_pw.view(9, fcc)[:, :FC].T
    else:
        g_pw = total_pw.view(9, fcc, cp)[:, :FC, :C].permute(1, 2, 0)
    grads = (g_pw, d_pb[:FC], g_w1, d_b1[:hid], d_w2.view(cp, hp)[frozen:C, :hid], d_b2[frozen:C])
    # one copy each (the cat's result is new already): the views' layout and dtype at once
    return tuple(g.to(w.dtype, memory_format=torch.contiguous_format, copy=g is not g_w1).reshape(w.shape)
                 for g, w in zip(grads, weights))


def _cell_slot_sizes(rule):
    """The cell kernel's slot: the rule's flat layout without the d_pw segment (the conv
    kernel's partials hold it)."""
    sizes = list(rule.sizes)
    sizes[5] = 0
    return sizes


class _BackwardPlan:
    """Everything a backward call decides from the rule, the tensors' layouts and the knobs
    (kernel choice, tiles, batch chunks, launch keywords, workspaces, partial slots): made
    once per rule, shape and dtypes and kept in the call's GradSink (GradSink._plan), so
    that the steps of nca_rollout's backward pay for it once, with workspaces reused from
    step to step (one stream, in order)."""

    def __init__(self, rule: _Rule, state, grad_out, sink: GradSink):
        B, C, H, W = state.shape
        dev = state.device
        self.rule = rule  # kept: the plan's key holds its id
        reg_acc = _register_accumulators(rule)
        _hidden_chunk(rule)  # the knob checked in every mode, not only where the kernel takes it
        self.gemm = gemm = reg_acc == _ACC_GEMM
        chunked = reg_acc == _ACC_CHUNKED  # the hidden-chunk kernel, partials in its slot
        # =gemm: a second workspace, the firing cells' [dz | h | gd | x | conv] rows in the
        # state's dtype (what autograd would save in it), for the fc weight-gradient GEMMs.
        act_row = _act_row(rule) if gemm else 0
        # The workspace: g + dP_x (float32) and dQ, as [cells, C + FC] float32 rows, or dQ in
        # a bfloat16 workspace of its own (_half_dq). Batch chunks bound it
        # (_common.backward_batch_chunk).
        half_dq = rule.dtypes["dq"] == torch.bfloat16
        ws_bytes = 4 * C + (2 * rule.FC_CEIL if half_dq else 4 * rule.FC)
        self.chunk = chunk = _common.backward_batch_chunk(state, ws_bytes + act_row * state.element_size())
        n_ws = min(B, chunk) * H * W
        if half_dq:
            self.ws = torch.empty(n_ws, C, dtype=torch.float32, device=dev)
            self.wq = torch.empty(n_ws, rule.FC_CEIL, dtype=torch.bfloat16, device=dev)
            k1, wq_row = C, rule.FC_CEIL
        else:
            self.ws = torch.empty(n_ws, C + rule.FC, dtype=torch.float32, device=dev)  # [g + dP_x | dQ]
            self.wq = self.ws[:, C:]
            k1 = wq_row = C + rule.FC
        self.act = torch.empty(n_ws, act_row, dtype=state.dtype, device=dev) if gemm else self.ws  # ws: unread
        sizes_a = _cell_slot_sizes(rule)
        self.slot = sum(sizes_a)
        nf = rule.FC_CEIL // rule.FC_BLK
        self.conv_programs = 9 * nf
        cx = rule.constexprs()
        cx["EXACT"] |= _exact_bits(cx["DOT_PREC"], dict(grad=grad_out.dtype))
        # One tiling and one set of partial-sum slots for every chunk (the first chunk is the
        # largest): the kernels add each chunk's sums into them, reduced once at the end (per
        # chunk that was a zero fill, two reductions, a cat and an add: ~40 us a chunk on an
        # H100, ~5% of the Med-NCA step's backward at 8 chunks).
        n0 = min(B, chunk) * H * W
        block_m, warps, G, stages, regs = _backward_tiling(rule, dev, n0, cx["DOT_PREC"])
        self.hidden_chunks = _takes_hidden_chunks(rule, reg_acc, gpu=not interpreting())
        if self.hidden_chunks:
            block_m, warps, G, stages, regs = _hidden_chunk_tiling(rule, dev, n0, G)
        (in_m, in_warps, in_stages, in_regs), self.cv_m = _side_tiles(rule, dev, block_m, warps)
        self.parts = _conv_grad_parts(dev, self.conv_programs, cdiv(n0, self.cv_m))
        if gemm:
            fc_tile, self.fc_programs = _fc_grad_tiles(rule, state.dtype in _HALF)
            # cell ranges: as many as the conv-gradient kernel would take, within the G slots
            self.fc_parts = min(G, _conv_grad_parts(dev, self.fc_programs, cdiv(n0, _FC_BLOCK_K)))
            self.fc_kw = dict(C_PAD=rule.C_PAD, HID_PAD=rule.HID_PAD, FC_CEIL=rule.FC_CEIL, **fc_tile,
                              BLOCK_K=_FC_BLOCK_K, DOT_PREC=cx["DOT_PREC"],
                              HALF_DOT=state.dtype in _HALF and not interpreting(), num_warps=4, num_stages=2)
        # One private slot per program (cell kernel) and per cell range (conv kernel).
        self.partials, self.dpw_parts = sink._slots(((G, self.slot), (self.parts, rule.sizes[5])), dev)
        # Large states: only firing cells (about update_prob of them) run the cell and
        # conv-gradient kernels: the step lists them once in cell order on the device (a
        # cumsum and a scatter, no host sync), each chunk takes its range of the list
        # (_list_range); the input kernel reads the mask for each cell's direct term. Small
        # states: the kernels walk every cell and the cell and conv kernels draw the mask
        # (_COMPACT_BACKWARD_CELLS).
        self.listed = listed = B * H * W >= _COMPACT_BACKWARD_CELLS
        self.G = G
        self.cell_kw = dict(**cx, **(dict(HC=_hidden_chunk(rule), PARTIALS=chunked) if self.hidden_chunks
                                     else dict(REG_ACC=reg_acc)),
                            LISTED=listed, BLOCK_M=block_m, K1=k1, WQ=wq_row, **_launch_kw(warps, stages, regs))
        self.conv_kw = dict(LISTED=listed, C=C, F=rule.F, FC=rule.FC, C_PAD=rule.C_PAD, FC_BLK=rule.FC_BLK,
                            FC_CEIL=rule.FC_CEIL, DEPTHWISE=rule.DEPTHWISE, PAD=rule.PAD, DOT_PREC=cx["DOT_PREC"],
                            EXACT=cx["EXACT"] & _TF32_BITS, BLOCK_M=self.cv_m, WQ=wq_row, num_warps=4, num_stages=1)
        self.in_m = in_m
        self.in_kw = dict(C=C, F=rule.F, FC=rule.FC, FC_LOOP=1 if rule.DEPTHWISE else rule.FC, C_PAD=rule.C_PAD,
                          FC_BLK=rule.FC_BLK, FC_CEIL=rule.FC_CEIL, DEPTHWISE=rule.DEPTHWISE, PAD=rule.PAD,
                          DOT_PREC=cx["DOT_PREC"], EXACT=cx["EXACT"], BLOCK_M=in_m, K1=k1, WQ=wq_row,
                          HALF_DQ=half_dq, HALF_W=rule.HALF_W, LISTED=listed,
                          **_launch_kw(in_warps, in_stages, in_regs))
        # large rules and the interpreter give the input kernel the cell kernel's tile (_side_tiles)
        self.in_pins = ("FASTNCA_TRITON_NCA_BWD_INPUT_TILE",
                        *(("FASTNCA_TRITON_NCA_BWD_TILE",) if interpreting() or _large_rule(rule) else ()))


def backward(grad_out, state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen,
             prepared=None, out=None, sink=None):
    """d_state and the weight gradients. ``out``: where d_state goes; it may be ``grad_out``
    itself (the rollout's backward reuses one buffer for every step's gradient): the input
    kernel, the only writer of d_state, reads grad_out (listed walk; the every-cell walk
    reads the cell kernel's copy in the workspace) only at the cells it writes, before
    writing them. ``sink``: a GradSink that collects the weight gradients instead (then
    returned as None), for calls with one ``prepared`` rule (their plan made once,
    _BackwardPlan)."""
    rule = (_common.arranged(prepared, state, (pw, pb, w1, b1, w2, b2), groups, padding, frozen)
            or _Rule(state, pw, pb, w1, b1, w2, b2, groups, padding, frozen))
    B, C, H, W = state.shape
    dev = state.device
    d_state = _common.backward_out(out, state, grad_out)
    # A call without a sink sums its own partials the same way, in a sink used once.
    own = GradSink(once=True) if sink is None else sink
    plan = own._plan(rule, state, grad_out, keep=prepared is not None)
    ws, wq, act = plan.ws, plan.wq, plan.act
    if interpreting():  # CPU tests: a read of a workspace entry nobody wrote shows as NaN
        ws.fill_(float("nan"))
        wq.fill_(float("nan"))
        if plan.gemm:
            act.fill_(float("nan"))
    fire_args = _fire_args(update_prob, seed, step)
    if plan.listed:
        fires = _fire_mask(B, H, W, update_prob, seed, step, dev)  # bool [B, H, W], the forward's mask
        idx, pos = _firing_cells(fires.reshape(-1))
    else:
        idx = pos = ws  # placeholders, never read
    weights = rule.weights()
    kernel_weights = rule.kernel_weights()
    ch_contig = state.stride(1) == 1  # the cell kernels' CH_CONTIG (a batch chunk keeps the strides)
    chunk = plan.chunk
    for b0 in range(0, B, chunk):
        nb = min(chunk, B - b0)
        g_c, x_c, d_c = grad_out[b0:b0 + nb], state[b0:b0 + nb], d_state[b0:b0 + nb]
        N = nb * H * W
        c0 = b0 * H * W  # the chunk's first cell
        if plan.listed:
            fire_c = fires[b0:b0 + nb].reshape(N).view(torch.uint8)
            wq[:N].zero_()  # dQ of the cells that do not fire (the cell kernel writes the others)
        else:
            fire_c = ws  # never read: the cell kernel writes every cell's rows
        with on_device(dev):
            cell_args = (g_c, x_c, ws, wq, act, idx, pos, c0, c0 + N, *kernel_weights, plan.partials, plan.slot,
                         H, W, *x_c.stride(), *g_c.stride(), *fire_args, frozen)
            cell_grid = (min(plan.G, cdiv(N, plan.cell_kw["BLOCK_M"])),)
            with _pinned_fit("FASTNCA_TRITON_NCA_BWD_TILE"):
                if plan.hidden_chunks:
                    _nca_step_backward_cell_gemm_kernel[cell_grid](*cell_args, **plan.cell_kw, CH_CONTIG=ch_contig)
                else:
                    _nca_step_backward_cell_kernel[cell_grid](*cell_args, **plan.cell_kw, CH_CONTIG=ch_contig)
            if plan.gemm:
                _nca_step_backward_fc_kernel[(plan.fc_programs, plan.fc_parts)](
                    act, plan.partials, pos, c0, c0 + N, plan.slot, C, LISTED=plan.listed, **plan.fc_kw)
            _nca_step_backward_conv_kernel[(plan.conv_programs, plan.parts)](
                wq, x_c, plan.dpw_parts, idx, pos, c0, c0 + N, H, W, *x_c.stride(), *fire_args, **plan.conv_kw)
            in_args = (ws, wq, weights[5], rule.half_pw, d_c, fire_c, g_c, N, H, W, *d_c.stride(), *g_c.stride())
            with _pinned_fit(*plan.in_pins):
                _nca_step_backward_input_kernel[(cdiv(N, plan.in_m),)](*in_args, **plan.in_kw)
    own._fold(zero=sink is not None)
    own._finish = functools.partial(_weight_grads, rule, (pw, pb, w1, b1, w2, b2))
    if sink is not None:
        return (d_state,) + (None,) * 6
    return (d_state, *own.result())
