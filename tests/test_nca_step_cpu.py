"""The fused C++ CPU nca_step (backend "cpu") against the reference backend.

Forward output and all seven gradients, over paddings, depthwise/full perception, 1..3
filter banks, frozen channels, update probabilities, odd sizes, batch, dtypes and memory
formats; the in-kernel fire mask bit for bit against fastnca.fire_mask; bitwise
determinism of the gradients across runs and thread counts; float64 gradcheck through
the public ops.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastnca
from fastnca import _backend, _ext
from fastnca.kernels.reference import nca_step as ref

pytestmark = pytest.mark.skipif(_ext.load("_C") is None or not hasattr(_ext.load("_C"), "nca_step_forward"),
                                reason="fastnca._C with nca_step is not built")

if _ext.load("_C") is not None:
    from fastnca.kernels.cpu import nca_step as cpu

# max |got - want| / max |want| per dtype: fp32 is the acceptance bound of the kernel;
# 16-bit outputs and d_state are stored in the input dtype (a few ulps of reordering).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = ("out", "d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2")


def make(B, C, H, W, F=2, groups=1, hidden=16, frozen=0, dtype=torch.float32, seed=0,
         channels_last=False, wdtype=torch.float32):
    """Fresh random inputs, nothing zero (fc2 random too, so every path carries signal)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, dt=wdtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    state = r(B, C, H, W, dt=dtype)
    if channels_last:
        state = state.contiguous(memory_format=torch.channels_last)
    K, cin = F * C, C // groups
    weights = (r(K, cin, 3, 3, scale=(9 * cin) ** -0.5), r(K, scale=0.1),
               r(hidden, (F + 1) * C, scale=((F + 1) * C) ** -0.5), r(hidden, scale=0.1),
               r(C - frozen, hidden, scale=hidden ** -0.5), r(C - frozen, scale=0.1))
    grad = r(B, C, H, W, dt=dtype)
    return state, weights, grad


def rel(got, want):
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def compare(state, weights, grad, groups, padding, p, frozen, seed=1234, step=5, tol=None):
    args = (groups, padding, p, seed, step, frozen)
    want = (ref.forward(state, *weights, *args), *ref.backward(grad, state, *weights, *args))
    got = (cpu.forward(state, *weights, *args), *cpu.backward(grad, state, *weights, *args))
    compute = torch.float64 if state.dtype == torch.float64 else torch.float32
    tols = [TOL[state.dtype]] * 2 + [max(TOL[w.dtype], TOL[compute]) for w in weights]
    for name, a, b, t in zip(NAMES, got, want, tols):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        err = rel(a, b)
        t = t if tol is None else tol
        assert err <= t, f"{name}: rel err {err:.2e} > {t:.0e}"
    return got


