#!/usr/bin/env python
"""Data-parallel training: tokens/s with N GPUs against one GPU, and loss equivalence.

    python bench/ddp_throughput.py --gpus 2 --out /tmp/ddp-bench          # 2 GPUs, 7B size
    python bench/ddp_throughput.py --tiny --gpus 2 --out /tmp/ddp-tiny    # CPU smoke test (gloo)

The model has the architecture of Qwen2.5-VL-7B-Instruct (8.3B parameters) with random weights,
built here (no download; the GPU machine has no internet) with the tiny model's tokenizer and
image processor; the data are the demo digits upscaled to 448 px (256 image tokens each). The
training settings are those of config/examples/qwen2_5_vl_7b_qlora.yaml (QLoRA r=16 on vision
and language layers, adamw_8bit, gradient checkpointing, per-device batch 1 x accumulation 8).
Three runs of scripts/train.py, launched exactly as the train rule launches them
(vlmflow.cluster.launch_prefix):

    one   1 process,  per-device batch b        throughput baseline
    ddp   N ranks,    per-device batch b        tokens/s ratio ddp/one (target >= 1.8 for N = 2)
    big   1 process,  per-device batch N x b    same global batch as ddp: per-step losses match

tokens/s is the median over the steps after the first `--warmup` (global tokens of a step, i.e.
all ranks together, divided by its wall time). Prints a table and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "bench"))
from make_model import SIZES  # noqa: E402  (the one place the 7B architecture is written down)


def seven_b_config(tiny_dir: Path):
    """Qwen2.5-VL-7B's architecture with the tiny tokenizer's special-token ids."""
    from transformers import AutoConfig, Qwen2_5_VLConfig

    t = AutoConfig.from_pretrained(tiny_dir)
    ids = dict(
        bos_token_id=t.text_config.bos_token_id,
        eos_token_id=t.text_config.eos_token_id,
        pad_token_id=t.text_config.pad_token_id,
    )
    return Qwen2_5_VLConfig(
        text_config={**SIZES["7b"][0], **ids, "tie_word_embeddings": False},
        vision_config=SIZES["7b"][1],
        image_token_id=t.image_token_id,
        video_token_id=t.video_token_id,
        vision_start_token_id=t.vision_start_token_id,
        vision_end_token_id=t.vision_end_token_id,
        tie_word_embeddings=False,
        **ids,
    )


def build_model(out: Path, tiny: bool) -> Path:
    """A random-weight model (bf16 safetensors) with the tiny model's processor."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vlmflow.tiny import build_tiny

    tiny_dir = out / "tiny-qwen2_5_vl"
    if not tiny_dir.exists():
        build_tiny("qwen2_5_vl", tiny_dir)
    if tiny:
        return tiny_dir
    model_dir = out / "qwen2_5_vl-7b-random"
    if (model_dir / "config.json").exists():
        return model_dir
    cfg = seven_b_config(tiny_dir)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.2f}B-parameter random model in {time.perf_counter() - t0:.0f}s")
    del model
    return model_dir


def build_data(out: Path, scale: int, limit: int) -> Path:
    import pyarrow.parquet as pq

    from vlmflow import data, image_validation, images
    from vlmflow.config import resolve_dataset
    from vlmflow.data import to_table
    from vlmflow.demo import write_digits

    parquet = out / f"digits-{scale}.parquet"
    if parquet.exists():
        return parquet
    folder = out / f"digits-{scale}"
    write_digits(folder, scale=scale, limit=limit)
    src = data.Source(path=str(folder / "data.jsonl"), image_root=str(folder))
    policy = images.ImagePolicy.from_config(
        resolve_dataset({"sources": [{"path": src.path}]})["images"]
    )
    recs = image_validation.validate_images(data.seed_image_refs(src), policy, progress=False)
    rows, _ = data.seed_to_conversations(
        src, {(r["root"], r["path"]): r for r in recs}, {"val": 0.0, "test": 0.0, "seed": 0}
    )
    pq.write_table(to_table(rows), parquet)
    return parquet


