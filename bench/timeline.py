#!/usr/bin/env python
"""Where a step's GPU idle time goes: a profiler trace's gaps between kernels, charged to the
host work that ran during them.

A host-bound step (Gemma 3, Qwen3-VL at 4 samples: the GPU idle for a quarter to a third of the
step) is not explained by a table of ops' total CPU time: what counts is which host work the GPU
waited on. From a Chrome trace of `torch.profiler` (`prof.export_chrome_trace`):

- the GPU's busy time is the union of its kernels, copies and memsets over every stream; an
  idle interval is a gap in that union of at least `min_gap_us`;
- every CPU-side event (op, runtime call, Python function with `with_stack=True`, region) has a
  self interval: its span minus its children's on the same thread;
- each gap is charged to the self intervals running during it on the host thread that launched
  the device event ending it (the training loop's thread in the forward, the autograd engine's
  in the backward): the innermost event (`by_event`), its outermost ancestor that is not a
  Python frame (`by_region`: a top-level op, a compiled region, the optimizer step), and, in a
  trace taken `with_stack=True`, its innermost `nn.Module: ...` frame (`by_module`) and Python
  function (`by_function`); idle time no event covers is "(no event)";
- idle time under a host-device synchronisation (`cudaStreamSynchronize`,
  `cudaDeviceSynchronize`, `cudaMemcpy` without Async, `cudaEventSynchronize`) is the GPU
  catching up after the host waited: counted apart (`sync_us`).

    python bench/timeline.py trace.json [--min-gap-us 5] [--top 25]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",  # the synchronous one (cudaMemcpyAsync is not a sync)
)


def idle_intervals(trace: dict, min_gap_us: float = 5.0) -> tuple[list, float, float]:
    """(gaps, busy microseconds, span microseconds) of the device events of `trace`, between the
    first one's start and the last one's end; a gap is (start, end, the device event that ends
    it)."""
    device = sorted(
        (
            (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e)
            for e in trace["traceEvents"]
            if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
        ),
        key=lambda t: t[0],
    )
    if not device:
        return [], 0.0, 0.0
    gaps = []
    busy = 0.0
    cur_s, cur_e = device[0][0], device[0][1]
    for s, e, ev in device[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= min_gap_us:
                gaps.append((cur_e, s, ev))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return gaps, busy, cur_e - device[0][0]


def self_intervals(events: list[dict]) -> list[tuple[float, float, str, tuple]]:
    """(start, end, name, path) of every event's self time: its span minus its children's.
    `events` are one thread's complete events; a child is an event inside another's span (the
    profiler's nesting); `path` is ((name, category), ...) of its ancestors, outermost first,
    itself last."""
    events = sorted(events, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
    out: list[tuple[float, float, str, tuple]] = []
    stack: list[list] = []  # [end, name, cursor, path]

    def close_until(t: float) -> None:
        while stack and stack[-1][0] <= t:
            end, name, cursor, path = stack.pop()
            if end > cursor:
                out.append((cursor, end, name, path))
            if stack:
                stack[-1][2] = max(stack[-1][2], end)

    for e in events:
        s, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))
        close_until(s)
        path: tuple = ((e["name"], e.get("cat")),)
        if stack:
            parent = stack[-1]
            if s > parent[2]:
                out.append((parent[2], s, parent[1], parent[3]))
            parent[2] = max(parent[2], s)
            end = min(end, parent[0])
            path = parent[3] + path
        stack.append([end, e["name"], s, path])
    close_until(float("inf"))
    return sorted(out)


def attribution(path: tuple) -> tuple[str, str | None, str | None]:
    """(region, module, function) of a self interval's `path`: its outermost event that is not
    a Python frame (a top-level op, a compiled region, an optimizer step; "(Python)" when only
    Python frames hold it), and with `with_stack` the innermost `nn.Module: ...` frame and the
    innermost Python function."""
    region = next((n for n, c in path if c != "python_function"), "(Python)")
    module = next((n for n, _ in reversed(path) if n.startswith("nn.Module: ")), None)
    function = next(
        (n for n, c in reversed(path) if c == "python_function" and not n.startswith("nn.Module")),
        None,
    )
    return region, module, function


def _is_sync(name: str) -> bool:
    return name.startswith(SYNC_CALLS) and not name.startswith("cudaMemcpyAsync")


def charge_idle(trace: dict, min_gap_us: float = 5.0) -> dict:
    """The GPU's idle time of `trace`, charged to the host work that ran during each gap on the
    thread that launched the device event ending it (the training loop's thread in the forward,
    the autograd engine's in the backward). Returns {busy_us, span_us, idle_us, gaps, sync_us,
    by_event, by_region, by_module, by_function, by_thread} (microseconds; name -> idle
    microseconds, largest first; by_module / by_function need a trace taken with_stack)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "ts" in e]
    gaps, busy, span = idle_intervals(trace, min_gap_us)
    host = [e for e in events if e.get("cat") not in DEVICE_CATEGORIES]
    launcher = {}  # correlation id -> the host thread that launched it
    for e in host:
        corr = (e.get("args") or {}).get("correlation")
        if corr is not None and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            launcher[corr] = (e.get("pid"), e.get("tid"))
    threads: dict = defaultdict(list)
    for e in host:
        threads[(e.get("pid"), e.get("tid"))].append(e)
    busiest = max(threads, key=lambda t: len(threads[t])) if threads else None
    selfs: dict = {}
    cursor: dict = {}
    by_event: dict[str, float] = defaultdict(float)
    by_region: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = defaultdict(float)
    by_function: dict[str, float] = defaultdict(float)
    by_thread: dict[str, float] = defaultdict(float)
    sync = 0.0
    for gs, ge, next_event in gaps:
        thread = launcher.get((next_event.get("args") or {}).get("correlation"), busiest)
        if thread not in selfs:
            selfs[thread] = self_intervals(threads.get(thread, []))
            cursor[thread] = 0
        by_thread[f"{thread[0]}/{thread[1]}" if thread else "?"] += ge - gs
        covered = 0.0
        # one thread's self intervals tile its time in order, and the gaps come in order: a
        # cursor per thread, so a whole step's trace takes one pass
        mine, i = selfs[thread], cursor[thread]
        while i < len(mine) and mine[i][1] <= gs:
            i += 1
        cursor[thread] = i
        for j in range(i, len(mine)):
            s, e, name, path = mine[j]
            if s >= ge:
                break
            overlap = min(e, ge) - max(s, gs)
            covered += overlap
            by_event[name] += overlap
            region, module, function = attribution(path)
            by_region[region] += overlap
            if module is not None:
                by_module[module] += overlap
            if function is not None:
                by_function[function] += overlap
            if _is_sync(name):
                sync += overlap
        if ge - gs > covered:
            by_event["(no event)"] += ge - gs - covered
            by_region["(no event)"] += ge - gs - covered
    idle = sum(ge - gs for gs, ge, _ in gaps)

    def ranked(d):
        return dict(sorted(d.items(), key=lambda kv: -kv[1]))

    return {
        "busy_us": busy,
        "span_us": span,
        "idle_us": idle,
        "gaps": len(gaps),
        "sync_us": sync,
        "by_event": ranked(by_event),
        "by_region": ranked(by_region),
        "by_module": ranked(by_module),
        "by_function": ranked(by_function),
        "by_thread": ranked(by_thread),
    }


