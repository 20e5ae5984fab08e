"""``normops bench``: in-process through ``normops.cli.main`` on CPU, with --quick and two ops so the
whole file runs in seconds. Failures are made with ``monkeypatch`` on ``normops.bench.make_runner``
(the command looks it up on every case), so nothing leaks into other tests.
"""
import json
import math
import re
import sys

import pytest
import torch

from cases import argparse_rejects
from normops import bench, cli

QUICK = ["bench", "--quick", "--device", "cpu", "--op", "layer_norm", "--op", "group_norm"]
COLUMNS = ["op", "shape", "dtype", "pass", "normops ms", "torch.nn ms", "speedup", "GB/s", "% peak"]


def run(capsys, *args):
    code = cli.main([*QUICK, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(out):
    """(headers, [{header: cell}]) from the printed table; cells are separated by 2+ spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    headers = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("ms:"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(headers), line
        rows.append(dict(zip(headers, cells)))
    return headers, rows


def test_quick_prints_table(capsys):
    code, out, err = run(capsys)
    assert code == 0, out + err
    headers, rows = table(out)
    assert headers == COLUMNS
    assert [(r["op"], r["shape"], r["dtype"], r["pass"]) for r in rows] == [
        ("layer_norm", "256x512", "float32", "fwd+bwd"), ("group_norm", "2x64x16x16", "float32", "fwd+bwd")]
    for r in rows:
        ours, theirs, speedup = float(r["normops ms"]), float(r["torch.nn ms"]), float(r["speedup"])
        assert ours > 0 and theirs > 0 and float(r["GB/s"]) >= 0 and float(r["% peak"]) >= 0  # printed rounded: 0.0 under load
        assert speedup == pytest.approx(theirs / ours, rel=0.15, abs=0.02)  # ms are rounded to 3 decimals
    assert f"torch {torch.__version__}" in out and "copy bandwidth" in out
    assert "median of 5 calls" in out  # --quick's reps
    assert "2 cases, 0 with errors" in out
    assert "normops bench" in err  # the progress bar


def test_json_records(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "--pass", "fwd", "--pass", "bwd", "--reps", "6", "--json", str(path))
    assert code == 0, out + err
    assert f"wrote {path}" in out
    doc = json.loads(path.read_text())
    env = doc["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["backend"] == "torch"
    assert env["copy_bandwidth_gbps"] > 0 and env["date"] and env["normops"]
    assert doc["settings"] == {"device": "cpu", "providers": ["normops", "torch"], "warmup": 1, "reps": 6,
                               "quick": True}
    recs = doc["results"]
    assert [(r["op"], r["pass"]) for r in recs] == [("layer_norm", "fwd"), ("layer_norm", "bwd"),
                                                    ("group_norm", "fwd"), ("group_norm", "bwd")]
    for r in recs:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["dtype"] == "float32"
        op = bench.OPS[r["op"]]
        assert r["family"] == op.family
        assert r["bytes"] == bench.bytes_moved(op, tuple(r["shape"]), torch.float32, r["pass"])
        for p in ("normops", "torch"):
            t = r[p]
            assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
            assert t["gbps"] == pytest.approx(r["bytes"] / t["median_ms"] / 1e6)
            assert t["pct_of_peak"] == pytest.approx(100 * t["gbps"] / env["copy_bandwidth_gbps"])
        assert r["speedup"] == pytest.approx(r["torch"]["median_ms"] / r["normops"]["median_ms"])
        assert r["gbps"] == r["normops"]["gbps"] and r["pct_of_peak"] == r["normops"]["pct_of_peak"]
        assert "speedup_vs_compile" not in r and "compile" not in r


def test_compile_column(capsys, tmp_path, monkeypatch):
    """--compile adds a column and a JSON field; torch.compile itself is replaced by eager here
    (compiling takes seconds per case on CPU): this checks the plumbing, not inductor."""
    real = bench.make_runner

    def eager(op, shape, dtype, device, provider, pas):
        return real(op, shape, dtype, device, "torch" if provider == "compile" else provider, pas)

    monkeypatch.setattr(bench, "make_runner", eager)
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "--op", "layer_norm", "--compile", "--json", str(path))
    assert code == 0, out + err
    headers, rows = table(out)
    assert headers == COLUMNS[:6] + ["compile ms"] + COLUMNS[6:]
    assert all(float(r["compile ms"]) > 0 for r in rows)
    for r in json.loads(path.read_text())["results"]:
        assert r["speedup_vs_compile"] == pytest.approx(r["compile"]["median_ms"] / r["normops"]["median_ms"])


def test_plot_writes_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedup.png"
    code, out, err = run(capsys, "--plot", str(path))
    assert code == 0, out + err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in out


def test_plot_without_matplotlib_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    code, out, err = run(capsys, "--plot", str(tmp_path / "speedup.png"))
    assert code == 2
    assert "--plot needs matplotlib" in err and "pip install" in err
    assert out == ""  # refused before any case ran
    assert not (tmp_path / "speedup.png").exists()


def test_error_is_reported_and_run_continues(capsys, tmp_path, monkeypatch):
    real = bench.make_runner

    def oom_for_group_norm(op, shape, dtype, device, provider, pas):
        if op == "group_norm" and provider == "normops":
            raise RuntimeError("out of memory: tried to allocate 2.00 GiB\nsecond line")
        return real(op, shape, dtype, device, provider, pas)

    monkeypatch.setattr(bench, "make_runner", oom_for_group_norm)
    path = tmp_path / "bench.json"
    code, out, err = run(capsys, "--json", str(path))
    assert code == 1
    _, rows = table(out)
    ln, gn = rows
    assert ln["op"] == "layer_norm" and float(ln["normops ms"]) > 0 and float(ln["speedup"]) > 0
    assert gn["op"] == "group_norm" and gn["normops ms"] == "error"
    assert float(gn["torch.nn ms"]) > 0  # the other provider of the failed case still ran
    assert gn["speedup"] == gn["GB/s"] == gn["% peak"] == "-"
    assert "group_norm 2x64x16x16 float32 fwd+bwd normops: RuntimeError: out of memory" in out
    assert "second line" not in out
    assert "2 cases, 1 with errors" in out
    recs = {r["op"]: r for r in json.loads(path.read_text())["results"]}  # written despite the error
    assert recs["layer_norm"]["status"] == "ok"
    g = recs["group_norm"]
    assert g["status"] == "error" and g["normops"] == {"error": "RuntimeError: out of memory: tried to allocate 2.00 GiB"}
    assert g["torch"]["median_ms"] > 0 and g["speedup"] is None and g["gbps"] is None


def test_usage_errors(capsys, tmp_path):
    assert argparse_rejects(cli.main, ["bench", "--op", "no_such_norm"])
    assert argparse_rejects(cli.main, ["bench", "--pass", "sideways"])
    assert argparse_rejects(cli.main, ["bench", "--reps", "0"])
    assert cli.main([*QUICK, "--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "no such directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main([*QUICK, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_default_plan():
    """Without --quick: every op has shapes on CPU and CUDA; float32 / fwd+bwd / normops vs torch on CPU."""
    for device in ("cpu", "cuda"):
        for op in bench.OPS.values():
            shapes = bench.bench_shapes(op, torch.device(device), quick=False)
            assert shapes and all(math.prod(s) >= 1 << 20 for s in shapes), (device, op.name)
    args = cli.build_parser().parse_args(["bench", "--device", "cpu"])
    device, cases, providers = bench.plan_bench(args)
    assert device == torch.device("cpu") and providers == ["normops", "torch"]
    assert [c[0] for c in cases[:2]] == ["layer_norm", "layer_norm"]
    assert {c[0] for c in cases} == set(bench.OPS)
    forward_only = {name for name, op in bench.OPS.items() if op.forward_only}
    assert forward_only == {"add_rms_norm_", "rms_norm_quant", "rms_norm_quant_g128"}
    assert {(c[2], c[3]) for c in cases if c[0] not in forward_only} == {("float32", "fwd+bwd")}
    assert {c[3] for c in cases if c[0] in forward_only} == {"fwd"}  # in place, or inference: forward only
    assert ("layer_norm", (4096, 1024), "float32", "fwd+bwd") in cases
    assert ("batch_norm", (32, 64, 56, 56), "float32", "fwd+bwd") in cases
    assert bench.BENCH_DTYPE["cuda"] == "bfloat16"


def test_variants_quick(capsys):
    """The row-norm variants run through the command; the in-place one forward only (by default,
    and when other passes are asked too), and alone with only a backward asked: a usage error."""
    variants = ["--op", "rms_norm_gemma", "--op", "add_rms_norm_fp32_residual", "--op", "gated_rms_norm_grouped",
                "--op", "add_rms_norm_"]
    code = cli.main(["bench", "--quick", "--device", "cpu", "--reps", "1", *variants])
    out = capsys.readouterr().out
    assert code == 0, out
    _, rows = table(out)
    assert [(r["op"], r["pass"]) for r in rows] == [
        ("rms_norm_gemma", "fwd+bwd"), ("add_rms_norm_fp32_residual", "fwd+bwd"), ("gated_rms_norm_grouped", "fwd+bwd"),
        ("add_rms_norm_", "fwd")]
    assert all(float(r["normops ms"]) > 0 and float(r["torch.nn ms"]) > 0 for r in rows)
    code = cli.main(["bench", "--quick", "--device", "cpu", "--reps", "1", "--op", "add_rms_norm_", "--pass", "bwd"])
    assert code == 2 and "forward only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="forward only"):
        bench.bytes_moved(bench.OPS["add_rms_norm_"], (8, 8), torch.float32, "bwd")
