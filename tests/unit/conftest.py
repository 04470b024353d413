"""Fixtures shared by the per-family tests: tiny models of every registry family (built once
per session, on first use) and a few small conversation rows with images of different sizes."""

import pytest


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run about twice as fast on one thread (no inter-op handoffs for
    microsecond-sized kernels), and leave the second core to the other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_qwen):
    """tiny_model(family) -> folder of a tiny random model + processor of that family."""
    from vlmflow.tiny import build_tiny

    root = tmp_path_factory.mktemp("family-models")
    built = {"qwen2_5_vl": tiny_qwen}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_tiny(family, root / f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def chat_rows(tmp_path_factory):
    """Rows in the canonical conversation schema: one image; two images over two turns; text
    only. Images are small random RGB PNGs of different sizes and aspect ratios."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("chat-images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 56), (64, 48), (30, 30)]):
        p = root / f"{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))

    def text(t):
        return {"type": "text", "text": t, "image": None}

    def image(k):
        return {"type": "image", "text": "", "image": str(k)}

    return [
        {
            "id": "one-image",
            "images": [paths[0]],
            "messages": [
                {"role": "user", "content": [image(0), text("Which digit is written?")]},
                {"role": "assistant", "content": [text("7")]},
            ],
        },
        {
            "id": "two-images-two-turns",
            "images": [paths[1], paths[2]],
            "messages": [
                {"role": "user", "content": [image(0), image(1), text("What is in this image?")]},
                {"role": "assistant", "content": [text("a red circle")]},
                {"role": "user", "content": [text("sure?")]},
                {"role": "assistant", "content": [text("yes")]},
            ],
        },
        {
            "id": "text-only",
            "images": [],
            "messages": [
                {"role": "user", "content": [text("what is two?")]},
                {"role": "assistant", "content": [text("2")]},
            ],
        },
    ]
