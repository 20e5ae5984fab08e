"""benchmarks/acceptance.py: the issues' performance points, their verdicts on synthetic records,
and one --smoke run of the whole script on the CPU (it runs for real only on a lent GPU)."""
import json

import pytest

from cases import benchmark_script
from normops import bench


@pytest.fixture(scope="module")
def acc():
    return benchmark_script("acceptance")


def test_points_name_real_cases(acc):
    pts = acc.points(["row_norm", "group_norm", "batch_norm"])
    assert {p.issue for p in pts} == {3, 4, 5}
    assert [sum(p.issue == i for p in pts) for i in (3, 4, 5)] == [7, 7, 5]
    for case in acc.all_cases(pts):
        assert case.op in bench.OPS and case.pas in bench.PASSES and case.provider in bench.PROVIDERS
        assert case.layout in acc.LAYOUTS
    # the shapes of the issues' text
    cases = acc.all_cases(pts)
    assert acc.Case("group_norm", (1, 128, 8, 256, 256), "contiguous", "fwd+bwd", "torch") in cases
    assert acc.Case("batch_norm_eval", (256, 2048, 7, 7), "channels_last", "fwd") in cases
    assert acc.Case("rms_norm", (4096, 262144), "contiguous", "fwd") in cases
    assert not any(c.provider == "compile" for c in acc.all_cases(pts, compile_=False))


def _rec(ms, pct=50.0, gbps=1.0):
    return {"median_ms": ms, "pct_of_peak": pct, "gbps": gbps}


def test_verdicts(acc):
    c = acc.Case("layer_norm", (4096, 4096), "contiguous", "fwd+bwd")
    fused = acc.Case("add_rms_norm", (4096, 4096), "contiguous", "fwd")
    plain = acc.Case("rms_norm", (4096, 4096), "contiguous", "fwd")
    point = acc.Point(3, "speed", (acc.Check("speedup", c, 1.5, "torch"), acc.Check("pct", c, 70),
                                   acc.Check("per_byte", fused, 0.95, plain)))
    results = {c: _rec(1.0, pct=80), c.by("torch"): _rec(2.0), fused: _rec(1, gbps=0.97), plain: _rec(1, gbps=1.0)}
    assert acc.check_value(point.checks[0], results) == pytest.approx(2.0)
    assert acc.check_value(point.checks[2], results) == pytest.approx(0.97)
    status, worst, value, n = acc.verdict(point, results)
    assert (status, n) == ("PASS", 3) and worst is point.checks[2]  # 0.97 / 0.95 is the smallest margin
    results[c] = _rec(1.6, pct=80)  # 2.0 / 1.6 = 1.25x < 1.5x
    status, worst, value, _ = acc.verdict(point, results)
    assert status == "MISS" and worst is point.checks[0] and value == pytest.approx(1.25)
    del results[plain]
    results[c] = _rec(1.0, pct=80)
    assert acc.verdict(point, results)[0] == "INCOMPLETE"
    results[c.by("torch")] = {"error": "OutOfMemoryError"}  # an error is unmeasured, not a miss
    assert acc.verdict(point, results)[3] == 1


def test_smoke_run(acc, tmp_path):
    assert acc.main(["--smoke", "--no-compile", "--warm-jobs", "0", "--families", "group_norm,batch_norm",
                     "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "acceptance.jsonl").read_text().splitlines()
    env, records = json.loads(lines[0])["environment"], [json.loads(line) for line in lines[1:]]
    assert env["dtype"] == "float32" and env["copy_gbps"] > 0
    pts = acc.smoke_points(["group_norm", "batch_norm"])
    assert len(records) == len(acc.all_cases(pts, compile_=False))
    assert all("error" not in r and r["median_ms"] > 0 for r in records)
    table = (tmp_path / "acceptance.md").read_text()
    assert all(p.text in table for p in pts)
    summary = json.loads((tmp_path / "acceptance.json").read_text())
    assert [p["verdict"] for p in summary["points"]] and all(p["verdict"] in ("PASS", "MISS") for p in summary["points"])
