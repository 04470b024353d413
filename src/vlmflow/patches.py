"""Monkeypatches of transformers / PEFT for the training step (the fast paths). Each computes
the same function as the transformers code it replaces (tests compare them on random inputs);
they change how, not what. Each can be switched off (`train.fast_paths`).

- `batched_vision_attention`: Qwen2/2.5/3-VL vision towers run attention window by window
  (Qwen2.5-VL: 256 windows x 28 windowed blocks per pass for four 896x896 images, thousands of
  tiny kernels). Windows of equal length are stacked and sent through one SDPA call per length.
- `linear_patch_embed`: the Qwen-VL patch embedding is a Conv3d whose kernel equals its stride
  and its input: one output per patch, i.e. a single GEMM on the flattened patches. cuDNN's
  3-D convolution is far slower than that GEMM; the weights are viewed, not copied.
- `fast_lora`: PEFT runs each LoRA branch in the adapter's dtype (fp32), so every adapted
  linear first copies its input to fp32 (5.5k x 18.9k floats before Qwen's down_proj) and
  multiplies in fp32. Here the branch multiplies in the input's dtype (bf16 on a GPU) with the
  fp32 adapter weights cast on the fly (a few KB), and the add is fused into the second GEMM;
  gradients still reach the fp32 master weights (Unsloth's LoRA also computes in bf16).
- `packed_attention`: with `train.packing`, transformers gives SDPA a dense block-diagonal mask
  of every packed row (rows of several thousand tokens), which rules out the flash kernel and
  computes every cross-sample block only to mask it. Here each sample of a row is one causal
  SDPA call over its own tokens (flash on a GPU): the same attention, without the masked work.
- `tile_attention`: Mllama's vision encoder attends over all tiles of an image at once (4 x
  1608 positions) under a dense mask that hides only padding keys from padding queries; the
  masked kernel is slower than flash. Here: one unmasked call, then the padding rows again.
- `block_attention`: Pixtral's vision tower (Pixtral, Mistral 3) attends over all images'
  patches as one sequence under a dense block-diagonal mask (T x T over every image of the
  batch). Here each image attends over its own patches, unmasked, equal-size images batched.
- `save_attention`: gradient checkpointing recomputes a layer's forward in the backward pass,
  attention kernel included (the costliest part of a vision tower's forward: thousands of
  patches per image). Here the attention kernel's output is kept instead (selective activation
  checkpointing); the rest is recomputed as before.
- `compile_layers`: regional torch.compile of decoder layers and vision blocks.
- `use_torch_gated_delta_rule`: the PyTorch reference of the gated delta rule where
  flash-linear-attention's kernel cannot train.

The training loss is in `vlmflow.loss`, activation offloading in `vlmflow.offload`.
"""

from __future__ import annotations

import itertools
import logging
import re
import types
import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F

from .families import family_for_config

log = logging.getLogger(__name__)


def declared_classes(model, patch: str) -> tuple[str, ...]:
    """The transformers class names the model's registry family declares for `patch`
    (`Family.patches`); () when the family does not take it."""
    return family_for_config(model.config).patches.get(patch, ())


# ---------------------------------------------------------------- batched window attention
_PLANS: dict[int, tuple] = {}


def _segments(cu_seqlens: torch.Tensor) -> tuple[list[int], list[int]]:
    """(bounds, lengths) of `cu_seqlens` as Python lists. The vision tower passes the same tensor
    to every block (and again when a checkpointed block is recomputed): it is read from the GPU
    once per forward instead of once per block (each read waits for the GPU to catch up)."""
    bounds, lengths, _ = _plan(cu_seqlens)
    return bounds, lengths


def _once_per_tensor(cache: dict, tensor: torch.Tensor, build):
    """`build(tensor)`, computed once per tensor object (and in-place version) and reused while
    that tensor lives: what a forward passes unchanged to every layer is read from the GPU once."""
    key = id(tensor)
    hit = cache.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    value = build(tensor)
    if len(cache) > 64:
        cache.clear()
    cache[key] = (weakref.ref(tensor), tensor._version, value)
    return value


def _plan(cu_seqlens: torch.Tensor) -> list:
    """[bounds, lengths, {device: gather indices}] of `cu_seqlens`, once per tensor; the gather
    indices of `windowed_sdpa` are added on first use, so each is built and copied to the device
    once per forward, not once per block."""

    def build(cu):
        bounds = cu.tolist()
        return [bounds, [b - a for a, b in zip(bounds[:-1], bounds[1:])], {}]

    return _once_per_tensor(_PLANS, cu_seqlens, build)


