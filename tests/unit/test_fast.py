"""The fast paths compute the same function as the transformers code they replace."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vlmflow.fast import batched_vision_attention, chunked_head_loss, label_only_loss, windowed_sdpa


def reference_windowed(q, k, v, cu, scale):
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qb, kb, vb = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[16] * 8, [16, 16, 4, 16, 12, 4, 16], [64], [7, 3, 7, 7, 1]])
def test_windowed_sdpa_matches_the_per_window_loop(lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    n, h, d = sum(lengths), 3, 8
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = windowed_sdpa(q, k, v, cu, scale=d**-0.5)
    ref = reference_windowed(q, k, v, cu, d**-0.5)
    assert torch.allclose(out, ref, atol=1e-12)


def test_patched_vision_tower_matches_transformers(tiny_qwen):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float64)
    proc = AutoProcessor.from_pretrained(tiny_qwen)
    g = torch.Generator().manual_seed(0)
    # sides that are not multiples of the 112-px window: windows of several lengths
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        for h, w in ((140, 196), (224, 224), (84, 252))
    ]
    px = proc.image_processor(images=images, return_tensors="pt")
    pv, thw = px["pixel_values"].double(), px["image_grid_thw"]
    patched = copy.deepcopy(model)
    assert batched_vision_attention(patched) == 2
    with torch.no_grad():
        want = model.model.visual(pv, grid_thw=thw)
        got = patched.model.visual(pv, grid_thw=thw)
    want = getattr(want, "pooler_output", want)
    got = getattr(got, "pooler_output", got)
    assert torch.allclose(got, want, atol=1e-10)


def test_chunked_head_loss_matches_full_cross_entropy():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    loss = chunked_head_loss(hidden, targets, head, chunk_size=8)
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    assert torch.allclose(loss, ref)
    (g1,) = torch.autograd.grad(loss, hidden)
    (g2,) = torch.autograd.grad(ref, hidden)
    assert torch.allclose(g1, g2)


def test_label_only_loss_equals_the_model_loss_and_gradients(tiny_qwen, digits_rows):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    enc = Encoder(proc, FAMILIES["qwen2_5_vl"], max_seq_length=256)
    batch = collate([enc(r) for r in digits_rows[:4]], enc.pad_id)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float64)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    n_items = int((batch["labels"][:, 1:] != -100).sum()) + 3  # as under gradient accumulation
    ref = model(**batch, num_items_in_batch=n_items).loss
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    ours = label_only_loss(model, batch, num_items_in_batch=n_items, chunk_size=5)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    # transformers computes its cross-entropy in fp32 even for an fp64 model
    assert torch.allclose(ours.float(), ref, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7)
    assert type(model.base_model.model.lm_head).__name__ != "Identity"  # restored
