"""bench/timeline.py: a step's GPU idle gaps charged to the host work that ran during them, on
the thread that launched the kernel each gap waited for."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from timeline import (  # noqa: E402
    attribution,
    charge_idle,
    idle_intervals,
    main,
    report,
    self_intervals,
)


def op(name, ts, dur, tid=1, cat="cpu_op", corr=None):
    e = {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "cat": cat}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def kernel(ts, dur, corr, stream=7):
    return {
        "ph": "X",
        "name": f"k{corr}",
        "ts": ts,
        "dur": dur,
        "pid": 0,
        "tid": stream,
        "cat": "kernel",
        "args": {"correlation": corr},
    }


def launch(ts, corr, tid=1):
    return op("cudaLaunchKernel", ts, 5, tid, "cuda_runtime", corr)


def py(name, ts, dur, tid=1):
    return op(name, ts, dur, tid, "python_function")


STEP, LAYER, MASK = "bench.py(9): step", "nn.Module: Layer_0", "masking.py(5): sdpa_mask"
# the training loop's thread (1, a trace taken with_stack): a step whose layer builds a mask in
# Python, a sync, small ops; the autograd engine's thread (2) launches the last kernel
TRACE = {
    "traceEvents": [
        py(STEP, 0, 1000),
        op("aten::mm", 0, 100),
        launch(90, 1),
        py(LAYER, 100, 300),
        py(MASK, 110, 290),
        op("aten::where", 200, 50),
        op("aten::mm", 400, 100),
        launch(490, 2),
        op("cudaStreamSynchronize", 500, 300, cat="cuda_runtime"),
        op("aten::add", 800, 50),
        launch(840, 3),
        op("autograd::engine", 900, 100, tid=2),
        launch(950, 4, tid=2),
        kernel(100, 50, 1),
        kernel(120, 10, 9, stream=8),  # overlapping streams: one busy span
        kernel(500, 20, 2),
        kernel(860, 10, 3),
        kernel(960, 30, 4),
        {"ph": "i", "name": "marker", "ts": 300, "pid": 7, "tid": 1},  # not a complete event
    ]
}


def test_idle_intervals_are_the_gaps_of_the_union_of_every_stream():
    gaps, busy, span = idle_intervals(TRACE)
    assert [(s, e) for s, e, _ in gaps] == [(150, 500), (520, 860), (870, 960)]
    assert busy == 50 + 20 + 10 + 30 and span == 890
    assert [ev["args"]["correlation"] for _, _, ev in gaps] == [2, 3, 4]
    assert [(s, e) for s, e, _ in idle_intervals(TRACE, min_gap_us=100)[0]] == [
        (150, 500),
        (520, 860),
    ]


def test_self_intervals_subtract_the_children():
    selfs = self_intervals(
        [e for e in TRACE["traceEvents"] if e.get("tid") == 1 and e["ph"] == "X"]
    )
    total = {}
    for s, e, name, _ in selfs:
        total[name] = total.get(name, 0) + e - s
    assert total == {
        STEP: 150,  # 850-1000: its children tile 0-850
        "aten::mm": 95 + 95,  # each less its launch
        "cudaLaunchKernel": 15,
        LAYER: 10,
        MASK: 240,
        "aten::where": 50,
        "cudaStreamSynchronize": 300,
        "aten::add": 45,
    }
    assert sum(e - s for s, e, _, _ in selfs) == 1000  # the thread's whole span, once
    paths = {name: path for _, _, name, path in selfs}
    assert paths["aten::where"] == (
        (STEP, "python_function"),
        (LAYER, "python_function"),
        (MASK, "python_function"),
        ("aten::where", "cpu_op"),
    )
    assert attribution(paths["aten::where"]) == ("aten::where", LAYER, MASK)
    assert attribution(paths[MASK]) == ("(Python)", LAYER, MASK)
    first_launch = next(path for s, _, name, path in selfs if s == 90)
    assert attribution(first_launch) == ("aten::mm", None, STEP)


def test_each_gap_is_charged_to_the_thread_that_launched_the_kernel_it_waited_for():
    r = charge_idle(TRACE)
    assert r["idle_us"] == 350 + 340 + 90 and r["gaps"] == 3
    ev = r["by_event"]
    assert ev[MASK] == pytest.approx(200)  # 150-200 and 250-400
    assert ev["aten::where"] == pytest.approx(50)
    assert ev["aten::mm"] == pytest.approx(95)  # 400-490 and 495-500
    assert ev["cudaStreamSynchronize"] == pytest.approx(280)  # 520-800
    assert ev["aten::add"] == pytest.approx(45)
    assert ev[STEP] == pytest.approx(10)  # 850-860: the step's own Python
    assert ev["autograd::engine"] == pytest.approx(55)  # thread 2: 900-950, 955-960
    assert ev["cudaLaunchKernel"] == pytest.approx(15)
    assert ev["(no event)"] == pytest.approx(30)  # 870-900: thread 2 had not started
    assert sum(ev.values()) == pytest.approx(r["idle_us"])
    assert list(ev)[0] == "cudaStreamSynchronize"  # largest first
    assert r["sync_us"] == pytest.approx(280)
    assert r["by_region"] == pytest.approx(
        {
            "cudaStreamSynchronize": 280,
            "(Python)": 210,  # the mask's Python and the step's
            "aten::mm": 100,  # with its launch
            "autograd::engine": 60,
            "aten::where": 50,
            "aten::add": 50,
            "(no event)": 30,
        }
    )
    assert r["by_module"] == pytest.approx({LAYER: 250})
    assert r["by_function"] == pytest.approx({STEP: 440, MASK: 250})
    assert r["by_thread"] == {"7/1": 690, "7/2": 90}
    lines = report(r)
    assert lines[0] == (
        "GPU idle between its first and last kernel: 0.8 ms of 0.9 (88%) in 3 gaps; "
        "under host-device syncs 0.3 ms"
    )
    assert any("cudaStreamSynchronize" in x for x in lines)


def test_a_trace_without_device_events_has_no_idle_time(tmp_path, capsys):
    cpu_only = {"traceEvents": [e for e in TRACE["traceEvents"] if e.get("cat") != "kernel"]}
    r = charge_idle(cpu_only)
    assert r["idle_us"] == 0 and r["gaps"] == 0 and r["by_event"] == {}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRACE))
    main([str(path)])
    assert "GPU idle" in capsys.readouterr().out


def test_bench_train_profile_appends_the_idle_tables_and_keeps_the_trace(tmp_path):
    import gzip

    import torch
    from bench_train import profile_step

    x = torch.randn(64, 64, requires_grad=True)
    out = tmp_path / "prof.txt"
    profile_step(lambda: (x @ x).sum().backward(), str(out), "a step", torch.device("cpu"))
    text = out.read_text()
    assert text.startswith("# a step") and "top ops by self CPU time" in text
    assert "GPU idle between its first and last kernel" in text  # none on the CPU: 0 gaps
    with gzip.open(f"{out}.trace.json.gz", "rt") as f:
        assert any(e.get("name") == "aten::mm" for e in json.load(f)["traceEvents"])
