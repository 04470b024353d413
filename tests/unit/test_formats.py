"""Every source format through the real data stage (validate_dataset → format_dataset), and
every bad row: quarantined with its reason, or a clear error naming file, line and column."""

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmflow.config import resolve_dataset
from vlmflow.data import (
    DataError,
    format_dataset,
    read_conversations,
    read_images_table,
    validate_dataset,
)
from vlmflow.image_validation import IMAGE_COLUMNS, IMAGES_SCHEMA
from vlmflow.images import load_rgb
from vlmflow.io import write_parquet
from vlmflow.layouts import Source, iter_samples


def png(colour, size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


RED, GREEN, BLUE = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))


@pytest.fixture
def folder(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "red.png").write_bytes(RED)
    (img / "green.png").write_bytes(GREEN)
    (img / "blue.png").write_bytes(BLUE)
    return tmp_path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stage(tmp_path, sources, **ds):
    """Run validate + format on a dataset config; returns (rows, rejected, summary)."""
    ds = {"max_bad_fraction": 1, **ds}
    cfg = resolve_dataset({"sources": sources, "split": {"val": 0, "test": 0}, **ds})
    recs = validate_dataset(cfg, tmp_path / "cache", threads=2, progress=False)
    table = pa.Table.from_pylist([{k: r[k] for k in IMAGE_COLUMNS} for r in recs], IMAGES_SCHEMA)
    write_parquet(tmp_path / "out" / "images.parquet", table)
    summary = format_dataset(
        cfg, read_images_table(tmp_path / "out" / "images.parquet"), tmp_path / "out"
    )
    rows = read_conversations(tmp_path / "out" / "train.parquet")
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet").to_pylist()
    assert summary["rows_in"] == len(rows) + len(rejected)  # nothing silently dropped
    return rows, rejected, summary


def colours(row):
    return [load_rgb(p).getpixel((0, 0)) for p in row["images"]]


def roles_and_parts(row):
    return [
        (m["role"], [p["text"] if p["type"] == "text" else f"<{p['image']}>" for p in m["content"]])
        for m in row["messages"]
    ]


def test_seed_multi_image_and_multi_turn(folder):
    src = jsonl(
        folder / "seed.jsonl",
        [
            {
                "image": ["img/red.png", "img/blue.png"],
                "instruction": ["compare", "and now?"],
                "response": ["red vs blue", "same"],
                "sys": "be brief",
            },
            {"image": "img/green.png", "instruction": "<image> colour? <image>", "response": "x"},
            {
                "image": ["img/green.png", "img/red.png"],
                "instruction": "left <image> right <image>",
                "response": "green, red",
            },
        ],
    )
    rows, rejected, _ = stage(
        folder, [{"path": src, "columns": {"system": "sys"}}]
    )  # image_root defaults to the data file's folder
    assert [r["reason"].split(":")[0] for r in rejected] == ["image_count_mismatch"]
    assert "2 <image> placeholders but 1 images" in rejected[0]["reason"]
    multi = next(r for r in rows if len(r["messages"]) == 5)
    assert roles_and_parts(multi) == [
        ("system", ["be brief"]),
        ("user", ["<0>", "<1>", "compare"]),
        ("assistant", ["red vs blue"]),
        ("user", ["and now?"]),
        ("assistant", ["same"]),
    ]
    assert colours(multi) == [(255, 0, 0), (0, 0, 255)]
    placed = next(r for r in rows if len(r["messages"]) == 2)
    assert roles_and_parts(placed)[0] == ("user", ["left ", "<0>", " right ", "<1>"])
    assert colours(placed) == [(0, 255, 0), (255, 0, 0)]


def test_messages_typed_parts_every_image_kind(folder):
    b64 = base64.b64encode(GREEN).decode()
    rows = [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "img/red.png"},
                        {"type": "text", "text": "and"},
                        {"type": "image", "image": f"data:image/png;base64,{b64}"},
                        {"type": "image_url", "image_url": {"url": "img/blue.png"}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
                {"role": "user", "content": [{"type": "text", "text": "more?"}]},
                {"role": "assistant", "content": "no"},
            ]
        },
        # TRL/HF style: value-less image parts take the `images` column in order.
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "q"},
                        {"type": "image"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            ],
            "images": ["img/blue.png", {"base64": b64}],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}]},
                {"role": "assistant", "content": "a"},
            ],
            "images": [],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": "data:image/png;base64,@@@"}],
                },
                {"role": "assistant", "content": "a"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "ftp://h/x.png"}]},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    ok, rejected, _ = stage(
        folder,
        [
            {
                "path": jsonl(folder / "m.jsonl", rows),
                "format": "messages",
                "image_root": str(folder),
            }
        ],
    )
    assert [r["row"] for r in rejected] == [3, 4, 5, 6]
    assert [r["kind"] for r in rejected] == [
        "video_unsupported",
        "image_count_mismatch",
        "bad_image_ref",
        "bad_image_ref",
    ]
    assert "invalid base64" in rejected[2]["reason"] and "'ftp'" in rejected[3]["reason"]
    first = next(r for r in ok if len(r["images"]) == 3)
    assert roles_and_parts(first) == [
        ("system", ["sys"]),
        ("user", ["<0>", "and", "<1>", "<2>"]),
        ("assistant", ["three"]),
        ("user", ["more?"]),
        ("assistant", ["no"]),
    ]
    assert colours(first) == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert "/blobs/" in first["images"][1]  # the embedded image became a file
    second = next(r for r in ok if len(r["images"]) == 2)
    assert roles_and_parts(second)[0] == ("user", ["<0>", "q", "<1>"])
    assert colours(second) == [(0, 0, 255), (0, 255, 0)]


