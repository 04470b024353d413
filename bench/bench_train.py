#!/usr/bin/env python
"""Time LoRA/QLoRA training steps of one Qwen2.5-VL checkpoint: vlmflow's training step vs the
plain transformers + PEFT (+ bitsandbytes) baseline, on the same batch and weights.

Fixed case (issue 7): 4 samples, each one 896x896 image (1024 image tokens) + a 40-word prompt +
a 300-word answer; loss on the answer only; LoRA r=16/alpha=16 on every attention and MLP linear
of the vision tower and the language model; gradient checkpointing on. Prints one
`RESULT {json}` line per run (median step time of --steps after --warmup) and appends it to --out.

    python bench/bench_train.py MODEL --impl vlmflow --quant 4bit --out bench/results/x.jsonl

Realistic case (--case realistic): 64 samples with image sides 224-1344 px and answers of 5-500
words, one optimizer step over micro-batches of --batch samples; tokens_per_s counts useful
(non-padding) tokens, padded_tokens_per_step what the model computed. --group-by-length sorts the
64 samples by length before cutting micro-batches (train.group_by_length); --packing packs each
micro-batch padding-free into rows (train.packing, vlmflow only). Same samples, same loss.
"""

import argparse
import datetime
import json
import time

import numpy as np
import torch
from PIL import Image

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "red",
    "circle",
    "answer",
    "is",
]


def vqa_row(i: int, image_path: str, question: str, answer: str) -> dict:
    """One image + question -> answer sample in the canonical conversation schema."""
    return {
        "id": str(i),
        "images": [image_path],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "text": "", "image": "0"},
                    {"type": "text", "text": question, "image": None},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer, "image": None}]},
        ],
    }


def fixed_rows(batch: int, side: int, answer_words: int, tmpdir: str) -> list[dict]:
    """The anchor benchmark's batch as canonical conversation rows (images written as PNG)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(batch):
        img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        path = f"{tmpdir}/img{i}.png"
        img.save(path)
        q = " ".join(rng.choice(WORDS, 40))
        ans = " ".join(rng.choice(WORDS, answer_words))
        rows.append(vqa_row(i, path, q, ans))
    return rows


def realistic_rows(n: int, tmpdir: str, seed: int = 0) -> list[dict]:
    """n samples with image sides drawn from 224 to 1344 px and answers of 5 to 500 words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(224, 1345, 2))
        path = f"{tmpdir}/r{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        q = " ".join(rng.choice(WORDS, int(rng.integers(5, 41))))
        ans = " ".join(rng.choice(WORDS, int(rng.integers(5, 501))))
        rows.append(vqa_row(i, path, q, ans))
    return rows