# (B, C, H, W, F, groups, hidden, frozen, padding, update_prob): every padding with both
# perception kinds, F 1..3 and 64, frozen 0/1/3 and C - 1, update_prob 0/0.5/1, sizes
# 2x2/3x5/17x31, batch 1/3, C 1/3/16/17/32, hidden 1/7/20/64/128; rows longer than one tile.
CASES = [
    (1, 1, 3, 5, 1, 1, 1, 0, "zeros", 1.0),
    (3, 1, 17, 31, 2, 1, 7, 0, "reflect", 0.5),
    (1, 1, 2, 2, 3, 1, 7, 1, "circular", 1.0),  # every channel frozen: out = state
    (3, 3, 2, 2, 2, 1, 7, 1, "reflect", 1.0),
    (1, 3, 2, 2, 1, 3, 64, 0, "circular", 0.5),
    (1, 3, 3, 5, 3, 3, 7, 3, "replicate", 0.5),
    (3, 3, 3, 5, 2, 1, 1, 0, "zeros", 0.0),
    (1, 16, 17, 31, 2, 1, 64, 3, "reflect", 0.5),
    (3, 16, 3, 5, 1, 16, 128, 1, "zeros", 1.0),
    (1, 16, 17, 31, 3, 16, 7, 0, "circular", 1.0),
    (1, 16, 2, 2, 2, 16, 64, 1, "replicate", 0.5),
    (1, 32, 17, 31, 2, 1, 128, 1, "reflect", 0.5),  # the Med-NCA rule
    (1, 32, 3, 5, 3, 1, 64, 3, "circular", 1.0),
    (3, 32, 17, 31, 1, 32, 128, 0, "replicate", 0.5),
    (1, 32, 2, 2, 1, 1, 7, 0, "zeros", 0.5),
    (3, 16, 3, 5, 2, 1, 128, 0, "replicate", 0.0),
    (2, 8, 6, 133, 2, 1, 16, 1, "reflect", 0.5),  # several tiles per row
    (1, 8, 7, 130, 1, 8, 16, 0, "circular", 0.5),
    # a backward workspace over the kernel's 2 MiB batch limit (~3 MB): it runs image by image
    (2, 32, 64, 64, 2, 1, 32, 1, "reflect", 0.5),
    # C = 17 (two 8-channel blocks and a tail; C - frozen pads to 16 < C: loops over the
    # updated channels must stop at C - frozen) and hidden 20 / 40 (padded to 24 / 40: a
    # 16-column GEMM panel and an 8-column tail, with a bias): both perception kinds, and
    # frozen = C - 1 with full perception
    (2, 17, 5, 11, 2, 1, 20, 1, "reflect", 0.5),
    (2, 17, 5, 11, 1, 17, 20, 16, "circular", 1.0),
    (1, 9, 6, 9, 2, 1, 40, 8, "replicate", 1.0),
    # F = 64, the cpu backend's limit of filters per channel (_backend.NCA_LIMITS)
    (1, 2, 4, 5, 64, 2, 9, 1, "reflect", 0.5),
    (1, 1, 3, 4, 64, 1, 9, 0, "replicate", 0.5),
]


