"""The fast paths compute the same function as the transformers code they replace."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vlmflow.loss import chunked_head_loss, label_only_loss, loss_chunk_rows
from vlmflow.patches import (
    _segments,
    _window_groups,
    batched_vision_attention,
    fast_lora,
    linear_patch_embed,
    windowed_sdpa,
)


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


def test_label_only_loss_with_a_logit_softcap_runs_the_head_on_labels_only(tiny_model, chat_rows):
    """Gemma 4 caps its logits (30 * tanh(logits / 30)): the same loss and gradients as the
    model's, the head still sees only the labelled positions, and the cap is back afterwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    path = tiny_model("gemma4")
    proc = AutoProcessor.from_pretrained(path)
    enc = Encoder(proc, FAMILIES["gemma4"], max_seq_length=512)
    batch = collate([enc(r) for r in chat_rows], enc.pad_id)
    batch["pixel_values"] = batch["pixel_values"].double()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    assert model.config.text_config.final_logit_softcapping == 30.0
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            target_modules=r".*language_model.*\.(?:q_proj|o_proj)",
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    ref_grads = torch.autograd.grad(ref, params)
    rows = []
    head = model.base_model.model.lm_head
    hook = head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    ours = label_only_loss(model, batch, chunk_size=4)
    grads = torch.autograd.grad(ours, params)
    hook.remove()
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    assert sum(rows[: -(-n_labels // 4)]) == n_labels  # forward chunks: labelled rows only
    assert torch.allclose(ours.float(), ref, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-7)
    assert model.config.text_config.final_logit_softcapping == 30.0  # restored
    with torch.no_grad():
        capped = model(**batch).logits
    assert capped.abs().max() <= 30.0


# ------------------------------------------------------------------------------ fast LoRA
def _peft_pair(dtype, dropout=0.0, adapter_dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 12, bias=False)
    ).to(dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
    ref = get_peft_model(copy.deepcopy(base), cfg)
    for n, p in ref.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, dtype=adapter_dtype) * 0.2  # B != 0
    fast = copy.deepcopy(ref)
    assert fast_lora(fast) == 2
    return ref, fast


def _out_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y, x.grad, grads


def test_fast_lora_is_peft_lora_in_fp64():
    ref, fast = _peft_pair(torch.float64, adapter_dtype=torch.float64)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    y0, gx0, g0 = _out_and_grads(ref, x)
    y1, gx1, g1 = _out_and_grads(fast, x)
    assert y1.dtype == y0.dtype == torch.float64
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) == 4
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-12, atol=1e-12, msg=n)


def test_fast_lora_in_bf16_computes_in_bf16_close_to_peft():
    ref, fast = _peft_pair(torch.bfloat16)
    x = torch.randn(4, 7, 24).bfloat16()
    y0, _, g0 = _out_and_grads(ref, x)
    y1, _, g1 = _out_and_grads(fast, x)
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y0.float(), rtol=3e-2, atol=3e-2)
    for n in g0:
        assert g1[n].dtype == torch.float32  # the fp32 master weights get fp32 gradients
        rel = (g1[n] - g0[n]).norm() / g0[n].norm()
        assert rel < 2e-2, n


def test_fast_lora_falls_back_to_peft_when_adapters_are_off_or_merged():
    ref, fast = _peft_pair(torch.float64, adapter_dtype=torch.float64)
    x = torch.randn(2, 24, dtype=torch.float64)
    with torch.no_grad():
        with fast.disable_adapter():
            torch.testing.assert_close(fast(x), fast.get_base_model()(x))
        want = ref(x)
        fast.merge_adapter()
        torch.testing.assert_close(fast(x), want)
        fast.unmerge_adapter()
        torch.testing.assert_close(fast(x), want)


def test_fast_lora_keeps_dropout():
    _, fast = _peft_pair(torch.float64, dropout=0.5)
    x = torch.randn(64, 24, dtype=torch.float64)
    fast.train()
    assert not torch.equal(fast(x), fast(x))  # dropout on the LoRA branch is sampled
    fast.eval()
    assert torch.equal(fast(x), fast(x))


