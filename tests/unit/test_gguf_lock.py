"""The llama.cpp cache is filled once when several processes ask for it at the same time (two
test workers, two jobs, or CI's build started ahead of the tests): the second waits on the
cache's lock and then finds the first one's tools."""

import threading
import time

import pytest

from vlmflow import gguf


def test_concurrent_builds_wait_for_the_first_and_build_once(tmp_path, monkeypatch):
    builds = []

    def slow_build(root, btype, out, threads):
        builds.append(threading.current_thread().name)
        time.sleep(0.5)  # long enough for the other caller to arrive meanwhile
        out.mkdir(parents=True)
        for t in gguf.BUILD_TARGETS:
            (out / t).write_text("tool")

    monkeypatch.setattr(gguf, "_build_tools", slow_build)
    got = {}

    def call(name):
        got[name] = gguf.llama_cpp_tools(tmp_path)

    threads = [threading.Thread(target=call, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=30)
    assert len(builds) == 1, builds  # the second caller found the first one's tools
    assert got["a"] == got["b"] and all((got["a"] / t).is_file() for t in gguf.BUILD_TARGETS)


def test_a_failed_build_releases_the_lock(tmp_path, monkeypatch):
    def failing_build(root, btype, out, threads):
        raise gguf.GGUFError("compiler exploded")

    monkeypatch.setattr(gguf, "_build_tools", failing_build)
    for _ in range(2):  # the second call is not stuck behind the first one's lock
        with pytest.raises(gguf.GGUFError, match="compiler exploded"):
            gguf.llama_cpp_tools(tmp_path)
