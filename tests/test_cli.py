"""``normops check``: in-process through ``normops.cli.main``, and once through the console script.

Broken backends are made with ``monkeypatch`` on the backend module's functions (the library
looks them up on every call), so nothing leaks into other tests.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cases import argparse_rejects
from normops import cli
from normops.check import OP_NAMES
from normops.backends import numpy_backend

COLUMNS = ["op", "backend", "dtype", "max abs err", "tol", "gradcheck", "status"]


def rows(out):
    """{(op, backend, dtype): (gradcheck, status)} from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["op", "backend", "dtype"])
    table = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("err, tol"):
            break
        cells = line.split()
        assert len(cells) == 7, line
        table[tuple(cells[:3])] = (cells[5], cells[6])
    return table


def check(capsys, *args):
    code = cli.main(["check", *args])
    out = capsys.readouterr().out
    return code, out


def test_quick_subset_passes_and_prints_table(capsys):
    code, out = check(capsys, "--quick", "--op", "layer_norm", "--op", "batch_norm", "--backend", "torch")
    assert code == 0, out
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("op "))
    assert re.split(r"\s{2,}", lines[i].strip()) == COLUMNS
    status_at = lines[i].index("status")  # aligned: every row's status starts under the header's
    assert all(line[status_at:].strip() == "ok" for line in lines[i + 2:i + 8])
    table = rows(out)
    assert set(table) == {(op, "torch", dt) for op in ("layer_norm", "batch_norm:train", "batch_norm:eval")
                          for dt in ("float32", "float64")}
    assert all(status == "ok" for _, status in table.values())
    assert table[("layer_norm", "torch", "float64")][0] == "ok"  # gradcheck ran in fp64
    assert table[("layer_norm", "torch", "float32")][0] == "-"
    assert "6 passed, 0 failed" in out


def test_full_default_run(capsys):
    code, out = check(capsys)
    table = rows(out)
    ops = {op for op, _, _ in table}
    assert ops == set(OP_NAMES)
    assert {b for _, b, _ in table} >= {"torch", "numpy"}
    assert {dt for _, _, dt in table} == {"float32", "float64", "float16", "bfloat16"}
    failing = {key for key, (_, status) in table.items() if status != "ok"}
    assert not failing and code == 0, out
    assert f"{len(table)} passed, 0 failed" in out
    assert all(gc == "ok" for (_, _, dt), (gc, _) in table.items() if dt == "float64")
    assert all(gc == "-" for (_, _, dt), (gc, _) in table.items() if dt != "float64")


def test_wrong_output_is_a_failure(capsys, monkeypatch):
    real = numpy_backend.row_norm_fwd

    def off_by_a_bit(*args, **kwargs):
        y, h, mean, rstd = real(*args, **kwargs)
        return y * 1.01, h, mean, rstd

    monkeypatch.setattr(numpy_backend, "row_norm_fwd", off_by_a_bit)
    code, out = check(capsys, "--quick", "--op", "layer_norm", "--backend", "numpy", "--backend", "torch",
                      "--device", "cpu")  # the default is cuda where there is one; the message names the device
    assert code == 1
    table = rows(out)
    assert table[("layer_norm", "numpy", "float32")][1] == "FAIL"
    assert table[("layer_norm", "numpy", "float64")][1] == "FAIL"
    assert table[("layer_norm", "torch", "float32")][1] == "ok"  # only the broken backend fails
    assert "layer_norm numpy float32 cpu: y: max abs err" in out
    assert "2 passed, 2 failed" in out


def test_wrong_weight_gradient_is_a_failure(capsys, monkeypatch):
    real = numpy_backend.row_norm_bwd

    def bad_dweight(*args, **kwargs):
        dx, dw, *rest = real(*args, **kwargs)
        return dx, None if dw is None else dw * 1.01, *rest

    monkeypatch.setattr(numpy_backend, "row_norm_bwd", bad_dweight)
    code, out = check(capsys, "--quick", "--op", "rms_norm", "--backend", "numpy")
    assert code == 1
    table = rows(out)
    assert table[("rms_norm", "numpy", "float32")] == ("-", "FAIL")
    assert table[("rms_norm", "numpy", "float64")] == ("FAIL", "FAIL")  # gradcheck sees it too
    assert "dweight: max abs err" in out


def test_wrong_running_stats_are_a_failure(capsys, monkeypatch):
    real = numpy_backend.batch_norm_fwd

    def bad_batch_var(*args, **kwargs):
        y, mean, rstd, var = real(*args, **kwargs)
        return y, mean, rstd, None if var is None else var * 2

    monkeypatch.setattr(numpy_backend, "batch_norm_fwd", bad_batch_var)
    code, out = check(capsys, "--quick", "--op", "batch_norm:train", "--backend", "numpy")
    assert code == 1
    assert "running_var: max abs err" in out
    assert rows(out)[("batch_norm:train", "numpy", "float32")][1] == "FAIL"


def test_exception_is_reported_not_raised(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(numpy_backend, "group_norm_fwd", boom)
    code, out = check(capsys, "--quick", "--op", "group_norm", "--op", "instance_norm", "--backend", "numpy",
                      "--device", "cpu")
    assert code == 1
    table = rows(out)
    assert table[("group_norm", "numpy", "float32")][1] == "ERROR"
    assert table[("instance_norm", "numpy", "float64")] == ("FAIL", "ERROR")
    assert "group_norm numpy float32 cpu: RuntimeError: kernel exploded" in out
    assert "0 passed, 4 failed" in out


def test_usage_errors(capsys, monkeypatch):
    assert argparse_rejects(cli.main, ["check", "--op", "no_such_norm"])
    assert argparse_rejects(cli.main, ["check", "--dtype", "int8"])
    assert cli.main(["check", "--quick", "--dtype", "float16"]) == 2
    assert cli.main([]) == 2
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert cli.main(["check", "--backend", "triton"]) == 2
        assert "TRITON_INTERPRET=1" in capsys.readouterr().err
        assert cli.main(["check", "--device", "cuda"]) == 2


def test_dtype_aliases_and_families(capsys):
    code, out = check(capsys, "--dtype", "fp32", "--dtype", "float32", "--op", "batch_norm", "--backend", "numpy")
    assert code == 0, out
    assert set(rows(out)) == {("batch_norm:train", "numpy", "float32"), ("batch_norm:eval", "numpy", "float32")}


def test_console_script():
    script = Path(sys.executable).with_name("normops")
    exe = str(script) if script.exists() else shutil.which("normops")
    assert exe, "the `normops` console script is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([exe, "check", "--quick"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "op " in proc.stdout and " 0 failed" in proc.stdout
    assert "normops check" in proc.stderr  # the progress bar
