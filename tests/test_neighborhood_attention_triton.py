"""Triton neighborhood_attention2d kernels against the reference: out, lse, dq, dk, dv (with
and without a gradient on lse) over borders, kernel sizes, grid shapes, head dims, head
counts, dtypes and strided packed-QKV views; softmax properties; bitwise-deterministic
gradients.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py before triton is
imported) on a small subset; the full matrix is marked ``gpu`` (``pytest -m gpu``)."""
import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import fastnca  # noqa: E402
from fastnca.kernels.reference import neighborhood_attention as ref  # noqa: E402
from fastnca.kernels.triton import neighborhood_attention as tri  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Relative error bound max|a - b| / max|b| by dtype: fp32 matches the reference up to
# summation order; fp16/bf16 differ by the rounding of the stored outputs.
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a, b, floor=1e-30):
    """max|a - b| / max|b|, the denominator at least ``floor``."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def qkv(B, H, W, nh, D, dtype=torch.float32, seed=0, layout="separate"):
    """q, k, v [B, H, W, nh, D]; layout "packed" = unbind of [B, H, W, 3, nh, D] (a Linear's
    output viewed as 3 x heads), "interleaved" = slices of [B, H, W, nh, 3 * D]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)

    if layout == "packed":
        return rnd(B, H, W, 3, nh, D).unbind(3)
    if layout == "interleaved":
        t = rnd(B, H, W, nh, 3 * D)
        return t[..., :D], t[..., D:2 * D], t[..., 2 * D:]
    return rnd(B, H, W, nh, D), rnd(B, H, W, nh, D), rnd(B, H, W, nh, D)


def check_against_reference(B, H, W, nh, D, ks, border, dtype, layout="separate", seed=0):
    q, k, v = qkv(B, H, W, nh, D, dtype, seed, layout)
    scale = D ** -0.5
    o, lse = tri.forward(q, k, v, ks, border, scale)
    ro, rlse = ref.forward(q, k, v, ks, border, scale)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert o.is_contiguous() and lse.is_contiguous() and o.shape == q.shape and lse.shape == q.shape[:-1]
    tol = REL[dtype]
    assert rel_err(o, ro) <= tol, ("o", rel_err(o, ro))
    assert rel_err(lse, rlse) <= 1e-5, ("lse", rel_err(lse, rlse))  # float32 whatever the input dtype

    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).float().to(DEVICE)
    # fp32 grads are held to the same bound as o; half grads keep a 2x margin for the
    # rounding of the half inputs to the recomputed probabilities and of the stored grads.
    gtol = tol if dtype == torch.float32 else 2 * tol
    for grad_lse in (None, dlse):
        grads = tri.backward(do, grad_lse, q, k, v, o, lse, ks, border, scale)
        rgrads = ref.backward(do, grad_lse, q, k, v, ro, rlse, ks, border, scale)
        # A gradient that cancels to ~0 (dq on a 1x1 grid or where every window key is the
        # same cell: the softmax Jacobian sums to zero) is rounding noise in both results;
        # it is held to a tenth of the call's largest gradient instead of to its own size.
        floor = 0.1 * max(b.double().abs().max().item() for b in rgrads)
        for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
            assert a.dtype == dtype and a.is_contiguous() and a.shape == q.shape
            err = rel_err(a, b, floor)
            assert err <= gtol, (name, "with dlse" if grad_lse is not None else "no dlse", err)