def test_one_instruction_for_every_row_of_an_image_and_answer_file(folder):
    """Image + answer data (captions, OCR; Unsloth's LaTeX_OCR notebook asks one question of
    every image): the source's `instruction` is every row's instruction, and no instruction
    column is needed. Only for the seed format."""
    (folder / "ocr.csv").write_text("image,text\nimg/red.png,x^2\nimg/blue.png,\\frac{a}{b}\n")
    source = {
        "path": str(folder / "ocr.csv"),
        "columns": {"response": "text"},
        "instruction": "Write the LaTeX representation for this image.",
    }
    ok, rejected, _ = stage(folder, [source])
    assert not rejected
    by_answer = {r["messages"][1]["content"][0]["text"]: r for r in ok}
    assert set(by_answer) == {"x^2", "\\frac{a}{b}"}
    assert roles_and_parts(by_answer["x^2"]) == [
        ("user", ["<0>", "Write the LaTeX representation for this image."]),
        ("assistant", ["x^2"]),
    ]
    assert len({r["id"] for r in ok}) == 2  # ids still differ by image

    with pytest.raises(DataError, match="missing required column.*'instruction'"):
        stage(folder, [{**source, "instruction": None}])
    with pytest.raises(DataError, match="'instruction'.*format 'seed', not 'sharegpt'"):
        stage(folder, [{**source, "format": "sharegpt"}])


def test_images_without_placeholders_open_the_first_user_turn(folder):
    """LLaMA-Factory's current mllm_demo.json (no <image> in any turn, an `images` list) and
    TRL-style messages without image parts: the images go before the first user turn's text,
    in order, as TRL and LLaMA-Factory's chat engines place them. Some placeholders but not as
    many as images stays a mismatch."""
    rows = [
        {
            "messages": [
                {"content": "Who are they?", "role": "user"},
                {"content": "Kane and Gretzka.", "role": "assistant"},
                {"content": "What are they doing?", "role": "user"},
                {"content": "Celebrating.", "role": "assistant"},
            ],
            "images": ["img/red.png", "img/blue.png"],
        },
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": "green"},
            ],
            "images": ["img/green.png"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image> and the other?"},
                {"role": "assistant", "content": "both red"},
            ],
            "images": ["img/red.png", "img/red.png"],
        },
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "lf.jsonl", rows), "format": "sharegpt"}]
    )
    assert [(r["row"], r["kind"]) for r in rejected] == [(3, "image_count_mismatch")]
    two = next(r for r in ok if len(r["images"]) == 2)
    assert roles_and_parts(two) == [
        ("user", ["<0>", "<1>", "Who are they?"]),
        ("assistant", ["Kane and Gretzka."]),
        ("user", ["What are they doing?"]),
        ("assistant", ["Celebrating."]),
    ]
    assert colours(two) == [(255, 0, 0), (0, 0, 255)]
    one = next(r for r in ok if len(r["images"]) == 1)
    assert roles_and_parts(one)[:2] == [("system", ["Be brief."]), ("user", ["<0>", "Colour?"])]

    typed = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            ],
            "images": ["img/blue.png"],
        }
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "trl.jsonl", typed), "format": "messages"}]
    )
    assert not rejected and roles_and_parts(ok[0])[0] == ("user", ["<0>", "q"])


def test_hf_dataset_parts_with_an_index_into_images(folder):
    """Hugging Face datasets' typed parts (HuggingFaceH4/llava-instruct-mix-vsft, written by
    `datasets` to Parquet: every part carries type, text and index, None where unused): an
    image part takes `images[index]`, in any order. An index out of range, an image no part
    uses, or indexed and unindexed parts in one row are quarantined with the reason."""

    def part(kind, text=None, index=None):
        return {"type": kind, "text": text, "index": index}

    def row(parts, images):
        return {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": [part("text", "answer")]},
            ],
            "images": [{"bytes": b, "path": None} for b in images],
        }

    rows = [
        row([part("image", index=1), part("text", "then"), part("image", index=0)], [RED, BLUE]),
        row([part("text", "colour?"), part("image", index=0)], [GREEN]),
        row([part("image", index=2)], [RED, BLUE]),
        row([part("image", index=0)], [RED, BLUE]),
        row([part("image", index=0), part("image")], [RED, BLUE]),
    ]
    path = folder / "hf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ok, rejected, _ = stage(folder, [{"path": str(path), "format": "messages"}])
    assert [(r["row"], r["kind"]) for r in rejected] == [
        (3, "image_count_mismatch"),
        (4, "image_count_mismatch"),
        (5, "bad_field"),
    ]
    assert "index 2" in rejected[0]["reason"] and "[1]" in rejected[1]["reason"]
    two = next(r for r in ok if len(r["images"]) == 2)
    assert roles_and_parts(two)[0] == ("user", ["<0>", "then", "<1>"])
    assert colours(two) == [(0, 0, 255), (255, 0, 0)]  # images[1] first, as the parts say
    one = next(r for r in ok if len(r["images"]) == 1)
    assert roles_and_parts(one)[0] == ("user", ["colour?", "<0>"])
    assert colours(one) == [(0, 255, 0)]


def test_trl_conversational_prompt_completion(folder):
    """TRL's prompt-completion rows (trl-lib/llava-instruct-mix): the conversation is the
    `prompt` messages then the `completion` messages; value-less image parts take `images`."""
    rows = [
        {
            "images": [{"bytes": GREEN, "path": None}],
            "prompt": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
            ],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": "green"}]}],
        },
        {
            "images": ["img/red.png"],
            "prompt": [{"role": "user", "content": [{"type": "image"}]}],
            "completion": "red",
        },
    ]
    path = folder / "trl.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), path)
    ok, rejected, _ = stage(folder, [{"path": str(path), "format": "messages"}])
    assert not rejected
    assert roles_and_parts(ok[0]) == [
        ("system", ["Be brief."]),
        ("user", ["<0>", "Hue?"]),
        ("assistant", ["green"]),
    ]
    assert colours(ok[0]) == [(0, 255, 0)]
    src = Source(path=jsonl(folder / "trl.jsonl", rows[1:]), format="messages")
    (bad,) = list(iter_samples(src))
    assert bad.reason.startswith("bad_field: 'completion' is a string but not JSON")


