"""The per-family benchmark tooling: bench/flops.py's floor of every family, bench/family/suite.py
(run.sh's spec expansion, summary and first-step loss check) and bench/bench_train.py's
vlmflow and HF runs of two tiny families."""

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers as tr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "family"))
import suite  # noqa: E402
from flops import floor_flops, vision_units  # noqa: E402
from helpers import HAND_TEXT  # noqa: E402

TEXT = dict(HAND_TEXT, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=50)
VISION = dict(hidden_size=4, intermediate_size=6, num_hidden_layers=1, patch_size=14, image_size=28)


def text_batch(lengths: list[int], labels: int) -> dict:
    n = max(lengths)
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in lengths])
    lab = torch.full_like(mask, -100)
    lab[0, 1 : 1 + labels] = 1
    return {"input_ids": torch.zeros_like(mask), "attention_mask": mask, "labels": lab}


def test_gemma3_floor_by_hand():
    # one sliding (window 3) and one full-attention layer; SigLIP tower, 2 images of 2x2 patches
    cfg = tr.Gemma3Config(
        text_config=dict(
            TEXT, sliding_window=3, layer_types=["sliding_attention", "full_attention"]
        ),
        vision_config=dict(VISION, model_type="siglip_vision_model"),
    )
    batch = {**text_batch([5, 2], labels=3), "pixel_values": torch.ones(2, 3, 28, 28)}
    # per token and layer: q 2*8*(2*4), k and v 2*8*(1*4) each, o 2*(2*4)*8; gated MLP 2*3*8*16
    per_token = 128 + 128 + 128 + 768
    # causal pairs: full n^2/2; window 3: 3^2/2 + (n - 3) * 3 for n > 3
    sliding_pairs = (9 / 2 + 2 * 3) + 2 * 2 / 2
    full_pairs = 5 * 5 / 2 + 2 * 2 / 2
    attention = 2 * 2 * 2 * 4 * (sliding_pairs + full_pairs)  # QK^T and AV, 2 heads of 4
    head = 2 * 8 * 50 * 3  # label tokens only
    patches = 2 * 4  # no CLS token in SigLIP
    vision = patches * (2 * 3 * 14 * 14 * 4 + 2 * (4 * 4 * 4 + 2 * 4 * 6))
    vision += 2 * 2 * 4 * (4 * 4) * 2  # full attention within each image
    forward = 2 * 7 * per_token + attention + head + vision
    assert floor_flops(cfg, [batch]) == 3 * forward
    assert floor_flops(cfg, [batch], recompute=False) == 2 * forward


def test_mllama_floor_counts_cross_attention_and_tiles():
    cfg = tr.MllamaConfig(
        text_config=dict(TEXT, cross_attention_layers=[1]),
        vision_config=dict(VISION, num_global_layers=1, attention_heads=1),
    )
    # one sample of 6 tokens, one image of 2 tiles: 2x2 patches + CLS = 5, padded to 8 per tile
    batch = {**text_batch([6], labels=2), "pixel_values": torch.ones(1, 1, 2, 3, 28, 28)}
    self_layer = 6 * (128 + 128 + 128 + 768) + 2 * 2 * 2 * 4 * (6 * 6 / 2)
    # cross layer: q, o and the MLP on the 6 text tokens, k and v on the 2 x 5 vision tokens,
    # 6 x 10 query-key pairs (no causal cut)
    cross_layer = 6 * (2 * 2 * 8 * 8 + 768) + 10 * 2 * 2 * 8 * 4 + 2 * 2 * 2 * 4 * 6 * 10
    head = 2 * 8 * 50 * 2
    # vision: 1 local + 1 global layer over both tiles of the image together (16 positions)
    vision = 16 * (2 * 3 * 14 * 14 * 4 + 2 * 2 * (4 * 4 * 4 + 2 * 4 * 6)) + 2 * 2 * 2 * 4 * 16**2
    assert floor_flops(cfg, [batch]) == 3 * (self_layer + cross_layer + head + vision)


