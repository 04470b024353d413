#!/usr/bin/env python
"""Fine-tune a VLM with LoRA/QLoRA on a conversation Parquet file; write a PEFT adapter.

Runs as one process, or as one rank of several under torchrun (data-parallel over GPUs/nodes).
SIGTERM/SIGUSR1 (SLURM's time-limit warning, preemption) and SIGINT (Ctrl-C) end it cleanly at
the next step with a checkpoint and exit code 75; running it again resumes. CUDA out-of-memory
and a full disk end with what to do. One trainer per work folder (a second one stops at once).
"""

import logging
import sys
import time
from pathlib import Path

import torch

from vlmflow.cli import parser, run, setup_logging
from vlmflow.cluster import slurm_context
from vlmflow.config import resolve_sections
from vlmflow.data import read_conversations
from vlmflow.distributed import init_distributed
from vlmflow.hub import check_model_source
from vlmflow.modeling import model_family
from vlmflow.preempt import (
    EXIT_PREEMPTED,
    Preempted,
    PreemptionHandler,
    oom_advice,
    stop_with_parent,
)
from vlmflow.train import train

log = logging.getLogger("vlmflow.train")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--train", required=True, help="train.parquet")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--work-dir", required=True, help="checkpoints and the running log (resumable)")
    p.add_argument(
        "--stop-with-parent",
        action="store_true",
        help="checkpoint and stop when the process that started this one dies (Linux; the "
        "train rule sets it: a killed Snakemake leaves no trainer behind)",
    )
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "lora", "train"])
    check_model_source(cfg["model"])  # a missing or unusable local model: say so now
    preempt = PreemptionHandler()
    if a.stop_with_parent:
        stop_with_parent()  # SIGTERM, which the handler turns into a checkpoint
    ctx = init_distributed()
    # the rule's threads are per node: share them among this node's ranks
    torch.set_num_threads(max(1, a.threads // ctx.local_world_size))
    rows = read_conversations(a.train)
    log.info("%d training samples from %s", len(rows), a.train)
    try:
        res = train(
            cfg, rows, a.out, a.work_dir, data_files=[a.train], preempt=preempt, dist_ctx=ctx
        )
    except Preempted as e:
        log.warning("%s", e)
        if ctx.is_main:  # the rule's log is rewritten by the retry; this history is kept
            with open(Path(a.work_dir) / "preemptions.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {slurm_context() or ''} {e}\n")
        sys.exit(EXIT_PREEMPTED)
    except torch.cuda.OutOfMemoryError:
        advice = oom_advice(cfg, ctx.world_size, model_family(cfg["model"]["name"], cfg["model"]))
        log.error("%s", advice, exc_info=a.verbose)
        print(f"error: {advice}", file=sys.stderr)
        sys.exit(1)
    finally:
        ctx.close()
        preempt.close()
    log.info("done: %d steps, final loss %.4f", res.steps, res.final_loss)


if __name__ == "__main__":
    run(main)
