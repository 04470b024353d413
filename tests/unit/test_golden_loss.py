"""Golden losses: the per-step losses of one tiny Qwen2.5-VL run, pinned per dtype (as torchtune
pins its recipes' losses). Any change to label masking, loss normalisation, data order, LoRA
initialisation, the optimizer or the learning-rate schedule moves them.

The run: the tiny Qwen2.5-VL of `vlmflow.tiny` (seed 0), the 200-image digits demo (train split),
batch 4 x 2 accumulation steps, 6 steps of AdamW at 2e-3 with 2 warm-up steps and a cosine
schedule, LoRA r=8 with the head and projector trained, one CPU thread (`single_thread`).
Recorded on the CPU with torch 2.14.1, transformers 5.17.0, peft 0.21.2 (the pinned versions).

Tolerance: fp32 rtol 1e-5 (the log keeps 6 decimals; kernels of another CPU round differently
in the last bits); bf16 rtol 2e-4 (bf16 matmuls on CPUs with and without native bf16 differ by
more). Both are far below what a change of the recipe does (checked by hand, fp32): not
training the end-of-turn token moves the losses by up to 3.7%, dividing by one more token 5.9%,
one more warm-up step 1.5%.
"""

import pytest
import torch

from vlmflow.config import resolve_sections
from vlmflow.train import read_log, train

pytestmark = pytest.mark.usefixtures("single_thread")

GOLDEN = {
    "float32": ([6.006899, 5.99036, 5.824703, 5.673176, 5.457209, 5.295084], 1e-5),
    "bfloat16": ([6.00716, 5.989946, 5.825624, 5.673255, 5.45773, 5.295599], 2e-4),
}


@pytest.mark.parametrize("dtype", sorted(GOLDEN))
def test_tiny_qwen_run_reproduces_the_golden_losses(dtype, tiny_qwen, digits_rows, tmp_path):
    cfg = resolve_sections(
        {
            "model": {"name": tiny_qwen, "max_seq_length": 256, "dtype": dtype},
            "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head", "projector"]},
            "train": {
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "max_steps": 6,
                "learning_rate": 2e-3,
                "warmup_steps": 2,
                "lr_scheduler_type": "cosine",
                "optim": "adamw_torch",
                "use_gradient_checkpointing": False,
                "cache_encoded": True,
                "seed": 1,
            },
        },
        ["model", "lora", "train"],
    )
    assert torch.get_num_threads() == 1
    rows = [r for r in digits_rows if r["split"] == "train"]
    train(cfg, rows, tmp_path / "adapter", tmp_path / "work")
    losses = [r["loss"] for r in read_log(tmp_path / "adapter" / "train_log.jsonl")]
    want, rtol = GOLDEN[dtype]
    torch.testing.assert_close(
        torch.tensor(losses, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )
