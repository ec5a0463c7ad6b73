"""Shared test helpers: which backends to test, dtype tolerances, comparison to reference."""
import os
import re

import torch

# References computed on a GPU must be float32-exact: cuDNN runs float32 convolutions on
# TF32 tensor cores unless told otherwise (~5e-4 relative error, 50x the fp32 tolerance).
torch.backends.cudnn.allow_tf32 = False

# Triton kernels run on CPU tensors under the interpreter when there is no GPU; the
# variable must be set before triton (and fastnca) are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnca  # noqa: E402
from fastnca import _backend  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")

# The folder that holds the fastnca under test (this checkout's python/, or site-packages
# for an installed one): what subprocesses put first on PYTHONPATH to run the same package.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastnca.__file__)))

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split(".")[:2])


def raised_under_fullgraph(pattern: str) -> str:
    """The match= regex for an exception that user code raises under torch.compile(...,
    fullgraph=True): dynamo of torch 2.4-2.7 (seen; and those not seen, before 2.13) drops
    its message for "Observed exception"; 2.13 passes it on."""
    return pattern if TORCH_VERSION >= (2, 13) else f"{pattern}|^Observed exception"


def pytest_configure(config):
    """The suite's markers, also where pyproject.toml is not beside the tests (a copy run
    against an installed fastnca), so that --strict-markers passes there too."""
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run with -m gpu on a GPU machine)")
    config.addinivalue_line("markers", "slow: longer tests (real data, training loops)")

# (rtol, atol) of a fast backend against the reference, by dtype. fp32 is tight: the
# kernels accumulate in fp32 like the reference and differ only in summation order.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def emulation_path(build: str = "cuda-emu"):
    """The host emulation of the CUDA kernels (scripts/build_cuda_emulation.sh) built into
    build/<build>, or None; FASTNCA_CUDA_EMULATION names the default one's file."""
    import glob

    path = os.environ.get("FASTNCA_CUDA_EMULATION") if build == "cuda-emu" else None
    if path:
        return path if os.path.exists(path) else None
    found = glob.glob(os.path.join(os.path.dirname(__file__), "..", "build", build, "fastnca_cuda_emu*.so"))
    return found[0] if found else None


# Without a GPU and with FASTNCA_TEST_EMULATED_CUDA=1, tests of the public ops run backend
# "cuda" through the host emulation (scripts/build_cuda_emulation.sh): its launchers, on
# CPU tensors (_emulate_cuda_backend). Opt-in: ~100 tests took 14 minutes on 2 cores
# (tests/test_cuda_kernels.py runs its own small emulated cases in every CI run).
CUDA_EMULATION = (not torch.cuda.is_available() and os.environ.get("FASTNCA_TEST_EMULATED_CUDA") == "1"
                  and emulation_path() is not None)
EMULATED_OPS = ("fire_mask", "nca_step", "neighborhood_attention")


_EMULATION_MODULES: dict = {}


def emulation_module(build: str = "cuda-emu"):
    """The emulation in build/<build> (emulation_path), loaded once."""
    if build not in _EMULATION_MODULES:
        import importlib.util

        # a name of its own per build: pybind11 (3.x) hands back an extension module already
        # loaded under the same name, so the tiles build would silently be the default one
        name = f"_fastnca_emu_{build.replace('-', '_')}.fastnca_cuda_emu"
        spec = importlib.util.spec_from_file_location(name, emulation_path(build))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _EMULATION_MODULES[build] = mod
    return _EMULATION_MODULES[build]


