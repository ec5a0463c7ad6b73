"""neighborhood_attention2d: the reference against naive loops for every border and
kernel size, properties, gradients, the memory contract, argument checks, and every
fast backend against the reference."""

import math

import pytest
import torch

import fastnca
from conftest import assert_close, copies_of, device_for, fast_backends, graph_held, mentions

BORDERS = ["zeros", "mask", "circular", "shift"]


def make_qkv(B, H, W, nh, D, dtype=torch.float32, device="cpu", seed=0, packed=False, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    if packed:  # strided views of one packed QKV projection, as a model produces them
        qkv = torch.randn(B, H, W, 3, nh, D, generator=g, dtype=torch.float64).to(dtype).to(device)
        qkv.requires_grad_(requires_grad)
        return qkv.unbind(3)
    return [torch.randn(B, H, W, nh, D, generator=g, dtype=torch.float64).to(dtype).to(device)
            .requires_grad_(requires_grad) for _ in range(3)]


def naive(q, k, v, ks, border, scale):
    B, H, W, nh, D = q.shape
    r = ks // 2
    q, k, v = q.double(), k.double(), v.double()
    o = torch.zeros_like(q)
    lse = torch.zeros(B, H, W, nh, dtype=torch.float64)

    def coord(i, a, n):
        if border == "circular":
            return (i + a) % n
        if border == "shift":
            return min(max(i, r), n - 1 - r) + a
        return i + a if 0 <= i + a < n else None

    for b in range(B):
        for y in range(H):
            for x in range(W):
                for h in range(nh):
                    logits, values = [], []
                    for a in range(-r, r + 1):
                        for c in range(-r, r + 1):
                            ky, kx = coord(y, a, H), coord(x, c, W)
                            if ky is None or kx is None:
                                if border == "zeros":  # zero key, logit 0; zero value
                                    logits.append(torch.tensor(0.0, dtype=torch.float64))
                                    values.append(torch.zeros(D, dtype=torch.float64))
                                continue
                            logits.append(scale * q[b, y, x, h] @ k[b, ky, kx, h])
                            values.append(v[b, ky, kx, h])
                    s = torch.stack(logits)
                    p = torch.softmax(s, 0)
                    o[b, y, x, h] = p @ torch.stack(values)
                    lse[b, y, x, h] = torch.logsumexp(s, 0)
    return o, lse


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("ks", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (1, 2, 3, 2, 3), (2, 5, 7, 1, 8), (1, 7, 8, 2, 4)])
def test_reference_matches_naive_loops(border, ks, shape):
    B, H, W, nh, D = shape
    if border == "shift" and min(H, W) < ks:
        pytest.skip("shift needs H, W >= kernel_size")
    q, k, v = make_qkv(*shape, dtype=torch.float64)
    o, lse = fastnca.neighborhood_attention2d(q, k, v, ks, border, return_lse=True, backend="reference")
    eo, else_ = naive(q, k, v, ks, border, D ** -0.5)
    torch.testing.assert_close(o, eo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, else_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("D", [1, 3, 8, 64])
def test_reference_head_dims_and_scale(D):
    q, k, v = make_qkv(1, 3, 4, 2, D, dtype=torch.float64, seed=D)
    o = fastnca.neighborhood_attention2d(q, k, v, 3, "mask", scale=0.3, backend="reference")
    torch.testing.assert_close(o, naive(q, k, v, 3, "mask", 0.3)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *fast_backends("neighborhood_attention")])
