"""fastnca.nn modules and backend reporting."""
import pytest
import torch

import fastnca
from conftest import raised_under_fullgraph
from fastnca.nn import NCA, NeighborhoodAttention2d


def test_backends_report():
    status = fastnca.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"] is True
    for name, s in status.items():
        assert s is True or (isinstance(s, str) and s), name


def test_nca_module_fresh_rule_is_identity_and_trains():
    torch.manual_seed(0)
    nca = NCA(8, hidden=16, frozen_channels=1)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(nca(x, steps=4), x)  # zero-initialised fc2
    torch.nn.init.normal_(nca.fc2_weight, std=0.1)
    target = torch.randn(2, 7, 6, 6)
    opt = torch.optim.Adam(nca.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (nca(x, steps=4, seed=3)[:, 1:] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(nca(x, 4)[:, :1], x[:, :1])


def test_nca_module_seed_follows_manual_seed():
    nca = NCA(4, hidden=8, groups=4, padding="circular")
    torch.nn.init.normal_(nca.fc2_weight)
    x = torch.randn(1, 4, 5, 5)
    torch.manual_seed(5)
    a = nca(x, 3)
    torch.manual_seed(5)
    b = nca(x, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, nca(x, 3))


def test_neighborhood_attention_module():
    torch.manual_seed(0)
    attn = NeighborhoodAttention2d(16, 4, backend="reference")
    x = torch.randn(2, 5, 6, 16, requires_grad=True)
    y = attn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 5, 6, 8))
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2d(10, 4)


