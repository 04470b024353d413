"""Padding-free packing (train.packing) and length grouping (train.group_by_length)."""

import pytest
import torch

from vlmflow.collate import (
    IGNORE_INDEX,
    Encoder,
    SampleTooLongError,
    collate,
    collate_packed,
    count_tokens,
    model_inputs,
    pack_rows,
    rope_index_fn,
)
from vlmflow.config import resolve_sections
from vlmflow.families import FAMILIES
from vlmflow.loss import label_only_loss
from vlmflow.patches import (
    PACKED_ATTENTION,
    _row_segments,
    packed_attention,
    packed_sdpa_attention,
)
from vlmflow.train import check_packing, group_by_length, read_log, step_micro_batches, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _load(path, attn="sdpa"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation=attn, dtype=torch.float32
    )
    return model.eval(), AutoProcessor.from_pretrained(path)


def _samples(processor, family, chat_rows, digits_rows, responses_only=True):
    """Rows with one image, two images over two turns, text only, and two digits images."""
    enc = Encoder(
        processor, FAMILIES[family], max_seq_length=512, train_on_responses_only=responses_only
    )
    return enc, [enc(r) for r in [*chat_rows, *digits_rows[:2]]]


def test_pack_rows_first_fit_decreasing_never_splits():
    # longest first: 7 opens row A, 5 row B, 4 joins B, 3 fills A, 2 fits nowhere -> row C
    rows = pack_rows([5, 3, 7, 2, 4], 10)
    assert rows == [[0, 4], [1, 2], [3]]
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]  # every sample exactly once
    assert all(sum([5, 3, 7, 2, 4][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # 21 tokens need at least 3 rows of 10
    assert pack_rows([10, 1, 10], 10) == [[0], [1], [2]]  # a full-length sample gets its own row
    assert pack_rows([3, 3], 10) == [[0, 1]]
    with pytest.raises(SampleTooLongError, match="11 tokens > max_seq_length 10"):
        pack_rows([4, 11], 10)


def test_packed_batch_layout(tiny_qwen, chat_rows, digits_rows):
    """Shapes; labels stay inside their sample; per-sample M-RoPE ids equal what the model
    computes for the padded batch; the mask transformers builds from the packed position ids is
    block-diagonal causal; images follow the order of their tokens."""
    from transformers.masking_utils import create_causal_mask

    model, proc = _load(tiny_qwen)
    enc, samples = _samples(proc, "qwen2_5_vl", chat_rows, digits_rows)
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    limit = max(lengths) + 20
    packed = collate_packed(samples, enc.pad_id, rope_index_fn(model), limit)
    rows = pack_rows(lengths, limit)
    R, T = len(rows), max(sum(lengths[i] for i in r) for r in rows)
    assert 1 < R < len(samples)
    assert set(packed) == {
        "input_ids",
        "labels",
        "mm_token_type_ids",
        "position_ids",
        "pixel_values",
        "image_grid_thw",
        "row_lengths",
    }
    assert packed["input_ids"].shape == packed["labels"].shape == (R, T)
    assert packed["position_ids"].shape == (4, R, T)
    assert count_tokens(packed) == sum(lengths)
    padded = collate(samples, enc.pad_id)
    n_padded = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == n_padded

    # the model's own 3-D positions of the padded batch (what an unpacked forward uses)
    ref, _ = model.model.get_rope_index(
        padded["input_ids"],
        mm_token_type_ids=padded["mm_token_type_ids"],
        image_grid_thw=padded["image_grid_thw"],
        attention_mask=padded["attention_mask"],
    )
    seg = torch.full((R, T), -1)
    order = []
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            n, sl = lengths[k], slice(start, start + lengths[k])
            assert torch.equal(packed["input_ids"][r, sl], samples[k]["input_ids"])
            lab = samples[k]["labels"].clone()
            lab[0] = IGNORE_INDEX  # never predicted from the previous sample's last token
            assert torch.equal(packed["labels"][r, sl], lab)
            assert packed["position_ids"][0, r, sl].tolist() == list(range(n))
            assert torch.equal(packed["position_ids"][1:, r, sl], ref[:, k, :n])
            seg[r, sl] = k
            start += n
            order.append(k)
        assert int(packed["row_lengths"][r]) == start
        assert (packed["input_ids"][r, start:] == enc.pad_id).all()
        assert (packed["labels"][r, start:] == IGNORE_INDEX).all()
    with_images = [k for k in order if "pixel_values" in samples[k]]
    assert torch.equal(
        packed["pixel_values"], torch.cat([samples[k]["pixel_values"] for k in with_images])
    )
    assert torch.equal(
        packed["image_grid_thw"], torch.cat([samples[k]["image_grid_thw"] for k in with_images])
    )

    # the attention mask the model builds: causal within a sample, nothing across samples
    cfg = model.config.get_text_config()
    mask = create_causal_mask(
        config=cfg,
        inputs_embeds=torch.zeros(R, T, cfg.hidden_size),
        attention_mask=None,
        past_key_values=None,
        position_ids=packed["position_ids"][0],
    )
    assert mask.shape == (R, 1, T, T) and mask.dtype == torch.bool
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]  # padding (-1) forms its own block
    assert torch.equal(mask[:, 0], causal & same)


def test_row_segments_are_read_once_per_tensor(monkeypatch):
    reads = []  # each plan reads its rows' boundaries to Python once
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert _row_segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    n = len(reads)
    assert _row_segments(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert len(reads) == n > 0  # cached for the same tensor
    pos[1, 3:] = torch.arange(3)  # an in-place change is read again
    assert _row_segments(pos)[1] == [(0, 3), (3, 6)]
    assert len(reads) == 2 * n


def test_packed_sdpa_attention_equals_the_block_diagonal_mask():
    """Per-sample causal SDPA calls = one SDPA under transformers' block-diagonal causal mask,
    forward and backward, with grouped-query heads and a padding tail."""
    torch.manual_seed(0)
    R, H, Hkv, T, D = 2, 4, 2, 13, 8
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1], list(range(T))])
    seg = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2, [0] * T])
    q = torch.randn(R, H, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(R, Hkv, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(R, Hkv, T, D, dtype=torch.float64, requires_grad=True)
    module = torch.nn.Module()
    module.num_key_value_groups = H // Hkv
    got, _ = packed_sdpa_attention(module, q, k, v, None, scaling=0.3, position_ids=pos)
    assert got.shape == (R, T, H, D)

    def reference(mask):
        kk, vv = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, kk, vv, attn_mask=mask[:, None], scale=0.3
        )
        return out.transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = reference(causal & (seg[:, :, None] == seg[:, None, :]))
    assert torch.allclose(got, want, atol=1e-12)
    leaky = reference(causal.expand(R, T, T))  # control: samples attending to each other
    assert not torch.allclose(leaky, want, atol=1e-3)
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="needs the packed batch's text position ids"):
        packed_sdpa_attention(module, q, k, v, None, position_ids=None)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed"])