def run(name: str, out: Path, cfg: dict, parquet: Path, threads: int) -> list[dict]:
    from vlmflow.cluster import launch_prefix

    run_dir = out / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    prefix = launch_prefix(cfg["train"]["gpus"], 1, 300, threads)
    cmd = [*shlex.split(prefix), str(ROOT / "scripts/train.py"), "--config", json.dumps(cfg)]
    cmd += ["--train", str(parquet), "--out", str(run_dir / "adapter")]
    cmd += ["--work-dir", str(run_dir / "work"), "--threads", str(threads)]
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")  # keep a carried site-packages
    if cmd[0] == "python":
        cmd[0] = sys.executable
    else:
        cmd[0] = str(Path(sys.executable).parent / cmd[0])
    print(f"[{name}] {' '.join(cmd[:6])} ...", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        sys.exit(f"[{name}] failed (exit {res.returncode}); see {out / f'{name}.log'}")
    print(f"[{name}] {time.perf_counter() - t0:.0f}s", flush=True)
    log = run_dir / "adapter" / "train_log.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the tokens/s median")
    p.add_argument("--batch", type=int, default=1, help="per-device batch b")
    p.add_argument("--accum", type=int, default=8)
    p.add_argument("--scale", type=int, default=56, help="digit upscaling (8 px x scale)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    model = build_model(a.out, a.tiny)
    parquet = build_data(a.out, 7 if a.tiny else a.scale, 400)
    base = json.loads(
        json.dumps(
            {
                "model": {"name": str(model), "load_in_4bit": not a.tiny, "max_seq_length": 2048},
                "lora": {"r": 16, "lora_alpha": 16, "random_state": 3407},
                "train": {
                    "per_device_train_batch_size": a.batch,
                    "gradient_accumulation_steps": a.accum,
                    "max_steps": a.steps,
                    "warmup_steps": 5,
                    "learning_rate": 2e-4,
                    "optim": "adamw_torch" if a.tiny else "adamw_8bit",
                    "use_gradient_checkpointing": not a.tiny,
                    "seed": 3407,
                    "gpus": 1,
                    "threads": a.threads,
                },
            }
        )
    )

    def cfg(gpus, batch):
        c = json.loads(json.dumps(base))
        c["train"].update(gpus=gpus, per_device_train_batch_size=batch)
        return c

    logs = {
        "one": run("one", a.out, cfg(1, a.batch), parquet, a.threads),
        "ddp": run("ddp", a.out, cfg(a.gpus, a.batch), parquet, a.threads),
        "big": run("big", a.out, cfg(1, a.gpus * a.batch), parquet, a.threads),
    }
    tps = {k: statistics.median(r["tokens_per_s"] for r in v[a.warmup :]) for k, v in logs.items()}
    ratio = tps["ddp"] / tps["one"]
    rel = [abs(d["loss"] - b["loss"]) / abs(b["loss"]) for d, b in zip(logs["ddp"], logs["big"])]
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": a.gpus,
        "torch": torch.__version__,
        "settings": vars(a) | {"out": str(a.out)},
        "tokens_per_s": tps,
        "ratio_ddp_over_one": ratio,
        "max_rel_loss_diff_ddp_vs_big": max(rel),
        "loss": {k: [r["loss"] for r in v] for k, v in logs.items()},
        "peak_mem_gib": {k: max((r["peak_mem_gib"] or 0) for r in v) for k, v in logs.items()},
    }
    (a.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\ntokens/s (median of steps {a.warmup + 1}-{a.steps}):")
    for k, label in (
        ("one", "1 GPU, batch b"),
        ("ddp", f"{a.gpus} GPUs, batch b each"),
        ("big", f"1 GPU, batch {a.gpus}b"),
    ):
        print(f"  {label:<24} {tps[k]:>10.1f}   peak {result['peak_mem_gib'][k]} GiB")
    print(f"ratio {a.gpus} GPUs / 1 GPU: {ratio:.2f}x (target >= {0.9 * a.gpus:.1f}x)")
    print(
        f"per-step loss, {a.gpus} GPUs vs 1 GPU with the same global batch: "
        f"max relative difference {max(rel):.2e}"
    )
    for i, (d, b) in enumerate(zip(logs["ddp"], logs["big"]), 1):
        print(f"  step {i:>3}  ddp {d['loss']:.5f}  one-big {b['loss']:.5f}")


if __name__ == "__main__":
    main()
