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


def test_opcheck_nca_rollout():
    x, pw, pb, w1, b1, w2, b2, groups, padding, p, seed, step, frozen, backend = nca_args()
    args = (x, pw, pb, w1, b1, w2, b2, 5, step, 2, True, groups, padding, p, seed, frozen, backend)
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
