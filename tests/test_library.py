"""torch.library registration: opcheck (schema, fake tensors, autograd registration) on the
reference and on every kernel backend (fakes against real output strides), and
torch.compile(fullgraph=True) tracing every op without graph breaks."""
import pytest
import torch

import fastnca
from conftest import device_for, fast_backends
from test_nca_step import make_rule, make_state
from test_neighborhood_attention import make_qkv

ops = torch.ops.fastnca


def nca_args(backend="reference", requires_grad=True, channels_last=False):
    pw, pb, w1, b1, w2, b2 = make_rule(3, hidden=5, requires_grad=requires_grad)
    x = make_state(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    return (x, pw, pb, w1, b1, w2[1:], b2[1:].detach().requires_grad_(requires_grad), 1, "reflect", 0.5,
            -5, 3, 1, backend)


@pytest.mark.parametrize("test_utils", [
    "test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"])
def test_opcheck_nca_step(test_utils):
    torch.library.opcheck(ops.nca_step.default, nca_args(), test_utils=test_utils)


@pytest.mark.parametrize("steps", [5, 0])
def test_opcheck_nca_rollout(steps):
    """Also 0 steps: the backward's d_state is then grad_out's value in a new tensor (a
    custom op may not return an alias of its input)."""
    x, pw, pb, w1, b1, w2, b2, groups, padding, p, seed, step, frozen, backend = nca_args()
    args = (x, pw, pb, w1, b1, w2, b2, steps, step, 2, True, groups, padding, p, seed, frozen, backend)
    torch.library.opcheck(ops.nca_rollout.default, args)


def test_opcheck_neighborhood_attention():
    q, k, v = make_qkv(1, 4, 5, 2, 8, packed=True, requires_grad=True)
    torch.library.opcheck(ops.neighborhood_attention2d.default, (q, k, v, 3, "zeros", 0.35, "reference"))


# The fake implementations checked against the real kernels' outputs (shapes, dtypes and
# strides, e.g. a channels_last state must give a channels_last result on every backend).
# Triton runs under the interpreter without a GPU (~9 s for all of these).
KERNEL_BACKENDS = fast_backends("nca_step")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_nca_step_kernels(backend, channels_last):
    dev = device_for(backend)
    args = tuple(a.to(dev).detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a
                 for a in nca_args(backend, channels_last=channels_last))
    if channels_last:
        assert args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()
    torch.library.opcheck(ops.nca_step.default, args)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_nca_rollout_kernels(backend, channels_last):
    dev = device_for(backend)
    if backend == "triton" and dev.type == "cpu" and not channels_last:
        pytest.skip("4 s under TRITON_INTERPRET; channels_last (the stride-sensitive case) and "
                    "nca_step's NCHW opcheck cover it")
    x, pw, pb, w1, b1, w2, b2, groups, padding, p, seed, step, frozen, _ = (
        a.to(dev).detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a
        for a in nca_args(backend, channels_last=channels_last))
    # 3 steps, a checkpoint every 2: one checkpoint (in the state's memory format) is kept.
    args = (x, pw, pb, w1, b1, w2, b2, 3, step, 2, True, groups, padding, p, seed, frozen, backend)
    torch.library.opcheck(ops.nca_rollout.default, args)
    _, ckpt = ops.nca_rollout(*args)
    assert ckpt.shape[0] == 1 and ckpt[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("backend", fast_backends("neighborhood_attention"))
def test_opcheck_neighborhood_attention_kernels(backend):
    q, k, v = make_qkv(1, 4, 5, 2, 8, device=device_for(backend), packed=True, requires_grad=True)
    torch.library.opcheck(ops.neighborhood_attention2d.default, (q, k, v, 3, "zeros", 0.35, backend))


def test_opcheck_fire_mask():
    torch.library.opcheck(ops.fire_mask.default, (2, 3, 4, 0.5, -7, 9, torch.device("cpu"), "reference"))


def _model(x, rule, q, k, v):
    y = fastnca.nca_rollout(x, *rule, steps=3, seed=7, frozen_channels=1)
    m = fastnca.fire_mask(x.shape[0], x.shape[2], x.shape[3], 0.5, seed=1, step=2, device=x.device)
    o = fastnca.neighborhood_attention2d(q, k, v, 3, "zeros")
    return (y * m[:, None]).sum() + o.sum()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    torch._dynamo.reset()
    rule = make_rule(3, hidden=5, requires_grad=True)
    x = make_state(2, 3, 4, 5, requires_grad=True)
    q, k, v = make_qkv(2, 4, 5, 2, 8, packed=True, requires_grad=True)
    compiled = torch.compile(_model, fullgraph=True, backend=compiler)
    out = compiled(x, rule, q, k, v)
    expected = _model(x, rule, q, k, v)
    torch.testing.assert_close(out, expected)
    g = torch.autograd.grad(out, [x, *rule[:5], q._base])
    ge = torch.autograd.grad(expected, [x, *rule[:5], q._base])
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


def test_auto_backend_order_on_cuda(monkeypatch):
    """With every backend usable, None picks Triton's kernels for nca_step and the attention
    (the faster ones on the H100 runs in benchmarks/README.md) and the CUDA fire_mask; an
    unusable first choice falls through to the other."""
    from fastnca import _backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    assert _backend.resolve(None, "nca_step", cuda) == "triton"
    assert _backend.resolve(None, "neighborhood_attention", cuda) == "triton"
    assert _backend.resolve(None, "fire_mask", cuda) == "cuda"
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: name != "triton" or "no triton")
    assert _backend.resolve(None, "nca_step", cuda) == "cuda"
    assert _backend.resolve(None, "neighborhood_attention", cuda) == "cuda"
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: name != "cuda" or "no cuda")
    assert _backend.resolve(None, "fire_mask", cuda) == "triton"
    monkeypatch.setenv("FASTNCA_BACKEND", "reference")
    assert _backend.resolve(None, "nca_step", cuda) == "reference"


