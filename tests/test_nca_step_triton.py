"""nca_step, ``triton`` backend: forward output and all 7 gradients against the reference
backend, over every padding, dense and depthwise perception, F = 1..3, frozen channels,
update probabilities 0 / 0.5 / 1, tiny and odd grid sizes, batch 1 and 3, fp32 / fp16 /
bf16, NCHW and channels_last; the in-kernel fire mask against fastnca.fire_mask; bitwise
reproducible gradients.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (slow: sizes are
small here; the larger shapes are marked ``gpu``)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / fastnca are imported

import pytest  # noqa: E402

pytest.importorskip("triton")

import fastnca  # noqa: E402
from conftest import isolated_idle_cell, listed_walk  # noqa: E402
from fastnca.kernels import _common  # noqa: E402
from fastnca.kernels.reference import nca_step as ref  # noqa: E402
from fastnca.kernels.triton import nca_step as tri  # noqa: E402
from fastnca.kernels.triton import neighborhood_attention as tri_na  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Max-norm relative error allowed against the reference (same inputs, same dtype). fp32
# differs only in summation order; half outputs may differ by one rounding of the result.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("d_state", "d_pw", "d_pb", "d_w1", "d_b1", "d_w2", "d_b2")


@pytest.fixture(autouse=True)
def _true_fp32_reference():
    """On GPU the reference's conv would use TF32 by default: compare against true fp32."""
    if not CUDA:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["every-cell", "listed"])
def walk(request, monkeypatch):
    """The backward's two walks: every cell, the cell kernel drawing the mask (states
    below _COMPACT_BACKWARD_CELLS, every CPU test's size), or the listed firing cells
    (larger states; the threshold lowered here so that small states take it too)."""
    if request.param == "listed":
        listed_walk(monkeypatch)
    return request.param


def make_inputs(B, C, H, W, hidden, F, groups, frozen, dtype=torch.float32, wdtype=torch.float32,
                channels_last=False, seed=0):
    """Backend-level inputs: (state, grad_out, pw, pb, w1, b1, w2, b2); w2/b2 already have
    the frozen rows removed, as the public layer passes them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(DEVICE)

    state = r(B, C, H, W, s=1.0).to(dtype)
    grad_out = r(B, C, H, W, s=1.0).to(dtype)
    if channels_last:
        state = state.contiguous(memory_format=torch.channels_last)
    weights = [r(F * C, C // groups, 3, 3), r(F * C), r(hidden, (F + 1) * C), r(hidden),
               r(C - frozen, hidden), r(C - frozen)]
    return (state, grad_out, *(w.to(wdtype) for w in weights))


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_against_reference(case, dtype=torch.float32, wdtype=torch.float32, channels_last=False,
                            grads=True, seed=0):
    B, C, H, W, hidden, F, groups, frozen, padding, p = case
    groups = C if groups == "C" else groups
    state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, groups, frozen, dtype, wdtype,
                                      channels_last, seed)
    args = (*w, groups, padding, p, 2**33 + 12345, 7, frozen)
    out = tri.forward(state, *args)
    expected = ref.forward(state, *args)
    assert out.dtype == state.dtype and out.shape == state.shape and out.stride() == state.stride()
    tol = REL_TOL[dtype]
    assert rel_err(out, expected) <= tol, f"out: rel err {rel_err(out, expected):.2e}"
    # Frozen channels are copied bit for bit.
    assert torch.equal(out[:, :frozen], state[:, :frozen])
    if not grads:
        return
    got = tri.backward(grad_out, state, *args)
    # fp32: against a float64 reference, so the bound measures this kernel's error alone
    # (a float32 reference adds its own reduction error over every cell to d_pw and d_w1).
    f64 = (lambda t: t.double()) if dtype == torch.float32 and wdtype == torch.float32 else (lambda t: t)
    want = ref.backward(f64(grad_out), f64(state), *(f64(t) for t in w), *args[6:])
    assert got[0].stride() == state.stride()
    for name, a, b, t in zip(GRAD_NAMES, got, want, (state, *w)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        # weight grads are sums over every cell of fp32 products (in weight dtype)
        gt = max(tol, REL_TOL[t.dtype])
        assert rel_err(a, b) <= gt, f"{name}: rel err {rel_err(a, b):.2e}"


# (B, C, H, W, hidden, F, groups, frozen, padding, update_prob)
PADDINGS = ["reflect", "zeros", "replicate", "circular"]
CASES = [
    (1, 3, 2, 2, 5, 1, 1, 0, "circular", 1.0),
    (1, 3, 2, 2, 5, 3, "C", 3, "reflect", 0.5),     # every channel frozen
    (3, 3, 2, 2, 5, 2, "C", 1, "replicate", 0.5),
    (3, 3, 3, 5, 5, 1, "C", 0, "zeros", 0.0),        # nothing fires
    (1, 3, 3, 5, 5, 3, 1, 1, "circular", 1.0),
    (1, 3, 1, 3, 5, 2, 1, 0, "circular", 0.5),       # H = 1: every vertical tap wraps to row 0
    (2, 1, 3, 5, 1, 3, 1, 0, "replicate", 0.5),      # C = 1, hidden = 1
    (3, 8, 17, 31, 16, 2, 1, 1, "reflect", 0.5),     # several tiles per backward program
    (3, 8, 17, 31, 16, 3, "C", 3, "zeros", 0.5),
]


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("groups", [1, "C"], ids=["dense", "depthwise"])
def test_every_padding(padding, groups, walk):
    check_against_reference((2, 3, 3, 5, 5, 2, groups, 1, padding, 0.5))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, walk):
    check_against_reference(case)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[-2], CASES[-1]], ids=lambda c: "x".join(map(str, c)))
def test_compact_forward(monkeypatch, case):
    """Large states run the forward on the listed firing cells and copy the idle ones
    (_COMPACT_FORWARD_CELLS); lowered here so that small states take that path too:
    everything fires, nothing fires, several tiles, depthwise."""
    monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 1)
    check_against_reference(case)
    check_against_reference(case, torch.bfloat16, channels_last=True, grads=False)


def test_weight_grad_accumulators(monkeypatch, walk):
    """The backward keeps its fc weight-grad partials in registers for rules of one channel
    and conv chunk (the Med-NCA rule), in memory otherwise or when
    FASTNCA_TRITON_NCA_BWD_ACC=memory asks, all but d_w1b in registers with =mixed; every
    path matches the reference (with several tiles per program and both perception kinds)."""
    state, _, *w = make_inputs(1, 32, 2, 2, 128, 2, 1, 1)
    mednca = tri._Rule(state, *w, 1, "reflect", 1)
    assert tri._register_accumulators(mednca)
    state, _, *w = make_inputs(1, 64, 2, 2, 128, 2, 1, 1)  # two channel chunks
    assert not tri._register_accumulators(tri._Rule(state, *w, 1, "reflect", 1))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "memory")
    assert not tri._register_accumulators(mednca)
    check_against_reference((3, 8, 17, 31, 16, 2, 1, 1, "reflect", 0.5))
    check_against_reference((3, 8, 17, 31, 16, 3, "C", 3, "zeros", 0.5))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "mixed")  # registers except d_w1b
    assert tri._register_accumulators(mednca) == 2
    check_against_reference((3, 8, 17, 31, 16, 2, 1, 1, "reflect", 0.5))
    check_against_reference((3, 8, 17, 31, 16, 3, "C", 3, "zeros", 0.5))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "register")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_ACC"):
        tri._register_accumulators(mednca)


@pytest.mark.parametrize("case,dtype", [
    ((3, 8, 17, 31, 16, 2, 1, 1, "reflect", 0.5), torch.float32),     # several tiles a program
    ((3, 8, 17, 31, 16, 3, "C", 3, "zeros", 0.5), torch.float32),
    ((1, 3, 2, 2, 5, 1, 1, 0, "circular", 1.0), torch.float32),       # hidden 5: padded columns
    ((3, 3, 3, 5, 5, 1, "C", 0, "zeros", 0.0), torch.float32),        # nothing fires: no rows
    ((2, 8, 5, 6, 16, 2, 1, 1, "reflect", 0.5), torch.bfloat16),
    ((2, 8, 5, 6, 16, 2, "C", 2, "replicate", 0.5), torch.float16),
    ((1, 8, 6, 7, 128, 2, 1, 1, "reflect", 0.5), torch.float32),      # hidden in several fc tiles
], ids=["dense", "depthwise", "tiny", "none-fire", "bf16", "fp16-depthwise", "wide-hidden"])
def test_gemm_weight_grads(monkeypatch, case, dtype):
    """FASTNCA_TRITON_NCA_BWD_ACC=gemm: the cell kernel writes the firing cells' dz, h, gd,
    x and conv rows, and _nca_step_backward_fc_kernel reduces them (over two cell ranges
    under the interpreter) into the weight gradients; against the reference."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")
    state, _, *w = make_inputs(1, 64, 2, 2, 128, 2, 1, 1)  # any rule, several chunks included
    assert tri._register_accumulators(tri._Rule(state, *w, 1, "reflect", 1)) == 3
    check_against_reference(case, dtype, channels_last=dtype != torch.float32)


class _LaunchCount:
    """Stands in for a kernel (kernel[grid](...)): counts its launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("case,dtype", [
    ((3, 8, 9, 11, 40, 2, 1, 1, "reflect", 0.5), torch.float32),      # 3 chunks of 16, padded units
    ((2, 8, 6, 7, 48, 3, "C", 2, "zeros", 0.5), torch.float32),
    ((2, 16, 5, 6, 64, 2, 1, 1, "circular", 1.0), torch.bfloat16),
    ((2, 8, 5, 6, 33, 1, "C", 0, "replicate", 0.5), torch.float16),
], ids=["dense", "depthwise", "bf16", "fp16-depthwise"])
@pytest.mark.parametrize("acc", ["gemm", "chunked"])
def test_gemm_hidden_chunks(monkeypatch, case, dtype, acc):
    """=gemm and =chunked on rules of one channel and conv chunk run
    _nca_step_backward_cell_gemm_kernel (hidden units HC at a time; here 16, so several
    chunks add into dP_x and dQ, and under =chunked into the weight-gradient partials):
    against the reference, and the other cell kernel is not launched, nor the fc kernel
    under =chunked."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    fc = _LaunchCount(tri._nca_step_backward_fc_kernel)
    monkeypatch.setattr(tri, "_nca_step_backward_fc_kernel", fc)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "16")
    chunked = _LaunchCount(tri._nca_step_backward_cell_gemm_kernel)
    other = _LaunchCount(tri._nca_step_backward_cell_kernel)
    monkeypatch.setattr(tri, "_nca_step_backward_cell_gemm_kernel", chunked)
    monkeypatch.setattr(tri, "_nca_step_backward_cell_kernel", other)
    check_against_reference(case, dtype, channels_last=dtype != torch.float32)
    assert chunked.launches > 0 and other.launches == 0 and (fc.launches > 0) == (acc == "gemm")


