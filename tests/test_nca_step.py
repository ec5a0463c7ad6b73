"""nca_step / nca_rollout: the reference against a naive per-cell loop, gradients,
rollout semantics, the memory contract, argument checks, and every fast backend
against the reference."""
import math

import pytest
import torch

import fastnca
from conftest import (assert_close, copies_of, device_for, fast_backends, fire_bits, graph_held,
                      isolated_idle_cell, listed_walk, mentions)
from fastnca import _backend
from fastnca.kernels import _common
from fastnca.kernels.reference import nca_step as ref_nca

PADDINGS = ["reflect", "zeros", "circular", "replicate"]


def make_rule(C, hidden=6, F=2, groups=1, frozen=0, fc2_rows=None, dtype=torch.float32,
              device="cpu", seed=0, requires_grad=False, fc2_bias=True):
    """Random (never zero) weights of an NCA rule, in DESIGN.md's shapes."""
    g = torch.Generator().manual_seed(seed)
    rows = C if fc2_rows is None else fc2_rows

    def r(*shape, s=0.5):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return [r(F * C, C // groups, 3, 3), r(F * C), r(hidden, (F + 1) * C), r(hidden),
            r(rows, hidden), r(rows) if fc2_bias else None]


def make_state(B, C, H, W, dtype=torch.float32, device="cpu", seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype).to(device)
    return x.requires_grad_(requires_grad)


def naive_step(state, pw, pb, w1, b1, w2, b2, groups, padding, update_prob, seed, step, frozen):
    """Explicit loops over cells and taps, float64 -- the definition, spelled out."""
    B, C, H, W = state.shape
    nf = pw.shape[0] // C
    x = state.double()
    pw, pb, w1, b1, w2 = (t.double() for t in (pw, pb, w1, b1, w2))
    b2 = torch.zeros(w2.shape[0], dtype=torch.float64) if b2 is None else b2.double()
    if w2.shape[0] == C:
        w2, b2 = w2[frozen:], b2[frozen:]

    def src(p, n):
        if 0 <= p < n:
            return p
        if padding == "zeros":
            return None
        if padding == "reflect":
            return -p if p < 0 else 2 * (n - 1) - p
        if padding == "replicate":
            return 0 if p < 0 else n - 1
        return p % n

    mask = fastnca.fire_mask(B, H, W, update_prob, seed, step)
    out = x.clone()
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                conv = pb.clone()
                for o in range(nf * C):
                    ins = range(C) if groups == 1 else [o // nf]
                    for ci, c in enumerate(ins):
                        for dy in range(3):
                            for dx in range(3):
                                sy, sx = src(y + dy - 1, H), src(xx + dx - 1, W)
                                if sy is not None and sx is not None:
                                    conv[o] += pw[o, ci, dy, dx] * x[b, c, sy, sx]
                p = torch.cat([x[b, :, y, xx], conv])
                h = torch.relu(w1 @ p + b1)
                delta = w2 @ h + b2
                if mask[b, y, xx]:
                    out[b, frozen:, y, xx] += delta
    return out


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("groups", ["full", "depthwise"])
@pytest.mark.parametrize("F,frozen,shape", [(1, 0, (1, 3, 2, 3)), (2, 1, (2, 3, 3, 4)), (3, 2, (1, 4, 2, 2))])
def test_reference_matches_naive_loops(padding, groups, F, frozen, shape):
    B, C, H, W = shape
    g = 1 if groups == "full" else C
    rule = make_rule(C, hidden=5, F=F, groups=g, frozen=frozen, dtype=torch.float64)
    x = make_state(*shape, dtype=torch.float64)
    kw = dict(groups=g, padding=padding, update_prob=0.6, seed=11, step=2, frozen_channels=frozen)
    out = fastnca.nca_step(x, *rule, backend="reference", **kw)
    expected = naive_step(x, *rule, g, padding, 0.6, 11, 2, frozen)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_one_by_one_grid_and_fc2_rows():
    """1x1 grids work for non-reflect paddings; fc2 may have C or C - frozen rows."""
    C, frozen = 3, 1
    full = make_rule(C, F=2, frozen=frozen, dtype=torch.float64)
    short = full[:4] + [full[4][frozen:], full[5][frozen:]]
    x = make_state(2, C, 1, 1, dtype=torch.float64)
    kw = dict(padding="zeros", update_prob=1.0, seed=0, frozen_channels=frozen, backend="reference")
    a = fastnca.nca_step(x, *full, **kw)
    b = fastnca.nca_step(x, *short, **kw)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, naive_step(x, *full, 1, "zeros", 1.0, 0, 0, frozen))
    assert torch.equal(a[:, :frozen], x[:, :frozen])


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("groups", ["full", "depthwise"])
def test_reference_gradcheck(padding, groups):
    C = 3
    g = 1 if groups == "full" else C
    rule = make_rule(C, hidden=4, F=2, groups=g, dtype=torch.float64, requires_grad=True)
    x = make_state(2, C, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *rule):
        return fastnca.nca_step(x, *rule, groups=g, padding=padding, update_prob=0.5, seed=3,
                                step=1, frozen_channels=1, backend="reference")

    assert torch.autograd.gradcheck(f, (x, *rule))


def test_rollout_gradcheck_and_optional_biases():
    C = 3
    pw, _, w1, b1, w2, _ = make_rule(C, hidden=4, dtype=torch.float64, requires_grad=True)
    x = make_state(1, C, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, pw, w1, b1, w2):
        return fastnca.nca_rollout(x, pw, None, w1, b1, w2, None, steps=5, checkpoint_every=2,
                                   padding="circular", seed=9, frozen_channels=1, backend="reference")

    assert torch.autograd.gradcheck(f, (x, pw, w1, b1, w2))


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
@pytest.mark.parametrize("every", [None, 1, 3, 7, 100])
def test_rollout_equals_loop_of_steps(every, backend):
    """Bitwise: the rollout runs the same kernels (with weights arranged once) and sums the
    weight grads of its steps in the order autograd sums those of the loop."""
    C, steps, start = 4, 7, 5
    dev = device_for(backend)
    rule = make_rule(C, hidden=8, frozen=1, requires_grad=True, seed=5, device=dev)
    x0 = make_state(2, C, 5, 6, requires_grad=True, device=dev)
    kw = dict(padding="reflect", update_prob=0.5, seed=123, frozen_channels=1, backend=backend)
    out = fastnca.nca_rollout(x0, *rule, steps=steps, start_step=start, checkpoint_every=every, **kw)
    x = x0
    for i in range(steps):
        x = fastnca.nca_step(x, *rule, step=start + i, **kw)
    assert torch.equal(out, x)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [x0, *rule], g)
    gb = torch.autograd.grad(x, [x0, *rule], g)
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
def test_rollout_step_counter_wraps_at_2_32(backend):
    """Step i draws its mask with counter (start_step + i) mod 2^32: a rollout across 2^32
    equals the loop with the wrapped counters, forward and gradients."""
    dev = device_for(backend)
    rule = make_rule(4, hidden=8, frozen=1, requires_grad=True, seed=2, device=dev)
    x0 = make_state(1, 4, 5, 6, requires_grad=True, device=dev)
    kw = dict(seed=99, frozen_channels=1, backend=backend)
    out = fastnca.nca_rollout(x0, *rule, steps=4, start_step=2**32 - 2, checkpoint_every=2, **kw)
    x = x0
    for step in (2**32 - 2, 2**32 - 1, 0, 1):
        x = fastnca.nca_step(x, *rule, step=step, **kw)
    assert torch.equal(out, x)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x0, *rule], g), torch.autograd.grad(x, [x0, *rule], g)):
        assert torch.equal(a, b)
    # the counter matters: a saturating one (2^32 - 1 again) would give another state
    assert not torch.equal(fastnca.nca_step(x0, *rule, step=2**32 - 1, **kw), fastnca.nca_step(x0, *rule, step=0, **kw))


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
def test_fire_boundary_inside_the_step_kernels(backend):
    """u < p exactly inside each backend's step kernels (forward and backward): at
    p = bits(c) * 2^-24 cell c keeps its state, at (bits(c) + 1) * 2^-24 it updates; the
    gradients match the reference at the boundary."""
    dev = device_for(backend)
    seed, step = 2**40 + 11, 9
    bits = fire_bits(20, seed, step)
    rule = make_rule(3, hidden=8, frozen=1, requires_grad=True, seed=4, device=dev)
    x = make_state(1, 3, 4, 5, requires_grad=True, device=dev)
    for c in (0, 7, 19):
        for k in (bits[c], bits[c] + 1):
            kw = dict(update_prob=k * 2.0**-24, seed=seed, step=step, frozen_channels=1)
            out = fastnca.nca_step(x, *rule, backend=backend, **kw)
            moved = (out - x).abs().amax(1).view(-1).cpu()
            assert [bool(m > 0) for m in moved] == [b < k for b in bits], (c, k)
            ref = fastnca.nca_step(x, *rule, backend="reference", **kw)
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, [x, *rule], g), torch.autograd.grad(ref, [x, *rule], g)):
                assert_close(a, b, torch.float32, "grad at the boundary")


