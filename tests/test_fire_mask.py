"""fire_mask: Philox4x32-10 known answers in every language, bit-identity across
backends, statistics, and argument checks."""
import pytest
import torch

import fastnca
from fastnca import _ext
from fastnca.kernels.reference.fire_mask import philox4x32_10

from conftest import fast_backends, fire_bits

# DESIGN.md, Op 1: (key; counter) -> output, from Random123's known-answer tests.
KAT = [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("key,ctr,expected", KAT)
def test_philox_known_answers_python(key, ctr, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = philox4x32_10(*words, *key)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("key,ctr,expected", KAT)
def test_philox_known_answers_cpp(key, ctr, expected):
    C = _ext.load("_C")
    if C is None:
        pytest.skip(_ext.error("_C"))
    assert tuple(C.philox4x32_10(*ctr, *key)) == expected


try:
    import triton
    import triton.language as tl

    from fastnca.kernels.triton._philox import philox4x32_10 as tl_philox

    @triton.jit
    def _kat_kernel(ctr_ptr, key_ptr, out_ptr):
        i = tl.arange(0, 4)
        r0, r1, r2, r3 = tl_philox(
            tl.load(ctr_ptr + i * 4), tl.load(ctr_ptr + i * 4 + 1), tl.load(ctr_ptr + i * 4 + 2),
            tl.load(ctr_ptr + i * 4 + 3), tl.load(key_ptr + i * 2), tl.load(key_ptr + i * 2 + 1))
        tl.store(out_ptr + i * 4, r0)
        tl.store(out_ptr + i * 4 + 1, r1)
        tl.store(out_ptr + i * 4 + 2, r2)
        tl.store(out_ptr + i * 4 + 3, r3)
    from fastnca.kernels.triton._philox import fire_bits as tl_fire_bits

    @triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step_lo"])
    def _fire_bits_kernel(cell_ptr, out_ptr, seed_lo, seed_hi, step_lo, N: tl.constexpr):
        i = tl.arange(0, N)  # the words as the mask kernel passes them
        bits = tl_fire_bits(tl.load(cell_ptr + i), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), step_lo.to(tl.uint32))
        tl.store(out_ptr + i, bits.to(tl.int32))
except ImportError:
    _kat_kernel = _fire_bits_kernel = None

# Cell indices no test-sized mask reaches: the counter's high word (i >> 32) at work.
HIGH_CELLS = [0, 5, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**63 - 1, 7]


def _fire_bits_by_definition(cells, seed, step):
    """DESIGN.md: Philox4x32-10, key (seed lo, seed hi), counter (i lo, i hi, step lo, 0)."""
    from fastnca.kernels.reference.fire_mask import philox4x32_10

    c = torch.tensor(cells, dtype=torch.int64)
    out0, *_ = philox4x32_10(c & 0xFFFFFFFF, c >> 32, torch.full_like(c, step & 0xFFFFFFFF),
                             torch.zeros_like(c), seed & 0xFFFFFFFF, seed >> 32)
    return (out0 >> 8).tolist()


def test_fire_bits_of_cells_past_2_32():
    """Cells at 2^32 and beyond draw with the counter's high word (a mask of 2^32 cells, 4 GB,
    fits a GPU): the reference, the C++ kernels' philox.h (CPU and CUDA) and Triton's."""
    from fastnca.kernels.reference.fire_mask import fire_bits_of

    seed, step = 0x0123_4567_89AB_CDEF, 77
    want = _fire_bits_by_definition(HIGH_CELLS, seed, step)
    assert len(set(want)) == len(want)  # the high word changes the draw (5 and 2^32 + 5 differ)
    assert fire_bits_of(torch.tensor(HIGH_CELLS), seed, step).tolist() == want
    C = _ext.load("_C")
    if C is not None:
        assert [C.fire_bits(seed, c, step) for c in HIGH_CELLS] == want
    if fastnca.backends()["triton"] is True and _fire_bits_kernel is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = torch.empty(len(HIGH_CELLS), dtype=torch.int32, device=device)
        _fire_bits_kernel[(1,)](torch.tensor(HIGH_CELLS, device=device), out, seed & 0xFFFFFFFF, seed >> 32, step,
                                N=len(HIGH_CELLS))
        assert out.cpu().tolist() == want


def test_philox_known_answers_triton():
    if fastnca.backends()["triton"] is not True or _kat_kernel is None:
        pytest.skip(str(fastnca.backends()["triton"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = KAT + [KAT[0]]  # pad to a power of two

    def as_u32(xs):
        return torch.tensor([x - (1 << 32) if x >= (1 << 31) else x for x in xs],
                            dtype=torch.int32, device=device).view(torch.uint32)

    ctr = as_u32([c for _, cs, _ in rows for c in cs])
    key = as_u32([k for ks, _, _ in rows for k in ks])
    out = torch.empty(16, dtype=torch.int32, device=device).view(torch.uint32)
    _kat_kernel[(1,)](ctr, key, out)
    got = [int(x) & 0xFFFFFFFF for x in out.view(torch.int32).cpu().tolist()]
    for r, (_, _, expected) in enumerate(KAT):
        assert tuple(got[r * 4:(r + 1) * 4]) == expected


def test_fire_mask_definition():
    """Cell (b, y, x) of step s fires iff (Philox(key=seed; ctr=(i, 0, s, 0))[0] >> 8) * 2^-24 < p."""
    seed, step, p = 0x1234_5678_9ABC_DEF0, 77, 0.3
    B, H, W = 2, 3, 5
    mask = fastnca.fire_mask(B, H, W, p, seed, step, backend="reference")
    C = _ext.load("_C")
    if C is None:
        pytest.skip(_ext.error("_C"))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                i = (b * H + y) * W + x
                out0 = C.philox4x32_10(i, 0, step, 0, seed & 0xFFFFFFFF, seed >> 32)[0]
                assert bool(mask[b, y, x]) == ((out0 >> 8) * 2.0**-24 < p)


@pytest.mark.parametrize("backend", fast_backends("fire_mask"))
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 7, 2**63 + 12345, 2**64 - 1])
@pytest.mark.parametrize("step", [0, 5, 2**31 + 3])
def test_fire_mask_bit_identical(backend, seed, step):
    from conftest import device_for

    dev = device_for(backend)
    for shape, p in (((1, 1, 1), 0.5), ((3, 17, 31), 0.37), ((2, 64, 65), 0.9)):
        ref = fastnca.fire_mask(*shape, p, seed, step, backend="reference")
        got = fastnca.fire_mask(*shape, p, seed, step, device=dev, backend=backend)
        assert got.dtype == torch.bool and got.shape == shape
        assert torch.equal(got.cpu(), ref)


BOUNDARY = (2**40 + 11, 2**32 + 9)  # (seed, step); only step mod 2^32 enters the counter


@pytest.mark.parametrize("backend", ["reference", *fast_backends("fire_mask")])
def test_fire_mask_boundary_in_every_kernel(backend):
    """u < p exactly, in each backend's kernel: at p = bits(c) * 2^-24 cell c does not fire,
    at p = (bits(c) + 1) * 2^-24 it does (random p meets this edge once in 2^24 cells)."""
    from conftest import device_for

    seed, step = BOUNDARY
    bits = fire_bits(20, seed, step)
    for c in (0, 7, 19):
        for k, fires in ((bits[c], False), (bits[c] + 1, True)):
            m = fastnca.fire_mask(1, 4, 5, k * 2.0**-24, seed, step, device=device_for(backend), backend=backend)
            assert bool(m.view(-1)[c]) == fires, (c, k)
            assert m.view(-1).cpu().tolist() == [b < k for b in bits]


def test_fire_mask_step_wraps_at_2_32():
    """Only step mod 2^32 enters the counter: step 2^32 + 9 draws step 9's mask, 2^33 step 0's."""
    for step, same in ((2**32 + 9, 9), (2**33, 0), (2**64 - 1, 2**32 - 1)):
        assert torch.equal(fastnca.fire_mask(2, 8, 9, 0.5, 3, step, backend="reference"),
                           fastnca.fire_mask(2, 8, 9, 0.5, 3, same, backend="reference"))
    assert not torch.equal(fastnca.fire_mask(2, 8, 9, 0.5, 3, 2**32 + 9, backend="reference"),
                           fastnca.fire_mask(2, 8, 9, 0.5, 3, 10, backend="reference"))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_fire_mask_extremes(p):
    m = fastnca.fire_mask(2, 8, 8, p, seed=3)
    assert bool(m.all()) if p == 1.0 else not bool(m.any())


def test_fire_mask_threshold_is_exact():
    # u = k * 2^-24: with p exactly k / 2^24, cell with bits == k must not fire.
    assert _ext.fire_threshold(0.5) == 1 << 23
    assert _ext.fire_threshold(0.5 + 2.0**-30) == (1 << 23) + 1
    assert _ext.fire_threshold(1.0) == 1 << 24 and _ext.fire_threshold(0.0) == 0


def test_fire_mask_statistics_and_purity():
    m = fastnca.fire_mask(8, 128, 128, 0.25, seed=42, step=3)
    assert abs(m.float().mean().item() - 0.25) < 0.005
    assert torch.equal(m, fastnca.fire_mask(8, 128, 128, 0.25, seed=42, step=3))
    other_step = fastnca.fire_mask(8, 128, 128, 0.25, seed=42, step=4)
    other_seed = fastnca.fire_mask(8, 128, 128, 0.25, seed=43, step=3)
    # Independent draws agree on ~ p^2 + (1-p)^2 = 62.5% of cells.
    for other in (other_step, other_seed):
        assert abs((m == other).float().mean().item() - 0.625) < 0.01
    # The cell index is global: batch element 1 is not a copy of batch element 0.
    assert not torch.equal(m[0], m[1])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(update_prob=1.5), ValueError, "update_prob must be in \\[0, 1\\]"),
    (dict(update_prob=float("nan")), ValueError, "update_prob"),
    (dict(update_prob="0.5"), TypeError, "update_prob"),
    (dict(seed=-1), ValueError, "seed must be in \\[0, 18446744073709551616\\)"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(step=-1), ValueError, "step"),
    (dict(batch=-2), ValueError, "batch"),
    (dict(backend="gpu"), ValueError, "backend must be None or one of"),
])
def test_fire_mask_argument_errors(kwargs, exc, match):
    args = dict(batch=1, height=4, width=4, update_prob=0.5, seed=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fastnca.fire_mask(**args)


def test_backend_errors_name_the_reason():
    status = fastnca.backends()["cuda"]
    if status is True:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        fastnca.fire_mask(1, 2, 2, 0.5, 0, backend="cuda")
