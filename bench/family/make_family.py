#!/usr/bin/env python
"""Build a random-weight vision-language model folder (bf16 safetensors + a processor that works
for it) whose widths are those of a released checkpoint, offline, for timing LoRA/QLoRA steps.
Timings do not depend on weight values; they depend on widths, depth, vocabulary and on how many
image tokens / vision patches the processor makes, which all follow the real checkpoint here.

    python make_family.py mllama models/mllama                  # real widths, full depth
    python make_family.py mllama models/mllama --recommended    # the reduced depth run.sh uses
    python make_family.py gemma3 models/g --text-layers 8 --vision-layers 7
    python make_family.py pixtral models/p-tiny --scale tiny    # tiny widths, for the CPU
    python make_family.py all --count                             # parameter counts, nothing saved

FAMILY is one of mllama, gemma3, pixtral, llava, llava_next, qwen3_vl, qwen2_vl, idefics3,
qwen3_5, gemma4, mistral3, internvl, llava_onevision, qwen3_vl_moe, qwen3_5_moe (the checkpoint each
copies is in CHECKPOINTS). `--scale tiny` keeps the real processor geometry (image size, patch size, tiles,
image tokens) with tiny widths and a ~500-token vocabulary, so that the CPU exercises the same
processor/model pairing as the real build.

Depth: --text-layers / --vision-layers cut the decoder / vision tower (default: the full depth).
Structure that depends on depth is scaled with it: Mllama's cross-attention layers keep the
checkpoint's "every 5th layer from layer 3" pattern and its local:global vision ratio (32:8),
the intermediate vision layers it concatenates are spread over the kept layers; Gemma 3 keeps
its 5 sliding : 1 full attention pattern; Qwen3-VL's DeepStack taps are spread over the kept
vision blocks; Qwen3.5 keeps its 3 Gated DeltaNet : 1 full attention pattern, Gemma 4 its
5 sliding : 1 full one.

This copy (the project's bench/family/) adds qwen3_5 and gemma4 to shared/family-bench's
harness; where their values come from is commented in build_config.

Processors: the tokenizers (byte-level BPE trained with `tokenizers`), special-token lists and
chat templates are imported from the family modules (vlmflow.models.*) and vlmflow.tiny. Their
tiny builders cannot be reused as a
whole: they hard-code tiny image geometry (28-64 px images, 8-px patches, 2 tiles) and tiny
models, so the image processors and processor objects are built here with the checkpoints'
values. The tokenizer vocabulary stays small (ids < 512): only the model's vocab_size (the
embedding and the LM head, which is what costs time) is the real one, as in the vlmflow Qwen
benchmark (bench/make_model.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent

# family: (checkpoint whose widths are copied, full depth (text, vision), recommended reduced
# depth (text, vision) for one spec of the fixed benchmark batch in <= 90 s on one H200)
CHECKPOINTS = {
    "mllama": ("meta-llama/Llama-3.2-11B-Vision-Instruct", (40, 32), (10, 8)),
    "gemma3": ("google/gemma-3-4b-it", (34, 27), (12, 9)),
    "pixtral": ("mistral-community/pixtral-12b", (40, 24), (10, 6)),
    "llava": ("llava-hf/llava-1.5-7b-hf", (32, 24), (8, 6)),
    "llava_next": ("llava-hf/llava-v1.6-mistral-7b-hf", (32, 24), (8, 6)),
    "qwen3_vl": ("Qwen/Qwen3-VL-8B-Instruct", (36, 27), (9, 8)),
    "qwen2_vl": ("Qwen/Qwen2-VL-7B-Instruct", (28, 32), (7, 8)),
    "idefics3": ("HuggingFaceM4/Idefics3-8B-Llama3", (32, 27), (8, 7)),
    "qwen3_5": ("Qwen/Qwen3.5-9B", (32, 27), (8, 8)),
    # MoE: ~0.6B (30B-A3B) / ~0.8B (35B-A3B) expert parameters per decoder layer
    "qwen3_vl_moe": ("Qwen/Qwen3-VL-30B-A3B-Instruct", (48, 27), (6, 8)),
    "qwen3_5_moe": ("Qwen/Qwen3.5-35B-A3B", (40, 27), (4, 8)),
    "gemma4": ("google/gemma-4-31B-it", (60, 27), (6, 7)),
    "mistral3": ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", (40, 24), (8, 6)),
    "internvl": ("OpenGVLab/InternVL3_5-8B-HF", (36, 24), (9, 6)),
    "llava_onevision": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", (28, 26), (7, 7)),
}
TINY_DEPTH = (2, 2)  # text, vision (Mllama: 4 text layers so that layer 3 is a cross-attention one)

# Tiny widths (--scale tiny): a Llama-style decoder 64 wide, a vision tower 32 wide.
TINY_WIDTHS = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
TINY_TEXT = dict(TINY_WIDTHS, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# Llama 3.1's RoPE scaling (Llama 3.2 Vision, Idefics3-8B-Llama3; the default is plain RoPE)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# Decoders two checkpoints share: Qwen3-8B (Qwen3-VL-8B, InternVL3.5-8B; its head_dim 128 and
# vocabulary 151936 are the Qwen3 configs' defaults), Qwen2-7B's widths (Qwen2-VL-7B,
# LLaVA-OneVision-7B)
QWEN3_8B = dict(
    hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8
)
QWEN2_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4
)
# SigLIP So400m/14's widths (Gemma 3, Gemma 4 as taken here, Idefics3, LLaVA-OneVision)
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16)


def ensure_vlmflow() -> Path:
    """Make vlmflow importable: from PYTHONPATH, else from a `src/` beside (or above) this file
    (the copy layout of README.md), else from $VLMFLOW_ROOT/src. vlmflow is a namespace package
    (no __init__.py). Returns the checkout root (the folder holding src/, bench/, config/)."""
    import importlib.util
    import os

    roots = [Path(os.environ["VLMFLOW_ROOT"])] if os.environ.get("VLMFLOW_ROOT") else []
    roots += [HERE, HERE.parent, HERE.parent.parent]
    try:
        found = importlib.util.find_spec("vlmflow.families") is not None
    except ImportError:
        found = False
    if not found:
        for root in roots:
            if (root / "src" / "vlmflow" / "families.py").is_file():
                sys.path.insert(0, str(root / "src"))
                break
        else:
            raise SystemExit(
                "vlmflow not found: put its src/ on PYTHONPATH or beside this file, or set "
                "VLMFLOW_ROOT to the folder that holds its src/"
            )
    import vlmflow.families

    return Path(vlmflow.families.__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- depth helpers
def spread(indices, full: int, kept: int) -> list[int]:
    """Layer indices of a `full`-deep stack mapped onto `kept` layers (distinct, in range)."""
    return sorted({min(kept - 1, i * kept // full) for i in indices})


def mllama_cross_layers(n: int) -> list[int]:
    """Llama 3.2 Vision puts a cross-attention layer at 3, 8, ..., 38 of 40: every 5th from 3.
    Same pattern for n layers (at least one)."""
    return list(range(3, n, 5)) or [n - 1]


def qwen3_5_layer_types(n: int) -> list[str]:
    """Qwen3.5: 3 Gated DeltaNet (linear attention) layers, then 1 full-attention layer,
    repeated (8 x (3 + 1) in Qwen3.5-9B's 32). With fewer than 4 layers the last one is full."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


def gemma3_layer_types(n: int) -> list[str]:
    """Gemma 3: 5 sliding-window layers, then 1 full-attention layer, repeated (layers 5, 11, ...
    of gemma-3-4b-it's 34 are full). With fewer than 6 layers the last one is full."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


# ------------------------------------------------------------------------------- processors
def family_modules() -> SimpleNamespace:
    """vlmflow's family modules (`vlmflow.models.*`, as the registry lists them), by name."""
    from vlmflow.families import FAMILY_MODULES

    return SimpleNamespace(**{m.__name__.rsplit(".", 1)[-1]: m for m in FAMILY_MODULES})


def _tokenizer(family: str):
    """(tokenizer, special-token ids): those of the family's tiny model (vlmflow.models)."""
    m = family_modules()
    qwen_vl = m.qwen_vl
    tokenizers = {
        "qwen2_vl": qwen_vl.qwen_tokenizer,
        "qwen3_vl": qwen_vl.qwen_tokenizer,
        "qwen3_5": qwen_vl.qwen_tokenizer,
        "qwen3_vl_moe": qwen_vl.qwen_tokenizer,
        "qwen3_5_moe": qwen_vl.qwen_tokenizer,
        "gemma4": m.gemma4.gemma4_tokenizer,
        "mllama": m.mllama.llama3_tokenizer,
        "gemma3": m.gemma3.gemma3_tokenizer,
        "pixtral": m.mistral.pixtral_tokenizer,
        "mistral3": m.mistral.pixtral_tokenizer,
        "llava": m.llava.llava_tokenizer,
        "llava_next": lambda: m.llava.llava_tokenizer(next_=True),
        "idefics3": m.idefics3.idefics3_tokenizer,
        "internvl": m.internvl.internvl_tokenizer,
        "llava_onevision": m.llava_onevision.onevision_tokenizer,
    }
    if family not in tokenizers:
        raise KeyError(family)
    return tokenizers[family]()


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
# llava-onevision's any-res grid: every 1..6 x 1..6 arrangement of 384 px views
ONEVISION_GRID = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_processor(family: str):
    """The family's processor with the checkpoint's image settings (the same at both scales).
    Returns (processor, tokenizer, special-token ids)."""
    import transformers as tr

    m = family_modules()
    tok, ids = _tokenizer(family)
    if family == "mllama":
        # Llama-3.2-11B-Vision-Instruct preprocessor_config.json: 560x560 tiles, up to 4, CLIP
        # mean/std (transformers' defaults: 224 px, mean/std 0.5)
        image = tr.MllamaImageProcessor(
            size={"height": 560, "width": 560},
            max_image_tiles=4,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        proc = tr.MllamaProcessor(
            image_processor=image, tokenizer=tok, chat_template=m.mllama.LLAMA3_CHAT_TEMPLATE
        )
    elif family == "gemma3":
        # gemma-3-4b-it: 896x896, mean/std 0.5, 256 soft tokens per image, no pan-and-scan
        image = tr.Gemma3ImageProcessor(size={"height": 896, "width": 896})
        proc = tr.Gemma3Processor(
            image_processor=image,
            tokenizer=tok,
            image_seq_length=256,
            chat_template=m.gemma3.GEMMA3_CHAT_TEMPLATE,
        )
    elif family in ("pixtral", "mistral3"):
        # pixtral-12b: longest edge 1024, 16 px patches, no spatial merge; transformers' defaults;
        # Mistral-Small-3.1-24B-Instruct-2503: longest edge 1540, 14 px patches, 2x2 merge
        edge, patch, merge = (1540, 14, 2) if family == "mistral3" else (1024, 16, 1)
        image = tr.PixtralImageProcessor(size={"longest_edge": edge}, patch_size=patch)
        proc = tr.PixtralProcessor(
            image_processor=image,
            tokenizer=tok,
            patch_size=patch,
            spatial_merge_size=merge,
            chat_template=m.mistral.MISTRAL_CHAT_TEMPLATE,
        )
    elif family in ("llava", "llava_next"):
        # llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (resize + center crop) -> 576 image tokens;
        # the template llava-hf ships (vlmflow replaces it, see models.llava.LLAVA_CHAT_TEMPLATE).
        # llava-v1.6-mistral-7b-hf: a 336 px base view + any-res tiles on these pinpoints.
        crop = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        if family == "llava":
            image = tr.CLIPImageProcessor(**crop)
            cls, template = tr.LlavaProcessor, m.llava.LLAVA_HF_CHAT_TEMPLATE
        else:
            grid = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            image = tr.LlavaNextImageProcessor(**crop, image_grid_pinpoints=grid)
            cls, template = tr.LlavaNextProcessor, m.llava.LLAVA_NEXT_TINY_CHAT_TEMPLATE
        proc = m.llava.llava_processor(cls, image, tok, 14, template)
    elif family in ("qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_5_moe"):
        # Qwen3-VL-8B-Instruct: 16 px patches, 2x2 merge, mean/std 0.5, pixels in [65536, 16777216];
        # Qwen3.5 and the MoE models use Qwen3-VL's processor and image settings
        image = tr.Qwen2VLImageProcessor(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 65536, "longest_edge": 16777216},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        proc = tr.Qwen3VLProcessor(
            image_processor=image,
            tokenizer=tok,
            video_processor=tr.Qwen3VLVideoProcessor(patch_size=16, merge_size=2),
            chat_template=m.qwen_vl.QWEN_CHAT_TEMPLATE,
        )
    elif family == "gemma4":
        # Gemma 4: Gemma4ImageProcessor's defaults (16 px patches, 3x3 pooling, up to 280 soft
        # tokens per image, aspect ratio kept), and the audio feature extractor the processor
        # takes
        proc = tr.Gemma4Processor(
            feature_extractor=tr.Gemma4AudioFeatureExtractor(),
            image_processor=tr.Gemma4ImageProcessor(),
            tokenizer=tok,
            video_processor=tr.Gemma4VideoProcessor(),
            image_seq_length=280,
            chat_template=m.gemma4.GEMMA4_CHAT_TEMPLATE,
        )
    elif family == "qwen2_vl":
        # Qwen2-VL-7B-Instruct: 14 px patches, 2x2 merge, min_pixels 3136, max_pixels 12845056
        image = tr.Qwen2VLImageProcessor(size={"shortest_edge": 3136, "longest_edge": 12845056})
        proc = tr.Qwen2VLProcessor(
            image_processor=image,
            tokenizer=tok,
            video_processor=tr.Qwen2VLVideoProcessor(),
            chat_template=m.qwen_vl.QWEN_CHAT_TEMPLATE,
        )
    elif family == "internvl":
        # InternVL3_5-8B-HF: 448 px tiles (1 to 12, + a thumbnail when tiled), CLIP-style
        # ImageNet mean/std, 256 <IMG_CONTEXT> tokens per tile (1024 patches pixel-shuffled 2x2)
        tile = {"height": 448, "width": 448}
        image = tr.GotOcr2ImageProcessor(
            size=tile,
            crop_to_patches=True,
            min_patches=1,
            max_patches=12,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        proc = tr.InternVLProcessor(
            image_processor=image,
            tokenizer=tok,
            video_processor=tr.InternVLVideoProcessor(size=tile),
            image_seq_length=256,
            chat_template=m.internvl.INTERNVL_CHAT_TEMPLATE,
        )
    elif family == "llava_onevision":
        # llava-onevision-qwen2-7b-ov-hf: SigLIP at 384 px (mean/std 0.5), any-res tiles on the
        # 384..2304 px grid, 729 tokens per view, all patches kept (strategy "full")
        image = tr.LlavaOnevisionImageProcessor(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=ONEVISION_GRID,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        proc = tr.LlavaOnevisionProcessor(
            image_processor=image,
            tokenizer=tok,
            video_processor=tr.LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            chat_template=m.llava_onevision.ONEVISION_CHAT_TEMPLATE,
        )
    elif family == "idefics3":
        # Idefics3-8B-Llama3: images rescaled to a 1456 px longest edge and split into 364 px
        # crops + a global view, 169 tokens each (transformers' defaults)
        image = tr.Idefics3ImageProcessor(
            size={"longest_edge": 1456},
            max_image_size={"longest_edge": 364},
            do_image_splitting=True,
        )
        proc = tr.Idefics3Processor(
            image_processor=image,
            tokenizer=tok,
            image_seq_len=169,
            chat_template=m.idefics3.IDEFICS3_CHAT_TEMPLATE,
        )
    else:
        raise KeyError(family)
    return proc, tok, ids


# ------------------------------------------------------------------------------- configs
def build_config(family: str, scale: str, text_layers: int, vision_layers: int, tok, ids):
    """The transformers config. Values are the class defaults where those equal the checkpoint's;
    every other value is set here, commented with the checkpoint it comes from."""
    import transformers as tr

    m = family_modules()
    tiny = scale == "tiny"
    vocab = len(tok)
    nt, nv = text_layers, vision_layers

    if family == "mllama":
        # meta-llama/Llama-3.2-11B-Vision-Instruct. MllamaTextConfig's defaults are its text
        # widths (vocab 128256, hidden 4096, 32 heads / 8 KV heads, MLP 14336); MllamaVisionConfig's
        # are its vision widths (1280 wide, 16 heads, MLP 5120, 14 px patches, 4 tiles, the 8 aspect
        # ratios, intermediate layers 3/7/15/23/30 -> vision_output_dim 7680) except image_size.
        full_v = 32
        inter = spread([3, 7, 15, 23, 30], full_v, nv) if not tiny else [0]
        vhidden = 32 if tiny else 1280
        text = dict(
            num_hidden_layers=nt,
            cross_attention_layers=mllama_cross_layers(nt),
            rope_parameters=LLAMA3_ROPE,
            **end_ids(family, ids),
        )
        vision = dict(
            image_size=560,  # checkpoint: 560 px tiles (default 448)
            num_hidden_layers=nv,
            num_global_layers=max(1, round(nv * 8 / full_v)),  # checkpoint: 32 local, 8 global
            intermediate_layers_indices=inter,
            vision_output_dim=vhidden * (1 + len(inter)),
        )
        if tiny:
            text.update(vocab_size=vocab, **TINY_WIDTHS)
            vision.update(hidden_size=32, intermediate_size=64, attention_heads=2)
        return tr.MllamaConfig(
            text_config=text, vision_config=vision, image_token_index=ids["<|image|>"]
        )

    if family == "gemma3":
        # google/gemma-3-4b-it. Gemma3TextConfig's defaults give its vocab (262208), 8 heads / 4
        # KV heads of 256, query_pre_attn_scalar 256, gelu_pytorch_tanh, the 5:1 sliding/full
        # pattern, tied embeddings; the vision defaults are SigLIP-B/16 at 224 px, not gemma 3's.
        text = dict(
            hidden_size=2560,  # checkpoint (default 2304)
            intermediate_size=10240,  # checkpoint (default 9216)
            num_hidden_layers=nt,
            sliding_window=1024,  # checkpoint (default 4096)
            layer_types=gemma3_layer_types(nt),
            # checkpoint: rope_scaling {"factor": 8.0, "rope_type": "linear"} on the global layers
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **end_ids(family, ids),
            tie_word_embeddings=True,
        )
        vision = dict(  # checkpoint: SigLIP So400m/14 at 896 px, no pooling head
            model_type="siglip_vision_model",
            **SO400M,
            num_hidden_layers=nv,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
        )
        if tiny:
            text.update(vocab_size=vocab, query_pre_attn_scalar=16, **TINY_TEXT)
            vision.update(TINY_VISION)
        return tr.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=256,  # checkpoint (= default)
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
            tie_word_embeddings=True,
        )

    if family in ("pixtral", "mistral3"):
        # mistral-community/pixtral-12b: LlavaForConditionalGeneration, Mistral-NeMo-12B text
        # model (the values of transformers' convert_pixtral_weights_to_hf.py), Pixtral-ViT
        # (PixtralVisionConfig's defaults: 1024 wide, 16 heads of 64, MLP 4096, 1024 px, 16 px
        # patches, 2-D RoPE theta 10000) with the checkpoint's SiLU.
        # mistralai/Mistral-Small-3.1-24B-Instruct-2503 (as recalled from its config.json, not
        # checked against the hub here): Mistral text model 40 layers 5120 wide, 32 heads / 8 KV
        # heads of 128, MLP 32768, vocab 131072, rope_theta 1e9; Pixtral encoder 24 layers 1024
        # wide, 16 heads, MLP 4096 (PixtralVisionConfig's defaults), 1540 px images, 14 px
        # patches; 2x2 patch merger, no projector bias.
        small = family == "mistral3"
        text = dict(
            model_type="mistral",
            hidden_size=5120,
            intermediate_size=32768 if small else 14336,
            num_hidden_layers=nt,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,  # != 5120 / 32
            vocab_size=131072,
            max_position_embeddings=131072 if small else 1024000,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
            sliding_window=None,
            tie_word_embeddings=False,
            **end_ids(family, ids),
        )
        vision = dict(model_type="pixtral", num_hidden_layers=nv)
        if small:
            vision.update(image_size=1540, patch_size=14)
        else:
            vision.update(hidden_act="silu", image_size=1024, patch_size=16)  # default gelu
        if tiny:
            text.update(vocab_size=vocab, **TINY_TEXT)
            vision.update(TINY_VISION, head_dim=16)
        if small:
            return m.mistral.pixtral_config(
                tr.Mistral3Config, text, vision, ids, multimodal_projector_bias=False
            )
        # checkpoint: variable image sizes; the last layer, every patch (as the tiny model)
        return m.mistral.pixtral_config(tr.LlavaConfig, text, vision, ids, image_seq_length=1)

    if family in ("llava", "llava_next"):
        # llava-hf/llava-1.5-7b-hf. LlavaConfig's defaults are this model: a Llama text config
        # (Vicuna-7B widths: 4096, 32 heads, MLP 11008) and CLIP ViT-L/14-336 (1024 wide, 24
        # layers, 16 heads, MLP 4096, quick_gelu), penultimate layer, CLS dropped, 576 tokens.
        # llava-hf/llava-v1.6-mistral-7b-hf: LlavaNextConfig's defaults for the CLIP tower, the
        # pinpoints, feature layer -2; the text model is Mistral-7B-Instruct-v0.2.
        cls = tr.LlavaConfig if family == "llava" else tr.LlavaNextConfig
        text = dict(
            num_hidden_layers=nt,
            vocab_size=32064,  # checkpoints (default 32000)
            rms_norm_eps=1e-5,  # checkpoints (default 1e-6)
            **end_ids(family, ids),
        )
        if family == "llava":  # checkpoint: 4096 positions (default 2048)
            text.update(model_type="llama", max_position_embeddings=4096)
        else:  # checkpoint: 32768 positions (default 131072), theta 1e6 (1e4), no window (4096)
            text.update(
                model_type="mistral",
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                sliding_window=None,
            )
        # the class's default vision_config (the CLIPVisionConfig class defaults are ViT-B/32)
        vision = {**cls().vision_config.to_dict(), "num_hidden_layers": nv}
        if tiny:
            text.update(vocab_size=vocab, **TINY_TEXT)
            vision.update(TINY_VISION, projection_dim=32)
        return cls(
            text_config=text,
            vision_config=vision,
            image_token_index=ids["<image>"],
            tie_word_embeddings=False,
        )

    if family in ("qwen3_vl", "qwen3_vl_moe"):
        # Qwen/Qwen3-VL-8B-Instruct. Qwen3VLVisionConfig's defaults are its tower (27 blocks
        # 1152 wide, MLP 4304, 16 heads, 16 px patches, 2x2 merge, 2304 position embeddings,
        # DeepStack at 8/16/24) except out_hidden_size; the text defaults are not the 8B's.
        # Qwen/Qwen3-VL-30B-A3B-Instruct: the same tower; text 2048 wide, 32 / 4 KV heads of
        # 128, every layer a sparse MoE block of 128 experts (8 active) with MoE MLP 768.
        moe = family == "qwen3_vl_moe"
        text = dict(
            **QWEN3_8B,
            num_hidden_layers=nt,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
            **end_ids(family, ids),
        )
        if moe:
            text.update(
                hidden_size=2048,
                intermediate_size=6144,
                num_key_value_heads=4,
                head_dim=128,  # != 2048 / 32
                num_experts=128,
                num_experts_per_tok=8,
                moe_intermediate_size=768,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        vision = dict(
            depth=nv,
            out_hidden_size=text["hidden_size"],  # checkpoint (default 3584)
            deepstack_visual_indexes=spread([8, 16, 24], 27, nv),
        )
        if tiny:
            text.update(vocab_size=vocab, **TINY_TEXT, **(TINY_MOE if moe else {}))
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 3, 3])
            vision.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        return (tr.Qwen3VLMoeConfig if moe else tr.Qwen3VLConfig)(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=False,
            **m.qwen_vl.qwen_tokens(ids),
        )

    if family in ("qwen3_5", "qwen3_5_moe"):
        # Qwen3.5-MoE (Qwen/Qwen3.5-35B-A3B): Qwen3_5MoeTextConfig's defaults are its widths
        # (40 layers 2048 wide as 10 x (3 + 1), DeltaNet and attention heads as below, 256
        # experts, 8 active, MoE MLP 512, a shared expert of 512); vision the same tower with
        # out_hidden_size 2048. The rest as for the dense one:
        # Qwen/Qwen3.5-9B, from its model card: 32 layers 4096 wide as 8 x (3 Gated DeltaNet + 1
        # gated attention), DeltaNet 16 QK / 32 V heads of 128, attention 16 / 4 KV heads of 256
        # with a 64-dim rotary part (partial_rotary_factor 0.25), MLP 12288, vocab 248320: all
        # Qwen3_5TextConfig's defaults. rope_theta 1e7 and mrope_section [11, 11, 10] (the 32
        # rotary frequencies) as Qwen3.5's released configs have them. Vision:
        # Qwen3_5VisionConfig's defaults (Qwen3-VL's 27 x 1152 tower without DeepStack) with
        # out_hidden_size 4096 (the text width).
        text = dict(
            num_hidden_layers=nt,
            layer_types=qwen3_5_layer_types(nt),
            max_position_embeddings=262144,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
            },
            **end_ids(family, ids),
        )
        moe = family == "qwen3_5_moe"
        vision = dict(depth=nv, out_hidden_size=2048 if moe else 4096)
        if tiny:
            text.update(
                vocab_size=vocab,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                **TINY_TEXT,
                **(dict(TINY_MOE, shared_expert_intermediate_size=32) if moe else {}),
            )
            text["rope_parameters"] = dict(
                text["rope_parameters"], partial_rotary_factor=0.5, mrope_section=[2, 1, 1]
            )
            vision.update(hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        return (tr.Qwen3_5MoeConfig if moe else tr.Qwen3_5Config)(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=False,
            **m.qwen_vl.qwen_tokens(ids),
        )

    if family == "gemma4":
        # google/gemma-4-31B-it (dense), from public descriptions of its config (the hub is out
        # of reach here): 60 layers 5376 wide, 5 sliding (window 1024) : 1 full attention;
        # sliding layers 32 heads / 16 KV heads of 256, full layers head_dim 512 with 4 KV
        # heads whose keys double as values (attention_k_eq_v), MLP 21504, vocab 262144, tied
        # embeddings, final logit softcap 30, no per-layer embeddings. RoPE: Gemma4TextConfig's
        # defaults. Vision: a ~550M encoder, taken as 27 layers 1152 wide, 16 heads of 72, MLP
        # 4304 (So400m widths: 27 x 20.2M = 545M); its other values are Gemma4VisionConfig's
        # defaults (16 px patches, 3x3 pooling).
        text = dict(
            hidden_size=5376,
            intermediate_size=21504,
            num_hidden_layers=nt,
            num_attention_heads=32,
            num_key_value_heads=16,
            head_dim=256,
            global_head_dim=512,
            num_global_key_value_heads=4,
            attention_k_eq_v=True,
            sliding_window=1024,
            layer_types=gemma3_layer_types(nt),
            final_logit_softcapping=30.0,
            hidden_size_per_layer_input=0,
            max_position_embeddings=262144,
            **end_ids(family, ids),
            tie_word_embeddings=True,
        )
        vision = dict(
            **SO400M,
            num_hidden_layers=nv,
            num_key_value_heads=16,
            head_dim=72,
        )
        if tiny:
            text.update(
                vocab_size=vocab,
                vocab_size_per_layer_input=vocab,
                global_head_dim=32,
                num_global_key_value_heads=1,
                sliding_window=256,
                **TINY_TEXT,
            )
            vision.update(TINY_VISION, num_key_value_heads=2, head_dim=16)
        return tr.Gemma4Config(
            text_config=text,
            vision_config=vision,
            **m.gemma4.gemma4_special_ids(ids),
            tie_word_embeddings=True,
        )

    if family == "qwen2_vl":
        # Qwen/Qwen2-VL-7B-Instruct. Qwen2VLVisionConfig's defaults are its tower (32 blocks,
        # 1280 wide, MLP ratio 4, 16 heads, 14 px patches, merger to 3584); the text defaults are
        # the 72B's.
        text = dict(
            **QWEN2_7B,
            num_hidden_layers=nt,
            vocab_size=152064,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            max_window_layers=nt,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [16, 24, 24],
            },
            bos_token_id=ids["<|endoftext|>"],  # checkpoint (its generation config has none)
            **end_ids(family, ids),
        )
        vision = dict(depth=nv)
        if tiny:
            text.update(
                vocab_size=vocab,
                **TINY_WIDTHS,
            )
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 3, 3])
            vision.update(embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64)
        return tr.Qwen2VLConfig(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=False,
            **m.qwen_vl.qwen_tokens(ids),
        )

    if family in ("internvl", "llava_onevision"):
        return chatml_config(family, tiny, nt, nv, vocab, ids)

    if family == "idefics3":
        # HuggingFaceM4/Idefics3-8B-Llama3: Llama-3.1-8B-Instruct text model, SigLIP So400m/14 at
        # 364 px (Idefics3VisionConfig's defaults are a 12-layer, 224 px, 32 px-patch tower),
        # pixel-shuffle connector with scale factor 2 (= default).
        text = dict(
            model_type="llama",
            num_hidden_layers=nt,
            intermediate_size=14336,
            num_key_value_heads=8,
            vocab_size=128259,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters=LLAMA3_ROPE,
            **end_ids(family, ids),
            tie_word_embeddings=False,
        )
        vision = dict(
            **SO400M,
            num_hidden_layers=nv,
            image_size=364,
            patch_size=14,
        )
        if tiny:
            text.update(vocab_size=vocab, **TINY_TEXT)
            vision.update(TINY_VISION)
        return m.idefics3.idefics3_config(tr.Idefics3Config, text, vision, ids)
    raise KeyError(family)


