"""patches.block_attention: Pixtral's vision attention, one unmasked call per image (images of
one size batched), equals transformers' SDPA under its dense block-diagonal mask (outputs and
gradients, fp64), falls back for any other mask, and reads the mask from the device once per
tensor; the patched Pixtral and Mistral 3 towers equal transformers'."""

import copy

import pytest
import torch
from attention_cases import Attn, device_reads, out_and_grads
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.pixtral.modeling_pixtral import generate_block_attention_mask

from vlmflow import patches
from vlmflow.patches import BLOCK_ATTENTION, block_attention, block_sdpa_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def mask_of(lengths: list[int], dtype=torch.float64):
    return generate_block_attention_mask(lengths, torch.zeros(1, sum(lengths), 1, dtype=dtype))


def qkv(t, seed, b=1, h=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(b, t, h, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("lengths", [[6, 6, 6], [4, 7, 4], [9], [3, 3, 6, 6, 2], [5, 1]])
def test_block_sdpa_equals_sdpa_under_the_pixtral_mask_with_gradients(lengths):
    mask = mask_of(lengths)
    q, k, v, grad = qkv(sum(lengths), len(lengths))
    want, want_g = out_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    patches._BLOCK_PLANS.clear()
    got, got_g = out_and_grads(block_sdpa_attention, q, k, v, mask, grad)
    assert patches._BLOCK_PLANS  # the per-image path ran, not the fallback
    assert got.shape == want.shape == (1, sum(lengths), 2, 8)
    assert torch.allclose(got, want, atol=1e-12)
    for x, y in zip(got_g, want_g):
        assert torch.allclose(x, y, atol=1e-12)
    if len(lengths) > 1:  # the mask matters: unmasked attention over all patches differs
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
        assert not torch.allclose(plain.transpose(1, 2), want, atol=1e-6)


def test_a_batch_of_sequences_under_one_expanded_mask():
    mask = mask_of([4, 4, 5]).expand(3, -1, -1, -1)
    q, k, v, grad = qkv(13, 7, b=3)
    want, want_g = out_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    got, got_g = out_and_grads(block_sdpa_attention, q, k, v, mask, grad)
    assert torch.allclose(got, want, atol=1e-12)
    for x, y in zip(got_g, want_g):
        assert torch.allclose(x, y, atol=1e-12)


def _hole(m):
    m = m.clone()
    m[0, 0, 1, 8] = 0  # one patch also sees a patch of the next image
    return m


def _cut(m):
    m = m.clone()
    m[0, 0, 2, 3] = torch.finfo(m.dtype).min  # a patch does not see one of its own image
    return m


@pytest.mark.parametrize(
    "make",
    [
        _hole,
        _cut,
        lambda m: m * 0.5 + (m == 0) * -1.0,  # a bias, not 0 / the minimum
        lambda m: m[:, :, :-1],  # not square
        lambda m: m < 0,  # boolean
        lambda m: torch.zeros_like(m).index_fill_(-1, torch.tensor([3]), -1e300),  # keys only
    ],
)
def test_any_other_mask_goes_to_transformers_sdpa_unchanged(make):
    mask = make(mask_of([6, 6, 4]))
    q, k, v, grad = qkv(16, 1)
    if mask.shape[-2] != 16:
        q, grad = q[:, :, : mask.shape[-2]], grad[:, : mask.shape[-2]]
    want, _ = out_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    got, _ = out_and_grads(block_sdpa_attention, q, k, v, mask, grad)
    assert torch.allclose(got, want, atol=1e-12)


def test_the_mask_is_read_once_per_tensor(monkeypatch):
    mask = mask_of([6, 6, 4])
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    calls = device_reads(monkeypatch)
    for _ in range(3):  # every encoder layer and its recomputation pass the same mask
        block_sdpa_attention(Attn(), q, q, q, mask, scaling=0.3)
    assert len(calls) == 1
    block_sdpa_attention(Attn(), q, q, q, mask.clone(), scaling=0.3)
    assert len(calls) == 2


@pytest.mark.parametrize("family", ["pixtral", "mistral3"])
def test_patched_tiny_tower_matches_transformers_with_gradients(tiny_model, family):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model(family), dtype=torch.float64, attn_implementation="sdpa"
    )
    cfg = model.model.vision_tower.config
    side, patch = cfg.image_size, cfg.patch_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, side, side, generator=g, dtype=torch.float64)
    # three images of two sizes: 64x64, 64x64 and 32x48 (padded to 64x64 as the processor does)
    sizes = torch.tensor([[side, side], [side, side], [side // 2, 3 * side // 4]])
    patched = copy.deepcopy(model)
    n = sum(type(m).__name__ == "PixtralAttention" for m in patched.modules())
    assert n == cfg.num_hidden_layers
    assert block_attention(patched) == n
    assert patched.model.vision_tower.config._attn_implementation == BLOCK_ATTENTION
    patches._BLOCK_PLANS.clear()
    results = []
    for m in (model, patched):
        px = pixels.clone().requires_grad_(True)
        out = m.model.vision_tower(px, image_sizes=sizes).last_hidden_state
        out.pow(2).sum().backward()
        results.append((out.detach(), px.grad))
    (want, want_g), (got, got_g) = results
    assert want.shape[1] == 2 * (side // patch) ** 2 + (side // 2 // patch) * (
        3 * side // 4 // patch
    )
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(got_g, want_g, atol=1e-10)
    assert patches._BLOCK_PLANS  # the fast path ran, not the fallback
