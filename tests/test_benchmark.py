"""Benchmark helpers that do not need a GPU: the largest-size-within-a-memory-budget search."""
import pytest
import torch

from fastnca.benchmark.common import largest_size_within


def quadratic(bytes_per_pixel, oom_above=None):
    """A fake peak-memory measure: memory of an s x s image, out of memory past ``oom_above``."""
    def measure(s):
        if oom_above is not None and s > oom_above:
            raise torch.cuda.OutOfMemoryError("fake")
        return bytes_per_pixel * s * s
    return measure


@pytest.mark.parametrize("start", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("bytes_per_pixel", [1.0, 100.0, 3000.0, 50_000.0])
def test_largest_size_within_budget(start, bytes_per_pixel):
    budget = 8 * 2**30
    best, probes = largest_size_within(quadratic(bytes_per_pixel), budget, start=start, multiple=32, limit=16384)
    # the largest multiple of 32 whose s^2 * bytes_per_pixel fits (or the limit)
    expected = min(16384, int((budget / bytes_per_pixel) ** 0.5) // 32 * 32)
    assert best == expected
    assert probes[best] <= budget and all(b > budget for s, b in probes.items() if s > best)
    assert len(probes) <= 2 * 10  # doubling plus bisection: logarithmic in limit / multiple


def test_out_of_memory_does_not_fit():
    best, probes = largest_size_within(quadratic(1.0, oom_above=700), 2**40, start=256, multiple=32, limit=16384)
    assert best == 672
    assert probes[1024] is None and probes[704] is None and probes[672] == 672**2


def test_nothing_fits():
    best, probes = largest_size_within(quadratic(1e9), 2**30, start=256, multiple=32, limit=4096)
    assert best is None and min(probes) == 32


def test_rejects_start_off_grid():
    with pytest.raises(ValueError, match="multiple of 32"):
        largest_size_within(quadratic(1.0), 1.0, start=100, multiple=32, limit=1024)


def test_throughput_fractions_of_each_roof():
    from fastnca.benchmark.nca_step import _throughput

    roofs = {"matmul_float32_gflops": 100.0, "matmul_tf32_gflops": 400.0, "matmul_bfloat16_gflops": 800.0}
    t = _throughput(2e9, fwd_ms=40.0, train_ms=200.0, roofs=roofs, dname="float32")
    assert t["gflops_fwd"] == pytest.approx(50.0) and t["gflops_train"] == pytest.approx(40.0)
    assert t["roof_fraction_fwd"] == pytest.approx(0.5) and t["tf32_roof_fraction_train"] == pytest.approx(0.1)
    b = _throughput(2e9, 40.0, 200.0, roofs, "bfloat16")
    assert b["roof_fraction_train"] == pytest.approx(0.05) and "tf32_roof_fraction_train" not in b
    assert set(_throughput(2e9, 40.0, 200.0, {}, "float32")) == {"gflops_fwd", "gflops_train"}


def test_saved_mb_releases_the_graph():
    """Counting saved bytes must not keep the measured graph alive: relu saves its own
    output, and a pack hook returning that tensor makes a cycle the GC cannot free."""
    import weakref

    from fastnca.benchmark.common import saved_mb

    x = torch.randn(64, 64, requires_grad=True)
    kept = []

    def fwd():
        y = torch.relu(x @ x)
        kept.append(weakref.ref(y))
        return torch.relu(y @ x)

    assert saved_mb(fwd) > 0
    assert kept[0]() is None


def test_env_override_is_restored(monkeypatch):
    """The benchmarks' opt-in rows (and the variants script) set a knob only while they
    are measured; None unsets one for the block."""
    import os

    from fastnca.benchmark.common import env

    monkeypatch.setenv("FASTNCA_TRITON_NA_FORWARD", "window")
    with env(FASTNCA_TRITON_NA_FORWARD="halo"):
        assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "halo"
    assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "window"
    with env(FASTNCA_TRITON_NA_FORWARD=None):
        assert "FASTNCA_TRITON_NA_FORWARD" not in os.environ
    assert os.environ["FASTNCA_TRITON_NA_FORWARD"] == "window"
    monkeypatch.delenv("FASTNCA_TRITON_NA_FORWARD")
    with env(FASTNCA_TRITON_NA_FORWARD="halo"):
        pass
    assert "FASTNCA_TRITON_NA_FORWARD" not in os.environ