# ------------------------------------------------------------------- patch embedding, plans
def test_linear_patch_embed_equals_the_conv3d(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float64)
    embed = model.model.visual.patch_embed
    x = torch.randn(50, embed.proj.weight[0].numel(), dtype=torch.float64)
    want = embed(x)
    assert linear_patch_embed(model) == 1
    torch.testing.assert_close(embed(x), want, rtol=1e-12, atol=1e-12)


def calls_of(monkeypatch, owner, name: str) -> list:
    """Replace `owner.name` by a wrapper that records each call; returns the record."""
    calls, orig = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return orig(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_segment_plan_is_read_once_per_tensor_and_follows_in_place_changes(monkeypatch):
    reads = calls_of(monkeypatch, torch.Tensor, "tolist")  # a read from the device
    cu = torch.tensor([0, 4, 8, 10])
    assert _segments(cu) == ([0, 4, 8, 10], [4, 4, 2])
    assert _segments(cu) == ([0, 4, 8, 10], [4, 4, 2])
    assert len(reads) == 1  # cached for the same tensor
    cu[3] = 12
    assert _segments(cu) == ([0, 4, 8, 12], [4, 4, 4])
    assert len(reads) == 2  # an in-place change is read again
    assert _segments(torch.tensor([0, 3])) == ([0, 3], [3])


def test_window_gather_indices_are_built_once_per_plan(monkeypatch):
    cu = torch.tensor([0, 4, 6, 10, 10, 12])
    builds = calls_of(monkeypatch, torch, "arange")  # one per segment length of a plan
    groups = _window_groups(cu, torch.device("cpu"))
    assert len(builds) == 2
    want = [[[0, 1, 2, 3], [6, 7, 8, 9]], [[4, 5], [10, 11]]]
    assert [g.tolist() for g in groups] == want
    again = _window_groups(cu, torch.device("cpu"))
    assert len(builds) == 2 and [g.tolist() for g in again] == want  # built once
    cu[5] = 13  # an in-place change is a new plan
    assert [g.tolist() for g in _window_groups(cu, torch.device("cpu"))][1] == [[4, 5]]
    assert len(builds) > 2


def test_loss_chunks_hold_a_fixed_number_of_logits_whatever_the_vocabulary():
    """A 2048-row chunk of Gemma's 262k logits held ~4 GiB at the backward peak: rows per chunk
    shrink with the vocabulary, within [64, 2048]."""
    for vocab in (262_144, 151_936, 128_256, 32_064, 512):
        rows = loss_chunk_rows(vocab)
        assert 64 <= rows <= 2048
        assert rows * vocab <= (1 << 26) or rows == 64
        assert rows == 2048 or (rows + 1) * vocab > (1 << 26)  # as many rows as fit
    assert loss_chunk_rows(262_144) < loss_chunk_rows(151_936) < loss_chunk_rows(32_064)
    assert loss_chunk_rows(10**9) == 64


def test_label_only_loss_default_chunks_follow_the_head_width(tiny_qwen, digits_rows, monkeypatch):
    """Without a chunk_size the head runs on chunks of loss_chunk_rows(vocab) rows; the loss is
    the same as in one chunk."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlmflow.loss as loss_module
    from vlmflow.collate import Encoder, collate
    from vlmflow.families import FAMILIES

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    enc = Encoder(proc, FAMILIES["qwen2_5_vl"], max_seq_length=512)
    batch = collate([enc(r) for r in digits_rows[:48]], enc.pad_id)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float64)
    batch["pixel_values"] = batch["pixel_values"].double()
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    vocab = model.lm_head.out_features
    assert n_labels > 64
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ELEMENTS", 64 * vocab)  # -> 64 rows per chunk
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    with torch.no_grad():
        ours = label_only_loss(model, batch)
        whole = label_only_loss(model, batch, chunk_size=4096)
    hook.remove()
    chunks = [64] * (n_labels // 64) + ([n_labels % 64] if n_labels % 64 else [])
    assert rows == [*chunks, n_labels]
    assert torch.allclose(ours, whole, rtol=1e-12)