def test_import_without_compiled_modules():
    """A missing fastnca._C / _C_cuda is a supported configuration: import works, backends()
    says why, and auto-selection falls back to the reference backend."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['fastnca._C'] = None; sys.modules['fastnca._C_cuda'] = None\n"
        "import torch, fastnca\n"
        "s = fastnca.backends()\n"
        "assert isinstance(s['cpu'], str) and 'not importable' in s['cpu'], s\n"
        "assert isinstance(s['cuda'], str), s\n"
        "m = fastnca.fire_mask(2, 3, 4, 0.5, seed=1)\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "y = fastnca.nca_step(x, torch.randn(4, 2, 3, 3), None, torch.randn(4, 6), None, torch.randn(2, 4), seed=0)\n"
        "q = torch.randn(1, 3, 3, 1, 4)\n"
        "o = fastnca.neighborhood_attention2d(q, q, q)\n"
        "try:\n"
        "    fastnca.fire_mask(1, 1, 1, 0.5, seed=0, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not importable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpu backend should be unusable')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def _build(what, kw):
    from fastnca.models.geca import GeCAConfig
    from fastnca.models.mednca import BackboneNCA, MedNCA

    ctor = {"NCA": lambda **k: NCA(**{"channels": 4, **k}),
            "NeighborhoodAttention2d": lambda **k: NeighborhoodAttention2d(**{"dim": 8, "num_heads": 2, **k}),
            "BackboneNCA": BackboneNCA, "MedNCA": MedNCA, "GeCAConfig": GeCAConfig}[what]
    return ctor(**kw)


@pytest.mark.parametrize("what,kw,exc,match", [
    ("NCA", dict(channels=0), ValueError, "channels must be in"),
    ("NCA", dict(frozen_channels=5), ValueError, "frozen_channels must be in"),
    ("NCA", dict(hidden=0), ValueError, "hidden must be in"),
    ("NCA", dict(filters=1.5), TypeError, "filters must be an integer"),
    ("NCA", dict(groups=2), ValueError, "groups must be 1 or the channel count"),
    ("NCA", dict(padding="same"), ValueError, "padding must be one of"),
    ("NCA", dict(update_prob=2.0), ValueError, "update_prob must be in"),
    ("NCA", dict(checkpoint_every=0), ValueError, "checkpoint_every must be in"),
    ("NCA", dict(backend="gpu"), ValueError, "backend must be None or one of"),
    ("NCA", dict(backend=1), TypeError, "backend must be None or a str"),
    ("NeighborhoodAttention2d", dict(num_heads=0), ValueError, "num_heads must be in"),
    ("NeighborhoodAttention2d", dict(num_heads=-2), ValueError, "num_heads must be in"),
    ("NeighborhoodAttention2d", dict(num_heads=3), ValueError, "divisible by num_heads"),
    ("NeighborhoodAttention2d", dict(kernel_size=4), ValueError, "kernel_size must be 3, 5 or 7"),
    ("NeighborhoodAttention2d", dict(kernel_size=9), ValueError, "kernel_size must be 3, 5 or 7"),
    ("NeighborhoodAttention2d", dict(border="reflect"), ValueError, "border must be one of"),
    ("NeighborhoodAttention2d", dict(scale=float("nan")), ValueError, "scale must be None or a finite float"),
    ("BackboneNCA", dict(channels=8, input_channels=8), ValueError, "input_channels must be in"),
    ("BackboneNCA", dict(fire_rate=-0.1), ValueError, "fire_rate must be in"),
    ("BackboneNCA", dict(padding="valid"), ValueError, "padding must be one of"),
    ("MedNCA", dict(downscale=0), ValueError, "downscale must be in"),
    ("MedNCA", dict(steps=(8, 8, 8)), ValueError, "steps must be one int or one per level"),
    ("MedNCA", dict(steps=-1), ValueError, "steps must be in"),
    ("MedNCA", dict(steps="64"), TypeError, "steps must be an integer"),
    ("MedNCA", dict(channels=4, input_channels=2, output_channels=3), ValueError, "must not exceed channels=4"),
    ("GeCAConfig", dict(update_prob=1.5), ValueError, "update_prob must be in"),
    ("GeCAConfig", dict(ca_steps=-1), ValueError, "ca_steps must be in"),
    ("GeCAConfig", dict(heads=0), ValueError, "heads must be in"),
    ("GeCAConfig", dict(kernel_size=4), ValueError, "kernel_size must be 3, 5 or 7"),
])
def test_constructors_name_the_bad_argument(what, kw, exc, match):
    """Modules and model configs check their arguments when built, with the argument's name
    (they used to fail later, inside torch, e.g. a ZeroDivisionError for num_heads=0)."""
    with pytest.raises(exc, match=match):
        _build(what, kw)


def test_attention_module_checks_its_input():
    m = NeighborhoodAttention2d(8, 2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        m([[1.0]])
    with pytest.raises(ValueError, match=r"x must have shape \[B, H, W, 8\]"):
        m(torch.randn(1, 3, 3, 4))


def test_constructors_take_numpy_integers():
    np = pytest.importorskip("numpy")
    from fastnca.models.mednca import MedNCA

    assert MedNCA(steps=np.int64(8)).steps == (8, 8)
    assert NCA(np.int64(4), hidden=np.int32(8)).channels == 4


def test_zero_step_modules_run_with_grad():
    """NCA(..., steps=0) and a Med-NCA level of 0 steps: their parameters require grad, and
    a rollout of 0 steps used to fail building its (empty) checkpoints."""
    from fastnca.models.mednca import MedNCA

    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    y = NCA(4, hidden=8)(x, steps=0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    model = MedNCA(channels=8, hidden=16, steps=(0, 3), downscale=2)
    out = model(torch.randn(1, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (1, 1, 8, 8)


def test_nca_names_a_state_of_the_wrong_channels():
    """The module's input check names the state and the channels it expects (before, the
    perception weight's shape check fired, blaming the weight)."""
    nca = fastnca.nn.NCA(channels=4, hidden=8)
    for bad in (torch.randn(1, 3, 6, 6), torch.randn(1, 6, 6, 4), torch.randn(4, 6, 6)):
        with pytest.raises(ValueError, match=r"state must have shape \[B, 4, H, W\]"):
            nca(bad, steps=2)
    with pytest.raises(TypeError, match="state must be a torch.Tensor, got list"):  # as the ops say it
        nca([[1.0]], steps=2)


def test_nca_rollout_continues_from_start_step():
    """A rollout continued with start_step=steps equals one longer rollout (the step counter
    keys each step's mask), and another start_step gives other masks."""
    nca = fastnca.nn.NCA(channels=4, hidden=8, backend="reference")
    torch.manual_seed(0)
    for b in nca.parameters():
        torch.nn.init.normal_(b, std=0.3)
    x = torch.randn(1, 4, 6, 6)
    whole = nca(x, steps=4, seed=7)
    assert torch.equal(nca(nca(x, steps=2, seed=7), steps=2, seed=7, start_step=2), whole)
    assert not torch.equal(nca(nca(x, steps=2, seed=7), steps=2, seed=7), whole)


