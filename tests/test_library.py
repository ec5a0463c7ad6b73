"""torch.library registration: opcheck (schema, fake tensors, autograd registration) and
torch.compile(fullgraph=True) tracing every op without graph breaks."""
import pytest
import torch

import fastnca
from test_nca_step import make_rule, make_state
from test_neighborhood_attention import make_qkv

ops = torch.ops.fastnca


def nca_args(backend="reference", requires_grad=True):
    pw, pb, w1, b1, w2, b2 = make_rule(3, hidden=5, requires_grad=requires_grad)
    x = make_state(2, 3, 4, 5, requires_grad=requires_grad)
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
    """With every backend usable, None picks Triton's tensor-core kernels for the compute-bound
    nca_step and the CUDA kernels for attention; an unusable first choice falls through."""
    from fastnca import _backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    assert _backend.resolve(None, "nca_step", cuda) == "triton"
    assert _backend.resolve(None, "neighborhood_attention", cuda) == "cuda"
    assert _backend.resolve(None, "fire_mask", cuda) == "cuda"
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: name != "triton" or "no triton")
    assert _backend.resolve(None, "nca_step", cuda) == "cuda"
    monkeypatch.setenv("FASTNCA_BACKEND", "reference")
    assert _backend.resolve(None, "nca_step", cuda) == "reference"