def test_the_cauldron_user_assistant_pairs(folder):
    """HuggingFaceM4/the_cauldron and Docmatix: `images` and `texts`, one {user, assistant,
    source} object per exchange and no placeholders: each object is a user and an assistant
    turn (`source`, the dataset's name, is metadata), the images open the first user turn.
    Another key in an exchange is quarantined."""
    rows = [
        {
            "images": [{"bytes": RED, "path": None}],
            "texts": [
                {"user": "Question: colour?", "assistant": "Answer: red", "source": "vqav2"},
                {"user": "Sure?", "assistant": "Yes.", "source": "vqav2"},
            ],
        },
        {
            "images": [{"bytes": BLUE, "path": None}],
            "texts": [{"user": "What?", "assistant": "blue", "source": "x", "score": 3}],
        },
    ]
    path = folder / "cauldron.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ok, rejected, _ = stage(folder, [{"path": str(path), "format": "messages"}])
    assert [(r["row"], r["kind"]) for r in rejected] == [(2, "unsupported_field")]
    assert "['score']" in rejected[0]["reason"]
    assert roles_and_parts(ok[0]) == [
        ("user", ["<0>", "Question: colour?"]),
        ("assistant", ["Answer: red"]),
        ("user", ["Sure?"]),
        ("assistant", ["Yes."]),
    ]
    assert colours(ok[0]) == [(255, 0, 0)]


def test_sharegpt_llamafactory_and_llava_styles(folder):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And this one? <image>"},
                {"from": "gpt", "value": "blue"},
            ],
            "images": ["img/red.png", "img/blue.png"],
            "system": "S",
        },
        {
            "id": "llava-1",
            "image": "img/green.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "green"},
            ],
        },
        {
            "messages": [
                {"role": "user", "content": "<image><image> two?"},
                {"role": "assistant", "content": "yes"},
            ],
            "images": ["img/red.png"],
        },
        {"conversations": [{"from": "human", "value": "<image> hi"}], "images": ["img/red.png"]},
        {
            "conversations": [
                {"from": "human", "value": "<image> hi"},
                {"from": "gpt", "value": "   "},
            ],
            "images": ["img/red.png"],
        },
        {"conversations": [{"from": "observation", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    ok, rejected, _ = stage(
        folder,
        [
            {
                "path": jsonl(folder / "s.jsonl", rows),
                "format": "sharegpt",
                "columns": {"system": "system", "id": "id"},
            }
        ],
    )
    assert [(r["row"], r["kind"]) for r in rejected] == [
        (3, "image_count_mismatch"),
        (4, "no_assistant_turn"),
        (5, "empty_response"),
        (6, "unknown_role"),
    ]
    assert "2 <image> placeholders but 1 images" in rejected[0]["reason"]
    multi = next(r for r in ok if len(r["images"]) == 2)
    assert roles_and_parts(multi) == [
        ("system", ["S"]),
        ("user", ["<0>", "\nWhat colour?"]),
        ("assistant", ["red"]),
        ("user", ["And this one? ", "<1>"]),
        ("assistant", ["blue"]),
    ]
    assert colours(multi) == [(255, 0, 0), (0, 0, 255)]
    llava = next(r for r in ok if r["id"] == "llava-1")
    assert colours(llava) == [(0, 255, 0)]


def test_parquet_with_embedded_bytes_and_hf_struct(folder):
    table = pa.table(
        {
            "image": [RED, BLUE, b"not an image"],
            "picture": [
                {"bytes": GREEN, "path": None},
                {"bytes": None, "path": "img/red.png"},
                {"bytes": None, "path": "img/red.png"},
            ],
            "question": ["a", "b", "c"],
            "answer": ["1", "2", "3"],
        }
    )
    pq.write_table(table, folder / "e.parquet")
    rows, rejected, _ = stage(
        folder,
        [
            {
                "path": str(folder / "e.parquet"),
                "name": "bytes",
                "columns": {"instruction": "question", "response": "answer"},
            },
            {
                "path": str(folder / "e.parquet"),
                "name": "structs",
                "columns": {"image": "picture", "instruction": "question", "response": "answer"},
            },
        ],
    )
    got = sorted((r["source"], r["messages"][0]["content"][1]["text"], colours(r)[0]) for r in rows)
    assert got == [
        ("bytes", "a", (255, 0, 0)),
        ("bytes", "b", (0, 0, 255)),
        ("structs", "a", (0, 255, 0)),
        ("structs", "b", (255, 0, 0)),
        ("structs", "c", (255, 0, 0)),
    ]
    assert [(r["source"], r["row"], r["kind"]) for r in rejected] == [
        ("bytes", 3, "bad_image/not_an_image")
    ]
    images = pq.read_table(folder / "out" / "images.parquet").to_pylist()
    assert {r["kind"] for r in images} == {"bytes", "path"}
    # Embedded images are written once, content-addressed, and not rewritten on a re-run.
    blobs = sorted((folder / "cache" / "blobs").rglob("*.png"))
    mtimes = [b.stat().st_mtime_ns for b in blobs]
    stage(
        folder,
        [
            {
                "path": str(folder / "e.parquet"),
                "columns": {"instruction": "question", "response": "answer"},
            }
        ],
    )
    assert [b.stat().st_mtime_ns for b in blobs] == mtimes and len(blobs) == 3


def test_datasets_save_to_disk_folder(folder):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}],
            "messages": [
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "c?"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                ],
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "c?"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
                ],
            ],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(folder / "hf"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(folder / "hfd"))
    rows, rejected, summary = stage(
        folder,
        [
            {"path": str(folder / "hf"), "format": "messages", "columns": {"images": "image"}},
            {"path": str(folder / "hfd"), "format": "messages", "columns": {"images": "image"}},
        ],
    )
    assert summary["sources"]["hf"] == {"rows": 2, "accepted": 2}
    # The DatasetDict repeats sample 0 in its test split: same content, same id → duplicate.
    assert [(r["source"], r["row"], r["kind"]) for r in rejected] == [("hfd", 3, "duplicate_id")]
    assert sorted(colours(r)[0] for r in rows) == [(0, 0, 255)] * 2 + [(255, 0, 0)] * 2


