"""The shared index maps of csrc/include/fastnca/borders.h against their definitions:
perception padding against torch.nn.functional.pad, attention borders against the
reference backend, and the inverse neighbourhood used by every backward kernel."""
import pytest
import torch
import torch.nn.functional as F

from fastnca import _ext
from fastnca.kernels.reference.neighborhood_attention import key_indices

C = _ext.load("_C")
pytestmark = pytest.mark.skipif(C is None, reason=str(_ext.error("_C")))

TORCH_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@pytest.mark.parametrize("padding", list(_ext.PADDING_CODES))
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_pad_index_matches_torch_pad(padding, n):
    if padding == "reflect" and n < 2:
        pytest.skip("reflect needs n >= 2")
    row = torch.arange(1, n + 1, dtype=torch.float64).view(1, 1, n)
    padded = F.pad(row, (1, 1), mode=TORCH_PAD[padding]).view(-1)
    for p in range(-1, n + 1):
        src = C.pad_index(p, n, _ext.PADDING_CODES[padding])
        assert padded[p + 1].item() == (0.0 if src < 0 else float(src + 1)), (p, src)


@pytest.mark.parametrize("border", list(_ext.BORDER_CODES))
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_key_index_matches_reference(border, kernel_size, n):
    if border == "shift" and n < kernel_size:
        pytest.skip("shift needs n >= kernel_size")
    r = kernel_size // 2
    ref = key_indices(n, kernel_size, border, "cpu")
    code = _ext.BORDER_CODES[border]
    got = torch.tensor([[C.key_index(i, a, n, r, code) for a in range(-r, r + 1)] for i in range(n)])
    assert torch.equal(got, ref)


@pytest.mark.parametrize("border", list(_ext.BORDER_CODES))
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_query_range_covers_inverse_neighbourhood(border, kernel_size, n):
    """For every key j and offset a, the scanned candidates hold exactly the queries i
    with key_index(i, a) == j (so gathers neither miss nor double-count)."""
    if border == "shift" and n < kernel_size:
        pytest.skip("shift needs n >= kernel_size")
    r, code = kernel_size // 2, _ext.BORDER_CODES[border]
    for j in range(n):
        for a in range(-r, r + 1):
            lo, hi = C.query_range(j, a, n, r, code)
            found = [i for i in range(lo, hi + 1) if 0 <= i < n and C.key_index(i, a, n, r, code) == j]
            truth = [i for i in range(n) if C.key_index(i, a, n, r, code) == j]
            assert found == truth, (j, a, lo, hi)


@pytest.mark.parametrize("n", [(1 << 29) + 3, 1 << 30, (1 << 30) + 5, (1 << 31) - 4])
def test_index_maps_on_axes_past_2_30(n):
    """The circular and reflect maps near both edges of long axes, against Python's arithmetic.
    Past 2^30 (which the CUDA kernels allowed before capping attention's H and W at 2^30),
    (v % n) + n overflowed int: key_index(n - 5, 0, 2^30 + 5) gave -1073741814."""
    circ, refl = _ext.BORDER_CODES["circular"], _ext.PADDING_CODES["reflect"]
    big = (1 << 31) - 1  # the padding maps hold up to int's limit
    assert C.pad_index(big, big, refl) == big - 2 and C.pad_index(big, big, _ext.PADDING_CODES["circular"]) == 0
    assert C.pad_index(n, n, refl) == n - 2 and C.pad_index(-1, n, refl) == 1
    assert C.pad_index(n, n, _ext.PADDING_CODES["circular"]) == 0
    assert C.pad_index(-1, n, _ext.PADDING_CODES["circular"]) == n - 1
    for r in (1, 2, 3):
        for i in (0, 1, r, n - 1 - r, n - 2, n - 1):
            for a in range(-r, r + 1):
                assert C.key_index(i, a, n, r, circ) == (i + a) % n, (i, a, r)
                assert C.query_range(i, a, n, r, circ) == ((i - a) % n,) * 2, (i, a, r)
