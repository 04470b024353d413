"""Interrupted and damaged training (README, Reliability): Ctrl-C and a killed parent become a
checkpoint, checkpoints are saved by time by default, a resume crosses bookkeeping changes but
not changes of what is learnt (and says why), damaged or non-finite checkpoints are passed over
for the newest one that verifies, a half-written log line and leftover temporary folders do not
block a resume, one trainer holds a work folder, and a full disk is named as such."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import StopAfter, train_config

import vlmflow.train as T
from vlmflow.config import resolve_sections
from vlmflow.data import to_table
from vlmflow.preempt import EXIT_PREEMPTED, Preempted, PreemptionHandler

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("single_thread")


def _raw(model, **train_over):
    return train_config(model, **{"cache_encoded": True, **train_over})


def _cfg(model, **train_over):
    return resolve_sections(_raw(model, **train_over), ["model", "lora", "train"])


@pytest.fixture
def rows(digits_rows):
    return [r for r in digits_rows if r["split"] == "train"][:40]


def _cli(model, data, tmp_path, *extra, **train_over):
    cfg = _raw(model, **train_over)
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", json.dumps(cfg)]
    cmd += ["--train", str(data), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    return [*cmd, "--threads", "1", *extra]


def _wait_for(path: Path, text: str, proc=None, timeout=300):
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert proc is None or proc.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text() if path.exists() else "no log"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ Ctrl-C
def test_sigint_is_a_stop_request_like_sigterm():
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        time.sleep(0.05)
        assert h.requested and h.signame == "SIGINT"


def test_ctrl_c_checkpoints_and_exits_75(tiny_qwen, digits_rows, tmp_path):
    """Ctrl-C: SIGINT to the whole foreground process group, batch workers included."""
    data = tmp_path / "train.parquet"
    pq.write_table(to_table([r for r in digits_rows if r["split"] == "train"]), data)
    cmd = _cli(tiny_qwen, data, tmp_path, max_steps=100000, cache_encoded=False)
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, "step 1/100000", proc)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == EXIT_PREEMPTED, text
    assert "SIGINT received: stopped after step" in text and "KeyboardInterrupt" not in text
    ckpt = sorted((tmp_path / "w").glob("checkpoint-*"))[-1]
    T.read_checkpoint(ckpt)  # complete and verified


# ------------------------------------------------------------------------------ orphaned trainer
def test_a_killed_parent_leaves_no_trainer_running(tiny_qwen, digits_rows, tmp_path):
    """kill -9 of the process that started the trainer (Snakemake): with --stop-with-parent (the
    train rule passes it) the trainer gets SIGTERM from the kernel, checkpoints and exits 75."""
    data = tmp_path / "train.parquet"
    pq.write_table(to_table([r for r in digits_rows if r["split"] == "train"]), data)
    cmd = _cli(tiny_qwen, data, tmp_path, "--stop-with-parent", max_steps=100000)
    log = tmp_path / "train.log"
    code = textwrap.dedent(
        """
        import ctypes, os, signal, subprocess, sys, time
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: adopt the orphan
        log, cmd = sys.argv[1], sys.argv[2:]
        starter = "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); " \\
            "print(p.pid, flush=True); time.sleep(3600)"
        with open(log, "w") as f:
            parent = subprocess.Popen([sys.executable, "-c", starter, *cmd],
                                      stdout=subprocess.PIPE, stderr=f, text=True)
        trainer = int(parent.stdout.readline())
        deadline = time.monotonic() + 300
        while "step 1/100000" not in open(log).read():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.2)
        parent.kill()  # kill -9 of the trainer's parent
        parent.wait()
        deadline = time.monotonic() + 120
        while True:
            pid, status = os.waitpid(trainer, os.WNOHANG)
            if pid:
                print("exit", os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(trainer, signal.SIGKILL)
                print("still running")
                break
            time.sleep(0.2)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(log), *cmd], capture_output=True, text=True, timeout=500
    )
    text = log.read_text()
    assert out.stdout.split() == ["exit", str(EXIT_PREEMPTED)], out.stdout + out.stderr + text
    assert "SIGTERM (its parent process" in text and "stopped after step" in text
    T.read_checkpoint(sorted((tmp_path / "w").glob("checkpoint-*"))[-1])