class _OutOfSharedMemory:
    """Stands in for a kernel whose every launch raises OutOfResources, as a GPU does where
    the tile's shared memory exceeds a block's."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise tri.OutOfResources(237568, 232448, "shared memory")
        return launch


@pytest.mark.parametrize("var,kernel,acc", [
    ("FASTNCA_TRITON_NCA_BWD_TILE", "_nca_step_backward_cell_gemm_kernel", "chunked"),
    ("FASTNCA_TRITON_NCA_BWD_TILE", "_nca_step_backward_cell_kernel", ""),
    ("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "_nca_step_backward_input_kernel", ""),
    # the interpreter (as large rules on a GPU) gives the input kernel the cell kernel's tile
    ("FASTNCA_TRITON_NCA_BWD_TILE", "_nca_step_backward_input_kernel", ""),
    ("FASTNCA_TRITON_NCA_FWD_TILE", "_nca_step_forward_kernel", "")])
def test_pinned_tile_over_shared_memory(monkeypatch, var, kernel, acc):
    """A pinned tile whose kernel does not fit a block's shared memory raises a ValueError
    naming the variable, its value and the bytes; an unpinned one passes Triton's
    OutOfResources on unchanged (the kernels' own tiles fit: a bug to see as it is)."""
    state, grad_out, *w = make_inputs(1, 8, 5, 6, 32, 2, 1, 1, torch.float32, torch.float32, False, 3)
    args = (*w, 1, "reflect", 0.5, 11, 2, 1)
    if acc:
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    monkeypatch.setattr(tri, kernel, _OutOfSharedMemory())
    call = (lambda: tri.forward(state, *args)) if "FWD" in var else (lambda: tri.backward(grad_out, state, *args))
    with pytest.raises(tri.OutOfResources):
        call()
    monkeypatch.setenv(var, "32,4")
    with pytest.raises(ValueError, match=f"{var}=32,4: .* needs 237568 bytes of shared memory, .* 232448; pick a "
                                         "smaller tile"):
        call()


def test_gemm_hidden_chunk_kernel_choice():
    """Which cell kernel the backward takes: the hidden-chunk one under =chunked, and under
    =gemm on rules of one channel and conv chunk, except for half
    states on a GPU (a wrong d_state in bfloat16 on an H200); the interpreter keeps it for
    them, so the CPU tests still run that kernel."""
    def rule(dtype, C=32):
        state, _, *w = make_inputs(1, C, 2, 2, 128, 2, 1, 1, dtype, dtype)
        return tri._Rule(state, *w, 1, "reflect", 1)

    half, fp32, wide = rule(torch.bfloat16), rule(torch.float32), rule(torch.float32, C=64)
    choose = tri._takes_hidden_chunks
    assert choose(half, tri._ACC_CHUNKED, gpu=True) and choose(fp32, tri._ACC_CHUNKED, gpu=True)
    assert choose(fp32, tri._ACC_GEMM, gpu=True) and choose(half, tri._ACC_GEMM, gpu=False)
    assert not choose(half, tri._ACC_GEMM, gpu=True)
    assert not choose(rule(torch.float16), tri._ACC_GEMM, gpu=True)
    assert not choose(wide, tri._ACC_GEMM, gpu=False)  # several channel chunks
    assert not any(choose(fp32, acc, gpu=False) for acc in (tri._ACC_REGISTERS, tri._ACC_MEMORY))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_half_state_fallback_kernel(monkeypatch, dtype):
    """The path =gemm with a half state takes on a GPU (_takes_hidden_chunks): the other
    cell kernel's =gemm path, staged, on a rule of one channel and conv chunk, run here
    with the selector told it is on a GPU: against the reference, and no launch of the
    hidden-chunk kernel."""
    real = tri._takes_hidden_chunks
    monkeypatch.setattr(tri, "_takes_hidden_chunks", lambda rule, acc, gpu: real(rule, acc, True))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")
    hidden = _LaunchCount(tri._nca_step_backward_cell_gemm_kernel)
    other = _LaunchCount(tri._nca_step_backward_cell_kernel)
    monkeypatch.setattr(tri, "_nca_step_backward_cell_gemm_kernel", hidden)
    monkeypatch.setattr(tri, "_nca_step_backward_cell_kernel", other)
    case = (2, 16, 9, 7, 32, 2, 1, 1, "reflect", 0.5)
    state, _, *w = make_inputs(*case[:8], dtype, dtype)
    assert tri._Rule(state, *w, 1, "reflect", 1).ONE_CHUNK
    check_against_reference(case, dtype, dtype, channels_last=True)
    assert hidden.launches == 0 and other.launches > 0


class _LaunchSpy:
    """Stands in for a kernel: records each launch's BLOCK_M and register cap (maxnreg,
    None without one), then launches it."""

    def __init__(self, kernel):
        self.kernel, self.rows, self.regs = kernel, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.rows.append(kwargs.get("BLOCK_M"))
            self.regs.append(kwargs.get("maxnreg"))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("acc", ["chunked", "gemm"])
def test_hidden_chunk_kernel_over_tiles_and_batch_chunks(monkeypatch, acc, walk):
    """The hidden-chunk cell kernel at a pinned 16-row tile (the interpreter takes it too):
    4 tiles of firing cells over 3 programs, the last one partial, so =chunked's fc partials
    (read-modify-written in a program's slot per tile) and both modes' bias partials add over
    a program's tiles; then in batch chunks of one item, which add into the same slots.
    Against float64 at the float32 tolerance (the other tests of these modes have one tile
    a program under the interpreter)."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "16")
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "16,4")
    spy = _LaunchSpy(tri._nca_step_backward_cell_gemm_kernel)
    monkeypatch.setattr(tri, "_nca_step_backward_cell_gemm_kernel", spy)
    case = (3, 8, 5, 7, 40, 2, 1, 1, "reflect", 0.5)  # 105 cells, 54 fire; hidden 40: 3 chunks of 16
    check_against_reference(case)
    monkeypatch.setattr(_common, "BACKWARD_CHUNK_MIN_CELLS", 1)
    check_against_reference(case)
    assert spy.rows == [16] * 4  # one launch, then one a batch chunk


def test_chunked_partials_fall_back_on_wide_rules(monkeypatch):
    """=chunked on a rule of several channel chunks (C=64, hidden 128: C_BLK 32) takes the
    other cell kernel with memory partials, and matches the reference."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "chunked")
    state, _, *w = make_inputs(1, 64, 2, 2, 128, 2, 1, 1)
    assert tri._register_accumulators(tri._Rule(state, *w, 1, "reflect", 1)) == 0
    state, _, *w = make_inputs(1, 32, 2, 2, 128, 2, 1, 1)
    assert tri._register_accumulators(tri._Rule(state, *w, 1, "reflect", 1)) == 4
    check_against_reference((2, 64, 5, 6, 128, 1, 1, 2, "reflect", 0.5))


def check_backward_against_reference(state, grad_out, w, args):
    """tri.backward against the float64 reference on given inputs: every gradient at the
    float32 tolerance where the reference is finite, the same non-finite entries elsewhere."""
    got = tri.backward(grad_out, state, *args)
    want = ref.backward(grad_out.double(), state.double(), *(t.double() for t in w), *args[6:])
    for name, a, b in zip(GRAD_NAMES, got, want):
        fin = b.isfinite()
        assert torch.equal(a.isfinite(), fin) and torch.equal(a.isnan(), b.isnan()), name
        assert rel_err(a[fin], b[fin]) <= 1e-5, f"{name}: rel err {rel_err(a[fin], b[fin]):.2e}"
    return got


@pytest.mark.parametrize("acc", ["", "memory", "gemm", "chunked"])
def test_non_finite_grad_on_frozen_channels(monkeypatch, acc, walk):
    """An inf or NaN of grad_out on a frozen channel reaches d_state there (the identity)
    and nothing else, in every cell kernel (the hidden-chunk one under =gemm and =chunked):
    gd is masked to the updated channels before dh = gd W2 (W2's frozen columns are zero,
    but inf * 0 is NaN)."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    frozen = 2
    state, grad_out, *w = make_inputs(2, 8, 5, 6, 16, 2, 1, frozen, seed=4)
    grad_out[:, 0, ::2, ::2] = float("inf")
    grad_out[:, 1, 1::2, ::3] = float("nan")
    got = check_backward_against_reference(state, grad_out, w, (*w, 1, "reflect", 0.5, 11, 2, frozen))
    assert not got[0][:, :frozen].isfinite().all() and got[0][:, frozen:].isfinite().all()


@pytest.mark.parametrize("acc", ["", "gemm", "chunked"])
def test_relu_gradient_at_exact_zero(monkeypatch, acc, walk):
    """relu'(0) = 0, as in torch: hidden units with zero weights and bias (z == 0 exactly at
    every cell) get no gradient, in every cell kernel (the hidden-chunk one under =gemm and
    =chunked, here in chunks of 16 units)."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "16")
    state, grad_out, *w = make_inputs(2, 8, 5, 6, 40, 2, 1, 1, seed=5)
    dead = [3, 21]
    w[2][dead] = 0.0
    w[3][dead] = 0.0
    got = check_backward_against_reference(state, grad_out, w, (*w, 1, "reflect", 0.5, 11, 2, 1))
    assert not got[3][dead].any() and not got[4][dead].any()


@pytest.mark.parametrize("acc", ["", "chunked"])
def test_partial_sums_in_private_slots(monkeypatch, acc, walk):
    """Each cell-kernel program and each conv-gradient cell range adds into a slot of its
    own, which one fixed-order fold sums (no atomics). A shared slot would be a race on a
    GPU, but the interpreter runs programs one after another and sums it right: so the
    slots themselves are checked (under the interpreter: 4 tiles of firing cells over 3
    programs, 2 conv cell ranges)."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    folded = []
    fold = tri._fold
    monkeypatch.setattr(tri, "_fold", lambda folds, zero, add=True: (folded.extend(p.clone() for p, _ in folds),
                                                                     fold(folds, zero, add)))
    check_against_reference((2, 4, 16, 32, 8, 1, 1, 0, "zeros", 1.0))  # 1024 cells, all fire
    cell, conv = folded
    assert cell.shape[0] > 1 and conv.shape[0] > 1
    assert all(row.any() for row in cell)  # every program had tiles: all cells fire
    assert sum(bool(row.any()) for row in conv) > 1  # the first two ranges have tiles


def test_hidden_chunk_knob(monkeypatch):
    from types import SimpleNamespace

    rule = SimpleNamespace(HID_PAD=128)
    assert tri._hidden_chunk(rule) == 32 and tri._hidden_chunk(SimpleNamespace(HID_PAD=16)) == 16
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "64")
    assert tri._hidden_chunk(rule) == 64
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "256")
    assert tri._hidden_chunk(rule) == 128  # at most the padded hidden width
    for bad in ("8", "24", "512", "x"):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_HCHUNK"):
            tri._hidden_chunk(rule)
    # refused by every backward, also one that does not run the hidden-chunk kernel (the
    # default mode): a typo was accepted silently there
    state, grad_out, *w = make_inputs(1, 4, 3, 3, 8, 2, 1, 1)
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_HCHUNK"):
        tri.backward(grad_out, state, *w, 1, "reflect", 0.5, 3, 0, 1)


@pytest.mark.parametrize("compact", [False, True], ids=["dense-grid", "compact"])
@pytest.mark.parametrize("case", [(2, 8, 5, 6, 40, 2, 1, 1, "reflect", 0.5),
                                  (1, 8, 7, 5, 24, 3, "C", 2, "circular", 1.0),
                                  CASES[0], CASES[3], CASES[6], CASES[-2]], ids=lambda c: "x".join(map(str, c)))
def test_forward_hidden_chunks(monkeypatch, case, compact):
    """FASTNCA_TRITON_NCA_FWD_HCHUNK=16: the forward walks the hidden layer 16 units at a
    time (several chunks at hidden 24, 40; one at 16 or less; padded units in the last
    chunk), over every grid or the listed firing cells, and matches the reference; the
    backward is the same as without it. NaN activations leave frozen channels bitwise."""
    from test_nca_step import check_frozen_channels_kept_beside_nan

    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_HCHUNK", "16")
    if compact:
        monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 1)
    fwd = _LaunchSpy(tri._nca_step_forward_kernel)
    monkeypatch.setattr(tri, "_nca_step_forward_kernel", fwd)
    monkeypatch.setattr(tri, "_forward_autotuned", lambda: fwd)  # (a GPU autotunes: the same kernel)
    hc = []
    record = tri._forward_hidden_chunk
    monkeypatch.setattr(tri, "_forward_hidden_chunk", lambda rule: hc.append(record(rule)) or hc[-1])
    check_against_reference(case)
    check_against_reference(case, torch.bfloat16, channels_last=True, grads=False)
    assert fwd.rows and hc and all(h == 16 for h in hc)
    check_frozen_channels_kept_beside_nan("triton", DEVICE)


def test_forward_hidden_chunk_knob(monkeypatch):
    """FASTNCA_TRITON_NCA_FWD_HCHUNK: unset or 0 off; a power of two in 16..256, at most the
    padded hidden width, on rules of one channel and conv chunk only (0 on others, whose
    forward keeps the whole hidden layer); anything else is refused, naming the variable."""
    state, _, *w = make_inputs(1, 32, 2, 2, 128, 2, 1, 1)
    mednca = tri._Rule(state, *w, 1, "reflect", 1)
    wide = tri._Rule(*(lambda s, g, *ws: (s, *ws))(*make_inputs(1, 64, 2, 2, 128, 2, 1, 0)), 1, "zeros", 0)
    assert mednca.ONE_CHUNK and not wide.ONE_CHUNK
    assert tri._forward_hidden_chunk(mednca) == 0
    for v, want in (("0", 0), ("16", 16), ("32", 32), ("256", 128)):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_HCHUNK", v)
        assert tri._forward_hidden_chunk(mednca) == want
        assert tri._forward_hidden_chunk(wide) == 0
    for bad in ("8", "24", "512", "x", "-16"):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_HCHUNK", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_FWD_HCHUNK"):
            tri._forward_hidden_chunk(mednca)
    # a wide rule at a valid chunk runs the whole-layer forward, and matches the reference
    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_HCHUNK", "16")
    check_against_reference((1, 64, 3, 4, 40, 2, 1, 0, "zeros", 0.5), grads=False)


def test_compact_forward_keeps_frozen_channels_beside_nan(monkeypatch):
    """The compact forward (every listed cell fires): frozen channels keep the state bitwise
    beside NaN activations (its zero weights alone would give 0 * NaN there)."""
    from test_nca_step import check_frozen_channels_kept_beside_nan

    monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 1)
    check_frozen_channels_kept_beside_nan("triton", DEVICE)


def test_gemm_weight_grads_are_computed_there(monkeypatch):
    """Negative control: with the fc kernel's launch dropped, =gemm loses d_w1 and d_w2 (so
    the test above checks that kernel, not another path)."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")

    class _Dropped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    monkeypatch.setattr(tri, "_nca_step_backward_fc_kernel", _Dropped())
    with pytest.raises(AssertionError, match="d_w1"):
        check_against_reference((2, 8, 5, 6, 16, 2, 1, 1, "reflect", 0.5))


