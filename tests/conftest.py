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

# (rtol, atol) of a fast backend against the reference, by dtype. fp32 is tight: the
# kernels accumulate in fp32 like the reference and differ only in summation order.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
                        else "cpu")


def fast_backends(op: str) -> list:
    """Every non-reference backend with a kernel for ``op``; unusable ones become skips."""
    params = []
    for name in ("cpu", "cuda", "triton"):
        status = fastnca.backends()[name]
        marks = [pytest.mark.gpu] if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else []
        if status is not True:
            marks.append(pytest.mark.skip(reason=f"{name}: {status}"))
        elif not _backend.has_kernel(name, op):
            marks.append(pytest.mark.skip(reason=f"{name} has no {op} kernel yet"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


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
    """Under pytest-xdist, end the worker after a CUDA illegal memory access: the error is
    sticky, so every later test in that process would fail for it too. xdist reports the
    test as crashed, by name, and starts a fresh worker."""
    outcome = yield
    rep = outcome.get_result()
    if (rep.failed and call.excinfo is not None and os.environ.get("PYTEST_XDIST_WORKER")
            and "illegal memory access" in str(call.excinfo.value)):
        import sys
        sys.stderr.write(f"\n{item.nodeid}: CUDA illegal memory access; ending this worker\n")
        sys.stderr.flush()
        os._exit(3)
