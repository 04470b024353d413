#!/usr/bin/env python
"""Build Qwen2.5-VL-7B (the real config: hidden 3584, 28 layers, MLP 18944, vocab 152064; vision
depth 32, hidden 1280, window 112, full-attention blocks 7/15/23/31) with random weights and a
locally built processor, offline. Timings do not depend on weight values.

    python bench/make_model.py /tmp/qwen7b            # ~16 GB of bf16 safetensors
    python bench/make_model.py /tmp/qwen-small --size small
"""

import argparse

import torch

from vlmflow.models.qwen_vl import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, qwen_tokens


def anchor_tokenizer():
    """The byte-level BPE of ../shared/anchor-bench/make_model.py (same corpus, same vocab size),
    so that the benchmark batch has the same 1387 tokens per sample as the reference timings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog " * 3,
        "what is in this image? a red circle on a white background",
        "describe the picture in detail. the answer is 0 1 2 3 4 5 6 7 8 9",
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


SIZES = {
    "7b": (
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        ),
        dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
    ),
    "small": (
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=2048,
            max_position_embeddings=8192,
            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
        ),
        dict(
            depth=4,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=256,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1, 3],
            tokens_per_second=2,
        ),
    ),
}


def build_processor():
    """The benchmark model's processor: the anchor tokenizer, Qwen2-VL's default image
    processor, Qwen's chat template."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = Qwen2TokenizerFast(
        tokenizer_object=anchor_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def main() -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    processor = build_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text, vision = SIZES[a.size]
    # begin, end and padding tokens, in the text config and at the top level
    ends = dict(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    cfg = Qwen2_5_VLConfig(
        text_config={**text, **ends}, vision_config=vision, **ends, **qwen_tokens(ids)
    )
    torch.manual_seed(0)
    with torch.device(a.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(a.out, max_shard_size="5GB")
    processor.save_pretrained(a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {a.out}: {n / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()
