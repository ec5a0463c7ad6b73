"""Every memory access of the Triton kernels stays inside the tensors it was given.

Under TRITON_INTERPRET=1 a checker wraps the interpreter's loads and stores: each active
lane's address must fall inside the storage of one tensor argument of that launch, and one
load or store must not span two of them. Masked-off lanes are not checked (they are not
accessed on a GPU either); an out-of-range active lane is reported and then masked, so one
run lists every violation. This is the CPU's stand-in for compute-sanitizer memcheck,
which needs a GPU; it runs the nca kernels in every backward mode and the attention
kernels in every formulation, on small odd grids where tiles are mostly padding.
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

triton = pytest.importorskip("triton")
np = pytest.importorskip("numpy")

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from fastnca.kernels.triton import nca_step as tri  # noqa: E402
from fastnca.kernels.triton import neighborhood_attention as tri_na  # noqa: E402

from test_nca_step_triton import make_inputs  # noqa: E402

if not tri.interpreting():
    pytest.skip("the address checker wraps the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
_builder = getattr(interpreter, "InterpreterBuilder", None)
_executor = getattr(interpreter, "GridExecutor", None)
if not all(hasattr(c, a) for c, a in ((_builder, "create_masked_load"), (_builder, "create_masked_store"),
                                      (_executor, "_init_args_hst"))):
    pytest.skip("this Triton's interpreter lacks the hooks the checker wraps", allow_module_level=True)


class _Report(list):
    """The violations: (kernel, load/store, source lines, lanes outside every argument,
    allocations one access touched); ``accesses`` counts the checked loads and stores."""
    accesses = 0


@contextlib.contextmanager
def address_checker():
    """Yields a _Report, filled while the block runs."""
    ranges, found = [], _Report()
    init, load, store = _executor._init_args_hst, _builder.create_masked_load, _builder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args, kw = init(self, args_dev, kwargs)
        ranges.clear()
        for t in (*args, *kw.values()):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        ranges.append(self.fn.__name__)
        return args, kw

    def checked(ptrs, mask, dtype, kind):
        found.accesses += 1
        p = np.asarray(ptrs.data).astype(np.uint64)
        m = np.broadcast_to(np.asarray(mask.data).astype(bool), p.shape)
        size = np.uint64(np.dtype(dtype).itemsize)
        bounds = np.array(ranges[:-1], dtype=np.uint64).reshape(-1, 2)
        inside = (p[..., None] >= bounds[:, 0]) & (p[..., None] + size <= bounds[:, 1])
        ok = inside.any(-1)
        which = {int(i) for i in np.argmax(inside, -1)[m & ok].ravel()}
        if (m & ~ok).any() or len(which) > 1:
            lines = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack() if "kernels/triton" in f.filename]
            found.append((ranges[-1], kind, " <- ".join(lines[::-1][:3]), int((m & ~ok).sum()), len(which)))
        return interpreter.TensorHandle(np.ascontiguousarray(m & ok), mask.dtype)

    def masked_load(self, ptrs, mask, other, *rest):
        dtype = interpreter._get_np_dtype(ptrs.get_element_ty())
        mask = checked(ptrs, mask, dtype, "load")
        if other is None:
            other = interpreter.TensorHandle(np.zeros(np.asarray(ptrs.data).shape, dtype=dtype), ptrs.get_element_ty())
        return load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        mask = checked(ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()), "store")
        return store(self, ptrs, value, mask, *rest)

    _executor._init_args_hst, _builder.create_masked_load, _builder.create_masked_store = (
        init_args, masked_load, masked_store)
    try:
        yield found
    finally:
        _executor._init_args_hst, _builder.create_masked_load, _builder.create_masked_store = init, load, store


@triton.jit
def _shifted_copy(x_ptr, out_ptr, SHIFT: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.load(x_ptr + i + SHIFT))


def test_checker_sees_an_access_outside_its_arguments():
    """Negative control: a load one element past its tensor is reported (lanes outside),
    an in-bounds one is not."""
    x, out = torch.randn(16), torch.empty(16)
    with address_checker() as found:
        _shifted_copy[(1,)](x, out, SHIFT=0, N=16)
    assert not found and found.accesses == 2
    with address_checker() as found:
        _shifted_copy[(1,)](x, out, SHIFT=1, N=16)
    assert [f[:2] for f in found] == [("_shifted_copy", "load")] and found[0][3] >= 1, found


NCA_CASES = [
    (1, 3, 2, 2, 5, 3, "C", 3, "reflect", 0.5),    # every channel frozen
    (2, 1, 3, 5, 1, 3, 1, 0, "replicate", 0.5),    # C = 1, hidden = 1
    (1, 3, 1, 3, 5, 2, 1, 0, "circular", 1.0),     # H = 1
    (2, 8, 6, 7, 40, 2, 1, 1, "reflect", 0.5),     # hidden 40: three chunks of 16, padded units
    (1, 8, 5, 6, 48, 3, "C", 2, "zeros", 0.0),     # nothing fires
    (1, 64, 3, 5, 64, 2, 1, 2, "reflect", 1.0),    # several channel chunks
]
NCA_MODES = {"default": {}, "gemm": {"FASTNCA_TRITON_NCA_BWD_ACC": "gemm", "FASTNCA_TRITON_NCA_BWD_HCHUNK": "16"},
             "chunked": {"FASTNCA_TRITON_NCA_BWD_ACC": "chunked", "FASTNCA_TRITON_NCA_BWD_HCHUNK": "16"},
             "memory": {"FASTNCA_TRITON_NCA_BWD_ACC": "memory"},
             "fp32-weights": {"FASTNCA_TRITON_NCA_HALF_WEIGHTS": "0"}}


@pytest.mark.parametrize("mode", list(NCA_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nca_kernels_stay_in_bounds(monkeypatch, mode, dtype):
    for name, value in NCA_MODES[mode].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")  # the GPU's product paths
    monkeypatch.setattr(tri, "_INTERPRETER_BF16_DOTS", True)
    monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 40)  # the compact forward on the larger cases
    with address_checker() as found:
        for B, C, H, W, hidden, F, g, frozen, padding, p in NCA_CASES:
            g = C if g == "C" else g
            state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, g, frozen, dtype, dtype, dtype != torch.float32)
            args = (*w, g, padding, p, 7, 3, frozen)
            tri.forward(state, *args)
            tri.backward(grad_out, state, *args)
    assert not found and found.accesses > 1000, (found, found.accesses)


NA_MODES = {"window": {}, "split": {"FASTNCA_TRITON_NA_BACKWARD": "split"},
            "halo": {"FASTNCA_TRITON_NA_FORWARD": "halo", "FASTNCA_TRITON_NA_BACKWARD": "halo"}}


@pytest.mark.parametrize("mode", list(NA_MODES))
@pytest.mark.parametrize("border", ["zeros", "mask", "circular", "shift"])
def test_attention_kernels_stay_in_bounds(monkeypatch, mode, border):
    for name, value in NA_MODES[mode].items():
        monkeypatch.setenv(name, value)
    with address_checker() as found:
        for (B, H, W, nh, D), ks, dtype in [((1, 3, 5, 2, 5), 3, torch.float32), ((2, 5, 6, 1, 16), 5, torch.bfloat16),
                                            ((1, 7, 7, 3, 3), 7, torch.float16)]:
            if border == "shift" and min(H, W) < ks:
                H = W = ks
            qkv = torch.randn(B, H, W, 3, nh, D, dtype=dtype)
            q, k, v = qkv.unbind(3)  # strided views of one packed tensor
            o, lse = tri_na.forward(q, k, v, ks, border, D ** -0.5)
            tri_na.backward(torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, ks, border, D ** -0.5)
    assert not found and found.accesses > 100, (found, found.accesses)
