#!/usr/bin/env python
"""Peak memory of merging a LoRA adapter into a sharded base, relative to the model's size.

Builds a random Qwen2.5-VL of about 100M parameters (bf16 checkpoint in 20 MB shards), a LoRA
adapter (r=16 on every attention and MLP projection, random B, lm_head and projector in
modules_to_save), then measures the peak RSS (VmHWM) of fresh interpreters that

  baseline   import torch/transformers/peft/vlmflow and build the model on the meta device
             (the fixed cost of any merge);
  streaming  vlmflow's streaming merge_weights (merged_16bit, no check);
  export     vlmflow's whole export: streaming merge + merge check (check_dtype bfloat16, as
             on a node where a float32 copy does not fit);
  naive      PEFT: from_pretrained(fp32) + PeftModel + merge_and_unload + save_pretrained (the
             walking skeleton's merge).

and prints (peak - baseline) / bf16 model size for each. Usage:

  python bench/merge_memory.py [--workdir /tmp/vlmflow-merge-bench] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(workdir: Path, layers: int) -> tuple[Path, Path, int]:
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlmflow.config import resolve_sections
    from vlmflow.families import FAMILIES
    from vlmflow.modeling import lora_config
    from vlmflow.tiny import build_tiny

    tiny = build_tiny("qwen2_5_vl", workdir / "tiny")
    d = json.loads((tiny / "config.json").read_text())
    d["text_config"].update(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        layer_types=["full_attention"] * layers,
    )
    d["text_config"]["rope_parameters"]["mrope_section"] = [8, 12, 12]  # head_dim 64
    d["vision_config"].update(
        hidden_size=512,
        intermediate_size=1536,
        depth=4,
        num_heads=8,
        out_hidden_size=1024,
        fullatt_block_indexes=[3],
    )
    (workdir / "config.json").write_text(json.dumps(d))
    cfg = AutoConfig.from_pretrained(workdir / "config.json")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    base = workdir / "base"
    model.save_pretrained(base, max_shard_size="20MB")
    AutoProcessor.from_pretrained(tiny).save_pretrained(base)
    n_params = sum(p.numel() for p in model.parameters())
    lora = resolve_sections({"lora": {"modules_to_save": ["lm_head", "projector"]}}, ["lora"])
    peft_cfg = lora_config(FAMILIES["qwen2_5_vl"], lora["lora"])
    peft_cfg.init_lora_weights = False  # random B: every update is non-zero
    get_peft_model(model.float(), peft_cfg).save_pretrained(workdir / "adapter")
    return base, workdir / "adapter", n_params


CHILD = {
    "baseline": """
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText
        import peft, vlmflow.merge
        with torch.device("meta"):
            AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(BASE))
    """,
    "streaming": """
        import torch
        from vlmflow.config import resolve_sections
        from vlmflow.merge import merge_weights
        cfg = resolve_sections({"model": {"name": BASE}}, ["model"])["model"]
        OUT.mkdir()
        merge_weights(cfg, ADAPTER, OUT, torch.bfloat16, "20MB")
    """,
    "export": """
        from vlmflow.config import resolve_sections
        from vlmflow.data import read_conversations
        from vlmflow.export import export_model
        cfg = resolve_sections(
            {"model": {"name": BASE, "max_seq_length": 256},
             "export": {"max_shard_size": "20MB", "check_dtype": "bfloat16"}},
            ["model", "export"],
        )
        export_model(cfg["model"], ADAPTER, OUT, cfg["export"], check_rows=ROWS)
    """,
    "naive": """
        import torch
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText
        base = AutoModelForImageTextToText.from_pretrained(BASE, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(ADAPTER)).merge_and_unload()
        model.to(torch.bfloat16).save_pretrained(OUT, max_shard_size="20MB")
    """,
}


def measure(kind: str, base: Path, adapter: Path, out: Path, rows_file: Path) -> dict:
    code = (
        "import json, sys, time\nfrom pathlib import Path\n"
        f"BASE, ADAPTER, OUT = {str(base)!r}, Path({str(adapter)!r}), Path({str(out)!r})\n"
        f"ROWS = json.loads(Path({str(rows_file)!r}).read_text())\n"
        "t0 = time.perf_counter()\n"
        + textwrap.dedent(CHILD[kind])
        # VmHWM: the peak RSS of this process image (ru_maxrss would carry over the parent's
        # RSS at fork time across exec).
        + "\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(json.dumps({'maxrss_kib': int(hwm.split()[1]), 'seconds': time.perf_counter() - t0}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/vlmflow-merge-bench")
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    import shutil

    sys.path.insert(0, str(ROOT / "src"))
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, adapter, n_params = build(work, a.layers)

    from vlmflow import data, demo, image_validation, images
    from vlmflow.config import resolve_dataset

    demo.write_digits(work / "digits", limit=8)
    src = data.Source(path=str(work / "digits/data.jsonl"), image_root=str(work / "digits"))
    policy = images.ImagePolicy.from_config(
        resolve_dataset({"sources": [{"path": src.path}]})["images"]
    )
    recs = image_validation.validate_images(data.seed_image_refs(src), policy, progress=False)
    rows, _ = data.seed_to_conversations(
        src, {(r["root"], r["path"]): r for r in recs}, {"val": 0.0, "test": 0.0, "seed": 0}
    )
    rows_file = work / "rows.json"
    rows_file.write_text(json.dumps(rows))

    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    print(
        f"model: {n_params / 1e6:.1f}M parameters, bf16 checkpoint {size / 2**20:.0f} MiB in {shards} shards"
    )
    results = {}
    for kind in ("baseline", "streaming", "export", "naive"):
        t0 = time.perf_counter()
        results[kind] = measure(kind, base, adapter, work / f"out-{kind}", rows_file)
        results[kind]["wall"] = time.perf_counter() - t0
    base_rss = results["baseline"]["maxrss_kib"] * 1024
    print(f"{'run':<10} {'peak RSS MiB':>13} {'above baseline':>15} {'x model size':>13} {'s':>6}")
    for kind, r in results.items():
        peak = r["maxrss_kib"] * 1024
        extra = peak - base_rss
        print(
            f"{kind:<10} {peak / 2**20:>13.0f} {extra / 2**20:>15.0f} {extra / size:>13.2f} "
            f"{r['seconds']:>6.1f}"
        )
    s, n = (
        results["streaming"]["maxrss_kib"] * 1024 - base_rss,
        results["naive"]["maxrss_kib"] * 1024 - base_rss,
    )
    print(f"streaming merge uses {s / n:.2f}x the extra memory of the naive merge")


if __name__ == "__main__":
    main()
