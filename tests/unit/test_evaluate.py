import pytest

from vlmflow.evaluate import (
    anls,
    exact_match,
    generation_kwargs,
    normalize_answer,
    question_of,
    reference_of,
    relaxed_accuracy,
    score,
)


def test_normalize():
    assert normalize_answer("  Hello,   World! ") == "hello, world"


@pytest.mark.parametrize(
    "metric, pred, ref, want",
    [
        (exact_match, "7", "7", 1.0),
        (exact_match, " Seven. ", "seven", 1.0),
        (exact_match, "7 ", "1", 0.0),
        (exact_match, "a  b", "A b", 1.0),
        (exact_match, "", "x", 0.0),
        (relaxed_accuracy, "10.4", "10", 1.0),  # within 5%
        (relaxed_accuracy, "10.6", "10", 0.0),
        (relaxed_accuracy, "1,000", "1000", 1.0),
        (relaxed_accuracy, "45%", "44", 1.0),
        (relaxed_accuracy, "0", "0", 1.0),
        (relaxed_accuracy, "Paris.", "paris", 1.0),
        (relaxed_accuracy, "Lyon", "Paris", 0.0),
        # ANLS as DocVQA defines it
        (anls, "Hello World", "hello  world", 1.0),
        (anls, "helo world", "hello world", 1 - 1 / 11),  # one edit in 11 characters
        (anls, "abc", "abd", 1 - 1 / 3),
        (anls, "abc", "xyz", 0.0),  # NL = 1 >= 0.5
        (anls, "ab", "abcd", 0.0),  # NL = 0.5: at the threshold, scores 0
        (anls, "", "", 1.0),
    ],
)
def test_answer_metrics(metric, pred, ref, want):
    assert metric(pred, ref) == pytest.approx(want)


def test_corpus_and_per_sample_scores():
    preds, refs = ["abd", "de", "the cat sat"], ["abc", "de", "the cat sat down"]
    totals, per = score(["cer", "wer", "bleu", "rouge_l", "exact_match"], preds, refs)
    # CER over the split: all edits / all reference characters = (1 + 0 + 5) / (3 + 2 + 16).
    assert totals["cer"] == pytest.approx(6 / 21)
    assert per["cer"] == pytest.approx([1 / 3, 0.0, 5 / 16])
    assert totals["wer"] == pytest.approx((1 + 0 + 1) / (1 + 1 + 4))
    assert per["exact_match"] == [0.0, 1.0, 0.0] and totals["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-L of "the cat sat" vs "the cat sat down": P = 1, R = 3/4, F = 6/7.
    assert per["rouge_l"][2] == pytest.approx(6 / 7)
    bleu, per_bleu = score(
        ["bleu"], ["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "the mat"]
    )
    assert per_bleu["bleu"][0] == pytest.approx(100.0) and per_bleu["bleu"][1] == 0.0
    assert 0 < bleu["bleu"] < 100  # sacreBLEU 0-100, corpus level
    with pytest.raises(ValueError, match="unknown metric"):
        score(["f1"], preds, refs)


def test_empty_references_do_not_break_error_rates():
    totals, per = score(["cer"], ["", "x", "ab"], ["", "", "ab"])
    assert per["cer"] == [0.0, 1.0, 0.0] and totals["cer"] == 0.0


def test_generation_settings():
    assert generation_kwargs({"do_sample": False}) == {"do_sample": False}
    kw = generation_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5})
    assert kw == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5}


def test_reference_and_question_of_a_row(digits_rows):
    row = digits_rows[0]
    assert reference_of(row) == row["messages"][1]["content"][0]["text"]
    assert question_of(row) == "Which digit is written in this image?"


def test_generation_on_the_tiny_model(tiny_qwen, trained_adapter, digits_rows):
    import torch
    from peft import PeftModel

    from vlmflow.collate import Encoder
    from vlmflow.config import resolve_sections
    from vlmflow.evaluate import generate_answers, load_for_eval

    cfg = resolve_sections({"model": {"name": tiny_qwen}}, ["model"])["model"]
    model, proc, fam = load_for_eval(cfg, None)
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

    sampling = generation_kwargs({"do_sample": True, "temperature": 5.0, "top_p": 1.0, "top_k": 0})
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(
            generate_answers(
                model,
                proc,
                enc,
                rows,
                batch_size=5,
                max_new_tokens=3,
                progress=False,
                sampling=sampling,
            )[0]
        )
    assert runs[0] == runs[1] != runs[2]  # seeded sampling repeats; another seed differs

    tuned, _, _ = load_for_eval(cfg, trained_adapter)  # an adapter folder: applied to the base
    assert isinstance(tuned, PeftModel)