# --------------------------------------------------------------------------------------
# CPU (interpreter) subset: every border, kernel size, dtype, D and the tile edge cases
# (1x1 grid, circular grids smaller than the window, shift near-edge query ranges, several
# tiles per image, several head tiles, padded heads).
# --------------------------------------------------------------------------------------
CASES = [  # (B, H, W, heads, D, kernel_size, border, dtype)
    (1, 1, 1, 1, 1, 3, "zeros", torch.float32),
    (2, 2, 2, 6, 5, 3, "mask", torch.float32),
    (1, 3, 5, 1, 16, 5, "circular", torch.float32),
    (1, 8, 8, 6, 64, 3, "shift", torch.float32),     # 3 head tiles of 2 heads
    (1, 8, 8, 1, 5, 7, "zeros", torch.float32),      # row-looped window, scalar loads
    (1, 8, 8, 1, 16, 7, "shift", torch.float16),     # query ranges up to the whole axis
    (1, 31, 17, 1, 16, 5, "mask", torch.float32),    # 4 row tiles
    (1, 9, 40, 2, 8, 3, "circular", torch.bfloat16),  # 2x2 tiles
    (1, 3, 5, 1, 96, 3, "zeros", torch.float16),     # D padded 96 -> 128
    (1, 5, 6, 3, 8, 5, "shift", torch.bfloat16),     # 3 heads padded to 4
    (2, 5, 6, 2, 16, 3, "mask", torch.float32),      # k=3 two-pass window: outside keys left out
    (1, 1, 4, 1, 8, 3, "mask", torch.float16),       # one row: 6 of 9 keys outside
    (1, 3, 4, 2, 1, 3, "mask", torch.float32),       # D = 1 on a real grid (scalar loads)
    (1, 1, 1, 1, 8, 3, "circular", torch.float32),   # 1x1 torus: every key is the cell itself
    (1, 1, 1, 2, 8, 5, "mask", torch.float32),       # 1x1: only the centre key in the softmax
    (1, 3, 5, 1, 96, 3, "mask", torch.float32),      # fp32 D 96 (padded to 128)
    (1, 4, 4, 6, 16, 3, "zeros", torch.bfloat16),    # 6 heads in a half dtype
    (1, 3, 4, 2, 6, 3, "zeros", torch.bfloat16),     # bf16 word loads of an even D padded 6 -> 8
    (2, 3, 40, 3, 5, 3, "zeros", torch.float16),     # 2 column tiles, padded head and D: a row's last
                                                     # cell is next to the first of the earlier tile
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_matches_reference(case):
    check_against_reference(*case)


# Shift on grids that are not a multiple of the 8-wide tile: windows near the far border
# reach 2r back, past a radius-r halo of the last tile (a bug the first halo kernels had).
HALO_CASES = CASES + [
    (1, 9, 9, 1, 16, 3, "shift", torch.float32),
    (1, 10, 10, 1, 16, 5, "shift", torch.float32),
    (1, 8, 11, 1, 16, 7, "shift", torch.float32),
    (1, 7, 7, 1, 96, 7, "shift", torch.float32),  # no halo tile fits: the window kernels run
]


@pytest.mark.parametrize("case", HALO_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_halo_formulations_match_reference(monkeypatch, case):
    """The tensor-core kernels (FASTNCA_TRITON_NA_FORWARD / _BACKWARD=halo): o, lse, dq, dk,
    dv against the reference on every case above (circular windows larger than the grid
    count a key once per offset that reads it; shift's key-side halo has twice the
    radius)."""
    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "halo")
    check_against_reference(*case)


@pytest.mark.parametrize("D", [1, 4])
def test_halo_forward_infinite_logits(monkeypatch, D):
    """The halo forward's lse follows torch.logsumexp where a window's max logit is
    infinite, as the window kernels' (the public test's cases under the knob)."""
    from test_neighborhood_attention import test_infinite_logits_follow_logsumexp

    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    test_infinite_logits_follow_logsumexp("triton", D)


@pytest.mark.parametrize("tile", ["4x8", "4x4"])
def test_halo_tile_knob(monkeypatch, tile):
    """FASTNCA_TRITON_NA_HALO_TILE starts the halo tile search at a smaller tile; the kernels
    stay exact there (interior and edge tiles, each border)."""
    monkeypatch.setenv("FASTNCA_TRITON_NA_HALO_TILE", tile)
    by, bx = (int(t) for t in tile.split("x"))
    assert tri._halo_tile(32, 32, 1, 64) == (by, bx, 64)  # (by + 2) x (bx + 2) <= 64 slots
    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "halo")
    for border in ("zeros", "circular", "shift"):
        check_against_reference(1, 9, 13, 2, 8, 3, border, torch.float32)
    monkeypatch.setenv("FASTNCA_TRITON_NA_HALO_TILE", "2x2")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NA_HALO_TILE"):
        tri._halo_tile(32, 32, 1, 64)


@pytest.mark.parametrize("case", HALO_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_split_backward_matches_reference(monkeypatch, case):
    """FASTNCA_TRITON_NA_BACKWARD=split: dq and each window slot's p, ds in one launch, dk
    and dv gathered from them in a second. Every case above: circular windows larger than
    the grid (a key at several slots of one query), shift's clamped windows (the slot from
    the window's start), mask and zeros borders (outside slots never read)."""
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "split")
    check_against_reference(*case)


def test_split_passes_on_different_tiles(monkeypatch):
    """The split's passes meet only through pds, indexed by global row and slot, so each
    may take its own tile (the autotuner tunes them apart): pass 1 and pass 2 pinned to
    different tiles, over edge tiles, padded heads and every border."""
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "split")
    launch, default = tri._launch, tri._default_config
    tiles = {1: (2, 4, 1), 2: (4, 2, 2)}

    def launch_pinned(name, backward, B, H, W, NH, args, consts):
        if name == "_na2d_backward_kernel":
            by, bx, nsplit = tiles[consts["PASS"]]
            monkeypatch.setattr(tri, "_default_config",
                                lambda *a: {"BLOCK_Y": by, "BLOCK_X": bx, "NSPLIT": nsplit, "num_warps": 4})
        try:
            return launch(name, backward, B, H, W, NH, args, consts)
        finally:
            monkeypatch.setattr(tri, "_default_config", default)

    monkeypatch.setattr(tri, "_launch", launch_pinned)
    # Small grids: the interpreter pays per program, and these tiles make many (k=7 shift
    # on 8 x 11 took 26 s a tile pair).
    for case in ((1, 5, 6, 3, 5, 5, "mask", torch.float32), (1, 3, 5, 3, 8, 5, "circular", torch.float32),
                 (1, 5, 7, 1, 16, 5, "shift", torch.float32), (2, 5, 6, 3, 8, 3, "zeros", torch.bfloat16)):
        check_against_reference(*case)
    tiles = {1: (4, 2, 2), 2: (1, 8, 1)}
    check_against_reference(1, 3, 5, 3, 8, 5, "circular", torch.float32)


