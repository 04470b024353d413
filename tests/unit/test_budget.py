"""The per-run token budget: counts equal what the collator feeds the model, for many image
sizes and resize settings; over-long samples are dropped (or fail the run) with a reason."""

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmflow import data
from vlmflow.budget import TokenCounter, representative_sizes, token_budget
from vlmflow.collate import Encoder
from vlmflow.config import resolve_sections
from vlmflow.modeling import load_processor, model_family

SIZES = [(5, 5), (57, 29), (300, 200), (1000, 700), (30, 1200), (224, 224), (64, 2000), (2, 500)]


def model_cfg(name, **kw):
    return resolve_sections({"model": {"name": name, **kw}}, ["model"])["model"]


def row(i, image_paths, turns=1, text="Which digit is written in this image?"):
    parts = [{"type": "image", "text": "", "image": str(k)} for k in range(len(image_paths))]
    messages = [
        {"role": "user", "content": [*parts, {"type": "text", "text": text, "image": None}]}
    ]
    messages.append(
        {"role": "assistant", "content": [{"type": "text", "text": "7", "image": None}]}
    )
    for t in range(1, turns):
        messages.append(
            {"role": "user", "content": [{"type": "text", "text": f"and {t}?", "image": None}]}
        )
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "yes", "image": None}]}
        )
    return {
        "id": f"r{i}",
        "source": "s",
        "messages": messages,
        "images": image_paths,
        "split": "train",
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    out = {}
    for w, h in SIZES:
        p = d / f"{w}x{h}.png"
        Image.new("RGB", (w, h), (w % 255, h % 255, 9)).save(p)
        out[(w, h)] = str(p)
    return out


@pytest.mark.parametrize(
    "pixels", [{}, {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 16}], ids=["default", "cfg"]
)
def test_counts_equal_the_collators_input_length(tiny_qwen, image_files, pixels):
    cfg = model_cfg(tiny_qwen, **pixels)
    processor = load_processor(cfg)
    encoder = Encoder(processor, model_family(tiny_qwen), max_seq_length=10**6)
    paths = [image_files[s] for s in SIZES[:-1]]
    rows = [row(i, [p]) for i, p in enumerate(paths)]
    rows += [row(20, paths[:3], turns=3), row(21, [], turns=2), row(22, paths[3:], text="x" * 50)]
    sizes = [[Image.open(p).size for p in r["images"]] for r in rows]
    counter = TokenCounter(processor)
    assert counter.calibrate(representative_sizes([s for x in sizes for s in x])) == "fast"
    fast = [c["total"] for c in counter.count(rows, sizes)]
    real = [len(encoder(r)["input_ids"]) for r in rows]
    assert fast == real
    # Image tokens follow the configured resize limits (not a constant).
    per_image = [counter.image_tokens(w, h) for w, h in SIZES[:-1]]
    assert len(set(per_image)) >= 3
    # The generic path (one processor call per distinct size) agrees as well.
    counter._fast_offset = None
    assert [c["total"] for c in counter.count(rows, sizes)] == real


@pytest.mark.parametrize("family", ["internvl", "llava_onevision"])
def test_counts_of_tiled_images_equal_the_collators_input_length(family, tiny_model, image_files):
    """InternVL tiles an image by its aspect ratio; LLaVA-OneVision tiles a lone image but not
    the images of a multi-image sample (its per-image count depends on the row)."""
    path = tiny_model(family)
    processor = load_processor(model_cfg(path))
    encoder = Encoder(processor, model_family(path), max_seq_length=10**6)
    paths = [image_files[s] for s in SIZES[:-1]]
    rows = [row(i, [p]) for i, p in enumerate(paths)]
    rows += [row(20, paths[:3], turns=3), row(21, [], turns=2), row(22, paths[3:5])]
    rows.append(row(23, [paths[2], paths[2]]))  # the same size twice
    sizes = [[Image.open(p).size for p in r["images"]] for r in rows]
    counter = TokenCounter(processor)
    assert counter.calibrate(representative_sizes([s for x in sizes for s in x])) == "fast"
    assert counter.images_interact == (family == "llava_onevision")
    real = [len(encoder(r)["input_ids"]) for r in rows]
    assert [c["total"] for c in counter.count(rows, sizes)] == real
    assert len({counter.image_tokens(w, h) for w, h in SIZES[:-1]}) >= 2  # tiles vary with size


def write_splits(folder, rows_by_split):
    for split in data.SPLITS:
        rows = [{**r, "split": split} for r in rows_by_split.get(split, [])]
        pq.write_table(data.to_table(rows), folder / f"{split}.parquet")


def test_token_budget_drops_too_long_samples(tiny_qwen, image_files, tmp_path):
    small, big, thin = image_files[(57, 29)], image_files[(1000, 700)], image_files[(2, 500)]
    rows = [row(i, [small]) for i in range(6)] + [row(10, [big]), row(11, [big, big])]
    rows.append(row(14, [thin]))  # aspect ratio 250: Qwen's processor refuses it
    write_splits(tmp_path, {"train": rows, "test": [row(12, [small]), row(13, [big])]})
    processor = load_processor(model_cfg(tiny_qwen))
    counter = TokenCounter(processor)
    n_small = counter.count([rows[0]], [[(57, 29)]])[0]["total"]
    n_big = counter.count([rows[6]], [[(1000, 700)]])[0]["total"]
    assert n_small < n_big
    cfg = model_cfg(tiny_qwen, max_seq_length=n_big - 1)
    out = tmp_path / "run"
    summary = token_budget(cfg, tmp_path, None, out, max_bad_fraction=0.5, processor=processor)
    assert summary["image_token_count"] == "fast"
    kept = {
        s: [r["id"] for r in data.read_conversations(out / f"{s}.parquet")] for s in data.SPLITS
    }
    assert kept == {"train": [f"r{i}" for i in range(6)], "val": [], "test": ["r12"]}
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert [(r["id"], r["kind"]) for r in rejected] == [
        ("r10", "too_long"),
        ("r11", "too_long"),
        ("r14", "processor_error"),
        ("r13", "too_long"),
    ]
    assert "aspect ratio" in rejected[2]["reason"]
    assert rejected[0]["reason"].startswith(f"too_long: {n_big} tokens")
    assert f"max_seq_length {n_big - 1}" in rejected[0]["reason"]
    lengths = pq.read_table(out / "token_lengths.parquet").to_pylist()
    assert {r["id"]: r["total"] for r in lengths}["r0"] == n_small
    assert sum(not r["kept"] for r in lengths) == 4
    assert summary["splits"] == {"train": 6, "val": 0, "test": 1}
    assert summary["dropped_by_reason"] == {"too_long": 3, "processor_error": 1}
    table = (out / "token_lengths.tsv").read_text().splitlines()
    assert table[1].split("\t")[:4] == ["split", "rows", "kept", "too_long"]
    assert table[2].split("\t")[:5] == ["train", "9", "6", "2", "1"]
    assert Image.open(out / "token_lengths.png").size[0] > 300
    assert json.loads((out / "summary.json").read_text())["rows_in"] == 11


def test_token_budget_fails_when_asked_or_over_the_bad_fraction(tiny_qwen, image_files, tmp_path):
    small, big = image_files[(57, 29)], image_files[(1000, 700)]
    write_splits(tmp_path, {"train": [row(0, [small]), row(1, [big]), row(2, [small])]})
    processor = load_processor(model_cfg(tiny_qwen))
    n_big = TokenCounter(processor).count([row(1, [big])], [[(1000, 700)]])[0]["total"]
    fail = model_cfg(tiny_qwen, max_seq_length=n_big - 1, too_long="fail")
    copy = tmp_path / "logs" / "rejected.tsv"
    with pytest.raises(data.DataError, match=r"1 of 3 samples exceed max_seq_length .*r1 \("):
        token_budget(fail, tmp_path, None, tmp_path / "a", processor=processor, rejects_copy=copy)
    assert "too_long" in copy.read_text() and not (tmp_path / "a" / "train.parquet").exists()
    drop = model_cfg(tiny_qwen, max_seq_length=n_big - 1)
    with pytest.raises(data.DataError, match=r"1 of 3 samples dropped .*max_bad_fraction 5\.0%"):
        token_budget(
            drop, tmp_path, None, tmp_path / "b", max_bad_fraction=0.05, processor=processor
        )


def test_resize_hints_set_the_image_size_in_the_counts_and_the_encoder(
    tiny_qwen, image_files, tmp_path
):
    """Qwen-VL's per-image resize hints (an exact size, or the part's own pixel bounds): the
    budget counts what the Encoder feeds the model, and the hint changes it."""
    big = image_files[(1000, 700)]

    def hinted(i, **hint):
        r = row(i, [big])
        r["messages"][0]["content"][0]["resize"] = {
            **dict.fromkeys(("resized_height", "resized_width", "min_pixels", "max_pixels")),
            **hint,
        }
        return r

    rows = [
        row(0, [big]),
        hinted(1, resized_height=56, resized_width=84),
        hinted(2, max_pixels=28 * 28 * 24),
        hinted(3, min_pixels=28 * 28 * 4),  # the image is larger already: as unhinted
    ]
    write_splits(tmp_path, {"train": rows})
    cfg = model_cfg(tiny_qwen)
    processor = load_processor(cfg)
    out = tmp_path / "run"
    token_budget(cfg, tmp_path, None, out, max_bad_fraction=0.5, processor=processor)
    counted = {
        r["id"]: r["total"] for r in pq.read_table(out / "token_lengths.parquet").to_pylist()
    }
    kept = data.read_conversations(out / "train.parquet")
    assert [r["messages"][0]["content"][0]["resize"] for r in kept][1]["resized_width"] == 84
    encoder = Encoder(processor, model_family(tiny_qwen), max_seq_length=10**6)
    real = {r["id"]: len(encoder(r)["input_ids"]) for r in kept}
    assert counted == real
    assert real["r1"] < real["r2"] < real["r0"] == real["r3"]
    grid = encoder(kept[1])["image_grid_thw"].tolist()
    assert grid == [[1, 56 // 14, 84 // 14]]  # the exact size, in 14-px patches