@pytest.mark.parametrize("groups", [1, "C"], ids=["dense", "depthwise"])
def test_channel_chunks(monkeypatch, groups, walk):
    """Big rules process channels C_BLK and conv outputs FC_BLK at a time; shrink the
    chunk budget so that a small rule takes 2 channel chunks and 3 conv chunks."""
    monkeypatch.setattr(tri, "_DOT_TILE", 256)
    state, _, *w = make_inputs(1, 24, 2, 2, 16, 3, 1, 0)
    rule = tri._Rule(state, *w, 1, "zeros", 0)
    assert (rule.C_BLK, rule.FC_BLK, rule.FC_CEIL) == (16, 32, 96)
    check_against_reference((1, 24, 3, 5, 16, 3, groups, 2, "reflect", 0.5))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")  # conv chunks recomputed, C_PAD 32 > 2 x 16
    check_against_reference((1, 24, 3, 5, 16, 3, groups, 2, "reflect", 0.5))


@pytest.mark.parametrize("dtype,wdtype,channels_last", [
    (torch.float32, torch.float32, True),
    (torch.float16, torch.float32, True),
    (torch.bfloat16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, True),
], ids=["fp32-cl", "fp16-cl", "bf16", "bf16-bf16weights-cl"])
def test_dtypes_and_layouts(dtype, wdtype, channels_last, walk):
    check_against_reference((2, 8, 5, 6, 16, 2, 1, 1, "reflect", 0.5), dtype, wdtype, channels_last)


@pytest.mark.parametrize("padding", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("groups", [1, "C"], ids=["dense", "depthwise"])
def test_border_reader_tiles(padding, groups):
    """The input-gradient kernel gathers the border readers only in tiles that have them:
    rows of 700 cells give tiles (256 cells under the interpreter) with no border reader,
    with one along x only (x = 0 or 1 side, not both), and with both, beside rows that are
    y borders. Every cell fires, so every border reader's dQ counts: at update_prob 0.5 no
    reader on the x = W side fired in the last tile's rows, and a flag keyed on the other
    side's readers passed (mutation review, session 22). The default walk only: the two
    walks share the gathers (they differ in the direct term, which the walk-parametrised
    tests cover), and this state costs ~6 s a case under the interpreter."""
    check_against_reference((1, 2, 6, 700, 4, 1, groups, 0, padding, 1.0))


EXACT_DTYPES = [
    (torch.bfloat16, torch.float32),   # state and grad_out exact: exact x fp32 splits the other side
    (torch.float32, torch.bfloat16),   # weights exact
    (torch.float16, torch.float16),    # both: one TF32 product for exact x exact
]


def check_exact_operand_products(monkeypatch, case, dtype, wdtype, weights_tagged=None):
    """Under tf32x3, dots with an operand from a half tensor take one or two TF32 products
    (_mm). Against a float64 reference on the same (half-valued) inputs, every fp32 result
    keeps the fp32 tolerance: a lost low part would cost ~1e-3 (TF32 keeps 11 bits). On a
    CPU the tf32_dots fixture gives the interpreter's dots TF32 semantics; the GPU runs it
    on tensor cores."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "0")  # the TF32 products themselves
    B, C, H, W, hidden, F, groups, frozen, padding, p = case
    g = C if groups == "C" else groups
    state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, g, frozen, dtype, wdtype, seed=3)
    args = (*w, g, padding, p, 99, 4, frozen)
    rule = tri._Rule(state, *w, g, padding, frozen)
    bits = tri._EXACT_BITS
    half = (torch.float16, torch.bfloat16)
    if weights_tagged is None:  # half weights are tagged beside a half state only (_exact_bits)
        weights_tagged = wdtype in half and dtype in half
    want_bits = (bits["state"] if dtype in half else 0) + (bits["pw"] + bits["w1"] + bits["w2"] if weights_tagged else 0)
    want_bits += bits["dq"] if dtype == wdtype == torch.bfloat16 else 0  # a bfloat16 dQ workspace (_half_dq)
    assert rule.constexprs()["EXACT"] == want_bits
    got = (tri.forward(state, *args), *tri.backward(grad_out, state, *args))
    d = [t.double() for t in (state, grad_out, *w)]
    want = (ref.forward(d[0], *d[2:], *args[6:]), *ref.backward(d[1], d[0], *d[2:], *args[6:]))
    for name, a, b in zip(("out",) + GRAD_NAMES, got, want):
        assert rel_err(a, b) <= REL_TOL[a.dtype], f"{name}: rel err {rel_err(a, b):.2e}"
    # the comparison switch: tf32x3 everywhere (a rule reads the knobs once, at its first call)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_EXACT", "0")
    assert rule.constexprs()["EXACT"] == want_bits
    assert tri._Rule(state, *w, g, padding, frozen).constexprs()["EXACT"] == 0
    monkeypatch.setenv("FASTNCA_TRITON_NCA_EXACT", "no")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_EXACT"):
        tri._Rule(state, *w, g, padding, frozen).constexprs()


@pytest.fixture
def tf32_dots(monkeypatch, bf16_round_to_nearest):
    """The Triton interpreter's tl.dot with tensor-core TF32 semantics: a "tf32" product
    drops the 13 low mantissa bits of each float32 operand (what an mma does with them),
    "tf32x3" sums the three products of the hi/lo split, "ieee" stays exact. Without it the
    interpreter's dots are exact for every precision, and a product that lost its low part
    (a wrong EXACT bit, a dropped lo term) would go unseen on a CPU. On a GPU (no
    interpreter) it does nothing: the tensor cores have these semantics. Conversions to
    bfloat16 round to nearest even, as on the GPU (conftest: bf16_round_to_nearest)."""
    if not tri.interpreting():
        return
    np = pytest.importorskip("numpy")
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this Triton's interpreter has no InterpreterBuilder.create_dot")
    exact_dot = builder.create_dot

    def trunc(a):
        return (np.asarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    import triton.language as tl

    def bf16_values(h):  # the interpreter holds bfloat16 as raw 16-bit patterns
        if getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16:
            return (np.asarray(h.data).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return None

    def create_dot(self, a, b, d, input_precision, *rest):
        xa, xb = bf16_values(a), bf16_values(b)
        if xa is not None and xb is not None:  # bfloat16 x bfloat16: exact products, fp32 sums
            r = np.matmul(xa.astype(np.float64), xb.astype(np.float64)).astype(np.float32)
            return interpreter.TensorHandle(r + d.data, d.dtype.scalar)
        if a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return exact_dot(self, a, b, d, input_precision, *rest)
        prec = str(input_precision).lower()
        x, y = a.data, b.data
        if prec.endswith("tf32x3"):
            xh, yh = trunc(x), trunc(y)
            r = np.matmul(xh, yh) + np.matmul(xh, trunc(y - yh)) + np.matmul(trunc(x - xh), yh)
        elif prec.endswith("tf32"):
            r = np.matmul(trunc(x), trunc(y))
        elif prec.endswith("ieee"):
            r = np.matmul(x, y)
        else:
            raise AssertionError(f"unknown dot precision {input_precision!r}")
        return interpreter.TensorHandle(r.astype(np.float32) + d.data, d.dtype.scalar)

    monkeypatch.setattr(builder, "create_dot", create_dot)


TF32_CASE = (1, 32, 5, 6, 64, 2, 1, 1, "reflect", 0.5)  # C=32: channel dots of K=32, conv K=64


def _max_err(case, dtype=torch.float32, wdtype=torch.float32):
    B, C, H, W, hidden, F, groups, frozen, padding, p = case
    g = C if groups == "C" else groups
    state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, g, frozen, dtype, wdtype, seed=4)
    args = (*w, g, padding, p, 5, 1, frozen)
    got = (tri.forward(state, *args), *tri.backward(grad_out, state, *args))
    d = [t.double() for t in (state, grad_out, *w)]
    want = (ref.forward(d[0], *d[2:], *args[6:]), *ref.backward(d[1], d[0], *d[2:], *args[6:]))
    return {n: rel_err(a, b) for n, a, b in zip(("out",) + GRAD_NAMES, got, want) if a.dtype == torch.float32}


def test_tf32_emulation_sees_a_lost_low_part(monkeypatch, tf32_dots):
    """The emulation is live: single TF32 products cost ~1e-3 of float32 accuracy, the 3xTF32
    split keeps it. The tests below rely on this to fail when a product loses its low part."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32")
    assert max(_max_err(TF32_CASE).values()) > 2e-4
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    assert max(_max_err(TF32_CASE).values()) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype,wdtype", EXACT_DTYPES, ids=["bf16-state", "bf16-weights", "fp16-all"])
@pytest.mark.parametrize("groups", [1, "C"], ids=["dense", "depthwise"])
def test_exact_operand_products(monkeypatch, tf32_dots, dtype, wdtype, groups):
    check_exact_operand_products(monkeypatch, (2, 8, 5, 7, 16, 2, groups, 1, "zeros", 0.5), dtype, wdtype)


def test_tagged_half_weights_beside_a_float32_state(monkeypatch, tf32_dots):
    """The products _exact_bits no longer asks for (half weights tagged under a float32
    state, wrong on H100/H200 for a cause not found) keep their arithmetic checked here,
    at the float32 tolerance, under the interpreter's TF32 emulation."""
    monkeypatch.setattr(tri, "_exact_bits", tri._tagged_bits)
    check_exact_operand_products(monkeypatch, (2, 8, 5, 7, 16, 2, 1, 1, "zeros", 0.5), torch.float32,
                                 torch.bfloat16, weights_tagged=True)