def test_csv_and_json_sources(folder):
    (folder / "d.csv").write_text(
        'img,q,a\nimg/red.png,what?,red\n"[""img/red.png"", ""img/blue.png""]",two?,both\n'
        "img/blue.png,three fields,too,many\n"
    )
    (folder / "d.json").write_text(
        json.dumps(
            [
                {"image": "img/green.png", "instruction": "q", "response": "green"},
                ["not", "an", "object"],
            ]
        )
    )
    rows, rejected, _ = stage(
        folder,
        [
            {
                "path": str(folder / "d.csv"),
                "columns": {"image": "img", "instruction": "q", "response": "a"},
            },
            {"path": str(folder / "d.json"), "name": "j"},
        ],
    )
    assert sorted(len(r["images"]) for r in rows) == [1, 1, 2]
    assert [(r["source"], r["row"], r["kind"]) for r in rejected] == [
        ("d", 4, "malformed_row"),
        ("j", 2, "malformed_row"),
    ]
    assert "4 fields, header has 3" in rejected[0]["reason"]


# --- bad input: clear errors ------------------------------------------------------------------


def test_malformed_jsonl_line_is_quarantined_naming_file_and_line(folder):
    p = folder / "d.jsonl"
    p.write_text('{"image": "img/red.png", "instruction": "q", "response": "a"}\n{"image": oops}\n')
    rows, rejected, _ = stage(folder, [{"path": str(p)}], max_bad_fraction=0.5)
    assert len(rows) == 1 and rejected[0]["row"] == 2
    assert rejected[0]["reason"].startswith(f"malformed_row: {p}:2:11: Expecting value")


