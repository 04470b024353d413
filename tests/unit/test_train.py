import json

import pytest
import torch

from vlmflow.config import resolve_sections
from vlmflow.train import read_log, sample_indices, train

pytestmark = pytest.mark.usefixtures("single_thread")


def config(model, **train):
    base = {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 8,
        "learning_rate": 2e-3,
        "warmup_steps": 1,
        "optim": "adamw_torch",
        "use_gradient_checkpointing": False,
        "cache_encoded": True,
        "seed": 1,
    }
    base.update(train)
    return resolve_sections(
        {
            "model": {"name": model, "max_seq_length": 256},
            "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head", "projector"]},
            "train": base,
        },
        ["model", "lora", "train"],
    )


def test_data_order_is_a_pure_function_of_step():
    a = [sample_indices(10, 0, s, m, 2, 3) for s in range(5) for m in range(2)]
    b = [sample_indices(10, 0, s, m, 2, 3) for s in range(5) for m in range(2)]
    assert a == b
    flat = [i for chunk in a for i in chunk]
    assert sorted(flat[:10]) == list(range(10))  # epoch 0 is a permutation
    assert sorted(flat[10:20]) == list(range(10))


def test_train_loss_decreases_and_adapter_reloads(tiny_qwen, digits_rows, tmp_path):
    rows = [r for r in digits_rows if r["split"] == "train"]
    res = train(
        config(tiny_qwen, learning_rate=5e-3), rows, tmp_path / "adapter", tmp_path / "work"
    )
    log = read_log(tmp_path / "adapter" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 9))
    first, last = sum(r["loss"] for r in log[:2]) / 2, sum(r["loss"] for r in log[-2:]) / 2
    assert last < 0.85 * first, (first, last)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "peak_rss_gib"} <= set(
        log[0]
    )
    assert log[0]["peak_mem_gib"] is None and log[0]["peak_rss_gib"] > 0  # no GPU here
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert (tmp_path / "adapter" / "loss.png").stat().st_size > 1000
    cfg = json.loads((tmp_path / "adapter" / "vlmflow_train_config.json").read_text())
    assert cfg["lora"]["r"] == 8
    assert res.steps == 8

    # plain PEFT loading, no vlmflow code: identical logits to the in-memory trained weights
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    proc = AutoProcessor.from_pretrained(tmp_path / "adapter")
    enc = Encoder(proc, FAMILIES["qwen2_5_vl"], max_seq_length=256)
    batch = collate([enc(r) for r in rows[:3]], enc.pad_id)
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    with torch.no_grad():
        base_logits = base(**batch).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        l1 = tuned(**batch).logits
        l2 = tuned(**batch).logits
    assert torch.equal(l1, l2)
    assert (l1 - base_logits).abs().max() > 1e-3  # the adapter changes the model
    # trained answers beat the random base on the answer tokens
    lab = batch["labels"][:, 1:]
    mask = lab != -100

    def nll(logits):
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        return -lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean()

    assert nll(l1) < nll(base_logits)