@pytest.mark.parametrize("nsplit", [1, 2, 4])
@pytest.mark.parametrize("case", [(2, 5, 6, 3, 8, 3, "zeros", torch.float32), (1, 4, 7, 2, 16, 3, "mask", torch.bfloat16),
                                  (1, 6, 5, 1, 5, 5, "shift", torch.float32), (1, 3, 4, 2, 8, 3, "circular", torch.float16)],
                         ids=["zeros", "mask-bf16", "shift5-unaligned", "circular-fp16"])
def test_column_chunks_match_reference(monkeypatch, case, nsplit):
    """The window kernels' D-rows in NSPLIT column chunks ([BLOCK_M, NSPLIT, BLOCK_D /
    NSPLIT] blocks, _cols), pinned in all three kernels (forward, preprocess, backward):
    the same values as one chunk, against the reference."""
    seen = []

    def pinned(block_m, block_d, vec, num_warps):
        seen.append(min(nsplit, block_d))
        return min(nsplit, block_d)

    monkeypatch.setattr(tri, "_nsplit", pinned)
    check_against_reference(*case)
    assert seen and set(seen) == {min(nsplit, tri._head_tile(case[3], case[4])[1])}


def test_bfloat16_rows_load_as_words(monkeypatch):
    """Aligned bfloat16 rows take _f32's int32 word loads in the forward and backward
    (where the Triton compiles them well, _PAIRS_OK), against the reference; float16 and
    odd D do not."""
    taken = []
    pairs = tri._pairs
    monkeypatch.setattr(tri, "_pairs", lambda vec, ts: taken.append(pairs(vec, ts)) or taken[-1])
    check_against_reference(1, 4, 5, 2, 16, 3, "zeros", torch.bfloat16, layout="packed")
    assert taken and all(t == tri._PAIRS_OK for t in taken)
    taken.clear()
    check_against_reference(1, 4, 5, 2, 16, 3, "zeros", torch.float16)
    check_against_reference(1, 4, 5, 2, 5, 3, "zeros", torch.bfloat16)
    assert taken and not any(taken)


@pytest.mark.parametrize("off64", [False, True])
def test_offset_width(monkeypatch, off64):
    """The window kernels form offsets in int32 unless a tensor spans 2^31 elements
    (_off64); both widths against the reference, forward and backward (with an lse
    gradient: the preprocess reads it through its own strides)."""
    real = tri._off64
    big = torch.empty_strided((2, 1, 1, 1, 8), (2 ** 31, 8, 8, 8, 1), device="meta")
    small = torch.empty_strided((2, 1, 1, 1, 8), (2 ** 30, 8, 8, 8, 1), device="meta")
    assert real((big,)) and real((small, big)) and not real((small,)) and not real((torch.empty(0),))
    monkeypatch.setattr(tri, "_off64", lambda tensors: off64)
    check_against_reference(2, 5, 6, 3, 16, 3, "zeros", torch.bfloat16, layout="packed")
    check_against_reference(1, 4, 7, 2, 8, 5, "shift", torch.float32)


def test_nsplit_gives_each_thread_one_row():
    """_nsplit: chunks of VEC x (threads per row) columns, so that a tile's threads cover
    its rows once (GeCA-S bf16 forward: 64 rows on 8 warps, 4 threads a row of 64, two
    chunks of 32); never more chunks than vectors in a row, never fewer than one."""
    assert tri._nsplit(64, 64, 8, 8) == 2  # bf16 D=64: 4 threads x 8 columns, 2 chunks
    assert tri._nsplit(64, 64, 4, 8) == 4  # float32: 4 threads x 4 columns
    assert tri._nsplit(32, 64, 8, 8) == 1  # 8 threads a row cover it in one chunk
    assert tri._nsplit(4, 64, 8, 8) == 1  # more threads than a row has vectors
    assert tri._nsplit(1024, 8, 1, 4) == 8  # scalar loads: one thread a row
    for block_m, block_d, vec, nw in itertools.product((1, 16, 64, 128, 512), (2, 8, 64, 128), (1, 2, 4, 8), (4, 8)):
        n = tri._nsplit(block_m, block_d, vec, nw)
        assert 1 <= n and block_d % n == 0 and (n == 1 or block_d // n >= vec)


def test_halo_backward_from_window_forward(monkeypatch):
    """Each halo kernel also works beside the other formulation's."""
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "halo")
    check_against_reference(1, 9, 40, 2, 8, 3, "circular", torch.bfloat16)
    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "window")
    check_against_reference(1, 5, 6, 3, 8, 5, "shift", torch.bfloat16)