def test_nca_seed_none_under_compile_says_to_pass_a_seed():
    """Drawing the seed reads a tensor back to Python: under fullgraph=True the module says
    to pass one (it was a data-dependent guard error); without fullgraph the call falls
    back to eager and draws from the default generator as before."""
    nca = fastnca.nn.NCA(channels=3, hidden=4, backend="reference")
    for b in nca.parameters():
        torch.nn.init.normal_(b, std=0.3)
    state = torch.randn(1, 3, 5, 5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=raised_under_fullgraph("needs seed=")):
        torch.compile(lambda s: nca(s, steps=2), fullgraph=True, backend="eager")(state)
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(lambda s: nca(s, steps=2), backend="eager")(state)
    torch.manual_seed(0)
    assert torch.equal(compiled, nca(state, steps=2))
    assert torch.equal(torch.compile(lambda s: nca(s, steps=2, seed=4), fullgraph=True, backend="eager")(state),
                       nca(state, steps=2, seed=4))


def test_nca_draws_its_seed_on_the_cpu_whatever_the_default_device():
    """The seed comes from the CPU generator: a default device of meta (or cuda) does not
    move the draw (it raised 'Tensor.item() cannot be called on meta tensors')."""
    nca = fastnca.nn.NCA(channels=3, hidden=4, backend="reference")
    for b in nca.parameters():
        torch.nn.init.normal_(b, std=0.3)
    state = torch.randn(1, 3, 5, 5)
    torch.manual_seed(1)
    expected = nca(state, steps=2)
    torch.manual_seed(1)
    torch.set_default_device("meta")
    try:
        got = nca(state, steps=2)
    finally:
        torch.set_default_device(None)
    assert torch.equal(got, expected)


# Adversarial input review (session 19, "badinput"): these failed when written.

@pytest.mark.parametrize("what,kw", [("NCA", dict(channels=4, dtype=torch.int32)),
                                     ("NeighborhoodAttention2d", dict(dim=8, num_heads=2, dtype=torch.int64))])
def test_constructors_refuse_a_non_floating_dtype(what, kw):
    """dtype=torch.int32 failed inside torch's initialisers ('"check_uniform_bounds" not
    implemented for 'Int'', "Only Tensors of floating point and complex dtype can require
    gradients"), naming no argument."""
    cls = NCA if what == "NCA" else NeighborhoodAttention2d
    with pytest.raises(TypeError, match=r"(?s)^(?=.*\bdtype\b)(?=.*\b(int32|int64)\b)"):
        cls(**kw)


def test_attention_module_input_dtype_is_handled_like_the_nca_module():
    """NCA.forward takes a state of another float dtype than its parameters; the attention
    module failed in its QKV linear ("expected m1 and m2 to have the same dtype, but got:
    double != float"). Either it runs, or the error names x and the dtypes."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(8, 2, backend="reference")
    x = torch.randn(1, 4, 5, 8)
    try:
        out = m(x.double())
    except TypeError as e:
        assert "x" in str(e) and "float64" in str(e), str(e)
    else:
        torch.testing.assert_close(out.float(), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_attention_module_uses_its_kernel_size_scale_and_border(kernel_size):
    """The module attends with its own kernel size, scale and border, checked against plain
    torch on a circular grid (torch.roll) with a non-default scale."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(8, 2, kernel_size=kernel_size, border="circular", scale=0.7, backend="reference")
    x = torch.randn(2, 6, 7, 8)
    q, k, v = m.qkv(x).view(2, 6, 7, 3, 2, 4).unbind(3)
    r = range(-(kernel_size // 2), kernel_size // 2 + 1)
    offs = [(dy, dx) for dy in r for dx in r]

    def nb(z, dy, dx):  # z[i + dy, j + dx], wrapping around
        return torch.roll(z, shifts=(-dy, -dx), dims=(1, 2))

    logits = torch.stack([(q * nb(k, dy, dx)).sum(-1) * 0.7 for dy, dx in offs], -1)
    w = logits.softmax(-1)
    o = sum(w[..., i, None] * nb(v, dy, dx) for i, (dy, dx) in enumerate(offs))
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.proj(o.reshape(2, 6, 7, 8)), rtol=1e-5, atol=1e-5)


def test_nca_module_uses_its_padding_fc2_bias_and_update_prob():
    """NCA.forward runs the rollout with the module's padding, fc2 bias and update
    probability."""
    torch.manual_seed(0)
    nca = NCA(4, hidden=8, padding="circular", update_prob=0.3, fc2_bias=True, frozen_channels=1,
              backend="reference")
    for p in nca.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 4, 5, 6)
    want = fastnca.nca_rollout(x, nca.perception_weight, nca.perception_bias, nca.fc1_weight, nca.fc1_bias,
                               nca.fc2_weight, nca.fc2_bias, steps=3, padding="circular", update_prob=0.3,
                               seed=9, frozen_channels=1, backend="reference")
    torch.testing.assert_close(nca(x, steps=3, seed=9), want, rtol=0, atol=0)