def test_resume_after_kill_gives_the_same_loss_curve(tiny_qwen, digits_rows, tmp_path, monkeypatch):
    """Tolerance: per-step losses equal to 1e-5 relative (same CPU, same thread count; in
    practice they are bit-identical)."""
    rows = [r for r in digits_rows if r["split"] == "train"][:48]
    full = config(tiny_qwen, max_steps=6, save_steps=2, per_device_train_batch_size=3)
    train(full, rows, tmp_path / "a", tmp_path / "wa")
    uninterrupted = read_log(tmp_path / "a" / "train_log.jsonl")

    # "kill" right after the checkpoint of step 4 (checkpoints at steps 2 and 4 on disk)
    import vlmflow.train as T

    class Killed(Exception):
        pass

    orig = T.save_checkpoint
    calls = []

    def save_then_maybe_die(work_dir, step, *a, **k):
        out = orig(work_dir, step, *a, **k)
        calls.append(step)
        if step == 4:
            raise Killed
        return out

    with monkeypatch.context() as mp:
        mp.setattr(T, "save_checkpoint", save_then_maybe_die)
        with pytest.raises(Killed):
            train(full, rows, tmp_path / "b", tmp_path / "wb")
    assert not (tmp_path / "b").exists()  # no partial output
    res = train(full, rows, tmp_path / "b", tmp_path / "wb")
    assert calls == [2, 4]
    assert res.resumed_from == 4
    resumed = read_log(tmp_path / "b" / "train_log.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for u, r in zip(uninterrupted, resumed):
        assert r["loss"] == pytest.approx(u["loss"], rel=1e-5), (u, r)
        assert r["lr"] == pytest.approx(u["lr"])


def test_changed_config_does_not_resume_a_stale_checkpoint(tiny_qwen, digits_rows, tmp_path):
    rows = [r for r in digits_rows if r["split"] == "train"][:8]
    small = dict(max_steps=2, save_steps=1, per_device_train_batch_size=2)
    train(config(tiny_qwen, **small), rows, tmp_path / "a", tmp_path / "w")
    res = train(
        config(tiny_qwen, **small, learning_rate=1e-3),
        rows,
        tmp_path / "b",
        tmp_path / "w",
    )
    assert res.resumed_from == 0


def test_step_batches_from_worker_processes_equal_the_inline_ones():
    from vlmflow.train import step_batches

    def make_step(step):
        g = torch.Generator().manual_seed(step)
        return [{"input_ids": torch.randint(0, 100, (2, 5), generator=g)} for _ in range(2)]

    inline = list(step_batches(make_step, 3, 9, workers=0, pin=False))
    ahead = list(step_batches(make_step, 3, 9, workers=2, pin=False))
    assert len(inline) == len(ahead) == 6
    for a, b in zip(inline, ahead):
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert torch.equal(x["input_ids"], y["input_ids"])
    assert not torch.equal(inline[0][0]["input_ids"], inline[1][0]["input_ids"])


def test_preemption_signal_to_the_whole_job_leaves_the_batch_workers_running(tmp_path):
    """SLURM signals every process of the job: the workers ignore SIGUSR1, the training process
    records it, and every step's batches still arrive."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, signal, time, torch
        from vlmflow.preempt import PreemptionHandler
        from vlmflow.train import step_batches

        def make_step(step):
            time.sleep(0.05)
            return [{"x": torch.full((2,), step)}]

        os.setpgrp()
        batches = step_batches(make_step, 0, 12, workers=2, pin=False)  # workers start here
        with PreemptionHandler() as stop:  # installed after the fork: workers rely on their own
            got = []
            for i, b in enumerate(batches):
                got.append(int(b[0]["x"][0]))
                if i == 3:
                    os.killpg(os.getpgrp(), signal.SIGUSR1)  # workers included
                    time.sleep(0.3)
            print(got == list(range(12)), stop.requested)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr[-2000:]


def test_fp16_with_fully_trained_modules_is_refused_before_training(
    tiny_qwen, digits_rows, tmp_path
):
    rows = [r for r in digits_rows if r["split"] == "train"]
    cfg = config(tiny_qwen, max_steps=1)  # modules_to_save: lm_head, projector
    cfg["model"]["dtype"] = "float16"
    with pytest.raises(ValueError, match="modules_to_save.*float16"):
        train(cfg, rows, tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_a_process_that_stops_reading_its_batches_still_exits(tmp_path):
    """Workers ignore SIGTERM, so they are asked to stop (Prefetcher.close, also at exit)
    instead of being terminated: a trainer that stops early (preempted, failed) exits."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import torch
        from vlmflow.train import step_batches

        def make_step(step):
            return [{"x": torch.full((2,), step)}]

        batches = step_batches(make_step, 0, 50, workers=2, pin=False)
        print([int(next(batches)[0]["x"][0]) for _ in range(2)])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[0,", "1]"]