@pytest.mark.parametrize("B,C,H,W,F,groups,hidden,frozen,padding,p", CASES)
def test_matches_reference_fp32(B, C, H, W, F, groups, hidden, frozen, padding, p):
    state, weights, grad = make(B, C, H, W, F, groups, hidden, frozen, seed=C * 31 + H)
    compare(state, weights, grad, groups, padding, p, frozen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("groups,padding,channels_last", [(1, "reflect", False), (8, "circular", True),
                                                          (1, "zeros", True)])
def test_dtypes(dtype, groups, padding, channels_last):
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    state, weights, grad = make(2, 8, 9, 13, 2, groups, 16, 1, dtype=dtype, seed=3,
                                channels_last=channels_last, wdtype=wdtype)
    got = compare(state, weights, grad, groups, padding, 0.5, 1)
    assert got[0].dtype == dtype and got[1].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_baseline_isa(dtype):
    """The portable (non-AVX2) build of the same kernels, forced through the test hook."""
    C_ = _ext.load("_C")
    before = C_.nca_step_cpu_set_isa("baseline")
    try:
        assert C_.nca_step_cpu_isa() == "baseline"
        for groups, padding, frozen in ((1, "reflect", 1), (5, "circular", 0)):
            wdtype = torch.float64 if dtype == torch.float64 else torch.float32
            state, weights, grad = make(2, 5, 6, 11, 2, groups, 13, frozen, dtype=dtype, wdtype=wdtype,
                                        seed=groups)
            compare(state, weights, grad, groups, padding, 0.5, frozen)
    finally:
        C_.nca_step_cpu_set_isa("auto" if before == "avx2" else before)


def test_weight_dtypes_are_kept():
    """Weights in other dtypes/layouts: cast inside, grads come back in each weight's dtype."""
    state, weights, grad = make(1, 4, 5, 6, 2, 1, 8, 1, seed=4)
    pw, pb, w1, b1, w2, b2 = weights
    weights = (pw.double(), pb.half(), w1.t().contiguous().t(), b1.bfloat16(), w2, b2.double())
    args = (1, "reflect", 0.5, 9, 2, 1)
    got = cpu.backward(grad, state, *weights, *args)
    want = ref.backward(grad, state, *weights, *args)
    for a, b, w in zip(got[1:], want[1:], weights):
        assert a.dtype == w.dtype and a.shape == w.shape
        assert rel(a, b) <= TOL[w.dtype if w.dtype != torch.float64 else torch.float32]


@pytest.mark.parametrize("layout", ["channels_last", "strided", "dense-permuted"])
def test_memory_formats(layout):
    state, weights, grad = make(3, 16, 7, 10, 2, 1, 32, 1, seed=5)
    if layout == "channels_last":
        state = state.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    elif layout == "dense-permuted":  # dense, neither format: out and d_state keep its strides
        state = state.transpose(2, 3).contiguous().transpose(2, 3)
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # a non-dense view: every other column of a wider tensor, grad expanded
        state = torch.cat([state, state.flip(3)], 3)[..., ::2]
        grad = torch.randn(1, 16, 7, 1).expand(3, 16, 7, 10)
    args = (1, "replicate", 0.5, 11, 3, 1)
    out = cpu.forward(state, *weights, *args)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    compare(state, weights, grad, 1, "replicate", 0.5, 1, seed=11, step=3)
    d_state = cpu.backward(grad, state, *weights, *args)[0]
    if layout == "channels_last":
        assert d_state.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", ["nca_step", "nca_rollout"])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_state_is_passed_to_the_kernels_as_is(op, layout, monkeypatch):
    """DESIGN: kernels must not force a copy of a channels_last state. Through the public
    autograd op, the compiled kernels receive the caller's state tensor itself (its data
    pointer and strides; likewise a non-dense view and the caller's grad), forward and
    backward. For the rollout that is the first step's input and the last step's grad."""
    _C, calls = _ext.load("_C"), {}
    for name in ("nca_step_forward", "nca_step_backward"):
        def spy(*args, _real=getattr(_C, name), _name=name):
            calls.setdefault(_name, []).append(args[:4])
            return _real(*args)
        monkeypatch.setattr(_C, name, spy)
    state, (pw, pb, w1, b1, w2, b2), grad = make(2, 8, 7, 10, 2, 1, 16, 1, seed=12)
    if layout == "channels_last":
        state = state.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    else:  # a non-dense view: every other column of a wider tensor
        state = torch.cat([state, state.flip(3)], 3)[..., ::2]
        grad = torch.cat([grad, grad], 3)[..., 1::2]
    weights = [t.requires_grad_(True) for t in (pw, pb, w1, b1, w2, b2)]
    state.requires_grad_(True)
    kw = dict(steps=3, checkpoint_every=2) if op == "nca_rollout" else {}
    out = getattr(fastnca, op)(state, *weights, seed=4, frozen_channels=1, backend="cpu", **kw)
    torch.autograd.grad(out, [state, *weights], grad)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    ptr, strides = calls["nca_step_forward"][0][:2]
    assert (ptr, list(strides)) == (state.data_ptr(), list(state.stride()))
    go_ptr, go_strides, s_ptr, s_strides = calls["nca_step_backward"][0]
    assert (go_ptr, list(go_strides)) == (grad.data_ptr(), list(grad.stride()))
    s_ptr, s_strides = calls["nca_step_backward"][-1][2:]
    assert (s_ptr, list(s_strides)) == (state.data_ptr(), list(state.stride()))


@pytest.mark.parametrize("p,seed,step", [(0.5, 0, 0), (0.3, 2**64 - 1, 2**32 - 1), (0.999, 2**63 + 12345, 77),
                                         (1e-3, 42, 1)])
def test_fire_mask_bit_identical(p, seed, step):
    """With w2 = 0 and b2 = 1 every firing cell moves by exactly 1: out != state is the mask."""
    B, C, H, W = 3, 4, 19, 37
    state, (pw, pb, w1, b1, w2, b2), _ = make(B, C, H, W, 1, 1, 8, 1, seed=6)
    w2, b2 = torch.zeros_like(w2), torch.ones_like(b2)
    out = fastnca.nca_step(state, pw, pb, w1, b1, w2, b2, padding="zeros", update_prob=p, seed=seed,
                           step=step, frozen_channels=1, backend="cpu")
    mask = fastnca.fire_mask(B, H, W, p, seed, step)
    moved = out != state
    assert not moved[:, :1].any()
    for c in range(1, C):
        assert torch.equal(moved[:, c], mask)


def test_deterministic_grads():
    """Weight grads reduce in a fixed chunk order: bitwise equal run to run and for any
    thread count (the chunks are a function of the shapes, not of the threads)."""
    state, weights, grad = make(2, 16, 40, 70, 2, 1, 32, 1, seed=7)
    args = (1, "reflect", 0.5, 3, 1, 1)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (2, 1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(cpu.backward(grad, state, *weights, *args))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_dispatch_and_public_autograd():
    if not os.environ.get("FASTNCA_BACKEND"):
        assert _backend.resolve(None, "nca_step", torch.device("cpu")) == "cpu"
    state, weights, grad = make(2, 6, 8, 9, 2, 1, 12, 2, seed=8)
    leaves = [t.clone().requires_grad_() for t in (state, *weights)]
    kw = dict(groups=1, padding="circular", update_prob=0.5, seed=99, step=4, frozen_channels=2)
    outs, grads = [], []
    for backend in ("cpu", "reference"):
        for t in leaves:
            t.grad = None
        out = fastnca.nca_step(*leaves, backend=backend, **kw)
        out.backward(grad)
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in leaves])
    assert rel(outs[0], outs[1]) <= 1e-5
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-5