def test_malformed_json_file_names_line_and_column(folder):
    (folder / "d.json").write_text('[\n  {"image": "a.png",\n   "instruction": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3:19: malformed JSON"):
        list(iter_samples(Source(path=str(folder / "d.json"))))


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_missing_required_column_is_named(folder, ext):
    rows = [{"image": "img/red.png", "instruction": "q", "answer": "a"}]
    path = folder / f"d.{ext}"
    if ext == "jsonl":
        jsonl(path, rows)
    elif ext == "csv":
        path.write_text("image,instruction,answer\nimg/red.png,q,a\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        list(iter_samples(Source(path=str(path))))
    msg = str(e.value)
    assert str(path) in msg and "'response'" in msg and "columns.response" in msg
    assert "answer" in msg  # lists what the file has


def test_invalid_utf8_is_quarantined_with_line_and_column(folder):
    good = b'{"image": "img/red.png", "instruction": "q", "response": "ok"}\n'
    bad = b'{"image": "img/red.png", "instruction": "caf\xe9", "response": "x"}\n'
    surrogate = b'{"image": "img/blue.png", "instruction": "q", "response": "\\udc80"}\n'
    (folder / "d.jsonl").write_bytes(good + bad + surrogate)
    (folder / "d.csv").write_bytes(b"image,instruction,response\nimg/red.png,caf\xe9,x\n")
    rows, rejected, _ = stage(
        folder,
        [{"path": str(folder / "d.jsonl")}, {"path": str(folder / "d.csv"), "name": "c"}],
        max_bad_fraction=1,
    )
    assert len(rows) == 1
    reasons = [r["reason"] for r in rejected]
    assert reasons[0].startswith(f"invalid_utf8: {folder / 'd.jsonl'}:2: byte 0xe9 at column 45")
    assert reasons[1].startswith("invalid_utf8: message 1 (assistant)")
    assert reasons[2].startswith(f"invalid_utf8: {folder / 'd.csv'}:2: column 'instruction'")


def test_bad_images_quarantine_their_rows(folder):
    (folder / "img" / "broken.png").write_bytes(RED[:30])
    (folder / "outside.png").write_bytes(RED)
    src = jsonl(
        folder / "d.jsonl",
        [
            {"image": "red.png", "instruction": "q", "response": "a"},
            {"image": ["red.png", "broken.png"], "instruction": "q2", "response": "a"},
            {"image": "../outside.png", "instruction": "q3", "response": "a"},
            {"image": str(folder / "outside.png"), "instruction": "q4", "response": "a"},
            {"image": "nope.png", "instruction": "q5", "response": "a"},
        ],
    )
    rows, rejected, summary = stage(
        folder, [{"path": src, "image_root": str(folder / "img")}], max_bad_fraction=1
    )
    assert len(rows) == 1
    assert [r["kind"] for r in rejected] == [
        "bad_image/not_an_image",
        "bad_image/path_escape",
        "bad_image/path_escape",
        "bad_image/missing",
    ]
    assert rejected[0]["reason"].startswith("bad_image: 'broken.png': not_an_image")
    assert "'../outside.png'" in rejected[1]["reason"]
    assert summary["rejected_by_reason"]["bad_image/path_escape"] == 2
    tsv = (folder / "out" / "rejected.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["source", "row", "id", "kind", "reason", "raw"]
    assert len(tsv) == 5 and tsv[1].split("\t")[1] == "2"


def test_file_uris_are_paths_under_the_same_rules(folder):
    """Qwen-VL's examples write local images as `file:///abs/path`: a path inside the image
    root (also `file://localhost/...`, percent-escapes decoded); outside it, or on another host,
    the row is quarantined like any path's."""
    (folder / "img" / "with space.png").write_bytes(GREEN)
    (folder / "outside.png").write_bytes(RED)
    img = (folder / "img").resolve()

    def row(uri, text):
        return {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": uri}, {"type": "text", "text": text}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
            ]
        }

    src = jsonl(
        folder / "q.jsonl",
        [
            row(f"file://{img}/red.png", "q1"),
            row(f"file://localhost{img}/with%20space.png", "q2"),
            row(f"file://{folder.resolve()}/outside.png", "q3"),
            row(f"file://{img}/../outside.png", "q4"),
            row("file://fileserver/share/red.png", "q5"),
        ],
    )
    rows, rejected, _ = stage(folder, [{"path": src, "format": "messages", "image_root": str(img)}])
    assert [colours(r) for r in rows] == [[(255, 0, 0)], [(0, 255, 0)]]
    assert [(r["row"], r["kind"]) for r in rejected] == [
        (3, "bad_image/path_escape"),
        (4, "bad_image/path_escape"),
        (5, "bad_image_ref"),
    ]
    assert "another host 'fileserver'" in rejected[2]["reason"]


def test_duplicates_and_the_bad_fraction_gate(folder, tmp_path):
    src = jsonl(
        folder / "d.jsonl",
        [
            {"image": "img/red.png", "instruction": "q", "response": "a"},
            {"image": "img/red.png", "instruction": "q", "response": "other answer"},
            {"image": "img/blue.png", "instruction": "q", "response": ""},
            {"image": "img/blue.png", "instruction": "q", "response": "fine"},
        ],
    )
    cfg = resolve_dataset({"sources": [{"path": src}], "max_bad_fraction": 0.25})
    recs = validate_dataset(cfg, folder / "cache", progress=False)
    images = {(r["kind"], r["root"], r["path"]): r for r in recs}
    copy = tmp_path / "logs" / "rejected.tsv"
    with pytest.raises(DataError) as e:
        format_dataset(cfg, images, folder / "out", rejects_copy=copy)
    msg = str(e.value)
    assert "2 of 4 rows rejected (50.0% > max_bad_fraction 25.0%)" in msg
    assert "duplicate_id: 1" in msg and "empty_response: 1" in msg
    assert "d row 2: duplicate_id: same id as d row 1" in msg  # an example per reason
    assert str(copy) in msg
    # The rejects are written before failing (also to the copy Snakemake keeps), splits are not.
    assert len(pq.read_table(folder / "out" / "rejected.parquet")) == 2
    assert len(copy.read_text().splitlines()) == 3
    assert not (folder / "out" / "train.parquet").exists()
    assert not list((folder / "out").glob(".*tmp*"))


def test_splits_do_not_move_when_rows_are_appended(folder):
    rows = [{"image": "img/red.png", "instruction": f"q{i}", "response": "a"} for i in range(300)]
    # One image for every row: split row by row here (group_by image would keep them together).
    cfg = {"split": {"val": 0.1, "test": 0.2, "seed": 0, "group_by": "none"}}
    src = jsonl(folder / "d.jsonl", rows)

    def splits():
        ds = resolve_dataset({"sources": [{"path": src}], **cfg})
        recs = validate_dataset(ds, folder / "cache", progress=False)
        format_dataset(ds, {(r["kind"], r["root"], r["path"]): r for r in recs}, folder / "o")
        return {
            r["id"]: s
            for s in ("train", "val", "test")
            for r in read_conversations(folder / "o" / f"{s}.parquet")
        }

    before = splits()
    jsonl(
        folder / "d.jsonl",
        rows
        + [{"image": "img/blue.png", "instruction": f"n{i}", "response": "b"} for i in range(50)],
    )
    after = splits()
    assert len(after) == 350 and all(after[k] == v for k, v in before.items())
    assert 30 < sum(v == "test" for v in before.values()) < 100


@pytest.mark.parametrize(
    "index, entry",
    [
        ("state.json", "../../etc/passwd"),
        ("state.json", "/etc/passwd"),
        ("state.json", "link.arrow"),  # a symbolic link to a file outside the folder
        ("dataset_dict.json", "../elsewhere"),
    ],
)
def test_save_to_disk_folder_files_stay_inside_it(tmp_path, index, entry):
    """A save_to_disk folder whose index lists a file or split outside the folder is refused
    (naming the index and the entry), before anything outside is opened."""
    from vlmflow.readers import Reader

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "state.json").write_text(json.dumps({"_data_files": [{"filename": "x.arrow"}]}))
    (outside / "x.arrow").write_bytes(b"not arrow")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "link.arrow").symlink_to(outside / "x.arrow")
    if index == "state.json":
        (folder / index).write_text(json.dumps({"_data_files": [{"filename": entry}]}))
    else:
        (folder / index).write_text(json.dumps({"splits": [entry]}))
    with pytest.raises(DataError, match=rf"{index}: entry .* (outside|inside)"):
        Reader(folder)


# ---------------------------------------------------------------------------------------------
# Foreign datasets (fixtures in the shapes of LLaMA-Factory's and Qwen's demo files).


def kinds(rejected):
    return [(r["row"], r["kind"]) for r in rejected]


def test_llamafactory_v1_typed_parts_carry_their_payload_under_value(folder):
    """LLaMA-Factory's v1 typed-part files (data/v1_multimodal_demo.jsonl): `value` holds the
    text or the image path; a missing image names the path that was tried."""
    t = lambda s: {"type": "text", "value": s}  # noqa: E731
    i = lambda p: {"type": "image_url", "value": p}  # noqa: E731
    rows = [
        {
            "messages": [
                {"role": "user", "content": [i("img/red.png"), t("Who are they?")]},
                {"role": "assistant", "content": [t("Two players.")]},
                {"role": "user", "content": [t("Doing what?"), i("img/blue.png")]},
                {"role": "assistant", "content": [t("Celebrating.")]},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [i("img/nope.jpg"), t("Who is he?")]},
                {"role": "assistant", "content": [t("A player.")]},
            ]
        },
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "v1.jsonl", rows), "format": "messages"}]
    )
    assert kinds(rejected) == [(2, "bad_image/missing")]
    assert str(folder / "img" / "nope.jpg") in rejected[0]["reason"]
    (row,) = ok
    assert roles_and_parts(row) == [
        ("user", ["<0>", "Who are they?"]),
        ("assistant", ["Two players."]),
        ("user", ["Doing what?", "<1>"]),
        ("assistant", ["Celebrating."]),
    ]
    assert colours(row) == [(255, 0, 0), (0, 0, 255)]