def test_exact_bit_on_a_float32_operand_is_caught(monkeypatch, tf32_dots):
    """Negative control for the test above: an EXACT bit claimed for float32 weights (their
    low parts then dropped from the products) shows as a float32-tolerance failure."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    honest = max(_max_err(TF32_CASE).values())
    monkeypatch.setattr(tri, "_exact_bits", lambda prec, dtypes: sum(tri._EXACT_BITS.values()))
    assert honest <= REL_TOL[torch.float32] < max(_max_err(TF32_CASE).values())


FAMILY_TENSORS = {"state": 0, "grad": 1, "pw": 2, "w1": 4, "w2": 6}  # make_inputs' order


def _claim_bf16(monkeypatch, families=tuple(FAMILY_TENSORS)):
    """The operand families in ``families`` counted as bfloat16 (float32 tensors that the
    caller fills with bfloat16 values: float32 outputs, so the float32 tolerance can be
    checked), with bfloat16 dots on."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "1")
    monkeypatch.delenv("FASTNCA_TRITON_NCA_EXACT", raising=False)
    # every claim's results are float32, held to the float32 tolerance: the gradient-only
    # single TF32 products of bfloat16 rules (test_bwd_tf32_products) stay off here
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TF32", "0")
    monkeypatch.setattr(tri, "_INTERPRETER_BF16_DOTS", True)
    tagged_bits = tri._tagged_bits  # every claimed family tagged, with or without the state
    monkeypatch.setattr(tri, "_exact_bits", lambda prec, dtypes: tagged_bits(
        prec, {n: torch.bfloat16 if n in families else t for n, t in dtypes.items()}))


def check_bf16_claims(monkeypatch, case, families):
    """Only ``families`` hold bfloat16 values (the others general float32 values, whose low
    bits a wrongly tagged bfloat16 dot would drop): every result keeps the float32
    tolerance against float64, forward and every gradient."""
    _claim_bf16(monkeypatch, families)
    B, C, H, W, hidden, F, g, frozen, padding, p = case
    g = C if g == "C" else g
    tensors = list(make_inputs(B, C, H, W, hidden, F, g, frozen, seed=6))
    for name in families:
        i = FAMILY_TENSORS[name]
        tensors[i] = tensors[i].bfloat16().float()
    state, grad_out, *w = tensors
    args = (*w, g, padding, p, 3, 2, frozen)
    got = (tri.forward(state, *args), *tri.backward(grad_out, state, *args))
    d = [t.double() for t in (state, grad_out, *w)]
    want = (ref.forward(d[0], *d[2:], *args[6:]), *ref.backward(d[1], d[0], *d[2:], *args[6:]))
    for name, a, b in zip(("out",) + GRAD_NAMES, got, want):
        assert rel_err(a, b) <= REL_TOL[torch.float32], f"{families} {name}: rel err {rel_err(a, b):.2e}"


BF16_CLAIMS = [tuple(FAMILY_TENSORS), ("state", "pw"), ("state", "w1"), ("state", "w2"), ("grad", "w2"),
               ("grad", "pw", "w1")]
BF16_CASES = [(1, 16, 5, 6, 32, 2, 1, 1, "reflect", 0.5), (1, 16, 5, 6, 32, 2, "C", 1, "reflect", 0.5),
              (1, 32, 4, 5, 256, 1, 1, 0, "zeros", 1.0)]  # hidden 256: two channel chunks accumulate


