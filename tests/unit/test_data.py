import json

import pytest

from vlmflow import data
from vlmflow.data import DataError, Source

SPLIT0 = {"val": 0, "test": 0, "seed": 0}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ok_images(refs):
    return {
        (root, rel): {"ok": True, "reason": "", "resolved": f"{root}/{rel}"} for root, rel in refs
    }


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"image": "a.png", "instruction": "q", "response": "a"}\n{"image": oops}\n')
    src = Source(path=str(p), image_root=str(tmp_path))
    acc, rej = data.seed_to_conversations(src, ok_images([(str(tmp_path), "a.png")]), SPLIT0)
    assert len(acc) == 1 and rej[0]["row"] == 2
    assert rej[0]["reason"].startswith(f"malformed_row: {p}:2:11:")
    assert rej[0]["raw"] == '{"image": oops}\n'


def test_missing_column_is_named(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"image": "a.png", "instruction": "q"}])
    src = Source(path=str(p), image_root=str(tmp_path))
    with pytest.raises(DataError, match="'response'"):
        data.seed_to_conversations(src, {}, {"val": 0, "test": 0, "seed": 0})


def test_column_mapping_and_formats(tmp_path):
    rows = [{"img": "a.png", "q": "what?", "a": "x", "uid": 7}]
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    cols = {"id": "uid", "image": "img", "instruction": "q", "response": "a"}
    for ext in ("csv", "parquet", "json"):
        src = Source(path=str(tmp_path / f"d.{ext}"), image_root=str(tmp_path), columns=cols)
        acc, rej = data.seed_to_conversations(
            src, ok_images(data.seed_image_refs(src)), {"val": 0, "test": 0, "seed": 0}
        )
        assert not rej
        assert acc[0]["id"] == "7"
        assert acc[0]["messages"][0]["content"][1]["text"] == "what?"
        assert acc[0]["messages"][1] == {
            "role": "assistant",
            "content": [{"type": "text", "text": "x", "image": None}],
        }
        assert acc[0]["images"] == [f"{tmp_path}/a.png"]


def test_bad_rows_are_quarantined_with_reasons(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(
        p,
        [
            {"image": "a.png", "instruction": "q1", "response": "yes"},
            {"image": "b.png", "instruction": "q2", "response": "  "},
            {"image": "c.png", "instruction": "q3", "response": "no"},
            {"image": "a.png", "instruction": "q1", "response": "dup"},
        ],
    )
    src = Source(path=str(p), image_root=str(tmp_path))
    imgs = ok_images(data.seed_image_refs(src))
    imgs[(str(tmp_path), "c.png")] = {"ok": False, "reason": "decode_error: broken", "resolved": ""}
    acc, rej = data.seed_to_conversations(src, imgs, {"val": 0, "test": 0, "seed": 0})
    acc = data.dedupe(acc, rej)
    assert len(acc) + len(rej) == 4
    reasons = sorted(r["reason"].split(":")[0] for r in rej)
    assert reasons == ["bad_image", "duplicate_id", "empty_response"]
    assert {r["row"] for r in rej} == {2, 3, 4}
    with pytest.raises(DataError, match="3 of 4 rows rejected.*empty_response: 1"):
        data.check_bad_fraction(4, rej, 0.5)
    data.check_bad_fraction(4, rej, 0.75)


def test_splits_are_deterministic_and_stable_when_rows_are_appended():
    ids = [f"row-{i}" for i in range(2000)]
    first = {i: data.assign_split(i, 0.1, 0.2, seed=0) for i in ids}
    again = {i: data.assign_split(i, 0.1, 0.2, seed=0) for i in ids + ["new-1", "new-2"]}
    assert all(again[i] == first[i] for i in ids)
    counts = {s: sum(v == s for v in first.values()) for s in data.SPLITS}
    assert 140 < counts["val"] < 260 and 320 < counts["test"] < 480
    other_seed = [data.assign_split(i, 0.1, 0.2, seed=1) for i in ids]
    assert other_seed != list(first.values())


def test_conversation_table_round_trip(tmp_path, digits_rows):
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(data.to_table(digits_rows[:5]), path)
    back = data.read_conversations(path)
    assert [r["id"] for r in back] == [r["id"] for r in digits_rows[:5]]
    assert (
        back[0]["messages"][1]["content"][0]["text"]
        == digits_rows[0]["messages"][1]["content"][0]["text"]
    )


def test_source_names_label_rows_and_must_be_unique(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_jsonl(
            tmp_path / sub / "data.jsonl", [{"image": "", "instruction": "q", "response": "r"}]
        )
    paths = [str(tmp_path / s / "data.jsonl") for s in ("a", "b")]
    labels = [s.label for s in data.sources_of({"sources": [{"path": p} for p in paths]})]
    assert labels == [str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data")]
    one = data.sources_of({"sources": [{"path": paths[0]}]})
    assert one[0].label == "data"
    with pytest.raises(DataError, match="two sources are both named 'x'"):
        data.sources_of({"sources": [{"path": p, "name": "x"} for p in paths]})


def test_referenced_images_lists_existing_files_of_every_format(tmp_path):
    from PIL import Image

    from vlmflow.paths import referenced_images

    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / n)
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside" / "x.png")
    write_jsonl(
        tmp_path / "seed.jsonl",
        [
            {"image": ["a.png", "missing.png"], "instruction": "q", "response": "r"},
            {"image": "../outside/x.png", "instruction": "q", "response": "r"},
            {"image": "http://127.0.0.1:9/u.png", "instruction": "q", "response": "r"},
        ],
    )
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "x"},
                ],
                "images": ["b.png", "data:image/png;base64,AAAA"],
            },
            # No assistant turn: a rejected row references nothing.
            {"conversations": [{"from": "human", "value": "<image>"}], "images": ["c.png"]},
        ],
    )
    sources = [
        {"path": str(tmp_path / "seed.jsonl"), "image_root": str(tmp_path)},
        {"path": str(tmp_path / "chat.jsonl"), "format": "sharegpt"},
        {"path": str(tmp_path / "nope.jsonl")},  # unreadable: left to validate_images
    ]
    assert referenced_images(sources) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