def test_sharegpt_top_level_system_is_the_system_turn_by_default(folder):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>Colour?"},
                {"from": "gpt", "value": "red"},
            ],
            "images": ["img/red.png"],
            "system": "Answer in one word.",
        },
        {  # the same prompt as a field and a message: once
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>Colour?"},
                {"from": "gpt", "value": "blue"},
            ],
            "images": ["img/blue.png"],
            "system": "Be brief.",
        },
        {
            "conversations": [
                {"from": "system", "value": "Be verbose."},
                {"from": "human", "value": "<image>Colour?"},
                {"from": "gpt", "value": "green"},
            ],
            "images": ["img/green.png"],
            "system": "Be brief.",
        },
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "s.jsonl", rows), "format": "sharegpt"}]
    )
    assert kinds(rejected) == [(3, "conflicting_system")]
    first, second = sorted(ok, key=lambda r: colours(r))[::-1]
    assert roles_and_parts(first)[0] == ("system", ["Answer in one word."])
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant"]


def test_alpaca_input_joins_the_instruction(folder):
    rows = [
        {"image": "img/red.png", "instruction": "Translate.", "input": "rouge", "output": "red"},
        {"image": "img/red.png", "instruction": "Name the colour.", "input": "", "output": "red"},
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "a.jsonl", rows), "columns": {"response": "output"}}]
    )
    assert not rejected
    prompts = sorted(roles_and_parts(r)[0][1][-1] for r in ok)
    assert prompts == ["Name the colour.", "Translate.\nrouge"]


def test_llamafactory_role_tags_are_mapped(folder):
    rows = [
        {
            "dialogue": [
                {"speaker": "questioner", "text": "<image>Colour?"},
                {"speaker": "answerer", "text": "red"},
            ],
            "pictures": ["img/red.png"],
        },
        {
            "dialogue": [
                {"speaker": "questioner", "text": "<image>Look it up"},
                {"speaker": "tool", "text": "{}"},
                {"speaker": "answerer", "text": "red"},
            ],
            "pictures": ["img/red.png"],
        },
    ]
    tags = {
        "role_tag": "speaker",
        "content_tag": "text",
        "user_tag": "questioner",
        "assistant_tag": "answerer",
        "observation_tag": "tool",
    }
    ok, rejected, _ = stage(
        folder,
        [
            {
                "path": jsonl(folder / "t.jsonl", rows),
                "format": "sharegpt",
                "columns": {"messages": "dialogue", "images": "pictures"},
                "tags": tags,
            }
        ],
    )
    assert kinds(rejected) == [(2, "unsupported_role")]
    assert roles_and_parts(ok[0]) == [("user", ["<0>", "Colour?"]), ("assistant", ["red"])]


def test_rows_with_videos_are_quarantined_not_trained_without_them(folder):
    rows = [
        {  # LLaMA-Factory mllm_video_demo.json
            "messages": [
                {"role": "user", "content": "<video>What is she doing?"},
                {"role": "assistant", "content": "Cooking."},
            ],
            "videos": ["clips/2.avi"],
        },
        {  # Qwen-VL finetune style: a `video` key
            "video": "clips/1.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens?"},
                {"from": "gpt", "value": "A baby reads."},
            ],
        },
        {  # a <video> tag without its column
            "conversations": [
                {"from": "human", "value": "<image> and <video>: same?"},
                {"from": "gpt", "value": "no"},
            ],
            "images": ["img/red.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "<image> colour?"},
                {"from": "gpt", "value": "red"},
            ],
            "images": ["img/red.png"],
        },
    ]
    typed = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video_url", "value": "clips/3.gif"},
                        {"type": "text", "value": "What happens?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "value": "Colours."}]},
            ]
        }
    ]
    ok, rejected, summary = stage(
        folder,
        [
            {"path": jsonl(folder / "v.jsonl", rows), "format": "sharegpt"},
            {"path": jsonl(folder / "vt.jsonl", typed), "format": "messages"},
        ],
    )
    assert [(r["source"], r["row"], r["kind"]) for r in rejected] == [
        ("v", 1, "video_unsupported"),
        ("v", 2, "video_unsupported"),
        ("v", 3, "video_unsupported"),
        ("vt", 1, "video_unsupported"),
    ]
    assert summary["rejected_by_reason"] == {"video_unsupported": 4}
    assert len(ok) == 1 and "<video>" not in json.dumps(ok[0]["messages"])


def test_content_the_converter_does_not_understand_is_quarantined(folder):
    def row(user, answer, **extra):
        return {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, *user]},
                {"role": "assistant", "content": [{"type": "text", "text": "a"}], **answer},
            ],
            "images": ["img/red.png"],
            **extra,
        }

    text = {"type": "text", "text": "q"}
    rows = [
        row([text], {"loss_weight": 1.0}),  # the default weight: fine
        row([text], {"loss_weight": 0.0}),  # its only answer not trained on: nothing to train
        row([text], {"tool_calls": [{"name": "f"}]}),
        row([{"type": "text", "text": "q", "cache_control": {"type": "x"}}], {}),
        row([{"type": "audio", "audio": "a.wav"}], {}),
        row([text], {}, tools='[{"name": "f"}]'),
        row([{"type": "text", "text": "q2"}], {"tool_calls": None}),  # empty: nothing is lost
        row([text], {"value": "another answer"}),  # two contents: which one is meant?
        row([{"type": "image", "image": "img/red.png", "url": "img/blue.png"}, text], {}),
        row(
            [{"type": "text", "text": "Find <ref-object>"}],
            {},
            objects={"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8]]},
        ),
        row([{"type": "text", "text": "Where is the <bbox> tag used?"}], {}),  # plain text
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "u.jsonl", rows), "format": "messages"}]
    )
    assert kinds(rejected) == [
        (2, "no_trained_turn"),
        (3, "unsupported_field"),
        (4, "unsupported_field"),
        (5, "unsupported_part"),
        (6, "unsupported_field"),
        (8, "bad_field"),
        (9, "bad_field"),
        (10, "unsupported_field"),  # ms-swift grounding: <ref-object> / <bbox> filled from it
    ]
    assert "<ref-object>" in rejected[7]["reason"] and "'objects'" in rejected[7]["reason"]
    assert "both 'content' and 'value'" in rejected[5]["reason"]
    assert "several different images" in rejected[6]["reason"]
    assert "loss weight 0" in rejected[0]["reason"] and "'tool_calls'" in rejected[1]["reason"]
    assert "cache_control" in rejected[2]["reason"] and "'tools'" in rejected[4]["reason"]
    assert len(ok) == 3


