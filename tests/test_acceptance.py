"""benchmarks/acceptance.py and acceptance_points.py: the issues' performance points, their
verdicts on synthetic records, and --smoke runs of the whole script on the CPU (it runs for real
only on a lent GPU)."""
import json

import pytest

from cases import benchmark_script
from normops import bench


@pytest.fixture(scope="module")
def acc():
    return benchmark_script("acceptance")


@pytest.fixture(scope="module")
def ap(acc):
    import acceptance_points  # importable once acceptance.py is loaded: it puts benchmarks/ on the path
    return acceptance_points


def test_points_name_real_cases(ap):
    pts = ap.points(["row_norm", "group_norm", "batch_norm"])
    assert {p.issue for p in pts} == {3, 4, 5, 17, 18, 19}
    assert [sum(p.issue == i for p in pts) for i in (3, 4, 5, 17, 18, 19)] == [7, 7, 5, 1, 1, 1]
    for case in ap.all_cases(pts):
        assert case.op in bench.OPS and case.pas in bench.PASSES and case.provider in bench.PROVIDERS
        assert case.layout in ap.LAYOUTS
    # the shapes of the issues' text
    cases = ap.all_cases(pts)
    assert ap.Case("group_norm", (1, 128, 8, 256, 256), "contiguous", "fwd+bwd", "torch") in cases
    assert ap.Case("batch_norm_eval", (256, 2048, 7, 7), "channels_last", "fwd") in cases
    assert ap.Case("rms_norm", (4096, 262144), "contiguous", "fwd") in cases
    assert ap.Case("gated_rms_norm_grouped", (4096, 65536), "contiguous", "bwd") in cases
    assert ap.Case("add_rms_norm_", (4096, 8192), "contiguous", "fwd") in cases  # forward only
    assert ap.Case("add_rms_norm_", (4096, 8192), "contiguous", "bwd") not in cases
    # #18: DiT-XL's adaLN-Zero step against diffusers' composition (the ops' torch provider), bf16
    assert ap.Case("ada_layer_norm_gate_residual", (8, 4096, 1152), "contiguous", "fwd+bwd", "torch",
                   "bfloat16") in cases
    assert not any(c.provider == "compile" for c in ap.all_cases(pts, compile_=False))


def _rec(ms, pct=50.0, gbps=1.0):
    return {"median_ms": ms, "pct_of_peak": pct, "gbps": gbps}


def test_verdicts(ap):
    c = ap.Case("layer_norm", (4096, 4096), "contiguous", "fwd+bwd")
    fused = ap.Case("add_rms_norm", (4096, 4096), "contiguous", "fwd")
    plain = ap.Case("rms_norm", (4096, 4096), "contiguous", "fwd")
    point = ap.Point(3, "speed", (ap.Check("speedup", c, 1.5, "torch"), ap.Check("pct", c, 70),
                                   ap.Check("per_byte", fused, 0.95, plain)))
    results = {c: _rec(1.0, pct=80), c.by("torch"): _rec(2.0), fused: _rec(1, gbps=0.97), plain: _rec(1, gbps=1.0)}
    assert ap.check_value(point.checks[0], results) == pytest.approx(2.0)
    assert ap.check_value(point.checks[2], results) == pytest.approx(0.97)
    status, worst, value, n = ap.verdict(point, results)
    assert (status, n) == ("PASS", 3) and worst is point.checks[2]  # 0.97 / 0.95 is the smallest margin
    results[c] = _rec(1.6, pct=80)  # 2.0 / 1.6 = 1.25x < 1.5x
    status, worst, value, _ = ap.verdict(point, results)
    assert status == "MISS" and worst is point.checks[0] and value == pytest.approx(1.25)
    del results[plain]
    results[c] = _rec(1.0, pct=80)
    assert ap.verdict(point, results)[0] == "INCOMPLETE"
    results[c.by("torch")] = {"error": "OutOfMemoryError"}  # a failed case: ERROR, unless a check misses
    assert ap.verdict(point, results)[0::3] == ("ERROR", 1)
    results[c] = _rec(1.0, pct=60)
    assert ap.verdict(point, results)[0] == "MISS"


def test_smoke_run(acc, ap, tmp_path):
    assert acc.main(["--smoke", "--no-compile", "--warm-jobs", "0", "--families", "group_norm,batch_norm",
                     "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "acceptance.jsonl").read_text().splitlines()
    env, records = json.loads(lines[0])["environment"], [json.loads(line) for line in lines[1:]]
    assert env["dtype"] == "float32" and env["copy_gbps"] > 0
    pts = ap.smoke_points(["group_norm", "batch_norm"])
    assert len(records) == len(ap.all_cases(pts, compile_=False))
    assert all("error" not in r and r["median_ms"] > 0 for r in records)
    table = (tmp_path / "acceptance.md").read_text()
    assert all(p.text in table for p in pts)
    summary = json.loads((tmp_path / "acceptance.json").read_text())
    assert [p["verdict"] for p in summary["points"]] and all(p["verdict"] in ("PASS", "MISS") for p in summary["points"])
    assert all(r["wall_ms"] > 0 and r["calls"] >= 1 for r in records)


@pytest.mark.parametrize("script, why", [("import sys; sys.exit(1)", "its pass exited 1"),
                                         ("import time; time.sleep(60)", "stalled: no record in 1 s")])
def test_timed_pass_goes_on_past_a_crash_or_a_hang(acc, ap, tmp_path, monkeypatch, script, why):
    """A timed pass that crashes or writes nothing for STALL_S is stopped, the case it was on gets
    an error record, and it starts again from the next case, at most 3 times."""
    monkeypatch.setattr(acc, "_base_command", lambda args: [acc.sys.executable, "-c", script])
    monkeypatch.setitem(acc.STALL_S, "normops,torch", 1.0)
    (tmp_path / "acceptance.jsonl").write_text("")
    args = acc._args(["--smoke", "--no-compile"])
    acc._timed_family(args, "batch_norm", "normops,torch", 1.0, str(tmp_path), acc.time.time() + 30)
    records = [json.loads(line) for line in (tmp_path / "acceptance.jsonl").read_text().splitlines()]
    first = [c for c in ap.all_cases(ap.smoke_points(["batch_norm"]), compile_=False)][:4]
    assert [acc._case_of(r) for r in records] == first and {r["error"] for r in records} == {why}
