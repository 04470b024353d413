"""patches.tile_attention: Mllama's vision attention without the dense mask equals transformers'
SDPA under it (outputs and gradients, fp64), falls back for any other mask, and reads the mask
from the device once per tensor."""

import copy

import pytest
import torch
from attention_cases import Attn, device_reads, out_and_grads
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

from vlmflow import patches
from vlmflow.patches import TILE_ATTENTION, tile_attention, tile_sdpa_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def mask_of(active_tiles: list[int], max_tiles=4, patches_=5, padded=8, dtype=torch.float64):
    ratio = torch.zeros(len(active_tiles), max_tiles, dtype=torch.long)
    for i, n in enumerate(active_tiles):
        ratio[i, :n] = 1
    return _prepare_aspect_ratio_attention_mask(ratio, patches_, padded, dtype)


@pytest.mark.parametrize("widths", [(5, 8), (15, 16)])  # (patches, padded) a tile
@pytest.mark.parametrize("active", [[4, 4], [4, 2, 1], [1], [3, 4, 2]])
def test_tile_sdpa_equals_sdpa_under_the_mllama_mask_with_gradients(active, widths):
    mask = mask_of(active, patches_=widths[0], padded=widths[1])
    b, t, h, d = len(active), mask.shape[-1], 2, 8
    g = torch.Generator().manual_seed(len(active))
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    want, want_g = out_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    got, got_g = out_and_grads(tile_sdpa_attention, q, k, v, mask, grad)
    assert got.shape == want.shape == (b, t, h, d)
    assert torch.allclose(got, want, atol=1e-12)
    for x, y in zip(got_g, want_g):
        assert torch.allclose(x, y, atol=1e-12)
    # the padding rows differ from the unmasked attention: the second call is not idle
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3).transpose(1, 2)
    assert not torch.allclose(plain, want, atol=1e-6)


def test_few_padding_rows_use_a_mask_many_use_gathered_keys():
    """A full image of 15-of-16 tiles has 1/16 padding rows (a mask over its keys); one with
    half its tiles unused has more than half (gathered real keys); both in one batch."""
    mask = mask_of([4, 2], patches_=15, padded=16)
    patches._TILE_PLANS.clear()
    _, images = patches._tile_plan(mask)
    assert [(i, keys.dtype, tuple(keys.shape)) for i, _, keys in images] == [
        (0, torch.bool, (1, 64)),
        (1, torch.int64, (30,)),
    ]
    assert images[0][2].sum() == 60 and images[1][1].numel() == 34


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.clone().fill_(0).index_fill_(-1, torch.tensor([3]), -1e300),  # keys only
        lambda m: m * 0.5 + (m == 0) * -1.0,  # a bias that is not 0 where it should be
        lambda m: m[:, :, :-1],  # not square
        lambda m: m < 0,  # boolean
    ],
)
def test_any_other_mask_goes_to_transformers_sdpa_unchanged(make):
    mask = make(mask_of([4, 2]))
    b, t, h, d = 2, 32, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    if mask.shape[-2] != t:
        q = q[:, :, : mask.shape[-2]]
    grad = torch.randn(b, q.shape[2], h, d, generator=g, dtype=torch.float64)
    want, _ = out_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    got, _ = out_and_grads(tile_sdpa_attention, q, k, v, mask, grad)
    assert torch.allclose(got, want, atol=1e-12)


def test_the_mask_is_read_once_per_tensor(monkeypatch):
    mask = mask_of([4, 2])
    q = torch.randn(2, 2, mask.shape[-1], 8, dtype=torch.float64)
    calls = device_reads(monkeypatch)
    for _ in range(3):  # every encoder layer and its recomputation pass the same mask
        tile_sdpa_attention(Attn(), q, q, q, mask, scaling=0.3)
    assert len(calls) == 1
    tile_sdpa_attention(Attn(), q, q, q, mask.clone(), scaling=0.3)
    assert len(calls) == 2


def test_patched_tiny_mllama_matches_transformers_with_gradients(tiny_model):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        tiny_model("mllama"), dtype=torch.float64, attn_implementation="sdpa"
    )
    vision = model.model.vision_model
    cfg = vision.config
    g = torch.Generator().manual_seed(0)
    tiles, side = cfg.max_num_tiles, cfg.image_size
    pixels = torch.randn(2, 1, tiles, 3, side, side, generator=g, dtype=torch.float64)
    ratio_ids = torch.tensor([[1], [2]])  # both aspect ratios the tiny processor knows
    ratio_mask = torch.tensor([[[1, 1]], [[1, 0]]])  # the second image uses one of two tiles
    patched = copy.deepcopy(model)
    n = sum(type(m).__name__ == "MllamaVisionAttention" for m in patched.modules())
    assert n == cfg.num_hidden_layers + cfg.num_global_layers
    assert tile_attention(patched) == n
    assert patched.model.vision_model.config._attn_implementation == TILE_ATTENTION
    patches._TILE_PLANS.clear()
    results = []
    for m in (model, patched):
        px = pixels.clone().requires_grad_(True)
        out = m.model.vision_model(px, ratio_ids, ratio_mask).last_hidden_state
        out.pow(2).sum().backward()
        results.append((out.detach(), px.grad))
    (want, want_g), (got, got_g) = results
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(got_g, want_g, atol=1e-10)
    assert patches._TILE_PLANS  # the fast path ran, not the fallback