def test_moe_counts_the_active_experts_only():
    from flops import mlp_flops_per_token

    dense = dict(hidden_size=8, intermediate_size=16)
    moe = dict(dense, num_experts_per_tok=2, num_experts=8, moe_intermediate_size=4)
    assert mlp_flops_per_token(dense) == 2 * 3 * 8 * 16
    experts = 2 * (2 * 3 * 8 * 4 + 8 * 8)  # 2 active experts of 4 wide + the router over 8
    assert mlp_flops_per_token(moe) == experts
    # Gemma 4's MoE block runs beside the dense MLP; Qwen-MoE's mlp_only_layers are dense
    assert mlp_flops_per_token({**moe, "enable_moe_block": True}) == experts + 2 * 3 * 8 * 16
    assert mlp_flops_per_token({**moe, "mlp_only_layers": [0]}, layer=0) == 2 * 3 * 8 * 16
    assert mlp_flops_per_token({**moe, "mlp_only_layers": [0]}, layer=1) == experts
    assert mlp_flops_per_token({**moe, "decoder_sparse_step": 2}, layer=0) == 2 * 3 * 8 * 16


def test_standard_specs():
    specs = suite.expand(["gemma3", "gemma4", "llava:hf:4bit:--gc,false"])
    assert specs[:4] == [f"gemma3:{i}:{q}" for q in ("16bit", "4bit") for i in ("vlmflow", "hf")]
    assert specs[4:6] == [f"gemma3:unsloth:{q}:timeout=230" for q in ("16bit", "4bit")]
    # Unsloth does not list Gemma 4: no unsloth spec
    assert specs[6:10] == [f"gemma4:{i}:{q}" for q in ("16bit", "4bit") for i in ("vlmflow", "hf")]
    assert specs[10:] == ["llava:hf:4bit:--gc,false"]


def row(impl, quant, loss, tps=100.0, mem=10.0, tag=""):
    return dict(
        family="gemma3",
        impl=impl,
        quant=quant,
        tag=tag,
        tokens_per_s=tps,
        step_s_median=1.0,
        peak_alloc_gib=mem,
        floor_fraction=0.3,
        trainable_params=5,
        loss_first=loss,
        loss_last=loss,
        batch_sha="x",
        load_s=1.0,
    )


def test_loss_check_within_one_percent_of_hf():
    rows = [
        row("hf", "16bit", 10.0),
        row("vlmflow", "16bit", 10.099, tag="close"),
        row("vlmflow", "16bit", 10.2, tag="far"),
        row("unsloth", "4bit", 9.0),
    ]
    lines = suite.loss_check(rows)
    assert (
        lines[0].startswith("loss check gemma3 16bit vlmflow close: PASS") and "1.0099" in lines[0]
    )
    assert lines[1].startswith("loss check gemma3 16bit vlmflow far: FAIL") and "1.0200" in lines[1]
    assert "n/a" in lines[2]  # no 4-bit HF row to compare with


def test_summary_ratios_vs_hf_and_unsloth():
    rows = [
        row("hf", "16bit", 10.0, tps=100, mem=20),
        row("unsloth", "16bit", 10.0, tps=200, mem=8),
        row("vlmflow", "16bit", 10.0, tps=400, mem=10),
    ]
    text = suite.summary(rows)
    vlm = next(x for x in text.splitlines() if x.startswith("| gemma3 | vlmflow"))
    assert "| 4.00 | 0.50 | 2.00 | 1.25 | 0.3 |" in vlm
    assert text.count(": PASS") == 2


