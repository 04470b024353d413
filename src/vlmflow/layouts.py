"""Rows → samples: canonical messages plus the image references they use.

Two independent choices describe a source: its file type, detected from `path` and read by
`vlmflow.readers`, and its row layout, `format:` in the config (this module):

  - `seed`: one sample per row with `image`, `instruction`, `response` (names mappable). `image`
    may be a list (multi-image; a JSON list string in CSV); `instruction`/`response` may be
    equal-length lists (multi-turn).
  - `messages`: chat messages with typed parts, `{"type": "image", "image": ...}` /
    `{"type": "text", "text": ...}` (also OpenAI `image_url` parts and string contents). An image
    part without a value takes the next entry of the row's `images` column (TRL/HF style).
  - `sharegpt`: `conversations` or `messages` with `from`/`value` or `role`/`content`, `<image>`
    placeholders in the text and an `images` list (LLaMA-Factory; LLaVA's single `image` too).

An image value may be a path relative to the source's image root, a `file://` URI (a path:
Qwen-VL's format), an http(s) URL, a `data:image/...;base64,` URI, raw bytes, or a dict
`{bytes, path}` (HF datasets), `{url}`, `{path}` or `{base64}`.

Row problems never raise: they come back as `RowError(row, reason, raw)` with reason
`kind: details`; file problems (unreadable file, missing column) raise `DataError` naming the
file, line and column.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .image_refs import ImageRef
from .readers import Reader, RowError, has_surrogates

PLACEHOLDER = "<image>"
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}
FORMATS = ("seed", "messages", "sharegpt")
DEFAULT_COLUMNS = {
    "id": None,
    "image": "image",
    "instruction": "instruction",
    "input": "input",
    "response": "response",
    "system": "system",
    "messages": None,
    "images": None,
}
# LLaMA-Factory's `tags` of dataset_info.json: which keys and values a conversation's turns use.
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "observation_tag",
    "function_tag",
)
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
# Row columns holding content that no layout converts: a row where one is filled is quarantined
# (never trained on without it). kind of the reason, what it holds.
UNSUPPORTED_COLUMNS = {
    "videos": ("video_unsupported", "video"),
    "video": ("video_unsupported", "video"),
    "audios": ("audio_unsupported", "audio"),
    "audio": ("audio_unsupported", "audio"),
    "tools": ("unsupported_field", "tool definitions"),
    "functions": ("unsupported_field", "tool definitions"),
    "history": ("unsupported_field", "earlier turns (LLaMA-Factory alpaca `history`)"),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PEEK_ROWS = 1000


class RowProblem(ValueError):
    """A row that cannot be used; the message is its reason ('kind: details')."""


@dataclass
class Source:
    path: str
    image_root: str | None = None
    name: str | None = None
    format: str = "seed"
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    """LLaMA-Factory role tags (TAG_KEYS): the keys and role values of the turns."""
    instruction: str | None = None
    """`seed`: the instruction of every row, instead of an instruction column (image + answer
    data: captions, OCR)."""
    metadata_keys: list = field(default_factory=list)
    """Keys of turns and parts that hold metadata, not content (`turn_id`, `timestamp`): read
    past. Any other key the converter does not read, holding a value, quarantines the row."""
    hash_embedded: bool = field(default=True, repr=False)
    """False: embedded images are neither decoded nor hashed (job-graph time listing)."""
    default_label: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise DataError(f"{self.path}: unknown format '{self.format}' (one of {FORMATS})")
        unknown = set(self.columns) - set(DEFAULT_COLUMNS)
        if unknown:
            raise DataError(f"{self.path}: unknown column keys {sorted(unknown)}")
        self.columns = {**DEFAULT_COLUMNS, **{k: v for k, v in self.columns.items()}}
        unknown = set(self.tags or {}) - set(TAG_KEYS)
        if unknown:
            raise DataError(f"{self.path}: unknown tags keys {sorted(unknown)} (known: {TAG_KEYS})")
        self.tags = {k: (self.tags or {}).get(k) for k in TAG_KEYS}
        self.metadata_keys = list(self.metadata_keys or ())
        content = _TURN_KEYS | _PART_KEYS | {*_WEIGHT_KEYS, *RESIZE_KEYS, "index"}
        taken = sorted(set(self.metadata_keys) & content)
        if taken:
            raise DataError(
                f"{self.path}: metadata_keys {taken} are keys the converter reads as content "
                "(or loss weights); list only keys that hold metadata"
            )
        if self.instruction is not None and self.format != "seed":
            raise DataError(
                f"{self.path}: 'instruction' (one instruction for every row) is for format "
                f"'seed', not '{self.format}', whose rows hold their own turns"
            )

    @property
    def label(self) -> str:
        return self.name or self.default_label or Path(self.path).stem

    @property
    def root(self) -> str:
        """Folder that relative image paths start from (default: the data file's folder)."""
        if self.image_root is not None:
            return self.image_root
        p = Path(self.path)
        return str(p if p.is_dir() else p.parent)


@dataclass
class Sample:
    row: int
    raw: dict
    messages: list[dict]
    """Canonical messages; an image part's `image` is the index (as a string) into `images`."""
    images: list[ImageRef]
    payloads: dict[str, bytes] = field(default_factory=dict)
    """sha256 → bytes of embedded images (written to the blob store by validate_images)."""
    id: str | None = None


# ---------------------------------------------------------------------------------------------
# Values.


def text_value(rec: dict, col: str, *, required: bool = True) -> str:
    if col not in rec or rec[col] is None:
        if required:
            raise RowProblem(f"missing_field: no '{col}'")
        return ""
    return _as_text(rec[col], f"'{col}'")


def _as_text(v, where: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise RowProblem(f"bad_field: {where} is a {type(v).__name__}, expected text")


def image_ref(value, source: Source, where: str) -> tuple[ImageRef, bytes | None]:
    """One image value → (reference, embedded bytes or None)."""
    if not source.hash_embedded and not isinstance(value, str | dict):
        return ImageRef("bytes", "", ""), None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return ImageRef("bytes", "", hashlib.sha256(data).hexdigest()), data
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            b = value["bytes"]
            if not source.hash_embedded:
                return ImageRef("bytes", "", ""), None
            if isinstance(b, str):
                return _b64(b, where)
            return image_ref(b, source, where)
        for key in ("path", "url", "image", "image_url"):
            if value.get(key) not in (None, ""):
                inner = value[key]
                if key == "image_url" and isinstance(inner, dict):
                    inner = inner.get("url")
                return image_ref(inner, source, where)
        if value.get("base64"):
            if not source.hash_embedded:
                return ImageRef("bytes", "", ""), None
            return _b64(value["base64"], where)
        raise RowProblem(f"bad_image_ref: {where} has none of bytes/path/url/base64")
    if not isinstance(value, str):
        raise RowProblem(f"bad_image_ref: {where} is a {type(value).__name__}")
    value = value.strip()
    if not value:
        raise RowProblem(f"bad_image_ref: {where} is empty")
    if value.startswith("data:"):
        head, _, payload = value.partition(",")
        if ";base64" not in head:
            raise RowProblem(f"bad_image_ref: {where}: data URI is not base64")
        if not source.hash_embedded:
            return ImageRef("bytes", "", ""), None
        return _b64(payload, where)
    m = _SCHEME.match(value)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file":  # Qwen-VL's local images (`file:///data/x.jpg`): a path like any
            return ImageRef("path", source.root, _file_uri_path(value, where)), None
        if scheme not in ("http", "https"):
            raise RowProblem(
                f"bad_image_ref: {where}: URL scheme '{scheme}' is not allowed (http, https, file)"
            )
        return ImageRef("url", "", value), None
    return ImageRef("path", source.root, value), None


def _file_uri_path(uri: str, where: str) -> str:
    """The local path of a `file://` URI (RFC 8089: `file:///abs/path` or
    `file://localhost/abs/path`, percent-escapes decoded). It then follows the rules of any
    path: inside the image root, no `..`."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise RowProblem(
            f"bad_image_ref: {where}: file URI of another host '{parts.netloc}' ({uri})"
        )
    if parts.query or parts.fragment or not parts.path:
        raise RowProblem(f"bad_image_ref: {where}: not a plain file URI: {uri}")
    return unquote(parts.path)


def _b64(text: str, where: str) -> tuple[ImageRef, bytes]:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowProblem(f"bad_image_ref: {where}: invalid base64 ({e})") from None
    return ImageRef("bytes", "", hashlib.sha256(data).hexdigest()), data


def image_list(value, source: Source, where: str, *, csv_cell: bool = False) -> list:
    """A column holding zero, one or several images → list of (ref, payload)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if csv_cell and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowProblem(f"bad_field: {where} starts with '[' but is not a JSON list") from None
    if isinstance(value, (list, tuple)):
        return [image_ref(v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    return [image_ref(value, source, where)]


def split_placeholders(text: str) -> list[str | None]:
    """Text → pieces, None marking each `<image>` placeholder (empty text pieces dropped)."""
    out: list[str | None] = []
    for i, piece in enumerate(text.split(PLACEHOLDER)):
        if i:
            out.append(None)
        if piece.strip():
            out.append(piece)
    return out


def text_part(text: str) -> dict:
    return {"type": "text", "text": text, "image": None}


def image_part(index: int) -> dict:
    return {"type": "image", "text": "", "image": str(index)}


class _Images:
    """Collects a sample's images in order of their parts."""

    def __init__(self):
        self.refs: list[ImageRef] = []
        self.payloads: dict[str, bytes] = {}

    def add(self, ref_payload) -> dict:
        ref, payload = ref_payload
        if payload is not None:
            self.payloads[ref.value] = payload
        self.refs.append(ref)
        return image_part(len(self.refs) - 1)


def _role(value, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in ROLES:
        raise RowProblem(
            f"unknown_role: {where} has role {value!r} (known: {', '.join(sorted(ROLES))})"
        )
    return ROLES[value.lower()]


# ---------------------------------------------------------------------------------------------
# Layouts.


def parse_seed(rec: dict, source: Source, csv_cells: bool) -> tuple[list[dict], _Images]:
    c = source.columns
    images = image_list(rec.get(c["image"]), source, f"'{c['image']}'", csv_cell=csv_cells)
    fixed = source.instruction  # one instruction for every row, instead of a column
    instr = rec.get(c["instruction"]) if fixed is None else fixed
    resp = rec.get(c["response"])
    if isinstance(instr, (list, tuple)) or isinstance(resp, (list, tuple)):
        if not (isinstance(instr, (list, tuple)) and isinstance(resp, (list, tuple))):
            raise RowProblem("bad_field: instruction and response must both be lists for turns")
        if len(instr) != len(resp):
            raise RowProblem(f"turn_mismatch: {len(instr)} instructions but {len(resp)} responses")
        turns = [
            (_as_text(i, f"'{c['instruction']}'[{n}]"), _as_text(r, f"'{c['response']}'[{n}]"))
            for n, (i, r) in enumerate(zip(instr, resp))
        ]
        if c["input"] and _filled(rec.get(c["input"])):
            raise RowProblem(
                f"unsupported_field: '{c['input']}' is set on a row whose turns are lists (which "
                "turn it belongs to is not known)"
            )
    else:
        user = text_value(rec, c["instruction"], required=False) if fixed is None else fixed
        if c["input"]:
            # Alpaca convention: the input follows the instruction (joined as LLaMA-Factory does).
            extra = text_value(rec, c["input"], required=False)
            if extra.strip():
                user = f"{user}\n{extra}" if user.strip() else extra
        turns = [(user, text_value(rec, c["response"], required=False))]
    messages = []
    if c["system"]:
        system = text_value(rec, c["system"], required=False)
        if system.strip():
            messages.append({"role": "system", "content": [text_part(system)]})
    imgs = _Images()
    placeholders = sum(t.count(PLACEHOLDER) for t, _ in turns)
    if placeholders and placeholders != len(images):
        raise RowProblem(
            f"image_count_mismatch: {placeholders} {PLACEHOLDER} placeholders but "
            f"{len(images)} images"
        )
    queue = iter(images)
    for n, (user, answer) in enumerate(turns):
        if placeholders:
            parts = [
                text_part(p) if p is not None else imgs.add(next(queue))
                for p in split_placeholders(user)
            ]
        else:
            parts = [imgs.add(x) for x in images] if n == 0 else []
            if user:
                parts.append(text_part(user))
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": [text_part(answer)]})
    return messages, imgs


# TRL's conversational prompt-completion rows (trl-lib/llava-instruct-mix): the conversation is
# the `prompt` messages followed by the `completion` messages
PROMPT_COMPLETION = "prompt+completion"


_TURN_KEYS = {"role", "content", "from", "value"}


def _messages_column(rec_keys, source: Source, fmt: str) -> str:
    """The configured conversation column, else `messages` / `conversations` (whichever the
    row or file has; per row, so that files mixing both work), else the Cauldron's `texts`."""
    col = source.columns["messages"]
    if col:
        return col
    order = ("messages", "conversations") if fmt == "messages" else ("conversations", "messages")
    order += ("texts",)
    for name in order:
        if name in rec_keys:
            return name
    if {"prompt", "completion"} <= set(rec_keys):
        return PROMPT_COMPLETION
    return order[0]


def _images_column(rec: dict, source: Source) -> str | None:
    col = source.columns["images"]
    if col:
        return col
    for name in ("images", "image"):
        if name in rec:
            return name
    return None


def _load_turns(rec: dict, col: str) -> list:
    if col == PROMPT_COMPLETION:
        return _load_turns(rec, "prompt") + _load_turns(rec, "completion")
    turns = rec.get(col)
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise RowProblem(f"bad_field: '{col}' is a string but not JSON ({e.msg})") from None
    if turns is None:
        raise RowProblem(f"missing_field: no '{col}'")
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, dict) for t in turns):
        raise RowProblem(f"bad_field: '{col}' must be a list of message objects")
    return _expand_pairs(list(turns), col)


# The Cauldron's / Docmatix's exchange objects also name the dataset they come from: metadata
_PAIR_METADATA = ("source",)


def _expand_pairs(turns: list[dict], col: str) -> list[dict]:
    """Exchanges written as one {"user": ..., "assistant": ...} object each (the `texts` of
    HuggingFaceM4/the_cauldron and Docmatix) become a user and an assistant turn; other turns
    are left as they are."""
    out = []
    for i, t in enumerate(turns):
        if not ("user" in t and "assistant" in t) or _TURN_KEYS & t.keys():
            out.append(t)
            continue
        extra = [k for k, v in t.items() if k not in ("user", "assistant", *_PAIR_METADATA)]
        extra = [k for k in extra if _filled(t[k])]
        if extra:
            raise RowProblem(f"unsupported_field: {col}[{i}] has {extra}, which is not converted")
        out += [
            {"role": "user", "content": t["user"]},
            {"role": "assistant", "content": t["assistant"]},
        ]
    return out


_WEIGHT_KEYS = ("loss_weight", "weight")


def _turn_fields(
    turn: dict, i: int, col: str, tags: dict | None = None, metadata=()
) -> tuple[str, object, bool]:
    """(canonical role, content, trained) of one turn. `tags` (LLaMA-Factory's role tags) name
    the role and content keys and the role values; a key the converter does not use, holding a
    value, quarantines the row (e.g. `tool_calls`). A loss weight (OpenAI's `weight`) of 0 on an
    assistant turn makes it context that is not trained on (`trained` False); 1 there, and 0
    on any other turn, is what training does anyway; any other weight quarantines the row."""
    tags = tags or {}
    where = f"{col}[{i}]"
    role_key, content_key = tags.get("role_tag"), tags.get("content_tag")
    if role_key or content_key:
        role_key = role_key or ("from" if content_key == "value" else "role")
        content_key = content_key or ("value" if role_key == "from" else "content")
        if role_key not in turn:
            raise RowProblem(f"bad_field: {where} has no '{role_key}' (tags.role_tag)")
    elif "role" in turn or "content" in turn:
        role_key, content_key = "role", "content"
    elif "from" in turn or "value" in turn:
        role_key, content_key = "from", "value"
    else:
        raise RowProblem(f"bad_field: {where} has neither role/content nor from/value")
    value = turn.get(role_key)
    by_tag = {tags.get("user_tag"): "user", tags.get("assistant_tag"): "assistant"}
    by_tag[tags.get("system_tag")] = "system"
    by_tag.pop(None, None)
    if value in (tags.get("observation_tag"), tags.get("function_tag")) and value is not None:
        raise RowProblem(
            f"unsupported_role: {where} has role {value!r}, a tool call or tool output "
            "(tool use is not converted)"
        )
    role = by_tag[value] if value in by_tag else _role(value, where)
    trained = True
    for key, v in turn.items():
        if key in (role_key, content_key) or key in metadata or not _filled(v):
            continue
        if key in _WEIGHT_KEYS:
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if number and float(v) == (1.0 if role == "assistant" else 0.0):
                continue  # what training does anyway: the loss is on the answers only
            if number and float(v) == 0.0 and role == "assistant":
                trained = False  # OpenAI's weight 0: an answer kept as context only
                continue
            raise RowProblem(
                f"unsupported_field: {where} ({role}) has {key} {v!r}: a loss weight is 0 or 1 "
                "on an assistant turn (trained on or not) and 0 on any other turn"
            )
        if key in _TURN_KEYS:
            if key in ("content", "value") and v == turn.get(content_key):
                continue  # the same content under both spellings
            raise RowProblem(
                f"bad_field: {where} has both '{content_key}' and '{key}' (tags.role_tag / "
                "tags.content_tag say which keys to read)"
            )
        raise RowProblem(
            f"unsupported_field: {where} has '{key}', which is not converted (if it is "
            "metadata, list it in the source's metadata_keys)"
        )
    return role, turn.get(content_key), trained


def _filled(v) -> bool:
    """Whether a value holds something (None, '', [] and {} do not)."""
    return v is not None and not (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def parse_messages(rec: dict, source: Source, fmt: str, msg_col: str) -> tuple[list[dict], _Images]:
    """`messages` (typed parts) and `sharegpt` (<image> placeholders) layouts."""
    turns = _load_turns(rec, msg_col)
    img_col = _images_column(rec, source)
    listed = image_list(rec.get(img_col), source, f"'{img_col}'") if img_col is not None else []
    # Parts are first collected as text parts, ("ref", (ref, payload)) for inline images, or
    # None for a slot that takes the next image of the `images` column; indices are assigned
    # afterwards in reading order (the order the processor matches images to image tokens).
    staged: list[tuple[str, list]] = []
    system = ""
    if source.columns["system"] and source.columns["system"] != msg_col:
        system = text_value(rec, source.columns["system"], required=False)
        if system.strip():
            staged.append(("system", [text_part(system)]))
    untrained = set()  # indices into `staged` of assistant turns with loss weight 0
    hints: dict[tuple[int, int], dict] = {}  # (staged, part) -> an image part's resize hint
    for i, turn in enumerate(turns):
        role, content, trained = _turn_fields(turn, i, msg_col, source.tags, source.metadata_keys)
        if role == "system" and system.strip():
            if content == system:
                continue  # the same prompt twice (a field and a message): once
            raise RowProblem(
                f"conflicting_system: the row's '{source.columns['system']}' field and "
                f"{msg_col}[{i}] are two different system prompts"
            )
        where = f"{msg_col}[{i}]"
        parts: list = []
        if content is None:
            content = ""
        if isinstance(content, str):
            parts += [text_part(p) if p is not None else None for p in split_placeholders(content)]
        elif fmt == "messages" and isinstance(content, (list, tuple)):
            for j, p in enumerate(content):
                parts.append(_typed_part(p, source, f"{where}.content[{j}]"))
                hint = resize_hint(p, f"{where}.content[{j}]") if isinstance(p, dict) else None
                if hint is not None:  # an image part's (a text part's would be unsupported)
                    hints[len(staged), len(parts) - 1] = hint
        else:
            raise RowProblem(f"bad_field: {where} content is a {type(content).__name__}")
        if not trained:
            untrained.add(len(staged))
        staged.append((role, parts))
    slots = sum(p is None for _, parts in staged for p in parts)
    inline = any(isinstance(p, tuple) for _, parts in staged for p in parts)
    first_user = next((k for k, (role, _) in enumerate(staged) if role == "user"), None)
    if listed and not slots and not inline and first_user is not None:
        # No placeholder and no image part anywhere (LLaMA-Factory's current mllm_demo.json,
        # TRL's image-less messages): the images open the first user turn, where TRL's
        # prepare_multimodal_messages and LLaMA-Factory's chat engines put them, and where the
        # seed format puts them without placeholders.
        staged[first_user] = ("user", [None] * len(listed) + staged[first_user][1])
        slots = len(listed)
    indexed = [
        p[1] for _, parts in staged for p in parts if isinstance(p, tuple) and p[0] == "index"
    ]
    if indexed:
        _check_indexed(indexed, slots, len(listed), img_col or "images")
    elif slots != len(listed):
        what = f"{PLACEHOLDER} placeholders" if fmt == "sharegpt" else "image parts without a value"
        raise RowProblem(
            f"image_count_mismatch: {slots} {what} but {len(listed)} images in "
            f"'{img_col or 'images'}'"
        )
    queue = iter(listed)
    imgs = _Images()
    messages = []
    for k, (role, parts) in enumerate(staged):
        content = []
        for j, p in enumerate(parts):
            if p is None:
                content.append(imgs.add(next(queue)))
            elif isinstance(p, tuple):
                content.append(imgs.add(listed[p[1]] if p[0] == "index" else p[1]))
            else:
                content.append(p)
            if (k, j) in hints:
                content[-1]["resize"] = hints[k, j]
        messages.append({"role": role, "content": content})
        if k in untrained:
            messages[-1]["train"] = False
    return messages, imgs


def _check_indexed(indexed: list[int], slots: int, n_images: int, img_col: str) -> None:
    """Image parts that name their entry of the `images` column by `index` (Hugging Face
    datasets' parts, e.g. llava-instruct-mix-vsft): all value-less image parts have one, each
    is in range, and every image is used (an unused one would be content dropped)."""
    if slots:
        raise RowProblem(
            f"bad_field: {len(indexed)} image parts have an 'index' into '{img_col}' and "
            f"{slots} have neither an index nor a value"
        )
    over = [i for i in indexed if i >= n_images]
    if over:
        raise RowProblem(
            f"image_count_mismatch: an image part has index {over[0]} but '{img_col}' holds "
            f"{n_images} images"
        )
    unused = sorted(set(range(n_images)) - set(indexed))
    if unused:
        raise RowProblem(
            f"image_count_mismatch: images {unused} of '{img_col}' are in no image part"
        )


_VALUE_KEYS = ("image", "image_url", "url", "path", "bytes", "value")
_PART_KEYS = {"type", "text", "base64", *_VALUE_KEYS}
# Qwen-VL's per-image resize hints (qwen-vl-utils' fetch_image): an exact size, or pixel bounds
RESIZE_KEYS = ("resized_height", "resized_width", "min_pixels", "max_pixels")


def resize_hint(p: dict, where: str) -> dict | None:
    """The resize hint of an image part ({resized_height, resized_width, min_pixels,
    max_pixels}, unset ones None), or None when it has none. Each value is a positive integer;
    `resized_height` and `resized_width` come together and exclude the pixel bounds."""
    hint = {k: p.get(k) for k in RESIZE_KEYS}
    if all(v is None for v in hint.values()):
        return None
    for k, v in hint.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise RowProblem(f"bad_field: {where} has {k} {v!r} (a positive number of pixels)")
    exact = [hint["resized_height"] is not None, hint["resized_width"] is not None]
    if any(exact) and not all(exact):
        raise RowProblem(f"bad_field: {where} has only one of resized_height / resized_width")
    if all(exact) and (hint["min_pixels"] or hint["max_pixels"]):
        raise RowProblem(f"bad_field: {where} has both a resized size and pixel bounds")
    if hint["min_pixels"] and hint["max_pixels"] and hint["min_pixels"] > hint["max_pixels"]:
        raise RowProblem(f"bad_field: {where} has min_pixels > max_pixels")
    return hint


_VIDEO_TYPES = ("video", "video_url", "input_video")


def _typed_part(p, source: Source, where: str):
    """One typed part: a text part, None (an image taking the next `images` entry), ("index",
    i) (an image naming its `images` entry, as Hugging Face datasets' parts do), or ("ref",
    (ref, payload)). The payload may be under its type's key, `value` (LLaMA-Factory's typed
    parts) or the OpenAI keys; anything else that holds a value quarantines the row."""
    if isinstance(p, str):
        return text_part(p)
    if not isinstance(p, dict):
        raise RowProblem(f"bad_field: {where} is a {type(p).__name__}")
    kind = p.get("type") or ("text" if _filled(p.get("text")) else "image")
    if kind in _VIDEO_TYPES:
        raise RowProblem(
            f"video_unsupported: {where} is a {kind} part (video training is not supported yet)"
        )
    if kind not in ("text", "image", "image_url"):
        raise RowProblem(f"unsupported_part: {where} has type {kind!r} (text and image only)")
    index = p.get("index") if kind != "text" else None  # HF datasets: an index into `images`
    extra = [k for k, v in p.items() if k not in _PART_KEYS and _filled(v)]
    extra = [k for k in extra if not (k == "index" and index is not None)]
    extra = [k for k in extra if k not in source.metadata_keys]
    if kind != "text":
        extra = [k for k in extra if k not in RESIZE_KEYS]  # read by resize_hint
    if extra:
        raise RowProblem(
            f"unsupported_field: {where} has {extra}, which is not converted (if it is "
            "metadata, list it in the source's metadata_keys)"
        )
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise RowProblem(f"bad_field: {where} has index {index!r} (an image's position in images)")
    if kind == "text":
        held = [k for k in ("text", "value") if _filled(p.get(k))]
        if len(held) > 1 and p["text"] != p["value"]:
            raise RowProblem(f"bad_field: {where} has both 'text' and 'value'")
        stray = [k for k in _VALUE_KEYS if k != "value" and _filled(p.get(k))]
        if stray:
            raise RowProblem(f"bad_field: text part {where} also holds {stray}")
        return text_part(_as_text(p[held[0]], where) if held else "")
    if _filled(p.get("text")):
        raise RowProblem(f"bad_field: image part {where} also holds text")
    held = [p[k] for k in _VALUE_KEYS if p.get(k) not in (None, "")]
    if any(v != held[0] for v in held[1:]):
        raise RowProblem(f"bad_field: image part {where} holds several different images")
    value = held[0] if held else None
    if value is None and p.get("base64"):
        value = {"base64": p["base64"]}
    if value is not None and index is not None:
        raise RowProblem(f"bad_field: image part {where} holds an image and an index")
    if value is None:
        return None if index is None else ("index", index)
    return ("ref", image_ref(value, source, where))


def check_supported(rec: dict, source: Source) -> None:
    """Raise RowProblem when a row holds content no layout converts (videos, audio, tools):
    such a row is quarantined, never trained on without that content."""
    mapped = {v for v in source.columns.values() if v}
    for col, (kind, what) in UNSUPPORTED_COLUMNS.items():
        if col in rec and col not in mapped and _filled(rec[col]):
            extra = " (video training is not supported yet)" if kind == "video_unsupported" else ""
            raise RowProblem(f"{kind}: column '{col}' holds {what}, which is not converted{extra}")


def check_placeholders(messages: list[dict]) -> None:
    """`<video>` / `<audio>` left in the text: media the row refers to but does not train on."""
    for i, m in enumerate(messages):
        for p in m["content"]:
            if p["type"] != "text":
                continue
            if VIDEO_PLACEHOLDER in p["text"]:
                raise RowProblem(
                    f"video_unsupported: message {i} ({m['role']}) holds a {VIDEO_PLACEHOLDER} "
                    "placeholder (video training is not supported yet)"
                )
            if AUDIO_PLACEHOLDER in p["text"]:
                raise RowProblem(
                    f"audio_unsupported: message {i} ({m['role']}) holds an {AUDIO_PLACEHOLDER} "
                    "placeholder (audio is not converted)"
                )


# ms-swift's grounding rows: these placeholders in the text are filled from the `objects` column
GROUNDING_PLACEHOLDERS = ("<ref-object>", "<bbox>")


def check_grounding(rec: dict, messages: list[dict]) -> None:
    """A row whose text holds ms-swift's `<ref-object>` / `<bbox>` placeholders and that has the
    `objects` they are filled from: the converter does not fill them, so the row would train on
    the bare placeholders. (The same strings without an `objects` column are plain text.)"""
    if not _filled(rec.get("objects")):
        return
    for i, m in enumerate(messages):
        for p in m["content"]:
            held = [g for g in GROUNDING_PLACEHOLDERS if p["type"] == "text" and g in p["text"]]
            if held:
                raise RowProblem(
                    f"unsupported_field: message {i} ({m['role']}) holds {held[0]}, which "
                    "ms-swift fills from the row's 'objects' (grounding is not converted)"
                )


# ---------------------------------------------------------------------------------------------
# Checks shared by every layout.


def check_messages(messages: list[dict], n_images: int) -> None:
    """Raise RowProblem when a conversation cannot be trained on (one pass over the parts)."""
    seen_assistant = False
    prompt = False
    next_image = 0
    for i, m in enumerate(messages):
        role = m["role"]
        assistant = role == "assistant"
        answer = ""
        for p in m["content"]:
            if p["type"] == "image":
                if assistant:
                    raise RowProblem(f"image_in_answer: message {i} (assistant) holds an image")
                if p["image"] != str(next_image):
                    raise RowProblem("image_count_mismatch: image parts out of order")
                next_image += 1
                continue
            t = p["text"]
            if not t.isascii() and has_surrogates(t):
                raise RowProblem(
                    f"invalid_utf8: message {i} ({role}) holds text that is not valid Unicode "
                    "(lone surrogate)"
                )
            if assistant:
                answer += t
        if assistant:
            if not seen_assistant and not prompt:
                raise RowProblem("empty_prompt: no user text or image before the first answer")
            seen_assistant = True
            if not answer.strip():
                raise RowProblem(f"empty_response: message {i} (assistant) is empty")
        elif role == "user" and m["content"]:
            prompt = True
    if not seen_assistant:
        raise RowProblem("no_assistant_turn: the conversation has no assistant turn")
    if all(m.get("train") is False for m in messages if m["role"] == "assistant"):
        raise RowProblem("no_trained_turn: every assistant turn has loss weight 0")
    if next_image != n_images:
        raise RowProblem("image_count_mismatch: image parts do not match the images")


# ---------------------------------------------------------------------------------------------
# Driver.


def required_columns(source: Source, columns: set[str]) -> list[str]:
    c = source.columns
    if source.format == "seed":
        instruction = [c["instruction"]] if source.instruction is None else []
        return [c["image"], *instruction, c["response"]]
    col = _messages_column(columns, source, source.format)
    return ["prompt", "completion"] if col == PROMPT_COMPLETION else [col]


def _conversation_format(columns: set[str]) -> tuple[str, str] | None:
    """(format, column) for a file whose columns are a conversation layout's, else None."""
    for col, fmt in (
        ("conversations", "sharegpt"),
        ("messages", "messages"),
        ("texts", "messages"),
    ):
        if col in columns:
            return fmt, f"'{col}'"
    if {"prompt", "completion"} <= columns:
        return "messages", "'prompt' / 'completion'"
    return None


def _check_columns(source: Source, columns: set[str], how: str) -> None:
    missing = [c for c in required_columns(source, columns) if c not in columns]
    if missing:
        keys = {v: k for k, v in source.columns.items() if v}
        names = ", ".join(f"'{m}'" for m in missing)
        hint = "; ".join(f"map it with columns.{keys.get(m, 'messages')}" for m in missing[:1])
        guess = _conversation_format(columns) if source.format == "seed" else None
        if guess:  # a conversation file read with the default format
            hint = f"its {guess[1]} column says it is a conversation file: set format: {guess[0]}"
        raise DataError(
            f"{source.path}: missing required column(s) {names} for format '{source.format}' "
            f"({how}: {', '.join(sorted(columns)) or 'none'}); {hint}"
        )


def _open_rows(source: Source):
    """(reader, rows, columns) with the column check done (DataError when one is missing)."""
    reader = Reader(source.path)
    rows = reader.rows()
    if reader.columns is not None:
        columns = set(reader.columns)
        _check_columns(source, columns, "columns found")
        return reader, rows, columns
    peeked = []
    for item in rows:
        peeked.append(item)
        if len(peeked) >= _PEEK_ROWS:
            break
    columns = set().union(*(r.keys() for _, r in peeked if isinstance(r, dict)))
    if any(isinstance(r, dict) for _, r in peeked):
        _check_columns(source, columns, f"keys in the first {len(peeked)} rows")
    return reader, itertools.chain(peeked, rows), columns


def iter_samples(source: Source) -> Iterator[Sample | RowError]:
    """Every row of a source, as a Sample or a RowError (never silently skipped).

    Raises DataError when the file cannot be read or a required column is absent from the file
    (header/schema, or the first 1,000 rows of JSON/JSONL).
    """
    reader, rows, columns = _open_rows(source)
    msg_col = None if source.format == "seed" else _messages_column(columns, source, source.format)
    csv_cells = reader.kind == "csv"
    id_col = source.columns["id"]
    for row, rec in rows:
        if isinstance(rec, RowError):
            yield rec
            continue
        try:
            check_supported(rec, source)
            if source.format == "seed":
                messages, imgs = parse_seed(rec, source, csv_cells)
            else:
                col = msg_col if msg_col in rec else _messages_column(rec, source, source.format)
                messages, imgs = parse_messages(rec, source, source.format, col)
            check_placeholders(messages)
            check_grounding(rec, messages)
            check_messages(messages, len(imgs.refs))
        except RowProblem as e:
            yield RowError(row, str(e), rec)
            continue
        row_id = None
        if id_col and rec.get(id_col) not in (None, ""):
            row_id = str(rec[id_col])
        yield Sample(row, rec, messages, imgs.refs, imgs.payloads, row_id)


def raw_json(raw) -> str:
    """A row as short JSON for the rejects tables (bytes summarised, long strings cut)."""

    def shrink(v):
        if isinstance(v, (bytes, bytearray, memoryview)):
            return f"<{len(v)} bytes>"
        if isinstance(v, str):
            v = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            return v if len(v) <= 500 else v[:500] + f"...<{len(v)} chars>"
        if isinstance(v, dict):
            return {str(k): shrink(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [shrink(x) for x in v]
        return v

    return json.dumps(shrink(raw), default=str, ensure_ascii=False)


def iter_image_refs(source: Source, on_payload=None) -> Iterator[ImageRef]:
    """Every image reference of a source (what validate_images checks). `on_payload(sha, data)`
    is called for each embedded image (to store it).

    Seed rows: the image column only (no message building: validating the images of a row that
    format_conversations later rejects for its text costs little). Other layouts: the images of
    the rows that parse.
    """
    if source.format == "seed":
        reader, rows, _ = _open_rows(source)
        col, where = source.columns["image"], f"'{source.columns['image']}'"
        csv_cells = reader.kind == "csv"
        for _, rec in rows:
            if isinstance(rec, RowError):
                continue
            try:
                found = image_list(rec.get(col), source, where, csv_cell=csv_cells)
            except RowProblem:
                continue
            for ref, payload in found:
                if payload is not None and on_payload is not None:
                    on_payload(ref.value, payload)
                yield ref
        return
    for s in iter_samples(source):
        if isinstance(s, RowError):
            continue
        if on_payload is not None:
            for sha, data in s.payloads.items():
                on_payload(sha, data)
        yield from s.images


__all__ = [
    "RowProblem",
    "Sample",
    "Source",
    "iter_image_refs",
    "iter_samples",
]