def _window_groups(cu_seqlens: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Per distinct segment length L, the (segments of length L, L) token index on `device`."""
    bounds, lengths, cache = _plan(cu_seqlens)
    key = str(device)
    if key not in cache:
        groups: dict[int, list[int]] = defaultdict(list)
        for start, length in zip(bounds[:-1], lengths):
            if length:
                groups[length].append(start)
        cache[key] = [
            (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).to(
                device, non_blocking=True
            )
            for length, starts in groups.items()
        ]
    return cache[key]


@torch.compiler.disable  # under train.compile: a graph break, not a graph per window layout
def windowed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Block-diagonal attention over the segments given by `cu_seqlens`.

    q, k, v: (N, H, D) for N tokens; cu_seqlens: (S + 1,) segment boundaries. Returns (N, H, D).
    Segments of equal length go through one SDPA call (a reshape when they are contiguous and
    cover everything, a gather/scatter otherwise).
    """
    n = q.shape[0]
    bounds, lengths = _segments(cu_seqlens)
    if len(set(lengths)) == 1 and bounds[-1] == n:
        length = lengths[0]
        qb, kb, vb = (
            t.reshape(n // length, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
        return out.transpose(1, 2).reshape(n, *q.shape[1:])
    out = torch.empty_like(q)
    for idx in _window_groups(cu_seqlens, q.device):  # (nb, L)
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


def batched_vision_attention(model, classes: tuple[str, ...] | None = None) -> int:
    """Route the vision attention of Qwen-VL towers through `windowed_sdpa` (per instance):
    modules of the `classes` (default: those the model's family declares for
    `vision_attention`).

    Only for SDPA/eager attention (flash-attention's varlen path is already one call).
    Returns the number of patched modules.
    """
    if classes is None:
        classes = declared_classes(model, "vision_attention")
    n = 0
    for module in model.modules():
        if type(module).__name__ not in classes:
            continue
        impl = getattr(getattr(module, "config", None), "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager", None):
            continue
        if not all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling")):
            continue
        module.forward = types.MethodType(_qwen_vision_attention_forward, module)
        n += 1
    return n


# ---------------------------------------------------------------- packed causal attention
PACKED_ATTENTION = "vlmflow_packed_sdpa"
_ROW_PLANS: dict[int, tuple] = {}


def _row_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of `position_ids` (R, T) (text positions, restarting at 0 for each packed sample
    and for the padding that ends a row), the (start, end) of each sample. A new sample starts
    wherever the position does not follow the previous one, as in transformers'
    `find_packed_sequence_indices`. Read from the device once per forward (every layer, and
    the recomputation under checkpointing, gets the same tensor)."""

    def build(position_ids):
        pos = position_ids.detach().cpu()
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        plan = []
        for row in starts:
            bounds = row.nonzero().flatten().tolist() + [pos.shape[1]]
            plan.append(list(zip(bounds[:-1], bounds[1:])))
        return plan

    return _once_per_tensor(_ROW_PLANS, position_ids, build)


@torch.compiler.disable  # under train.compile: a graph break, not a graph per packing layout
def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sample (transformers' attention-function interface).

    query: (R, H, T, D); key, value: (R, H_kv, T, D) (grouped-query heads when H_kv < H);
    position_ids: (R, T) text positions of the packed rows (`collate_packed`'s row 0).
    Returns ((R, T, H, D), None), as transformers' `sdpa_attention_forward`, equal to SDPA under
    the block-diagonal causal mask transformers builds from the same positions.
    """
    if position_ids is None or position_ids.dim() != 2:
        raise ValueError(
            f"{PACKED_ATTENTION} attention needs the packed batch's text position ids (R, T); "
            "it is installed only for train.packing, whose collator provides them"
        )
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    rows = []
    for r, segments in enumerate(_row_segments(position_ids)):
        parts = [
            F.scaled_dot_product_attention(
                query[r : r + 1, :, a:b],
                key[r : r + 1, :, a:b],
                value[r : r + 1, :, a:b],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
            for a, b in segments
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def packed_attention(model) -> int:
    """Run the causal self-attention of the language model through `packed_sdpa_attention`
    (for `train.packing` with SDPA attention). transformers then builds no mask for it. Only
    the text configs whose attention is SDPA switch; the vision tower keeps its own.
    Returns the number of attention modules that now use it."""
    return route_sdpa_attention(
        model,
        PACKED_ATTENTION,
        packed_sdpa_attention,
        lambda m: getattr(m, "is_causal", False) and hasattr(m, "num_key_value_groups"),
    )


def route_sdpa_attention(model, name: str, function, selected) -> int:
    """Register `function` as transformers attention function `name` and switch to it the
    config of every module for which `selected(module)` holds and whose config's attention is
    SDPA (or already `name`). Returns the number of such modules."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)
    n = 0
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None or not selected(module):
            continue
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", name):
            continue
        cfg._attn_implementation = name
        n += 1
    return n


# ------------------------------------------------------------ Mllama tile attention
TILE_ATTENTION = "vlmflow_tile_sdpa"
_TILE_PLANS: dict[int, tuple] = {}
# An image's padding rows attend over its real keys through a mask over all keys (key and value
# stay views) when they are at most this fraction of its positions, else over gathered copies
# of the real keys and values. At Llama-3.2-11B-Vision's widths on an H200 (bench/
# attention_bench.py, BENCHMARKS.md): with 4 of 4 tiles used (28 padding rows of 6,432) the
# mask is faster (10.32 vs 11.05 ms) and keeps no copies (-0.12 GiB a step); with 2 of 4 (3,230
# padding rows) the masked kernel is as slow as transformers' (17.89 ms) and the gather wins
# (13.06 ms). Between the two, the cut-off is not measured.
_TILE_MASKED_FIXUP_MAX_FRACTION = 1 / 8


def _tile_plan(mask: torch.Tensor):
    """What Mllama's vision mask says, read once per mask tensor (every encoder layer, and its
    recomputation, gets the same one): None when it is not of the form transformers builds
    (`_prepare_aspect_ratio_attention_mask`: a very negative bias where query and key are both
    padding, 0 elsewhere), else (flat row index of every padding query on the device, and per
    image b with padding: (b, padding positions, keys) on the device, keys being a (1, T) mask
    of its real keys or, when its padding rows are many, their positions; see
    `_TILE_MASKED_FIXUP_MAX_FRACTION`)."""

    def build(m):
        if not m.is_floating_point() or m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != m.shape[3]:
            return None
        m2 = m[:, 0]
        pad = m2.diagonal(dim1=-2, dim2=-1) < 0  # (B, T): a padding row is masked on its diagonal
        both = pad[:, :, None] & pad[:, None, :]
        masked = m2 <= torch.finfo(m2.dtype).min / 2
        form = torch.where(both, masked, m2 == 0).all() & (~pad).any(dim=1).all()
        head = torch.cat([form.view(1), pad.flatten()]).tolist()  # the one read from the GPU
        if not head[0]:
            return None
        b, t = pad.shape
        on_host = torch.tensor(head[1:]).view(b, t)
        images = []
        for i, row in enumerate(on_host):
            if not row.any():
                continue
            few = int(row.sum()) <= _TILE_MASKED_FIXUP_MAX_FRACTION * t
            keys = (~row)[None, :] if few else (~row).nonzero().flatten()
            images.append(
                (
                    i,
                    row.nonzero().flatten().to(m.device, non_blocking=True),
                    keys.to(m.device, non_blocking=True),
                )
            )
        rows = torch.cat([i * t + p for i, p, _ in images]) if images else None
        return rows, images

    return _once_per_tensor(_TILE_PLANS, mask, build)


@torch.compiler.disable  # under train.compile: a graph break, not a graph per tile layout
def tile_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Mllama's vision attention without its dense mask (transformers' attention-function
    interface; query, key, value (B, H, T, D); returns ((B, T, H, D), None)).

    The mask transformers builds hides a key from a query only when both are padding (padded
    patches of each tile, and tiles outside the image's aspect ratio): every real patch attends
    to all T positions, and each padding position to the real ones. So: one unmasked SDPA call
    over all rows (the flash kernel on a GPU, instead of the masked kernel over T x T biases),
    then the padding rows again over their image's real keys. Equal to SDPA under the mask; any
    other mask goes to transformers' SDPA function unchanged.
    """
    plan = _tile_plan(attention_mask) if attention_mask is not None else None
    if plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, images = plan
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling)
    b, h, t, d = out.shape
    out = out.transpose(1, 2)
    if rows is None:
        return out.contiguous(), None
    fixes = []
    for i, pads, keys in images:  # the padding rows again, over their image's real keys
        k, v = key[i : i + 1], value[i : i + 1]
        if keys.dtype == torch.bool:  # few padding rows: a mask; key and value stay views
            o = F.scaled_dot_product_attention(
                query[i : i + 1].index_select(2, pads),
                k,
                v,
                attn_mask=keys,
                dropout_p=dropout,
                scale=scaling,
            )
        else:  # many: the unmasked kernel over gathered real keys and values
            o = F.scaled_dot_product_attention(
                query[i : i + 1].index_select(2, pads),
                k.index_select(2, keys),
                v.index_select(2, keys),
                dropout_p=dropout,
                scale=scaling,
            )
        fixes.append(o[0].transpose(0, 1))
    flat = out.reshape(b * t, h, d).index_copy(0, rows, torch.cat(fixes))
    return flat.view(b, t, h, d), None


def tile_attention(model, classes: tuple[str, ...] | None = None) -> int:
    """Run the vision attention of the modules of `classes` (default: those the model's family
    declares for `tile_attention`: Mllama's `MllamaVisionAttention`) through
    `tile_sdpa_attention`, where their config's attention is SDPA. Returns the number of
    modules that now use it."""
    if classes is None:
        classes = declared_classes(model, "tile_attention")
    return route_sdpa_attention(
        model, TILE_ATTENTION, tile_sdpa_attention, lambda m: type(m).__name__ in classes
    )


# ------------------------------------------------------- Pixtral block-diagonal attention
BLOCK_ATTENTION = "vlmflow_block_sdpa"
_BLOCK_PLANS: dict[int, tuple] = {}


def _block_plan(mask: torch.Tensor) -> list[int] | None:
    """The block lengths of a block-diagonal mask of the form Pixtral's vision tower builds
    (`generate_block_attention_mask`: all images' patches in one sequence, 0 where query and key
    are patches of the same image, the dtype's minimum elsewhere), read once per mask tensor
    (every encoder layer, and its recomputation, gets the same one); None for any other mask."""

    def build(m):
        if not m.is_floating_point() or m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != m.shape[3]:
            return None
        m2 = m[:, 0]
        t = m2.shape[-1]
        # a block starts where a position does not see the one before it
        starts = torch.ones(t, dtype=torch.bool, device=m.device)
        starts[1:] = m2[0].diagonal(-1) != 0
        block = torch.cumsum(starts, 0)
        lowest = torch.finfo(m2.dtype).min / 2
        form = torch.ones((), dtype=torch.bool, device=m.device)
        for r in range(0, t, 2048):  # in bands of rows: a few temporaries of 2048 x T, not T x T
            band, same = m2[:, r : r + 2048], block[r : r + 2048, None] == block[None, :]
            form &= torch.where(same, band == 0, band <= lowest).all()
        head = torch.cat([form.view(1), starts]).tolist()  # the one read from the GPU
        if not head[0]:
            return None
        bounds = [i for i, s in enumerate(head[1:]) if s] + [t]
        return [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    return _once_per_tensor(_BLOCK_PLANS, mask, build)


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(start, number of blocks, block length) of each run of consecutive equal-length blocks."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for length in lengths:
        if out and out[-1][2] == length:
            s, n, _ = out[-1]
            out[-1] = (s, n + 1, length)
        else:
            out.append((start, 1, length))
        start += length
    return out


@torch.compiler.disable  # under train.compile: a graph break, not a graph per image layout
def block_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Pixtral's vision attention without its dense block-diagonal mask (transformers'
    attention-function interface; query, key, value (B, H, T, D); returns ((B, T, H, D), None)).

    The tower puts every image's patches into one sequence and masks attention between images
    with a T x T bias (12,544 x 12,544 for four 896-px images): SDPA then runs its masked kernel
    over all T x T scores, most of them masked. Here each image attends over its own patches
    only, unmasked (flash on a GPU), consecutive images of one size in one batched call. Equal
    to SDPA under the mask; any other mask goes to transformers' SDPA function unchanged.
    """
    lengths = _block_plan(attention_mask) if attention_mask is not None else None
    if lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b, h, _, d = query.shape
    outs = []
    for start, n, length in _runs(lengths):
        q, k, v = (
            x[:, :, start : start + n * length]
            .reshape(b, h, n, length, d)
            .transpose(1, 2)
            .reshape(b * n, h, length, d)
            for x in (query, key, value)
        )
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        outs.append(
            o.reshape(b, n, h, length, d).permute(0, 1, 3, 2, 4).reshape(b, n * length, h, d)
        )
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def block_attention(model, classes: tuple[str, ...] | None = None) -> int:
    """Run the vision attention of the modules of `classes` (default: those the model's family
    declares for `block_attention`: Pixtral's `PixtralAttention`) through
    `block_sdpa_attention`, where their config's attention is SDPA. Returns the number of
    modules that now use it."""
    if classes is None:
        classes = declared_classes(model, "block_attention")
    return route_sdpa_attention(
        model, BLOCK_ATTENTION, block_sdpa_attention, lambda m: type(m).__name__ in classes
    )


# ------------------------------------------------------------------ linear-attention kernels
# The kernels transformers uses for Gated DeltaNet layers when their package imports, else
# a PyTorch reference (more than 10x slower on a GPU): (function in the modeling module, pip
# distribution, import name).
LINEAR_ATTENTION_KERNELS = (
    ("torch_chunk_gated_delta_rule", "flash-linear-attention", "fla"),
    ("causal_conv1d_fn", "causal-conv1d", "causal_conv1d"),
)


def _uses_fast_kernel(function, import_name: str) -> bool:
    """Whether a function decorated by transformers' `use_kernel_func_from_hub_with_fallback`
    resolved to the package's kernel: read off the decorator's closure where it has one, else
    whether the package imports (what the decorator checks at import time)."""
    import importlib.util
    import inspect

    try:
        resolved = inspect.getclosurevars(function).nonlocals.get("is_new_implementation")
    except (TypeError, ValueError):
        resolved = None
    if isinstance(resolved, bool):
        return resolved
    return importlib.util.find_spec(import_name) is not None


def slow_linear_attention(model) -> list[str]:
    """Pip distributions whose kernels the model's Gated DeltaNet layers (Qwen3.5, Qwen3-Next)
    lack, i.e. run the slow PyTorch reference instead; [] when there are none or all are fast."""
    import sys

    missing: dict[str, None] = {}
    for module in model.modules():
        if not type(module).__name__.endswith("GatedDeltaNet"):
            continue
        code = sys.modules.get(type(module).__module__)
        for func, dist, import_name in LINEAR_ATTENTION_KERNELS:
            fn = getattr(code, func, None)
            if fn is not None and not _uses_fast_kernel(fn, import_name):
                missing[dist] = None
    return list(missing)


# flash-linear-attention (0.6) refuses its gated delta rule's backward with Triton >= 3.4.0 and
# < 3.7.1 on Hopper GPUs (the kernel gives wrong gradients there, fla issue #640) unless
# tilelang is installed: training stops at the first backward. Seen on an H200 with Triton 3.6.
FLA_BROKEN_TRITON = ((3, 4, 0), (3, 7, 1))


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def fla_backward_broken(device: torch.device) -> str | None:
    """Why flash-linear-attention's gated delta rule cannot train on `device` (the reason, for
    the log), or None when it can or is not installed."""
    import importlib.metadata
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("fla") is None:
        return None
    if importlib.util.find_spec("tilelang") is not None:
        return None
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    lo, hi = FLA_BROKEN_TRITON
    if not lo <= _version_tuple(triton) < hi:
        return None
    return (
        f"flash-linear-attention's gated delta rule has a wrong backward with Triton {triton} "
        f"on Hopper GPUs (fla issue #640) and refuses to train"
    )


def use_torch_gated_delta_rule(model) -> int:
    """Point the model's Gated DeltaNet code at transformers' PyTorch reference of the chunked
    gated delta rule (the function under its kernel decorator), for every modeling module the
    model's layers come from. Returns the number of modules switched (process-wide: the
    function is a module global)."""
    import inspect
    import sys

    switched = 0
    for code in {
        sys.modules.get(type(m).__module__)
        for m in model.modules()
        if type(m).__name__.endswith("GatedDeltaNet")
    }:
        fn = getattr(code, "torch_chunk_gated_delta_rule", None)
        if fn is None:
            continue
        reference = inspect.unwrap(fn)
        if reference is not fn:
            code.torch_chunk_gated_delta_rule = reference
            switched += 1
    return switched


# ---------------------------------------------------------------------------------- LoRA
def lora_delta_add(
    result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`result + scaling * (x @ a.T) @ b.T`, computed in `result`'s dtype.

    result: (..., out); x: (..., in); a: (r, in) and b: (out, r), any float dtype (cast to
    result's). The add happens in the second GEMM (addmm's beta=1 epilogue).
    """
    dt = result.dtype
    t = F.linear(x.to(dt), a.to(dt))  # (..., r)
    bs = b.to(dt) * scaling if scaling != 1 else b.to(dt)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), t.reshape(-1, t.shape[-1]), bs.t())
    return out.view(result.shape)