@pytest.mark.parametrize("families", BF16_CLAIMS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("case", BF16_CASES, ids=["dense", "depthwise", "chunks"])
def test_bf16_dots_keep_float32_accuracy(monkeypatch, tf32_dots, case, families):
    """FASTNCA_TRITON_NCA_BF16_DOTS=1: a dot of two operands from bfloat16 tensors runs as
    one bfloat16 dot (exact products, float32 sums). Claims of some families only catch a
    dot tagged with the wrong family (its other operand's low bits would be dropped)."""
    check_bf16_claims(monkeypatch, case, families)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("families", BF16_CLAIMS[:3], ids=lambda f: "+".join(f))
@pytest.mark.parametrize("case", BF16_CASES, ids=["dense", "depthwise", "chunks"])
def test_gpu_bf16_dots_keep_float32_accuracy(monkeypatch, case, families):
    """The same on tensor cores: bfloat16 MMAs with float32 accumulation keep float32
    accuracy on bfloat16 values."""
    check_bf16_claims(monkeypatch, case, families)


def test_bf16_dots_are_taken(monkeypatch, tf32_dots):
    """Negative control: on float32 values that are not bfloat16-exact, claimed bfloat16,
    the bfloat16 dots round 16 mantissa bits away (3.2e-3 here, with the GPU's rounding to
    nearest), about twice what the same claim loses through the TF32 products alone (1.5e-3,
    13 bits): so the dots did run (not taken, the two would be equal)."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    _claim_bf16(monkeypatch)
    with_bf16 = max(_max_err(TF32_CASE).values())
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "0")
    without = max(_max_err(TF32_CASE).values())
    assert with_bf16 > 1.8 * without, (with_bf16, without)


def test_bf16_bits_per_family(monkeypatch):
    """_exact_bits: half bits for float16 and bfloat16 families, bfloat16 bits (shifted)
    only for bfloat16 ones, by default (the knob at 0 turns them off); the knob's values are
    checked."""
    dtypes = dict(state=torch.bfloat16, grad=torch.float32, pw=torch.float16, w1=torch.bfloat16, w2=torch.float32)
    bits, shift = tri._EXACT_BITS, tri._BF16_SHIFT.value
    half = bits["state"] + bits["pw"] + bits["w1"]
    monkeypatch.setattr(tri, "_INTERPRETER_BF16_DOTS", True)
    monkeypatch.delenv("FASTNCA_TRITON_NCA_EXACT", raising=False)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "0")
    assert tri._exact_bits("tf32x3", dtypes) == half
    # beside a float32 state the half weights are not tagged (wrong d_state on H100/H200)
    assert tri._exact_bits("tf32x3", dict(dtypes, state=torch.float32)) == 0
    assert tri._exact_bits("tf32x3", dict(grad=torch.bfloat16)) == bits["grad"]
    for on in ("1", None):  # the default
        if on is None:
            monkeypatch.delenv("FASTNCA_TRITON_NCA_BF16_DOTS")
        else:
            monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", on)
        assert tri._exact_bits("tf32x3", dtypes) == half + ((bits["state"] + bits["w1"]) << shift)
    assert tri._exact_bits("tf32", dtypes) == 0 and tri._exact_bits("ieee", dtypes) == 0
    monkeypatch.setattr(tri, "_INTERPRETER_BF16_DOTS", False)
    monkeypatch.setattr(tri, "interpreting", lambda: True)
    assert tri._exact_bits("tf32x3", dtypes) == half  # the stock interpreter's bf16 dots are wrong
    for bad in ("yes", "all"):  # "all" (every dot in bfloat16) was withdrawn
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BF16_DOTS must be 0 or 1"):
            tri._exact_bits("tf32x3", dtypes)


@pytest.mark.parametrize("compact", [False, True], ids=["every-cell", "compact"])
def test_strided_inputs(compact, monkeypatch):
    """Arbitrary strides are read in place: a channel-sliced state, a transposed grad,
    non-contiguous weights (channels_last pw, transposed w1, offset w2 / b2 views) and
    an fp64 bias; the compact forward too, whose idle-cell copy writes out at out's strides."""
    if compact:
        monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 1)
    state, grad_out, pw, pb, w1, b1, w2, b2 = make_inputs(2, 6, 5, 7, 5, 2, 1, 0)
    big = torch.randn(2, 9, 5, 7, device=DEVICE)
    state = big[:, 1:7]
    grad_out = grad_out.transpose(2, 3).contiguous().transpose(2, 3)
    pw = pw.contiguous(memory_format=torch.channels_last)
    w1 = w1.t().contiguous().t()
    w2 = torch.cat([torch.randn(2, 5, device=DEVICE), w2])[2:]
    b2 = torch.cat([torch.randn(2, device=DEVICE), b2])[2:]
    w = (pw, pb, w1, b1.double(), w2, b2)
    args = (*w, 1, "circular", 0.5, 3, 1, 0)
    assert rel_err(tri.forward(state, *args), ref.forward(state, *args)) <= 1e-5
    for a, b in zip(tri.backward(grad_out, state, *args), ref.backward(grad_out, state, *args)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("seed,step,p", [(0, 0, 0.3), (2**32 + 5, 2**32 - 1, 0.999),
                                         (2**64 - 1, 12345, 2.0**-23), (123456789, 2**31, 0.5)])
def test_mask_is_fire_mask(seed, step, p):
    """delta = 1 on every channel (w2 = 0, b2 = 1), zero state: out is exactly the mask."""
    B, C, H, W = 2, 3, 5, 7
    state, _, pw, pb, w1, b1, w2, b2 = make_inputs(B, C, H, W, 5, 1, 1, 0)
    out = tri.forward(torch.zeros_like(state), pw, pb, w1, b1, torch.zeros_like(w2), torch.ones_like(b2),
                      1, "zeros", p, seed, step, 0)
    m = fastnca.fire_mask(B, H, W, p, seed, step, device=DEVICE, backend="reference")
    assert torch.equal(out, m[:, None].expand(B, C, H, W).float())


def test_gradients_are_bitwise_reproducible(walk):
    state, grad_out, *w = make_inputs(2, 3, 17, 31, 5, 2, 1, 1)  # 5 tiles over 3 programs
    args = (*w, 1, "reflect", 0.5, 11, 2, 1)
    g1 = tri.backward(grad_out, state, *args)
    g2 = tri.backward(grad_out, state, *args)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("wdtype,shape", [(torch.float32, (1, 48, 40)), (torch.bfloat16, (3, 9, 7))])
def test_grad_sink_sums_the_steps(wdtype, shape, monkeypatch, walk):
    """A GradSink (nca_rollout's backward) collects the weight gradients of several backward
    calls, with d_state per call as without it. float32: bitwise the sum, in call order, of
    the calls' own gradients (what autograd makes of the loop of nca_step), on a state of
    several tiles per program; bfloat16 (3 batch chunks of 1 item): their float32 sum
    rounded once, against the per-call gradients each rounded to bf16 first."""
    B, H, W = shape
    if B > 1:  # batch chunks of one item (the minimum chunk would otherwise take all three)
        monkeypatch.setattr(_common, "BACKWARD_CHUNK_MIN_CELLS", 1)
    calls = [make_inputs(B, 4, H, W, 8, 2, 1, 1, wdtype=wdtype, seed=s) for s in range(3)]
    w = calls[0][2:]
    prep = tri.prepare(calls[0][0], *w, 1, "reflect", 1)
    sink = tri.GradSink()
    sums = [None] * 6
    for i, (state, grad_out, *_) in enumerate(calls):
        args = (grad_out, state, *w, 1, "reflect", 0.5, 11, i + 2, 1)
        d_state, *alone = tri.backward(*args, prepared=prep)
        sums = [d.float() if acc is None else acc + d.float() for acc, d in zip(sums, alone)]
        got = tri.backward(*args, prepared=prep, sink=sink)
        assert torch.equal(got[0], d_state) and got[1:] == (None,) * 6
    for name, a, b, t in zip(GRAD_NAMES[1:], sink.result(), sums, w):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        if wdtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            assert rel_err(a, b) <= 8e-3, name
    other = make_inputs(B, 4, H, W, 40, 2, 1, 1, seed=5)  # hidden 40: other partial slots
    with pytest.raises(ValueError, match="GradSink sums the gradients of one rule layout"):
        tri.backward(*other[1::-1], *other[2:], 1, "reflect", 0.5, 11, 2, 1, sink=sink)
    with pytest.raises(RuntimeError, match="no backward"):
        tri.GradSink().result()


def test_rollout_gradients_are_bitwise_reproducible():
    """nca_rollout's weight gradients (summed in one GradSink over the steps) come out bitwise
    the same run after run."""
    state, _, *w = make_inputs(2, 4, 7, 6, 8, 2, 1, 1)
    params = [t.clone().requires_grad_(True) for t in (state, *w)]
    runs = []
    for _ in range(2):
        out = fastnca.nca_rollout(*params, steps=5, checkpoint_every=2, seed=3, frozen_channels=1,
                                  backend="triton")
        runs.append(torch.autograd.grad((out * out).sum(), params))
    for name, a, b in zip(GRAD_NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("rows,cols", [(1, 3), (7, 300), (8, 256), (20, 1100)])
@pytest.mark.parametrize("zero", [True, False])
def test_fold_partials(rows, cols, zero):
    """_fold: total += partials summed over rows (8 at a step, any row and column count,
    the totals' own values kept), within float32 rounding of a float64 sum, the same bits
    every call; the partials zeroed after when asked, left as they were otherwise. Alone,
    and beside a second buffer of another shape in the same launch (each its own sums)."""
    g = torch.Generator().manual_seed(rows * cols)
    parts = torch.randn(rows, cols, generator=g).to(DEVICE)
    start = torch.randn(cols, generator=g).to(DEVICE)
    other = torch.randn(3, 700, generator=g).to(DEVICE)
    other_start = torch.randn(700, generator=g).to(DEVICE)
    results = []
    for pair in (False, True, False):
        p, total, q, q_total = parts.clone(), start.clone(), other.clone(), other_start.clone()
        tri._fold(((p, total), (q, q_total)) if pair else ((p, total),), zero)
        results.append(total)
        assert torch.equal(p, torch.zeros_like(p) if zero else parts)
        if pair:
            assert torch.equal(q, torch.zeros_like(q) if zero else other)
            q_want = other_start.double() + other.double().sum(0)
            assert (q_total.double() - q_want).abs().max() <= 4e-6 * q_want.abs().max().clamp(min=1)
        else:
            assert torch.equal(q, other) and torch.equal(q_total, other_start)
    want = start.double() + parts.double().sum(0)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert (results[0].double() - want).abs().max() <= 1e-6 * (rows + 1) * want.abs().max().clamp(min=1)
    # add=False (a one-call sink: its totals are set, not zeroed first and added to)
    p, total = parts.clone(), torch.full_like(start, float("nan"))
    tri._fold(((p, total),), zero, add=False)
    assert (total.double() - parts.double().sum(0)).abs().max() <= 1e-6 * rows * want.abs().max().clamp(min=1)


@pytest.mark.parametrize("acc", ["gemm", "chunked"])
def test_gemm_rollout_equals_loop_of_steps(monkeypatch, acc, walk):
    """=gemm and =chunked in a rollout: the fc kernel's (or the hidden-chunk kernel's)
    partials land in the slots the GradSink folds, so the rollout's gradients stay bitwise
    those of the loop of nca_step."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    state, g, *w = make_inputs(2, 4, 7, 6, 8, 2, 1, 1)
    params = [t.clone().requires_grad_(True) for t in (state, *w)]
    kw = dict(seed=3, frozen_channels=1, backend="triton")
    out = fastnca.nca_rollout(*params, steps=4, checkpoint_every=2, **kw)
    x = params[0]
    for i in range(4):
        x = fastnca.nca_step(x, *params[1:], step=i, **kw)
    assert torch.equal(out, x)
    for name, a, b in zip(GRAD_NAMES, torch.autograd.grad(out, params, g), torch.autograd.grad(x, params, g)):
        assert torch.equal(a, b), name


def test_public_op_autograd_and_rollout():
    """Through fastnca.nca_step / nca_rollout(backend="triton") with autograd."""
    state, _, pw, pb, w1, b1, w2, b2 = make_inputs(1, 4, 6, 5, 8, 2, 1, 1)
    # fc2 with all C rows: the public layer drops the frozen row
    w2, b2 = torch.cat([torch.randn(1, 8, device=DEVICE), w2]), torch.cat([torch.randn(1, device=DEVICE), b2])
    params = [t.clone().requires_grad_(True) for t in (state, pw, pb, w1, b1, w2, b2)]
    kw = dict(padding="replicate", update_prob=0.5, seed=5, frozen_channels=1)
    res = {}
    for backend in ("triton", "reference"):
        out = fastnca.nca_rollout(*params, steps=3, checkpoint_every=2, backend=backend, **kw)
        one = fastnca.nca_step(*params, step=1, backend=backend, **kw)
        ramp = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        loss = (out * ramp).sum() + one.square().sum()
        res[backend] = (out, one, *torch.autograd.grad(loss, params))
    for a, b in zip(res["triton"], res["reference"]):
        assert rel_err(a, b) <= 1e-5


# ---- GPU-size shapes (too slow for the interpreter) -----------------------------------

GPU_CASES = [
    (2, 32, 64, 64, 128, 2, 1, 1, "reflect", 0.5),    # the Med-NCA rule
    (4, 16, 64, 64, 128, 2, 1, 1, "reflect", 0.5),    # Med-NCA backbone
    (8, 16, 32, 32, 128, 3, "C", 4, "zeros", 0.5),    # Growing-NCA style, depthwise
    (2, 128, 16, 24, 256, 3, 1, 0, "circular", 0.5),  # largest supported rule
    (2, 48, 33, 17, 96, 2, "C", 3, "replicate", 0.5),
    (1, 5, 300, 7, 40, 1, 1, 0, "reflect", 1.0),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shapes(case, dtype, walk):
    check_against_reference(case, dtype, channels_last=dtype == torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,wdtype", EXACT_DTYPES, ids=["bf16-state", "bf16-weights", "fp16-all"])
@pytest.mark.parametrize("case", [(2, 32, 64, 64, 128, 2, 1, 1, "reflect", 0.5),
                                  (2, 16, 33, 47, 128, 2, "C", 1, "zeros", 0.5)], ids=["mednca", "depthwise"])
def test_gpu_exact_operand_products(monkeypatch, case, dtype, wdtype):
    check_exact_operand_products(monkeypatch, case, dtype, wdtype)


# Every tile a launcher can pick on a GPU, each pinned in turn (the other tests see one
# tile per kernel: the default). A wrong tile shows in float32 against float64 at the
# float32 tolerance, which a half dtype's tolerance would hide (a lost low part of the
# 3xTF32 split costs ~1e-3).
# The forward runs both ways on each: over every cell, and compact (firing cells listed).
TILE_RULES = [(8, 32, 64, 64, 128, 2, 1, 1, "reflect", 0.5), (2, 16, 33, 47, 128, 2, "C", 1, "zeros", 0.5)]


def check_pinned_tile(monkeypatch, case, var, tile):
    monkeypatch.setenv(var, tile)
    B, C, H, W, hidden, F, groups, frozen, padding, p = case
    g = C if groups == "C" else groups
    state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, g, frozen, seed=5)
    args = (*w, g, padding, p, 2**40 + 3, 9, frozen)
    d = [t.double() for t in (state, grad_out, *w)]
    if var == "FASTNCA_TRITON_NCA_FWD_TILE":
        want = ref.forward(d[0], *d[2:], *args[6:])
        got = []
        for threshold in (B * H * W + 1, 1):  # every cell, then compact
            monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", threshold)
            got.append(tri.forward(state, *args))
        got, want = tuple(got), (want, want)
        names = ("out (every cell)", "out (compact)")
    else:
        got, want = tri.backward(grad_out, state, *args), ref.backward(d[1], d[0], *d[2:], *args[6:])
        names = GRAD_NAMES
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) <= REL_TOL[torch.float32], f"{var}={tile} {name}: rel err {rel_err(a, b):.2e}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", TILE_RULES, ids=["mednca", "depthwise"])
@pytest.mark.parametrize("var,tile", [("FASTNCA_TRITON_NCA_FWD_TILE", t) for t in ("32,4", "64,4", "128,8")]
                         + [("FASTNCA_TRITON_NCA_FWD_TILE", "64,4,1,168")]
                         + [("FASTNCA_TRITON_NCA_BWD_TILE", t) for t in ("16,4", "32,4", "32,8", "16,8", "16,8,1,128")]
                         + [("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", t)
                            for t in ("64,4", "128,8", "32,4", "64,4,3", "64,4,1,96")])
def test_gpu_every_tile_matches_reference(monkeypatch, case, var, tile):
    check_pinned_tile(monkeypatch, case, var, tile)


@pytest.mark.parametrize("var,tile", [("FASTNCA_TRITON_NCA_FWD_TILE", "16,4"), ("FASTNCA_TRITON_NCA_FWD_TILE", "128,8"),
                                      ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4"), ("FASTNCA_TRITON_NCA_BWD_TILE", "32,8"),
                                      ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4,1,128"),
                                      ("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "64,4,3")])
def test_pinned_tiles_under_the_interpreter(monkeypatch, var, tile):
    """The tile knobs hold under the interpreter too (its own tile is 256 rows): the GPU's
    tiles, several to a program and a partial last one, on a small grid of both rules.
    A typo in a knob raises there as on a GPU."""
    for case in ((2, 8, 9, 13, 16, 2, 1, 1, "reflect", 0.5), (1, 8, 7, 11, 24, 1, "C", 0, "zeros", 1.0)):
        check_pinned_tile(monkeypatch, case, var, tile)
    with pytest.raises(ValueError, match=f"{var} must be"):
        check_pinned_tile(monkeypatch, (1, 4, 5, 5, 8, 1, 1, 0, "zeros", 0.5), var, "64;4")


@pytest.mark.parametrize("var,tile,kernel,env", [
    ("FASTNCA_TRITON_NCA_FWD_TILE", "16,4", "_nca_step_forward_kernel", {}),
    ("FASTNCA_TRITON_NCA_FWD_TILE", "16,4,1,168", "_nca_step_forward_kernel", {}),
    ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4", "_nca_step_backward_cell_kernel", {}),
    ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4,1,128", "_nca_step_backward_cell_kernel", {}),
    ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4", "_nca_step_backward_cell_gemm_kernel",
     {"FASTNCA_TRITON_NCA_BWD_ACC": "chunked"}),
    ("FASTNCA_TRITON_NCA_BWD_TILE", "16,4,2,96", "_nca_step_backward_cell_gemm_kernel",
     {"FASTNCA_TRITON_NCA_BWD_ACC": "chunked"}),
    ("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "32,4", "_nca_step_backward_input_kernel", {}),
    ("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "32,4,1,96", "_nca_step_backward_input_kernel", {}),
], ids=["fwd", "fwd-regs", "cell", "cell-regs", "cell-chunked", "cell-chunked-regs", "input", "input-regs"])
def test_pinned_tiles_reach_the_kernels_under_the_interpreter(monkeypatch, var, tile, kernel, env):
    """A pinned tile is the one each kernel launches with under the interpreter too, in
    every mode that has its own tiling (the hidden-chunk cell kernel), its register cap (the
    4th field) passed as maxnreg, no cap as none; the results match the reference (the
    interpreter runs no ptxas: a cap changes nothing there)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spy = _LaunchSpy(getattr(tri, kernel))
    monkeypatch.setattr(tri, kernel, spy)
    check_pinned_tile(monkeypatch, (2, 8, 5, 7, 16, 2, 1, 1, "reflect", 0.5), var, tile)
    fields = tile.split(",")
    assert spy.rows and set(spy.rows) == {int(fields[0])}, spy.rows
    assert set(spy.regs) == {int(fields[3]) if len(fields) == 4 else None}, spy.regs


def test_gpu_tile_candidates_are_tested():
    """The pinned-tile GPU tests cover every forward autotune candidate that _wgmma_safe
    keeps (a new candidate must join them): the every-tile test, and the hidden-chunk
    forward's, the only forward the register-capped candidate is tuned for."""
    tested = {"32,4", "64,4", "128,8", "64,4,1,168"}
    for c in tri._forward_autotuned().configs:
        if tri._wgmma_safe(c.kwargs["BLOCK_M"], c.num_warps):
            regs = getattr(c, "maxnreg", None)
            tile = f"{c.kwargs['BLOCK_M']},{c.num_warps}" + (f",{c.num_stages},{regs}" if regs else "")
            assert tile in tested and tile in HCHUNK_FORWARD_TILES, c


def test_forward_register_cap_only_for_hidden_chunks():
    """The register-capped forward candidate is tuned only where the hidden layer comes in
    chunks (HC > 0), the case whose sm_90 compile fits the cap without spilling; every other
    candidate is kept or dropped as before."""
    configs = tri._forward_autotuned().configs
    capped = [c for c in configs if getattr(c, "maxnreg", None)]
    assert [(c.kwargs["BLOCK_M"], c.num_warps, c.maxnreg) for c in capped] == [(64, 4, 168)]
    sizes = dict(HID_PAD=128, C_PAD=32, FC_BLK=64, C_BLK=32)
    whole = tri._forward_prune(configs, dict(sizes, HC=0))
    chunks = tri._forward_prune(configs, dict(sizes, HC=32))
    assert not any(getattr(c, "maxnreg", None) for c in whole)
    assert [c for c in chunks if not getattr(c, "maxnreg", None)] == whole
    assert capped[0] in chunks


def test_register_cap_is_refused_on_rocm(monkeypatch):
    """Triton's HIP backend takes no maxnreg: on ROCm the capped forward candidate is not
    tuned, and a pinned REGS raises an error naming the knob (not Triton's KeyError at
    launch); a tile without a cap still pins."""
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    configs = tri._forward_autotuned().configs
    kept = tri._forward_prune(configs, dict(HID_PAD=128, C_PAD=32, FC_BLK=64, C_BLK=32, HC=32))
    assert kept and not any(getattr(c, "maxnreg", None) for c in kept)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", "64,4,1,168")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_FWD_TILE=64,4,1,168: a register cap"):
        tri._pinned_forward_tile()
    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", "64,4,1,0")
    assert tri._pinned_forward_tile() == (64, 4, 1, 0)


def test_resident_programs():
    """Persistent programs under a register cap: what an SM's 65536 registers hold at once
    (a thread's count rounded up to a multiple of 8, at most 64 warps and 32 blocks an SM);
    2 an SM without a cap."""
    assert tri._resident_programs(132, 4, 0) == 264
    assert tri._resident_programs(132, 4, 128) == 4 * 132
    assert tri._resident_programs(132, 4, 168) == 3 * 132
    assert tri._resident_programs(132, 4, 161) == 3 * 132  # 168 after rounding
    assert tri._resident_programs(132, 8, 128) == 2 * 132
    assert tri._resident_programs(132, 8, 255) == 132
    assert tri._resident_programs(132, 4, 32) == 16 * 132  # 64 warps an SM at most
    assert tri._resident_programs(132, 1, 32) == 32 * 132  # and 32 blocks


def test_pinned_forward_tile(monkeypatch):
    monkeypatch.delenv("FASTNCA_TRITON_NCA_FWD_TILE", raising=False)
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(tri, "interpreting", lambda: True)
    assert tri._pinned_forward_tile() == (tri._INTERPRET_BLOCK_M, 4, 1, 0)
    monkeypatch.setattr(tri, "interpreting", lambda: False)
    assert tri._pinned_forward_tile() is None
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")
    assert tri._pinned_forward_tile() == (64, 4, 1, 0)
    for tile, want in (("128,8", (128, 8, 1, 0)), ("64,4,2", (64, 4, 2, 0)), ("64,4,1,168", (64, 4, 1, 168)),
                       ("32,4,1,0", (32, 4, 1, 0))):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", tile)
        assert tri._pinned_forward_tile() == want
    for bad, match in (("64,8", "more warp groups than 64-row blocks"), ("48,4", "FASTNCA_TRITON_NCA_FWD_TILE"),
                       ("64", "FASTNCA_TRITON_NCA_FWD_TILE"), ("64,4,1,168,1", r"'BLOCK_M,WARPS\[,STAGES\[,REGS\]\]'"),
                       ("64,4,1,31", "REGS 0 or 32..255"), ("64,4,1,256", "REGS 0 or 32..255"),
                       ("64,4,0,128", "stages in 1..4")):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", bad)
        with pytest.raises(ValueError, match=match):
            tri._pinned_forward_tile()
    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", "64,3")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_FWD_TILE: BLOCK_M in 16/32/64/128, warps in 1/2/4/8"):
        tri._pinned_forward_tile()
    monkeypatch.delenv("FASTNCA_TRITON_NCA_FWD_TILE")
    for bad in ("off", "false", "no", "O"):  # a typo raises, as every on/off knob
        monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_AUTOTUNE must be 0 or 1"):
            tri._pinned_forward_tile()
        with pytest.raises(ValueError, match="FASTNCA_TRITON_AUTOTUNE must be 0 or 1"):
            tri_na.autotuning()
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "")  # empty: unset, as for every knob
    assert tri._pinned_forward_tile() is None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CASES[:3], ids=lambda c: "x".join(map(str, c)))