@pytest.mark.parametrize("border", ["mask", "circular", "shift"])
@pytest.mark.parametrize("ks", [3, 5])
def test_softmax_weights_sum_to_one(backend, border, ks):
    """With v = 1 the output is the sum of the window's softmax weights: 1 (border zeros
    gives its outside keys zero values, so its sum is below 1 at the edges)."""
    dev = device_for(backend)
    q, k, _ = make_qkv(2, 7, 9, 3, 8, device=dev)
    o = fastnca.neighborhood_attention2d(q, k, torch.ones_like(k), ks, border, backend=backend)
    torch.testing.assert_close(o, torch.ones_like(o), rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", *fast_backends("neighborhood_attention")])
def test_zeros_border_corner_logits_are_zero(backend):
    """At the (0, 0) corner 5 of the 9 neighbours are outside: each is a zero key with
    logit exactly 0, so the corner's lse is logsumexp(4 inside logits, 0 x 5)."""
    dev = device_for(backend)
    dtype = torch.float64 if backend in ("reference", "cpu") else torch.float32
    q, k, v = make_qkv(1, 4, 4, 1, 8, dtype=dtype, device=dev)
    _, lse = fastnca.neighborhood_attention2d(q, k, v, 3, "zeros", return_lse=True, backend=backend)
    qd, kd = q.double().cpu(), k.double().cpu()
    s = [(qd[0, 0, 0, 0] @ kd[0, y, x, 0]) * 8 ** -0.5 for y in (0, 1) for x in (0, 1)]
    expected = torch.logsumexp(torch.stack(s + [torch.tensor(0.0, dtype=torch.float64)] * 5), 0)
    tol = 1e-14 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lse[0, 0, 0, 0].double().cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["reference", *fast_backends("neighborhood_attention")])
@pytest.mark.parametrize("D", [1, 4])
def test_infinite_logits_follow_logsumexp(backend, D):
    """Windows with infinite logits, alike on every backend: lse is torch.logsumexp's (+inf
    with a +inf logit; -inf where every logit in the softmax is -inf, whose output is NaN);
    under zeros the outside keys keep logit exactly 0 beside an infinite query (lse log 8,
    output 0 at a 1x1 grid). The kernels gave NaN lse, the Triton k=3 mask kernel a finite
    output of the clamped cell, the reference a NaN zero-key logit (inf * 0)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    inf = float("inf")

    def run(q, k, border, ks=3):
        v = torch.rand(q.shape, generator=g)
        o, lse = fastnca.neighborhood_attention2d(q.to(dev), k.to(dev), v.to(dev), ks, border, return_lse=True,
                                                  backend=backend)
        return o.cpu(), lse.cpu()

    ones = torch.ones(1, 1, 1, 1, D)
    o, lse = run(ones, -inf * ones, "mask")  # the only logit -inf
    assert o.isnan().all() and lse.item() == -inf
    o, lse = run(ones, inf * ones, "mask")  # the only logit +inf
    assert lse.item() == inf
    o, lse = run(-inf * ones, ones, "zeros")  # inside -inf, 8 zero keys at logit 0
    assert torch.equal(o, torch.zeros_like(o)) and lse.item() == pytest.approx(math.log(8))
    for ks in (3, 5):  # a row of 9: cell 0's in-grid logits all -inf, the others finite
        q = torch.rand(1, 1, 9, 1, D, generator=g) + 0.5
        q[0, 0, 0] = inf
        k = -torch.rand(1, 1, 9, 1, D, generator=g) - 0.5
        k[0, 0, 3:] = torch.rand(6, 1, D, generator=g)
        o, lse = run(q, k, "mask", ks)
        assert o[0, 0, 0].isnan().all() and lse[0, 0, 0].item() == -inf, (ks, o[0, 0, 0], lse[0, 0, 0])
        assert o[0, 0, 5:].isfinite().all() and lse[0, 0, 5:].isfinite().all()


def _dense_in_order(shape, order, g):
    """A dense [B, H, W, heads, D] tensor whose dims are stored in ``order`` (D last, so its
    stride is 1): the same shape as a contiguous one, other strides."""
    t = torch.randn([shape[i] for i in order], generator=g, dtype=torch.float64).float()
    return t.permute([order.index(i) for i in range(len(order))])


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("ks", [3, 5])
def test_each_input_is_read_through_its_own_strides(backend, border, ks):
    """q, k, v, grad_o and grad_lse dense in different dim orders (a kernel that read v, or
    grad_o, through k's or q's strides gives other numbers; packed views share theirs), and
    the stride-0 grad_lse of lse.sum()."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(ks)
    shape = (2, 5, 6, 2, 8)
    q, k, v, do = (_dense_in_order(shape, order, g).to(dev) for order in
                   ((0, 1, 2, 3, 4), (0, 2, 1, 3, 4), (3, 1, 0, 2, 4), (1, 0, 3, 2, 4)))
    assert len({t.stride() for t in (q, k, v, do)}) == 4
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_(True) for t in (q, k, v)]
    dlse = _dense_in_order(shape[:4], (2, 0, 3, 1), g).to(dev)
    o, lse = fastnca.neighborhood_attention2d(*leaves, ks, border, return_lse=True, backend=backend)
    got = (o, lse, *torch.autograd.grad((o, lse), leaves, (do, dlse), retain_graph=True),
           *torch.autograd.grad((o * do).sum() + lse.sum(), leaves))
    ref_leaves = [t.detach().cpu().double().contiguous().requires_grad_(True) for t in (q, k, v)]
    ro, rlse = fastnca.neighborhood_attention2d(*ref_leaves, ks, border, return_lse=True, backend="reference")
    do64 = do.cpu().double()
    want = (ro, rlse, *torch.autograd.grad((ro, rlse), ref_leaves, (do64, dlse.cpu().double()), retain_graph=True),
            *torch.autograd.grad((ro * do64).sum() + rlse.sum(), ref_leaves))
    names = ("o", "lse", "dq", "dk", "dv", "dq (lse.sum)", "dk (lse.sum)", "dv (lse.sum)")
    for name, a, b in zip(names, got, want):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
