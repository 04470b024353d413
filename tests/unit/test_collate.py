import pytest
import torch

from vlmflow.collate import IGNORE_INDEX, Encoder, SampleTooLongError, collate, response_labels
from vlmflow.families import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_response_labels_stop_at_the_next_user_turn_when_a_turn_is_not_closed():
    # 1 2 = assistant marker, 3 4 = user marker, no end-of-turn token (9) anywhere
    ids = torch.tensor([3, 4, 5, 1, 2, 7, 8, 3, 4, 5, 1, 2, 6])
    labels = response_labels(ids, [1, 2], [9], instruction_ids=[3, 4])
    assert labels.tolist() == [IGNORE_INDEX] * 5 + [7, 8] + [IGNORE_INDEX] * 5 + [6]


def test_collate_layouts_pad_and_place_each_key():
    """Pure function: 'token' pads per token (extra dims too), 'cat' concatenates images and
    zero-pads smaller trailing dims, 'sample' stacks per sample with zeros for text-only ones."""
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "labels": torch.tensor([-100, 6, 7]),
        "attention_mask": torch.ones(3, dtype=torch.long),
        "cross_attention_mask": torch.ones(3, 2, 1, dtype=torch.long),
        "pixel_values": torch.ones(2, 3, 4, 4),  # 2 images
        "tiles": torch.ones(1, 2, 3),
    }
    b = {  # text only
        "input_ids": torch.tensor([8]),
        "labels": torch.tensor([8]),
        "attention_mask": torch.ones(1, dtype=torch.long),
    }
    c = {
        "input_ids": torch.tensor([9, 9]),
        "labels": torch.tensor([9, 9]),
        "attention_mask": torch.ones(2, dtype=torch.long),
        "cross_attention_mask": torch.ones(2, 1, 2, dtype=torch.long),
        "pixel_values": torch.full((1, 3, 2, 5), 2.0),  # 1 smaller, wider image
        "tiles": torch.full((1, 1, 3), 2.0),
    }
    batch = collate([a, b, c], pad_id=0, layout={"tiles": "sample"})
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["cross_attention_mask"].shape == (3, 3, 2, 2)
    assert batch["cross_attention_mask"][0, :, :, 0].all()
    assert not batch["cross_attention_mask"][0, :, :, 1].any()
    assert not batch["cross_attention_mask"][1].any()
    assert batch["cross_attention_mask"][2, :2, 0, :].all()
    assert not batch["cross_attention_mask"][2, :, 1].any()
    assert batch["pixel_values"].shape == (3, 3, 4, 5)  # 2 + 0 + 1 images
    assert (
        batch["pixel_values"][:2, :, :, :4].eq(1).all()
        and not batch["pixel_values"][:2, :, :, 4].any()
    )
    assert batch["pixel_values"][2, :, :2].eq(2).all() and not batch["pixel_values"][2, :, 2:].any()
    assert batch["tiles"].shape == (3, 2, 3)
    assert batch["tiles"][0].eq(1).all() and not batch["tiles"][1].any()
    assert batch["tiles"][2, 0].eq(2).all() and not batch["tiles"][2, 1].any()
    with pytest.raises(ValueError, match="unknown batch layout"):
        collate([a], pad_id=0, layout={"tiles": "diagonal"})


def test_fit_pixels_keeps_the_aspect_ratio_within_the_budget():
    from PIL import Image

    from vlmflow.collate import fit_pixels

    img = Image.new("RGB", (200, 100))
    assert fit_pixels(img, None, None) is img
    assert fit_pixels(img, 100, 50_000) is img
    small = fit_pixels(img, None, 5000)
    assert small.size == (100, 50)
    big = fit_pixels(img, 80_000, None)
    assert big.size == (400, 200)
    odd = fit_pixels(Image.new("RGB", (333, 77)), None, 1000)
    assert odd.size[0] * odd.size[1] <= 1000
    assert abs(odd.size[0] / odd.size[1] - 333 / 77) < 0.5


def test_encoder_resizes_images_to_max_pixels(tiny_qwen, digits_rows):
    from transformers import AutoProcessor

    enc = Encoder(
        AutoProcessor.from_pretrained(tiny_qwen),
        FAMILIES["qwen2_5_vl"],
        max_seq_length=256,
        max_pixels=28 * 28,
    )
    assert enc.images_of(digits_rows[0])[0].size == (28, 28)  # from 56x56
    assert enc(digits_rows[0])["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_a_template_that_hides_the_assistant_marker_is_an_error(tiny_qwen, digits_rows):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    proc.chat_template = proc.chat_template.replace(
        "<|im_start|>{{ message['role'] }}", "{{ message['role'] }}:"
    )
    enc = Encoder(proc, FAMILIES["qwen2_5_vl"], max_seq_length=256)
    with pytest.raises(ValueError, match="found the assistant marker"):
        enc(digits_rows[0])
