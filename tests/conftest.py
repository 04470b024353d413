import os

# No network anywhere in the tests: every model and processor is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2.5-VL + processor saved to disk (loaded back via from_pretrained)."""
    from vlmflow.tiny import build_tiny

    return str(build_tiny("qwen2_5_vl", tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from vlmflow.demo import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out, limit=200)
    return out


@pytest.fixture(scope="session")
def digits_rows(digits_dir):
    """Canonical conversation rows of the 200-image digits folder."""
    from vlmflow import data, images

    src = data.Source(path=str(digits_dir / "data.jsonl"), image_root=str(digits_dir))
    recs = images.validate_images(data.seed_image_refs(src), images.ImagePolicy(), progress=False)
    acc, rej = data.seed_to_conversations(
        src, {(r["root"], r["path"]): r for r in recs}, {"val": 0.1, "test": 0.2, "seed": 0}
    )
    assert not rej
    return acc


@pytest.fixture(scope="session")
def trained_adapter(tiny_qwen, digits_rows, tmp_path_factory):
    """A LoRA adapter (plus trained head and projector) after a few steps on the digits."""
    from vlmflow.config import resolve_sections
    from vlmflow.train import train

    cfg = resolve_sections(
        {
            "model": {"name": tiny_qwen, "max_seq_length": 256},
            "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head", "projector"]},
            "train": {
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1,
                "max_steps": 6,
                "learning_rate": 2e-3,
                "optim": "adamw_torch",
                "use_gradient_checkpointing": False,
            },
        },
        ["model", "lora", "train"],
    )
    out = tmp_path_factory.mktemp("runs") / "adapter"
    train(cfg, [r for r in digits_rows if r["split"] == "train"], out, out.parent / "work")
    return str(out)