def test_packed_loss_equals_padded_loss(tiny_model, family, attn, chat_rows, digits_rows):
    model, proc = _load(tiny_model(family), "sdpa" if attn == "packed" else attn)
    enc, samples = _samples(proc, family, chat_rows, digits_rows)
    padded = collate(samples, enc.pad_id)
    packed = collate_packed(samples, enc.pad_id, rope_index_fn(model), 128)
    assert packed["input_ids"].shape[0] < len(samples)  # really packed
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        want = label_only_loss(model, padded, num_items_in_batch=n)
        if attn == "packed":  # the padded reference above ran with plain sdpa
            assert packed_attention(model) == model.config.get_text_config().num_hidden_layers
        got = label_only_loss(model, model_inputs(packed), num_items_in_batch=n)
        # control: one causal mask over the whole row (samples see each other) differs
        leaky = model_inputs(packed)
        leaky["position_ids"] = leaky["position_ids"].clone()
        leaky["position_ids"][0] = torch.arange(leaky["position_ids"].shape[-1])
        bad = label_only_loss(model, leaky, num_items_in_batch=n)
    assert float(got) == pytest.approx(float(want), abs=1e-5, rel=1e-5)
    assert abs(float(bad) - float(want)) > 1e-4


def test_packed_lora_gradients_equal_padded(tiny_qwen, chat_rows, digits_rows):
    from vlmflow.modeling import build_training_model

    cfg = resolve_sections(
        {
            "model": {"name": tiny_qwen, "max_seq_length": 256, "dtype": "float32"},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "train": {"use_gradient_checkpointing": False},
        },
        ["model", "lora", "train"],
    )
    model, proc, family = build_training_model(cfg, torch.device("cpu"))
    # every token labelled (train_on_responses_only false): a sample's first token has a label
    # that must not be predicted from the previous sample in the row
    enc, samples = _samples(proc, "qwen2_5_vl", chat_rows, digits_rows, responses_only=False)
    assert all(int(s["labels"][0]) != IGNORE_INDEX for s in samples)
    padded = collate(samples, enc.pad_id)
    packed = collate_packed(samples, enc.pad_id, rope_index_fn(model), 256)
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in k and "visual" in k for k in params)

    def grads(batch):
        model.zero_grad(set_to_none=True)
        loss = label_only_loss(model, batch, num_items_in_batch=n)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}

    loss_a, ga = grads(padded)
    loss_b, gb = grads(model_inputs(packed))  # transformers' block-diagonal mask
    packed_attention(model)
    loss_c, gc = grads(model_inputs(packed))  # one causal SDPA call per sample
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert loss_c == pytest.approx(loss_a, abs=1e-5)
    scale = max(float(g.abs().max()) for g in ga.values())
    assert scale > 0
    for k in ga:
        assert torch.allclose(gb[k], ga[k], atol=1e-5 * scale, rtol=1e-4), k
        assert torch.allclose(gc[k], ga[k], atol=1e-5 * scale, rtol=1e-4), k


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_training_model_packs_attention_only_for_sdpa_packing(tiny_qwen, attn):
    from vlmflow.modeling import build_training_model

    def impl(**train):
        cfg = resolve_sections(
            {
                "model": {"name": tiny_qwen, "attn_implementation": attn},
                "train": {"use_gradient_checkpointing": False, **train},
            },
            ["model", "lora", "train"],
        )
        model, _, _ = build_training_model(cfg, torch.device("cpu"))
        text = model.base_model.model.config.get_text_config()._attn_implementation
        return text, model.base_model.model.config.vision_config._attn_implementation

    assert impl(packing=False) == (attn, attn)
    assert impl(packing=True) == ((PACKED_ATTENTION if attn == "sdpa" else attn), attn)