def _fast_lora_forward(self, x, *args, **kwargs):
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self._vlmflow_peft_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return self._vlmflow_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    x = x if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return lora_delta_add(
        result, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )


_FAST_LORA_CLASSES = {"Linear", "Linear4bit", "Linear8bitLt"}


def fast_lora(model) -> int:
    """Route PEFT's LoRA linears (plain, 4-bit and 8-bit bitsandbytes bases) through
    `lora_delta_add` (per instance). Anything this path does not cover (merged or disabled
    adapters, several active adapters, DoRA and other variants, extra call arguments) falls back
    to PEFT's own forward at call time. Returns the number of patched modules."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or type(module).__name__ not in _FAST_LORA_CLASSES:
            continue
        if getattr(module, "fan_in_fan_out", False) or hasattr(module, "_vlmflow_peft_forward"):
            continue
        module._vlmflow_peft_forward = module.forward
        module.forward = types.MethodType(_fast_lora_forward, module)
        n += 1
    return n


# ------------------------------------------------------------------------- patch embedding
def _linear_patch_embed_forward(self, hidden_states):
    w = self.proj.weight  # (embed, C, T, P, P)
    flat = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    return F.linear(flat, w.reshape(w.shape[0], -1), self.proj.bias)


def linear_patch_embed(model, classes: tuple[str, ...] | None = None) -> int:
    """Run Qwen-VL patch embeddings (Conv3d, kernel == stride == one patch) as one GEMM: modules
    of the `classes` (default: those the model's family declares for `patch_embed`)."""
    if classes is None:
        classes = declared_classes(model, "patch_embed")
    n = 0
    for module in model.modules():
        proj = getattr(module, "proj", None)
        if type(module).__name__ not in classes or not isinstance(proj, torch.nn.Conv3d):
            continue
        if tuple(proj.kernel_size) != tuple(proj.stride) or proj.padding != (0, 0, 0):
            continue
        if proj.groups != 1 or proj.dilation != (1, 1, 1):
            continue
        module.forward = types.MethodType(_linear_patch_embed_forward, module)
        n += 1
    return n


# ------------------------------------------------------------- layers without checkpointing
def checkpoint_every_layer(model, family) -> int:
    """Make the family's vision blocks and decoder layers that transformers does not checkpoint
    checkpointable, so that gradient checkpointing (and its offloading) covers them too.

    transformers checkpoints only `GradientCheckpointingLayer` subclasses; Mllama's vision
    encoder layers are plain modules, so its 32 + 8 vision layers kept every activation of
    1601 positions x 4 tiles x 4 images for the backward pass (19.35 -> 9.65 GiB once
    checkpointed, reduced depth, on an H200). Each such layer's class becomes a subclass of
    `GradientCheckpointingLayer` and of its own class, with the same name (what regional
    compile matches): the same forward, run under the checkpoint function that
    `gradient_checkpointing_enable` installs. Call before that. Returns the number of layers
    changed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    pattern = re.compile(rf"(?:.*\.)?(?:{family.vision_layers}|{family.language_layers})")
    made: dict[type, type] = {}
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) or not pattern.fullmatch(name):
            continue
        cls = type(module)
        if cls not in made:
            made[cls] = type(cls.__name__, (GradientCheckpointingLayer, cls), {})
            made[cls].__module__ = cls.__module__
            made[cls].__qualname__ = cls.__qualname__
        module.__class__ = made[cls]
        n += 1
    return n


# --------------------------------------------------------- attention kept by checkpointing
# The fused attention kernels' aten ops (CUDA flash / memory-efficient / cuDNN, and the CPU's).
# SDPA's math fallback decomposes into matmuls and a softmax, which are recomputed as before.
_SAVED_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


_ATTENTION_OPS = frozenset(
    op.default
    for op in (getattr(torch.ops.aten, n, None) for n in _SAVED_ATTENTION_OPS)
    if op is not None
)


def attention_saving_policy(ctx, func, *args, **kwargs):
    """Selective activation checkpointing policy (`torch.utils.checkpoint`): the outputs of the
    fused attention kernels (the attention output and its log-sum-exp) are kept for the
    backward pass; everything else is recomputed as with plain checkpointing."""
    from torch.utils.checkpoint import CheckpointPolicy

    if func in _ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _saving_attention_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(attention_saving_policy)


def _saving_attention_keywords() -> dict:
    return {"use_reentrant": False, "context_fn": _saving_attention_context}


def save_attention(model, classes) -> int:
    """Gradient checkpointing that keeps each fused attention call's output instead of
    recomputing it in the backward pass (`attention_saving_policy`): the layer's matmuls,
    norms and activations are recomputed as before, the attention kernel's forward is not.
    Costs one attention output (tokens x heads x head_dim, plus a log-sum-exp per head and
    token) per checkpointed layer. Changes the layers whose checkpoint function is
    transformers' default (`gradient_checkpointing_enable` with `use_reentrant=False`), not
    offloaded checkpointing's. Regional compile keeps it: a compiled layer's fused-attention
    call runs through the dispatcher, where the checkpoint's caching mode sees it, and a
    compiled checkpoint traces the policy into its graph. Under an eager checkpoint the caching
    mode is a Python dispatch mode that sees every op of the layer (host time a step): a family
    declares it (`Family.patches["saved_attention"]`, layer class names = `classes`) where it
    was measured faster (Mllama; Qwen3-VL and Pixtral were slower, BENCHMARKS.md). Returns the
    number of layers."""
    import functools

    import torch.utils.checkpoint

    if _quantized(model):
        return 0  # QLoRA: memory first (Mllama 4-bit is already above Unsloth's peak)
    n = 0
    for module in model.modules():
        if type(module).__name__ not in classes:
            continue
        function = getattr(module, "_gradient_checkpointing_func", None)
        if _plain_checkpoint(function) and function.keywords == {"use_reentrant": False}:
            module._gradient_checkpointing_func = functools.partial(
                torch.utils.checkpoint.checkpoint, **_saving_attention_keywords()
            )
            module._vlmflow_saved_attention = True
            n += 1
    return n


# ----------------------------------------------------------------------- regional compile
_COMPILED_LAYER_CLASSES = ("DecoderLayer", "VisionBlock", "VisionEncoderLayer", "EncoderLayer")


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile a graph (not errors of the code)."""
    import torch._dynamo.exc

    errors: list[type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


def _compile_failed(name: str, module, exc: BaseException) -> None:
    """The WARNING naming the layer whose graph failed to compile; the layer runs eagerly from
    then on."""
    log.warning(
        "torch.compile failed on layer %s (%s); it runs eagerly: %s",
        name,
        type(module).__name__,
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
    )
    module._vlmflow_compiled = "failed"


def _compiled_or_eager(name: str, module, backend: str):
    """`module.forward` compiled; if compiling fails, a WARNING naming the layer and the eager
    forward from then on (for that layer only)."""
    eager = module.forward
    compiled = torch.compile(eager, backend=backend, dynamic=None)
    errors = _compile_errors()

    def forward(*args, **kwargs):
        if module._vlmflow_compiled == "failed":
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except errors as exc:
            _compile_failed(name, module, exc)
            return eager(*args, **kwargs)

    return forward


def _plain_checkpoint(function) -> bool:
    """Whether `function` is transformers' default checkpoint function for a layer:
    `torch.utils.checkpoint.checkpoint` with `use_reentrant=False` and nothing else, or with
    the attention-saving context of `save_attention` added, or vlmflow's offloaded checkpoint
    (`vlmflow.offload.OffloadedCheckpoint`)."""
    import functools

    import torch.utils.checkpoint

    from .offload import OffloadedCheckpoint

    return isinstance(function, OffloadedCheckpoint) or (
        isinstance(function, functools.partial)
        and function.func is torch.utils.checkpoint.checkpoint
        and not function.args
        and function.keywords in ({"use_reentrant": False}, _saving_attention_keywords())
    )


def _quantized(module) -> bool:
    """Whether `module` holds a bitsandbytes 4-bit / 8-bit linear (or PEFT's LoRA wrapper of
    one). Their layers keep the default checkpoint: traced into the graph, the dequantized
    weights were saved for the backward pass instead of recomputed (Gemma 3 4-bit on an H200:
    peak 5.31 instead of 3.67 GiB, no faster; BENCHMARKS.md)."""
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in module.modules())


def _compiled_checkpoint(name: str, module, eager, backend: str):
    """The layer's checkpoint function with the checkpoint inside the compiled graph: one
    compiled call a layer and step whose backward graph recomputes the forward itself, instead
    of a compiled forward under `torch.utils.checkpoint` (pack and unpack hooks, a second
    compiled forward call and its guard check in the backward pass). The same numerics; which
    tensors the backward keeps is AOTAutograd's choice (the layer's inputs for Gemma 3's
    layers: the same peak; more for Qwen3-VL's and for 4-bit layers, BENCHMARKS.md). Called
    by `GradientCheckpointingLayer.__call__` as `function(partial(Module.__call__, **kwargs),
    *args)`; the layer's own hooks (none in transformers' layers) would be skipped, so a layer
    with hooks keeps the default path. Over the offloaded checkpoint (`use_gradient_checkpointing:
    offload`) the compiled call runs under the offloader's saved-tensor hooks: what its backward
    graph keeps goes to host memory as the offloader's layer inputs do, the layer's weights
    excepted."""
    import functools

    import torch.utils.checkpoint

    from .offload import OffloadedCheckpoint

    default = module._gradient_checkpointing_func
    offloader = default if isinstance(default, OffloadedCheckpoint) else None
    # use_reentrant=False, and the saved-attention context if any
    keywords = {"use_reentrant": False} if offloader is not None else default.keywords
    # the storages the offloader leaves on the device (the model is in place when this runs; a
    # weight moved later would only be copied to the host and back: the same numbers)
    weights = frozenset(
        w.untyped_storage().data_ptr()
        for w in itertools.chain(module.parameters(), module.buffers())
        if offloader is not None
    )

    def region(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(eager, *args, **keywords, **kwargs)

    compiled = torch.compile(region, backend=backend, dynamic=None)
    errors = _compile_errors()

    def checkpoint_function(call, *args):
        if (
            not isinstance(call, functools.partial)  # not the call convention this expects
            or module._forward_hooks
            or module._forward_pre_hooks
            or module._vlmflow_compiled == "failed"
        ):
            return default(call, *args)
        try:
            if offloader is None:
                return compiled(*args, **call.keywords)
            with offloader.saving(weights):
                return compiled(*args, **call.keywords)
        except errors as exc:
            _compile_failed(name, module, exc)
            return default(call, *args)

    return checkpoint_function


def compile_layers(model, backend: str = "inductor", *, checkpoint_classes=()) -> int:
    """torch.compile the forward of every decoder layer and vision block (per instance; the
    layers of one class share one compiled graph). Gradient checkpointing still wraps the
    compiled call, so recomputation runs the compiled code too, except in the layers of
    `checkpoint_classes` (class names) checkpointed with transformers' default function and
    without quantized linears: their checkpoint is compiled with them (`_compiled_checkpoint`;
    a layer's forward must then trace without a graph break). The block-diagonal vision
    attention stays eager (its layout changes with every image size). A layer whose graph fails
    to compile runs eagerly, with a WARNING naming it, instead of stopping the run (dynamo's
    process-wide `suppress_errors` is left alone). Returns the number of layers."""
    n = 0
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith(_COMPILED_LAYER_CLASSES) or hasattr(module, "_vlmflow_compiled"):
            continue
        module._vlmflow_compiled = True
        eager = module.forward
        module.forward = _compiled_or_eager(name, module, backend)
        if (
            cls in checkpoint_classes
            and not _quantized(module)
            and _plain_checkpoint(getattr(module, "_gradient_checkpointing_func", None))
        ):
            module._gradient_checkpointing_func = _compiled_checkpoint(name, module, eager, backend)
            module._vlmflow_compiled_checkpoint = True
        n += 1
    return n


# -------------------------------------------------------------------- switches and warnings
# The transformers and PEFT releases the patches are tested with (requirements.in pins them):
# the patches replace forwards matched by class name, which another release may rename.
TESTED_VERSIONS = {"transformers": ("5.17", "5.18"), "peft": ("0.21", "0.22")}
_VERSIONS_CHECKED: list[str] = []


def untested_versions(versions: dict[str, str] | None = None) -> list[str]:
    """'name version' of each of transformers / PEFT outside `TESTED_VERSIONS` ([] if none);
    `versions` ({name: version}) defaults to the installed ones."""
    import importlib.metadata

    out = []
    for name, (lo, hi) in TESTED_VERSIONS.items():
        version = versions[name] if versions is not None else importlib.metadata.version(name)
        if not _version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi):
            out.append(f"{name} {version}")
    return out


def warn_untested_versions() -> list[str]:
    """One WARNING per process when transformers or PEFT is outside the tested range (the
    patches may then patch nothing, or the wrong thing). Returns the untested packages."""
    untested = untested_versions()
    if untested and not _VERSIONS_CHECKED:
        ranges = ", ".join(f"{n} >={lo},<{hi}" for n, (lo, hi) in TESTED_VERSIONS.items())
        log.warning(
            "%s: outside the range vlmflow's fast paths are tested with (%s); if training "
            "misbehaves, switch them off one by one (train.fast_paths)",
            ", ".join(untested),
            ranges,
        )
    _VERSIONS_CHECKED.append("done")
    return untested


def warn_unpatched(model, family, patch: str, n: int, classes: tuple[str, ...] = ()) -> bool:
    """A WARNING naming the family and the patch when a patch the family takes patched nothing:
    `classes` (the family's declared class names) are then usually missing from the model (a
    renamed transformers class). Returns whether it warned."""
    if n:
        return False
    present = {type(m).__name__ for m in model.modules()}
    if classes and present.intersection(classes):
        return False  # the modules are there but not eligible (e.g. flash attention)
    what = f" (no module of class {', '.join(classes)} in this model)" if classes else ""
    log.warning(
        "fast path %s of family %s patched 0 modules%s: it does nothing; check the "
        "transformers / PEFT version (train.fast_paths.%s: false silences this)",
        patch,
        family.name,
        what,
        patch,
    )
    return True