def _public_calls(x, rule, q, k, v):
    y = fastnca.nca_step(x, *rule, seed=3, step=1, frozen_channels=1, backend="reference")
    r = fastnca.nca_rollout(x, *rule, steps=3, seed=3, frozen_channels=1, backend="reference")
    o, lse = fastnca.neighborhood_attention2d(q, k, v, 3, "zeros", return_lse=True, backend="reference")
    return y, r, o, lse


def _inputs():
    rule = [t.double() for t in make_rule(3, hidden=5)]
    rule = [t.detach().requires_grad_(True) for t in rule]
    x = make_state(2, 3, 4, 5).double().requires_grad_(True)
    q, k, v = (t.double().detach().requires_grad_(True) for t in make_qkv(2, 4, 5, 2, 8))
    return x, rule, q, k, v


def test_eager_calls_take_an_autograd_function_with_the_ops_results(monkeypatch):
    """Eager calls of plain tensors run the op's implementation and autograd formula through
    a torch.autograd.Function (no dispatcher round trip, fastnca._eager): the same values and
    gradients, bitwise, as the registered ops, which are not called."""
    import importlib

    nca_mod = importlib.import_module("fastnca.nca_step")  # the package's nca_step is the function
    na_mod = importlib.import_module("fastnca.neighborhood_attention")

    x, rule, q, k, v = _inputs()
    outs = _public_calls(x, rule, q, k, v)  # through the ops' Functions
    seeds = [torch.randn_like(t) for t in outs]
    loss = sum((t * s).sum() for t, s in zip(outs, seeds))
    grads = torch.autograd.grad(loss, [x, *rule, q, k, v])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # take the registered ops
    op_outs = _public_calls(x, rule, q, k, v)
    op_grads = torch.autograd.grad(sum((t * s).sum() for t, s in zip(op_outs, seeds)), [x, *rule, q, k, v])
    for a, b in zip(outs + grads, op_outs + op_grads):
        assert torch.equal(a, b)
    monkeypatch.undo()

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call of plain tensors reached the registered op")

    for mod, name in ((nca_mod, "_nca_step_op"), (nca_mod, "_nca_rollout_op"), (na_mod, "_na2d_op")):
        monkeypatch.setattr(mod, name, refuse)
    outs = _public_calls(x, rule, q, k, v)  # with grad, then without
    torch.autograd.grad(sum(t.sum() for t in outs), [x, *rule, q, k, v])
    with torch.no_grad():
        _public_calls(x, rule, q, k, v)


