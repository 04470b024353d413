"""Dry runs through profiles/slurm (no cluster needed): what the train job asks SLURM for and the
command it runs, for 2 GPUs on one node and for 2 nodes x 4 GPUs; rule fetch_model appears for
a hub model only. The sbatch flags come from the executor plugin's own code."""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import BIN, snakemake_env
from snakemake_executor_plugin_slurm.submit_string import get_submit_command
from snakemake_executor_plugin_slurm.utils import set_gres_string

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


class Res(dict):
    __getattr__ = dict.__getitem__


def dry_run(work: Path, overlay: dict) -> str:
    (work / "overlay.json").write_text(json.dumps(overlay))
    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "-n",
            "-p",
            "--profile",
            "profiles/slurm",
            "--configfile",
            ".test/config.yaml",
            "overlay.json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env=snakemake_env(),  # no SLURM controller runs for these
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def job_block(text: str, rule: str) -> tuple[dict, str]:
    """The resources and shell command a dry run prints for `rule`."""
    block = text.split(f"\nrule {rule}:", 1)[1].split("\nrule ", 1)[0]
    line = re.search(r"resources: (.*)", block)[1]
    res = {}
    for kv in line.split(", "):
        k, v = kv.split("=", 1)
        res[k] = int(v) if v.isdigit() else v
    shell = re.search(r"\nShell command: (exec .*)", block)[1]
    return res, shell


def sbatch_flags(res: dict, threads: int) -> str:
    job = SimpleNamespace(resources=Res(res), threads=threads, name="train")
    params = dict(
        run_uuid="uuid",
        slurm_logfile="x.log",
        comment_str="rule_train",
        account="",
        partition=f"-p {res['slurm_partition']}",
        workdir="/w",
    )
    return get_submit_command(job, params) + set_gres_string(job)


@pytest.fixture(scope="module")
def work(workflow_copy, tmp_path_factory):
    return workflow_copy(tmp_path_factory.mktemp("dry"), extra=["profiles"])


GPU = {"partition": "gpu", "gpu_model": "h100", "mem_mb": 200000, "runtime": 1440}


def test_two_gpus_one_node(work):
    text = dry_run(work, {"train": {"gpus": 2, "threads": 16}, "resources": {"gpu": GPU}})
    assert "fetch_model" not in text  # a local (tiny) model: nothing to fetch
    res, shell = job_block(text, "train")
    assert (res["gpu"], res["gpu_model"], res["slurm_partition"]) == (2, "h100", "gpu")
    assert res["mem_mb"] == 200000 and res["runtime"] == 1440  # attempt 1
    argv = shlex.split(shell)
    # its own 2 GPUs on a workstation (vlmflow.gpu_slots: under SLURM, the job's), then torchrun
    assert argv[:7] == ["exec", "python", "-m", "vlmflow.gpu_slots", "--gpus", "2", "--"]
    assert argv[7:11] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=2"]
    assert "scripts/train.py" in argv
    flags = sbatch_flags(res, 16)
    print("sbatch", flags)
    for f in ("-p gpu", "--gpus=h100:2", "--cpus-per-task=16", "--mem 200000", "-t 1440"):
        assert f in flags, flags
    assert "--signal=TERM@180" in flags and "--ntasks-per-gpu" not in flags


def test_two_nodes_four_gpus_each_with_a_hub_model(work):
    overlay = {
        "model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct", "load_in_4bit": True},
        "train": {"gpus": 4, "nodes": 2, "threads": 32},
        "resources": {"gpu": GPU},
    }
    text = dry_run(work, overlay)
    # the model is fetched (on the login node: a localrule), then read from the HF cache
    assert re.search(r"\nfetch_model +1\n", text), text[-3000:]
    assert "build_tiny_model" not in text
    assert "HF_HUB_OFFLINE=0 python scripts/fetch_model.py" in text
    res, shell = job_block(text, "train")
    assert (
        "resources/hub/Qwen/Qwen2.5-VL-7B-Instruct/default.json"
        in text.split("\nrule train:", 1)[1].split("\n    output", 1)[0]
    )
    assert (res["nodes"], res["tasks"], res["tasks_per_gpu"], res["mpi"]) == (2, 2, 0, "srun")
    assert res["gres"] == "gpu:h100:4" and "gpu" not in res
    argv = shlex.split(shell)
    assert argv[:2] == ["exec", "srun"]
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--gres=gpu:4"} <= set(argv)
    i = argv.index("vlmflow.cluster")
    assert argv[i + 1 : i + 3] == ["--nnodes=2", "--nproc-per-node=4"]
    flags = sbatch_flags(res, 32)
    print("sbatch", flags)
    for f in ("-p gpu", "--nodes=2", "--ntasks=2", "--gres=gpu:h100:4", "--cpus-per-task=32"):
        assert f in flags, flags
    assert "--gpus" not in flags and "--ntasks-per-gpu" not in flags

    # what each node's task then runs (SLURM environment of node 1 of job 777)
    env = dict(
        os.environ,
        SLURM_JOB_ID="777",
        SLURM_NODEID="1",
        SLURM_JOB_NODELIST="gpu[01-02]",
        PYTHONPATH=str(ROOT / "src"),
    )
    cmd = argv[argv.index("python") :]
    cmd[0] = str(BIN / "python")
    script = cmd.index("scripts/train.py")
    fake_scontrol = work / "bin"
    fake_scontrol.mkdir(exist_ok=True)
    (fake_scontrol / "scontrol").write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\n'\n")
    (fake_scontrol / "scontrol").chmod(0o755)
    env["PATH"] = f"{fake_scontrol}:{env['PATH']}"
    out = subprocess.run(
        [*cmd[:script], "--dry-run", "--", *cmd[script:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    print(out)
    assert out.startswith("torchrun --nnodes=2 --nproc-per-node=4 --node-rank=1 ")
    assert "--rdzv-backend=c10d --rdzv-endpoint=gpu01:30277 --rdzv-id=777" in out
    assert "scripts/train.py --config" in out
    assert "--threads 32" in out  # train.threads, not capped by the profile's `cores`


def test_gguf_source_is_fetched_where_snakemake_runs(work):
    """GGUF: llama.cpp's source is fetched by the localrule llama_cpp_source (like fetch_model);
    the gguf and serve_check jobs read the fetched source (its JSON), never the network."""
    overlay = {"export": {"save_method": "gguf_q4_k_m", "gguf_pretokenizer": "qwen2"}}
    text = dry_run(work, overlay)
    for rule in ("llama_cpp_source", "gguf", "serve_check"):
        assert re.search(rf"\n{rule} +1\n", text), rule
    assert "localrules" in (ROOT / "rules/publish.smk").read_text().split("rule llama_cpp")[0]
    for rule in ("gguf", "serve_check"):
        block = text.split(f"\nrule {rule}:", 1)[1].split("\nrule ", 1)[0]
        shell = re.search(r"\nShell command: (.*)", block)[1]
        assert "--source results/tools/llama_cpp_source.json" in shell
        assert "pip" not in shell


def test_a_family_llama_cpp_cannot_convert_fails_before_any_job(work):
    overlay = {"model": {"name": "resources/models/tiny-mllama"}, "export": {"save_method": "gguf"}}
    (work / "overlay.json").write_text(json.dumps(overlay))
    res = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--configfile", ".test/config.yaml", "overlay.json"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "model family 'mllama'" in out and "not one llama.cpp" in out, out[-3000:]
    assert "Traceback" not in out
