"""Public-API behaviour around the ops: backend resolution by device and dtype, error
messages that name what the user passed, argument types, and re-exports."""
import pytest
import torch

import fastnca
from fastnca import _backend, _ext
from test_nca_step import make_rule, make_state
from conftest import mentions


def test_auto_backend_skips_kernels_without_the_dtype(monkeypatch):
    """float64 on CUDA: the CUDA and Triton kernels do not take it, so None picks the reference."""
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    cuda = torch.device("cuda")
    assert _backend.resolve(None, "nca_step", cuda, torch.float64) == "reference"
    assert _backend.resolve(None, "neighborhood_attention", cuda, torch.float64) == "reference"
    assert _backend.resolve(None, "nca_step", cuda, torch.bfloat16) == "triton"
    assert _backend.resolve(None, "nca_step", torch.device("cpu"), torch.float64) == "cpu"


@pytest.mark.skipif(_backend.backends()["triton"] is not True, reason="triton not usable here")
def test_explicit_backend_without_the_dtype_is_a_clear_error():
    x = make_state(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' does not support torch.float64"):
        fastnca.nca_step(x, *[t.double() for t in make_rule(3)], seed=0, backend="triton")
    q = torch.randn(1, 4, 4, 1, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' does not support"):
        fastnca.neighborhood_attention2d(q, q, q, backend="triton")


def test_bad_fastnca_backend_env_is_named(monkeypatch):
    monkeypatch.setenv("FASTNCA_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTNCA_BACKEND must be one of .* got 'fast'"):
        fastnca.nca_step(make_state(1, 3, 4, 4), *make_rule(3), seed=0)


def test_fastnca_backend_env_does_not_override_an_explicit_backend(monkeypatch):
    """FASTNCA_BACKEND stands in for backend=None only: an explicit backend= wins (here
    "cuda", which CPU tensors cannot take, would raise)."""
    monkeypatch.setenv("FASTNCA_BACKEND", "cuda")
    x, rule = make_state(1, 3, 4, 4), make_rule(3)
    out = fastnca.nca_step(x, *rule, seed=0, backend="reference")
    monkeypatch.delenv("FASTNCA_BACKEND")
    assert torch.equal(out, fastnca.nca_step(x, *rule, seed=0, backend="reference"))
    monkeypatch.setenv("FASTNCA_BACKEND", "cuda")
    q = torch.randn(1, 4, 4, 1, 8)
    fastnca.neighborhood_attention2d(q, q, q, backend="reference")
    fastnca.fire_mask(1, 2, 2, 0.5, seed=0, backend="reference")


@pytest.mark.parametrize("frozen,match", [(0, r"must have shape \[3, 6\], got \(2, 6\)"),
                                          (1, r"must have shape \[3, 6\] or \[2, 6\] .*got \(1, 6\)")])
def test_fc2_shape_message(frozen, match):
    pw, pb, w1, b1, w2, b2 = make_rule(3, hidden=6)
    with pytest.raises(ValueError, match="fc2_weight " + match):
        fastnca.nca_step(make_state(1, 3, 4, 4), pw, pb, w1, b1, w2[: 2 - frozen], None, seed=0,
                         frozen_channels=frozen)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fire_mask_on_missing_cuda_says_so():
    with pytest.raises(RuntimeError, match="fire_mask: device cuda.* no CUDA device"):
        fastnca.fire_mask(1, 4, 4, 0.5, seed=0, device="cuda")


def test_fire_mask_follows_the_default_device():
    with torch.device("meta"):
        assert fastnca.fire_mask(2, 3, 4, 0.5, seed=1).device.type == "meta"
    assert fastnca.fire_mask(2, 3, 4, 0.5, seed=1).device.type == "cpu"


def test_scale_and_probability_types():
    q = torch.randn(1, 4, 4, 2, 8)
    with pytest.raises(TypeError, match="scale must be None or a finite float, got str"):
        fastnca.neighborhood_attention2d(q, q, q, scale="a")
    with pytest.raises(TypeError, match="scale must be None or a finite float, got bool"):
        fastnca.neighborhood_attention2d(q, q, q, scale=True)
    with pytest.raises(ValueError, match=r"scale must be None or a finite float.*, got inf"):
        fastnca.neighborhood_attention2d(q, q, q, scale=float("inf"))
    # 0-dim tensors are accepted like Python numbers (as seed and step are)
    torch.testing.assert_close(fastnca.neighborhood_attention2d(q, q, q, scale=torch.tensor(0.3)),
                               fastnca.neighborhood_attention2d(q, q, q, scale=0.3), rtol=0, atol=0)
    x, rule = make_state(1, 3, 4, 4), make_rule(3)
    assert torch.equal(fastnca.nca_step(x, *rule, seed=0, update_prob=torch.tensor(0.25)),
                       fastnca.nca_step(x, *rule, seed=0, update_prob=0.25))
    with pytest.raises(TypeError, match="update_prob must be a float in"):
        fastnca.nca_step(x, *rule, seed=0, update_prob=torch.tensor(True))
    # a tensor that requires grad would silently get none: refused
    with pytest.raises(TypeError, match="scale must be None or a finite float; a tensor that requires grad"):
        fastnca.neighborhood_attention2d(q, q, q, scale=torch.tensor(0.3, requires_grad=True))


def test_fire_mask_cell_count_bound():
    with pytest.raises(ValueError, match=r"batch \* height \* width .*must be < 2\^62 cells"):
        fastnca.fire_mask(2**40, 2**40, 1, 0.5, seed=1, backend="reference")


def test_env_backend_errors_say_to_change_the_env(monkeypatch):
    _usable("triton")
    monkeypatch.setenv("FASTNCA_BACKEND", "triton")
    x = make_state(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="unset FASTNCA_BACKEND or set it to 'reference'"):
        fastnca.nca_step(x, *[t.double() for t in make_rule(3)], seed=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_head_dim_one_with_any_stride(backend):
    """A size-1 head dim is contiguous whatever its stride: accepted, same result."""
    base = torch.randn(1, 4, 5, 2, 3, dtype=torch.float64)
    q = base.transpose(-1, -2)[..., :1]  # [1, 4, 5, 3, 1], stride(-1) == 3
    assert q.stride(-1) != 1
    q.requires_grad_(True)
    o = fastnca.neighborhood_attention2d(q, q, q, backend=backend)
    qc = q.detach().contiguous().requires_grad_(True)
    oc = fastnca.neighborhood_attention2d(qc, qc, qc, backend=backend)
    torch.testing.assert_close(o, oc, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(o.sum(), q)[0], torch.autograd.grad(oc.sum(), qc)[0],
                               rtol=1e-12, atol=1e-12)


def test_geca_module_exports_its_diffusion():
    from fastnca.models import geca, geca_diffusion

    for name in ("GeCADiffusion", "create_diffusion", "space_timesteps", "linear_betas", "cfg_combine",
                 "heredity_cells"):
        assert getattr(geca, name) is getattr(geca_diffusion, name) and name in geca.__all__
    with pytest.raises(AttributeError):
        geca.no_such_name


@pytest.mark.parametrize("version,knobs", [("3.0.0", False), ("3.3.1", False), ("3.4.0", True), ("3.6.0", True)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, version, knobs):
    """Whether the triton backend takes CPU tensors follows TRITON_INTERPRET as the installed
    Triton reads it: exactly "1" before 3.4, 1/true/on/yes/y in any case from 3.4."""
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    # read once per process (cached): here from the patched metadata on every call
    monkeypatch.setattr(_backend, "_version", _backend._version.__wrapped__)
    for value, old, new in (("1", True, True), ("true", False, True), ("On", False, True), ("YES", False, True),
                            ("y", False, True), ("Y", False, True), ("t", False, False),
                            ("0", False, False), ("", False, False), ("false", False, False), ("2", False, False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend._triton_interpret() == (new if knobs else old), value


def test_triton_interpret_agrees_with_the_kernels():
    """The launchers' interpreter flag is the decorated kernels' own (what Triton decided at
    import), and the backend table's reading of TRITON_INTERPRET agrees with it."""
    pytest.importorskip("triton")
    from fastnca.kernels.triton import _runtime, nca_step, neighborhood_attention

    assert nca_step.interpreting is _runtime.interpreting is neighborhood_attention.interpreting
    assert _backend._triton_interpret() == _runtime.interpreting() == _backend._INTERPRET


def test_triton_interpret_values_as_the_installed_triton(monkeypatch):
    """Every spelling of TRITON_INTERPRET reads as the installed Triton's own parser reads it
    (from 3.4 its C++ getenv_bool), so backends() never disagrees with the kernels."""
    pytest.importorskip("triton")
    try:
        from triton._C.libtriton import getenv_bool
    except ImportError:
        pytest.skip("this Triton reads TRITON_INTERPRET in Python (before 3.4)")
    for value in ("1", "0", "true", "TRUE", "on", "Yes", "y", "n", "t", "2", "", "false", "off"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend._triton_interpret() == getenv_bool("TRITON_INTERPRET", False), value


def test_compiled_backend_choice_traces_no_metadata_lookup():
    """torch.compile traces the backend choice as plain lookups of what was settled at
    import: with backend="triton" on CPU tensors (the interpreter) it once read Triton's
    version through importlib.metadata at trace time, behind dynamo's lru_cache warning."""
    import warnings

    if fastnca.backends()["triton"] is not True or torch.cuda.is_available():
        pytest.skip("needs the triton backend on CPU tensors (TRITON_INTERPRET=1)")
    q = torch.randn(1, 4, 5, 2, 4)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(lambda q: fastnca.neighborhood_attention2d(q, q, q, backend="triton"),
                            fullgraph=True, backend="eager")(q)
    assert torch.allclose(out, fastnca.neighborhood_attention2d(q, q, q, backend="reference"), atol=1e-5)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message)[:200] for w in caught]


def test_auto_backend_passes_over_kernels_that_refuse_the_sizes(monkeypatch):
    """backend=None skips a backend whose kernels refuse the rule (the cpu kernels take at
    most 64 filters per channel); naming that backend says why, before any kernel runs."""
    F = _backend.NCA_LIMITS["cpu"]["filters"] + 1
    rule = make_rule(2, F=F)
    x = make_state(1, 2, 4, 4)
    assert _backend.resolve(None, "nca_step", x.device, x.dtype, dict(
        C=2, F=F, hidden=6, depthwise=False, cells=16, height=4, width=4)) == "reference"
    out = fastnca.nca_step(x, *rule, seed=1)
    torch.testing.assert_close(out, fastnca.nca_step(x, *rule, seed=1, backend="reference"))
    if fastnca.backends()["cpu"] is True:
        with pytest.raises(ValueError, match="backend 'cpu' cannot run this nca_step: .* at most 64 filters"):
            fastnca.nca_step(x, *rule, seed=1, backend="cpu")
    sizes = dict(C=4, F=2, hidden=8, depthwise=True, cells=16, height=4, width=4)
    assert _backend.nca_unsupported("cpu", **sizes) is None
    assert _backend.nca_unsupported("cpu", **dict(sizes, hidden=65537)).endswith("at most 65536, got 65537")
    assert "depthwise" in _backend.nca_unsupported("cuda", **dict(sizes, F=26))
    assert _backend.nca_unsupported("cuda", **dict(sizes, F=26, depthwise=False)) is None
    assert "cells" in _backend.nca_unsupported("triton", **dict(sizes, cells=2**31))
    assert "height and width" in _backend.nca_unsupported("cpu", **dict(sizes, height=2**30))
    assert "65536 channels, got 65537" in _backend.nca_unsupported("cpu", **dict(sizes, C=65537))
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    monkeypatch.setattr(_backend, "_cuda_nca_refusal", lambda *a: None)
    assert _backend.resolve(None, "nca_step", cuda, torch.float32, dict(sizes, cells=2**31)) == "cuda"
    assert _backend.resolve(None, "nca_step", cuda, torch.float32, dict(sizes, cells=2**31, F=26)) == "reference"
    # the triton kernels are built for C <= 128, F <= 3, hidden <= 256 (larger tiles pass
    # Triton's block limits): backend=None takes cuda for larger rules, triton otherwise
    assert _backend.resolve(None, "nca_step", cuda, torch.float32, sizes) == "triton"
    for big, what in ((dict(hidden=257), "hidden size of at most 256, got 257"), (dict(C=129), "128 channels"),
                      (dict(F=4, depthwise=False), "3 filters per channel, got 4")):
        assert what in _backend.nca_unsupported("triton", **dict(sizes, **big))
        assert _backend.resolve(None, "nca_step", cuda, torch.float32, dict(sizes, **big)) == "cuda"


def test_triton_kernels_refuse_rules_past_their_limits():
    """The triton kernel module itself refuses a rule past NCA_LIMITS["triton"], naming the
    limit, before it arranges any weight (a hidden layer of 512 failed in Triton's frontend,
    or on a GPU ran out of shared memory)."""
    pytest.importorskip("triton")
    from fastnca.kernels.triton import nca_step as tri

    x = make_state(1, 4, 3, 3)
    rule = make_rule(4, hidden=512)
    with pytest.raises(ValueError, match="triton nca_step: its kernels support a hidden size of at most 256, got 512"):
        tri.prepare(x, *rule, 1, "reflect", 0)


@pytest.fixture
def h100_emulation(monkeypatch):
    """The CUDA refusal's inputs from the host emulation of the CUDA kernels, on a device with
    an H100's 227 KB of opt-in shared memory (the emulated device's too); yields the module."""
    from conftest import emulation_module, emulation_path

    if emulation_path() is None:
        pytest.skip("host emulation of the CUDA kernels not built")
    mod = emulation_module()
    monkeypatch.setattr(_ext, "load", lambda name: mod)
    monkeypatch.setattr(_backend, "_cuda_smem_limit", lambda index: 227 * 1024)
    monkeypatch.setattr(_backend, "_CUDA_REFUSALS", {})
    return mod


@pytest.mark.parametrize("C,F,depthwise,fits", [
    (236, 2, False, True), (237, 2, False, False),   # dense, F 2: the backward's rows of 33 floats
    (128, 4, False, True), (128, 5, False, False),
    (24, 25, True, True), (32, 25, True, False),     # depthwise at the most filters it takes
])
def test_cuda_nca_refuses_rules_its_backward_cannot_hold(h100_emulation, monkeypatch, C, F, depthwise, fits):
    """The CUDA backward keeps ~2(F+1)C + C rows of 33 floats in shared memory: rules past the
    device's limit (an H100's 227 KB here) are refused at selection, before the forward runs
    (the backward raised after it), and the refusal agrees with the kernels' own plan. Calls
    that need no gradient are refused only where the forward does not fit."""
    cuda = torch.device("cuda", 0)
    sizes = dict(C=C, F=F, hidden=128, depthwise=depthwise, cells=64, height=8, width=8, frozen=1)
    why = _backend.nca_unsupported("cuda", device=cuda, **sizes)
    assert (why is None) == fits, why
    if not fits:
        assert "backward needs" in why and "the device allows 232448" in why
    assert _backend.nca_unsupported("cuda", device=cuda, grad=False, **sizes) is None  # forward fits
    assert _backend.nca_unsupported("cuda", **sizes) is None  # no device: the static limits only
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: the kernels check
    assert _backend.nca_unsupported("cuda", device=cuda, **sizes) is None
    # the emulated device has the same 227 KB
    plan = lambda: h100_emulation.nca_step_backward_plan(1, C, 8, 8, F, 128, 1, depthwise, 1, 1 << 23, 0)  # noqa: E731
    if fits:
        assert plan()["main_threads"] >= 32
    else:
        with pytest.raises(ValueError, match="too large for the backward's shared memory"):
            plan()


def test_cuda_nca_refusal_in_backend_selection(h100_emulation, monkeypatch):
    """backend=None passes over cuda for a rule its backward cannot hold (when a gradient is
    needed); backend='cuda' says why before any kernel runs; the kernels report the
    backward's int index limit (hidden * (K+1) < 2^31) apart, for calls with a gradient."""
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    monkeypatch.setattr(_backend, "_AUTO", {("cuda", "nca_step"): ("cuda", "reference")})
    cuda = torch.device("cuda", 0)
    big = dict(C=240, F=2, hidden=128, depthwise=False, cells=64, height=8, width=8, frozen=1)
    assert _backend.resolve(None, "nca_step", cuda, torch.float32, big) == "reference"
    assert _backend.resolve(None, "nca_step", cuda, torch.float32, dict(big, grad=False)) == "cuda"
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this nca_step: its backward needs"):
        _backend.resolve("cuda", "nca_step", cuda, torch.float32, big)
    # the kernels' own answer on the index limit (past the static hidden cap of 65536 here)
    assert h100_emulation.nca_step_smem(32, 2, 128, 1, False)[2] == ""
    assert "below 2^31" in h100_emulation.nca_step_smem(2048, 1, 1 << 20, 0, False)[2]


def test_cuda_smem_limit_falls_back_to_the_module(monkeypatch):
    """torch < 2.7 reports no shared_memory_per_block_optin: the CUDA module's own query of
    the device attribute stands in (the emulated device's 227 KB here)."""
    import contextlib
    import types

    from conftest import emulation_module, emulation_path

    if emulation_path() is None:
        pytest.skip("host emulation of the CUDA kernels not built")
    monkeypatch.setattr(_ext, "load", lambda name: emulation_module())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(name="old"))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    assert _backend._cuda_smem_limit(0) == 227 * 1024
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(shared_memory_per_block_optin=101376))
    assert _backend._cuda_smem_limit(0) == 101376


@pytest.mark.gpu
def test_gpu_cuda_smem_limit():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    limit = _backend._cuda_smem_limit(None)
    assert isinstance(limit, int) and limit >= 48 * 1024


def test_auto_backend_passes_over_attention_kernels_that_refuse_the_sizes(monkeypatch):
    """Attention sizes past a backend's index arithmetic (H or W > 2^30; any dimension > 2^30
    on the cpu) go to the reference under backend=None; naming the backend says why before
    any kernel runs (a stride-0 view stands in for the 1G-cell tensor)."""
    tall = torch.randn(1, 1, 1, 1, 4).expand(1, 2**30 + 1, 1, 1, 4)
    for name in ("cpu", "cuda", "triton"):
        assert _backend.attention_unsupported(name, shape=(2, 2**30, 2**30, 3, 4)) is None
        assert "at most 1073741824" in _backend.attention_unsupported(name, shape=tuple(tall.shape))
    assert "height and width" in _backend.attention_unsupported("triton", shape=tuple(tall.shape))
    assert "every dimension" in _backend.attention_unsupported("cpu", shape=(2**30 + 1, 1, 1, 1, 4))
    assert _backend.attention_unsupported("triton", shape=(2**30 + 1, 1, 1, 1, 4)) is None
    assert _backend.attention_unsupported("reference", shape=tuple(tall.shape)) is None
    assert _backend.resolve(None, "neighborhood_attention", tall.device, tall.dtype,
                            {"shape": tuple(tall.shape)}) == "reference"
    if fastnca.backends()["cpu"] is True:
        assert _backend.resolve(None, "neighborhood_attention", tall.device, tall.dtype,
                                {"shape": (1, 8, 8, 2, 4)}) == "cpu"
        with pytest.raises(ValueError, match="backend 'cpu' cannot run this neighborhood_attention: .* at most"):
            fastnca.neighborhood_attention2d(tall, tall, tall, backend="cpu")
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    assert _backend.resolve(None, "neighborhood_attention", cuda, torch.float32,
                            {"shape": (2**30 + 1, 1, 1, 1, 4)}) in ("cuda", "triton")
    assert _backend.resolve(None, "neighborhood_attention", cuda, torch.float32,
                            {"shape": tuple(tall.shape)}) == "reference"


def _autodiff_cases(backend):
    """(name, f(*inputs) -> output, inputs) of each differentiable op, float64, tiny."""
    g = torch.Generator().manual_seed(3)
    qkv = [torch.randn(1, 3, 4, 2, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    state = make_state(1, 3, 4, 5, dtype=torch.float64)
    rule = make_rule(3, hidden=5, dtype=torch.float64)

    def step(x, w1):
        return fastnca.nca_step(x, rule[0], rule[1], w1, *rule[3:], seed=2, backend=backend)

    def rollout(x, w1):
        return fastnca.nca_rollout(x, rule[0], rule[1], w1, *rule[3:], steps=3, seed=2, backend=backend)

    def attention(q, k, v):
        return fastnca.neighborhood_attention2d(q, k, v, backend=backend)

    return [("nca_step", step, (state, rule[2])), ("nca_rollout", rollout, (state, rule[2])),
            ("neighborhood_attention2d", attention, tuple(qkv))]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_second_derivatives_raise_instead_of_dropping_terms(backend):
    """The ops are differentiable once. With create_graph=True the first derivatives are
    the usual ones, and differentiating them again raises, for a Hessian and a gradient
    penalty alike (torch's once_differentiable let both through with the second-order
    terms dropped: a zero Hessian), also towards an input the incoming gradient does not
    depend on."""
    for name, f, inputs in _autodiff_cases(backend):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        first = torch.autograd.grad(f(*leaves).pow(2).sum(), leaves)
        graph = torch.autograd.grad(f(*leaves).pow(2).sum(), leaves, create_graph=True)
        for a, b in zip(first, graph):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
        graph[0].mul_(1.0)  # usable in place, as torch's own gradients
        with pytest.raises(RuntimeError, match=f"fastnca.{name} is differentiable once"):
            torch.autograd.grad(graph[0].pow(2).sum(), leaves[-1], allow_unused=True)
        with pytest.raises(RuntimeError, match=f"fastnca.{name} is differentiable once"):
            torch.autograd.functional.hessian(lambda x: f(x, *leaves[1:]).pow(2).sum(), leaves[0].detach())
        # A loss linear in the output: the incoming gradient needs no grad, yet the first
        # derivatives still depend on the inputs (a gradient penalty's second-order terms)
        linear = torch.autograd.grad(f(*leaves).sum(), leaves, create_graph=True)
        with pytest.raises(RuntimeError, match=f"fastnca.{name} is differentiable once"):
            (linear[0].pow(2).sum() + leaves[-1].pow(2).sum()).backward()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forward_mode_and_func_transforms_raise(backend):
    """Forward-mode AD (dual tensors: no tangent came out before; torch.func.jvp: a zero
    one) and torch.func.grad (a torch-internal error naming no op) raise a clear error;
    torch.func.vmap of a forward still works."""
    import torch.autograd.forward_ad as fwad

    for name, f, inputs in _autodiff_cases(backend):
        with fwad.dual_level():
            dual = fwad.make_dual(inputs[0], torch.ones_like(inputs[0]))
            with pytest.raises(NotImplementedError, match=f"fastnca.{name} does not support forward-mode AD"):
                f(dual, *inputs[1:])
            f(*inputs)  # no dual tensor: runs
        with pytest.raises(NotImplementedError, match=f"fastnca.{name} does not support torch.func's"):
            torch.func.jvp(lambda x: f(x, *inputs[1:]), (inputs[0],), (torch.ones_like(inputs[0]),))
        with pytest.raises(NotImplementedError, match=f"fastnca.{name} does not support torch.func's"):
            torch.func.grad(lambda x: f(x, *inputs[1:]).sum())(inputs[0])
        with pytest.raises(NotImplementedError, match=f"fastnca.{name} does not support torch.func's"):
            torch.func.vmap(torch.func.grad(lambda x: f(x, *inputs[1:]).sum()))(inputs[0][None])
        # an op on constants of the transform runs: d/dw of f(inputs) * w
        out = f(*inputs)
        w = torch.tensor(2.0, dtype=torch.float64)
        torch.testing.assert_close(torch.func.grad(lambda w: (f(*inputs) * w).sum())(w), out.sum())
        _, tangent = torch.func.jvp(lambda w: (f(*inputs) * w).sum(), (w,), (torch.ones_like(w),))
        torch.testing.assert_close(tangent, out.sum())
    q, k, v = (torch.stack([t, 2 * t]) for t in _autodiff_cases(backend)[2][2])  # a leading vmap dim
    out = torch.func.vmap(lambda a, b, c: fastnca.neighborhood_attention2d(a, b, c, backend=backend))(q, k, v)
    torch.testing.assert_close(out, torch.stack([fastnca.neighborhood_attention2d(a, b, c, backend=backend)
                                                 for a, b, c in zip(q, k, v)]))


def test_argument_type_messages(monkeypatch):
    """backend of the wrong type is a TypeError; return_lse must be a bool; a backend from
    FASTNCA_BACKEND that cannot run says where it came from; one-dimension shapes read
    "1 dimension"."""
    q = torch.randn(1, 3, 3, 1, 4)
    with pytest.raises(TypeError, match="backend must be None or a str"):
        fastnca.neighborhood_attention2d(q, q, q, backend=1)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        fastnca.neighborhood_attention2d(q, q, q, return_lse="no")
    monkeypatch.setenv("FASTNCA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"'cuda' \(from FASTNCA_BACKEND\) is not usable"):
        fastnca.neighborhood_attention2d(q, q, q)
    monkeypatch.delenv("FASTNCA_BACKEND")
    rule = make_rule(3, hidden=5)
    with pytest.raises(ValueError, match="fc1_bias must have 1 dimension, got"):
        fastnca.nca_step(make_state(1, 3, 4, 4), rule[0], rule[1], rule[2], rule[3][None], *rule[4:], seed=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ops_ignore_an_enclosing_autocast(backend):
    """Under torch.autocast("cpu", bfloat16) the ops still compute in float32 from float32
    inputs, forward and backward, on every backend: the reference's conv and einsum ran in
    bf16 (outputs off by ~3e-2) and its nca backward crashed in oneDNN on mixed dtypes."""
    if backend == "cpu" and fastnca.backends()["cpu"] is not True:
        pytest.skip("cpu backend unavailable")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 6, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    x = make_state(2, 6, 7, 5).requires_grad_(True)
    rule = [t.requires_grad_(True) if t is not None else None for t in make_rule(6, hidden=16)]

    def run():
        o = fastnca.neighborhood_attention2d(q, k, v, backend=backend)
        s = fastnca.nca_rollout(x, *rule, steps=3, seed=5, backend=backend)
        loss = (o * o).sum() + (s * s).sum()
        inputs = [q, k, v, x, *[t for t in rule if t is not None]]
        return [o, s, *torch.autograd.grad(loss, inputs)]

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run()
    for a, b in zip(mixed, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_size_limits_add_no_guards_under_export():
    """torch.export with dynamic batch, height and width: the backends' size limits are not
    checked against symbolic sizes (a guard B <= 2^30 is a constraint violation on an
    unbounded Dim); the exported program runs other sizes and matches eager."""
    from torch.export import Dim, export

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rule = torch.nn.ParameterList(make_rule(4, hidden=8))

        def forward(self, q, x):
            o = fastnca.neighborhood_attention2d(q, q, q)
            return o, fastnca.nca_step(x, *self.rule, seed=3, padding="zeros")

    B, H, W = Dim("B"), Dim("H"), Dim("W")
    m = Both()
    q, x = torch.randn(2, 6, 7, 2, 8), make_state(2, 4, 6, 7)
    ep = export(m, (q, x), dynamic_shapes=({0: B, 1: H, 2: W}, {0: B, 2: H, 3: W}))
    q2, x2 = torch.randn(3, 5, 9, 2, 8), make_state(3, 4, 5, 9)
    for a, b in zip(ep.module()(q2, x2), m(q2, x2)):
        torch.testing.assert_close(a, b)


def test_reference_runs_on_meta_tensors():
    """Meta tensors go to the reference, which must not enter torch.autocast for "meta"
    (it raises there); under an enabled CPU autocast as well."""
    q = torch.randn(1, 4, 4, 2, 8, device="meta")
    x = make_state(1, 4, 5, 5).to("meta")
    rule = [t.to("meta") if t is not None else None for t in make_rule(4, hidden=8)]
    for ctx in (torch.autocast("cpu", enabled=False), torch.autocast("cpu", dtype=torch.bfloat16)):
        with ctx:
            assert fastnca.neighborhood_attention2d(q, q, q).shape == q.shape
            assert fastnca.nca_rollout(x, *rule, steps=2, seed=1).device.type == "meta"


def test_interpreter_version_gate(monkeypatch):
    """Triton's interpreter runs these kernels from triton 3.4, and from 3.7 with numpy >= 2.4
    (older ones fail inside Triton); the reason names both versions."""
    import importlib.metadata

    versions = {}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    # read once per process (cached): here from the patched metadata on every call
    monkeypatch.setattr(_backend, "_version", _backend._version.__wrapped__)
    for triton, numpy, ok in [("3.3.1", "1.26.4", False), ("3.4.0", "2.3.5", True), ("3.6.0", "2.4.1", False),
                              ("3.7.0", "2.4.1", True), ("3.9.0", "2.4.6", True)]:
        versions.update(triton=triton, numpy=numpy)
        problem = _backend._interpreter_problem()
        assert (problem is None) == ok, (triton, numpy, problem)
        if problem:
            assert f"Triton {triton[:3]}" in problem and f"numpy {numpy[:3]}" in problem


def test_cuda_nca_refusal_traces_with_dynamic_sizes(monkeypatch):
    """Backend selection for a CUDA device traces under torch.compile(dynamic=True,
    fullgraph=True) with symbolic channel counts (dynamo reports a SymInt as an int: the
    shared-memory check, a call into the CUDA module, stays out of traced code)."""
    monkeypatch.setattr(_backend, "_usable_on", lambda name, device: True)
    monkeypatch.setattr(_backend, "_AUTO", {("cuda", "nca_step"): ("cuda", "reference")})
    monkeypatch.setattr(_backend, "_CUDA_REFUSALS", {})
    calls = []
    monkeypatch.setattr(_backend, "_cuda_nca_refusal", lambda *a: calls.append(a))
    cuda = torch.device("cuda", 0)

    def pick(x):
        B, C, H, W = x.shape
        name = _backend.resolve(None, "nca_step", cuda, torch.float32, dict(
            C=C, F=2, hidden=128, depthwise=False, cells=B * H * W, height=H, width=W, frozen=1, grad=True))
        return x * (1.0 if name == "cuda" else 2.0)

    torch._dynamo.reset()
    f = torch.compile(pick, dynamic=True, fullgraph=True, backend="eager")
    for C in (5, 7):
        assert torch.equal(f(torch.ones(1, C, 3, 3)), torch.ones(1, C, 3, 3))
    assert calls == []  # traced: left to the kernels
    pick(torch.ones(1, 5, 3, 3))
    assert len(calls) == 1  # eager: checked


# ---------------------------------------------------------------------------------------
# Adversarial input review (session 19, "badinput"): each test below failed when written;
# they describe what the validation should do (a clear error naming the argument).
# ---------------------------------------------------------------------------------------

def _usable(backend):
    if backend is not None and fastnca.backends()[backend] is not True:
        pytest.skip(f"{backend}: {fastnca.backends()[backend]}")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", None])
@pytest.mark.parametrize("scale", [1e39, -1e39, 1e300])
def test_scale_outside_the_compute_dtype_is_refused(backend, scale):
    """A scale that float32 cannot hold is infinite inside every kernel (the logits are then
    inf/NaN and the output NaN, with a different NaN pattern on triton): it passed the
    "finite float" check because it is finite as a Python float."""
    _usable(backend)
    q = torch.randn(1, 3, 4, 1, 4)
    with pytest.raises(ValueError, match=mentions("scale")):
        fastnca.neighborhood_attention2d(q, q, q, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", None])
@pytest.mark.parametrize("sizes,name", [((0, 2**70, 1), "height"), ((0, 2**61, 4), "height"),
                                        ((0, 4, 2**70), "width"), ((2**70, 0, 1), "batch")])
def test_fire_mask_bounds_every_size_also_with_a_zero_one(backend, sizes, name):
    """The < 2^62 cells bound is on the product, so a zero size let any other size through to
    torch.empty ("Stride calculation overflowed") or to the op schema ("Expected a value of
    type 'int' for argument 'height' but instead found type 'int'")."""
    _usable(backend)
    with pytest.raises(ValueError, match=mentions(name)):
        fastnca.fire_mask(*sizes, 0.5, seed=1, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float_arguments_too_large_for_a_float_are_named(backend):
    """An int past the float range (10**400) raised a bare OverflowError ("int too large to
    convert to float") that names no argument."""
    x, rule, q = make_state(1, 3, 4, 4), make_rule(3), torch.randn(1, 3, 4, 1, 4)
    with pytest.raises((TypeError, ValueError), match=mentions("update_prob")):
        fastnca.nca_step(x, *rule, seed=0, update_prob=10**400, backend=backend)
    with pytest.raises((TypeError, ValueError), match=mentions("update_prob")):
        fastnca.fire_mask(1, 2, 2, 10**400, seed=0, backend=backend)
    with pytest.raises((TypeError, ValueError), match=mentions("scale")):
        fastnca.neighborhood_attention2d(q, q, q, scale=-10**400, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_scalar_arguments_as_meta_tensors_are_named(backend):
    """0-dim tensors are accepted for seed, step, update_prob, scale; a meta one has no value
    and failed inside torch ("Tensor.item() cannot be called on meta tensors")."""
    x, rule, q = make_state(1, 3, 4, 4), make_rule(3), torch.randn(1, 3, 4, 1, 4)
    meta = {"i": torch.tensor(3, device="meta"), "f": torch.tensor(0.5, device="meta")}
    with pytest.raises((TypeError, ValueError), match=mentions("seed")):
        fastnca.nca_step(x, *rule, seed=meta["i"], backend=backend)
    with pytest.raises((TypeError, ValueError), match=mentions("step")):
        fastnca.nca_step(x, *rule, seed=0, step=meta["i"], backend=backend)
    with pytest.raises((TypeError, ValueError), match=mentions("update_prob")):
        fastnca.fire_mask(1, 2, 2, meta["f"], seed=0, backend=backend)
    with pytest.raises((TypeError, ValueError), match=mentions("scale")):
        fastnca.neighborhood_attention2d(q, q, q, scale=meta["f"], backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu", None])
@pytest.mark.parametrize("device", [123, "foo", "torch.zeros"])
def test_fire_mask_device_argument_is_checked(backend, device):
    """device=123 raised "Cannot access accelerator device when none is available.", a
    tensor torch's "device() received an invalid combination of arguments", "foo" torch's
    device-string error: none of them names the argument."""
    _usable(backend)
    device = torch.zeros(1) if device == "torch.zeros" else device
    with pytest.raises((TypeError, ValueError, RuntimeError), match=mentions("fire_mask", "device")):
        fastnca.fire_mask(1, 2, 2, 0.5, seed=0, device=device, backend=backend)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
@pytest.mark.parametrize("backend", ["reference", None])
def test_fire_mask_on_a_missing_device_type_says_so(backend):
    """device="mps" without MPS: backend "cpu"/"triton" say "runs on CPU tensors, got mps
    tensors", but None and "reference" failed in aten ("Could not run
    'aten::empty.memory_format' with arguments from the 'MPS' backend"). Same input, one
    kind of message, as for a missing CUDA device."""
    with pytest.raises(RuntimeError, match=mentions("fire_mask", "mps")):
        fastnca.fire_mask(1, 2, 2, 0.5, seed=0, device="mps", backend=backend)


def test_fire_mask_probes_a_device_type_once(monkeypatch):
    """An allocatable device outside cpu / cuda / meta is probed with torch.empty the first
    time fire_mask is asked for it, not on every call; a device that failed its probe is
    probed again (and refused again)."""
    import sys

    fm = sys.modules["fastnca.fire_mask"]  # the module (fastnca.fire_mask is the function)
    probes = []
    real_empty = torch.empty

    def empty(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type in ("mps", "xpu"):
            probes.append(str(device))
            if torch.device(device).type == "mps":
                raise RuntimeError("no MPS here")
            return real_empty(*args, **kwargs)  # stands in for an allocation on xpu
        return real_empty(*args, device=device, **kwargs)

    class Probed(Exception):
        pass

    def resolve(*args):  # the call stops right after the device checks
        raise Probed

    monkeypatch.setattr(fm, "_ALLOCATABLE", set())
    monkeypatch.setattr(fm.torch, "empty", empty)
    monkeypatch.setattr(fm._backend, "resolve", resolve)
    for _ in range(3):
        with pytest.raises(Probed):
            fastnca.fire_mask(1, 2, 2, 0.5, seed=0, device="xpu", backend="reference")
    assert probes == ["xpu"]
    for _ in range(2):
        with pytest.raises(RuntimeError, match=mentions("fire_mask", "mps")):
            fastnca.fire_mask(1, 2, 2, 0.5, seed=0, device="mps", backend="reference")
    assert probes == ["xpu", "mps", "mps"]