def report(result: dict, top: int = 25) -> list[str]:
    """The lines `bench_train.py --profile` appends to its tables."""
    span = max(result["span_us"], 1e-9)
    lines = [
        f"GPU idle between its first and last kernel: {result['idle_us'] / 1e3:.1f} ms of "
        f"{span / 1e3:.1f} ({100 * result['idle_us'] / span:.0f}%) in {result['gaps']} gaps; "
        f"under host-device syncs {result['sync_us'] / 1e3:.1f} ms",
        "",
        "GPU idle time by the host work running meanwhile (ms; innermost event):",
    ]
    for name, us in list(result["by_event"].items())[:top]:
        lines.append(f"  {us / 1e3:8.2f}  {name[:140]}")
    for key, title in (
        ("by_region", "outermost op or region"),
        ("by_module", "innermost module (with_stack)"),
        ("by_function", "innermost Python function (with_stack)"),
    ):
        if result[key] or key == "by_region":
            lines += ["", f"GPU idle time by {title} (ms):"]
            for name, us in list(result[key].items())[:top]:
                lines.append(f"  {us / 1e3:8.2f}  {name[:140]}")
    lines += ["", "GPU idle time by the launching host thread (ms, pid/tid):"]
    for name, us in result["by_thread"].items():
        lines.append(f"  {us / 1e3:8.2f}  {name}")
    return lines


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", help="a Chrome trace of torch.profiler (.json or .json.gz)")
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    print("\n".join(report(charge_idle(load(a.trace), a.min_gap_us), a.top)))


if __name__ == "__main__":
    main()