def chatml_config(family: str, tiny: bool, nt: int, nv: int, vocab: int, ids: dict):
    """InternVL 3.5 and LLaVA-OneVision: a Qwen decoder behind a ViT. Widths as recalled from
    the checkpoints' config.json (not checked against the hub here)."""
    import transformers as tr

    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    if family == "internvl":
        # OpenGVLab/InternVL3_5-8B-HF: Qwen3-8B (36 layers 4096 wide, 32 heads / 8 KV heads of
        # 128, MLP 12288, vocab 151936, rope_theta 1e6); InternViT-300M (24 layers 1024 wide,
        # 16 heads, MLP 4096, 448 px, 14 px patches, qkv bias, layer norm, no qk norm); pixel
        # shuffle 0.5 + MLP projector
        text = dict(
            model_type="qwen3",
            **QWEN3_8B,
            num_hidden_layers=nt,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
        vision = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=nv,
            num_attention_heads=16,
            image_size=448,
            patch_size=14,
            attention_bias=True,
        )
    else:
        # llava-hf/llava-onevision-qwen2-7b-ov-hf: Qwen2-7B (28 layers 3584 wide, 28 heads / 4
        # KV heads, MLP 18944, vocab 152128 after the image/video tokens, rope_theta 1e6);
        # SigLIP So400m/14 at 384 px without its last layer (26) and head
        text = dict(
            model_type="qwen2",
            **QWEN2_7B,
            num_hidden_layers=nt,
            vocab_size=152128,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
        vision = dict(
            model_type="siglip_vision_model",
            **SO400M,
            num_hidden_layers=nv,
            image_size=384,
            patch_size=14,
            vision_use_head=False,
        )
    text.update(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    if tiny:
        text.update(vocab_size=vocab, **TINY_TEXT)
        vision.update(TINY_VISION)
    if family == "internvl":
        return tr.InternVLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=256,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    from vlmflow.models.llava_onevision import onevision_config

    return onevision_config(text, vision, ids, ONEVISION_GRID)


MODEL_CLASSES = {
    "mllama": "MllamaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "pixtral": "LlavaForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
}


EOS_PAD_BOS = {  # generation_config tokens, as vlmflow.tiny sets them
    "mllama": ("<|eot_id|>", "<|finetune_right_pad_id|>", "<|begin_of_text|>"),
    "gemma3": ("<end_of_turn>", "<pad>", "<bos>"),
    "pixtral": ("</s>", "<pad>", "<s>"),
    "llava": ("</s>", "<pad>", "<s>"),
    "llava_next": ("</s>", "<pad>", "<s>"),
    "qwen3_vl": ("<|im_end|>", "<|endoftext|>", None),
    "qwen2_vl": ("<|im_end|>", "<|endoftext|>", None),
    "idefics3": ("<end_of_utterance>", "<end_of_utterance>", "<|begin_of_text|>"),
    "qwen3_5": ("<|im_end|>", "<|endoftext|>", None),
    "gemma4": ("<turn|>", "<pad>", "<bos>"),
    "mistral3": ("</s>", "<pad>", "<s>"),
    "internvl": ("<|im_end|>", "<|endoftext|>", None),
    "llava_onevision": ("<|im_end|>", "<|endoftext|>", None),
    "qwen3_vl_moe": ("<|im_end|>", "<|endoftext|>", None),
    "qwen3_5_moe": ("<|im_end|>", "<|endoftext|>", None),
}


def end_ids(family: str, ids: dict) -> dict:
    """The text config's end, padding (and begin) token ids: the generation tokens (EOS_PAD_BOS)."""
    eos, pad, bos = EOS_PAD_BOS[family]
    out = dict(eos_token_id=ids[eos], pad_token_id=ids[pad])
    if bos is not None:
        out["bos_token_id"] = ids[bos]
    return out


def random_init_zero_parameters(model) -> list[str]:
    """Weights the model initialises at zero so that images would get no gradient, drawn at
    random as vlmflow.tiny does: Mllama's tanh gates (cross-attention and positional) ~ U(0.5, 1),
    Gemma 3's projector weight ~ N(0, 0.05). Returns the names changed."""
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta" or p.any():
                continue
            if "gate" in name and p.ndim <= 1:
                p.uniform_(0.5, 1.0)
                changed.append(name)
            elif name.endswith("mm_input_projection_weight"):
                p.normal_(0.0, 0.05)
                changed.append(name)
    return changed


def depth_for(family: str, scale: str, text_layers, vision_layers, recommended: bool):
    _, full, rec = CHECKPOINTS[family]
    if scale == "tiny":
        base = (4 if family == "mllama" else TINY_DEPTH[0], TINY_DEPTH[1])
    else:
        base = rec if recommended else full
    return (text_layers or base[0], vision_layers or base[1])


def make_model(family: str, cfg, device: str):
    import transformers as tr

    cls = getattr(tr, MODEL_CLASSES[family])
    with torch.device(device):
        return cls._from_config(cfg, dtype=torch.bfloat16)


def parts(model, family_name: str) -> dict[str, int]:
    """Parameter counts by part: vision tower, projector, input embeddings, LM head (when not
    tied), language layers + norms."""
    from vlmflow.families import FAMILIES

    fam = FAMILIES[family_name]
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    out = dict(vision=0, projector=0, embeddings=0, lm_head=0, language=0)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is emb:
            out["embeddings"] += p.numel()
        elif p is head:
            out["lm_head"] += p.numel()
        elif any(name.startswith(m + ".") for m in fam.projector):
            out["projector"] += p.numel()
        elif any(name.startswith(m + ".") for m in fam.vision_tower):
            out["vision"] += p.numel()
        else:
            out["language"] += p.numel()
    out["total"] = sum(out.values())
    return out


def image_tokens(processor, family_name: str, side: int = 896) -> dict:
    """Tokens the processor makes for one side x side image + a one-word question."""
    import numpy as np
    from PIL import Image

    from vlmflow.families import FAMILIES

    fam = FAMILIES[family_name]
    tok = processor.tokenizer
    img = Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8) + 128)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    enc = processor(text=[text], images=[[img]], return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"][0]
    marks = [tok.convert_tokens_to_ids(t) for t in fam.image_tokens]
    shapes = {k: tuple(v.shape) for k, v in enc.items() if k != "input_ids" and hasattr(v, "shape")}
    return dict(
        image_tokens=int((ids == marks[0]).sum()),
        image_marker_tokens=int(sum((ids == m).sum() for m in marks[1:] if m != marks[0])),
        tokens=int(ids.numel()),
        shapes=shapes,
    )


def count(families: list[str], text_layers, vision_layers) -> None:
    """Print parameter counts (meta device: nothing allocated) at full and reduced depth and
    the processor's tokens per 896x896 image."""
    from vlmflow.families import family_for_config

    for family in families:
        ckpt, full, rec = CHECKPOINTS[family]
        proc, tok, ids = build_processor(family)
        rows = []
        for label, (nt, nv) in (
            ("full", full),
            ("reduced", (text_layers or rec[0], vision_layers or rec[1])),
        ):
            cfg = build_config(family, "real", nt, nv, tok, ids)
            model = make_model(family, cfg, "meta")
            p = parts(model, family_for_config(cfg).name)
            rows.append((label, nt, nv, p, cfg))
        info = image_tokens(proc, family_for_config(rows[0][4]).name)
        print(f"== {family}  ({ckpt})")
        for label, nt, nv, p, cfg in rows:
            extra = ""
            if family == "mllama":
                tc, vc = cfg.text_config, cfg.vision_config
                extra = (
                    f" cross-attn {tc.cross_attention_layers}, global {vc.num_global_layers},"
                    f" intermediate {vc.intermediate_layers_indices}"
                )
            elif family in ("gemma3", "gemma4", "qwen3_5", "qwen3_5_moe"):
                lt = cfg.text_config.layer_types
                extra = f" full-attention layers {[i for i, t in enumerate(lt) if t == 'full_attention']}"
            elif family in ("qwen3_vl", "qwen3_vl_moe"):
                extra = f" deepstack {cfg.vision_config.deepstack_visual_indexes}"
            print(
                f"  {label:8s} text {nt:2d} vision {nv:2d}: {p['total'] / 1e9:7.3f}B "
                f"(vision {p['vision'] / 1e9:.3f}B, projector {p['projector'] / 1e6:.1f}M, "
                f"embeddings {p['embeddings'] / 1e9:.3f}B, lm_head {p['lm_head'] / 1e9:.3f}B, "
                f"language layers {p['language'] / 1e9:.3f}B) = {p['total'] * 2 / 2**30:.1f} GiB bf16"
                + extra
            )
        print(
            f"  896x896 image: {info['image_tokens']} image tokens (+{info['image_marker_tokens']} "
            f"markers), {info['tokens']} tokens with a one-word question; {info['shapes']}"
        )


def build(family: str, out: str, scale: str, nt: int, nv: int, device: str, seed: int) -> dict:
    from vlmflow.families import family_for_config
    from vlmflow.io import atomic_dir
    from vlmflow.tiny import finish

    proc, tok, ids = build_processor(family)
    cfg = build_config(family, scale, nt, nv, tok, ids)
    torch.manual_seed(seed)
    model = make_model(family, cfg, device)
    changed = random_init_zero_parameters(model)
    eos, pad, bos = (None if t is None else ids[t] for t in EOS_PAD_BOS[family])
    finish(model, eos, pad, bos)
    fam = family_for_config(cfg).name
    info = dict(
        family=fam,
        checkpoint=CHECKPOINTS[family][0],
        scale=scale,
        text_layers=nt,
        vision_layers=nv,
        parameters=parts(model, fam),
        randomised_zero_init=changed,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size="5GB")
        proc.save_pretrained(tmp)
        (tmp / "make_family.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("family", help=f"{' | '.join(CHECKPOINTS)} (with --count also: all)")
    ap.add_argument("out", nargs="?", help="model folder to write (not with --count)")
    ap.add_argument("--scale", choices=["real", "tiny"], default="real")
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: full)")
    ap.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: full)")
    ap.add_argument(
        "--recommended",
        action="store_true",
        help="the reduced depth of CHECKPOINTS (what run.sh builds) where no depth is given",
    )
    ap.add_argument("--count", action="store_true", help="print parameter counts, save nothing")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-cpu-gib",
        type=float,
        default=6.0,
        help="refuse to build a bf16 model larger than this on the CPU (default 6 GiB)",
    )
    a = ap.parse_args()
    ensure_vlmflow()
    if a.count:
        fams = list(CHECKPOINTS) if a.family == "all" else [a.family]
        count(fams, a.text_layers, a.vision_layers)
        return
    if a.family not in CHECKPOINTS:
        ap.error(f"unknown family {a.family!r} (known: {', '.join(CHECKPOINTS)})")
    if not a.out:
        ap.error("give the output folder")
    nt, nv = depth_for(a.family, a.scale, a.text_layers, a.vision_layers, a.recommended)
    if a.device == "cpu" and a.scale == "real":
        _, tok, ids = build_processor(a.family)
        n = sum(
            p.numel()
            for p in make_model(
                a.family, build_config(a.family, "real", nt, nv, tok, ids), "meta"
            ).parameters()
        )
        if n * 2 / 2**30 > a.max_cpu_gib:
            sys.exit(
                f"{a.family} at text {nt} / vision {nv} layers is {n / 1e9:.2f}B parameters "
                f"({n * 2 / 2**30:.1f} GiB bf16): build it on a GPU, cut its depth, or raise "
                "--max-cpu-gib"
            )
    info = build(a.family, a.out, a.scale, nt, nv, a.device, a.seed)
    p = info["parameters"]
    print(
        f"saved {a.out}: {a.family} ({info['checkpoint']} widths, scale {a.scale}), text {nt} / "
        f"vision {nv} layers, {p['total'] / 1e6:.2f}M parameters; randomised zero-init: "
        f"{len(info['randomised_zero_init'])} tensors"
    )


if __name__ == "__main__":
    main()