def test_gpu_bf16_dots(monkeypatch, case):
    """FASTNCA_TRITON_NCA_BF16_DOTS=1 on bfloat16 state and weights (the bfloat16 dots run on
    tensor cores), against the reference at the bfloat16 tolerance."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "1")
    check_against_reference(case, torch.bfloat16, torch.bfloat16, channels_last=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("acc", ["", "gemm"])
def test_gpu_gradients_are_bitwise_reproducible(monkeypatch, acc):
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    state, grad_out, *w = make_inputs(4, 16, 64, 64, 128, 2, 1, 1)
    args = (*w, 1, "reflect", 0.5, 11, 2, 1)
    g1 = tri.backward(grad_out, state, *args)
    g2 = tri.backward(grad_out, state, *args)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_gemm_weight_grads(monkeypatch, case, dtype):
    """FASTNCA_TRITON_NCA_BWD_ACC=gemm on tensor cores: float32 at the float32 tolerance
    against float64, bfloat16 (activations saved in bfloat16) at its own."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")
    check_against_reference(case, dtype, channels_last=dtype == torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tile,hc", [("64,4", "32"), ("64,4", "64"), ("128,8", "32"), ("32,4", "32"),
                                     ("16,8", "16")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("acc", ["gemm", "chunked"])
def test_gpu_gemm_hidden_chunk_tiles(monkeypatch, tile, hc, dtype, acc):
    """The hidden-chunk cell kernel of =gemm and =chunked (_nca_step_backward_cell_gemm_kernel)
    at each tile and chunk the benchmarks try, on the Med-NCA rule and a depthwise one.
    =chunked in float32 at 128,8 asks 232 KB of shared memory where an H200 gives a block
    227: a ValueError names the variable. =gemm in bfloat16 does not take the kernel on a
    GPU (_takes_hidden_chunks: it gave a wrong d_state on an H200, at 128,8 and at 64,4):
    the other cell kernel runs, at its own tile, and must be right."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", tile)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", hc)
    medNCA = (2, 32, 40, 48, 128, 2, 1, 1, "reflect", 0.5)
    if (acc, dtype, tile) == ("chunked", torch.float32, "128,8"):
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_TILE=128,8: .* bytes of shared memory"):
            check_against_reference(medNCA, dtype, dtype, channels_last=True)
        return
    if (acc, dtype) == ("gemm", torch.bfloat16):
        if tile != "64,4" or hc != "32":
            pytest.skip("the other cell kernel at its own tile: one case runs it")
        monkeypatch.delenv("FASTNCA_TRITON_NCA_BWD_TILE")  # the tile is the hidden-chunk kernel's
        spy = _LaunchCount(tri._nca_step_backward_cell_gemm_kernel)
        monkeypatch.setattr(tri, "_nca_step_backward_cell_gemm_kernel", spy)
        check_against_reference(medNCA, dtype, dtype, channels_last=True)
        check_against_reference((2, 16, 33, 20, 64, 2, "C", 0, "zeros", 0.5), dtype, dtype)
        assert spy.launches == 0
        return
    check_against_reference(medNCA, dtype, dtype, channels_last=True)
    check_against_reference((2, 16, 33, 20, 64, 2, "C", 0, "zeros", 0.5), dtype, dtype)


def test_wgmma_safe_rule():
    # At most one warp group (4 warps) per 64-row block of a dot (see _wgmma_safe).
    assert not tri._wgmma_safe(64, 8)    # N split (triton#10629) or rows repeated
    assert not tri._wgmma_safe(64, 16)
    assert not tri._wgmma_safe(128, 16)
    assert tri._wgmma_safe(64, 4)        # one warp group
    assert tri._wgmma_safe(128, 8)       # warp groups along M
    assert tri._wgmma_safe(128, 4)
    assert tri._wgmma_safe(32, 8)        # under 64 rows: mma.sync, no wgmma
    assert tri._wgmma_safe(16, 8)


def test_cell_tile_safe_counts_the_partial_dots_only_where_they_exist(monkeypatch):
    """The cell kernel's weight-gradient partial dots have C_BLK and HID_PAD rows: with them
    (register or memory partials) 8 warps are refused on a 64-wide rule; under =gemm the
    kernel has none, and 16 rows on 8 warps are safe."""
    from types import SimpleNamespace

    rule = SimpleNamespace(C_BLK=64, HID_PAD=64)
    for acc in ("", "memory"):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
        assert not tri._cell_tile_safe(rule, 16, 8) and tri._cell_tile_safe(rule, 16, 4)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "gemm")
    assert tri._cell_tile_safe(rule, 16, 8) and not tri._cell_tile_safe(rule, 64, 8)
    # =chunked on a rule of one chunk: the hidden-chunk kernel's partial dots have C_PAD and
    # HC rows (not HID_PAD)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", "chunked")
    wide = SimpleNamespace(C_BLK=64, C_PAD=64, HID_PAD=64, ONE_CHUNK=True)
    assert not tri._cell_tile_safe(wide, 16, 8) and tri._cell_tile_safe(wide, 16, 4)
    narrow = SimpleNamespace(C_BLK=16, C_PAD=16, HID_PAD=64, ONE_CHUNK=True)
    assert tri._cell_tile_safe(narrow, 16, 8)  # rows 16, 16 and HC = 32
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", "64")
    assert not tri._cell_tile_safe(narrow, 16, 8)


@pytest.mark.parametrize("C", [1, 5, 8, 16, 32, 48, 64, 128])
@pytest.mark.parametrize("hidden", [1, 16, 40, 64, 128, 256])
@pytest.mark.parametrize("F", [1, 3])
def test_gpu_tiles_keep_one_warp_group_per_64_rows(monkeypatch, C, hidden, F):
    """Every tile the launchers can pick on an H100 (forward: every autotune candidate the
    prune keeps; backward: the fixed tiling, for each precision, with the row counts of all
    its dots, and the input-gradient kernel's tile) passes _wgmma_safe. Checked on the host:
    what it prevents (an illegal memory access, wrong layouts) only shows on a Hopper GPU."""
    from types import SimpleNamespace

    import triton

    c_pad, hid_pad, c_blk, fc_blk, fc_ceil = tri._tile_dims(C, F * C, hidden)
    monkeypatch.setattr(tri, "_device_limits", lambda device: (132, 227 * 1024))
    rule = SimpleNamespace(C_PAD=c_pad, HID_PAD=hid_pad, C_BLK=c_blk, FC_BLK=fc_blk, SLOT=4096)
    monkeypatch.setattr(tri, "interpreting", lambda: False)
    for prec in ("tf32x3", "tf32", "ieee"):
        block_m, warps, *_ = tri._backward_tiling(rule, torch.device("cuda"), 1 << 20, prec)
        # the cell kernel's weight-gradient dots have C_BLK and HID_PAD rows
        for m in (block_m, c_blk, hid_pad):
            assert tri._wgmma_safe(m, warps), (block_m, warps, prec, m)
        (in_m, in_warps, _, _), _ = tri._side_tiles(rule, torch.device("cuda"), block_m, warps)
        assert tri._wgmma_safe(in_m, in_warps), (in_m, in_warps)
    configs = tri._forward_autotuned().configs
    kept = tri._forward_prune(configs, dict(HID_PAD=hid_pad, C_PAD=c_pad, FC_BLK=fc_blk, C_BLK=c_blk))
    assert kept and all(isinstance(c, triton.Config) for c in kept)
    for c in kept:
        assert tri._wgmma_safe(c.kwargs["BLOCK_M"], c.num_warps), c
    assert not any((c.kwargs["BLOCK_M"], c.num_warps) == (64, 8) for c in kept)


@pytest.mark.parametrize("acc", ["gemm", "chunked"])
def test_hidden_chunk_tiles(monkeypatch, acc):
    """The hidden-chunk kernel's tile (_hidden_chunk_tiling) on a GPU: 64 rows on 4 warps
    for half states, 32 for float32; a pinned tile is checked against that kernel's dots
    (BLOCK_M rows; under =chunked also C_PAD and HC rows), not the other cell kernel's
    (HID_PAD rows): a depthwise C=16, hidden 64 rule takes 16 and 128 rows on 8 warps (the
    GPU test's tiles); 64 rows on 8 warps stay refused."""
    from types import SimpleNamespace

    monkeypatch.setattr(tri, "_device_limits", lambda device: (132, 227 * 1024))
    monkeypatch.setattr(tri, "interpreting", lambda: False)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    c_pad, hid_pad, c_blk, fc_blk, fcc = tri._tile_dims(16, 32, 64)
    rule = SimpleNamespace(C_PAD=c_pad, HID_PAD=hid_pad, C_BLK=c_blk, FC_BLK=fc_blk, FC_CEIL=fcc, SLOT=4096,
                           ONE_CHUNK=True, dtypes=dict(state=torch.bfloat16))
    cuda = torch.device("cuda")
    assert tri._hidden_chunk_tiling(rule, cuda, 1 << 20, 264) == (64, 4, 264, 1, 0)
    assert tri._hidden_chunk_tiling(SimpleNamespace(**{**vars(rule), "dtypes": dict(state=torch.float32)}),
                                    cuda, 1 << 20, 264)[:2] == (32, 4)
    for tile, hc in (("16,8", "16"), ("128,8", "32")):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", tile)
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_HCHUNK", hc)
        programs = tri._backward_tiling(rule, cuda, 1 << 20)[2]  # the other kernel's pin check passes too
        assert tri._hidden_chunk_tiling(rule, cuda, 1 << 20, programs)[:2] == tuple(map(int, tile.split(",")))
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "64,8")
    with pytest.raises(ValueError, match="more warp groups than 64-row blocks"):
        tri._hidden_chunk_tiling(rule, cuda, 1 << 20, 264)


def test_pinned_backward_tile(monkeypatch):
    """FASTNCA_TRITON_NCA_BWD_TILE (a benchmarking knob) pins the backward tile (and its
    pipelining stages) on a GPU, rejects malformed values and tiles with more warp groups
    than 64-row blocks."""
    from types import SimpleNamespace

    monkeypatch.setattr(tri, "_device_limits", lambda device: (132, 227 * 1024))
    monkeypatch.setattr(tri, "interpreting", lambda: False)
    c_pad, hid_pad, c_blk, fc_blk, _ = tri._tile_dims(32, 64, 128)  # the Med-NCA rule
    rule = SimpleNamespace(C_PAD=c_pad, HID_PAD=hid_pad, C_BLK=c_blk, FC_BLK=fc_blk, SLOT=4096)
    cuda = torch.device("cuda")
    monkeypatch.delenv("FASTNCA_TRITON_NCA_BWD_TILE", raising=False)
    assert tri._backward_tiling(rule, cuda, 1 << 20)[:2] == (16, 4)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "16,4")
    assert tri._backward_tiling(rule, cuda, 1 << 20) == (16, 4, 264, 1, 0)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "32,8,2")
    assert tri._backward_tiling(rule, cuda, 1 << 20) == (32, 8, 264, 2, 0)
    # a register cap: the persistent programs become what the SMs hold at once
    for tile, want in (("16,4,1,128", (16, 4, 4 * 132, 1, 128)), ("16,8,2,128", (16, 8, 2 * 132, 2, 128)),
                       ("16,4,1,0", (16, 4, 264, 1, 0)), ("16,8,1,255", (16, 8, 132, 1, 255))):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", tile)
        assert tri._backward_tiling(rule, cuda, 1 << 20) == want, tile
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "16,4,1,128")
    assert tri._backward_tiling(rule, cuda, 16 * 100)[2] == 100  # within the tiles
    for bad in ("16", "16,x", "24,4", "32,3", "32,4,0", "32,4,5", "32,4,2,1", "32,4,2,300", "32,4,2,128,1"):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_TILE"):
            tri._backward_tiling(rule, cuda, 1 << 20)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "64,8")
    with pytest.raises(ValueError, match="more warp groups than 64-row blocks"):
        tri._backward_tiling(rule, cuda, 1 << 20)
    # 32 rows on 8 warps: safe per cell, but C=64, hidden=64 has 64-row weight-gradient dots
    c_pad, hid_pad, c_blk, fc_blk, _ = tri._tile_dims(64, 64, 64)
    wide = SimpleNamespace(C_PAD=c_pad, HID_PAD=hid_pad, C_BLK=c_blk, FC_BLK=fc_blk, SLOT=4096)
    assert (c_blk, hid_pad) == (64, 64)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TILE", "32,8")
    with pytest.raises(ValueError, match="more warp groups than 64-row blocks"):
        tri._backward_tiling(wide, cuda, 1 << 20)
    assert tri._backward_tiling(rule, cuda, 1 << 20)[:2] == (32, 8)  # Med-NCA: 32 and 128 rows
    monkeypatch.delenv("FASTNCA_TRITON_NCA_BWD_TILE")
    # the input-gradient kernel's own knob
    assert tri._side_tiles(rule, cuda, 16, 4) == ((64, 4, 1, 0), 64)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "128,4")
    assert tri._side_tiles(rule, cuda, 16, 4) == ((128, 4, 1, 0), 64)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "64,4,3")  # pipelined gathers
    assert tri._side_tiles(rule, cuda, 16, 4) == ((64, 4, 3, 0), 64)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "64,4,1,96")  # a register cap
    assert tri._side_tiles(rule, cuda, 16, 4) == ((64, 4, 1, 96), 64)
    for bad in ("64,x", "64,4,5", "64,4,2,1", "64,4,1,96,1"):
        monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", bad)
        with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_INPUT_TILE"):
            tri._side_tiles(rule, cuda, 16, 4)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_INPUT_TILE", "64,8")
    with pytest.raises(ValueError, match="more warp groups than 64-row blocks"):
        tri._side_tiles(rule, cuda, 16, 4)