def test_boundary_integers_on_the_registered_ops(monkeypatch):
    """torch.library carries step, start_step and seed as int64: on the registered-op path,
    as eagerly, a step is taken mod 2^32 (2^64 - 1 is 2^32 - 1, also past int64), a
    rollout's start_step too, and seeds span [0, 2^64) (2^63, the first past int64, and
    2^64 - 1 run): the eager path's values and gradients, bitwise."""
    x, rule, *_ = _inputs()
    kw = dict(frozen_channels=1, backend="reference")

    def calls(step, start, seed):
        y = fastnca.nca_step(x, *rule, seed=seed, step=step, **kw)
        r = fastnca.nca_rollout(x, *rule, steps=3, start_step=start, seed=seed, **kw)
        m = fastnca.fire_mask(2, 4, 5, 0.5, seed=seed, step=step)
        grads = torch.autograd.grad(y.sum() + r.square().sum(), [x, *rule])
        return (y, r, m, *grads)

    for seed in (2**63, 2**64 - 1, 5):
        want = calls(2**32 - 1, 2**32 - 2, seed)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)  # take the registered ops
            got = calls(2**64 - 1, 2**64 - 2, seed)
            assert torch.equal(fastnca.nca_step(x, *rule, seed=seed, step=2**32 + 5, **kw),
                               fastnca.nca_step(x, *rule, seed=seed, step=5, **kw))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_dispatch_modes_and_subclasses_see_the_registered_ops():
    """Under a TorchDispatchMode (make_fx, FakeTensorMode, a user's) the public functions
    call the registered ops, so the mode sees fastnca's ops and not their insides."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, rule, q, k, v = _inputs()
    with Record():
        outs = _public_calls(x, rule, q, k, v)
        torch.autograd.grad(sum(t.sum() for t in outs), [x, *rule, q, k, v])
    for op in ("nca_step", "nca_rollout", "neighborhood_attention2d", "nca_step_backward", "nca_rollout_backward",
               "neighborhood_attention2d_backward"):
        assert f"fastnca.{op}" in seen, (op, sorted(seen))


@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_raises(monkeypatch, path):
    """The backward ops have no autograd formula: differentiating a gradient raises on both
    paths (the eager Function ties its gradients to _DifferentiableOnce) instead of dropping the second-order
    terms, even on the reference backend, whose kernels are plain differentiable torch."""
    if path == "op":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, rule, q, k, v = _inputs()
    o = fastnca.neighborhood_attention2d(q, k, v, backend="reference")
    y = fastnca.nca_step(x, *rule, seed=3, step=1, frozen_channels=1, backend="reference")
    r = fastnca.nca_rollout(x, *rule, steps=2, seed=3, frozen_channels=1, backend="reference")
    for out, wrt in ((o, q), (y, x), (r, x)):
        g, = torch.autograd.grad(out.square().sum(), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match="is differentiable once|no autograd formula"):
            g.sum().backward()


def test_torch_func_transforms_take_the_registered_ops(monkeypatch):
    """Under torch.func transforms the public functions take the registered-op path, never
    the eager Function, whose backward would hand functorch-wrapped tensors to the kernels;
    the differentiating transforms, whose autograd the ops do not support, raise a clear
    error there (_eager.unsupported_autodiff)."""
    import importlib

    na_mod = importlib.import_module("fastnca.neighborhood_attention")
    x, rule, q, k, v = _inputs()
    monkeypatch.setattr(na_mod, "_NA2dFunction", None)  # reached only if the eager path were taken

    def loss(q):
        return fastnca.neighborhood_attention2d(q, k, v, backend="reference").square().sum()

    with pytest.raises(NotImplementedError, match="neighborhood_attention2d does not support torch.func's"):
        torch.func.grad(loss)(q.detach())


def odd_layout_inputs(dev):
    """Tensors laid out as users hold them: a channels_last conv weight (a module moved with
    .to(memory_format=channels_last)), fc1 as a transposed view, and a densely permuted
    state (Med-NCA's checkpoints keep [B, W, H, C] transposed)."""
    pw, pb, w1, b1, w2, b2 = (t.to(dev) for t in make_rule(3, hidden=5))
    pw = pw.contiguous(memory_format=torch.channels_last)
    w1 = w1.t().contiguous().t()
    x = make_state(2, 5, 4, 3).to(dev).transpose(1, 3)
    assert not pw.is_contiguous() and not w1.is_contiguous() and not x.is_contiguous()
    return x, (pw, pb, w1, b1, w2[1:], b2[1:])


@pytest.mark.parametrize("p,frozen", [(0.5, 1), (0.0, 1), (0.5, 3)], ids=["some-fire", "none-fire", "all-frozen"])
@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_opcheck_backward_ops_odd_layouts(backend, p, frozen):
    """The backward ops' fakes give every backend's strides: d_state like the state, weight
    gradients contiguous (the compiled backward asserts them; a channels_last conv weight
    and a permuted state failed there, and so did the cpu backend's shortcut for steps
    where nothing updates)."""
    x, rule = odd_layout_inputs(device_for(backend))
    if frozen == 3:  # every channel frozen: the ops take fc2 without the frozen rows, none left
        full = make_rule(3, hidden=5)
        rule = (*rule[:4], full[4][3:].to(x.device), full[5][3:].to(x.device))
    g = torch.randn_like(x)
    params = (1, "reflect", p, -5, 3, frozen, backend)
    torch.library.opcheck(ops.nca_step_backward.default, (g, x, *rule, *params),
                          test_utils=("test_schema", "test_faketensor"))
    if backend == "triton" and not torch.cuda.is_available():
        return  # the rollout's recompute under the interpreter: covered by the nca_step case
    _, ckpt = ops.nca_rollout(x, *rule, 3, 3, 2, True, *params[:4], frozen, backend)
    torch.library.opcheck(ops.nca_rollout_backward.default,
                          (g, x, ckpt, *rule, 3, 3, 2, 1, "reflect", p, -5, frozen, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_dynamic_module_with_odd_layouts(monkeypatch):
    """torch.compile(fullgraph=True, dynamic=True) of fastnca.nn.NCA moved to channels_last,
    on a permuted state: the checks take symbolic sizes (`4 in (s0, s0 - 1)` was False
    under dynamo and refused valid rules), and forward and gradients match eager."""
    import torch._inductor.config as inductor_config

    for knob in ("fx_graph_cache", "autograd_cache"):  # a cached graph would hide a fake's change
        if hasattr(inductor_config, knob):
            monkeypatch.setattr(inductor_config, knob, False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = fastnca.nn.NCA(4, hidden=8, frozen_channels=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        m.fc2_weight.normal_()
    x = make_state(2, 6, 5, 4).transpose(1, 3).detach().requires_grad_(True)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    out, expected = compiled(x, steps=3, seed=1), m(x, steps=3, seed=1)
    torch.testing.assert_close(out, expected)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out.square().sum(), params),
                    torch.autograd.grad(expected.square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_compile_traces_default_device_and_new_scales():
    """fire_mask without a device, and the attention called again with another Python-float
    scale (dynamo then makes it symbolic), trace with fullgraph=True."""
    torch._dynamo.reset()
    mask = torch.compile(lambda: fastnca.fire_mask(2, 4, 4, 0.5, seed=1), fullgraph=True, backend="aot_eager")
    assert torch.equal(mask(), fastnca.fire_mask(2, 4, 4, 0.5, seed=1))
    q = torch.randn(1, 4, 4, 2, 8)
    attend = torch.compile(lambda q, s: fastnca.neighborhood_attention2d(q, q, q, scale=s), fullgraph=True,
                           backend="aot_eager")
    for s in (0.25, 0.5):
        torch.testing.assert_close(attend(q, s), fastnca.neighborhood_attention2d(q, q, q, scale=s))


def test_custom_op_functions_have_runtime_annotations():
    """torch 2.4's custom_op infers the schema from the annotation objects and has no string
    handling (2.5 added it): under ``from __future__ import annotations`` every op module
    failed at import with 'Parameter batch has unsupported type int'."""
    import importlib
    import inspect

    fire_mask, nca_step, neighborhood_attention = (importlib.import_module(f"fastnca.{m}") for m in
                                                   ("fire_mask", "nca_step", "neighborhood_attention"))
    ops = [fire_mask._fire_mask_op._init_fn, nca_step._nca_step, nca_step._nca_step_backward,
           nca_step._nca_rollout, nca_step._nca_rollout_backward, neighborhood_attention._na2d,
           neighborhood_attention._na2d_backward]
    for fn in ops:
        sig = inspect.signature(fn)
        for p in [*sig.parameters.values(), sig.return_annotation]:
            ann = p.annotation if isinstance(p, inspect.Parameter) else p
            assert not isinstance(ann, str), (fn.__name__, p, ann)
