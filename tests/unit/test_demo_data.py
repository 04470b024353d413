"""The demo's digits come from the file in `vlmflow/data/`, without scikit-learn: the UCI test set
(1,797 8x8 images of pixel counts 0-16, every digit), written as a user folder."""

import json

import numpy as np
from PIL import Image

from vlmflow.demo import PROMPT, load_digits, write_digits


def test_the_bundled_digits_are_the_uci_test_set():
    images, digits = load_digits()
    assert images.shape == (1797, 8, 8) and digits.shape == (1797,)
    assert images.min() == 0 and images.max() == 16 and np.array_equal(images, images.round())
    # the class counts of the UCI optdigits test set (as sklearn.datasets.load_digits gives them)
    assert np.bincount(digits).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_write_digits_writes_pngs_and_rows(tmp_path):
    assert write_digits(tmp_path / "d", scale=2, limit=5) == 5
    rows = [json.loads(x) for x in (tmp_path / "d/data.jsonl").read_text().splitlines()]
    images, digits = load_digits()
    assert [r["response"] for r in rows] == [str(d) for d in digits[:5]]
    assert {r["instruction"] for r in rows} == {PROMPT}
    im = np.asarray(Image.open(tmp_path / "d" / rows[0]["image"]))
    assert im.shape == (16, 16, 3)
    # ink is dark on white: pixel count 16 -> 0, 0 -> 255, nearest-neighbour upscaled
    want = (255 - images[0] * (255 / 16)).clip(0, 255).astype(np.uint8)
    assert np.array_equal(im[::2, ::2, 0], want)