def test_formulation_knobs(monkeypatch):
    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "tiles")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NA_FORWARD"):
        tri.forward(*qkv(1, 2, 2, 1, 4), 3, "zeros", 0.5)
    monkeypatch.delenv("FASTNCA_TRITON_NA_FORWARD")
    q, k, v = qkv(1, 2, 2, 1, 4)
    o, lse = tri.forward(q, k, v, 3, "zeros", 0.5)
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "tiles")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NA_BACKWARD"):
        tri.backward(torch.ones_like(o), None, q, k, v, o, lse, 3, "zeros", 0.5)
    assert tri._halo_tile(1, 1, 1, 16) == (1, 16, 64) and tri._halo_tile(32, 32, 1, 64) == (8, 8, 128)
    assert tri._halo_tile(32, 32, 3, 64) == (8, 8, 256)
    # wide heads take smaller tiles: the halo block stays within shared memory
    assert tri._halo_tile(32, 32, 2, 128) == (4, 8, 128) and tri._halo_tile(32, 32, 3, 128) == (4, 4, 128)
    assert tri._halo_tile(32, 32, 6, 128) is None  # shift at k=7 (radius 6), D=128: the window kernels run
    for radius, bd in itertools.product((1, 2, 3, 4, 6), (16, 32, 64, 128)):
        tile = tri._halo_tile(64, 64, radius, bd)
        assert tile is None or (tile[2] * bd <= 16384 and tile[0] * tile[1] >= 16)
    # half inputs dot at K >= 32 (K = 16 against a 256-slot halo faulted on an H100)
    for dtype, d, want in ((torch.float32, 5, 16), (torch.bfloat16, 5, 32), (torch.float16, 16, 32),
                           (torch.bfloat16, 64, 64)):
        q = torch.randn(1, 8, 8, 2, d, device=DEVICE).to(dtype)
        assert tri._halo_setup(q, 5, "zeros")[1]["BLOCK_D"] == want
    # tiles of at most 64 queries: the halo kernels' 4 warps are one warp group per tile
    # (kernels/triton/nca_step._wgmma_safe)
    for (h, w), radius, bd in itertools.product(((32, 32), (128, 128), (5, 9)), (1, 2, 3, 4, 6), (16, 32, 64, 128)):
        tile = tri._halo_tile(h, w, radius, bd)
        assert tile is None or tile[0] * tile[1] <= 64, (h, w, radius, bd, tile)


@pytest.mark.parametrize("layout", ["packed", "interleaved"])
def test_packed_qkv_views(layout):
    q, _, _ = qkv(1, 2, 3, 4, 8, layout=layout)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    check_against_reference(2, 5, 7, 4, 8, 3, "zeros", torch.float32, layout=layout)