def emulate_cuda(monkeypatch):
    """Route the CUDA launchers to the host emulation (CPU pointers, no device or stream)."""
    import contextlib

    from fastnca.kernels.cuda import _launch

    mod = emulation_module()
    monkeypatch.setattr(_launch, "module", lambda: mod)
    monkeypatch.setattr(_launch, "is_cuda", lambda t: True)
    monkeypatch.setattr(_launch, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(_launch, "stream", lambda device: 0)


@pytest.fixture(autouse=True)
def _emulate_cuda_backend(request, monkeypatch):
    """A test parametrised with backend "cuda" on a machine without a GPU (fast_backends
    offers it when the emulation is built): the backend table takes CPU tensors for it
    and its launchers run the emulated kernels."""
    callspec = getattr(request.node, "callspec", None)
    if CUDA_EMULATION and callspec is not None and callspec.params.get("backend") == "cuda":
        emulate_cuda(monkeypatch)
        usable = _backend._usable_on
        monkeypatch.setitem(_backend._STATUS, "cuda", True)
        monkeypatch.setattr(_backend, "_usable_on",
                            lambda name, device: True if name == "cuda" else usable(name, device))
    yield


def device_for(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cpu" if CUDA_EMULATION else "cuda")
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def fast_backends(op: str) -> list:
    """Every non-reference backend with a kernel for ``op``; unusable ones become skips.
    Without a GPU, "cuda" runs through the host emulation where it is built."""
    params = []
    for name in ("cpu", "cuda", "triton"):
        status = fastnca.backends()[name]
        if name == "cuda" and CUDA_EMULATION and op in EMULATED_OPS:
            params.append(pytest.param(name, id="cuda-emulated"))
            continue
        marks = [pytest.mark.gpu] if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else []
        if status is not True:
            marks.append(pytest.mark.skip(reason=f"{name}: {status}"))
        elif not _backend.has_kernel(name, op):
            marks.append(pytest.mark.skip(reason=f"{name} has no {op} kernel yet"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def fire_bits(n: int, seed: int, step: int) -> list:
    """The 24 fire bits of cells 0..n-1 at ``step`` (the reference's Philox): a cell fires
    iff bits < fire_threshold(update_prob); tests set update_prob on a cell's boundary."""
    from fastnca.kernels.reference.fire_mask import fire_bits as reference_fire_bits

    return reference_fire_bits(n, seed, step).tolist()


def isolated_idle_cell(H: int, W: int, update_prob: float, seed: int, step: int, padding: str):
    """(fires, y, x): the mask fire_mask(1, H, W, update_prob, seed, step)[0] and the first
    cell that neither fires nor has a firing cell in its 3x3 window, read through
    ``padding`` (zeros, reflect or replicate): a value there reaches no firing cell."""
    fires = fastnca.fire_mask(1, H, W, update_prob, seed=seed, step=step)[0]
    near = torch.nn.functional.pad(fires[None, None].float(), (1, 1, 1, 1),
                                   mode="constant" if padding == "zeros" else padding)
    near = torch.nn.functional.max_pool2d(near, 3, stride=1)[0, 0] > 0
    y, x = map(int, (~near).nonzero()[0])
    return fires, y, x


def listed_walk(monkeypatch) -> None:
    """The Triton nca backward's listed walk (firing cells only, the large states' walk) on
    states of any size: _COMPACT_BACKWARD_CELLS lowered to 1, as small test states otherwise
    take the every-cell walk."""
    from fastnca.kernels.triton import nca_step as tri

    monkeypatch.setattr(tri, "_COMPACT_BACKWARD_CELLS", 1)


def assert_close(actual, expected, dtype, name="", scale=1.0):
    """Elementwise check with atol relative to the tensor's magnitude: two fp32 sums of the
    same terms in different orders differ by ~eps * max|term|, not by eps per element.

    The magnitude is max|expected| itself (no floor of 1), so a tensor of small values is
    held to the same relative error as a large one; the 1e-30 guard only keeps an all-zero
    expected tensor meaningful (it must then be matched to ~1e-35, i.e. exactly zero in
    practice). A comparison whose error is set by larger intermediate terms than the
    result (a near-zero difference) passes an explicit ``scale`` and says why."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.double().cpu()
    magnitude = max(1e-30, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol * scale,
                               atol=atol * scale * magnitude, msg=lambda m: f"{name}: {m}")


def mentions(*words):
    """A ``pytest.raises(match=...)`` pattern: the message names every one of ``words`` (as
    whole words, in any order). Argument-error tests match on names, not on wording."""
    return "(?s)^" + "".join(rf"(?=.*\b{re.escape(w)}\b)" for w in words)


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")


def graph_held(out) -> list:
    """Tensors the autograd graph behind ``out`` keeps as attributes of its nodes (a Python
    Function's ``ctx.x = t``): alive until backward like saved tensors, but invisible to
    saved_tensors_hooks, which see save_for_backward only."""
    held, seen = [], set()
    stack = [out.grad_fn] if isinstance(out, torch.Tensor) else [t.grad_fn for t in out]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in getattr(node, "__dict__", {}).values():
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    held.append(t)
        stack.extend(fn for fn, _ in node.next_functions)
    return held


def copies_of(shapes, fn) -> list:
    """The aten copy ops (copy_, clone, contiguous, _to_copy) that ``fn()`` runs with a first
    input of one of ``shapes``. torch.profiler records the ops run inside a custom op's
    implementation too, so this sees a launcher's hidden ``.contiguous()``. (Under
    TRITON_INTERPRET the interpreter's own flat byte copies of every argument show up with
    1-D shapes and are not counted: they are an artefact of interpreting.)"""
    from torch.profiler import ProfilerActivity, profile

    shapes = [list(s) for s in shapes]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes[0]) for e in prof.events()
            if e.name in COPY_OPS and e.input_shapes and list(e.input_shapes[0]) in shapes]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With FASTNCA_FAILURE_LOG set, append each failure's traceback to that file as it
    happens. Under pytest-xdist, end the worker after a CUDA illegal memory access: the error is
    sticky, so every later test in that process would fail for it too. xdist reports the
    test as crashed, by name, and starts a fresh worker."""
    outcome = yield
    rep = outcome.get_result()
    log = os.environ.get("FASTNCA_FAILURE_LOG")
    if rep.failed and log:  # written at once: a run cut by its time limit keeps the tracebacks
        with open(log, "a") as f:
            f.write(f"=== {rep.nodeid} ({rep.when})\n{rep.longreprtext}\n\n")
    if (rep.failed and call.excinfo is not None and os.environ.get("PYTEST_XDIST_WORKER")
            and "illegal memory access" in str(call.excinfo.value)):
        import sys
        sys.stderr.write(f"\n{item.nodeid}: CUDA illegal memory access; ending this worker\n")
        sys.stderr.flush()
        os._exit(3)


@pytest.fixture
def bf16_round_to_nearest(monkeypatch):
    """Under the Triton interpreter, float32 -> bfloat16 conversions in kernels round to
    nearest even, as the GPU's do: the interpreter truncates (a bias that sums of many
    rounded products turn into drift, and stores that differ from torch's rounding by an
    ulp). Yields True when it took effect; False without the interpreter (nothing to do)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        from fastnca.kernels.triton._runtime import interpreting
    except ImportError:
        yield False
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if not interpreting() or builder is None or not hasattr(builder, "cast_impl"):
        yield False
        return
    cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).bfloat16()
            return interpreter.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    yield True


def pytest_collection_modifyitems(config, items):
    """Without a GPU the Triton tests run in Triton's interpreter; where the installed Triton's
    interpreter cannot run these kernels (too old for them, or for this numpy), they skip
    with the reason instead of failing inside Triton."""
    if torch.cuda.is_available() or not _backend._triton_interpret():
        return
    problem = _backend._interpreter_problem() if _backend._triton_version() > (0, 0) else None
    if problem:
        skip = pytest.mark.skip(reason=problem)
        for item in items:
            if "triton" in os.path.basename(str(item.fspath)):
                item.add_marker(skip)