@pytest.mark.parametrize("ks,border", [(3, "zeros"), (5, "mask"), (7, "circular")])
def test_large_logits(backend, ks, border):
    """Logits in the hundreds (q and k scaled by 20): the softmax needs the window's true
    maximum (a partial one overflows exp); o and lse hold float32 accuracy against float64
    of the same inputs, relative to the logits' size for lse."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(ks)
    q, k, v = (torch.randn(1, 8, 8, 2, 16, generator=g, dtype=torch.float64).float() for _ in range(3))
    q, k = 20 * q, 20 * k
    o, lse = fastnca.neighborhood_attention2d(q.to(dev), k.to(dev), v.to(dev), ks, border, return_lse=True,
                                              backend=backend)
    ro, rlse = fastnca.neighborhood_attention2d(q.double(), k.double(), v.double(), ks, border,
                                                return_lse=True, backend="reference")
    assert rlse.abs().max() > 200
    assert_close(o, ro, torch.float32, "o", scale=10.0)  # exp(s - lse) carries lse's rounding, ~eps * 400
    assert_close(lse, rlse, torch.float32, "lse")


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_scale_multiplies_the_finished_logit(backend):
    """The logit is scale * <q, k>, the scale applied to the finished dot product (any
    |scale| <= FLT_MAX is accepted): with scale 1.5e38 and <q, k> = 1 the logit is finite,
    while scaling an operand first (q * scale, as the triton kernels did) overflows a
    partial product to inf and gives a NaN output and NaN gradients."""
    dev = device_for(backend)
    q, k, v = (torch.tensor(t, device=dev).view(1, 1, 1, 1, 2).requires_grad_()
               for t in ([2.0, 2.0], [1.5, -1.0], [3.0, 4.0]))
    o, lse = fastnca.neighborhood_attention2d(q, k, v, 3, "zeros", 1.5e38, return_lse=True, backend=backend)
    # the one key in the grid has logit 1.5e38, the 8 zero keys outside it logit 0
    assert torch.equal(o.detach().cpu().flatten(), torch.tensor([3.0, 4.0]))
    assert lse.item() == pytest.approx(1.5e38, rel=1e-6)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads), grads


def very_negative_inputs(ks: int):
    """float64 q, k, v, grad_o [1, 5, 6, 2, 8] whose every logit (scale 8^-0.5) lies near -120."""
    g = torch.Generator().manual_seed(ks)
    shape = (1, 5, 6, 2, 8)
    q = 6 + torch.rand(shape, generator=g, dtype=torch.float64)
    k = -6 - torch.rand(shape, generator=g, dtype=torch.float64)
    v, do = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, do


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
@pytest.mark.parametrize("ks", [3, 5])
def test_very_negative_logits(backend, ks):
    """Every logit of every window near -120, mask border: exp underflows unless the
    softmax subtracts its own window's max (a max that also took the outside keys' slots at
    0 gave lse -inf and NaN outputs at the border cells). o, lse and the gradients stay
    finite and float64's."""
    dev = device_for(backend)
    q, k, v, do = very_negative_inputs(ks)
    leaves = [t.float().to(dev).requires_grad_(True) for t in (q, k, v)]
    o, lse = fastnca.neighborhood_attention2d(*leaves, ks, "mask", return_lse=True, backend=backend)
    got = (o, lse, *torch.autograd.grad(o, leaves, do.float().to(dev)))
    ref_leaves = [t.requires_grad_(True) for t in (q, k, v)]
    ro, rlse = fastnca.neighborhood_attention2d(*ref_leaves, ks, "mask", return_lse=True, backend="reference")
    want = (ro, rlse, *torch.autograd.grad(ro, ref_leaves, do))
    assert rlse.max() < -100  # exp of every logit underflows float32 (below about -103)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        assert a.isfinite().all(), name
        # exp(s - lse) carries the float32 rounding of logits near 120 (~1e-5 relative), and
        # dq, dk sum ds (whose sum is 0) against keys / queries near 6: a cancellation
        assert_close(a, b, torch.float32, name, scale=1.0 if name == "lse" else 20.0)


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("border", ["zeros", "mask"])
def test_nonfinite_half_inputs(backend, dtype, border):
    """inf and NaN in half inputs at D=64 (the vectorised loads): an inf value feature
    gives inf in that feature of every output whose window holds the cell, a NaN key
    makes those windows NaN; elsewhere the outputs are finite and the reference's."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 7, 7, 1, 64, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    v[0, 2, 2, 0, 3], v[0, 2, 2, 0, 9] = float("inf"), float("-inf")
    k[0, 4, 5, 0, 60] = float("nan")
    o = fastnca.neighborhood_attention2d(q.to(dev), k.to(dev), v.to(dev), 3, border, backend=backend).cpu()
    ro = fastnca.neighborhood_attention2d(q, k, v, 3, border, backend="reference")
    assert o[0, 1:4, 1:4, 0, 3].isposinf().all() and o[0, 1:4, 1:4, 0, 9].isneginf().all()
    assert o[0, 3:6, 4:7].isnan().all()
    assert torch.equal(o.isnan(), ro.isnan()) and torch.equal(o.isinf(), ro.isinf())
    fin = o.isfinite()
    assert_close(o[fin], ro[fin], dtype, "o")


def _ulps(a: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a - exact| in units in the last place of ``dtype`` at ``exact``."""
    bits, lowest = {torch.float16: (10, -24), torch.bfloat16: (7, -133)}[dtype]
    _, e = torch.frexp(exact)
    return (a.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), (e - 1 - bits).clamp(min=lowest))


