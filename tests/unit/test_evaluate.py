import pytest

from vlmflow.evaluate import exact_match, normalize_answer, question_of, reference_of


@pytest.mark.parametrize(
    "pred, ref, score",
    [
        ("7", "7", 1.0),
        (" Seven. ", "seven", 1.0),
        ("7 ", "1", 0.0),
        ("a  b", "A b", 1.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(pred, ref, score):
    assert exact_match(pred, ref) == score


def test_normalize():
    assert normalize_answer("  Hello,   World! ") == "hello, world"


def test_reference_and_question_of_a_row(digits_rows):
    row = digits_rows[0]
    assert reference_of(row) == row["messages"][1]["content"][0]["text"]
    assert question_of(row) == "Which digit is written in this image?"


def test_generation_on_the_tiny_model(tiny_qwen, trained_adapter, digits_rows):
    from transformers import AutoProcessor

    from vlmflow.collate import Encoder
    from vlmflow.config import resolve_sections
    from vlmflow.evaluate import generate_answers
    from vlmflow.modeling import load_model

    cfg = resolve_sections({"model": {"name": tiny_qwen}}, ["model"])["model"]
    model, fam = load_model(cfg)
    proc = AutoProcessor.from_pretrained(tiny_qwen)
    enc = Encoder(proc, fam, max_seq_length=256)
    rows = digits_rows[:5]
    batched, stats = generate_answers(
        model, proc, enc, rows, batch_size=5, max_new_tokens=3, progress=False
    )
    single, _ = generate_answers(
        model, proc, enc, rows, batch_size=1, max_new_tokens=3, progress=False
    )
    assert batched == single  # left padding does not change greedy answers
    assert stats["generated_tokens"] > 0 and stats["tokens_per_s"] > 0
