"""Fast paths of the training step. Each computes the same function as the transformers code it
replaces (tests compare them on random inputs); they change how, not what.

- `batched_vision_attention`: Qwen2/2.5/3-VL vision towers run attention window by window
  (Qwen2.5-VL: 256 windows x 28 windowed blocks per pass for four 896x896 images, thousands of
  tiny kernels). Windows of equal length are stacked and sent through one SDPA call per length.
- `label_only_loss`: the causal-LM loss needs logits only where a label is set (the answer:
  about a fifth of the tokens in a typical VQA batch). The head runs on those positions only, in
  chunks under checkpointing, with the cross-entropy in fp32: the (tokens x vocab) logits tensor
  (3.4 GB in fp32 for 5.5k tokens and Qwen's 152k vocabulary) is never materialised.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
_VISION_ATTENTION_CLASSES = {
    "Qwen2_5_VLVisionAttention",
    "VisionAttention",
    "Qwen3VLVisionAttention",
}


# ---------------------------------------------------------------- batched window attention
def windowed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Block-diagonal attention over the segments given by `cu_seqlens`.

    q, k, v: (N, H, D) for N tokens; cu_seqlens: (S + 1,) segment boundaries. Returns (N, H, D).
    Segments of equal length go through one SDPA call (a reshape when they are contiguous and
    cover everything, a gather/scatter otherwise).
    """
    n = q.shape[0]
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if len(set(lengths)) == 1 and bounds[-1] == n:
        length = lengths[0]
        qb, kb, vb = (
            t.reshape(n // length, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return out.transpose(1, 2).reshape(n, *q.shape[1:])
    groups: dict[int, list[int]] = defaultdict(list)
    for start, length in zip(bounds[:-1], lengths):
        if length:
            groups[length].append(start)
    out = torch.empty_like(q)
    for length, starts in groups.items():
        idx = (
            torch.tensor(starts, device=q.device)[:, None]
            + torch.arange(length, device=q.device)[None, :]
        )  # (nb, L)
        qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # (nb, H, L, D)
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        out[idx] = o.transpose(1, 2).to(out.dtype)
    return out


def _qwen_vision_attention_forward(
    self,
    hidden_states,
    cu_seqlens,
    rotary_pos_emb=None,
    position_embeddings=None,
    max_seqlen=None,
    **kwargs,
):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    if position_embeddings is None and isinstance(rotary_pos_emb, tuple):
        position_embeddings = rotary_pos_emb
    seq_length = hidden_states.shape[0]
    q, k, v = (
        self.qkv(hidden_states)
        .reshape(seq_length, 3, self.num_heads, -1)
        .permute(1, 0, 2, 3)
        .unbind(0)
    )
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = windowed_sdpa(q, k, v, cu_seqlens, self.scaling)
    return self.proj(out.reshape(seq_length, -1))


def batched_vision_attention(model) -> int:
    """Route the vision attention of Qwen-VL towers through `windowed_sdpa` (per instance).

    Only for SDPA/eager attention (flash-attention's varlen path is already one call).
    Returns the number of patched modules.
    """
    n = 0
    for module in model.modules():
        if type(module).__name__ not in _VISION_ATTENTION_CLASSES:
            continue
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager", None):
            continue
        if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling")):
            continue
        module.forward = types.MethodType(_qwen_vision_attention_forward, module)
        n += 1
    return n


# ------------------------------------------------------------------------ label-only loss
def _find_lm_head_owner(model):
    """(owner, attribute) of the output head: the module whose `.lm_head` the forward calls."""
    for module in model.modules():
        if "lm_head" in module._modules:
            return module
    raise ValueError("no lm_head found on the model")


def _has_logit_softcapping(model) -> bool:
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "final_logit_softcapping", None):
            return True
    return False


@contextlib.contextmanager
def _head_bypassed(owner):
    head = owner.lm_head
    owner.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        owner.lm_head = head


def chunked_head_loss(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_size: int = 2048
) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `targets`, chunk by chunk.

    hidden: (N, d); targets: (N,) int64 (no ignore index). Each chunk's logits (chunk, V) are
    recomputed in the backward pass instead of being kept.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in tests

    def piece(h, t):
        return F.cross_entropy(head(h).to(acc), t, reduction="sum")

    total = hidden.new_zeros((), dtype=acc)
    for i in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[i : i + chunk_size], targets[i : i + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, h, t, use_reentrant=False)
        else:
            total = total + piece(h, t)
    return total


def label_only_loss(
    model, batch: dict, num_items_in_batch: int | None = None, chunk_size: int = 2048
) -> torch.Tensor:
    """Causal-LM loss (mean over labelled tokens, or sum / num_items_in_batch) computed with the
    head on labelled positions only. Same value as transformers' ForCausalLMLoss.

    batch: the collator's dict (input_ids (B, T), labels (B, T), attention_mask, image tensors).
    """
    labels = batch["labels"]
    if _has_logit_softcapping(model):  # the head's output is transformed: use the model's loss
        return model(**batch, num_items_in_batch=num_items_in_batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    owner = _find_lm_head_owner(model)
    with _head_bypassed(owner) as head:
        hidden = model(**inputs, use_cache=False).logits  # (B, T, d): the head is bypassed
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    h = hidden[:, :-1][mask]
    total = chunked_head_loss(h, shift[mask], head, chunk_size)
    denom = num_items_in_batch if num_items_in_batch is not None else int(mask.sum())
    return total / max(denom, 1)
