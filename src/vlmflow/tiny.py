"""Tiny random-weight models with real processors, built offline: the helpers every family's
tiny builder shares (the builders live in the family modules, `vlmflow.models.*`).

Tests and the demo use them in place of hub checkpoints: they are saved with `save_pretrained`
and loaded back through the same `AutoModelForImageTextToText` / `AutoProcessor`
`from_pretrained` path as e.g. `Qwen/Qwen2.5-VL-7B-Instruct`. Each has the real architecture
class, processor class and chat-template format of its family (same special tokens and turn
markers), at ~100k-300k parameters with tiny images. The tokenizer is a byte-level BPE trained
here with `tokenizers`.

Traps the builders handle (they would make a test pass for the wrong reason or fail for no
reason): Gemma 3's projector weight and Mllama's cross-attention gates start at zero (images
would get no gradient): they are initialised randomly; Gemma 3's processor needs the named
special tokens `boi_token`, `eoi_token`, `image_token` on its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

# Text the byte-level BPE is trained on: enough for chat roles, the demo prompt and answers.
_CORPUS = [
    "system user assistant",
    "Which digit is written in this image? The answer is 0 1 2 3 4 5 6 7 8 9",
    "What is in this image? Describe the picture in detail.",
    "the quick brown fox jumps over the lazy dog, a red circle on a white background.",
    "zero one two three four five six seven eight nine ten yes no",
]


# Widths of the tiny models: a Llama-style decoder 64 wide and a ViT 32 wide, 2 layers each.
TEXT_WIDTHS = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
VISION_WIDTHS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def train_bpe_tokenizer(specials: list[str], vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


def fast_tokenizer_of(tokenizer_class, specials: list[str], **kwargs):
    """(tokenizer, {special token: id}): a `tokenizer_class` (a transformers fast tokenizer)
    over a fresh byte-level BPE with `specials` as special tokens. kwargs: bos/eos/pad tokens
    and `extra_special_tokens` (named ones become attributes)."""
    tok = tokenizer_class(tokenizer_object=train_bpe_tokenizer(specials), **kwargs)
    return tok, token_ids(tok, specials)


def fast_tokenizer(specials: list[str], **kwargs):
    """(tokenizer, ids) with a `PreTrainedTokenizerFast` (see `fast_tokenizer_of`)."""
    from transformers import PreTrainedTokenizerFast

    return fast_tokenizer_of(PreTrainedTokenizerFast, specials, **kwargs)


def token_ids(tok, names) -> dict[str, int]:
    """{token: id} of the tokens `names`."""
    return {t: tok.convert_tokens_to_ids(t) for t in names}


def llama_text(tok, ids: dict, eos: str, pad: str, bos: str | None = None, **extra) -> dict:
    """Text-config kwargs of a 2-layer, 64-wide Llama-style decoder whose end, padding (and
    begin) tokens are `eos`, `pad` (and `bos`), with ids from `ids` ({token: id}); `extra` is
    added to, or overrides, the defaults."""
    out = dict(
        **TEXT_WIDTHS,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if bos is not None:
        out["bos_token_id"] = ids[bos]
    out.update(eos_token_id=ids[eos], pad_token_id=ids[pad])
    out.update(extra)
    return out


def vit(**extra) -> dict:
    """Vision-config kwargs of a 2-layer, 32-wide ViT with 2 heads (plus `extra`)."""
    return dict(**VISION_WIDTHS, num_attention_heads=2, **extra)


def random_model(model_class, config, seed: int):
    """`model_class` with random fp32 weights drawn after `torch.manual_seed(seed)`."""
    import torch

    torch.manual_seed(seed)
    return model_class._from_config(config, dtype=torch.float32)


def finish(model, eos_id: int, pad_id: int, bos_id: int | None = None) -> None:
    """Set the generation config's end, padding (and begin) token ids."""
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    if bos_id is not None:
        model.generation_config.bos_token_id = bos_id


def save_tiny(model, processor, out_dir) -> Path:
    """Save `model` and `processor` into `out_dir` atomically (the folder appears complete)."""
    from .io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def build_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save the tiny model of registry family `family` into `out_dir`."""
    from .families import FAMILIES  # the family modules import this module's helpers

    fam = FAMILIES.get(family)
    if fam is None or fam.build_tiny is None:
        known = ", ".join(n for n, f in FAMILIES.items() if f.build_tiny is not None)
        raise KeyError(f"no tiny builder for family '{family}' (known: {known})")
    return fam.build_tiny(out_dir, seed=seed)