# ---------------------------------------------------------------------------------------------
# Splits.


def split_stage(tmp_path, rows, split, name="d", require=("train",)):
    cfg = resolve_dataset(
        {"sources": [{"path": jsonl(tmp_path / "g.jsonl", rows)}], "split": split}
    )
    recs = validate_dataset(cfg, tmp_path / "cache", progress=False)
    images = {(r["kind"], r["root"], r["path"]): r for r in recs}
    summary = format_dataset(cfg, images, tmp_path / "o", name=name, require=require)
    out = {s: read_conversations(tmp_path / "o" / f"{s}.parquet") for s in ("train", "val", "test")}
    return out, summary


def test_rows_that_share_an_image_stay_in_one_split(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for k in range(40):
        (img / f"{k}.png").write_bytes(png((k * 6, 255 - k * 6, k)))
    (img / "copy-of-0.png").write_bytes((img / "0.png").read_bytes())  # same picture, new name
    rows = [
        {"image": f"img/{k}.png", "instruction": f"question {q}", "response": "a"}
        for k in range(40)
        for q in range(5)
    ]
    rows.append({"image": "img/copy-of-0.png", "instruction": "again", "response": "a"})
    # A row with two images joins their groups.
    rows.append({"image": ["img/1.png", "img/2.png"], "instruction": "both", "response": "a"})
    out, summary = split_stage(tmp_path, rows, {"val": 0.2, "test": 0.3})
    where: dict[str, set] = {}
    for s, got in out.items():
        for r in got:
            for path in r["images"]:
                key = (img / "0.png") if path.endswith("copy-of-0.png") else path
                where.setdefault(str(key), set()).add(s)
    assert len(where) == 40 and all(len(v) == 1 for v in where.values()), where
    assert where[str(img / "1.png")] == where[str(img / "2.png")]
    assert summary["split_groups"] == 39  # 40 pictures, two of them joined by a row
    assert all(summary["splits"][s] > 0 for s in ("train", "val", "test"))


def test_rows_with_the_same_group_column_value_stay_in_one_split(tmp_path):
    (tmp_path / "a.png").write_bytes(RED)
    rows = [
        {"image": "a.png", "instruction": f"q{i}", "response": "a", "patient": f"p{i % 10}"}
        for i in range(100)
    ]
    split = {"val": 0.2, "test": 0.3, "group_by": "column", "group_column": "patient"}
    out, summary = split_stage(tmp_path, rows, split)
    by_patient: dict[str, set] = {}
    for s, got in out.items():
        for r in got:
            q = int(r["messages"][0]["content"][-1]["text"][1:])
            by_patient.setdefault(f"p{q % 10}", set()).add(s)
    assert len(by_patient) == 10 and all(len(v) == 1 for v in by_patient.values())
    assert summary["split_groups"] == 10
    with pytest.raises(Exception, match="group_column"):
        resolve_dataset({"sources": [{"path": "x.jsonl"}], "split": {"group_by": "column"}})


def test_an_empty_split_fails_at_format_conversations_naming_the_key(tmp_path):
    """Six rows on one image are one group: one split gets them all, the other is empty. That
    is an error now (naming the numbers and the key), not after training."""
    (tmp_path / "a.png").write_bytes(RED)
    rows = [{"image": "a.png", "instruction": f"q{i}", "response": "a"} for i in range(6)]
    with pytest.raises(DataError) as e:
        split_stage(tmp_path, rows, {"val": 0.05, "test": 0.1}, require=("train", "test"))
    msg = str(e.value)
    assert "split is empty: 6 rows accepted" in msg and "1 groups" in msg
    assert "datasets.d.split." in msg
    assert not (tmp_path / "o" / "train.parquet").exists()
    assert not list((tmp_path / "o").glob("*.parquet.tmp-*"))


def test_openai_weight_0_answers_are_context_and_not_trained_on(folder, tiny_qwen):
    """OpenAI's chat fine-tuning format: `weight: 0` on an assistant message keeps it as
    context without training on it; the row's other answers are trained on. Other weights, a
    weight on a user turn, and a row whose every answer has weight 0 are quarantined."""
    from transformers import AutoProcessor

    from vlmflow.collate import IGNORE_INDEX, Encoder
    from vlmflow.families import FAMILIES

    def chat(w1, w2=None, user_weight=None):
        tag = f"{w1}-{w2}-{user_weight}"  # a different question each (the id is the prompt's)
        first_user = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "img/red.png"}},
                {"type": "text", "text": f"Colour? ({tag})"},
            ],
        }
        if user_weight is not None:
            first_user["weight"] = user_weight
        second = {"role": "assistant", "content": "red, certainly"}
        if w2 is not None:
            second["weight"] = w2
        return {
            "messages": [
                {"role": "system", "content": "Be brief."},
                first_user,
                {"role": "assistant", "content": "blue", "weight": w1},
                {"role": "user", "content": "Look again."},
                second,
            ]
        }

    rows = [chat(0), chat(0, 1), chat(1, 1), chat(0.5), chat(0, 0), chat(0, user_weight=1)]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "w.jsonl", rows), "format": "messages"}]
    )
    assert kinds(rejected) == [
        (4, "unsupported_field"),
        (5, "no_trained_turn"),
        (6, "unsupported_field"),
    ]
    assert "weight 0.5" in rejected[0]["reason"] and "(user)" in rejected[2]["reason"]
    assert len(ok) == 3
    by_flags = sorted(
        str(tuple(m["train"] for m in r["messages"] if m["role"] == "assistant")) for r in ok
    )
    assert by_flags == ["(False, None)", "(False, None)", "(None, None)"]

    proc = AutoProcessor.from_pretrained(tiny_qwen)
    fam = FAMILIES["qwen2_5_vl"]
    tok = proc.tokenizer
    for responses_only in (True, False):
        enc = Encoder(proc, fam, max_seq_length=512, train_on_responses_only=responses_only)
        for r in ok:
            out = enc(r)
            trained = tok.decode(out["labels"][out["labels"] != IGNORE_INDEX])
            context = r["messages"][2].get("train") is False
            assert "red, certainly" in trained
            assert ("blue" in trained) is not context, (responses_only, trained)
            if not responses_only:
                assert "Look again." in trained  # the rest of the sequence is still trained on