def fro_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


HALF_DQ_CASES = [(2, 16, 6, 7, 32, 2, 1, 1, "reflect", 0.5), (1, 16, 5, 6, 32, 2, "C", 0, "circular", 1.0)]
HALF_GPU_CASES = HALF_DQ_CASES + [(2, 32, 40, 48, 128, 2, 1, 1, "reflect", 0.5)]  # + the Med-NCA rule
HALF_GPU_IDS = ["dense", "depthwise", "mednca"]


def bf16_rule_inputs(monkeypatch, case, seed):
    """A bfloat16 rule and state of ``case``, with the GPU's product paths on the CPU
    (tf32x3, bfloat16 dots): (state, grad_out, weights, args, groups, padding, frozen)."""
    monkeypatch.setattr(tri, "_dot_precision", lambda device: "tf32x3")
    monkeypatch.setattr(tri, "_INTERPRETER_BF16_DOTS", True)
    B, C, H, W, hidden, F, g, frozen, padding, p = case
    g = C if g == "C" else g
    state, grad_out, *w = make_inputs(B, C, H, W, hidden, F, g, frozen, torch.bfloat16, torch.bfloat16, seed=seed)
    return state, grad_out, w, (*w, g, padding, p, 5, 3, frozen), g, padding, frozen


def assert_within_eager_bf16(monkeypatch, got, grad_out, state, args):
    """Every gradient's error against float64 (Frobenius, relative) within 1.5x (+1e-3) of
    eager bfloat16's: the reference computed in bfloat16, PyTorch's numerics."""
    import fastnca.kernels.reference.nca_step as ref_mod

    d = [t.double() for t in (state, grad_out, *args[:6])]
    want = ref.backward(d[1], d[0], *d[2:], *args[6:])
    with monkeypatch.context() as m:
        m.setattr(ref_mod, "compute_dtype", lambda dtype: torch.bfloat16)
        eager = ref.backward(grad_out, state, *args)
    for name, a, t, b in zip(GRAD_NAMES, got, eager, want):
        if b is None or b.abs().max() == 0:
            continue
        assert fro_err(a, b) <= 1.5 * fro_err(t, b) + 1e-3, f"{name}: {fro_err(a, b):.2e} vs eager {fro_err(t, b):.2e}"


@pytest.mark.parametrize("case", HALF_DQ_CASES, ids=["dense", "depthwise"])
def test_half_dq_workspace(monkeypatch, tf32_dots, case):
    check_half_dq(monkeypatch, case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", HALF_GPU_CASES, ids=HALF_GPU_IDS)
def test_gpu_half_dq_workspace(monkeypatch, case):
    check_half_dq(monkeypatch, case)


def check_half_dq(monkeypatch, case):
    """bfloat16 state and weights keep dQ in a bfloat16 workspace (_half_dq): taken, and
    every result's error against float64 (Frobenius, relative) stays within 1.5x (+1e-3) of
    eager bfloat16's (the reference computed in bfloat16, PyTorch's numerics); with
    FASTNCA_TRITON_NCA_HALF_DQ=0 the workspace stays float32 and the gradients change.
    float32 weights beside a bfloat16 state keep a float32 dQ (test_exact_operand_products
    holds their d_pw to the float32 tolerance)."""
    state, grad_out, w, args, g, padding, frozen = bf16_rule_inputs(monkeypatch, case, seed=8)
    assert tri._Rule(state, *w, g, padding, frozen).dtypes["dq"] == torch.bfloat16
    assert tri._Rule(state, w[0].float(), *w[1:], g, padding, frozen).dtypes["dq"] == torch.float32
    got = tri.backward(grad_out, state, *args)
    assert_within_eager_bf16(monkeypatch, got, grad_out, state, args)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_HALF_DQ", "0")
    assert tri._Rule(state, *w, g, padding, frozen).dtypes["dq"] == torch.float32
    full = tri.backward(grad_out, state, *args)
    assert not torch.equal(full[0], got[0]) or not torch.equal(full[1], got[1])
    monkeypatch.setenv("FASTNCA_TRITON_NCA_HALF_DQ", "yes")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_HALF_DQ must be 0 or 1"):
        tri._Rule(state, *w, g, padding, frozen)
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_HALF_DQ must be 0 or 1"):  # whatever the rule
        tri._Rule(state.float(), *(t.float() for t in w), g, padding, frozen)


@pytest.mark.parametrize("case", HALF_DQ_CASES + [(1, 32, 4, 5, 256, 1, 1, 0, "zeros", 1.0)],
                         ids=["dense", "depthwise", "chunks"])  # chunks: partials in memory
def test_bwd_tf32_products(monkeypatch, tf32_dots, case):
    check_bwd_tf32(monkeypatch, case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", HALF_GPU_CASES, ids=HALF_GPU_IDS)
def test_gpu_bwd_tf32_products(monkeypatch, case):
    check_bwd_tf32(monkeypatch, case)


def check_bwd_tf32(monkeypatch, case):
    """bfloat16 state and weights: the backward's gradient-only products with a computed
    operand take one TF32 product (_bwd_tf32, the _EX_BWD bit). Taken (the gradients move
    against FASTNCA_TRITON_NCA_BWD_TF32=0, the forward does not), and every gradient's error
    against float64 (Frobenius, relative) stays within 1.5x (+1e-3) of eager bfloat16's.
    Float16, and bfloat16 beside float32 weights, keep the hi + lo split."""
    state, grad_out, w, args, g, padding, frozen = bf16_rule_inputs(monkeypatch, case, seed=9)
    # one forward tile for both settings (EXACT is in the autotune key: a GPU could tune the
    # two compiles of the same forward code to different tiles, with another MMA order)
    monkeypatch.setenv("FASTNCA_TRITON_AUTOTUNE", "0")
    bwd = tri._EX_BWD.value
    assert tri._Rule(state, *w, g, padding, frozen).constexprs()["EXACT"] & bwd
    half_w = [t.half() if t.dim() > 1 else t for t in w]
    assert not tri._Rule(state.half(), *half_w, g, padding, frozen).constexprs()["EXACT"] & bwd
    assert not tri._Rule(state, w[0], w[1], w[2].float(), *w[3:], g, padding, frozen).constexprs()["EXACT"] & bwd
    out = tri.forward(state, *args)
    got = tri.backward(grad_out, state, *args)
    assert_within_eager_bf16(monkeypatch, got, grad_out, state, args)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TF32", "0")
    assert not tri._Rule(state, *w, g, padding, frozen).constexprs()["EXACT"] & bwd
    assert torch.equal(tri.forward(state, *args), out)
    split = tri.backward(grad_out, state, *args)
    assert any(not torch.equal(a, b) for a, b in zip(split, got) if a is not None)
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_TF32", "yes")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_BWD_TF32 must be 0 or 1"):
        tri._Rule(state, *w, g, padding, frozen).constexprs()


HALF_W_CASES = HALF_DQ_CASES + [(2, 16, 5, 6, 32, 2, 1, 0, "zeros", 0.5), (1, 16, 4, 5, 32, 1, 1, 1, "replicate", 1.0)]


@pytest.mark.parametrize("case,channels_last", [(HALF_W_CASES[0], False), (HALF_W_CASES[0], True),
                                                 (HALF_W_CASES[1], True), (HALF_W_CASES[2], True),
                                                 (HALF_W_CASES[3], False)],
                         ids=["dense-reflect", "dense-reflect-cl", "depthwise-cl", "dense-zeros-cl", "dense-replicate"])
def test_half_weight_copy(monkeypatch, tf32_dots, case, channels_last):
    check_half_weight_copy(monkeypatch, case, channels_last)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", HALF_GPU_CASES, ids=HALF_GPU_IDS)
def test_gpu_half_weight_copy(monkeypatch, case, channels_last):
    check_half_weight_copy(monkeypatch, case, channels_last)


def test_im2col_conv_only_for_contiguous_channels(monkeypatch, tf32_dots):
    """With the bfloat16 weight copy, a dense rule of one conv chunk runs the conv as an
    im2col dot (_conv_im2col) where the state's channels are contiguous (channels_last), in
    the forward and the backward's recompute; an NCHW state keeps the tap loop, whose
    gathers do not spill (the im2col gather is a scalar load an element there). The two
    layouts agree to the bfloat16 dots' rounding of the conv's sums."""
    state, grad_out, w, args, *_ = bf16_rule_inputs(monkeypatch, (2, 8, 5, 6, 16, 2, 1, 1, "reflect", 0.5), seed=12)
    calls = []
    real = tri._conv_im2col

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tri, "_conv_im2col", counted)
    got = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        x, g = state.contiguous(memory_format=layout), grad_out.contiguous(memory_format=layout)
        calls.clear()
        out = tri.forward(x, *args)
        n_fwd = len(calls)
        got[layout] = (out, *tri.backward(g, x, *args))
        assert (n_fwd, len(calls) - n_fwd) == ((1, 1) if layout == torch.channels_last else (0, 0)), layout
    for name, a, b in zip(("out",) + GRAD_NAMES, got[torch.contiguous_format], got[torch.channels_last]):
        if a is not None:
            assert fro_err(b.float(), a.float()) < 2e-2, name


