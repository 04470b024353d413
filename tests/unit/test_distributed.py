"""Data-parallel training: two gloo ranks under the real torchrun on the CPU reproduce a single
process with the same global batch, and the launch commands for GPUs and nodes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import train_config

from vlmflow.cluster import launch_prefix, main, slurm_torchrun_args
from vlmflow.config import resolve_sections
from vlmflow.data import to_table
from vlmflow.distributed import DistContext
from vlmflow.train import read_log, train

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_shards_partition_the_global_micro_batch():
    idx = [7, 3, 9, 1, 4, 0]
    shards = [DistContext(rank=r, world_size=3).shard(idx) for r in range(3)]
    assert shards == [[7, 3], [9, 1], [4, 0]]
    assert DistContext().shard(idx) == idx
    with pytest.raises(ValueError, match="cannot be split"):
        DistContext(rank=0, world_size=4).shard(idx)


def test_single_process_context_is_a_no_op():
    ctx = DistContext()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.all_reduce_grads([p])
    ctx.broadcast_params([p])
    ctx.barrier()
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert ctx.sum(5) == 5 and ctx.any(True) and not ctx.any(False)


def test_launch_prefix_per_topology():
    assert launch_prefix(0) == "python"
    assert launch_prefix(1) == "python"
    two = launch_prefix(2, 1, 300)
    assert two.startswith("torchrun --standalone --nnodes=1 --nproc-per-node=2 ")
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in two
    multi = launch_prefix(4, 2, 300, threads=16)
    assert multi.startswith("srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --gres=gpu:4 ")
    assert "python -m vlmflow.cluster --nnodes=2 --nproc-per-node=4" in multi


def test_multi_node_rendezvous_on_the_first_node(capsys):
    env = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    args = slurm_torchrun_args(2, 4, 300, environ=env, hostnames=["gpu07", "gpu08"])
    assert "--rdzv-endpoint=gpu07:29742" in args  # 29500 + job id % 1000
    assert {"--nnodes=2", "--nproc-per-node=4", "--node-rank=1", "--rdzv-id=4242"} <= set(args)


def test_launcher_module_dry_run(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    import vlmflow.cluster as D

    monkeypatch.setattr(
        D, "slurm_torchrun_args", lambda n, p, t: [f"--nnodes={n}", f"--nproc-per-node={p}"]
    )
    main(["--nnodes", "2", "--nproc-per-node", "8", "--dry-run", "--", "train.py", "--x", "1"])
    assert capsys.readouterr().out.strip() == (
        "torchrun --nnodes=2 --nproc-per-node=8 train.py --x 1"
    )


def _cfg(model, **train_over):
    batch = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4}
    return train_config(model, **{**batch, "seed": 5, "gpus": 2, "threads": 2, **train_over})


@pytest.mark.parametrize("quant", ["lora", "qlora"])
def test_two_ranks_match_one_process_with_the_same_global_batch(
    quant, tiny_qwen, digits_rows, tmp_path
):
    """torchrun --nproc-per-node 2 (gloo, 2 per-device samples... x 2 ranks) against one process
    with per-device batch 2x as large. Tolerance: per-step loss and grad norm within 1e-4
    relative, final trainable weights within 1e-4 absolute (float summation order differs)."""
    rows = [r for r in digits_rows if r["split"] == "train"]
    data = tmp_path / "train.parquet"
    pq.write_table(to_table(rows), data)
    steps = 4 if quant == "lora" else 2
    ddp_cfg = _cfg(tiny_qwen, max_steps=steps)
    ddp_cfg["model"]["load_in_4bit"] = quant == "qlora"
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "src"),
    )
    res = subprocess.run(
        [
            str(BIN / "torchrun"),
            *launch_prefix(2).split()[1:],
            str(ROOT / "scripts/train.py"),
            "--config",
            json.dumps(ddp_cfg),
            "--train",
            str(data),
            "--out",
            str(tmp_path / "ddp"),
            "--work-dir",
            str(tmp_path / "ddp_work"),
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "distributed: 2 ranks" in res.stderr
    ddp_log = read_log(tmp_path / "ddp" / "train_log.jsonl")
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2

    single_cfg = _cfg(tiny_qwen, max_steps=steps, per_device_train_batch_size=8, gpus=1)
    single_cfg["model"]["load_in_4bit"] = quant == "qlora"
    torch.set_num_threads(1)
    cfg = resolve_sections(single_cfg, ["model", "lora", "train"])
    train(cfg, rows, tmp_path / "one", tmp_path / "one_work")
    one_log = read_log(tmp_path / "one" / "train_log.jsonl")

    assert [r["step"] for r in ddp_log] == list(range(1, steps + 1))
    for d, o in zip(ddp_log, one_log):
        assert d["tokens"] == o["tokens"]  # the two ranks together saw exactly the same samples
        assert d["loss"] == pytest.approx(o["loss"], rel=1e-4), (d, o)
        assert d["grad_norm"] == pytest.approx(o["grad_norm"], rel=1e-4), (d, o)
    assert ddp_log[-1]["loss"] != ddp_log[0]["loss"]

    from safetensors.torch import load_file

    a = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-4)