def _f64(*tensors):
    return [t.double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("groups,padding,F,frozen", [(1, "reflect", 2, 1), (3, "circular", 2, 0),
                                                     (1, "zeros", 1, 0), (1, "replicate", 3, 2)])
def test_gradcheck_step(groups, padding, F, frozen):
    state, weights, _ = make(2, 3, 4, 5, F, groups, 5, frozen, dtype=torch.float64, seed=9,
                             wdtype=torch.float64)
    inputs = _f64(state, *weights)

    def f(*xs):
        return fastnca.nca_step(*xs, groups=groups, padding=padding, update_prob=0.5, seed=17,
                                step=2, frozen_channels=frozen, backend="cpu")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_rollout():
    state, weights, _ = make(1, 3, 4, 4, 2, 1, 6, 1, dtype=torch.float64, seed=10,
                             wdtype=torch.float64)
    inputs = _f64(state, *weights)

    def f(*xs):
        return fastnca.nca_rollout(*xs, steps=3, checkpoint_every=2, padding="reflect",
                                   update_prob=0.5, seed=21, frozen_channels=1, backend="cpu")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_rollout_matches_reference():
    state, weights, grad = make(2, 8, 11, 12, 2, 1, 16, 1, seed=12)
    kw = dict(steps=4, padding="reflect", update_prob=0.5, seed=5, frozen_channels=1)
    res = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (state, *weights)]
        out = fastnca.nca_rollout(*leaves, backend=backend, **kw)
        out.backward(grad)
        res.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*res):
        assert rel(a, b) <= 1e-5


def test_launcher_rejects_bad_inputs():
    state, (pw, pb, w1, b1, w2, b2), _ = make(1, 4, 5, 5, 2, 1, 8, 0)
    with pytest.raises(ValueError):
        cpu.forward(state, pw, pb, w1, b1, w2[:, :4], b2, 1, "reflect", 0.5, 0, 0, 0)
    with pytest.raises(ValueError):
        cpu.forward(state[:, :, :1], pw, pb, w1, b1, w2, b2, 1, "reflect", 0.5, 0, 0, 0)
    with pytest.raises(ValueError):
        cpu.forward(state, pw, pb, w1, b1, w2, b2, 2, "reflect", 0.5, 0, 0, 0)