def test_rollout_zero_steps_and_no_grad():
    rule = make_rule(3)
    x = make_state(1, 3, 4, 4)
    out = fastnca.nca_rollout(x, *rule, steps=0, seed=1, backend="reference")
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    rule = [t.requires_grad_(True) for t in rule]
    x.requires_grad_(True)
    with torch.no_grad():  # inputs that require grad: the graph would be built without no_grad
        y = fastnca.nca_rollout(x, *rule, steps=3, seed=1, backend="reference")
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
def test_rollout_zero_steps_with_grad(backend):
    """steps=0 with inputs that require grad (an nn.NCA's parameters always do): a copy of
    the state, gradient grad_out to the state and zeros to the weights."""
    dev = device_for(backend)
    rule = make_rule(3, device=dev, requires_grad=True)
    x = make_state(1, 3, 4, 5, device=dev, requires_grad=True)
    out = fastnca.nca_rollout(x, *rule, steps=0, seed=1, frozen_channels=1, backend=backend)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *rule], g, allow_unused=True)
    assert torch.equal(grads[0], g)
    for w, d in zip(rule, grads[1:]):
        assert d is None or (d.shape == w.shape and not d.any())


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
@pytest.mark.parametrize("where", ["fc1_bias", "perception_bias", "state"])
def test_nan_propagates_like_the_reference(backend, where):
    """A NaN in a weight or in the state reaches the output of every cell it reaches in the
    reference (every cell fires here): the fused ReLU must not turn NaN into 0 as
    max(z, 0) does (a NaN weight after a bad optimiser step would pass unseen)."""
    dev = device_for(backend)
    rule = make_rule(4, hidden=8, device=dev)
    x = make_state(1, 4, 5, 6, device=dev)
    if where == "state":
        x[0, 2, 1, 3] = float("nan")
    else:
        rule[1 if where == "perception_bias" else 3][1] = float("nan")
    kw = dict(update_prob=1.0, seed=1, frozen_channels=1)
    out = fastnca.nca_step(x, *rule, backend=backend, **kw)
    ref = fastnca.nca_step(x, *rule, backend="reference", **kw)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("nca_step"))
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
@pytest.mark.parametrize("groups", [1, "C"])
def test_gradients_leave_out_what_only_idle_cells_read(backend, padding, groups):
    """Cells that do not fire take no part in any gradient: a NaN or inf that only idle cells
    read (its own cell and its 8 neighbours idle) leaves every gradient as a finite value
    there gives, bit for bit, also at update_prob 0 (all gradients of the weights zero). The
    reference and the CUDA conv-gradient kernel multiplied those cells' NaN activations
    and patches by their zero gradient."""
    device = device_for(backend)
    C, H, W, p, seed, step = 3, 9, 11, 0.2, 5, 2
    groups = C if groups == "C" else 1
    fires, y, x_ = isolated_idle_cell(H, W, p, seed, step, padding)
    assert fires.any() and not fires[max(0, y - 1):y + 2, max(0, x_ - 1):x_ + 2].any()
    rule = [t.to(device) for t in make_rule(C, hidden=6, groups=groups)]
    g = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(1)).to(device)
    for prob in (p, 0.0):
        grads = []
        for value in (0.25, float("nan"), float("inf")):
            x = make_state(1, C, H, W, device=device)
            x[0, :, y, x_] = value
            x.requires_grad_(True)
            w = [t.detach().clone().requires_grad_(True) for t in rule]
            out = fastnca.nca_step(x, *w, groups=groups, padding=padding, update_prob=prob, seed=seed, step=step,
                                   frozen_channels=1, backend=backend)
            grads.append(torch.autograd.grad(out, [x, *w], g))
        for other in grads[1:]:
            for name, a, b in zip(("state", "pw", "pb", "w1", "b1", "w2", "b2"), grads[0], other):
                assert torch.equal(a, b), (prob, name)
        if prob == 0.0:
            assert not any(d.any() for d in grads[0][1:])


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("nca_step"))
@pytest.mark.parametrize("groups", [1, "C"])
def test_output_gradient_of_idle_cells_reaches_only_their_own(backend, groups):
    """A NaN or inf in grad_out at a cell that does not fire reaches d_state at that cell
    (the identity path) and nothing else: every other d_state entry and every weight
    gradient is, bit for bit, what a finite value there gives (as autograd of the forward's
    where gives the idle branch exact zeros). The reference multiplied it by the zero mask
    (NaN) into every gradient."""
    device = device_for(backend)
    C, H, W, seed, step = 3, 6, 7, 5, 2
    groups = C if groups == "C" else 1
    fires = fastnca.fire_mask(1, H, W, 0.5, seed=seed, step=step)[0]
    y, x_ = map(int, (~fires).nonzero()[0])
    rule = [t.to(device) for t in make_rule(C, hidden=6, groups=groups)]
    x = make_state(1, C, H, W, device=device)
    grads = []
    for value in (0.25, float("nan"), float("inf")):
        g = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(1)).to(device)
        g[0, :, y, x_] = value
        xg = x.clone().requires_grad_(True)
        w = [t.detach().clone().requires_grad_(True) for t in rule]
        out = fastnca.nca_step(xg, *w, groups=groups, padding="reflect", update_prob=0.5, seed=seed, step=step,
                               frozen_channels=1, backend=backend)
        grads.append(torch.autograd.grad(out, [xg, *w], g))
    own = torch.zeros(1, C, H, W, dtype=torch.bool, device=device)
    own[0, :, y, x_] = True
    for value, other in zip(("nan", "inf"), grads[1:]):
        assert not torch.isfinite(other[0][own]).any(), value
        assert torch.equal(grads[0][0][~own], other[0][~own]), value
        for name, a, b in zip(("pw", "pb", "w1", "b1", "w2", "b2"), grads[0][1:], other[1:]):
            assert torch.equal(a, b), (value, name)