def apply_overrides(sections: dict, overrides: list[str]) -> dict:
    """`--set section.key=value` (value parsed as YAML) into the raw config sections."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    return sections


def cfg_for(model: str, quant: str, gc: str, overrides: list[str] = ()) -> dict:
    from vlmflow.config import resolve_sections

    raw = {
        "model": {"name": model, "load_in_4bit": quant == "4bit", "max_seq_length": 8192},
        "lora": {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "random_state": 3407},
        "train": {
            "use_gradient_checkpointing": {"true": True, "false": False}.get(gc, gc),
            "optim": "adamw_torch",
            "learning_rate": 1e-4,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "max_grad_norm": 0.0,
            "weight_decay": 0.0,
        },
    }
    return resolve_sections(apply_overrides(raw, list(overrides)), ["model", "lora", "train"])


def build_hf(model: str, quant: str, gc: bool):
    """The baseline exactly as ../shared/anchor-bench/train_bench.py --impl hf builds it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kw = {}
    if quant == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    m = AutoModelForImageTextToText.from_pretrained(
        model,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",
        device_map={"": 0} if torch.cuda.is_available() else None,
        **kw,
    )
    if quant == "4bit":
        m = prepare_model_for_kbit_training(
            m, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    target = (
        r".*(visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
        r"|language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)))"
    )
    return get_peft_model(
        m,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            target_modules=target,
            task_type="CAUSAL_LM",
        ),
    )


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--impl", required=True, choices=["vlmflow", "hf"])
    ap.add_argument("--quant", default="4bit", choices=["4bit", "16bit"])
    ap.add_argument("--gc", default="true", help="vlmflow: true | offload | false")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", type=int, default=896)
    ap.add_argument("--answer-words", type=int, default=300)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--case",
        default="fixed",
        choices=["fixed", "realistic"],
        help="realistic: 64 samples, sides 224-1344 px, answers 5-500 words, "
        "micro-batches of --batch, one optimizer step per pass over all of them",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="vlmflow: override a config key, e.g. --set model.quantize_vision=true",
    )
    ap.add_argument("--tag", default="", help="label of this variant in the output")
    ap.add_argument(
        "--profile", default=None, help="after timing, profile one step; write the tables here"
    )
    ap.add_argument(
        "--packing",
        action="store_true",
        help="realistic case, vlmflow: pack each micro-batch's samples padding-free into rows "
        "of at most 8192 tokens (train.packing)",
    )
    ap.add_argument(
        "--group-by-length",
        action="store_true",
        help="realistic case: sort the step's samples by length before cutting them into "
        "micro-batches (train.group_by_length)",
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if (a.packing or a.group_by_length) and a.case != "realistic":
        ap.error("--packing and --group-by-length apply to --case realistic")
    if a.packing and a.impl != "vlmflow":
        ap.error("--packing needs --impl vlmflow (the baseline does not pack)")

    from vlmflow.collate import Encoder, collate, collate_packed, count_tokens, rope_index_fn
    from vlmflow.modeling import build_training_model, load_processor
    from vlmflow.train import build_optimizer, build_scheduler, train_step

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the train rule's settings for these flags (train.packing also switches the attention)
    flags = [f"train.{k}=true" for k in ("packing", "group_by_length") if getattr(a, k)]
    cfg = cfg_for(a.model, a.quant, a.gc, [*flags, *a.set])
    t0 = time.time()
    if a.impl == "hf":
        model = build_hf(a.model, a.quant, a.gc != "false")
        from vlmflow.families import FAMILIES

        family = FAMILIES["qwen2_5_vl"]
        processor = load_processor(cfg["model"], family)
    else:
        model, processor, family = build_training_model(cfg, dev)
    load_s = time.time() - t0
    encoder = Encoder(processor, family, max_seq_length=8192)
    with tempfile.TemporaryDirectory() as tmp:
        if a.case == "fixed":
            rows = fixed_rows(a.batch, a.side, a.answer_words, tmp)
        else:
            rows = realistic_rows(64, tmp)
        samples = [encoder(r) for r in rows]
    if a.group_by_length:  # the whole case is one optimizer step: sort all of it
        samples.sort(key=lambda s: -s["input_ids"].shape[0])
    chunks = [samples[i : i + a.batch] for i in range(0, len(samples), a.batch)]
    if a.packing:
        rope_index = rope_index_fn(model)
        batches = [collate_packed(c, encoder.pad_id, rope_index, 8192) for c in chunks]
    else:
        batches = [collate(c, encoder.pad_id) for c in chunks]
    for b in batches:
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(torch.bfloat16)
    batch = batches[0]
    ntok = sum(count_tokens(b) for b in batches)  # useful (non-padding) tokens
    padded = sum(b["input_ids"].numel() for b in batches)
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    # Both sides: AdamW (torch, fused on CUDA), lr 1e-4, no clipping, no decay, constant lr.
    opt = build_optimizer(params, cfg["train"], dev)
    sched = build_scheduler(opt, cfg["train"], a.warmup + a.steps)
    model.train()
    losses, times = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step(batches=batches):
        if a.impl == "hf":
            loss = 0.0
            for mb in batches:
                b = {k: v.to(dev) for k, v in mb.items()}
                micro = model(**b, num_items_in_batch=n_items).loss
                micro.backward()
                loss += micro.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        # the train rule's step: forward/backward of every micro-batch, optimizer step
        return train_step(model, batches, opt, sched, params, max_grad_norm=0.0, device=dev).loss

    for step in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = one_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        losses.append(float(loss))
        print(
            f"step {step + 1}/{a.warmup + a.steps}: {dt:.2f} s, loss {losses[-1]:.4f}", flush=True
        )
        if step >= a.warmup:
            times.append(dt)
    med = float(np.median(times))
    floor = None
    if family.name == "qwen2_5_vl":  # bench/flops.py counts Qwen2.5-VL's layers
        from flops import PEAK_FLOPS, batch_shapes, step_flops

        mcfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        floor = step_flops(
            mcfg.get_text_config().to_dict(), mcfg.vision_config.to_dict(), *batch_shapes(batches)
        )
    res = dict(
        impl=a.impl,
        tag=a.tag,
        overrides=a.set,
        quant=a.quant,
        gc=a.gc,
        case=a.case,
        packing=a.packing,
        group_by_length=a.group_by_length,
        rows_per_step=sum(int(b["input_ids"].shape[0]) for b in batches),
        padded_tokens_per_step=padded,
        batch=a.batch,
        tokens_per_step=ntok,
        seq_len=int(batch["input_ids"].shape[1]),
        label_tokens=n_items,
        trainable_params=sum(p.numel() for p in params),
        load_s=round(load_s, 1),
        step_s_median=round(med, 4),
        tokens_per_s=round(ntok / med, 1),
        peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if dev.type == "cuda"
        else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if dev.type == "cuda"
        else None,
        floor_flop=floor,
        # share of the arithmetic floor at PEAK_FLOPS (bench/flops.py)
        floor_fraction=round(floor / PEAK_FLOPS / med, 3) if floor else None,
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        losses=[round(x, 4) for x in losses],
        gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
        peft=__import__("peft").__version__,
        date=datetime.date.today().isoformat(),
    )
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    if a.profile:  # the realistic case: its first 4 micro-batches (a whole step's trace is huge)
        some = batches[:4]
        title = f"{a.impl} {a.quant} gc={a.gc} {a.tag} ({len(some)} micro-batches)"
        profile_step(lambda: one_step(some), a.profile, title, dev)


KERNEL_KINDS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn_generated", "sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "wgmma", "splitk", "matmul", "gemv")),
    ("nf4 dequant", ("dequant", "kdequantize", "kgemm_4bit")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy/cast", ("copy", "memcpy", "memset", "cat", "index", "gather", "scatter")),
    ("reduce/norm", ("reduce", "norm", "softmax", "cross_entropy", "nll", "logsumexp")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton")),
)


def profile_step(one_step, path: str, title: str, dev) -> None:
    """One step under torch.profiler: wall time, GPU busy time, time by kernel kind, top
    kernels and top CPU-side ops, written to `path` (and the summary printed)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        one_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    busy = 0.0
    for e in kernels:
        us = e.device_time
        busy += us
        low = e.name.lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(s in low for s in subs)), "other")
        by_kind[kind] += us
        by_name[e.name][0] += us
        by_name[e.name][1] += 1
    lines = [
        f"# {title}",
        f"wall {wall * 1e3:.1f} ms; GPU kernels {busy / 1e3:.1f} ms ({len(kernels)} launches); "
        f"GPU idle {100 * (1 - busy / 1e6 / wall):.0f}% of the step",
        "",
        "time by kernel kind (ms):",
    ]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:14s} {us / 1e3:9.1f}  {100 * us / max(busy, 1):5.1f}%")
    lines += ["", "top kernels (ms, calls):"]
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"  {us / 1e3:8.1f} {n:6d}  {name[:150]}")
    lines += ["", "top ops by self CPU time:"]
    lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    text = "\n".join(lines)
    with open(path, "a") as f:
        f.write(text + "\n\n")
    print("\n".join(lines[: 12 + len(by_kind)]), flush=True)


if __name__ == "__main__":
    main()
