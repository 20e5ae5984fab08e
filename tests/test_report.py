"""benchmarks/report.py on a synthetic pytest-benchmark JSON: tables, speedups, plots, errors.

The medians are chosen so every number in report.md is known exactly: normops 1 ms; torch.nn 2 ms
(float32) or 8 ms (bfloat16), so the geometric-mean speedup over a table is sqrt(2 * 8) = 4.00;
torch.compile 1.5 ms (1.50); 2 MB moved in 1 ms = 2.0 GB/s, 20.0 % of a 10 GB/s copy bandwidth.
"""
import json
import pathlib
import sys

import pytest

from cases import benchmark_script

REPORT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
OPS = {"layer_norm": [(4096, 1024), (4096, 4096)], "group_norm+silu": [(8, 256, 32, 32), (8, 64, 64, 64)]}
MEDIAN_S = {"normops": 1e-3, "torch": 2e-3, "compile": 1.5e-3}
ENV = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.13.0", "triton": "3.6.0",
       "normops": "0.1.0", "python": "3.11.7", "date": "2026-11-25T10:00:00+00:00"}


@pytest.fixture(scope="module")
def report():
    return benchmark_script("report")


def record(op, shape, dtype, provider, pas):
    median = MEDIAN_S[provider] * (4 if provider == "torch" and dtype == "bfloat16" else 1)
    info = {"op": op, "shape": list(shape), "dtype": dtype, "provider": provider, "pass": pas,
            "bytes": 2_000_000, "gbps": 2e6 / median / 1e9, "peak_gbps": 10.0,
            "pct_of_peak": 100 * 2e6 / median / 1e9 / 10.0, **ENV}
    return {"name": f"test_{op}[{provider}-{pas}-{dtype}-{shape}]", "group": f"{op}-{pas}",
            "stats": {"median": median, "q1": 0.9 * median, "q3": 1.1 * median, "min": 0.8 * median},
            "extra_info": info}


def write_results(path, ops):
    benchmarks = [record(op, shape, dtype, provider, pas)
                  for op in ops for pas in ("fwd", "fwd+bwd") for shape in OPS[op]
                  for dtype in ("float32", "bfloat16") for provider in MEDIAN_S]
    # one case without torch.compile: its cells must read "—"
    benchmarks = [b for b in benchmarks if not (b["extra_info"]["op"] == "group_norm+silu" and b["extra_info"][
        "pass"] == "fwd+bwd" and b["extra_info"]["shape"] == [8, 64, 64, 64] and b["extra_info"]["dtype"] ==
        "bfloat16" and b["extra_info"]["provider"] == "compile")]
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {}, "benchmarks": benchmarks}))
    return path


@pytest.fixture
def results(tmp_path):
    """Two files, one op each, as two benchmark sessions would leave them."""
    return [str(write_results(tmp_path / "a.json", ["layer_norm"])),
            str(write_results(tmp_path / "b.json", ["group_norm+silu"]))]


def test_report_tables_and_speedups(report, results, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([*results, "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.13.0" in md and "triton 3.6.0" in md
    assert "2026-11-25" in md and "copy bandwidth: 10.0 GB/s" in md
    assert "| layer_norm | fwd | 4.00 (4) | 1.50 (4) |" in md
    assert "| group_norm+silu | fwd+bwd | 4.00 (4) | 1.50 (3) |" in md
    for op in OPS:
        for pas in ("fwd", "fwd+bwd"):
            assert f"## {op} — {pas}" in md
    assert "| 4096x1024 | float32 | 1.000 | 2.000 | 1.500 | 2.00 | 1.50 | 2.0 | 20.0 |" in md
    assert "| 4096x4096 | bfloat16 | 1.000 | 8.000 | 1.500 | 8.00 | 1.50 | 2.0 | 20.0 |" in md
    assert "| 8x64x64x64 | bfloat16 | 1.000 | 8.000 | — | 8.00 | — | 2.0 | 20.0 |" in md
    # the summary sits above the per-op tables
    assert md.index("## Summary") < md.index("## layer_norm")
    stdout = capsys.readouterr().out
    assert str(out / "report.md") in stdout and "| layer_norm | fwd | 4.00 (4) | 1.50 (4) |" in stdout


def test_plots_written_when_matplotlib_is_installed(report, results, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([*results, "--out", str(out)]) == 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in capsys.readouterr().out
        return
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["group_norm_silu-fwd.png", "group_norm_silu-fwd_bwd.png",
                     "layer_norm-fwd.png", "layer_norm-fwd_bwd.png"]
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_plots_skipped_with_a_note_without_matplotlib(report, results, tmp_path, capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    out = tmp_path / "out"
    assert report.main([*results, "--out", str(out)]) == 0
    assert "matplotlib is not installed; skipping plots" in capsys.readouterr().out
    assert (out / "report.md").exists() and not list(out.glob("*.png"))


def test_file_without_usable_records_exits_2(report, results, tmp_path, capsys):
    empty = tmp_path / "plain.json"  # a pytest-benchmark file from a suite that sets no extra_info
    empty.write_text(json.dumps({"benchmarks": [{"name": "t", "stats": {"median": 1e-3}, "extra_info": {}}]}))
    assert report.main([results[0], str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "plain.json" in err and "no usable benchmark records" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert report.main([str(broken)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_output_folder_is_device_and_date(report, results):
    records = report.load_records(results[0])
    out = report.default_out(records)
    assert out.name == "nvidia-h100-80gb-hbm3-2026-11-25"
    assert out.parent == REPORT.parent / "results"