def test_public_api_autograd_packed():
    """Through fastnca.neighborhood_attention2d: gradients reach the packed qkv tensor
    and match the reference backend, with a gradient flowing into lse too."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 6, 5, 3, 2, 8, generator=g).to(DEVICE)
    do = torch.randn(2, 6, 5, 2, 8, generator=g).to(DEVICE)
    dlse = torch.randn(2, 6, 5, 2, generator=g).to(DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        x = base.clone().requires_grad_(True)
        o, lse = fastnca.neighborhood_attention2d(*x.unbind(3), 3, "mask", return_lse=True, backend=backend)
        ((o * do).sum() + (lse * dlse).sum()).backward()
        grads.append((o.detach(), lse.detach(), x.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-5


def test_strided_grad_o():
    """grad_o with a non-unit last stride, and fully expanded (the gradient of o.sum())."""
    q, k, v = qkv(1, 4, 5, 2, 8, seed=3)
    o, lse = tri.forward(q, k, v, 3, "circular", 0.5)
    ro, rlse = ref.forward(q, k, v, 3, "circular", 0.5)
    g = torch.Generator().manual_seed(4)
    transposed = torch.randn(1, 4, 5, 8, 2, generator=g).to(DEVICE).transpose(-1, -2)
    expanded = torch.ones((), device=DEVICE).expand(o.shape)
    for do in (transposed, expanded):
        assert do.stride(-1) != 1
        got = tri.backward(do, None, q, k, v, o, lse, 3, "circular", 0.5)
        want = ref.backward(do, None, q, k, v, ro, rlse, 3, "circular", 0.5)
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("border", ["zeros", "mask", "circular", "shift"])
def test_weights_sum_to_one(border):
    """v = 1: o is the softmax mass on real keys, 1 except under border="zeros", where the
    outside keys have logit exactly 0, so 1 - o = n_outside * exp(-lse) exactly."""
    B, H, W, nh, D, ks = 1, 5, 6, 2, 8, 5
    q, k, _ = qkv(B, H, W, nh, D, seed=5)
    o, lse = tri.forward(q, k, torch.ones_like(k), ks, border, D ** -0.5)
    if border == "zeros":
        iy = ref.key_indices(H, ks, border, "cpu")
        ix = ref.key_indices(W, ks, border, "cpu")
        inside = (iy >= 0).sum(1)[:, None] * (ix >= 0).sum(1)[None, :]  # [H, W]
        n_out = (ks * ks - inside).to(DEVICE)[None, :, :, None, None].float()
        torch.testing.assert_close(o + n_out * torch.exp(-lse)[..., None], torch.ones_like(o), rtol=0, atol=2e-6)
        assert (n_out > 0).any()
    else:
        torch.testing.assert_close(o, torch.ones_like(o), rtol=0, atol=2e-6)


@pytest.mark.parametrize("border", ["zeros", "circular"])
def test_zero_query_gives_uniform_window(border):
    """q = 0: every logit is 0 (real or zero key), so lse = log(k^2) everywhere and o is the
    plain window mean of v (outside values counting as 0 under zeros)."""
    q, k, v = qkv(1, 4, 4, 1, 4, seed=6)
    o, lse = tri.forward(torch.zeros_like(q), k, v, 3, border, 0.5)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(9.0)), rtol=0, atol=1e-6)
    ro, _ = ref.forward(torch.zeros_like(q), k, v, 3, border, 0.5)
    torch.testing.assert_close(o, ro, rtol=1e-6, atol=1e-6)


def test_gradients_bitwise_deterministic():
    q, k, v = qkv(2, 9, 10, 3, 8, seed=8, layout="packed")
    o, lse = tri.forward(q, k, v, 3, "zeros", 0.3)
    g = torch.Generator().manual_seed(9)
    do = torch.randn(o.shape, generator=g).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=g).to(DEVICE)
    first = tri.backward(do, dlse, q, k, v, o, lse, 3, "zeros", 0.3)
    again = tri.backward(do, dlse, q, k, v, o, lse, 3, "zeros", 0.3)
    o2, lse2 = tri.forward(q, k, v, 3, "zeros", 0.3)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_rejects_float64():
    q, k, v = qkv(1, 3, 3, 1, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        tri.forward(q, k, v, 3, "zeros", 0.5)


def test_launch_helpers():
    """Host-side tile logic: alignment proof, head tiles, and tile candidates capped at
    the grid (no program made only of padding)."""
    assert tri._head_tile(6, 64) == (2, 64) and tri._head_tile(4, 16) == (4, 16) and tri._head_tile(1, 1) == (1, 2)
    x = torch.empty(2, 4, 4, 3, 6, 8, dtype=torch.float16)
    assert tri._vec(8, x.unbind(3)) == 8  # strides 8, 144, ...: 16-byte rows
    assert tri._vec(5, (torch.empty(1, 2, 2, 1, 5),)) == 1
    assert tri._vec(64, (torch.empty(1, 2, 2, 1, 64),)) == 4  # fp32: 4 per 16 bytes
    for H, W, (bh, bd), bwd in itertools.product((1, 3, 64), (1, 17, 256), ((1, 2), (1, 64), (2, 64)), (False, True)):
        cfgs = tri._tile_configs(H, W, bh, bd, bwd)
        assert cfgs
        for c in cfgs:
            assert c.kwargs["BLOCK_Y"] <= triton_next_pow2(H) and c.kwargs["BLOCK_X"] <= triton_next_pow2(W)
            assert bd % c.kwargs["NSPLIT"] == 0


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_host_integer_helpers_match_tritons():
    """The launchers' plain-int cdiv / next_pow2 (triton's are constexpr functions, ~1.5 us
    a host call) give triton.cdiv's and triton.next_power_of_2's values."""
    import triton

    from fastnca.kernels.triton._runtime import cdiv, next_pow2

    for n in range(0, 1100):
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 8, 64, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_pow2(2**40 + 1) == triton.next_power_of_2(2**40 + 1) == 2**41


def test_kernel_constants_compare_by_value():
    """The kernels' module-level constants (_runtime.const): Triton compares each against a
    deep copy taken at compile time at every launch; that comparison is a plain one between
    two of them (False for equal values, True otherwise), and keeps tl.constexpr's meaning
    against anything else. The kernels that read them pass every interpreter test."""
    import copy

    import triton.language as tl

    from fastnca.kernels.triton import neighborhood_attention as na
    from fastnca.kernels.triton import nca_step as ns
    from fastnca.kernels.triton._runtime import const

    for k in (ns._EX_STATE, ns._EX_W2, na._SHIFT):
        assert type(k) is const and isinstance(k, tl.constexpr)
        assert (k != copy.deepcopy(k)) is False
        assert (k != const(k.value + 1)) is True
    assert bool(const(3) != tl.constexpr(4)) and not bool(const(3) != tl.constexpr(3))
    assert hash(const(3)) == hash(tl.constexpr(3))


# --------------------------------------------------------------------------------------
# GPU: the full matrix, GeCA-sized shapes and the autotuned launch path.
# --------------------------------------------------------------------------------------
GRIDS = [(1, 1), (2, 2), (3, 5), (8, 8), (31, 17)]


def _gpu_matrix():
    """Every border x kernel size x grid, each with two (D, dtype) pairs drawn in turn from
    the 15 of D in {1, 5, 16, 64, 96} x {fp32, fp16, bf16} and heads alternating 1 / 6:
    every value of every axis is covered while the number of distinct compiled kernels
    (D, kernel size, border and dtype are compile-time) stays near 24 per kernel."""
    pairs = list(itertools.product((1, 5, 16, 64, 96), (torch.float32, torch.float16, torch.bfloat16)))
    cases = []
    for n, (border, ks) in enumerate(itertools.product(("zeros", "mask", "circular", "shift"), (3, 5, 7))):
        for gi, (H, W) in enumerate(GRIDS):
            if border == "shift" and min(H, W) < ks:
                continue
            for j in range(2):
                D, dtype = pairs[(2 * n + j) % len(pairs)]
                cases.append((2, H, W, 6 if (gi + j) % 2 else 1, D, ks, border, dtype))
    return cases


@gpu
@needs_cuda
@pytest.mark.parametrize("case", _gpu_matrix(), ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_matches_reference_gpu(case, monkeypatch):
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")  # one compile per variant, not one per tile
    check_against_reference(*case)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", _gpu_matrix(), ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_halo_formulations_match_reference_gpu(case, monkeypatch):
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "halo")
    check_against_reference(*case)


FORMULATIONS = {  # the opt-in Triton formulations by their environment knobs
    "window": {},
    "halo": dict(FASTNCA_TRITON_NA_FORWARD="halo", FASTNCA_TRITON_NA_BACKWARD="halo"),
    "halo-4x8": dict(FASTNCA_TRITON_NA_FORWARD="halo", FASTNCA_TRITON_NA_BACKWARD="halo",
                     FASTNCA_TRITON_NA_HALO_TILE="4x8"),
    "split": dict(FASTNCA_TRITON_NA_BACKWARD="split"),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("case", _gpu_matrix()[::3], ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_split_backward_matches_reference_gpu(case, monkeypatch):
    """A third of the GPU matrix (every border, kernel size and dtype still appear; the
    interpreter tests cover the split's index cases on the CPU)."""
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "split")
    check_against_reference(*case)


