"""The closed-loop benchmark's --quick mode runs end to end (its own server, tuner, traffic, one cycle) and
writes its report. It asserts nothing about the numbers: those belong to the full run's results."""

from __future__ import annotations

import json
import subprocess
import sys


def test_quick_loop_writes_its_report(tmp_path, model_dir):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "benchmarks.loop", "--quick", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_path,) = out.glob("loop-*-quick.json")
    result = json.loads(result_path.read_text())
    assert [c["cycle"] for c in result["cycles"]] == [0, 1]
    run = result["cycles"][1]["run"]
    assert run["outcome"] in ("promoted", "rejected"), run  # it trained and was judged
    canary = result["cycles"][1]["canary"]
    assert (canary is not None) == (run["outcome"] == "promoted"), canary  # a pass first serves a canary
    if canary:
        assert len(canary["rounds"]) == 1 and canary["rounds"][0]["exchanges"] == result["config"]["canary_traffic"]
    for c in result["cycles"]:
        assert 0 <= c["measure"]["rated"] <= 1 and 0 <= c["measure"]["plain"] <= 1
    last = result["cycles"][1]  # an adapter serving at the end is measured with the base beside it, in one batch
    assert (last["base_beside"] is not None) == (last["serving"] != 0) == (result["headline"]["base_twice"] is not None)
    assert result["cycles"][1]["traffic"]["exchanges"] == result["config"]["traffic"]
    assert result_path.with_suffix(".png").stat().st_size > 10_000
    report = result_path.with_suffix(".md").read_text()
    assert "| cycle |" in report and "Rated types" in report
