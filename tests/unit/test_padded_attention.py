"""train.fast_paths.padded_attention: a right-padded batch of a family whose language model
attends causally (`Family.causal_text`) trains without its padding mask. For every declared
family the loss and every gradient equal those under the mask (fp64, tiny models of the real
architectures, a batch of three lengths); what the mask changes is the padding's own outputs
only. Gemma 3 / Gemma 4 (image tokens attend both ways) are not declared. Left padding,
labelled padding, a batch longer than a sliding window and packed rows keep their mask."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from vlmflow.collate import TOKEN_KEYS, Encoder, collate, model_inputs, without_padding_mask
from vlmflow.families import FAMILIES
from vlmflow.loss import label_only_loss
from vlmflow.modeling import causal_attention_span

pytestmark = pytest.mark.usefixtures("single_thread")

DECLARED = sorted(n for n, f in FAMILIES.items() if f.causal_text)


def test_every_family_but_the_bidirectional_gemmas_is_declared():
    assert sorted(set(FAMILIES) - set(DECLARED)) == ["gemma3", "gemma4"]


def padded_batch(family, path, rows):
    from transformers import AutoProcessor

    fam = FAMILIES[family]
    enc = Encoder(AutoProcessor.from_pretrained(path), fam, max_seq_length=512)
    batch = collate([enc(r) for r in rows], enc.pad_id, fam.batch_layout)
    mask = batch["attention_mask"]
    assert not mask.all() and mask[:, 0].all()  # right padding, rows of different lengths
    return batch


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = label_only_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def last_hidden(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model.model(**inputs, use_cache=False)[0]


@pytest.mark.parametrize("family", DECLARED)
def test_loss_and_gradients_are_the_same_without_the_padding_mask(family, tiny_model, chat_rows):
    path = tiny_model(family)
    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if FAMILIES[family].expert_parameters else {}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64, **extra)
    batch = padded_batch(family, path, chat_rows)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    unmasked = without_padding_mask(model_inputs(batch), causal_attention_span(model.config))
    assert "attention_mask" not in unmasked and set(unmasked) == set(batch) - {"attention_mask"}

    want, want_g = loss_and_grads(model, batch)
    got, got_g = loss_and_grads(model, unmasked)
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert want_g and set(got_g) == set(want_g)
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=1e-8, atol=1e-10, msg=name)

    # the mask did something: the padding positions' own outputs change without it
    real = batch["attention_mask"].bool()
    a, b = last_hidden(model, batch), last_hidden(model, unmasked)
    torch.testing.assert_close(b[real], a[real], rtol=1e-8, atol=1e-10)
    assert not torch.allclose(b[~real], a[~real], atol=1e-6)


def batch_of(mask, labels=None):
    mask = torch.tensor(mask)
    ids = torch.arange(mask.numel()).view(mask.shape)
    if labels is None:
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def test_only_right_padding_without_labels_within_the_span_drops_the_mask():
    right = batch_of([[1, 1, 1], [1, 1, 0]])
    assert "attention_mask" not in without_padding_mask(right)
    assert "attention_mask" not in without_padding_mask(batch_of([[1, 1], [1, 1]]))
    left = batch_of([[1, 1, 1], [0, 1, 1]])
    hole = batch_of([[1, 0, 1], [1, 1, 1]])
    labelled_pad = batch_of([[1, 1, 1], [1, 1, 0]], labels=[[0, 1, 2], [3, 4, 5]])
    for kept in (left, hole, labelled_pad):
        assert without_padding_mask(kept)["attention_mask"] is kept["attention_mask"]
    # longer than a sliding window: the window hides more than the future
    assert "attention_mask" in without_padding_mask(right, max_length=2)
    assert "attention_mask" not in without_padding_mask(right, max_length=3)
    packed = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "row_lengths": torch.tensor([4])}
    assert without_padding_mask(packed) == packed


def test_the_span_is_the_sliding_window_only_where_layers_slide():
    mistral = AutoConfig.for_model("mistral", sliding_window=4096)
    assert causal_attention_span(mistral) == 4096
    assert causal_attention_span(AutoConfig.for_model("mistral", sliding_window=None)) == math.inf
    qwen = AutoConfig.for_model("qwen2", sliding_window=4096, use_sliding_window=False)
    assert causal_attention_span(qwen) == math.inf
    llama = AutoConfig.for_model("llama")
    assert causal_attention_span(llama) == math.inf
    full = AutoConfig.for_model(
        "qwen3", sliding_window=128, num_hidden_layers=2, layer_types=["full_attention"] * 2
    )
    assert causal_attention_span(full) == math.inf


def captured_inputs(model, batch):
    """The keyword arguments the model's body is called with by train_step."""
    from vlmflow import train as train_mod
    from vlmflow.loss import model_loss

    seen = []
    body = model_loss(model).body
    handle = body.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    try:
        train_mod.train_step(
            model,
            [batch],
            opt,
            sched,
            [p for p in model.parameters() if p.requires_grad],
            max_grad_norm=1.0,
            device=torch.device("cpu"),
        )
    finally:
        handle.remove()
    return seen[0]


def left_padded(batch):
    """The same samples with their padding moved to the left of each row."""
    pads = (~batch["attention_mask"].bool()).sum(1).tolist()
    out = dict(batch)
    for key in TOKEN_KEYS:
        if key in batch:
            out[key] = torch.stack([row.roll(n, 0) for row, n in zip(batch[key], pads)])
    return out


@pytest.mark.parametrize("on", [True, False])
def test_train_step_sends_the_mask_only_when_the_switch_is_off(on, tiny_qwen, chat_rows):
    from vlmflow import modeling
    from vlmflow.config import resolve_sections

    cfg = resolve_sections(
        {
            "model": {"name": tiny_qwen, "max_seq_length": 512},
            "lora": {"r": 4, "lora_alpha": 8},
            "train": {
                "use_gradient_checkpointing": False,
                "fast_paths": {"padded_attention": on},
            },
        },
        ["model", "lora", "train"],
    )
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    batch = padded_batch("qwen2_5_vl", tiny_qwen, chat_rows)
    assert ("attention_mask" in captured_inputs(model, batch)) is not on
    left = left_padded(batch)
    assert left["attention_mask"][:, -1].all() and not left["attention_mask"][:, 0].all()
    assert "attention_mask" in captured_inputs(model, left)  # kept either way