@gpu
@needs_cuda
@pytest.mark.parametrize("formulation", list(FORMULATIONS))
@pytest.mark.parametrize("layout", ["packed", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_geca_shapes_gpu(layout, dtype, formulation, monkeypatch):
    for name, value in FORMULATIONS[formulation].items():
        monkeypatch.setenv(name, value)
    check_against_reference(8, 32, 32, 12, 64, 3, "zeros", dtype, layout=layout)


@gpu
@needs_cuda
def test_autotuned_matches_pinned_gpu(monkeypatch):
    q, k, v = qkv(4, 32, 32, 6, 64, torch.float16, layout="packed")
    tuned = tri.forward(q, k, v, 3, "zeros", 0.125)
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")
    pinned = tri.forward(q, k, v, 3, "zeros", 0.125)
    for a, b in zip(tuned, pinned):
        assert rel_err(a, b) <= 1e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("index", range(9))
@pytest.mark.parametrize("case", [(2, 31, 17, 6, 64, 3, "zeros"), (1, 9, 40, 2, 5, 5, "circular"),
                                  (1, 16, 16, 1, 32, 7, "shift")], ids=["d64", "d5-unaligned", "shift7"])
def test_every_tile_candidate_matches_reference_gpu(case, index, monkeypatch):
    """The autotuner may pick any candidate of _tile_configs; the other GPU tests pin the
    default. Each candidate in turn (forward and backward), in float32 against the
    reference at the float32 tolerance."""
    B, H, W, nh, D, ks, border = case
    bh, bd = tri._head_tile(nh, D)
    vec = tri._vec(D, qkv(B, H, W, nh, D))
    counts = {bwd: len(tri._tile_configs(H, W, bh, bd, bwd, vec)) for bwd in (False, True)}
    if index >= max(counts.values()):
        pytest.skip(f"{max(counts.values())} candidates")
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")

    def pick(H, W, block_h, block_d, backward, vec):
        cands = tri._tile_configs(H, W, block_h, block_d, backward, vec)
        cfg = cands[min(index, len(cands) - 1)]
        return {**cfg.kwargs, "num_warps": cfg.num_warps}

    monkeypatch.setattr(tri, "_default_config", pick)
    check_against_reference(B, H, W, nh, D, ks, border, torch.float32)


@pytest.mark.parametrize("n", [(1 << 29) + 3, 1 << 30, (1 << 30) + 5])
def test_circular_index_maps_on_long_axes(n):
    """The kernels' circular key and query maps in int32 near both ends of axes past 2^29, up
    to the 2^30 limit on H and W: (i + a + R*n) % n overflowed and gave negative coordinates
    (out-of-bounds loads)."""
    import triton
    import triton.language as tl

    @triton.jit
    def maps(i_ptr, a_ptr, key_ptr, query_ptr, wrap_ptr, n, R: tl.constexpr, M: tl.constexpr):
        o = tl.arange(0, M)
        i, a = tl.load(i_ptr + o), tl.load(a_ptr + o)
        tl.store(key_ptr + o, tri._key_index(i, a, n, R, tri._CIRCULAR))
        tl.store(query_ptr + o, tri._query_index(i, a, n, R, tri._CIRCULAR))
        tl.store(wrap_ptr + o, tri._wrap(i + a - 4, n))

    for r in (1, 2, 3):
        pairs = [(i, a) for i in (0, 1, r, n - 1 - r, n - 2, n - 1) for a in range(-r, r + 1)]
        M = 1 << (len(pairs) - 1).bit_length()
        pairs += [pairs[0]] * (M - len(pairs))
        i = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE)
        a = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE)
        key, query, wrap = (torch.empty_like(i) for _ in range(3))
        maps[(1,)](i, a, key, query, wrap, n, R=r, M=M)
        for (ii, aa), kk, qq, ww in zip(pairs, key.tolist(), query.tolist(), wrap.tolist()):
            assert (kk, qq, ww) == ((ii + aa) % n, (ii - aa) % n, (ii + aa - 4) % n), (ii, aa, r)


