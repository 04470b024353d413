"""The training loss: causal-LM cross-entropy on the labelled positions only.

The causal-LM loss needs logits only where a label is set (the answer: about a fifth of the
tokens in a typical VQA batch). `LabelOnlyLoss` runs the model's body (everything but the
output head) once, gathers the hidden states of the labelled positions and runs the head on
those only, in chunks under checkpointing, with the cross-entropy in fp32: the (tokens x vocab)
logits tensor (3.4 GB in fp32 for 5.5k tokens and Qwen's 152k vocabulary) is never
materialised. A final logit softcap (Gemma 4) is applied to those chunks. The value equals
transformers' `ForCausalLMLoss` (tests compare loss and gradients).

As torchtune's `LinearCrossEntropyLoss`, it is set up once for a model
(`set_model_output`: which module is the body, which the head) rather than by changing the
model: the model's own forward, generation and saving are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .collate import IGNORE_INDEX


def chunked_head_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    chunk_size: int = 2048,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `targets`, chunk by chunk.

    hidden: (N, d); targets: (N,) int64 (no ignore index). Each chunk's logits (chunk, V) are
    recomputed in the backward pass instead of being kept. `softcap`: the logits are
    `softcap * tanh(logits / softcap)` first (Gemma's final_logit_softcapping).
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in tests

    def piece(h, t):
        logits = head(h).to(acc)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, t, reduction="sum")

    total = hidden.new_zeros((), dtype=acc)
    for i in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[i : i + chunk_size], targets[i : i + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, h, t, use_reentrant=False)
        else:
            total = total + piece(h, t)
    return total


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the shifted labels are set: (flat indices into the (B * (T - 1)) predicting
    positions, their target ids). Computed on the labels' device; on the CPU, before the batch
    goes to the GPU, it costs the GPU no synchronisation (a boolean index on the GPU does)."""
    shift = labels[:, 1:].reshape(-1)
    index = (shift != IGNORE_INDEX).nonzero().squeeze(1)
    return index, shift.index_select(0, index)


def _head_owner(model) -> torch.nn.Module:
    """The module whose forward runs `.model` (the body) and then `.lm_head` (the head): the
    `...ForConditionalGeneration` of every registry family, inside a PeftModel or not."""
    for module in model.modules():
        if "lm_head" in module._modules and "model" in module._modules:
            return module
    raise ValueError("no module with a .model body and an .lm_head head found on the model")


def final_logit_softcap(model) -> float | None:
    """The final logit softcap of the model's config (top level or text), None if it has none."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        cap = getattr(c, "final_logit_softcapping", None) if c is not None else None
        if cap:
            return cap
    return None


LOSS_CHUNK_ELEMENTS = 1 << 26
"""Logits elements per chunk of the label-only loss (64M: 256 MiB of fp32 logits, and as much
again for their gradient): 256 rows of Gemma's 262k vocabulary, 441 of Qwen's 152k, 2048 (the
cap) of a 32k one. One chunk of 2048 rows of a 262k vocabulary held ~4 GiB at the backward
pass's peak, more than Gemma 3 4B's activations (measured on an H200: 8.02 -> 5.23 GiB)."""


def loss_chunk_rows(vocab_size: int, elements: int | None = None) -> int:
    """Rows per chunk of the label-only loss for a head of `vocab_size` outputs: at most
    `elements` (default `LOSS_CHUNK_ELEMENTS`) logits per chunk, between 64 and 2048 rows."""
    elements = LOSS_CHUNK_ELEMENTS if elements is None else elements
    return max(64, min(2048, elements // max(int(vocab_size), 1)))


def _head_width(owner, head) -> int:
    """Output width of the LM head (PEFT and bitsandbytes linears keep `out_features`)."""
    width = getattr(head, "out_features", None)
    if width is None:
        config = getattr(owner, "config", None)
        text = config.get_text_config() if config is not None else None
        width = getattr(text, "vocab_size", None) or 0
    return int(width)


class LabelOnlyLoss:
    """Causal-LM loss (mean over labelled tokens, or sum / num_items_in_batch) with the head run
    on the labelled positions only. Set up once per model with `set_model_output`.
    `chunk_size`: rows of logits per chunk (default: `loss_chunk_rows` of the head's width)."""

    def __init__(self, chunk_size: int | None = None):
        self.requested_chunk_size = chunk_size
        self.chunk_size = chunk_size
        self.body = self.head = None
        self.softcap = None

    def set_model_output(self, model) -> LabelOnlyLoss:
        """Use `model`'s body for the hidden states and its head (and final logit softcap) for
        the logits. Returns self."""
        owner = _head_owner(model)
        self.body, self.head = owner.model, owner.lm_head
        self.softcap = final_logit_softcap(owner)
        if self.requested_chunk_size is None:
            self.chunk_size = loss_chunk_rows(_head_width(owner, self.head))
        return self

    def __call__(
        self,
        batch: dict,
        num_items_in_batch: int | None = None,
        positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """batch: the collator's dict (input_ids (B, T), labels (B, T), attention_mask, image
        tensors). positions: `label_positions(labels)` on the model's device, if known."""
        if self.body is None:
            raise RuntimeError("LabelOnlyLoss.set_model_output(model) was not called")
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.body(**inputs, use_cache=False)[0]  # (B, T, d): the last hidden states
        index, targets = positions if positions is not None else label_positions(labels)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)
        total = chunked_head_loss(h, targets, self.head, self.chunk_size, softcap=self.softcap)
        denom = num_items_in_batch if num_items_in_batch is not None else int(index.numel())
        return total / max(denom, 1)


def model_loss(model) -> LabelOnlyLoss:
    """The loss installed on `model` (`model.vlmflow_loss`), set up on first use."""
    loss = getattr(model, "vlmflow_loss", None)
    if loss is None:
        loss = LabelOnlyLoss().set_model_output(model)
        model.vlmflow_loss = loss
    return loss


def label_only_loss(
    model,
    batch: dict,
    num_items_in_batch: int | None = None,
    chunk_size: int | None = None,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`LabelOnlyLoss(chunk_size)` set up for `model`, applied to `batch` once."""
    loss = LabelOnlyLoss(chunk_size).set_model_output(model)
    return loss(batch, num_items_in_batch=num_items_in_batch, positions=positions)