def test_no_label_crosses_a_sample_boundary():
    """Pure collator on hand-made samples with every token labelled."""

    def sample(*ids):
        t = torch.tensor(ids)
        return {"input_ids": t, "labels": t.clone(), "mm_token_type_ids": torch.zeros_like(t)}

    samples = [sample(11, 12, 13), sample(21, 22), sample(31, 32, 33, 34), sample(41)]
    packed = collate_packed(
        samples, 0, lambda s: torch.arange(len(s["input_ids"])).expand(3, -1), 6
    )
    # first-fit decreasing: 4 tokens open row A, 3 row B, 2 fill A, 1 joins B
    assert packed["input_ids"].tolist() == [[11, 12, 13, 41, 0, 0], [21, 22, 31, 32, 33, 34]]
    assert packed["labels"].tolist() == [
        [-100, 12, 13, -100, -100, -100],
        [-100, 22, -100, 32, 33, 34],
    ]
    assert packed["position_ids"][:, 0].tolist() == [[0, 1, 2, 0, 0, 1]] * 4
    assert packed["position_ids"][:, 1].tolist() == [[0, 1, 0, 1, 2, 3]] * 4
    assert packed["row_lengths"].tolist() == [4, 6]
    padded = collate(samples, 0)
    assert int((padded["labels"][:, 1:] != -100).sum()) == int(
        (packed["labels"][:, 1:] != -100).sum()
    )
    with pytest.raises(ValueError, match="rope_index returned shape"):
        collate_packed(samples, 0, lambda s: torch.zeros(3, 1), 6)


