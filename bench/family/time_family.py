#!/usr/bin/env python
"""Time LoRA/QLoRA training steps of one model folder (from make_family.py) under one
implementation, on one fixed batch shared by all implementations:

- vlmflow: the product's own training step, driven as its bench/bench_train.py drives it: the
  config of bench_train.cfg_for (+ --set overrides), vlmflow.modeling.build_training_model,
  vlmflow.collate.Encoder + collate (with the family's batch layout, as the train rule calls it),
  vlmflow.train.build_optimizer / build_scheduler / train_step.
- hf: plain transformers + PEFT (+ bitsandbytes NF4 for 4-bit), built as bench_train.build_hf
  builds its Qwen baseline, with the LoRA targets of HF_TARGETS for the family.
- unsloth: FastVisionModel.from_pretrained / get_peft_model (use_gradient_checkpointing="unsloth"),
  as ../../shared/anchor-bench/train_bench.py calls it, with the same LoRA targets (or
  Unsloth's own selection with --unsloth-targets flags).

The batch: --batch samples, each one --side x --side random image + a --prompt-words question ->
--answer-words answer (bench_train's words and random generator: with 40 prompt words it is
bench_train.fixed_rows), encoded by vlmflow's Encoder with the folder's processor for every
implementation, loss on the answer only. LoRA r=16, alpha=16, dropout 0 on every attention and
MLP linear of the vision tower and the language model; gradient checkpointing on; AdamW (torch,
fused on CUDA) lr 1e-4 from vlmflow.train.build_optimizer for all three. batch_sha and
trainable_params in the output let a reader check that the implementations got the same batch
and the same number of LoRA parameters.

    python time_family.py models/mllama --impl hf --quant 4bit --out results.jsonl

Prints per-step lines and one `RESULT {json}` line, appended to --out.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# LoRA targets of the hf and unsloth implementations, written from the module names of the
# transformers 5 classes (PEFT matches them with re.fullmatch): every attention and MLP linear of
# every vision block and decoder layer; never the projector, the embeddings or the head.
_ATTN = r"self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
_MLP = r"mlp\.(?:gate_proj|up_proj|down_proj)"
_LANG = rf"model\.language_model\.layers\.\d+\.(?:{_ATTN}|{_MLP})"
_CLIP = r"\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
HF_TARGETS = {
    "mllama": (
        (
            r"model\.vision_model\.(?:transformer|global_transformer)\.layers\.\d+\."
            r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:fc1|fc2))"
        ),
        (
            r"model\.language_model\.layers\.\d+\."
            rf"(?:(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)|{_MLP})"
        ),
    ),
    "gemma3": (rf"model\.vision_tower\.encoder{_CLIP}", _LANG),
    "llava": (rf"model\.vision_tower\.encoder{_CLIP}", _LANG),
    "llava_next": (rf"model\.vision_tower\.encoder{_CLIP}", _LANG),
    "pixtral": (
        (
            r"model\.vision_tower\.transformer\.layers\.\d+\.(?:attention\."
            r"(?:q_proj|k_proj|v_proj|o_proj)|feed_forward\.(?:gate_proj|up_proj|down_proj))"
        ),
        _LANG,
    ),
    "qwen2_vl": (r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))", _LANG),
    "qwen2_5_vl": (
        r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))",
        _LANG,
    ),
    "qwen3_vl": (
        r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:linear_fc1|linear_fc2))",
        _LANG,
    ),
    "idefics3": (
        rf"model\.vision_model\.encoder{_CLIP}",
        rf"model\.text_model\.layers\.\d+\.(?:{_ATTN}|{_MLP})",
    ),
}
HF_TARGETS["smolvlm"] = HF_TARGETS["idefics3"]
HF_TARGETS["mistral3"] = HF_TARGETS["pixtral"]
# Qwen3.5: the Gated DeltaNet layers' five projections count as attention (as in vlmflow)
HF_TARGETS["qwen3_5"] = (
    HF_TARGETS["qwen3_vl"][0],
    (
        r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
        rf"|linear_attn\.(?:in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj)|{_MLP})"
    ),
)
# MoE: attention (and Qwen3.5-MoE's shared expert) as target_modules; the fused experts are
# 3-D parameters, adapted through target_parameters (HF_EXPERTS), as vlmflow does
HF_TARGETS["qwen3_vl_moe"] = HF_TARGETS["qwen3_vl"]
HF_TARGETS["qwen3_5_moe"] = (
    HF_TARGETS["qwen3_vl"][0],
    HF_TARGETS["qwen3_5"][1].replace(_MLP, r"mlp\.shared_expert\.(?:gate_proj|up_proj|down_proj)"),
)
HF_EXPERTS = r"model\.language_model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj)"
# Gemma 4: the vision linears sit inside Gemma4ClippableLinear (`.linear`)
HF_TARGETS["gemma4"] = (
    (
        r"model\.vision_tower\.encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
        r"|mlp\.(?:gate_proj|up_proj|down_proj))\.linear"
    ),
    _LANG,
)


def target_regex(family: str) -> str:
    vision, language = HF_TARGETS[family]
    return f"(?:{vision})|(?:{language})"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", help="model folder (make_family.py)")
    ap.add_argument("--impl", required=True, choices=["vlmflow", "hf", "unsloth"])
    ap.add_argument("--quant", default="16bit", choices=["16bit", "4bit"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", type=int, default=896)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--answer-words", type=int, default=300)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--gc",
        default="true",
        help="gradient checkpointing. vlmflow: true | offload | false (train."
        "use_gradient_checkpointing); hf: true | false; unsloth: always its 'unsloth' mode",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="vlmflow only: override a config key (bench_train's --set), e.g. "
        "--set model.quantize_vision=true",
    )
    ap.add_argument(
        "--unsloth-targets",
        choices=["harness", "flags"],
        default="harness",
        help="harness: pass HF_TARGETS as target_modules (same LoRA as hf); flags: Unsloth's own "
        "selection from finetune_vision/language/attention/mlp",
    )
    ap.add_argument("--tag", default="", help="label of this variant in the output")
    ap.add_argument("--out", default=None, help="append the RESULT json line to this file")
    return ap.parse_args(argv)


def load_bench_train(root: Path):
    """vlmflow's bench/bench_train.py from the checkout `root` (or $VLMFLOW_BENCH)."""
    bench = Path(os.environ.get("VLMFLOW_BENCH") or root / "bench")
    if not (bench / "bench_train.py").is_file():
        raise SystemExit(f"bench_train.py not found in {bench}: copy vlmflow's bench/ beside src/")
    sys.path.insert(0, str(bench))
    import bench_train

    return bench_train


