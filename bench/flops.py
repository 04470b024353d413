#!/usr/bin/env python
"""Arithmetic floor of one LoRA training step of Qwen2.5-VL: the matmul FLOPs a step cannot
avoid, and the tokens/s they allow at a given matmul throughput.

Counted per forward pass (2 FLOP per multiply-add):
- language model, per token: every decoder linear (q, k, v, o; gate, up, down); causal
  attention per sample of n tokens: QK^T and AV over n^2/2 pairs per layer; the output head on
  label tokens only (vlmflow's loss never computes the others).
- vision tower, per patch: patch embedding, every block's qkv/proj/MLP; attention per window
  (Qwen2.5-VL: 112-px windows = 4x4 merged tokens = 64 patches, smaller at the image's edges)
  and per whole image in the full-attention blocks; the merger MLP per merged token.
A step is 3 forward passes: the forward, its recomputation under gradient checkpointing, and
the backward, which for frozen weights computes only input gradients (one forward's worth; the
LoRA weight gradients add about r/d and are left out). Elementwise work, norms, RoPE, softmax
and the optimizer are left out: a floor, not a prediction.

Every other family (`floor_flops`, from the model's transformers config and the collated
batches): the same count with the family's layers read from its config. Decoder: per layer type
(`layer_types`): full causal attention, sliding-window attention (pairs within the window: Gemma
3/4), Gated DeltaNet linear attention (Qwen3.5: its projections + a dk x dv state update and
read-out per token and value head), Mllama's cross-attention layers (`cross_attention_layers`:
q/o on text tokens, k/v on the vision tokens, text x vision attention pairs); MoE MLPs count the
active experts only (`num_experts_per_tok` x `moe_intermediate_size` + router + shared expert).
Vision: patch embedding, every block's attention/MLP linears and full attention within each
image (Pixtral, Mistral 3: block-diagonal per image; LLaVA-NeXT, Idefics3: per tile/crop; Mllama:
per image over all its tiles, local + global layers); Qwen2.5-VL keeps its windowed count.
Projectors are left out. Without gradient checkpointing a step is 2 forwards (`recompute=False`).

    python bench/flops.py       # the fixed and the realistic case of bench_train.py, 7B config
    python bench/flops.py --family gemma3 mllama    # the fixed batch, make_family.py's depths
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

PEAK_FLOPS = 790e12  # bf16 dense matmul FLOP/s an H200 reaches in a large GEMM


def text_flops(text: dict, lengths: list[int], label_tokens: int) -> float:
    """Forward FLOPs of the language model over samples of `lengths` tokens."""
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    kv = d // text["num_attention_heads"] * text["num_key_value_heads"]
    per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * text["intermediate_size"])
    attention = 2 * layers * 2 * d * sum(n * n / 2 for n in lengths)
    head = 2 * d * text["vocab_size"] * label_tokens
    return per_token * sum(lengths) + attention + head


def vision_flops(vision: dict, grids: list[tuple[int, int, int]]) -> float:
    """Forward FLOPs of the vision tower over images of patch grids (t, h, w)."""
    d, depth, ff = vision["hidden_size"], vision["depth"], vision["intermediate_size"]
    merge, patch = vision["spatial_merge_size"], vision["patch_size"]
    full = len(vision["fullatt_block_indexes"])
    window = vision["window_size"] // merge // patch  # merged tokens per window side
    patch_in = 3 * vision["temporal_patch_size"] * patch * patch
    total = 0.0
    for t, h, w in grids:
        n = t * h * w
        total += 2 * n * patch_in * d  # patch embedding
        total += 2 * depth * n * (4 * d * d + 3 * d * ff)  # qkv, proj, gate/up/down
        total += 2 * full * 2 * d * n * n  # full-attention blocks: QK^T and AV
        mh, mw = h // merge, w // merge
        pairs = 0  # windowed blocks: attention pairs within each window
        for i in range(math.ceil(mh / window)):
            for j in range(math.ceil(mw / window)):
                cells = min(window, mh - i * window) * min(window, mw - j * window)
                pairs += t * (cells * merge * merge) ** 2
        total += 2 * (depth - full) * 2 * d * pairs
        m = n // (merge * merge)  # merger: 2 linears on 4 patches' features
        total += 2 * m * (4 * d * 4 * d + 4 * d * vision["out_hidden_size"])
    return total


def step_flops(text: dict, vision: dict, lengths, grids, label_tokens: int) -> float:
    """FLOPs of one training step (forward + recomputation + backward = 3 forwards)."""
    return 3 * (text_flops(text, list(lengths), label_tokens) + vision_flops(vision, grids))


def sample_lengths(b: dict) -> list[int]:
    """Token count of every sample of one collated padded or packed batch."""
    if "row_lengths" in b:  # packed: a sample starts where its text position is 0
        lengths = []
        for row, used in zip(b["position_ids"][0], b["row_lengths"].tolist()):
            starts = (row[:used] == 0).nonzero().flatten().tolist() + [used]
            lengths += [e - s for s, e in zip(starts[:-1], starts[1:])]
        return lengths
    return [int(n) for n in b["attention_mask"].sum(1).tolist()]


def label_count(b: dict) -> int:
    return int((b["labels"][:, 1:] != -100).sum())


def batch_shapes(batches: list[dict]) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """(sample lengths, image grids, label tokens) of collated padded or packed batches."""
    lengths, grids, labels = [], [], 0
    for b in batches:
        lengths += sample_lengths(b)
        if "image_grid_thw" in b:
            grids += [tuple(g) for g in b["image_grid_thw"].tolist()]
        labels += label_count(b)
    return lengths, grids, labels


# ------------------------------------------------------------------------------- every family
def attention_pairs(n: int, window: int | None = None) -> float:
    """Query-key pairs of causal attention over n tokens (n^2/2, as text_flops counts them),
    each query seeing at most `window` keys when a sliding window is given."""
    if window is None or n <= window:
        return n * n / 2
    return window * window / 2 + (n - window) * window


def mlp_flops_per_token(text: dict, layer: int = 0) -> float:
    """Gated MLP (gate, up, down) of decoder layer `layer`; a MoE layer counts its active
    experts, router and shared expert (+ the dense MLP beside them: Gemma 4's enable_moe_block;
    Qwen-MoE's mlp_only_layers / decoder_sparse_step layers are dense)."""
    d = text["hidden_size"]
    dense = 2 * 3 * d * (text.get("intermediate_size") or 0)
    k = text.get("num_experts_per_tok") or text.get("top_k_experts")
    sparse = (
        k and text.get("moe_intermediate_size") and layer not in (text.get("mlp_only_layers") or [])
    )
    if not sparse or (layer + 1) % (text.get("decoder_sparse_step") or 1):
        return dense
    experts = text.get("num_experts") or text.get("num_local_experts") or 0
    shared = text.get("shared_expert_intermediate_size") or 0
    moe = 2 * (k * 3 * d * text["moe_intermediate_size"] + d * experts + 3 * d * shared)
    return moe + (dense if text.get("enable_moe_block") else 0)


def decoder_flops(text: dict, lengths: list[int], cross_tokens: list[int] | None = None) -> float:
    """Forward FLOPs of the decoder layers (not the head) over samples of `lengths` tokens.
    `cross_tokens`: vision tokens each sample's cross-attention layers attend to (Mllama)."""
    d, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or d // heads
    types = list(text.get("layer_types") or [])
    cross = set(text.get("cross_attention_layers") or [])
    gated_q = str(text.get("model_type", "")).startswith("qwen3_5")  # q_proj -> query + gate
    ntok, total = sum(lengths), 0.0
    for i in range(layers):
        kind = types[i] if i < len(types) else "full_attention"
        mlp = mlp_flops_per_token(text, i)
        if i in cross:  # Mllama: no self-attention in this layer
            vis = cross_tokens or [0] * len(lengths)
            total += ntok * (2 * 2 * d * heads * head_dim + mlp)  # q, o, MLP on text tokens
            total += sum(vis) * 2 * 2 * d * kv_heads * head_dim  # k, v on vision tokens
            total += 2 * 2 * heads * head_dim * sum(n * v for n, v in zip(lengths, vis))
            continue
        if kind == "linear_attention":  # Gated DeltaNet (Qwen3.5)
            nk, dk = text["linear_num_key_heads"], text["linear_key_head_dim"]
            nv, dv = text["linear_num_value_heads"], text["linear_value_head_dim"]
            proj = 2 * d * (2 * nk * dk + nv * dv) + 2 * d * nv * dv + 2 * 2 * d * nv
            proj += 2 * nv * dv * d
            total += ntok * (proj + 2 * 2 * nv * dk * dv + mlp)
            continue
        hd, kvh, kv_proj = head_dim, kv_heads, 2
        if kind == "full_attention" and text.get("global_head_dim"):  # Gemma 4's full layers
            hd = text["global_head_dim"]
            kvh = text.get("num_global_key_value_heads") or kv_heads
            kv_proj = 1 if text.get("attention_k_eq_v") else 2
        proj = 2 * d * heads * hd * (2 if gated_q else 1) + kv_proj * 2 * d * kvh * hd
        proj += 2 * heads * hd * d
        window = text.get("sliding_window") if kind == "sliding_attention" else None
        pairs = sum(attention_pairs(n, window) for n in lengths)
        total += ntok * (proj + mlp) + 2 * 2 * heads * hd * pairs
    return total


# (width key, MLP width, gated MLP, layers) of each vision tower, by the model's model_type
def _vision_dims(model_type: str, v: dict) -> tuple[int, int, bool, int]:
    if model_type == "qwen2_vl":
        return v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"]), False, v["depth"]
    if model_type.startswith(("qwen3_vl", "qwen3_5")):
        return v["hidden_size"], v["intermediate_size"], False, v["depth"]
    layers = v["num_hidden_layers"] + (v.get("num_global_layers") or 0)  # Mllama: + global
    gated = model_type in ("gemma4", "mistral3") or v.get("model_type") == "pixtral"
    return v["hidden_size"], v["intermediate_size"], gated, layers


def patch_side(vision: dict) -> int:
    """The vision config's patch side (InternViT gives [14, 14])."""
    p = vision.get("patch_size", 14)
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def vision_units(model_type: str, vision: dict, batches: list[dict]) -> list[int]:
    """Tokens of each unit the vision tower attends within (an image, tile or crop)."""
    p = patch_side(vision)
    units: list[int] = []
    for b in batches:
        pv = b.get("pixel_values")
        if pv is None:
            continue
        if "image_grid_thw" in b:  # Qwen-VL: one unit per image, t x h x w patches
            units += [int(t * h * w) for t, h, w in b["image_grid_thw"].tolist()]
        elif model_type == "mllama":  # (B, images, tiles, C, H, W): 1601 patches + CLS, to x8
            n = (pv.shape[-1] // p) * (pv.shape[-2] // p) + 1
            units += [pv.shape[2] * (n + (-n) % 8)] * (pv.shape[0] * pv.shape[1])
        elif model_type == "gemma4":  # (images, patches, 3 p p)
            units += [int(pv.shape[1])] * int(pv.shape[0])
        elif "image_sizes" in b and vision.get("model_type") == "pixtral":  # per-image size
            units += [int(h // p) * int(w // p) for h, w in b["image_sizes"].tolist()]
        else:  # (..., C, H, W) images, tiles or crops; all-zero ones are padding (Idefics3)
            flat = pv.reshape(-1, *pv.shape[-3:])
            real = int((flat.flatten(1).abs().sum(1) > 0).sum())
            cls = 1 if vision.get("model_type") == "clip_vision_model" else 0
            units += [(pv.shape[-1] // p) * (pv.shape[-2] // p) + cls] * real
    return units


def cross_tokens(model_type: str, vision: dict, batches: list[dict]) -> list[int] | None:
    """Mllama: vision tokens each sample's cross-attention layers see (every tile, CLS kept)."""
    if model_type != "mllama":
        return None
    out, p = [], vision.get("patch_size", 14)
    for b in batches:
        pv = b["pixel_values"]
        per_tile = (pv.shape[-1] // p) * (pv.shape[-2] // p) + 1
        out += [int(pv.shape[1] * pv.shape[2] * per_tile)] * int(pv.shape[0])
    return out


def tower_flops(model_type: str, vision: dict, units: list[int]) -> float:
    """Forward FLOPs of a vision tower with full attention within each unit."""
    d, ff, gated, layers = _vision_dims(model_type, vision)
    patch_in = vision.get("num_channels", 3) * patch_side(vision) ** 2
    patch_in *= vision.get("temporal_patch_size", 1)
    n = sum(units)
    per_patch = 2 * patch_in * d + 2 * layers * (4 * d * d + (3 if gated else 2) * d * ff)
    return n * per_patch + 2 * layers * 2 * d * sum(u * u for u in units)


def floor_flops(config, batches: list[dict], recompute: bool = True) -> float:
    """FLOPs one training step of any family cannot avoid, from its transformers config and the
    step's collated batches (forward + recomputation + backward; no recomputation: 2 forwards)."""
    model_type = config.model_type
    text = config.get_text_config().to_dict()
    vision = config.vision_config.to_dict()
    lengths = [n for b in batches for n in sample_lengths(b)]
    labels = sum(label_count(b) for b in batches)
    if model_type == "qwen2_5_vl":  # the windowed count of the module's first half
        vis = vision_flops(vision, batch_shapes(batches)[1])
    else:
        vis = tower_flops(model_type, vision, vision_units(model_type, vision, batches))
    lm = decoder_flops(text, lengths, cross_tokens(model_type, vision, batches))
    lm += 2 * text["hidden_size"] * text["vocab_size"] * labels
    return (3 if recompute else 2) * (lm + vis)


def family_floors(families: list[str], full: bool) -> None:
    """The fixed batch's floor of make_family.py's folders (real widths; reduced depth unless
    `full`), from their configs and processors alone (no weights are built)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent / "family"))
    import make_family
    from bench_train import fixed_rows

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import family_for_config

    for name in list(make_family.CHECKPOINTS) if families == ["all"] else families:
        processor, tok, ids = make_family.build_processor(name)
        _, depth, reduced = make_family.CHECKPOINTS[name]
        nt, nv = depth if full else reduced
        config = make_family.build_config(name, "real", nt, nv, tok, ids)
        family = family_for_config(config)
        encoder = Encoder(processor, family, max_seq_length=8192)
        with tempfile.TemporaryDirectory() as tmp:
            samples = [encoder(r) for r in fixed_rows(4, 896, 300, tmp)]
        batch = collate(samples, encoder.pad_id, family.batch_layout)
        flops, tokens = floor_flops(config, [batch]), sum(sample_lengths(batch))
        print(
            f"{name} (text {nt}, vision {nv} layers): {tokens} tokens, {flops:.3g} FLOP per "
            f"step = {tokens / (flops / PEAK_FLOPS):,.0f} tokens/s at {PEAK_FLOPS / 1e12:.0f} "
            "TFLOP/s"
        )


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", nargs="+", help="make_family.py families (or: all) instead")
    ap.add_argument("--full", action="store_true", help="with --family: full depth")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if a.family:
        family_floors(a.family, a.full)
        return
    from bench_train import fixed_rows, realistic_rows
    from make_model import SIZES, build_processor

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    text, vision = SIZES["7b"]
    encoder = Encoder(build_processor(), FAMILIES["qwen2_5_vl"], max_seq_length=8192)
    peak = PEAK_FLOPS
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"fixed": fixed_rows(4, 896, 300, tmp), "realistic": realistic_rows(64, tmp)}
        for name, rows in cases.items():
            samples = [encoder(r) for r in rows]
            lengths, grids, labels = batch_shapes([collate(samples, encoder.pad_id)])
            flops = step_flops(text, vision, lengths, grids, labels)
            tokens = sum(lengths)
            patches = sum(t * h * w for t, h, w in grids)
            print(
                f"{name}: {len(lengths)} samples, {tokens} tokens, {patches} patches, "
                f"{labels} label tokens: {flops:.3g} FLOP per step = {flops / peak:.2f} s at "
                f"{peak / 1e12:.0f} TFLOP/s = {tokens / (flops / peak):,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