def check_half_weight_copy(monkeypatch, case, channels_last=False):
    """The bfloat16 dots read their weights from a bfloat16 copy of the arranged weights
    (the same values; the default, FASTNCA_TRITON_NCA_HALF_WEIGHTS=0 turns it off), and
    dense rules of one conv chunk run the conv as an im2col dot. The forward and every
    gradient keep the accuracy of the float32 copy's (within 1.5x + 1e-3 of its Frobenius
    error against float64; the conv sums in another order); the kernels do read the copy
    (a zeroed copy changes the results). Taken only with bfloat16 state and weight
    matrices, and bfloat16 dots on; the im2col conv with a channels_last state only."""
    state, grad_out, w, args, g, padding, frozen = bf16_rule_inputs(monkeypatch, case, seed=10)
    if channels_last:
        state, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (state, grad_out))

    def run(rule=None):
        return (tri.forward(state, *args, prepared=rule), *tri.backward(grad_out, state, *args, prepared=rule))

    monkeypatch.setenv("FASTNCA_TRITON_NCA_HALF_WEIGHTS", "0")
    assert not tri._Rule(state, *w, g, padding, frozen).HALF_W
    base = run()
    monkeypatch.delenv("FASTNCA_TRITON_NCA_HALF_WEIGHTS")  # the default
    prepared = tri.prepare(state, *w, g, padding, frozen)
    rule = prepared.value
    assert rule.HALF_W and torch.equal(rule.weights()[7], torch.cat(rule.weights()[:7]).bfloat16())
    assert not tri._Rule(state, w[0], w[1], w[2].float(), *w[3:], g, padding, frozen).HALF_W
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BF16_DOTS", "0")
    assert not tri._Rule(state, *w, g, padding, frozen).HALF_W
    monkeypatch.delenv("FASTNCA_TRITON_NCA_BF16_DOTS")
    monkeypatch.setenv("FASTNCA_TRITON_NCA_HALF_WEIGHTS", "1")
    assert tri._Rule(state, *w, g, padding, frozen).HALF_W
    d = [t.double() for t in (state, grad_out, *w)]
    want = (ref.forward(d[0], *d[2:], *args[6:]), *ref.backward(d[1], d[0], *d[2:], *args[6:]))
    for name, got, b, a in zip(("out",) + GRAD_NAMES, run(), base, want):
        if a is None or a.abs().max() == 0:
            continue
        assert fro_err(got, a) <= 1.5 * fro_err(b, a) + 1e-3, f"{name}: {fro_err(got, a):.2e} vs {fro_err(b, a):.2e}"
    rule.weights()[7].zero_()  # the copy is what the bfloat16 dots read
    assert not torch.equal(run(prepared)[0], base[0])
    monkeypatch.setenv("FASTNCA_TRITON_NCA_HALF_WEIGHTS", "yes")
    with pytest.raises(ValueError, match="FASTNCA_TRITON_NCA_HALF_WEIGHTS must be 0 or 1"):
        tri._Rule(state, *w, g, padding, frozen)


HCHUNK_FORWARD_TILES = ["autotune", "32,4", "64,4", "128,8", "64,4,1,168"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("tile", HCHUNK_FORWARD_TILES)
@pytest.mark.parametrize("hc", ["16", "32", "64"])
def test_gpu_forward_hidden_chunks(monkeypatch, tile, hc):
    """The forward in hidden chunks (FASTNCA_TRITON_NCA_FWD_HCHUNK, opt-in) at the tiles its
    autotuner tries, the register-capped candidate too (kept for this forward only), on the
    Med-NCA rule in bfloat16 (channels_last, the benchmark's layout) and float32 (NCHW),
    over every cell and over the listed firing cells, and on a depthwise rule: against the
    reference at the dtype's tolerance."""
    monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_HCHUNK", hc)
    if tile != "autotune":
        monkeypatch.setenv("FASTNCA_TRITON_NCA_FWD_TILE", tile)
    medNCA = (2, 32, 40, 48, 128, 2, 1, 1, "reflect", 0.5)
    for compact in (False, True):
        monkeypatch.setattr(tri, "_COMPACT_FORWARD_CELLS", 1 if compact else 1 << 40)
        check_against_reference(medNCA, torch.bfloat16, torch.bfloat16, channels_last=True, grads=False)
        check_against_reference(medNCA, grads=False)
        check_against_reference((2, 16, 33, 20, 64, 2, "C", 0, "zeros", 0.5), torch.bfloat16, grads=False)



@pytest.mark.parametrize("listed", [False, True], ids=["every-cell", "listed"])
def test_backward_walk_by_state_size(monkeypatch, listed):
    """A state below _COMPACT_BACKWARD_CELLS takes the every-cell walk: no mask, list or
    zero-fill launches (the cell kernel draws the mask and writes every row); one of that
    many cells, the listed walk. The gradients of the two agree (fp32 summation order
    aside)."""
    state, grad_out, *w = make_inputs(2, 3, 5, 4, 6, 2, 1, 1, seed=8)
    args = (grad_out, state, *w, 1, "replicate", 0.5, 5, 3, 1)
    calls = []
    for name in ("_fire_mask", "_firing_cells"):
        monkeypatch.setattr(tri, name, (lambda f, n: lambda *a: calls.append(n) or f(*a))(getattr(tri, name), name))
    zero = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda t: calls.append("zero_") or zero(t))
    monkeypatch.setattr(tri, "_COMPACT_BACKWARD_CELLS", 40 if listed else 41)  # the state's 40 cells
    got = tri.backward(*args)
    assert calls == (["_fire_mask", "_firing_cells", "zero_"] if listed else [])
    monkeypatch.setattr(tri, "_COMPACT_BACKWARD_CELLS", 41 if listed else 40)
    for name, a, b in zip(GRAD_NAMES, got, tri.backward(*args)):
        assert rel_err(a, b) <= 1e-6, name


@pytest.mark.parametrize("acc", ["", "memory", "mixed", "gemm", "chunked", "gemm-plain", "gemm-plain-chunks"])
def test_idle_cells_enter_no_gradient(monkeypatch, walk, acc):
    """A NaN or inf that only idle cells read (the cell and its 8 neighbours do not fire)
    leaves every gradient bitwise as a finite value there gives, in every cell kernel and
    in both walks: the every-cell walk recomputes idle cells too, and keeps their
    activations (and their shifted state in the conv-gradient kernel) out of every product.
    gemm-plain: =gemm in the other cell kernel (REG_ACC 3, as half states on a GPU), its
    conv tile kept; -chunks: on a rule of several conv chunks, recomputed per chunk."""
    C, hidden, F = 4, 16, 2
    if acc.startswith("gemm-plain"):
        monkeypatch.setattr(tri, "_takes_hidden_chunks", lambda *a, **k: False)
        if acc.endswith("chunks"):
            monkeypatch.setattr(tri, "_DOT_TILE", 256)  # conv chunks of 8 of the 72 outputs
            C, hidden, F = 24, 16, 3
        acc = "gemm"
    monkeypatch.setenv("FASTNCA_TRITON_NCA_BWD_ACC", acc)
    H, W, p, seed, step = 9, 11, 0.2, 5, 2
    _, y, x_ = isolated_idle_cell(H, W, p, seed, step, "reflect")
    state, grad_out, *w = make_inputs(1, C, H, W, hidden, F, 1, 1, seed=6)
    grads = []
    for value in (0.25, float("nan"), float("inf")):
        x = state.clone()
        x[0, :, y, x_] = value
        grads.append(tri.backward(grad_out, x, *w, 1, "reflect", p, seed, step, 1))
    for other in grads[1:]:
        for name, a, b in zip(GRAD_NAMES, grads[0], other):
            assert torch.equal(a, b), name


def test_rollout_backward_plans_once(monkeypatch):
    """nca_rollout's backward makes one plan (tiles, workspaces) for all its steps, also where
    autograd hands it an expanded gradient (out.sum(): strides 0) and its later steps a
    dense one; a backward without a prepared rule keeps no plan in its sink."""
    made = []
    init = tri._BackwardPlan.__init__
    monkeypatch.setattr(tri._BackwardPlan, "__init__", lambda self, *a: (made.append(a[1].stride()), init(self, *a))[1])
    state, _, *w = make_inputs(2, 4, 6, 5, 8, 2, 1, 1)
    params = [t.clone().requires_grad_(True) for t in (state, *w)]
    out = fastnca.nca_rollout(*params, steps=6, checkpoint_every=3, seed=3, frozen_channels=1, backend="triton")
    torch.autograd.grad(out.sum(), params)
    assert len(made) == 1, made
    sink = tri.GradSink()
    for step in range(2):
        tri.backward(torch.randn_like(state), state, *w, 1, "reflect", 0.5, 3, step, 1, sink=sink)
    assert not sink._plans
