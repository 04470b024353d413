"""Time one attention call forward + backward: transformers' SDPA under Mllama's vision mask
against `vlmflow.patches.tile_sdpa_attention`, at Llama-3.2-11B-Vision's vision widths (16 heads
of 80, 4 tiles of 1601 patches padded to 1608 per image), and print their largest difference.

    python bench/attention_bench.py [--images 4] [--tiles 4,2] [--reps 10]

One JSON line per (layout, implementation) with the median milliseconds; `--out` appends them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def mllama_mask(images: int, active_tiles: int, max_tiles: int, patches: int, padded: int, dtype):
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    ratio = torch.zeros(images, max_tiles, dtype=torch.long)
    ratio[:, :active_tiles] = 1
    return _prepare_aspect_ratio_attention_mask(ratio, patches, padded, dtype)


def timed(fn, reps: int, dev) -> float:
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out[1:] if len(out) > 2 else out) * 1e3


def main(argv=None) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vlmflow.patches import tile_sdpa_attention

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--tiles", default="4,2", help="active tiles per image, one layout each")
    ap.add_argument("--max-tiles", type=int, default=4)
    ap.add_argument("--patches", type=int, default=1601)
    ap.add_argument("--padded", type=int, default=1608)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    class Module(torch.nn.Module):
        is_causal = False
        num_key_value_groups = 1

    module = Module()
    t = a.max_tiles * a.padded
    lines = []
    for active in (int(x) for x in a.tiles.split(",")):
        mask = mllama_mask(a.images, active, a.max_tiles, a.patches, a.padded, dtype).to(dev)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (
            torch.randn(a.images, a.heads, t, a.head_dim, generator=g).to(dev, dtype)
            for _ in range(3)
        )
        grad = torch.randn(a.images, t, a.heads, a.head_dim, generator=g).to(dev, dtype)
        results = {}
        for name, fn in (("hf_sdpa_masked", sdpa_attention_forward), ("tile", tile_sdpa_attention)):
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

            def step(fn=fn, leaves=leaves, mask=mask, grad=grad):
                out, _ = fn(module, *leaves, mask, scaling=a.head_dim**-0.5)
                out.backward(grad)
                return out

            out = step()
            results[name] = (out.detach().float(), [x.grad.float() for x in leaves])
            for x in leaves:
                x.grad = None
            ms = timed(step, a.reps, dev)
            line = dict(
                bench="attention",
                impl=name,
                images=a.images,
                active_tiles=active,
                seq=t,
                heads=a.heads,
                head_dim=a.head_dim,
                ms_fwd_bwd=round(ms, 3),
                device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                torch=torch.__version__,
            )
            lines.append(line)
            print(json.dumps(line), flush=True)
        (o1, g1), (o2, g2) = results["hf_sdpa_masked"], results["tile"]
        diff = max(
            [(o1 - o2).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(g1, g2)]
        )
        scale = max([o1.abs().max().item()] + [x.abs().max().item() for x in g1])
        print(f"active tiles {active}: largest difference {diff:.3g} (largest value {scale:.3g})")
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
