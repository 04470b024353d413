#!/usr/bin/env python
"""Time LoRA/QLoRA training steps of one model folder of any registered family under one
implementation, on the same batch and weights for every implementation:

- vlmflow: the product's own step (vlmflow.modeling.build_training_model +
  vlmflow.train.train_step, as the train rule calls them), configured by `cfg_for` + --set;
- hf: plain transformers + PEFT (+ bitsandbytes NF4 for 4-bit), LoRA on exactly the modules
  vlmflow targets (the registry's `Family.lora_target_regex` with the same lora.finetune_* flags);
- unsloth: FastVisionModel.from_pretrained / get_peft_model (use_gradient_checkpointing=
  "unsloth") with the same LoRA targets (or Unsloth's own selection: --unsloth-targets flags).

The family is read from the folder's config (--family only checks it); the batch is encoded by
vlmflow's Encoder with the folder's processor and collated with the family's batch layout.

Fixed case (issue 7): --batch samples (4), each one --side px square image (896) + a
--prompt-words (40) prompt + an --answer-words (300) answer; loss on the answer only; LoRA
r=16/alpha=16 on every attention and MLP linear of the vision tower and the language model;
gradient checkpointing on; AdamW (torch, fused on CUDA) lr 1e-4 for every implementation.

    python bench/bench_train.py MODEL --impl vlmflow --quant 4bit --out bench/results/x.jsonl

Realistic case (--case realistic): 64 samples with image sides 224-1344 px and answers of 5-500
words, one optimizer step over micro-batches of --batch samples; tokens_per_s counts useful
(non-padding) tokens, padded_tokens_per_step what the model computed. --group-by-length sorts the
64 samples by length before cutting micro-batches (train.group_by_length); --packing packs each
micro-batch padding-free into rows (train.packing, vlmflow only). Same samples, same loss.

Prints per-step lines and one `RESULT {json}` line (median step time of --steps after
--warmup; floor_fraction: the share of bench/flops.py's FLOP floor reached at its PEAK_FLOPS),
appended to --out. batch_sha and trainable_params let a reader check equal work.
"""

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

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