def test_too_long_sample_is_not_split(tiny_qwen, chat_rows, digits_rows):
    model, proc = _load(tiny_qwen)
    enc, samples = _samples(proc, "qwen2_5_vl", chat_rows, digits_rows)
    longest = max(int(s["input_ids"].shape[0]) for s in samples)
    with pytest.raises(SampleTooLongError, match="never splits"):
        collate_packed(samples, enc.pad_id, rope_index_fn(model), longest - 1)
    exact = collate_packed(samples, enc.pad_id, rope_index_fn(model), longest)
    assert exact["input_ids"].shape[1] == longest
    assert longest in exact["row_lengths"].tolist()


def test_group_by_length_sorts_within_a_step_deterministically():
    lengths = {i: (i * 37) % 101 + 1 for i in range(40)}
    for step in range(3):
        mbs = step_micro_batches(40, 7, step, accum=4, global_batch=4)
        grouped = group_by_length(mbs, lengths)
        assert grouped == group_by_length(mbs, lengths)
        assert [len(m) for m in grouped] == [len(m) for m in mbs]
        assert sorted(i for m in grouped for i in m) == sorted(i for m in mbs for i in m)
        flat = [lengths[i] for m in grouped for i in m]
        assert flat == sorted(flat, reverse=True)

        def padded_tokens(batches):
            return sum(len(m) * max(lengths[i] for i in m) for m in batches)

        assert padded_tokens(grouped) < padded_tokens(mbs)
    # ties keep their order
    assert group_by_length([[3, 1], [2, 0]], {0: 5, 1: 5, 2: 5, 3: 9}) == [[3, 1], [2, 0]]


def test_packing_of_an_unsupported_family_is_a_clear_error(tiny_model, digits_rows, tmp_path):
    with pytest.raises(ValueError, match="train.packing is not supported for the 'llava'"):
        check_packing(FAMILIES["llava"], "sdpa")
    with pytest.raises(ValueError, match="train.packing needs model.attn_implementation"):
        check_packing(FAMILIES["qwen2_5_vl"], "flash_attention_2")
    check_packing(FAMILIES["qwen3_vl"], "eager")
    # Qwen3.5's linear-attention layers: refused, and the message says why
    with pytest.raises(ValueError, match="'qwen3_5' family .*Gated DeltaNet.*recurrent state"):
        check_packing(FAMILIES["qwen3_5"], "sdpa")
    with pytest.raises(ValueError, match="'qwen3_5_moe' family .*Gated DeltaNet.*recurrent state"):
        check_packing(FAMILIES["qwen3_5_moe"], "sdpa")
    check_packing(FAMILIES["qwen3_vl_moe"], "sdpa")
    cfg = resolve_sections(
        {"model": {"name": tiny_model("llava")}, "train": {"packing": True}},
        ["model", "lora", "train"],
    )
    with pytest.raises(ValueError, match="train.packing is not supported"):
        train(cfg, digits_rows[:4], tmp_path / "out", tmp_path / "work")
    assert not (tmp_path / "out").exists()


def test_train_with_packing_and_grouping_gives_the_same_loss_curve(
    tiny_qwen, digits_rows, chat_rows, tmp_path
):
    """The train loop end to end: packing + group_by_length see the same samples per step, so
    the per-step losses (which after step 1 also depend on the previous updates) and the token
    counts equal those of the padded run."""
    rows = [*chat_rows, *[r for r in digits_rows if r["split"] == "train"][:9]]

    def run(name, **extra):
        cfg = resolve_sections(
            {
                "model": {"name": tiny_qwen, "max_seq_length": 160},
                "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
                "train": {
                    "per_device_train_batch_size": 3,
                    "gradient_accumulation_steps": 2,
                    "max_steps": 3,
                    "learning_rate": 5e-3,
                    "warmup_steps": 0,
                    "optim": "adamw_torch",
                    "use_gradient_checkpointing": False,
                    "cache_encoded": True,
                    "seed": 5,
                    **extra,
                },
            },
            ["model", "lora", "train"],
        )
        train(cfg, rows, tmp_path / name, tmp_path / f"work-{name}")
        return read_log(tmp_path / name / "train_log.jsonl")

    plain = run("plain")
    packed = run("packed", packing=True, group_by_length=True)
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in plain]
    for a, b in zip(plain, packed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert plain[-1]["loss"] != plain[0]["loss"]  # the weights did change between steps