def test_a_second_trainer_on_the_same_work_folder_refuses_naming_the_first(
    tiny_qwen, rows, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from vlmflow.train import lock_work_dir;"
            "fd = lock_work_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(work),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(T.WorkDirBusy, match=f"another trainer \\(PID {holder.pid} on "):
            T.train(_cfg(tiny_qwen), rows, tmp_path / "out", work)
        assert not (tmp_path / "out").exists() and not list(work.glob("checkpoint-*"))
        # the CLI: one line and exit 1, before the model is loaded
        args = ["--config", json.dumps(_raw(tiny_qwen)), "--train", str(tmp_path / "none")]
        args += ["--out", str(tmp_path / "out"), "--work-dir", str(work)]
        pq.write_table(to_table(rows), tmp_path / "none")
        assert _train_cli(monkeypatch, *args) == 1
        assert f"error: another trainer (PID {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    fd = T.lock_work_dir(work)  # free again once the holder is gone
    assert (work / "trainer.lock").read_text().split()[0] == str(os.getpid())
    os.close(fd)


# --------------------------------------------------------------------------- periodic checkpoints
def test_checkpoints_every_save_minutes_by_default(tiny_qwen, rows, tmp_path):
    assert resolve_sections({}, ["train"])["train"]["save_minutes"] == 30
    T.train(_cfg(tiny_qwen, max_steps=3, save_minutes=1e-9), rows, tmp_path / "a", tmp_path / "w")
    names = sorted(p.name for p in (tmp_path / "w").glob("checkpoint-*"))
    assert names == ["checkpoint-00000001", "checkpoint-00000002"]  # none after the last step
    meta = json.loads((tmp_path / "w" / names[-1] / "meta.json").read_text())
    assert set(meta["files"]) == {"trainable.safetensors", "state.pt"} and meta["loss"] > 0
    T.train(_cfg(tiny_qwen, max_steps=3, save_minutes=0), rows, tmp_path / "b", tmp_path / "w0")
    assert not list((tmp_path / "w0").glob("checkpoint-*"))


# --------------------------------------------------------------------- what a resume may cross
def test_resume_crosses_bookkeeping_changes_but_not_learning_ones(
    tiny_qwen, rows, tmp_path, caplog
):
    with pytest.raises(Preempted):
        T.train(_cfg(tiny_qwen), rows, tmp_path / "out", tmp_path / "w", preempt=StopAfter(2))
    shutil.copytree(tmp_path / "w", tmp_path / "w2")

    # another learning rate: not resumed, and the log says why
    caplog.set_level(logging.INFO, logger="vlmflow")
    with pytest.raises(Preempted) as e:
        T.train(
            _cfg(tiny_qwen, learning_rate=1e-3),
            rows,
            tmp_path / "o",
            tmp_path / "w2",
            preempt=StopAfter(1),
        )
    assert e.value.step == 1  # started over
    # its first checkpoint replaced the stale one
    assert [p.name for p in (tmp_path / "w2").glob("checkpoint-*")] == ["checkpoint-00000001"]
    assert (
        "checkpoint-00000002 not resumed: made with other settings: train.learning_rate "
        "was 0.002, now 0.001" in caplog.text
    )

    bookkeeping = dict(logging_steps=3, save_steps=7, save_minutes=0, threads=3)
    res = T.train(
        _cfg(tiny_qwen, **bookkeeping, dataloader_workers=0), rows, tmp_path / "out", tmp_path / "w"
    )
    assert res.resumed_from == 2 and res.steps == 5


def test_replaced_base_weights_are_noticed(tiny_qwen, rows, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "base"
    shutil.copytree(tiny_qwen, model)
    with pytest.raises(Preempted):
        T.train(_cfg(str(model)), rows, tmp_path / "out", tmp_path / "w", preempt=StopAfter(1))
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})

    caplog.set_level(logging.INFO, logger="vlmflow")
    with pytest.raises(Preempted) as e:
        T.train(_cfg(str(model)), rows, tmp_path / "out", tmp_path / "w", preempt=StopAfter(1))
    assert e.value.step == 1  # not resumed from the checkpoint of step 1
    assert "the base model's files changed (model.safetensors)" in caplog.text


# ------------------------------------------------------------------------- damaged checkpoints
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_qwen, rows, tmp_path, caplog
):
    """The newest checkpoint's state.pt damaged, a half-written last log line and the leftover
    temporary folder of a save cut short by kill -9: the re-run resumes from the checkpoint
    before, names the one skipped, and finishes."""
    work = tmp_path / "w"
    cfg = _cfg(tiny_qwen, save_steps=1)
    with pytest.raises(Preempted):
        T.train(cfg, rows, tmp_path / "out", work, preempt=StopAfter(3))
    assert sorted(p.name for p in work.glob("checkpoint-*")) == [
        "checkpoint-00000002",
        "checkpoint-00000003",
    ]
    state = work / "checkpoint-00000003" / "state.pt"
    blob = bytearray(state.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    state.write_bytes(bytes(blob))
    with open(work / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # killed mid-line
    leftover = work / ".checkpoint-00000004.tmp-abc123"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"half")

    caplog.set_level(logging.INFO, logger="vlmflow")
    res = T.train(cfg, rows, tmp_path / "out", work)
    assert res.resumed_from == 2 and res.steps == 5
    assert "checkpoint-00000003 skipped: state.pt does not match the sha256" in caplog.text
    assert "dropped 1 unreadable line" in caplog.text
    assert [r["step"] for r in T.read_log(tmp_path / "out/train_log.jsonl")] == [1, 2, 3, 4, 5]
    assert not leftover.exists()


class _Tiny:
    """A trainable module, optimizer and scheduler: checkpoints without a VLM."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0)
        self.model(torch.ones(1, 3)).sum().backward()
        self.opt.step()

    def save(self, work, step, fp="fp", **kw):
        return T.save_checkpoint(work, step, self.model, self.opt, self.sched, fp, **kw)


def _rehash(ckpt: Path, **meta_over):
    """Make meta.json agree with the files again (the damage then is in the content only)."""
    from vlmflow.archive import sha256_file

    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {n: sha256_file(ckpt / n) for n in T.CHECKPOINT_FILES}
    meta.update(meta_over)
    (ckpt / "meta.json").write_text(json.dumps(meta))


class Unsafe:  # not among the globals torch.load(weights_only=True) allows
    pass


def test_checkpoints_that_cannot_be_trusted_are_passed_over(tmp_path, caplog):
    from safetensors.torch import save_file

    caplog.set_level(logging.INFO, logger="vlmflow")
    t = _Tiny()
    good = t.save(tmp_path, 1, loss=1.0)

    def damaged(how):
        ckpt = t.save(tmp_path, 2, loss=1.0)
        how(ckpt)
        found = T.latest_checkpoint(tmp_path, "fp", {})
        assert found is not None and found[0] == good and found[3] == 1
        return caplog.text

    def unpicklable(ckpt):  # verifies by hash, but weights_only refuses it
        torch.save({"x": Unsafe()}, ckpt / "state.pt")
        _rehash(ckpt)

    text = damaged(unpicklable)
    assert "checkpoint-00000002 skipped: state.pt cannot be read (UnpicklingError)" in text
    assert "weights_only" not in text  # torch's advice to load it unsafely is never repeated

    def nan_weights(ckpt):
        save_file(
            {"weight": torch.full((2, 3), float("nan")), "bias": torch.zeros(2)},
            ckpt / "trainable.safetensors",
        )
        _rehash(ckpt)

    assert "skipped: its weight weight is not finite" in damaged(nan_weights)
    assert "skipped: its loss is nan" in damaged(lambda c: _rehash(c, loss=float("nan")))
    assert "skipped: meta.json is missing or unreadable" in damaged(
        lambda c: (c / "meta.json").write_text('{"step": 2, "finger')
    )
    assert "skipped: trainable.safetensors is missing" in damaged(
        lambda c: (c / "trainable.safetensors").unlink()
    )

    # a checkpoint is never written from non-finite weights (it would replace a good one)
    with torch.no_grad():
        t.model.weight.fill_(float("inf"))
    with pytest.raises(T.NonFiniteLossError, match="not finite after step 3: not checkpointed"):
        t.save(tmp_path, 3, loss=1.0)
    assert not (tmp_path / "checkpoint-00000003").exists()


class FullDisk:
    """A file on a disk that fills up after 64 bytes (what the kernel then answers)."""

    def __init__(self, path):
        self.f, self.n = open(path, "wb"), 0  # noqa: SIM115 (closed by __exit__)

    def write(self, b):
        self.n += len(b)
        if self.n > 64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_named_and_the_last_good_checkpoint_kept(tmp_path, monkeypatch):
    t = _Tiny()
    good = t.save(tmp_path, 2, loss=1.0)
    monkeypatch.setattr(T, "_open_for_write", FullDisk)
    with pytest.raises(T.CheckpointWriteError) as e:
        t.save(tmp_path, 4, loss=1.0)
    assert str(e.value).startswith("no space left on device while writing the checkpoint of step")
    assert "the last good checkpoint checkpoint-00000002 is kept" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000002"]  # no .tmp-*
    T.read_checkpoint(good)


def _train_cli(monkeypatch, *args):
    """scripts/train.py's main, in this process; its exit code."""
    import runpy

    mod = runpy.run_path(str(ROOT / "scripts/train.py"), run_name="vlmflow_train_cli")
    monkeypatch.setattr(sys, "argv", ["train.py", *args, "--threads", "1"])
    with pytest.raises(SystemExit) as e:
        mod["run"](mod["main"])
    return e.value.code


def test_the_train_cli_stops_on_a_full_disk_with_exit_1(
    tiny_qwen, digits_rows, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "train.parquet"
    pq.write_table(to_table([r for r in digits_rows if r["split"] == "train"][:16]), data)
    real, opened = T._open_for_write, []

    def filling(path):  # the first checkpoint's two files fit, then the disk is full
        opened.append(path)
        return real(path) if len(opened) <= 2 else FullDisk(path)

    monkeypatch.setattr(T, "_open_for_write", filling)
    cfg = json.dumps(_raw(tiny_qwen, max_steps=4, save_steps=1))
    work = tmp_path / "w"
    args = ["--config", cfg, "--train", str(data), "--out", str(tmp_path / "o")]
    assert _train_cli(monkeypatch, *args, "--work-dir", str(work)) == 1
    err = capsys.readouterr().err
    assert "error: no space left on device while writing the checkpoint of step 2" in err
    assert "the last good checkpoint checkpoint-00000001 is kept" in err
    assert sorted(p.name for p in work.glob("*checkpoint-*")) == ["checkpoint-00000001"]
    T.read_checkpoint(work / "checkpoint-00000001")
    assert not (tmp_path / "o").exists()


def test_two_ranks_resume_rank_0s_choice(tiny_qwen, digits_rows, tmp_path):
    """Under torchrun rank 0 alone holds the lock, verifies and picks the checkpoint; both ranks
    resume from it. A completed run leaves its checkpoints: a re-run with the adapter removed
    resumes from it and ends with the same adapter. Tolerance: 1e-6 absolute (same
    ranks, same threads)."""
    from safetensors.torch import load_file

    from vlmflow.cluster import launch_prefix

    data = tmp_path / "train.parquet"
    pq.write_table(to_table([r for r in digits_rows if r["split"] == "train"][:32]), data)
    # resumed at step 2 of 4: the weights of step 4 depend on rank 1's own optimizer and
    # scheduler state at step 3 (not broadcast), so rank 1 must have resumed too
    cfg = json.dumps(_raw(tiny_qwen, max_steps=4, save_steps=2, per_device_train_batch_size=4))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def run(out):
        cmd = [str(bin_dir / "torchrun"), *launch_prefix(2).split()[1:]]
        cmd += [str(ROOT / "scripts/train.py"), "--config", cfg, "--train", str(data)]
        cmd += ["--out", str(out), "--work-dir", str(tmp_path / "w"), "--threads", "2"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-5000:]
        return json.loads((out / "train_summary.json").read_text())["resumed_from_step"]

    assert run(tmp_path / "a") == 0
    assert run(tmp_path / "b") == 2
    wa = load_file(tmp_path / "a/adapter_model.safetensors")
    wb = load_file(tmp_path / "b/adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