@pytest.mark.usefixtures("single_thread")
def test_bench_train_vlmflow_and_hf_on_two_tiny_families(tmp_path, capsys):
    import bench_train

    from vlmflow.tiny import build_tiny

    out = tmp_path / "results.jsonl"
    for family in ("llava", "qwen2_vl"):
        folder = build_tiny(family, tmp_path / family)
        for impl in ("vlmflow", "hf"):
            argv = [str(folder), "--impl", impl, "--quant", "16bit", "--batch", "2"]
            argv += ["--side", "56", "--prompt-words", "5", "--answer-words", "8"]
            bench_train.main([*argv, "--steps", "1", "--warmup", "0", "--out", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["family"], r["impl"]) for r in rows] == [
        (f, i) for f in ("llava", "qwen2_vl") for i in ("vlmflow", "hf")
    ]
    for vlm, hf in (rows[:2], rows[2:]):
        # the same batch, the same LoRA modules, the same first-step loss
        assert vlm["batch_sha"] == hf["batch_sha"]
        assert vlm["lora_modules"] == hf["lora_modules"] and vlm["lora_modules"]["vision"] > 0
        assert vlm["trainable_params"] == hf["trainable_params"] > 0
        assert vlm["loss_first"] == pytest.approx(hf["loss_first"], rel=0.01)
        assert vlm["floor_flop"] == hf["floor_flop"] > 0 and vlm["floor_fraction"] is not None
    assert suite.loss_check(rows) == [
        f"loss check {r['family']} 16bit vlmflow: PASS first-step loss {r['loss_first']} / hf "
        f"{h['loss_first']} = {r['loss_first'] / h['loss_first']:.4f}"
        for r, h in (rows[:2], rows[2:])
    ]


def test_run_sh_expands_a_bare_family_and_keeps_to_the_deadline(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, OUT=str(tmp_path / "out"), MODELS=str(tmp_path / "models"))
    env.update(DEADLINE="1", MIN_SPEC="30", PYTHON=sys.executable, BUNDLES=str(tmp_path / "none"))
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "family" / "run.sh"), "gemma3", "llava:hf:4bit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    skipped = [x.split(": skipped")[0][3:] for x in run.stdout.splitlines() if "skipped" in x]
    assert skipped == [*suite.standard_specs("gemma3"), "llava:hf:4bit"]
    assert not (tmp_path / "models" / "gemma3-real-recommended").exists()  # nothing built


def test_a_patch_size_given_as_a_pair_counts_like_a_number():
    """InternViT's config says patch_size [14, 14] (the floor failed on it on the GPU)."""
    batch = {"pixel_values": torch.ones(5, 3, 448, 448)}  # 4 tiles + a thumbnail
    pair = vision_units("internvl", {"patch_size": [14, 14]}, [batch])
    assert pair == vision_units("internvl", {"patch_size": 14}, [batch]) == [32 * 32] * 5


def test_declare_adds_a_patch_to_the_family_for_the_run(tiny_model, monkeypatch):
    """bench_train --declare: the family's registry entry takes the patch (what the train rule's
    code reads), its other patches stay; the layers of the declared classes then get it."""
    import bench_train

    from vlmflow import families, modeling
    from vlmflow.config import resolve_sections

    monkeypatch.setitem(families.FAMILIES, "qwen3_vl", families.FAMILIES["qwen3_vl"])
    path = tiny_model("qwen3_vl")
    config = tr.AutoConfig.from_pretrained(path)
    before = dict(families.FAMILIES["qwen3_vl"].patches)
    spec = "compiled_checkpoint=Qwen3VLTextDecoderLayer+Qwen3VLVisionBlock"
    fam = bench_train.declare_patches(config, [spec])
    assert families.family_for_config(config) is fam
    assert fam.patches == {
        **before,
        "compiled_checkpoint": ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
    }
    cfg = resolve_sections(
        {
            "model": {"name": path, "max_seq_length": 512},
            "lora": {"r": 4, "lora_alpha": 8},
            "train": {"use_gradient_checkpointing": True, "compile": True},
        },
        ["model", "lora", "train"],
    )
    orig = modeling.compile_layers
    monkeypatch.setattr(
        modeling, "compile_layers", lambda m, **kw: orig(m, backend="aot_eager", **kw)
    )
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    kinds = {
        type(m).__name__ for m in model.modules() if hasattr(m, "_vlmflow_compiled_checkpoint")
    }
    assert kinds == {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"}
    with pytest.raises(SystemExit):
        bench_train.parse_args([path, "--impl", "vlmflow", "--declare", "compiled_checkpoint"])
