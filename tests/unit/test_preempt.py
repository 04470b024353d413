"""Preemption: a signal becomes a checkpoint at the next step and exit code 75; the next run
resumes and ends with the same adapter. CUDA OOM ends with the settings to lower."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import StopAfter, train_config

from vlmflow.config import resolve_sections
from vlmflow.data import to_table
from vlmflow.families import FAMILIES
from vlmflow.preempt import EXIT_PREEMPTED, Preempted, PreemptionHandler, oom_advice
from vlmflow.train import read_log, train

ROOT = Path(__file__).resolve().parents[2]


def test_handler_turns_signals_into_a_flag_and_restores_the_old_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert h.requested and h.signame == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        time.sleep(0.05)
        assert h.signame == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_preempted_run_checkpoints_and_the_rerun_matches_an_uninterrupted_one(
    tiny_qwen, digits_rows, tmp_path
):
    """Tolerance: per-step losses within 1e-6 relative, adapter weights within 1e-6 (same
    process, same threads: in practice bit-identical)."""
    rows = [r for r in digits_rows if r["split"] == "train"][:48]
    cfg = resolve_sections(train_config(tiny_qwen), ["model", "lora", "train"])
    train(cfg, rows, tmp_path / "ref", tmp_path / "ref_work")

    with pytest.raises(Preempted) as e:
        train(cfg, rows, tmp_path / "out", tmp_path / "work", preempt=StopAfter(2, "SIGUSR1"))
    assert e.value.step == 2 and e.value.total == 5
    assert "SIGUSR1 received: stopped after step 2/5" in str(e.value)
    assert e.value.checkpoint == tmp_path / "work" / "checkpoint-00000002"
    assert (e.value.checkpoint / "trainable.safetensors").exists()
    assert not (tmp_path / "out").exists()

    res = train(cfg, rows, tmp_path / "out", tmp_path / "work")
    assert res.resumed_from == 2
    ref, got = (
        read_log(tmp_path / "ref/train_log.jsonl"),
        read_log(tmp_path / "out/train_log.jsonl"),
    )
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "ref/adapter_model.safetensors")
    wb = load_file(tmp_path / "out/adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_a_signal_during_the_last_step_does_not_stop_the_run(tiny_qwen, digits_rows, tmp_path):
    rows = [r for r in digits_rows if r["split"] == "train"][:16]
    cfg = resolve_sections(train_config(tiny_qwen, max_steps=2), ["model", "lora", "train"])
    res = train(cfg, rows, tmp_path / "out", tmp_path / "work", preempt=StopAfter(99, "SIGUSR1"))
    assert res.steps == 2 and (tmp_path / "out/adapter_model.safetensors").exists()


def test_sigterm_to_the_train_cli_exits_75_with_a_checkpoint(tiny_qwen, digits_rows, tmp_path):
    """The real CLI and a real SIGTERM (what SLURM sends before the time limit)."""
    rows = [r for r in digits_rows if r["split"] == "train"]
    data = tmp_path / "train.parquet"
    pq.write_table(to_table(rows), data)
    cfg = train_config(tiny_qwen, max_steps=200, threads=1)
    log = tmp_path / "train.log"
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", json.dumps(cfg)]
    cmd += ["--train", str(data), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, "--threads", "1"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "step 1/200" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    text = log.read_text()
    assert rc == EXIT_PREEMPTED, text
    assert "SIGTERM received: stopped after step" in text
    ckpts = sorted((tmp_path / "w").glob("checkpoint-*"))
    assert ckpts, text
    step = json.loads((ckpts[-1] / "meta.json").read_text())["step"]
    assert 1 <= step < 200 and f"after step {step}/200" in text
    assert not (tmp_path / "out").exists()


def test_oom_advice_names_the_settings_with_next_values():
    cfg = resolve_sections(
        {
            "model": {"name": "x", "max_seq_length": 2048},
            "train": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "use_gradient_checkpointing": False,
            },
        },
        ["model", "train"],
    )
    msg = oom_advice(cfg, world_size=2)
    assert msg.startswith("CUDA ran out of memory")
    assert "train.per_device_train_batch_size: 4 -> 2" in msg
    assert "train.gradient_accumulation_steps: 2 -> 4 to keep the global batch of 16" in msg
    assert "model.max_pixels: unset" in msg
    assert "train.use_gradient_checkpointing: false -> true" in msg
    assert "model.load_in_4bit: false -> true" in msg
    assert "model.max_seq_length: 2048 -> 1024" in msg

    cfg["train"].update(per_device_train_batch_size=1, use_gradient_checkpointing=True)
    cfg["model"].update(max_pixels=802816, load_in_4bit=True)
    msg = oom_advice(cfg)
    assert "per_device_train_batch_size" not in msg  # nothing left to lower there
    assert "model.max_pixels: 802816 -> 401408" in msg
    assert "load_in_4bit" not in msg
    assert "use_gradient_checkpointing: true -> offload" in msg

    # the default, auto, offloads on a GPU where the family was measured with it for this base
    # (4-bit or 16-bit); otherwise (or the family unknown) it was plain checkpointing
    cfg["train"]["use_gradient_checkpointing"] = "auto"
    assert "use_gradient_checkpointing" not in oom_advice(cfg, family=FAMILIES["qwen2_vl"])
    assert "use_gradient_checkpointing" not in oom_advice(cfg, family=FAMILIES["gemma3"])
    assert "use_gradient_checkpointing: auto -> offload" in oom_advice(
        cfg, family=FAMILIES["mllama"]
    )
    assert "use_gradient_checkpointing: auto -> offload" in oom_advice(cfg)
    cfg["model"]["load_in_4bit"] = False
    assert "use_gradient_checkpointing" not in oom_advice(cfg, family=FAMILIES["qwen2_vl"])
    assert "use_gradient_checkpointing: auto -> offload" in oom_advice(
        cfg, family=FAMILIES["gemma3"]
    )


def test_train_cli_ends_an_oom_with_the_advice(
    tiny_qwen, digits_rows, tmp_path, monkeypatch, capsys
):
    import runpy

    data = tmp_path / "train.parquet"
    pq.write_table(to_table([r for r in digits_rows if r["split"] == "train"][:4]), data)
    mod = runpy.run_path(str(ROOT / "scripts/train.py"), run_name="vlmflow_train_cli")

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    mod["main"].__globals__["train"] = oom
    argv = ["train.py", "--config", json.dumps(train_config(tiny_qwen)), "--train", str(data)]
    argv += ["--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w"), "--threads", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        mod["run"](mod["main"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: CUDA ran out of memory" in err
    assert "train.per_device_train_batch_size: 8 -> 4" in err
