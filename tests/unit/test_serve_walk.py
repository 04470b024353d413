"""The serve check's scoring walk (vlmflow.serve_check.ServedTextWalk) on a fake tokenizer and
hand-made logits: no model, no llama.cpp."""

import math

import torch

from vlmflow.serve_check import ServedTextWalk, consistent, walk_summary

# A tokenizer whose tokens are text pieces; "\xc3" stands for the first byte of "é" (decoded
# alone, as transformers does, it is U+FFFD; followed by "\xa9" it is "é").
VOCAB = ["<end>", "ab", "a", "b", "c", "abc", "\xc3", "\xa9", "x"]
END = 0


class FakeTok:
    def decode(self, ids):
        raw = "".join(VOCAB[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    def encode(self, text, add_special_tokens=False):
        return list(text)


def logits(order: list[int], values: list[float]) -> torch.Tensor:
    """Logits with token order[i] at values[i], every other token far below."""
    out = torch.full((len(VOCAB),), -10.0)
    out[order] = torch.tensor(values)
    return out


def walk(served: str, steps: list[torch.Tensor], top_k: int = 50) -> ServedTextWalk:
    w = ServedTextWalk(FakeTok(), served.encode(), [END], top_k=top_k)
    for s in steps:
        w.step(s)
    return w


def test_the_walk_takes_the_best_consistent_split_and_records_its_gap():
    # llama.cpp said "abc": the reference's top token "x" is not consistent, "abc" is (gap 1),
    # "ab" too but below it; then the end (its gap recorded, not gated)
    first = logits([8, 5, 1], [3.0, 2.0, 1.0])
    w = walk("abc", [first, logits([END, 4], [1.0, 0.5])])
    assert w.chosen == [5] and w.done
    std = float(first.std())
    assert math.isclose(w.gaps[0], 1.0 / std, rel_tol=1e-5)
    assert w.end_gap == 0.0
    s = walk_summary(w, tolerance=0.5 / std)
    assert s["served_tokens"] == 1 and s["agreeing_served_tokens"] == 0 and not s["unscored"]


def test_the_reference_own_greedy_tokens_have_zero_gap_whatever_the_split():
    # "ab" then "c" (the reference's split) for a served "abc" that llama.cpp split as "abc"
    w = walk("abc", [logits([1, 5], [2.0, 1.9]), logits([4, 8], [2.0, 1.0])])
    assert w.chosen == [1, 4] and w.gaps == [0.0, 0.0]
    assert walk_summary(w, tolerance=0.0)["agreeing_served_tokens"] == 2


def test_a_token_ending_inside_a_multibyte_character_is_consistent():
    # "é" split into its two bytes: the first decodes to U+FFFD, which the served "é" continues
    assert consistent("x\ufffd".encode(), "xé".encode())
    assert not consistent("x\ufffd".encode(), b"xe")  # no multi-byte character there
    w = walk("xé", [logits([8], [1.0]), logits([6, 2], [1.0, 0.5]), logits([7], [1.0])])
    assert w.chosen == [8, 6, 7] and w.gaps == [0.0, 0.0, 0.0]
    assert walk_summary(w, tolerance=0.0)["served_tokens"] == 3


def test_a_served_token_outside_the_top_k_fails_and_the_rest_counts_as_disagreeing():
    # "c" is consistent but ranks 3rd: with top_k=2 no consistent token, an infinite gap
    w = walk("cab", [logits([8, 2, 4], [3.0, 2.0, 1.0])], top_k=2)
    assert w.done and w.gaps == [math.inf] and w.chosen == []
    s = walk_summary(w, tolerance=100.0)
    assert s["unscored"] == "cab" and s["served_tokens"] == 3 and s["agreeing_served_tokens"] == 0
    assert s["max_gap"] is None and s["gaps"] == [None]
    # with top_k=3 it is found, 2 logits below the top
    w = walk("c", [logits([8, 2, 4], [3.0, 2.0, 1.0])], top_k=3)
    assert w.chosen == [4] and w.gaps[0] > 0