def test_tuned_configs_name_each_kernels_pick(monkeypatch):
    """tuned_configs lists the config each autotuned kernel (attention and the nca forward)
    holds per tuning key, under the kernel's name and key, and the benchmark's tuned_since
    keeps the picks made after its tuned_now() snapshot: a row's own tuning (entries put in
    the caches the way Triton's Autotuner stores its picks: no GPU here to tune)."""
    from fastnca.benchmark.common import tuned_now, tuned_since
    from fastnca.kernels.triton import _runtime
    from fastnca.kernels.triton import nca_step as tri_nca

    fwd = tri._tuned("_na2d_forward_kernel", 32, 32, 2, 64, False, 8)
    nca = tri_nca._forward_autotuned()
    assert fwd in _runtime._AUTOTUNERS and nca in _runtime._AUTOTUNERS
    for tuner in (fwd, nca):
        monkeypatch.setattr(tuner, "cache", {})
    key = (32, 32, 12, 64, 3, 0, 8, "torch.bfloat16")
    fwd.cache[key] = fwd.configs[4]
    before = tuned_now()
    assert before == {f"_na2d_forward_kernel{list(key)}": str(fwd.configs[4])}, before
    assert "BLOCK_Y: 2, BLOCK_X: 16, NSPLIT: 4, num_warps: 4" in before[f"_na2d_forward_kernel{list(key)}"]
    assert tuned_since(before) == {}
    nca.cache[(32, 2, 128)] = nca.configs[1]
    fwd.cache[(8, 8, 12, 64, 3, 0, 8, "torch.bfloat16")] = fwd.configs[0]
    assert tuned_since(before) == {"tuned": {"_nca_step_forward_kernel[32, 2, 128]": str(nca.configs[1]),
                                             "_na2d_forward_kernel[8, 8, 12, 64, 3, 0, 8, 'torch.bfloat16']":
                                             str(fwd.configs[0])}}


@gpu
@needs_cuda
def test_autotuned_launch_records_its_pick(monkeypatch):
    """With autotuning on (the default on a GPU), a fwd+bwd leaves the forward's and the
    backward's pick in tuned_configs, each one of the _tile_configs candidates, and the
    outputs match the reference."""
    from fastnca.benchmark.common import tuned_now, tuned_since

    monkeypatch.delenv("FASTNCA_TRITON_AUTOTUNE", raising=False)
    B, H, W, nh, D = 2, 13, 11, 6, 64
    before = tuned_now()
    check_against_reference(B, H, W, nh, D, 3, "zeros", torch.bfloat16)
    got = tuned_since(before).get("tuned", {})
    bh, bd = tri._head_tile(nh, D)
    for name, bwd in (("_na2d_forward_kernel", False), ("_na2d_backward_kernel", True)):
        picks = [v for k, v in got.items() if k.startswith(f"{name}[{H}, {W}, {nh}, {D}, ")]
        assert picks, (name, got)
        cands = {str(c) for c in tri._tile_configs(H, W, bh, bd, bwd, 8)}
        assert all(p in cands for p in picks), (picks, cands)