def test_a_conversation_file_read_as_seed_names_the_format_to_set(folder):
    """Qwen-VL's fine-tuning files (`image` + ShareGPT `conversations`) and other conversation
    layouts, read with the default format: the error says which format to set."""
    rows = [
        {
            "image": "img/red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "red"},
            ],
        }
    ]
    for columns, fmt in (
        (rows, "sharegpt"),
        ([{"messages": rows[0]["conversations"]}], "messages"),
        ([{"prompt": [], "completion": []}], "messages"),
    ):
        path = jsonl(folder / "c.jsonl", columns)
        with pytest.raises(DataError, match=f"set format: {fmt}"):
            stage(folder, [{"path": path}])
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "q.jsonl", rows), "format": "sharegpt"}]
    )
    assert not rejected and roles_and_parts(ok[0]) == [
        ("user", ["<0>", "\nColour?"]),
        ("assistant", ["red"]),
    ]


def test_metadata_keys_are_read_past_and_other_keys_still_quarantine(folder):
    """Turn and part keys that hold metadata (a `turn_id`, a part's `lang`) quarantine the row
    unless the source lists them in `metadata_keys`; then the conversation is the same as
    without them. Content keys cannot be declared metadata."""
    row = {
        "messages": [
            {
                "role": "user",
                "turn_id": 1,
                "content": [{"type": "image"}, {"type": "text", "text": "Colour?", "lang": "en"}],
            },
            {"role": "assistant", "turn_id": 2, "content": "red"},
        ],
        "images": ["img/red.png"],
    }
    plain = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
            {"role": "assistant", "content": "green"},
        ],
        "images": ["img/green.png"],
    }
    path = jsonl(folder / "m.jsonl", [row, plain])
    _, rejected, _ = stage(folder, [{"path": path, "format": "messages"}])
    assert kinds(rejected) == [(1, "unsupported_field")]
    assert "'turn_id'" in rejected[0]["reason"] and "metadata_keys" in rejected[0]["reason"]
    _, rejected, _ = stage(
        folder, [{"path": path, "format": "messages", "metadata_keys": ["turn_id"]}]
    )
    assert "'lang'" in rejected[0]["reason"]  # the part's key is still not declared
    ok, rejected, _ = stage(
        folder, [{"path": path, "format": "messages", "metadata_keys": ["turn_id", "lang"]}]
    )
    assert not rejected and len(ok) == 2
    first = next(r for r in ok if colours(r) == [(255, 0, 0)])
    assert roles_and_parts(first) == [("user", ["<0>", "Colour?"]), ("assistant", ["red"])]
    with pytest.raises(DataError, match=r"metadata_keys \['text'\]"):
        stage(folder, [{"path": path, "format": "messages", "metadata_keys": ["text"]}])


def test_qwen_resize_hints_are_kept_per_image_and_bad_ones_quarantined(folder):
    """Qwen-VL's image parts with `resized_height` / `resized_width` or `min_pixels` /
    `max_pixels` (qwen-vl-utils' fetch_image): the hint stays with its image part in the
    canonical schema (the Encoder and the token budget apply it); a malformed hint is
    quarantined with its reason, and a hint on a text part is not converted."""

    def row(question, **hint):
        return {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "img/red.png", **hint},
                        {"type": "text", "text": question},
                    ],
                },
                {"role": "assistant", "content": "red"},
            ]
        }

    rows = [
        row("a", resized_height=280, resized_width=420),
        row("b", min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28),
        row("c"),
        row("d", resized_height=280),
        row("e", resized_height=-1, resized_width=28),
        row("f", resized_height=28, resized_width=28, max_pixels=100),
        row("g", min_pixels=10, max_pixels=5),
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "h", "max_pixels": 9}]},
                {"role": "assistant", "content": "x"},
            ]
        },
    ]
    ok, rejected, _ = stage(
        folder, [{"path": jsonl(folder / "q.jsonl", rows), "format": "messages"}]
    )
    assert kinds(rejected) == [
        (4, "bad_field"),
        (5, "bad_field"),
        (6, "bad_field"),
        (7, "bad_field"),
        (8, "unsupported_field"),
    ]
    assert "only one of resized_height" in rejected[0]["reason"]
    hints = {
        r["messages"][0]["content"][1]["text"]: r["messages"][0]["content"][0]["resize"] for r in ok
    }
    assert hints["a"] == {
        "resized_height": 280,
        "resized_width": 420,
        "min_pixels": None,
        "max_pixels": None,
    }
    assert hints["b"]["max_pixels"] == 1280 * 28 * 28 and hints["b"]["resized_height"] is None
    assert hints["c"] is None