def saved_bytes(fn):
    """Bytes autograd keeps for backward while ``fn`` runs (distinct storages counted once):
    the saved tensors and any tensor the graph's nodes hold as attributes (graph_held)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t.detach()  # not t: a saved output would hold its own graph (a leaked cycle)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in graph_held(out):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
    return sum(seen.values()), out


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
def test_step_saves_only_its_inputs(backend):
    """Autograd keeps exactly the step's inputs (the storages of the state and the six
    weights), nothing computed: no perception, hidden or mask tensor."""
    dev = device_for(backend)
    rule = make_rule(8, hidden=32, requires_grad=True, device=dev)
    x = make_state(2, 8, 16, 16, requires_grad=True, device=dev)
    kept = []

    def pack(t):
        kept.append(t.untyped_storage().data_ptr())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastnca.nca_step(x, *rule, seed=0, backend=backend)
    assert sorted(kept) == sorted(t.untyped_storage().data_ptr() for t in (x, *rule))
    assert graph_held(out) == []  # nor anything kept on the side (ctx attributes)


@pytest.mark.parametrize("steps,every", [(64, None), (64, 4), (10, 3), (10, None), (1, None)])
def test_rollout_checkpoint_contract(steps, every):
    rule = make_rule(4, hidden=8, requires_grad=True)
    x = make_state(1, 4, 8, 8, requires_grad=True)
    nbytes, _ = saved_bytes(lambda: fastnca.nca_rollout(x, *rule, steps=steps, checkpoint_every=every,
                                                         seed=0, backend="reference"))
    k = every or math.ceil(math.sqrt(steps))
    allowed = (math.ceil(steps / k) + 1) * x.nbytes + sum(t.nbytes for t in rule)
    assert nbytes <= allowed
    # The schedule itself: the start of every segment but the first, for the default
    # ceil(sqrt(steps)) too (a bound alone passes a rollout that keeps no checkpoint).
    kept = []

    def pack(t):
        kept.append(tuple(t.shape))
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fastnca.nca_rollout(x, *rule, steps=steps, checkpoint_every=every, seed=0, backend="reference")
    assert (math.ceil(steps / k) - 1, *x.shape) in kept


def test_mednca_rollout_saves_twenty_times_less_than_autograd():
    """Issue 3's contract: a 64-step Med-NCA rollout (C=32, h=128, F=2, reflect) keeps
    <= 1/20 of the bytes plain autograd keeps for the same computation."""
    import torch.nn.functional as F

    C, hid = 32, 128
    rule = make_rule(C, hidden=hid, F=2, frozen=1, requires_grad=True)
    x = make_state(1, C, 24, 24, requires_grad=True)
    fast, _ = saved_bytes(lambda: fastnca.nca_rollout(x, *rule, steps=64, seed=0, frozen_channels=1))

    def plain():
        pw, pb, w1, b1, w2, b2 = rule
        s = x
        for i in range(64):
            p = torch.cat([s, F.conv2d(F.pad(s, (1, 1, 1, 1), mode="reflect"), pw, pb)], 1)
            h = torch.relu(F.conv2d(p, w1[:, :, None, None], b1))
            d = F.conv2d(h, w2[1:, :, None, None], b2[1:])
            m = fastnca.fire_mask(1, 24, 24, 0.5, 0, i)[:, None]
            s = torch.cat([s[:, :1], s[:, 1:] + m * d], 1)
        return s

    eager, _ = saved_bytes(plain)
    assert fast * 20 <= eager, (fast, eager)


ARG_ERRORS = [
    (dict(state=torch.zeros(2, 3, 4)), ValueError, "state must have 4 dimensions"),
    (dict(state=torch.zeros(1, 3, 4, 4, dtype=torch.int32)), TypeError, "state must have dtype"),
    (dict(state=torch.zeros(1, 3, 1, 4)), ValueError, "padding='reflect' needs height and width >= 2"),
    (dict(padding="mirror"), ValueError, "padding must be one of"),
    (dict(groups=2), ValueError, "groups must be 1 or the channel count 3"),
    (dict(perception_weight=torch.zeros(5, 3, 3, 3)), ValueError, "perception_weight must have shape"),
    (dict(perception_weight=torch.zeros(6, 3, 5, 5)), ValueError, "perception_weight must have shape"),
    (dict(fc1_weight=torch.zeros(6, 8)), ValueError, "fc1_weight must have shape \\[hidden, 9\\]"),
    (dict(fc2_weight=torch.zeros(3, 5)), ValueError, "fc2_weight must have shape \\[3, 6\\] or \\[2, 6\\]"),
    (dict(fc1_bias=torch.zeros(5)), ValueError, "fc1_bias must have shape \\(6,\\)"),
    (dict(perception_bias=torch.zeros(6, 1)), ValueError, "perception_bias must have 1 dimension,"),
    (dict(fc2_weight=torch.zeros(3, 6, dtype=torch.int64)), TypeError, "fc2_weight must have dtype"),
    (dict(frozen_channels=4), ValueError, "frozen_channels must be in \\[0, 4\\)"),
    (dict(update_prob=-0.1), ValueError, "update_prob must be in \\[0, 1\\]"),
    (dict(seed=-3), ValueError, "seed must be in"),
    (dict(step=-1), ValueError, "step must be in"),
    (dict(backend="fast"), ValueError, "backend must be None or one of"),
    (dict(fc1_weight="w"), TypeError, "fc1_weight must be a torch.Tensor"),
    (dict(state=torch.zeros(1, 3, 0, 4)), ValueError, "state must have C, H, W >= 1"),
    (dict(state=torch.zeros(1, 3, 4, 0)), ValueError, "state must have C, H, W >= 1"),
    (dict(frozen_channels=-1), ValueError, "frozen_channels must be in \\[0, 4\\)"),
    (dict(groups=1.0), TypeError, "groups must be an integer"),
    (dict(update_prob=1.5), ValueError, "update_prob must be in \\[0, 1\\]"),
    (dict(update_prob=float("nan")), ValueError, "update_prob must be in \\[0, 1\\]"),
    (dict(fc2_bias=torch.zeros(4)), ValueError, "fc2_bias must have shape \\(3,\\)"),
    (dict(perception_weight=torch.zeros(6, 3, 3, 3, dtype=torch.int32)), TypeError, "perception_weight must have dtype"),
    (dict(state=torch.zeros(1, 3, 4, 4, dtype=torch.int64)), TypeError, "state must have dtype"),
    (dict(state=torch.zeros(3, 4, 4)), ValueError, "state must have 4 dimensions"),
    (dict(padding="same"), ValueError, "padding must be one of"),
    (dict(state=torch.zeros(1, 3, 1, 4), padding="reflect"), ValueError, "reflect' needs height and width >= 2"),
    # Matched on the argument's name (and, for a device mismatch, the device), not on the wording.
    (dict(state="x"), TypeError, mentions("state")),
    (dict(state=[[[[0.0]]]]), TypeError, mentions("state")),
    (dict(seed=2**64), ValueError, mentions("seed")),
    (dict(seed=1.0), TypeError, mentions("seed")),
    (dict(update_prob=True), TypeError, mentions("update_prob")),
    # Device mismatches (the "meta" device stands in for a second device on a CPU-only
    # machine): the message names the argument and the device it is on.
    (dict(state=torch.zeros(1, 3, 4, 4, device="meta")), ValueError, mentions("state", "meta")),
    (dict(fc1_weight=torch.zeros(6, 9, device="meta")), ValueError, mentions("fc1_weight", "meta")),
    (dict(perception_bias=torch.zeros(6, device="meta")), ValueError, mentions("perception_bias", "meta")),
    (dict(fc2_bias=torch.zeros(3, device="meta")), ValueError, mentions("fc2_bias", "meta")),
    (dict(fc1_bias=torch.zeros(6, device="meta")), ValueError, mentions("fc1_bias", "meta")),
    # Biases are checked like the weights: an integer bias would be taken silently.
    (dict(fc1_bias=torch.zeros(6, dtype=torch.int32)), TypeError, mentions("fc1_bias")),
    (dict(fc2_bias=torch.zeros(3, dtype=torch.int64)), TypeError, mentions("fc2_bias")),
    (dict(step=2**64), ValueError, mentions("step")),
    # An otherwise consistent rule with no hidden units or no perception filters: the
    # reference's torch code would run the first and fail inside conv2d on the second.
    (dict(fc1_weight=torch.zeros(0, 9), fc1_bias=torch.zeros(0), fc2_weight=torch.zeros(3, 0), backend="reference"),
     ValueError, mentions("fc1_weight")),
    (dict(perception_weight=torch.zeros(0, 3, 3, 3), perception_bias=torch.zeros(0), fc1_weight=torch.zeros(6, 3),
          backend="reference"), ValueError, mentions("perception_weight")),
]


@pytest.mark.parametrize("backend", [None, "reference", *fast_backends("nca_step")])
@pytest.mark.parametrize("padding,channels_last", [("reflect", False), ("circular", True)])
def test_empty_batch(backend, padding, channels_last):
    """B = 0 gives an empty state like the input and zero weight gradients, as torch's conv2d
    does (the public functions run the reference: no kernel to launch)."""
    dev = device_for(backend or "reference")
    rule = make_rule(4, hidden=8, frozen=1, device=dev, requires_grad=True)
    state = make_state(0, 4, 5, 3, device=dev, requires_grad=True)
    if channels_last:
        state = state.detach().to(memory_format=torch.channels_last).requires_grad_()
    kw = dict(padding=padding, seed=3, frozen_channels=1, backend=backend)
    for out in (fastnca.nca_step(state, *rule, step=2, **kw), fastnca.nca_rollout(state, *rule, steps=3, **kw)):
        assert out.shape == state.shape and out.dtype == state.dtype and out.device == state.device
        out.sum().backward()
        assert state.grad.shape == state.shape
        for t in rule:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
            t.grad = None


@pytest.mark.parametrize("override,exc,match", ARG_ERRORS)
def test_nca_step_argument_errors(override, exc, match):
    pw, pb, w1, b1, w2, b2 = make_rule(3, hidden=6)
    args = dict(state=make_state(1, 3, 4, 4), perception_weight=pw, perception_bias=pb, fc1_weight=w1,
                fc1_bias=b1, fc2_weight=w2, fc2_bias=b2, seed=0, frozen_channels=1)
    args.update(override)
    with pytest.raises(exc, match=match):
        fastnca.nca_step(**args)


@pytest.mark.parametrize("override,exc,match", [
    (dict(steps=-1), ValueError, "steps must be in"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every must be in"),
    (dict(start_step=2**64), ValueError, "start_step must be in"),
    (dict(checkpoint_every=2.5), TypeError, mentions("checkpoint_every")),
    (dict(checkpoint_every=2.0), TypeError, mentions("checkpoint_every")),
    (dict(checkpoint_every="2"), TypeError, mentions("checkpoint_every")),
    (dict(steps=3.0), TypeError, mentions("steps")),
    (dict(seed=2**64), ValueError, mentions("seed")),
    (dict(update_prob=False), TypeError, mentions("update_prob")),
    (dict(state="x"), TypeError, mentions("state")),
    (dict(state=torch.zeros(1, 3, 4, 4, device="meta")), ValueError, mentions("state", "meta")),
    (dict(fc2_weight=torch.zeros(3, 6, device="meta")), ValueError, mentions("fc2_weight", "meta")),
])
def test_nca_rollout_argument_errors(override, exc, match):
    pw, pb, w1, b1, w2, b2 = make_rule(3, hidden=6)
    args = dict(state=make_state(1, 3, 4, 4), perception_weight=pw, perception_bias=pb, fc1_weight=w1,
                fc1_bias=b1, fc2_weight=w2, fc2_bias=b2, steps=3, seed=0)
    args.update(override)
    with pytest.raises(exc, match=match):
        fastnca.nca_rollout(**args)


@pytest.mark.skipif(fastnca.backends()["triton"] is not True, reason=f"triton: {fastnca.backends()['triton']}")
@pytest.mark.parametrize("op", ["nca_step", "nca_rollout"])
def test_float64_with_triton_backend_is_a_clear_error(op):
    """The Triton kernels have no fp64 path: asking for it explicitly is a TypeError naming
    the dtype, not a silent downcast or an error from inside Triton."""
    dev = device_for("triton")
    rule = make_rule(3, hidden=6, dtype=torch.float64, device=dev)
    x = make_state(1, 3, 4, 4, dtype=torch.float64, device=dev)
    kw = dict(steps=2) if op == "nca_rollout" else {}
    with pytest.raises(TypeError, match=mentions("float64")):
        getattr(fastnca, op)(x, *rule, seed=0, backend="triton", **kw)


# --------------------------------------------------------------------------------------
# Every fast backend against the reference.
# --------------------------------------------------------------------------------------

CASES = [  # (B, C, H, W, hidden, F, groups, frozen, padding, update_prob)
    (1, 3, 2, 2, 5, 2, 1, 1, "reflect", 0.5),
    (3, 4, 3, 5, 7, 1, "C", 0, "zeros", 1.0),
    (1, 5, 17, 31, 16, 3, 1, 3, "circular", 0.5),
    (2, 8, 5, 4, 8, 2, "C", 1, "replicate", 0.0),
    (1, 16, 6, 7, 32, 2, 1, 1, "reflect", 0.5),
    # every padding with the other perception kind too
    (1, 4, 5, 6, 8, 2, "C", 1, "reflect", 0.5),
    (2, 3, 4, 5, 6, 2, 1, 0, "zeros", 0.5),
    (1, 4, 3, 7, 8, 3, "C", 3, "circular", 1.0),
    (3, 3, 5, 3, 6, 1, 1, 1, "replicate", 0.5),
]


def _run(backend, dtype, case, channels_last=False, device="cpu", grads=True):
    B, C, H, W, hid, F, groups, frozen, padding, p = case
    groups = C if groups == "C" else groups
    rule = make_rule(C, hidden=hid, F=F, groups=groups, device=device, requires_grad=True, seed=7)
    x = make_state(B, C, H, W, dtype=dtype, device=device, seed=8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    out = fastnca.nca_step(x, *rule, groups=groups, padding=padding, update_prob=p, seed=99, step=4,
                           frozen_channels=frozen, backend=backend)
    if not grads:
        return out, []
    g = make_state(B, C, H, W, dtype=dtype, device=device, seed=9)
    return out, torch.autograd.grad(out, [x, *rule[:5]] + ([rule[5]] if rule[5] is not None else []), g)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_backend_matches_reference(backend, dtype, case):
    dev = device_for(backend)
    out, grads = _run(backend, dtype, case, device=dev)
    ref_out, ref_grads = _run("reference", dtype, case, device=dev)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype, "out")
    names = ["d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2"]
    for name, a, b in zip(names, grads, ref_grads):
        # Weight grads sum over every cell: allow for the longer fp32 sums in half runs.
        assert_close(a, b, dtype, name, scale=1.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    (1, 128, 3, 4, 256, 3, 1, 1, "reflect", 0.5),  # the largest supported C, hidden and F
    (2, 128, 4, 3, 256, 3, "C", 0, "circular", 0.5),
    (1, 32, 5, 6, 128, 2, 1, 1, "reflect", 0.5),  # the Med-NCA rule
], ids=lambda c: "x".join(map(str, c)))
def test_backend_supported_extremes(backend, dtype, case):
    dev = device_for(backend)
    if backend == "triton" and dev.type == "cpu" and dtype != torch.float32 and case[1] == 128:
        pytest.skip("30 s per case under TRITON_INTERPRET; the fp32 run covers the same code")
    out, grads = _run(backend, dtype, case, device=dev)
    ref_out, ref_grads = _run("reference", dtype, case, device=dev)
    assert_close(out, ref_out, dtype, "out")
    for name, a, b in zip(["d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2"], grads, ref_grads):
        assert_close(a, b, dtype, name, scale=1.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_backend_channels_last_and_rollout(backend):
    dev = device_for(backend)
    case = (2, 6, 7, 5, 12, 2, 1, 1, "reflect", 0.5)
    out, grads = _run(backend, torch.float32, case, channels_last=True, device=dev)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref_out, ref_grads = _run("reference", torch.float32, case, device=dev)
    assert_close(out, ref_out, torch.float32, "out")
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, torch.float32, "grad")
    rule = make_rule(6, hidden=12, device=dev, requires_grad=True)
    x = make_state(1, 6, 6, 6, device=dev, requires_grad=True)
    kw = dict(steps=9, checkpoint_every=4, seed=5, frozen_channels=1)
    a = fastnca.nca_rollout(x, *rule, backend=backend, **kw)
    b = fastnca.nca_rollout(x, *rule, backend="reference", **kw)
    assert_close(a, b, torch.float32, "rollout")
    ga = torch.autograd.grad(a.sum(), [x, *rule])
    gb = torch.autograd.grad(b.sum(), [x, *rule])
    for u, v in zip(ga, gb):
        assert_close(u, v, torch.float32, "rollout grad")


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_are_the_float32_result_rounded(backend, dtype, bf16_round_to_nearest):
    """Half states compute in float32 and round once on store, as the reference does: the
    outputs agree bit for bit but for rare rounding-boundary cases (at most 1 ulp, and on
    under 2% of the elements). A kernel that rounded delta to the half dtype before adding
    it to the state (a second rounding) moved ~10% of the elements by up to 1 ulp, inside
    the dtype tolerance of the other tests. Under the Triton interpreter the bfloat16
    stores round to nearest as on a GPU (bf16_round_to_nearest; the interpreter truncates)."""
    dev = device_for(backend)
    rule = make_rule(6, hidden=16, frozen=1, fc2_rows=5, seed=8, device=dev)
    x = make_state(2, 6, 9, 11, dtype=dtype, device=dev)
    kw = dict(update_prob=1.0, seed=4, frozen_channels=1)
    out = fastnca.nca_step(x, *rule, backend=backend, **kw).float().cpu()
    ref = fastnca.nca_step(x, *rule, backend="reference", **kw).float().cpu()
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny))))
    assert ((out - ref).abs() <= ulp).all()
    assert (out != ref).float().mean().item() < 0.02


ROLLOUT_CASES = [  # B, C, H, W, hidden, F, groups, frozen, padding, update_prob, dtype
    (3, 4, 3, 5, 8, 1, "C", 0, "zeros", 0.5, torch.float32),
    (1, 3, 7, 9, 6, 3, 1, 1, "circular", 1.0, torch.float32),
    (2, 4, 2, 2, 8, 2, "C", 3, "replicate", 0.0, torch.float32),
    (2, 4, 5, 6, 8, 2, 1, 1, "reflect", 0.5, torch.bfloat16),
    (1, 4, 6, 5, 8, 2, "C", 1, "zeros", 0.5, torch.float16),
]


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
@pytest.mark.parametrize("case", ROLLOUT_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_backend_rollout_matches_reference(backend, case):
    """nca_rollout (weights arranged once, the segment recompute, the summed weight
    gradients) against the reference across perception kinds, paddings, F, frozen
    channels, update_prob 0 / 0.5 / 1, batch 3 and half states, with a non-uniform output
    gradient."""
    B, C, H, W, hidden, F, groups, frozen, padding, p, dtype = case
    dev = device_for(backend)
    g = C if groups == "C" else groups
    rule = make_rule(C, hidden=hidden, F=F, groups=g, fc2_rows=C - frozen, requires_grad=True, seed=6, device=dev)
    x = make_state(B, C, H, W, dtype=dtype, device=dev).requires_grad_(True)
    kw = dict(steps=5, checkpoint_every=2, groups=g, padding=padding, update_prob=p, seed=21, frozen_channels=frozen)
    outs, grads = {}, {}
    for b in (backend, "reference"):
        out = fastnca.nca_rollout(x, *rule, backend=b, **kw)
        ramp = torch.linspace(-1, 1, out.numel(), device=dev).view_as(out).to(dtype)
        outs[b] = out
        grads[b] = torch.autograd.grad(out, [x, *rule], ramp)
    assert_close(outs[backend], outs["reference"], dtype, "out")
    for name, a, b in zip(["d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2"], grads[backend], grads["reference"]):
        assert_close(a, b, dtype, name, scale=1.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_prepared_rule_is_refused_for_another_rule(backend):
    """nca_rollout arranges a backend's weights once (its kernel module's prepare) for all
    its steps. The arranged buffers bound the kernels' reads, so a call whose rule or state
    differs from the one prepared is refused, naming what differs, not run out of bounds."""
    k = _backend.kernel(backend, "nca_step")
    dev = device_for(backend)
    x, w = make_state(1, 4, 5, 6, device=dev), make_rule(4, hidden=8, fc2_rows=3, device=dev)
    args = (1, "reflect", 0.5, 3, 7, 1)
    prepared = k.prepare(x, *w, *args[:2], 1)
    assert torch.equal(k.forward(x, *w, *args, prepared=prepared), k.forward(x, *w, *args))
    for a, b in zip(k.backward(x, x, *w, *args, prepared=prepared), k.backward(x, x, *w, *args)):
        assert torch.equal(a, b)
    x6, w6 = make_state(1, 6, 5, 6, device=dev), make_rule(6, hidden=8, fc2_rows=5, device=dev)
    with pytest.raises(ValueError, match=r"prepared: .*channels 6 \(call\) vs 4 \(prepared\)"):
        k.forward(x6, *w6, *args, prepared=prepared)
    with pytest.raises(ValueError, match=r"prepared: .*channels 6 \(call\) vs 4 \(prepared\)"):
        k.backward(x6, x6, *w6, *args, prepared=prepared)
    with pytest.raises(ValueError, match=r"padding zeros \(call\) vs reflect \(prepared\)"):
        k.forward(x, *w, 1, "zeros", *args[2:], prepared=prepared)
    w_h = make_rule(4, hidden=16, fc2_rows=3, device=dev)
    with pytest.raises(ValueError, match=r"w1 shape \(16, 12\) \(call\) vs \(8, 12\) \(prepared\)"):
        k.backward(x, x, *w_h, *args, prepared=prepared)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_backend_reads_channels_last_state_without_copy(backend):
    """DESIGN: channels_last is the fast layout and kernels must not force a copy of it. No
    aten copy runs on a state-shaped tensor in nca_step's forward or backward (the cpu
    backend's pointers and strides are checked exactly in test_nca_step_cpu)."""
    dev = device_for(backend)
    rule = make_rule(6, hidden=12, device=dev, requires_grad=True)
    x = make_state(2, 6, 7, 5, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = make_state(2, 6, 7, 5, device=dev, seed=2).contiguous(memory_format=torch.channels_last)
    assert copies_of([x.shape], lambda: x.contiguous()), "the probe must see a copy"
    grads = []

    def run():
        out = fastnca.nca_step(x, *rule, seed=3, frozen_channels=1, backend=backend)
        assert out.is_contiguous(memory_format=torch.channels_last)
        grads.extend(torch.autograd.grad(out, [x, *rule], g))

    assert copies_of([x.shape], run) == []
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_backend_mask_is_fire_mask(backend):
    """With fc2 producing delta = 1 everywhere, out - state is exactly the fire mask."""
    dev = device_for(backend)
    B, C, H, W = 2, 4, 9, 11
    pw, pb, w1, b1, w2, b2 = make_rule(C, hidden=3, device=dev)
    w2 = torch.zeros_like(w2)
    b2 = torch.ones_like(b2)
    x = make_state(B, C, H, W, device=dev)
    out = fastnca.nca_step(x, pw, pb, w1, b1, w2, b2, update_prob=0.4, seed=2**40 + 3, step=17,
                           backend=backend)
    m = fastnca.fire_mask(B, H, W, 0.4, 2**40 + 3, 17, device=dev)
    torch.testing.assert_close(out - x, m[:, None].expand(B, C, H, W).float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_backend_gradients_are_deterministic(backend):
    dev = device_for(backend)
    case = (2, 8, 9, 10, 16, 2, 1, 1, "reflect", 0.5)
    _, g1 = _run(backend, torch.float32, case, device=dev)
    _, g2 = _run(backend, torch.float32, case, device=dev)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def check_backward_chunks_and_out(k, device, monkeypatch, dtype=torch.float32, groups=1,
                                  channels_last=False):
    """A kernel module's backward over batch chunks (forced on a small state) and with
    ``out=grad_out``: d_state and the weight grads against the float64 reference, the fire
    mask of every chunk at the chunk's own cells, and the in-place result equal to the
    out-of-place one."""
    B, C, H, W, F, hid, frozen = 3, 5, 4, 6, 2, 16, 1
    groups = C if groups == "C" else groups
    w = make_rule(C, hidden=hid, F=F, groups=groups, fc2_rows=C - frozen, device=device, seed=4)
    x = make_state(B, C, H, W, dtype=dtype, device=device, seed=5)
    g = make_state(B, C, H, W, dtype=dtype, device=device, seed=6)
    if channels_last:
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    args = (groups, "reflect" if groups == 1 else "circular", 0.5, 77, 5, frozen)
    ref = ref_nca.backward(g.double().cpu(), x.double().cpu(), *(t.double().cpu() for t in w), *args)
    whole = k.backward(g, x, *w, *args)
    monkeypatch.setattr(_common, "BACKWARD_CHUNK_MIN_CELLS", 1)
    assert _common.backward_batch_chunk(x, 4 * (F + 1) * C) == 1  # three chunks
    chunked = k.backward(g, x, *w, *args)
    buf = g.clone()
    in_place = k.backward(buf, x, *w, *args, out=buf)
    assert in_place[0] is buf
    names = ["d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2"]
    for name, a, b, r in zip(names, whole, chunked, ref):
        assert_close(a, r, dtype, name)
        assert_close(b, r, dtype, "chunked " + name)
    for name, a, b in zip(names, chunked, in_place):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="out must not overlap state"):
        k.backward(g, x, *w, *args, out=x)
    with pytest.raises(ValueError, match="out must match state"):
        k.backward(g, x, *w, *args, out=g[:1].clone())
    flat = torch.empty(x.numel() + 1, dtype=dtype, device=device)
    shifted_g, shifted_out = flat[:-1].view(x.shape), flat[1:].view(x.shape)
    shifted_g.copy_(g)
    with pytest.raises(ValueError, match="out may be grad_out itself"):
        k.backward(shifted_g, x, *w, *args, out=shifted_out)
    # grad_out's own memory seen through other strides (same address, same span) is not
    # grad_out itself: each element would be written over another one still to be read
    other = torch.channels_last if g.is_contiguous() else torch.contiguous_format
    buf = g.clone()
    twisted = buf.as_strided(buf.shape, torch.empty_like(buf, memory_format=other).stride())
    assert twisted.data_ptr() == buf.data_ptr() and twisted.stride() != buf.stride()
    with pytest.raises(ValueError, match="out may be grad_out itself"):
        k.backward(buf, x, *w, *args, out=twisted)


@pytest.mark.parametrize("listed", [False, True], ids=["every-cell", "listed"])
def test_triton_gemm_mode_in_batch_chunks_and_in_place(listed, monkeypatch):
    """The Triton backward's opt-in FASTNCA_TRITON_NCA_BWD_ACC=gemm (the fc kernel adds each
    chunk's sums into the same slots) over batch chunks and in place, dense and depthwise,
    in both walks of the backward (listed: _COMPACT_BACKWARD_CELLS lowered so that this
    small state takes it)."""
    if fastnca.backends()["triton"] is not True:
        pytest.skip(f"triton: {fastnca.backends()['triton']}")
    if listed:
        listed_walk(monkeypatch)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")
    k = _backend.kernel("triton", "nca_step")
    check_backward_chunks_and_out(k, device_for("triton"), monkeypatch)
    check_backward_chunks_and_out(k, device_for("triton"), monkeypatch, groups="C")


@pytest.mark.parametrize("backend", fast_backends("nca_step"))
def test_backend_backward_in_batch_chunks_and_in_place(backend, monkeypatch):
    """The cuda and triton backwards run over batch chunks that keep their fp32 workspace
    within the state's size (the cpu one works image by image and ignores the chunking);
    nca_rollout's backward writes each step's d_state over its grad on every backend. The
    triton backward in its listed walk too (the state here is small enough for the
    every-cell one)."""
    k = _backend.kernel(backend, "nca_step")
    assert k.BACKWARD_OUT_MAY_BE_GRAD  # every fast backend: the rollout relies on it
    check_backward_chunks_and_out(k, device_for(backend), monkeypatch)
    check_backward_chunks_and_out(k, device_for(backend), monkeypatch, groups="C", channels_last=True)
    if backend == "triton":
        listed_walk(monkeypatch)
        check_backward_chunks_and_out(k, device_for(backend), monkeypatch)
        check_backward_chunks_and_out(k, device_for(backend), monkeypatch, groups="C", channels_last=True)


def test_backward_batch_chunk_bounds():
    """Batch items per backward launch: the fp32 workspace within the state's bytes, but
    never fewer than BACKWARD_CHUNK_MIN_CELLS cells a launch (nor more than the batch)."""
    assert _common.BACKWARD_CHUNK_MIN_CELLS == 1 << 16
    x = torch.empty(256, 4, 32, 32, device="meta")  # 1024 cells an item, 16 bytes of state a cell
    assert _common.backward_batch_chunk(x, 4) == 256  # the whole workspace fits in the state's bytes
    assert _common.backward_batch_chunk(x, 1024) == 64  # 4 items by bytes, raised to 2^16 cells
    assert _common.backward_batch_chunk(x[:3], 1024) == 3
    assert _common.backward_batch_chunk(torch.empty(2, 1, 512, 512, device="meta"), 4096) == 1


@pytest.mark.parametrize("backend", ["reference", *fast_backends("nca_step")])
def test_rollout_keeps_no_checkpoints_without_grad(backend, monkeypatch):
    """Under torch.no_grad (inputs that require grad, as an nn.NCA's parameters do) the
    rollout allocates no checkpoints: none would be used."""
    import importlib

    nca_mod = importlib.import_module("fastnca.nca_step")  # the package's nca_step is the function
    dev = device_for(backend)
    counts = []
    empty = nca_mod._empty_checkpoints
    monkeypatch.setattr(nca_mod, "_empty_checkpoints", lambda state, n: counts.append(n) or empty(state, n))
    rule = make_rule(3, device=dev, requires_grad=True)
    x = make_state(1, 3, 4, 5, device=dev, requires_grad=True)
    kw = dict(steps=9, checkpoint_every=3, seed=1, backend=backend)
    with torch.no_grad():
        fastnca.nca_rollout(x, *rule, **kw)
    assert counts == [0]
    fastnca.nca_rollout(x, *rule, **kw)
    assert counts == [0, 2]


def test_rollout_checkpoints_take_no_gradient():
    """The checkpoints are an internal output: not differentiable, and backward gets no
    zero-filled gradient for them (that tensor, the size of every checkpoint, once sat at
    the rollout backward's peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rule = make_rule(4, hidden=8, requires_grad=True)
    x = make_state(2, 4, 6, 5, requires_grad=True)
    out, ckpt = torch.ops.fastnca.nca_rollout(x, *rule, 9, 0, 3, True, 1, "reflect", 0.5, 7, 0, "reference")
    assert ckpt.shape[0] == 2 and not ckpt.requires_grad and out.requires_grad
    filled = []

    class Fills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            if isinstance(r, torch.Tensor) and r.shape == ckpt.shape:
                filled.append(func)
            return r

    with Fills():
        out.sum().backward()
    assert filled == [] and x.grad is not None


def _cpu_peak_bytes(fn):
    """benchmark.common.cpu_peak_bytes; skip where this torch lacks that private API."""
    from fastnca.benchmark.common import cpu_peak_bytes

    try:
        return cpu_peak_bytes(fn)
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"torch profiler memory timeline unavailable or changed: {e}")


@pytest.mark.parametrize("steps", [16, 32])
def test_rollout_backward_peak_in_states(steps):
    """Peak memory of a rollout's forward + backward, in states: the checkpoints, one
    recomputed segment, the backward's dP workspace and a few more (output, gradients:
    measured 11.15 states at 16 steps, 15.15 at 32, 1.35 under the bound). A zero gradient
    materialised for the checkpoints (3 or 7 more states here) fails it."""
    if fastnca.backends()["cpu"] is not True:
        pytest.skip("needs the cpu backend")
    every = 4
    rule = make_rule(8, hidden=32, fc2_rows=7, requires_grad=True)
    x = make_state(4, 8, 48, 48, requires_grad=True)
    g = make_state(4, 8, 48, 48, seed=3)

    def run():
        out = fastnca.nca_rollout(x, *rule, steps=steps, checkpoint_every=every, seed=1,
                                  frozen_channels=1, backend="cpu")
        out.backward(g)

    state_bytes = x.numel() * x.element_size()
    peak = _cpu_peak_bytes(run) / state_bytes
    checkpoints = math.ceil(steps / every) - 1
    workspace = 4 * fastnca._ext.load("_C").nca_step_backward_workspace(
        fastnca._ext.DTYPE_CODES[x.dtype], list(x.shape), 2, 1, 32, 1, fastnca._ext.PADDING_CODES["reflect"])
    assert workspace >= state_bytes  # a torch allocation, inside the measured peak
    assert peak <= checkpoints + every + 2.5 + workspace / state_bytes, f"peak {peak:.2f} states"


@pytest.mark.parametrize("backend", [b for b in fast_backends("nca_step") if b.values[0] != "cpu"])
def test_gpu_rollout_backward_peak_in_states(backend):
    """On the GPU: a rollout's fwd+bwd peak (torch.cuda.max_memory_allocated) within the
    checkpoints, one recomputed segment, the chunked fp32 workspace and a few states more
    (output, gradient, weight-grad partials: about 1 state here). On the H100, before the
    checkpoints' zero gradient was dropped, the workspace chunked and the gradient buffer
    reused, this shape took 30.8 states (984 MiB)."""
    dev = device_for(backend)
    if dev.type != "cuda":
        pytest.skip("measures CUDA memory")
    steps, every, C, F = 64, 8, 32, 2
    rule = make_rule(C, hidden=128, F=F, fc2_rows=C - 1, device=dev, requires_grad=True)
    x = make_state(8, C, 256, 256, dtype=torch.bfloat16, device=dev)  # the benchmark's rollout
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn_like(x)
    state_bytes = x.numel() * x.element_size()
    chunk = _common.backward_batch_chunk(x, 4 * (F + 1) * C)
    workspace = chunk * 256 * 256 * 4 * (F + 1) * C
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    out = fastnca.nca_rollout(x, *rule, steps=steps, checkpoint_every=every, seed=1,
                              frozen_channels=1, backend=backend)
    out.backward(g)
    torch.cuda.synchronize(dev)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / state_bytes
    checkpoints = steps // every - 1
    assert peak <= checkpoints + (every - 1) + 4 + workspace / state_bytes, f"peak {peak:.2f} states"


def check_frozen_channels_kept_beside_nan(backend, device):
    """A NaN in an updated channel makes the hidden activations of its firing neighbours NaN;
    the frozen channels of those cells still keep the state bitwise (a kernel that adds a
    zero-weighted delta there writes NaN)."""
    C = 4
    rule = [t if t is None else t.to(device) for t in make_rule(C, hidden=5, fc2_rows=C - 1)]
    x = make_state(1, C, 6, 7, device=device)
    x[0, 2, 2, 3] = float("nan")
    out = fastnca.nca_step(x, *rule, seed=3, step=1, update_prob=1.0, frozen_channels=1, backend=backend)
    assert out[0, 1:].isnan().sum() > 1  # the neighbours took the NaN
    assert torch.equal(out[:, :1], x[:, :1])


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("nca_step"))
def test_frozen_channels_kept_beside_nan(backend):
    check_frozen_channels_kept_beside_nan(backend, device_for(backend))


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("nca_step"))
def test_idle_cells_keep_their_state_when_delta_is_not_finite(backend):
    """Cells that do not fire are copied, not updated by 0 * delta: a NaN in the state
    reaches only the firing cells of its neighbourhood (and itself where it fires), and a
    NaN weight leaves the state unchanged at update_prob 0. Every backend alike (the
    reference and the Triton non-compact forward computed state + 0 * NaN = NaN there)."""
    device = device_for(backend)
    C = 3
    rule = [t if t is None else t.to(device) for t in make_rule(C, hidden=5)]
    x = make_state(1, C, 6, 7, device=device)
    x[0, 1, 2, 3] = float("nan")
    out = fastnca.nca_step(x, *rule, seed=3, step=1, backend=backend)
    fires = fastnca.fire_mask(1, 6, 7, 0.5, seed=3, step=1).to(device)
    idle = ~fires[0]
    assert idle.any() and fires.any()
    torch.testing.assert_close(out[0][:, idle], x[0][:, idle], rtol=0, atol=0, equal_nan=True)
    assert out[0][:, fires[0]].isnan().any()  # the firing neighbours of the NaN cell
    bad = [t.clone() if t is not None else None for t in rule]
    bad[2][0, 0] = float("nan")
    x = make_state(1, C, 6, 7, device=device)
    torch.testing.assert_close(fastnca.nca_step(x, *bad, seed=3, update_prob=0.0, backend=backend), x,
                               rtol=0, atol=0)