def fixed_rows(bench_train, n: int, side: int, prompt_words: int, answer_words: int, tmpdir: str):
    """bench_train.fixed_rows with a variable prompt length (the same rows for 40 words)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        path = f"{tmpdir}/img{i}.png"
        img.save(path)
        q = " ".join(rng.choice(bench_train.WORDS, prompt_words))
        ans = " ".join(rng.choice(bench_train.WORDS, answer_words))
        rows.append(bench_train.vqa_row(i, path, q, ans))
    return rows


def build_hf(model_dir: str, quant: str, gc: bool, targets: str):
    import re

    """The baseline as bench_train.build_hf (and the anchor harness) builds it: sdpa, bf16,
    bitsandbytes NF4 + double quantization for 4-bit with prepare_model_for_kbit_training,
    non-reentrant checkpointing, LoRA through get_peft_model."""
    import torch
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
        model_dir,
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
    experts = [n for n, _ in m.named_parameters() if re.fullmatch(HF_EXPERTS, n)]
    return get_peft_model(
        m,
        LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            bias="none",
            target_modules=targets,
            target_parameters=experts or None,
            task_type="CAUSAL_LM",
        ),
    )


def build_unsloth(model_dir: str, quant: str, targets: str | None):
    """FastVisionModel as the anchor harness uses it (+ the same target regex unless None)."""
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        model_dir,
        load_in_4bit=quant == "4bit",
        max_seq_length=8192,
        use_gradient_checkpointing="unsloth",
    )
    kw = {} if targets is None else {"target_modules": targets}
    model = FastVisionModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        finetune_vision_layers=True,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        **kw,
    )
    FastVisionModel.for_training(model)
    return model


def batch_sha(batch: dict) -> str:
    """Fingerprint of a collated batch (token tensors exactly, image tensors by shape and sum)."""
    import torch

    h = hashlib.sha1()
    for k in sorted(batch):
        v = batch[k]
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        if v.is_floating_point():
            h.update(f"{float(v.double().sum()):.6e}".encode())
        else:
            h.update(v.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def vision_patches(batch: dict, config) -> int | None:
    """Patch positions the vision encoder embeds for the batch (padding tiles/crops included):
    Qwen-VL pixel_values are (patches, C*t*p*p); the others hold raw pixels."""
    pv = batch.get("pixel_values")
    if pv is None:
        return None
    vc = config.vision_config
    if pv.ndim == 2:
        return int(pv.shape[0])
    if config.model_type == "gemma4":  # (images, patches, 3 * p * p), already patchified
        return int(pv.shape[0] * pv.shape[1])
    p = getattr(vc, "patch_size", 14)
    return int(pv.numel() // (pv.shape[-3] * p * p))


def lora_modules(model, family) -> dict[str, int]:
    """LoRA-wrapped modules by part (vision blocks / decoder layers / elsewhere)."""
    import re

    vis = re.compile(rf"(?:.*\.)?{family.vision_layers}\..+")
    lang = re.compile(rf"(?:.*\.)?{family.language_layers}\..+")
    out = {"vision": 0, "language": 0, "other": 0}
    for name, mod in model.named_modules():
        if not hasattr(mod, "lora_A") or not len(getattr(mod, "lora_A", {})):
            continue
        key = "vision" if vis.fullmatch(name) else "language" if lang.fullmatch(name) else "other"
        out[key] += 1
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.impl == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers and peft on import)
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import make_family

    root = make_family.ensure_vlmflow()
    bench_train = load_bench_train(root)
    from transformers import AutoConfig

    from vlmflow.collate import Encoder, collate, count_tokens
    from vlmflow.families import family_for_config
    from vlmflow.modeling import build_training_model, load_processor, resolve_dtype
    from vlmflow.train import build_optimizer, build_scheduler, train_step

    print(f"vlmflow from {root}", flush=True)
    if a.set and a.impl != "vlmflow":
        print(f"note: --set {a.set} applies to vlmflow only; ignored for {a.impl}", flush=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # vlmflow's config as bench_train builds it; its train section also drives the optimizer of
    # every implementation (AdamW torch, lr 1e-4, constant, no clipping, no decay)
    cfg = bench_train.cfg_for(a.model, a.quant, a.gc, a.set)
    config = AutoConfig.from_pretrained(a.model)
    t0 = time.time()
    if a.impl == "vlmflow":
        model, processor, family = build_training_model(cfg, dev)
        dtype = resolve_dtype(cfg["model"]["dtype"], dev)
    else:
        family = family_for_config(config)
        targets = target_regex(family.name)
        if a.impl == "hf":
            model = build_hf(a.model, a.quant, a.gc != "false", targets)
        else:
            model = build_unsloth(
                a.model, a.quant, targets if a.unsloth_targets == "harness" else None
            )
        processor = load_processor(cfg["model"], family)
        dtype = torch.bfloat16
    load_s = time.time() - t0
    if dev.type == "cuda":
        dtype = torch.bfloat16  # bench_train's cast on the GPU, whatever the implementation

    encoder = Encoder(processor, family, max_seq_length=cfg["model"]["max_seq_length"])
    with tempfile.TemporaryDirectory() as tmp:
        rows = fixed_rows(bench_train, a.batch, a.side, a.prompt_words, a.answer_words, tmp)
        samples = [encoder(r) for r in rows]
    batch = collate(samples, encoder.pad_id, family.batch_layout)  # as the train rule collates
    sha = batch_sha(batch)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    ids = batch["input_ids"]
    ntok = count_tokens(batch)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    image_tokens = int((ids == encoder.image_token_id).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    modules = lora_modules(model, family)
    print(
        f"batch {sha}: {ids.shape[0]} x {ids.shape[1]} tokens ({ntok} real, {image_tokens} "
        f"{family.image_token}, {n_items} labelled), vision patches "
        f"{vision_patches(batch, config)}; trainable {trainable} in LoRA modules {modules}; "
        f"loaded in {load_s:.1f} s",
        flush=True,
    )
    opt = build_optimizer(params, cfg["train"], dev)
    sched = build_scheduler(opt, cfg["train"], a.warmup + a.steps)
    model.train()
    batches = [batch]

    def one_step():
        if a.impl == "vlmflow":  # the train rule's step
            return train_step(
                model, batches, opt, sched, params, max_grad_norm=0.0, device=dev
            ).loss
        b = {k: v.to(dev) for k, v in batch.items()}
        if a.impl == "hf":  # bench_train's baseline step
            loss = model(**b, num_items_in_batch=n_items).loss
        else:  # the anchor harness's Unsloth step
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
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
            f"step {step + 1}/{a.warmup + a.steps}: {dt:.3f} s, loss {losses[-1]:.4f}", flush=True
        )
        if step >= a.warmup:
            times.append(dt)
    med = float(np.median(times)) if times else float("nan")
    tc, vc = config.get_text_config(), config.vision_config
    info = {}
    if (Path(a.model) / "make_family.json").is_file():
        info = json.loads((Path(a.model) / "make_family.json").read_text())
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}
    for m in ("bitsandbytes", "unsloth"):
        if m in sys.modules:
            versions[m] = getattr(sys.modules[m], "__version__", "?")
    res = dict(
        family=family.name,
        impl=a.impl,
        quant=a.quant,
        tag=a.tag,
        gc=a.gc if a.impl != "unsloth" else "unsloth",
        overrides=a.set if a.impl == "vlmflow" else [],
        unsloth_targets=a.unsloth_targets if a.impl == "unsloth" else None,
        model=Path(a.model).name,
        checkpoint=info.get("checkpoint"),
        scale=info.get("scale"),
        text_layers=getattr(tc, "num_hidden_layers", None),
        vision_layers=getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", None),
        batch=a.batch,
        side=a.side,
        prompt_words=a.prompt_words,
        answer_words=a.answer_words,
        batch_sha=sha,
        seq_len=int(ids.shape[1]),
        tokens_per_step=ntok,
        image_tokens=image_tokens,
        label_tokens=n_items,
        vision_patches=vision_patches(batch, config),
        trainable_params=trainable,
        lora_modules=modules,
        load_s=round(load_s, 1),
        steps=a.steps,
        warmup=a.warmup,
        step_s_median=round(med, 4),
        tokens_per_s=round(ntok / med, 1),
        peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if dev.type == "cuda"
        else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if dev.type == "cuda"
        else None,
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        losses=[round(x, 4) for x in losses],
        gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        **versions,
        date=datetime.date.today().isoformat(),
    )
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
