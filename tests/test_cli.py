"""The ``fastnca`` command: ``info`` and a quick ``bench`` writing its JSON."""
import json
import re
from pathlib import Path

import pytest
import torch

from fastnca.cli import main


def test_info(capsys):
    """One line per backend with its own status: 'available', or the reason it is not."""
    import fastnca

    assert main(["info"]) == 0
    lines = {ln.split()[0]: ln.split(None, 1)[1].strip() for ln in capsys.readouterr().out.splitlines()[1:] if ln.strip()}
    for name, status in fastnca.backends().items():
        assert lines[name] == ("available" if status is True else status), name


def test_version(capsys):
    """--version names fastnca's version (the one pyproject.toml builds, where that file is
    beside the tests) and torch's."""
    import fastnca

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastnca {fastnca.__version__} (torch {torch.__version__})"
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        assert re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1) == fastnca.__version__


def test_bench_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "nca", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] and "matmul_float32_gflops" in data["roofs"]
    impls = {(r["op"], r["impl"]) for r in data["results"] if r["fwd_ms"] and r["fwd_bwd_ms"]}
    assert ("nca_step", "pytorch") in impls and ("nca_rollout", "fastnca:reference") in impls
    assert "x = baseline / fastnca" in capsys.readouterr().out


def test_bench_impls_filter(tmp_path, capsys):
    """--impls runs only the named implementations, and each suite's baseline; --ops takes a
    comma list too; a name in --impls that ran nowhere is reported, not silently dropped."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "nca, attention",
                 "--impls", "fastnca:cpu,fastnca:nosuch", "--json", str(path)]) == 0
    impls = {(r["op"], r["impl"]) for r in json.loads(path.read_text())["results"]}
    assert {impl for _, impl in impls} == {"pytorch", "unfold (GeCA)", "fastnca:cpu"}, impls
    assert ("nca_step", "fastnca:cpu") in impls and ("neighborhood_attention", "fastnca:cpu") in impls
    out = capsys.readouterr().out
    assert "--impls fastnca:nosuch: no implementation of that name ran here" in out
    assert "--impls fastnca:cpu" not in out


def test_bench_writes_rows_as_it_goes(tmp_path, monkeypatch):
    """Before each new measurement the rows finished so far are written (marked partial),
    atomically: a run killed mid-suite keeps them. The last write is the complete file."""
    from fastnca.benchmark import common

    path = tmp_path / "bench.json"
    seen = []
    real = common.write_json

    def spy(p, env, roofs, results, args):
        real(p, env, roofs, results, args)
        data = json.loads(path.read_text())  # complete JSON after every write
        seen.append((len(data["results"]), bool(data["args"].get("partial"))))

    monkeypatch.setattr(common, "write_json", spy)
    assert main(["bench", "--quick", "--device", "cpu", "--ops", "nca", "--impls", "fastnca:cpu",
                 "--json", str(path)]) == 0
    partial = [n for n, p in seen if p]
    assert partial and partial == sorted(partial) and 0 < partial[0] < seen[-1][0], seen
    assert seen[-1][1] is False and [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_bench_measures_each_dtypes_own_roof(tmp_path, monkeypatch, capsys):
    """Each --dtype's matmul roof is measured in that dtype, and the suites and JSON get it
    under its own key (roof and suite stubbed: the CLI's own bookkeeping)."""
    from fastnca.benchmark import common, nca_step

    measured, handed = [], []
    monkeypatch.setattr(common, "matmul_roof_gflops", lambda device, dtype, n=None, tf32=False:
                        measured.append(dtype) or {torch.float32: 10.0, torch.bfloat16: 20.0}[dtype])
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda device: 5.0)
    monkeypatch.setattr(nca_step, "run", lambda device, dtype, quick, roofs, log=print: handed.append(dict(roofs)) or [])
    out = tmp_path / "r.json"
    assert main(["bench", "--device", "cpu", "--quick", "--ops", "nca", "--dtype", "float32", "--dtype", "bfloat16",
                 "--json", str(out)]) == 0
    assert measured == [torch.float32, torch.bfloat16]
    assert handed == [{"copy_gbs": 5.0, "matmul_float32_gflops": 10.0, "matmul_bfloat16_gflops": 20.0}] * 2
    assert json.loads(out.read_text())["roofs"] == handed[0]
