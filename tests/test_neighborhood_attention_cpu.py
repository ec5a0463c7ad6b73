"""The fused C++ CPU neighbourhood-attention kernels (csrc/cpu/neighborhood_attention.cpp)
against the reference: o, lse, dq, dk, dv for every border, kernel size, grid (tiny grids
included), head dim (fast paths and odd sizes), dtype, instruction-set path and packed
strided views; softmax properties; bitwise determinism; fp64 gradcheck; launcher checks."""
import platform

import pytest
import torch

import fastnca
from fastnca import _ext
from fastnca.kernels.reference import neighborhood_attention as ref

cpu = pytest.importorskip("fastnca.kernels.cpu.neighborhood_attention")
if fastnca.backends()["cpu"] is not True:  # pragma: no cover - build without _C
    pytest.skip(f"cpu backend unavailable: {fastnca.backends()['cpu']}", allow_module_level=True)

BORDERS = ["zeros", "mask", "circular", "shift"]
GRIDS = [(1, 1), (2, 2), (3, 5), (8, 8), (31, 17)]
# Normwise error max|a - b| / max(max|b|, 1) allowed against the reference (the floor
# of 1 keeps gradients that vanish exactly, e.g. dq on a 1x1 circular grid, comparable).
REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(a, b, floor=0.05):
    """Max-norm error relative to the reference's largest magnitude, at least ``floor``:
    small outputs (0.1 on tiny zeros-border grids) keep most of their relative bound, and
    a reference that is zero in exact arithmetic (circular 1x1 grids: every key is the
    query's own cell, so dq = 0) is not divided by its rounding noise."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def make(B, H, W, nh, D, dtype=torch.float32, seed=0, packed=False):
    """Fresh random q, k, v (strided views of one packed qkv tensor when packed)."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(B, H, W, 3, nh, D, generator=g, dtype=torch.float64).to(dtype)
        return qkv.unbind(3)
    return [torch.randn(B, H, W, nh, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def check(shape, ks, border, dtype=torch.float32, packed=False, seed=0, lse_grad=True):
    """cpu kernels vs the reference kernels on out, lse, dq, dk, dv (with and without a
    gradient on lse)."""
    B, H, W, nh, D = shape
    q, k, v = make(B, H, W, nh, D, dtype, seed, packed)
    scale = D ** -0.5
    o, lse = cpu.forward(q, k, v, ks, border, scale)
    ro, rlse = ref.forward(q, k, v, ks, border, scale)
    assert o.dtype == dtype and o.is_contiguous() and o.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.is_contiguous()
    tol = REL[dtype]
    assert rel_err(o, ro) <= tol, ("o", rel_err(o, ro))
    assert rel_err(lse, rlse) <= (tol if dtype == torch.float64 else 1e-6), ("lse", rel_err(lse, rlse))  # fp32 for half inputs
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    # fp32/fp64 grads are held to the same bound as o; half grads keep a 2x margin for the
    # rounding of the half inputs to the recomputed probabilities and of the stored grads.
    gtol = tol if dtype in (torch.float32, torch.float64) else 2 * tol
    for gl in ([None, dlse] if lse_grad else [None]):
        got = cpu.backward(do, gl, q, k, v, o, lse, ks, border, scale)
        want = ref.backward(do, gl, q, k, v, ro, rlse, ks, border, scale)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert a.dtype == dtype and a.is_contiguous() and a.shape == q.shape
            floor = 1.0 if border == "circular" and H * W == 1 else 0.05
            err = rel_err(a, b, floor)
            assert err <= gtol, (name, "lse grad" if gl is not None else "", err)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("ks", [3, 5, 7])
@pytest.mark.parametrize("border", BORDERS)
def test_borders_kernel_sizes_grids(border, ks, grid):
    H, W = grid
    if border == "shift" and min(H, W) < ks:
        pytest.skip("shift needs H, W >= kernel_size")
    check((2, H, W, 2, 8), ks, border, seed=ks * 100 + H)


@pytest.mark.parametrize("nh", [1, 6])
@pytest.mark.parametrize("D", [1, 5, 16, 32, 64, 96, 128])
def test_head_dims(D, nh):
    # 32/64/128 are the compile-time paths; the others run with a run-time D.
    check((1, 5, 6, nh, D), 3, "zeros", seed=D + nh)
    check((1, 4, 5, nh, D), 3, "shift", packed=True, seed=D + nh + 1, lse_grad=False)


@pytest.mark.parametrize("nh", [8, 9, 17])
@pytest.mark.parametrize("D", [5, 64])
def test_heads_across_chunk_boundaries(nh, D):
    # The kernels take the heads of a query position in chunks of 8.
    check((1, 4, 5, nh, D), 3, "zeros", packed=True, seed=nh + D)
    check((1, 5, 4, nh, D), 5, "mask", seed=nh + D + 1, lse_grad=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [5, 64])
@pytest.mark.parametrize("border,ks,grid", [("zeros", 3, (7, 9)), ("circular", 5, (3, 4)),
                                            ("mask", 7, (8, 8)), ("shift", 5, (6, 7))])
def test_dtypes(dtype, D, border, ks, grid):
    check((2, *grid, 3, D), ks, border, dtype=dtype, packed=True, seed=D)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512", "avx2-wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_instruction_set_paths(isa, dtype, monkeypatch):
    """Every compiled variant this CPU can run (FASTNCA_CPU_ISA caps the choice); avx2-wide
    is the AVX-512 variant's 16-lane code built for AVX2, for machines without AVX-512."""
    monkeypatch.setenv("FASTNCA_CPU_ISA", isa)
    if cpu.isa() != isa:
        pytest.skip(f"this CPU runs at most {cpu.isa()}")
    for D in (7, 32, 64, 128):
        check((1, 6, 5, 2, D), 3, "zeros", dtype=dtype, packed=True, seed=D)
        check((1, 5, 5, 1, D), 5, "shift", dtype=dtype, seed=D + 1, lse_grad=False)


# (D, kernel_size, border): whole vectors plus a scalar tail. At 8 lanes (avx2, base)
# 9/17/33/65 are 1/2/4/8 vectors + 1 and 139 is 8 + 8 + 1 vectors + 3; at 16 lanes (avx512,
# avx2-wide) 17/33/65 are 1/2/4 vectors + 1 and 139 is 8 vectors + 11.
TAIL_CASES = [(9, 5, "zeros"), (17, 7, "mask"), (33, 3, "circular"), (65, 7, "shift"), (139, 5, "mask")]


@pytest.mark.parametrize("dtype,offset,spread,bound", [(torch.float16, 100.0, 0.05, 5e-3),
                                                       (torch.bfloat16, 100.0, 2.0, 1e-2)])
def test_half_gradients_of_values_with_a_common_offset(dtype, offset, spread, bound):
    """The backward's Di = sum_j p_ij dp_ij - dlse_i comes from the float32 p and dp of the
    recompute (as DESIGN.md, the reference and the CUDA kernel), not from <do_i, o_i> with
    the stored half o: values sharing an offset large against their spread make o's
    rounding swamp dp_ij - Di. Against the float64 reference on the same half inputs
    (2-norm): fp16 dq 3.7e-4, bf16 1.7e-3; from the rounded o they were 0.43 and 0.08."""
    g = torch.Generator().manual_seed(3)
    q, k, do = (torch.randn(1, 8, 8, 2, 64, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    v = (offset + spread * torch.randn(1, 8, 8, 2, 64, generator=g, dtype=torch.float64)).to(dtype)
    dlse = torch.randn(1, 8, 8, 2, generator=g)
    o, lse = cpu.forward(q, k, v, 3, "circular", 0.125)
    d64 = [t.double() for t in (q, k, v)]
    o64, lse64 = ref.forward(*d64, 3, "circular", 0.125)
    for gl in (None, dlse):
        got = cpu.backward(do, gl, q, k, v, o, lse, 3, "circular", 0.125)
        want = ref.backward(do.double(), None if gl is None else gl.double(), *d64, o64, lse64, 3, "circular", 0.125)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err <= bound, (name, gl is not None, err)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512", "avx2-wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_head_dims_with_vector_blocks_and_scalar_tails(isa, dtype, monkeypatch):
    """Head dims of whole vectors and a scalar tail, on every variant this CPU can run
    (test_head_dims' sizes are whole vectors or below one vector: their tails start at 0 or
    are empty). A tail that restarts at element 0 of a key, value or half query/grad_o
    row, or that overwrites the vector part of a dot product, shows here."""
    monkeypatch.setenv("FASTNCA_CPU_ISA", isa)
    if cpu.isa() != isa:
        pytest.skip(f"this CPU runs at most {cpu.isa()}")
    for D, ks, border in TAIL_CASES:
        check((1, 7, 8, 2, D), ks, border, dtype=dtype, packed=D % 2 == 1, seed=D, lse_grad=D < 100)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512", "avx2-wide"])
@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "ftz-daz"])
def test_float16_subnormal_inputs_convert_exactly(isa, flush_denormal, monkeypatch):
    """float16 subnormals (below 2^-14) widen to float32 exactly in the vectorised half
    loads (a conversion that flushed them to zero gave all-zero logits, uniform weights):
    subnormal q against large k, then subnormal k against large q (D = 64: whole vectors
    at 8 and 16 lanes). Forward only: the gradients of such k overflow float16. Also with
    the CPU's flush-to-zero / denormals-are-zero modes on (torch.set_flush_denormal, or a
    library built with -ffast-math, as torch 2.4's inductor kernels were, in the process):
    a float16 subnormal is a normal float32, but a conversion through a float32 denormal
    (a rebias by 2^112) read it as 0 there."""
    monkeypatch.setenv("FASTNCA_CPU_ISA", isa)
    if cpu.isa() != isa:
        pytest.skip(f"this CPU runs at most {cpu.isa()}")
    if flush_denormal:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-denormal mode")
        try:
            _subnormal_case()
        finally:
            torch.set_flush_denormal(False)
    else:
        _subnormal_case()


def _subnormal_case():
    g = torch.Generator().manual_seed(11)
    shape = (1, 5, 6, 2, 64)

    def rnd(s):
        return (torch.randn(shape, generator=g, dtype=torch.float64).clamp(-3.5, 3.5) * s).half()

    tiny, big, v = rnd(2.0 ** -16), rnd(2.0 ** 14), rnd(1.0)
    assert (tiny.abs() < 2 ** -14).all() and (tiny != 0).float().mean() > 0.9 and big.isfinite().all()
    for q, k in ((tiny, big), (big, tiny)):
        assert (0.5 * (q.double() * k.double()).sum(-1)).std() > 0.5  # logits of order 1, not ~0
        o, lse = cpu.forward(q, k, v, 3, "zeros", 0.5)
        ro, rlse = ref.forward(q, k, v, 3, "zeros", 0.5)
        assert rel_err(o, ro) <= REL[torch.float16], ("o", rel_err(o, ro))
        assert rel_err(lse, rlse) <= 1e-6, ("lse", rel_err(lse, rlse))


def _cpuinfo_flags():
    """The CPU feature flags Linux reports, or None (no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), None)


def test_isa_is_the_best_supported_and_requests_cap_it(monkeypatch):
    """Unset (or auto) runs the best variant the CPU supports, as Linux reports its flags
    (an AVX-512 machine that ran avx2 would skip every avx512 test above); FASTNCA_CPU_ISA
    caps it, and base always runs when asked (a request that fell back to the best
    variant would make test_instruction_set_paths skip the portable path)."""
    order = ["base", "avx2", "avx512"]
    monkeypatch.delenv("FASTNCA_CPU_ISA", raising=False)
    best = cpu.isa()
    assert best in order
    flags = _cpuinfo_flags()
    if platform.machine().lower() in ("x86_64", "amd64") and flags is not None:
        expected = ("avx512" if {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"} <= flags
                    else "avx2" if {"avx2", "fma"} <= flags else "base")
        assert best == expected, (best, expected)
    for name in ("auto", ""):
        monkeypatch.setenv("FASTNCA_CPU_ISA", name)
        assert cpu.isa() == best
    for name in order:
        monkeypatch.setenv("FASTNCA_CPU_ISA", name)
        assert cpu.isa() == order[min(order.index(name), order.index(best))], name
    monkeypatch.setenv("FASTNCA_CPU_ISA", "avx2-wide")
    assert cpu.isa() == ("base" if best == "base" else "avx2-wide")
    monkeypatch.setenv("FASTNCA_CPU_ISA", "sse2")
    with pytest.raises(ValueError, match="FASTNCA_CPU_ISA"):
        cpu.isa()


@pytest.mark.parametrize("isa,vector_bytes", [("base", 32), ("avx2", 32), ("avx512", 64), ("avx2-wide", 64)])
def test_each_variant_runs_its_own_vector_width(isa, vector_bytes, monkeypatch):
    """The code a variant runs has that variant's vector width (the kernels' lane count, test
    hook na2d_lanes): 16 float32 lanes for avx512 and for the avx2-wide hook, which must run
    the AVX-512 kernels' 64-byte code on AVX2 (8-lane code there gives the same values, so
    no comparison with the reference sees it), 8 for avx2 and base; float64 half as many."""
    monkeypatch.setenv("FASTNCA_CPU_ISA", isa)
    if cpu.isa() != isa:
        pytest.skip(f"this CPU runs at most {cpu.isa()}")
    mod = cpu._module()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        lanes = vector_bytes // (8 if dtype == torch.float64 else 4)
        for D in (7, 32, 64, 128):
            assert mod.na2d_lanes(_ext.DTYPE_CODES[dtype], D, cpu._isa()) == lanes, (dtype, D)


def _spy_on_kernels(monkeypatch):
    """Record the pointers and strides the compiled kernels receive (then run them)."""
    mod, calls = cpu._module(), {}
    for name in ("na2d_forward", "na2d_backward"):
        def spy(ptrs, strides, *rest, _real=getattr(mod, name), _name=name):
            calls[_name] = (list(ptrs), list(strides))
            return _real(ptrs, strides, *rest)
        monkeypatch.setattr(mod, name, spy)
    return calls


def _strides4(*ts):
    return [s for t in ts for s in t.stride()[:4]]


@pytest.mark.parametrize("public", [False, True], ids=["launcher", "public-op"])
def test_packed_views_are_passed_to_the_kernels_as_is(public, monkeypatch):
    """q/k/v strided views of one packed qkv (only stride(-1) == 1) reach the compiled
    kernels as the views themselves: their own data pointers and strides, forward and
    backward, whether called through the launcher or the public autograd op; grad_o reaches
    backward uncopied too (o is not read there)."""
    calls = _spy_on_kernels(monkeypatch)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 6, 7, 3, 3, 16, generator=g).requires_grad_(public)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous() and q.stride(-1) == 1
    do = torch.randn(q.shape, generator=g)
    if public:
        o = fastnca.neighborhood_attention2d(q, k, v, 3, "zeros", 0.25, backend="cpu")
        torch.autograd.grad(o, qkv, do)
    else:
        o, lse = cpu.forward(q, k, v, 3, "zeros", 0.25)
        cpu.backward(do, None, q, k, v, o, lse, 3, "zeros", 0.25)
    ptrs, strides = calls["na2d_forward"]
    assert ptrs[:3] == [q.data_ptr(), k.data_ptr(), v.data_ptr()] and ptrs[3] == o.data_ptr()
    assert strides == _strides4(q, k, v)
    ptrs, strides = calls["na2d_backward"]
    assert len(ptrs) == 10 and ptrs[:4] == [q.data_ptr(), k.data_ptr(), v.data_ptr(), do.data_ptr()]
    assert strides == _strides4(q, k, v, do)


def test_packed_views_match_contiguous_copies():
    """Strided reads are right: packed views give the results of contiguous copies bit for bit."""
    q, k, v = make(2, 6, 7, 3, 16, packed=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    o, lse = cpu.forward(q, k, v, 3, "zeros", 0.25)
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    oc, lsec = cpu.forward(qc, kc, vc, 3, "zeros", 0.25)
    assert torch.equal(o, oc) and torch.equal(lse, lsec)
    do = torch.randn(q.shape)
    g = cpu.backward(do, None, q, k, v, o, lse, 3, "zeros", 0.25)
    gc = cpu.backward(do, None, qc, kc, vc, oc, lsec, 3, "zeros", 0.25)
    assert all(torch.equal(a, b) for a, b in zip(g, gc))


def test_grad_o_any_strides():
    q, k, v = make(1, 5, 6, 2, 8)
    o, lse = cpu.forward(q, k, v, 3, "mask", 0.3)
    base = torch.randn(1, 5, 6, 8, 2).transpose(-1, -2)  # stride(-1) != 1
    want = ref.backward(base, None, q, k, v, o, lse, 3, "mask", 0.3)
    got = cpu.backward(base, None, q, k, v, o, lse, 3, "mask", 0.3)
    assert all(rel_err(a, b) <= REL[torch.float32] for a, b in zip(got, want))
    expanded = torch.ones(()).expand(q.shape)  # every stride 0, as from o.sum().backward()
    got = cpu.backward(expanded, None, q, k, v, o, lse, 3, "mask", 0.3)
    want = ref.backward(torch.ones(q.shape), None, q, k, v, o, lse, 3, "mask", 0.3)
    assert all(rel_err(a, b) <= REL[torch.float32] for a, b in zip(got, want))


@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("border", ["mask", "circular", "shift"])
def test_softmax_weights_sum_to_one(border, ks):
    q, k, _ = make(2, 7, 9, 3, 5)
    o, _ = cpu.forward(q, k, torch.ones_like(k), ks, border, 0.7)
    torch.testing.assert_close(o, torch.ones_like(o), rtol=0, atol=2e-6)


@pytest.mark.parametrize("ks", [3, 5, 7])
def test_zeros_border_corner_outside_logits_are_exactly_zero(ks):
    """At corner (0, 0) the window has (r+1)^2 inside keys; every other neighbour is a
    zero key with logit exactly 0 inside the softmax (5 of 9 at ks=3)."""
    r = ks // 2
    q, k, v = make(1, 9, 9, 1, 8, dtype=torch.float64, seed=ks)
    o, lse = cpu.forward(q, k, v, ks, "zeros", 8 ** -0.5)
    s = torch.stack([(q[0, 0, 0, 0] @ k[0, y, x, 0]) * 8 ** -0.5 for y in range(r + 1) for x in range(r + 1)])
    n_out = ks * ks - (r + 1) ** 2
    expected = torch.logsumexp(torch.cat([s, torch.zeros(n_out, dtype=torch.float64)]), 0)
    torch.testing.assert_close(lse[0, 0, 0, 0], expected, rtol=1e-14, atol=1e-14)
    p = torch.exp(s - expected)  # the outside entries take mass but contribute zero values
    vin = torch.stack([v[0, y, x, 0] for y in range(r + 1) for x in range(r + 1)])
    torch.testing.assert_close(o[0, 0, 0, 0], p @ vin, rtol=1e-13, atol=1e-13)


def test_gradients_are_bitwise_deterministic():
    """Same inputs -> bitwise same grads, run after run and whatever the thread count."""
    q, k, v = make(2, 12, 11, 3, 64, packed=True, seed=7)
    o, lse = cpu.forward(q, k, v, 3, "zeros", 0.125)
    do = torch.randn(q.shape)
    dlse = torch.randn(lse.shape)
    first = cpu.backward(do, dlse, q, k, v, o, lse, 3, "zeros", 0.125)
    threads = torch.get_num_threads()
    try:
        for t in (threads, 1, 3):
            torch.set_num_threads(t)
            again = cpu.backward(do, dlse, q, k, v, o, lse, 3, "zeros", 0.125)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
            o2, lse2 = cpu.forward(q, k, v, 3, "zeros", 0.125)
            assert torch.equal(o, o2) and torch.equal(lse, lse2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("border,ks,D,calls", [("circular", 7, 4, [1] * 5), ("zeros", 3, 8, [2, 2, 1]),
                                               ("mask", 3, 32, [5])])
def test_backward_workspace_runs_in_batch_chunks(border, ks, D, calls, monkeypatch):
    """The backward's 2*k^2 floats per (cell, head) of workspace stay within q's bytes: batch
    chunks (here with WORKSPACE_MIN_BYTES = 0) give bitwise the gradients of one call, and
    match the reference. Per item: workspace 6*7*2*2*k^2 floats, q 6*7*2*D floats."""
    expected = calls
    q, k, v = make(5, 6, 7, 2, D, packed=True, seed=3)
    o, lse = cpu.forward(q, k, v, ks, border, 0.5)
    g = torch.Generator().manual_seed(4)
    do, dlse = torch.randn(q.shape, generator=g), torch.randn(lse.shape, generator=g)
    whole = cpu.backward(do, dlse, q, k, v, o, lse, ks, border, 0.5)
    calls, real = [], cpu._module().na2d_backward  # the default budget (16 MB): one call

    class Spy:
        def __getattr__(self, name):
            return getattr(cpu._ext.load("_C"), name)

        def na2d_backward(self, ptrs, strides, shape, *args):
            calls.append(shape[0])
            return real(ptrs, strides, shape, *args)

    monkeypatch.setattr(cpu, "WORKSPACE_MIN_BYTES", 0)
    monkeypatch.setattr(cpu, "_module", lambda: Spy())
    chunked = cpu.backward(do, dlse, q, k, v, o, lse, ks, border, 0.5)
    assert calls == expected
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    want = ref.backward(do, dlse, q, k, v, *ref.forward(q, k, v, ks, border, 0.5), ks, border, 0.5)
    for a, b in zip(chunked, want):
        assert rel_err(a, b) <= REL[torch.float32]


@pytest.mark.parametrize("border,ks,grid", [("zeros", 3, (3, 4)), ("mask", 5, (2, 3)),
                                            ("circular", 3, (1, 2)), ("circular", 5, (2, 2)),
                                            ("shift", 3, (3, 4))])
def test_gradcheck_fp64_through_public_op(border, ks, grid):
    q, k, v = (t.requires_grad_() for t in make(1, *grid, 2, 3, dtype=torch.float64, seed=ks))

    def f(q, k, v):
        return fastnca.neighborhood_attention2d(q, k, v, ks, border, return_lse=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dispatch_picks_cpu_for_cpu_tensors():
    from fastnca import _backend
    assert _backend.resolve(None, "neighborhood_attention", torch.device("cpu")) == "cpu"


LAUNCH_ERRORS = [
    (dict(k=torch.zeros(1, 4, 4, 8, 2).transpose(-1, -2)), ValueError, "stride 1 along D"),
    (dict(v=torch.zeros(1, 4, 4, 2, 8, dtype=torch.float64)), TypeError, "dtypes differ"),
    (dict(q=torch.zeros(1, 4, 4, 2, 8, dtype=torch.int32)), TypeError, "must be float32"),
    (dict(q=torch.zeros(1, 4, 4, 2)), ValueError, r"must be \[B, H, W, heads, D\]"),
    (dict(k=torch.zeros(1, 4, 5, 2, 8)), ValueError, "shapes differ"),
    (dict(ks=4), ValueError, "kernel_size must be 3, 5 or 7"),
    (dict(border="reflect"), ValueError, "unknown border"),
    (dict(border="shift", ks=5), ValueError, "border='shift' needs H, W >= 5"),
    (dict(q=torch.zeros(0, 4, 4, 2, 8)), ValueError, "is empty"),
]


@pytest.mark.parametrize("override,exc,match", LAUNCH_ERRORS)
def test_launcher_checks_fail_loudly(override, exc, match):
    args = dict(q=torch.zeros(1, 4, 4, 2, 8), k=torch.zeros(1, 4, 4, 2, 8), v=torch.zeros(1, 4, 4, 2, 8),
                ks=3, border="zeros")
    args.update(override)
    with pytest.raises(exc, match=match):
        cpu.forward(args["q"], args["k"], args["v"], args["ks"], args["border"], 1.0)


def test_compiled_module_checks_fail_loudly():
    from fastnca import _ext
    m = _ext.load("_C")
    with pytest.raises(ValueError, match="kernel_size"):
        m.na2d_forward([1] * 5, [1] * 12, [1, 1, 1, 1, 1], 9, 0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="null pointer"):
        m.na2d_forward([0] * 5, [1] * 12, [1, 1, 1, 1, 1], 3, 0, 1.0, 0, 1)
    with pytest.raises(ValueError, match="shift"):
        m.na2d_forward([1] * 5, [1] * 12, [1, 2, 2, 1, 1], 3, 3, 1.0, 0, 1)


def test_outputs_stay_on_the_inputs_device_under_a_default_device():
    """torch.set_default_device must not move the launcher's outputs and workspaces off the
    CPU (they were allocated without device=: a null pointer error under "meta", and the
    CPU kernel would have been handed CUDA addresses under "cuda")."""
    q, k, v = (torch.randn(1, 3, 4, 2, 8, requires_grad=True) for _ in range(3))
    expected = fastnca.neighborhood_attention2d(q, k, v, backend="reference")
    torch.set_default_device("meta")
    try:
        o = fastnca.neighborhood_attention2d(q, k, v, backend="cpu")
        grads = torch.autograd.grad(o.sum(), (q, k, v))
    finally:
        torch.set_default_device(None)
    assert o.device.type == "cpu" and all(t.device.type == "cpu" for t in grads)
    torch.testing.assert_close(o, expected)