def fixed_rows(
    batch: int, side: int, answer_words: int, tmpdir: str, prompt_words: int = 40
) -> list[dict]:
    """The anchor benchmark's batch as canonical conversation rows (images written as PNG)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(batch):
        img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        path = f"{tmpdir}/img{i}.png"
        img.save(path)
        q = " ".join(rng.choice(WORDS, prompt_words))
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
    """`--set section.key=value` (value parsed as YAML) into the raw config sections; a dotted
    key reaches into a mapping (`train.fast_paths.tile_attention=false`)."""
    import yaml

    for item in overrides:
        key, _, value = item.partition("=")
        *path, name = key.split(".")
        node = sections
        for part in path:
            node = node.setdefault(part, {})
        node[name] = yaml.safe_load(value)
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


def lora_targets(model, family, lora_cfg: dict) -> tuple[str, list[str] | None]:
    """PEFT target_modules that wrap exactly the linears vlmflow wraps (the registry's regex for
    the lora.finetune_* flags, resolved to module names and matched whole), and the fused MoE
    expert parameters it wraps through target_parameters (None for a dense family)."""
    import re

    from vlmflow.families import lora_target_names, parameter_names

    regex = family.lora_target_regex(
        vision=lora_cfg["finetune_vision_layers"],
        language=lora_cfg["finetune_language_layers"],
        attention=lora_cfg["finetune_attention_modules"],
        mlp=lora_cfg["finetune_mlp_modules"],
    )
    names = lora_target_names(model.named_modules(), regex)
    if not names:
        raise SystemExit(f"the {family.name} registry entry selects no linear of this model")
    experts = []
    if lora_cfg["finetune_language_layers"] and lora_cfg["finetune_mlp_modules"]:
        experts = parameter_names(model.named_modules(), family.expert_regex())
    return "|".join(re.escape(n) for n in names), experts or None


# The LoRA both reference runs (plain PEFT and Unsloth) put on the model.
LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0, bias="none")


def build_hf(model: str, quant: str, gc: bool, family, lora_cfg: dict):
    """The baseline as ../shared/anchor-bench/train_bench.py --impl hf builds it: sdpa, bf16,
    bitsandbytes NF4 + double quantization for 4-bit with prepare_model_for_kbit_training,
    non-reentrant checkpointing, LoRA through get_peft_model on vlmflow's targets."""
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
    modules, experts = lora_targets(m, family, lora_cfg)
    config = LoraConfig(
        **LORA,
        target_modules=modules,
        target_parameters=experts,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(m, config)


def build_unsloth(model_dir: str, quant: str, family, lora_cfg: dict, own_targets: bool):
    """FastVisionModel as the anchor harness uses it, on vlmflow's targets unless own_targets."""
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        model_dir,
        load_in_4bit=quant == "4bit",
        max_seq_length=8192,
        use_gradient_checkpointing="unsloth",
    )
    kw = {} if own_targets else {"target_modules": lora_targets(model, family, lora_cfg)[0]}
    model = FastVisionModel.get_peft_model(
        model,
        **LORA,
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
    if pv.ndim == 2:
        return int(pv.shape[0])
    if config.model_type == "gemma4":  # (images, patches, 3 * p * p), already patchified
        return int(pv.shape[0] * pv.shape[1])
    p = getattr(config.vision_config, "patch_size", 14)
    ph, pw = p if isinstance(p, (list, tuple)) else (p, p)  # InternViT: [14, 14]
    return int(pv.numel() // (pv.shape[-3] * ph * pw))


def lora_modules(model, family) -> dict[str, int]:
    """LoRA-wrapped modules by part (vision blocks / decoder layers / elsewhere)."""
    import re

    vis = re.compile(rf"(?:.*\.)?{family.vision_layers}\..+")
    lang = re.compile(rf"(?:.*\.)?{family.language_layers}\..+")
    out = {"vision": 0, "language": 0, "other": 0}
    for name, mod in model.named_modules():
        if not len(getattr(mod, "lora_A", None) or {}):
            continue
        key = "vision" if vis.fullmatch(name) else "language" if lang.fullmatch(name) else "other"
        out[key] += 1
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", help="model folder (bench/make_model.py, bench/family/make_family.py)")
    ap.add_argument("--impl", required=True, choices=["vlmflow", "hf", "unsloth"])
    ap.add_argument(
        "--family", default=None, help="registry name the folder must have (default: its config's)"
    )
    ap.add_argument("--quant", default="4bit", choices=["4bit", "16bit"])
    ap.add_argument(
        "--gc",
        default="auto",
        help="gradient checkpointing. vlmflow: auto | true | offload | false (train."
        "use_gradient_checkpointing; auto, its default, offloads in 4-bit on a GPU; rows before "
        "2026-12-04 ran with true); hf: on unless false; unsloth: always its 'unsloth' mode",
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", type=int, default=896)
    ap.add_argument("--prompt-words", type=int, default=40)
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
        help="override a config key, e.g. --set model.quantize_vision=true (vlmflow; lora.* keys "
        "also choose the hf/unsloth targets)",
    )
    ap.add_argument(
        "--unsloth-targets",
        choices=["harness", "flags"],
        default="harness",
        help="harness: vlmflow's LoRA targets (same as hf); flags: Unsloth's own selection",
    )
    ap.add_argument("--tag", default="", help="label of this variant in the output")
    ap.add_argument(
        "--profile", default=None, help="after timing, profile one step; write the tables here"
    )
    ap.add_argument(
        "--profile-stack",
        action="store_true",
        help="--profile with Python frames (with_stack): the GPU's idle time charged to the "
        "Python functions and modules running meanwhile (slower steps under the profiler)",
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
    ap.add_argument(
        "--declare",
        action="append",
        default=[],
        metavar="PATCH=CLASS[+CLASS...]",
        help="vlmflow: declare a family patch for these classes in this run (e.g. "
        "compiled_checkpoint=Qwen3VLTextDecoderLayer+Qwen3VLVisionBlock; '+' because run.sh "
        "turns commas into spaces), to time a fast path on a family that does not take it",
    )
    ap.add_argument("--out", default=None, help="append the RESULT json line to this file")
    a = ap.parse_args(argv)
    for spec in a.declare:
        if "=" not in spec or not spec.split("=", 1)[1]:
            ap.error(f"--declare {spec!r}: expected PATCH=CLASS[+CLASS...]")
    if (a.packing or a.group_by_length) and a.case != "realistic":
        ap.error("--packing and --group-by-length apply to --case realistic")
    if a.packing and a.impl != "vlmflow":
        ap.error("--packing needs --impl vlmflow (the baseline does not pack)")
    return a


def declare_patches(config, specs: list[str]):
    """The registry entry of `config`'s family with `--declare` specs added to its `patches`
    (it replaces the entry in `vlmflow.families.FAMILIES`, which every lookup reads)."""
    from dataclasses import replace
    from types import MappingProxyType

    from vlmflow.families import FAMILIES, family_for_config

    family = family_for_config(config)
    patches = dict(family.patches)
    for spec in specs:
        patch, classes = spec.split("=", 1)
        patches[patch] = tuple(classes.split("+"))
    FAMILIES[family.name] = replace(family, patches=MappingProxyType(patches))
    return FAMILIES[family.name]


def build(a, cfg: dict, config, dev):
    """(model, processor, family, dtype of the image tensors) of the chosen implementation."""
    from vlmflow.families import family_for_config
    from vlmflow.modeling import build_training_model, load_processor, resolve_dtype

    family = family_for_config(config)
    if a.family and a.family != family.name:
        raise SystemExit(f"{a.model} holds a {family.name} model, not --family {a.family}")
    if a.impl == "vlmflow":
        model, processor, family = build_training_model(cfg, dev)
        dtype = resolve_dtype(cfg["model"]["dtype"], dev)
    else:
        if a.impl == "hf":
            model = build_hf(a.model, a.quant, a.gc != "false", family, cfg["lora"])
        else:
            own = a.unsloth_targets == "flags"
            model = build_unsloth(a.model, a.quant, family, cfg["lora"], own)
        processor = load_processor(cfg["model"], family)
        dtype = torch.bfloat16
    return model, processor, family, torch.bfloat16 if dev.type == "cuda" else dtype


def make_batches(a, encoder, family, model, dtype) -> tuple[list[dict], str]:
    """The step's collated micro-batches (the train rule's collate for the family's layout) and
    the first one's batch_sha, taken before the images are cast to the model's dtype."""
    import tempfile

    from vlmflow.collate import collate, collate_packed, rope_index_fn

    with tempfile.TemporaryDirectory() as tmp:
        if a.case == "fixed":
            rows = fixed_rows(a.batch, a.side, a.answer_words, tmp, a.prompt_words)
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
        batches = [collate(c, encoder.pad_id, family.batch_layout) for c in chunks]
    sha = batch_sha(batches[0])
    for b in batches:
        if "pixel_values" in b:
            b["pixel_values"] = b["pixel_values"].to(dtype)
    return batches, sha


def versions() -> dict:
    out = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}
    for m in ("bitsandbytes", "unsloth"):
        if m in sys.modules:
            out[m] = getattr(sys.modules[m], "__version__", "?")
    return out


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.impl == "unsloth":
        import unsloth  # noqa: F401  (before transformers and peft: it patches them on import)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flops import PEAK_FLOPS, floor_flops
    from transformers import AutoConfig

    from vlmflow.collate import Encoder, count_tokens
    from vlmflow.modeling import gradient_checkpointing_mode
    from vlmflow.train import build_optimizer, build_scheduler, train_step

    if a.set and a.impl != "vlmflow":
        print(f"note: --set {a.set} configures vlmflow; {a.impl} takes only its LoRA targets")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the train rule's settings for these flags (train.packing also switches the attention)
    flags = [f"train.{k}=true" for k in ("packing", "group_by_length") if getattr(a, k)]
    cfg = cfg_for(a.model, a.quant, a.gc, [*flags, *a.set])
    config = AutoConfig.from_pretrained(a.model)
    if a.declare:
        print(f"declared for this run: {dict(declare_patches(config, a.declare).patches)}")
    t0 = time.time()
    model, processor, family, dtype = build(a, cfg, config, dev)
    load_s = time.time() - t0
    # what the weights, LoRA and any offload hold before a step: peak minus this is the step's
    loaded_gib = round(torch.cuda.memory_allocated() / 2**30, 2) if dev.type == "cuda" else None
    encoder = Encoder(processor, family, max_seq_length=cfg["model"]["max_seq_length"])
    batches, sha = make_batches(a, encoder, family, model, dtype)
    batch = batches[0]
    ntok = sum(count_tokens(b) for b in batches)  # useful (non-padding) tokens
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    image_tokens = sum(int((b["input_ids"] == encoder.image_token_id).sum()) for b in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    modules = lora_modules(model, family)
    print(
        f"{family.name} {a.impl}: {len(batches)} micro-batches, first {sha} "
        f"{tuple(batch['input_ids'].shape)}; {ntok} real tokens, {image_tokens} "
        f"{family.image_token}, {n_items} labelled; trainable {sum(p.numel() for p in params)} "
        f"in LoRA modules {modules}; loaded in {load_s:.1f} s",
        flush=True,
    )
    # Every implementation: AdamW (torch, fused on CUDA), lr 1e-4, no clipping/decay, constant.
    opt = build_optimizer(params, cfg["train"], dev)
    sched = build_scheduler(opt, cfg["train"], a.warmup + a.steps)
    model.train()

    def one_step(batches=batches):
        if a.impl == "vlmflow":  # the train rule's step
            return train_step(
                model, batches, opt, sched, params, max_grad_norm=0.0, device=dev
            ).loss
        loss = 0.0
        for mb in batches:
            b = {k: v.to(dev) for k, v in mb.items()}
            kw = {"num_items_in_batch": n_items} if a.impl == "hf" else {}
            micro = model(**b, **kw).loss  # unsloth: the anchor harness's step
            micro.backward()
            loss += micro.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

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
    floor = floor_flops(config, batches, recompute=a.gc != "false" or a.impl == "unsloth")
    info = {}
    if (Path(a.model) / "make_family.json").is_file():
        info = json.loads((Path(a.model) / "make_family.json").read_text())
    tc, vc = config.get_text_config(), config.vision_config
    res = dict(
        family=family.name,
        impl=a.impl,
        tag=a.tag,
        overrides=a.set,
        declared=a.declare,
        quant=a.quant,
        gc=a.gc if a.impl != "unsloth" else "unsloth",
        gc_applied=gradient_checkpointing_mode(
            cfg["train"]["use_gradient_checkpointing"], cfg["model"], dev, family
        )
        if a.impl == "vlmflow"
        else None,
        unsloth_targets=a.unsloth_targets if a.impl == "unsloth" else None,
        model=Path(a.model).name,
        checkpoint=info.get("checkpoint"),
        scale=info.get("scale"),
        text_layers=getattr(tc, "num_hidden_layers", None),
        vision_layers=getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", None),
        case=a.case,
        packing=a.packing,
        group_by_length=a.group_by_length,
        batch=a.batch,
        side=a.side,
        prompt_words=a.prompt_words,
        answer_words=a.answer_words,
        batch_sha=sha,
        rows_per_step=sum(int(b["input_ids"].shape[0]) for b in batches),
        padded_tokens_per_step=sum(b["input_ids"].numel() for b in batches),
        seq_len=int(batch["input_ids"].shape[1]),
        tokens_per_step=ntok,
        image_tokens=image_tokens,
        label_tokens=n_items,
        vision_patches=sum(vision_patches(b, config) or 0 for b in batches),
        trainable_params=sum(p.numel() for p in params),
        lora_modules=modules,
        load_s=round(load_s, 1),
        loaded_alloc_gib=loaded_gib,
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
        floor_flop=floor,
        # share of the arithmetic floor at PEAK_FLOPS (bench/flops.py)
        floor_fraction=round(floor / PEAK_FLOPS / med, 3) if floor and times else None,
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        losses=[round(x, 4) for x in losses],
        gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        **versions(),
        date=datetime.date.today().isoformat(),
    )
    print("RESULT " + json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    if a.profile:  # the realistic case: its first 4 micro-batches (a whole step's trace is huge)
        some = batches[:4]
        title = f"{a.impl} {a.quant} gc={a.gc} {a.tag} ({len(some)} micro-batches)"
        profile_step(lambda: one_step(some), a.profile, title, dev, stack=a.profile_stack)


KERNEL_KINDS = (  # (label, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn_generated", "sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "wgmma", "splitk", "matmul", "gemv")),
    ("nf4 dequant", ("dequant", "kdequantize", "kgemm_4bit")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copy/cast", ("copy", "memcpy", "memset", "cat", "index", "gather", "scatter")),
    ("reduce/norm", ("reduce", "norm", "softmax", "cross_entropy", "nll", "logsumexp")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton")),
)


def profile_step(one_step, path: str, title: str, dev, stack: bool = False) -> None:
    """One step under torch.profiler: wall time, GPU busy time, time by kernel kind, top
    kernels, top CPU-side ops and the GPU's idle time charged to the host work that ran during
    it (`timeline.py`; with `stack`, to Python frames too), written to `path` (and the summary
    printed); the Chrome trace beside it (`path`.trace.json.gz)."""
    from collections import defaultdict

    from timeline import charge_idle, load, report
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=acts, with_stack=stack) as prof:
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
    trace = f"{path}.trace.json.gz"  # torch.profiler gzips a path ending in .gz
    prof.export_chrome_trace(trace)
    lines += ["", *report(charge_idle(load(trace)))]
    text = "\n".join(lines)
    with open(path, "a") as f:
        f.write(text + "\n\n")
    print("\n".join(lines[: 12 + len(by_kind)]), flush=True)


if __name__ == "__main__":
    main()