@pytest.mark.parametrize("backend", ["reference", *fast_backends("neighborhood_attention")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_rounded_once(backend, dtype):
    """Half inputs compute in float32 and round once: o within an ulp of the float64
    result of the same inputs (a sum kept in half for a tail of the head dim was ~3 ulp
    off), at head dims with tails (5, 7) and without (96), values of mean 4. The gradients,
    whose softmax term cancels, stay within 5x the reference's error (normwise)."""
    dev = device_for(backend)
    for D in (5, 7, 96):
        g = torch.Generator().manual_seed(D)
        shape = (1, 7, 8, 2, D)
        q, k = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        v = (torch.randn(shape, generator=g, dtype=torch.float64) + 4).to(dtype)
        do = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

        def grads(backend, cast):
            leaves = [cast(t).requires_grad_(True) for t in (q, k, v)]
            o = fastnca.neighborhood_attention2d(*leaves, 7, "zeros", backend=backend)
            return [t.cpu() for t in (o, *torch.autograd.grad(o, leaves, cast(do)))]

        got = grads(backend, lambda t: t.to(dev))
        exact = grads("reference", lambda t: t.double())
        ulps = _ulps(got[0], exact[0], dtype).max().item()
        # the interpreter truncates float32 to bfloat16 where a GPU rounds: up to an ulp
        assert ulps <= 1.05, f"D={D}: o is {ulps:.2f} ulp off"
        if backend != "reference":
            ref = grads("reference", lambda t: t)
            for name, a, r, x in zip(("dq", "dk", "dv"), got[1:], ref[1:], exact[1:]):
                err, ref_err = ((t.double() - x).norm() / x.norm() for t in (a, r))
                assert err <= 5 * ref_err + 1e-6, f"D={D} {name}: {err:.1e} vs the reference's {ref_err:.1e}"


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("ks", [3, 5])
def test_reference_gradcheck(border, ks):
    q, k, v = make_qkv(1, ks, ks + 1, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return fastnca.neighborhood_attention2d(q, k, v, ks, border, return_lse=True, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=ks > 3)


def test_packed_views_gradients_reach_qkv():
    q, k, v = make_qkv(2, 4, 5, 3, 8, packed=True, requires_grad=True)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    o = fastnca.neighborhood_attention2d(q, k, v, backend="reference")
    o.sum().backward()
    assert q._base.grad is not None and q._base.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_packed_views_are_not_copied(backend):
    """DESIGN: strided views of one packed QKV tensor are accepted without a copy. No aten copy
    runs on a q/k/v- or qkv-shaped tensor anywhere in the public op, forward or backward (the
    cpu backend's pointers and strides are checked exactly in test_neighborhood_attention_cpu)."""
    dev = device_for(backend)
    q, k, v = make_qkv(2, 4, 5, 3, 8, device=dev, packed=True, requires_grad=True)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    shapes = [q.shape, q._base.shape]
    assert copies_of(shapes, lambda: q.contiguous()), "the probe must see a copy"
    grads = []

    def run():
        o = fastnca.neighborhood_attention2d(q, k, v, backend=backend)
        grads.extend(torch.autograd.grad(o, q._base, torch.ones_like(o)))

    assert copies_of(shapes, run) == []
    assert grads[0].abs().sum() > 0


def _saved(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t.detach()  # not t: a saved output would hold its own graph (a leaked cycle)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in graph_held(out):  # tensors kept on the side (ctx attributes) count too
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_memory_contract_q_k_v_o_lse_only():
    """GeCA-S attention shape (B=2 here, 32x32, 12 heads, D=64): the op keeps q, k, v, o and
    lse; the unfold implementation keeps 9x copies of K and V as well."""
    B, H, W, nh, D = 2, 32, 32, 12, 64
    q, k, v = make_qkv(B, H, W, nh, D, requires_grad=True)
    got = _saved(lambda: fastnca.neighborhood_attention2d(q, k, v))
    per = q.nbytes
    assert got == 4 * per + B * H * W * nh * 4  # q, k, v, o + float32 lse
    # and those tensors themselves: the inputs, the output and a float32 [B, H, W, heads] lse
    kept = []

    def pack(t):
        kept.append(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, lse = fastnca.neighborhood_attention2d(q, k, v, return_lse=True)
    assert len(kept) == 5 and graph_held(o) == []
    for want in (q, k, v, o):
        assert any(t.data_ptr() == want.data_ptr() and t.shape == want.shape for t in kept)
    assert any(t.data_ptr() == lse.data_ptr() and t.dtype == torch.float32 for t in kept)

    def unfold_attention():
        kk = torch.nn.functional.unfold(k.permute(0, 3, 4, 1, 2).reshape(B, nh * D, H, W), 3, padding=1)
        vv = torch.nn.functional.unfold(v.permute(0, 3, 4, 1, 2).reshape(B, nh * D, H, W), 3, padding=1)
        kk = kk.view(B, nh, D, 9, H, W).permute(0, 4, 5, 1, 3, 2)
        vv = vv.view(B, nh, D, 9, H, W).permute(0, 4, 5, 1, 3, 2)
        s = torch.einsum("bhwnd,bhwnjd->bhwnj", q, kk) * D ** -0.5
        return torch.einsum("bhwnj,bhwnjd->bhwnd", s.softmax(-1), vv)

    assert _saved(unfold_attention) >= 18 * per  # 9 K + 9 V copies


ARG_ERRORS = [
    (dict(query=torch.zeros(1, 2, 2, 4)), ValueError, "query must have 5 dimensions"),
    (dict(key=torch.zeros(1, 4, 4, 2, 7)), ValueError, "must have the same shape"),
    (dict(value=torch.zeros(1, 4, 4, 2, 8, dtype=torch.float64)), TypeError, "share a dtype"),
    (dict(query=torch.zeros(1, 4, 4, 2, 8, dtype=torch.int32)), TypeError, "query must have dtype"),
    (dict(key=torch.zeros(1, 4, 4, 8, 2).transpose(-1, -2)), ValueError, "key must be contiguous in its last"),
    (dict(query=torch.zeros(1, 4, 4, 8, 2).transpose(-1, -2)), ValueError, "query must be contiguous in its last"),
    (dict(value=torch.zeros(1, 4, 4, 8, 2).transpose(-1, -2)), ValueError, "value must be contiguous in its last"),
    (dict(value=torch.zeros(1, 4, 4, 2, 16)[..., ::2]), ValueError, "value must be contiguous in its last"),
    (dict(kernel_size=4), ValueError, "kernel_size must be 3, 5 or 7"),
    (dict(kernel_size=9), ValueError, "kernel_size must be 3, 5 or 7"),
    (dict(border="reflect"), ValueError, "border must be one of"),
    (dict(border="shift", kernel_size=5), ValueError, "border='shift' needs height and width >= kernel_size=5"),
    (dict(border="shift", kernel_size=7), ValueError, "border='shift' needs height and width >= kernel_size=7"),
    (dict(border="shift", query=torch.zeros(1, 2, 4, 2, 8), key=torch.zeros(1, 2, 4, 2, 8),
          value=torch.zeros(1, 2, 4, 2, 8)), ValueError, "border='shift' needs height and width >= kernel_size=3"),
    (dict(border="shift", query=torch.zeros(1, 4, 2, 2, 8), key=torch.zeros(1, 4, 2, 2, 8),
          value=torch.zeros(1, 4, 2, 2, 8)), ValueError, "border='shift' needs height and width >= kernel_size=3"),
    (dict(scale=float("nan")), ValueError, "scale must be None or a finite float"),
    (dict(backend="natten"), ValueError, "backend must be None or one of"),
    # Matched on the argument's name (and, for a device mismatch, the device), not on the
    # wording; the exception type of a non-numeric scale is not fixed here.
    (dict(query="q"), TypeError, mentions("query")),
    (dict(scale="a"), (TypeError, ValueError), mentions("scale")),
    (dict(scale=float("inf")), ValueError, mentions("scale")),
    (dict(kernel_size=3.0), TypeError, mentions("kernel_size")),
    (dict(kernel_size=True), TypeError, mentions("kernel_size")),
    # Empty grids and head dims (an empty batch or no heads are valid: test_empty_batch_or_heads).
    *[(dict(query=torch.zeros(shape), key=torch.zeros(shape), value=torch.zeros(shape)), ValueError,
       mentions("query")) for shape in [(1, 0, 4, 2, 8), (1, 4, 0, 2, 8), (1, 4, 4, 2, 0)]],
    # Device mismatches ("meta" stands in for a second device on a CPU-only machine).
    (dict(key=torch.zeros(1, 4, 4, 2, 8, device="meta")), ValueError, mentions("key", "meta")),
    (dict(value=torch.zeros(1, 4, 4, 2, 8, device="meta")), ValueError, mentions("value", "meta")),
    (dict(query=torch.zeros(1, 4, 4, 2, 8, device="meta")), ValueError, mentions("query", "meta")),
]


@pytest.mark.parametrize("backend", [None, "reference", *fast_backends("neighborhood_attention")])
@pytest.mark.parametrize("border", ["zeros", "mask", "circular", "shift"])
@pytest.mark.parametrize("shape", [(0, 5, 3, 2, 8), (2, 3, 5, 0, 8)], ids=["batch0", "heads0"])
def test_empty_batch_or_heads(backend, border, shape):
    """No batch or no heads: empty out, lse and gradients of the inputs' shapes, as
    scaled_dot_product_attention gives (the public function runs the reference)."""
    q, k, v = make_qkv(*shape, device=device_for(backend or "reference"), requires_grad=True)
    o, lse = fastnca.neighborhood_attention2d(q, k, v, border=border, return_lse=True, backend=backend)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    (o.sum() + lse.sum()).backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == q.shape


def test_return_lse_takes_python_and_numpy_bools_only():
    np = pytest.importorskip("numpy")
    q, k, v = make_qkv(1, 3, 3, 1, 4)
    o, lse = fastnca.neighborhood_attention2d(q, k, v, return_lse=np.bool_(True))
    assert lse.shape == (1, 3, 3, 1)
    assert isinstance(fastnca.neighborhood_attention2d(q, k, v, return_lse=np.bool_(False)), torch.Tensor)
    with pytest.raises(TypeError, match="return_lse must be a bool, got int"):
        fastnca.neighborhood_attention2d(q, k, v, return_lse=1)
    with pytest.raises(TypeError, match="return_lse must be a bool, got numpy.int64"):
        fastnca.neighborhood_attention2d(q, k, v, return_lse=np.int64(1))


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("override,exc,match", ARG_ERRORS)
def test_argument_errors(override, exc, match, backend):
    """Each bad argument raises from the public checks, also on the reference backend (whose
    torch code takes any kernel size) where no kernel's own check would catch it."""
    q, k, v = make_qkv(1, 4, 4, 2, 8)
    args = dict(query=q, key=k, value=v, backend=backend)
    args.update(override)
    with pytest.raises(exc, match=match):
        fastnca.neighborhood_attention2d(**args)


@pytest.mark.skipif(fastnca.backends()["triton"] is not True, reason=f"triton: {fastnca.backends()['triton']}")
def test_float64_with_triton_backend_is_a_clear_error():
    """The Triton kernels have no fp64 path: asking for it explicitly is a TypeError naming
    the dtype, not a silent downcast or an error from inside Triton."""
    q, k, v = make_qkv(1, 4, 4, 2, 8, dtype=torch.float64, device=device_for("triton"))
    with pytest.raises(TypeError, match=mentions("float64")):
        fastnca.neighborhood_attention2d(q, k, v, backend="triton")


# --------------------------------------------------------------------------------------
# Every fast backend against the reference.
# --------------------------------------------------------------------------------------

CASES = [  # (B, H, W, heads, D, kernel_size, border, packed)
    (1, 1, 1, 1, 1, 3, "zeros", False),
    (2, 2, 2, 1, 5, 3, "mask", True),
    (1, 3, 5, 6, 16, 3, "circular", False),
    (1, 8, 8, 1, 64, 5, "shift", True),
    (1, 31, 17, 2, 96, 3, "zeros", True),
    (1, 7, 9, 2, 8, 7, "shift", False),
    (2, 5, 6, 3, 4, 7, "circular", True),
]


def _run(backend, dtype, case, device):
    B, H, W, nh, D, ks, border, packed = case
    q, k, v = make_qkv(B, H, W, nh, D, dtype=dtype, device=device, seed=3, packed=packed, requires_grad=True)
    o, lse = fastnca.neighborhood_attention2d(q, k, v, ks, border, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(4)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).float().to(device)
    leaves = [q._base] if packed else [q, k, v]
    grads = torch.autograd.grad([o, lse], leaves, [do, dlse])
    if packed:
        grads = grads[0].unbind(3)
    return o, lse, grads


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_backend_matches_reference(backend, dtype, case):
    dev = device_for(backend)
    o, lse, grads = _run(backend, dtype, case, dev)
    ro, rlse, rgrads = _run("reference", dtype, case, dev)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, ro, dtype, "o")
    assert_close(lse, rlse, torch.float32, "lse")  # float32 for every input dtype: it is computed and kept in fp32
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(a, b, dtype, name, scale=1.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_backend_head_dim_one_with_any_stride(backend):
    """A size-1 head dim is contiguous whatever its stride: every backend takes it (the
    cuda and triton kernels require stride(-1) == 1 of what they are given) and matches
    the reference."""
    dev = device_for(backend)
    base = torch.randn(1, 4, 5, 2, 3, generator=torch.Generator().manual_seed(3)).to(dev)
    q = base.transpose(-1, -2)[..., :1].requires_grad_(True)  # [1, 4, 5, 3, 1], stride(-1) == 3
    assert q.stride(-1) != 1
    o = fastnca.neighborhood_attention2d(q, q, q, backend=backend)
    r = fastnca.neighborhood_attention2d(q, q, q, backend="reference")
    assert_close(o, r, torch.float32, "o")
    assert_close(torch.autograd.grad(o.sum(), q)[0], torch.autograd.grad(r.sum(), q)[0], torch.float32, "dq")


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_backend_gradients_are_deterministic(backend):
    dev = device_for(backend)
    case = (2, 9, 10, 2, 16, 3, "zeros", True)
    _, _, g1 = _run(backend, torch.float32, case, dev)
    _, _, g2 = _run(backend, torch.float32, case, dev)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
