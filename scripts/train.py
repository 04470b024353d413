#!/usr/bin/env python
"""Fine-tune a VLM with LoRA/QLoRA on a conversation Parquet file; write a PEFT adapter."""

import logging

import torch

from vlmflow.cli import parser, run, setup_logging
from vlmflow.config import resolve_sections
from vlmflow.data import read_conversations
from vlmflow.train import train

log = logging.getLogger("vlmflow.train")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--train", required=True, help="train.parquet")
    p.add_argument("--out", required=True, help="adapter folder to write")
    p.add_argument("--work-dir", required=True, help="checkpoints and the running log (resumable)")
    a = p.parse_args()
    setup_logging(a.verbose)
    cfg = resolve_sections(a.config, ["model", "lora", "train"])
    torch.set_num_threads(a.threads)
    rows = read_conversations(a.train)
    log.info("%d training samples from %s", len(rows), a.train)
    res = train(cfg, rows, a.out, a.work_dir, data_files=[a.train])
    log.info("done: %d steps, final loss %.4f", res.steps, res.final_loss)


if __name__ == "__main__":
    run(main)