def test_autotune_keys_precede_tuned_parameters():
    """Triton 3.0/3.1 (torch 2.4/2.5's) Autotuner reads its key arguments by position in the
    list of arguments the configs do not supply: a key after a tuned parameter read past the
    end (IndexError in every attention backward; PASS was last). Each autotuned kernel keeps
    its keys ahead of every parameter a config sets."""
    import inspect

    from fastnca.kernels.triton import nca_step as tri_nca

    tuned = [(tri._tuned(name, 32, 32, 1, 64, bwd, 4), bwd) for name, bwd in
             (("_na2d_forward_kernel", False), ("_na2d_backward_kernel", True))]
    tuned.append((tri_nca._forward_autotuned(), False))
    for tuner, _ in tuned:
        params = list(inspect.signature(tuner.fn.fn).parameters)
        config_set = {name for c in tuner.configs for name in c.kwargs}
        first_tuned = min(params.index(n) for n in config_set)
        for key in tuner.keys:
            assert params.index(key) < first_tuned, (tuner.fn.fn.__name__, key, sorted(config_set))


def test_halo_formulations_read_inputs_through_their_strides(monkeypatch):
    """The halo kernels (FASTNCA_TRITON_NA_FORWARD / _BACKWARD=halo) take q, k, v, grad_o and
    grad_lse through their own strides, as the window kernels do (the public tests' cases
    under the knobs): four tensors dense in four dim orders with the stride-0 grad_lse of
    lse.sum() (q the contiguous one there), packed and interleaved views of one qkv tensor,
    and a grad_o with a non-unit last stride or fully expanded."""
    from test_neighborhood_attention import test_each_input_is_read_through_its_own_strides

    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "halo")
    monkeypatch.setenv("FASTNCA_TRITON_NA_BACKWARD", "halo")
    assert tri._halo_setup(torch.empty(2, 5, 6, 2, 8, device=DEVICE), 3, "zeros") is not None  # the halo kernels run
    test_each_input_is_read_through_its_own_strides("triton", "zeros", 3)
    for layout in ("packed", "interleaved"):
        check_against_reference(1, 5, 6, 2, 8, 3, "zeros", torch.float32, layout=layout)
    test_strided_grad_o()


def test_grad_o_alignment_counts_in_the_vector_width():
    """The window backward's vector width and bfloat16 word loads (_vec, _pairs) hold for
    grad_o's own row strides and address, not only q, k, v and o's: a bfloat16 grad_o with
    odd row strides (a slice of a wider tensor) or at an odd element offset, beside aligned
    q, k, v (no int32 view of it exists)."""
    q, k, v = qkv(1, 4, 5, 2, 8, torch.bfloat16, seed=10)
    o, lse = tri.forward(q, k, v, 3, "zeros", 0.3)
    ro, rlse = ref.forward(q, k, v, 3, "zeros", 0.3)
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(1, 4, 5, 2, 9, generator=g).to(torch.bfloat16).to(DEVICE)
    flat = torch.randn(o.numel() + 1, generator=g).to(torch.bfloat16).to(DEVICE)
    for do in (wide[..., :8], flat[1:].view(o.shape)):
        assert do.stride(-1) == 1 and (do.stride(-2) % 2 or do.storage_offset() % 2)
        got = tri.backward(do, None, q, k, v, o, lse, 3, "zeros", 0.3)
        want = ref.backward(do, None, q, k, v, ro, rlse, 3, "zeros", 0.3)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert rel_err(a, b) <= 2 * REL[torch.bfloat16], name


@pytest.mark.parametrize("D", [5, 6])
def test_half_gradients_are_rounded_once(D):
    """float16 dq, dk, dv are computed in float32 and rounded once to float16 (a scale
    applied after the rounding rounds twice, up to an ulp off): each lies within half an
    ulp of the float64 gradient of the same inputs, up to float32's rounding (relative to
    the largest gradient). The float64 reference takes the kernels' Di = <do, o> of the
    float16 o they read, through its grad_lse (Di - dlse). D = 5: scalar loads, row-looped
    windows; D = 6: the unrolled k=3 window; both with a masked tail of the head dim and a
    scale that is not a power of two."""
    q, k, v = qkv(1, 4, 5, 2, D, torch.float16, seed=12)
    scale = D ** -0.5
    o, lse = tri.forward(q, k, v, 3, "zeros", scale)
    g = torch.Generator().manual_seed(13)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(torch.float16).to(DEVICE)
    got = tri.backward(do, None, q, k, v, o, lse, 3, "zeros", scale)
    q64, k64, v64, do64, o64 = (t.double().cpu() for t in (q, k, v, do, o))
    ro, rlse = ref.forward(q64, k64, v64, 3, "zeros", scale)
    shift = (do64 * ro).sum(-1) - (do64 * o64).sum(-1)  # the reference's Di minus the kernels'
    exact = ref.backward(do64, shift, q64, k64, v64, ro, rlse, 3, "zeros", scale)
    for name, a, x in zip(("dq", "dk", "dv"), got, exact):
        ulp = torch.ldexp(torch.ones_like(x), (torch.frexp(x)[1] - 11).clamp(min=-24))  # float16's at x
        err = (a.cpu().double() - x).abs() - 1e-5 * x.abs().max()
        assert bool((err <= 0.5 * ulp).all()), f"{name}: {(err / ulp).max().item():.3f} ulp off"
