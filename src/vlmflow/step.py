"""The training step shared by the train rule and the GPU benchmark (bench/bench_train.py):
one model-building function and one forward/backward function, so that what is timed is what
the workflow runs."""

from __future__ import annotations

import logging

import torch

from .fast import batched_vision_attention, label_only_loss
from .modeling import apply_lora, load_model

log = logging.getLogger(__name__)


def build_training_model(cfg: dict, device: torch.device):
    """Load the base model, put LoRA on it and switch on the fast paths. Returns (model, family).

    `cfg` holds the resolved `model`, `lora` and `train` sections.
    """
    model, family = load_model(cfg["model"], device)
    patched = batched_vision_attention(model)
    if patched:
        log.info("batched window attention on %d vision attention modules", patched)
    model = apply_lora(
        model,
        family,
        cfg["lora"],
        gradient_checkpointing=cfg["train"]["use_gradient_checkpointing"],
    )
    return model, family


def training_step(
    model, micro_batches: list[dict], num_items: int, device: torch.device
) -> torch.Tensor:
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate).

    The loss of each micro-batch is its summed token cross-entropy divided by `num_items` (the
    labelled tokens of the whole step), so the accumulated gradient is that of the step's mean
    token loss whatever the split into micro-batches. Returns the step's loss (a 0-d tensor).
    """
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(_compute_dtype(model))
        loss = label_only_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        total += loss.detach()
    return total


def _compute_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16, torch.float32) and not p.requires_grad:
            return p.dtype
    return torch.float32
