import pytest
import torch

from vlmflow.collate import IGNORE_INDEX, Encoder, SampleTooLongError, collate, response_labels
from vlmflow.families import FAMILIES


def test_response_labels_multi_turn():
    # 1=<start> 2=assistant-marker ... 9=<end>
    ids = torch.tensor([1, 5, 5, 9, 1, 2, 7, 8, 9, 1, 5, 9, 1, 2, 6, 9])
    labels = response_labels(ids, [1, 2], [9])
    expect = [IGNORE_INDEX] * 6 + [7, 8, 9] + [IGNORE_INDEX] * 5 + [6, 9]
    assert labels.tolist() == expect


def test_response_labels_without_end_token_runs_to_the_end():
    ids = torch.tensor([1, 2, 7, 8])
    assert response_labels(ids, [1, 2], [9]).tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]


@pytest.fixture(scope="module")
def encoder(tiny_qwen):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    return Encoder(proc, FAMILIES["qwen2_5_vl"], max_seq_length=256)


def test_encoder_masks_everything_but_the_answer_and_end_of_turn(encoder, digits_rows):
    row = digits_rows[0]
    enc = encoder(row)
    tok = encoder.tokenizer
    kept = enc["labels"][enc["labels"] != IGNORE_INDEX].tolist()
    answer = row["messages"][1]["content"][0]["text"]
    assert tok.decode(kept) == answer + "<|im_end|>"
    # image tokens: one per 2x2 merged patch of the 56x56 image -> 4
    assert int((enc["input_ids"] == encoder.image_token_id).sum()) == 4
    assert enc["pixel_values"].shape == (16, 1176)
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_multi_turn_and_text_only_rows(encoder, digits_rows):
    row = dict(digits_rows[0])
    row["messages"] = row["messages"] + [
        {"role": "user", "content": [{"type": "text", "text": "sure?", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes", "image": None}]},
    ]
    enc = encoder(row)
    kept = enc["labels"][enc["labels"] != IGNORE_INDEX].tolist()
    first = row["messages"][1]["content"][0]["text"]
    assert encoder.tokenizer.decode(kept) == f"{first}<|im_end|>yes<|im_end|>"
    text_only = {
        "id": "t",
        "images": [],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is two?", "image": None}]},
            {"role": "assistant", "content": [{"type": "text", "text": "2", "image": None}]},
        ],
    }
    enc2 = encoder(text_only)
    assert "pixel_values" not in enc2
    batch = collate([encoder(digits_rows[1]), enc2, enc], encoder.pad_id)
    assert batch["input_ids"].shape[0] == 3
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (32, 1176)  # two images of 16 patches
    assert batch["image_grid_thw"].shape == (2, 3)
    n2 = enc2["input_ids"].shape[0]
    assert batch["attention_mask"][1].sum() == n2
    assert (batch["input_ids"][1, n2:] == encoder.pad_id).all()
    assert (batch["labels"][1, n2:] == IGNORE_INDEX).all()


def test_too_long_sample_is_an_error_not_a_truncation(tiny_qwen, digits_rows):
    from transformers import AutoProcessor

    enc = Encoder(
        AutoProcessor.from_pretrained(tiny_qwen), FAMILIES["qwen2_5_vl"], max_seq_length=10
    )
    with pytest.raises(SampleTooLongError, match="max_seq_length 10"):
        enc(digits_rows[0])


def test_prompt_stops_before_the_last_answer(encoder, digits_rows):
    text, images = encoder.prompt(digits_rows[0])
    assert text.endswith("<|im_start|>assistant\n")
    assert len(images) == 1
