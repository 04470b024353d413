"""Make an exported folder (adapter or merged model) load where users serve it.

What transformers 5 saves after training is not quite what a server or converter expects:

- the chat template is the training-time one, with `{% generation %}` ... `{% endgeneration %}`
  around assistant turns (a transformers-only extension for assistant masks): jinja2-based
  servers (llama-cpp-python's chat handler, TGI, Ollama's converters) reject the unknown tag. The
  exported template has the tags removed (rendering is unchanged: transformers treats them as
  no-ops; vlmflow itself computes its masks from positions, so nothing needs the tagged one);
- processor files: transformers 5 writes one `processor_config.json` with the image processor
  nested in it; transformers 4 and llama.cpp's `convert_hf_to_gguf.py` open
  `preprocessor_config.json` (and `video_preprocessor_config.json`): those are written too;
- run-time flags that `from_pretrained` stores in `tokenizer_config.json` (`local_files_only`,
  `is_local`, ...) are removed;
- the config is re-saved in transformers-5 form (`rope_parameters`, `dtype`): transformers 4 reads
  `rope_scaling`, `rope_theta`, (Gemma 3) `rope_local_base_freq` and `torch_dtype`, so those are
  written beside it with the same values. Transformers 5 gives the legacy keys priority when it
  reads them back, so they must say the same thing: `legacy_config_keys` derives them from
  `rope_parameters` and the tests check that both versions load the same model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Keys `from_pretrained` adds to a tokenizer/processor config at load time, which describe how
# it was loaded here, not the model.
RUNTIME_KEYS = (
    "local_files_only",
    "is_local",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "use_auth_token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "_commit_hash",
    "name_or_path",
)
PROCESSOR_CONFIGS = (
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "special_tokens_map.json",
    "chat_template.json",
)
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def serving_template(template: str) -> str:
    """The chat template without transformers' `{% generation %}` markers: each becomes a no-op
    block tag with the same whitespace control (`{%- if true %}` ... `{% endif -%}`), so that
    whitespace renders exactly as before (`trim_blocks` applies to block tags too)."""

    def repl(m: re.Match) -> str:
        left, end, right = m.groups()
        return "{%" + left + (" endif " if end else " if true ") + right + "%}"

    return _GENERATION_TAG.sub(repl, template)


def has_generation_tags(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def _replace_text(path: Path, text: str) -> None:
    """Write a new file in place of `path` (never through it: in a published copy, `path` may be
    a hard link to the exported original). The folders cleaned are temporary folders that
    become the output in one rename."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _write_json(path: Path, obj) -> None:
    _replace_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


_STANDARD_TOKENS = {
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
}
# transformers 5's name of the generic fast tokenizer; transformers 4 knows it by its old name
# (which transformers 5 still accepts).
_TOKENIZER_CLASS_V4 = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _strip_runtime(obj: dict) -> bool:
    changed = False
    if obj.get("tokenizer_class") in _TOKENIZER_CLASS_V4:
        obj["tokenizer_class"] = _TOKENIZER_CLASS_V4[obj["tokenizer_class"]]
        # v4's class would add token_type_ids, which generate() rejects; v5's returns these
        obj.setdefault("model_input_names", ["input_ids", "attention_mask"])
        changed = True
    if isinstance(obj.get("extra_special_tokens"), list):
        # v5 writes the unnamed special tokens as a list under v4's name for *named* ones (a
        # dict); v4's name for the list, which v5 also reads, is additional_special_tokens
        obj.setdefault("additional_special_tokens", obj.pop("extra_special_tokens"))
        changed = True
    named = {
        k: v
        for k, v in obj.items()
        if k.endswith("_token") and k not in _STANDARD_TOKENS and isinstance(v, str)
    }
    if named and "extra_special_tokens" not in obj and "tokenizer_class" in obj:
        # named special tokens (Gemma 3's image_token, boi_token, ...): v5 writes them at the top
        # level, v4 reads them from an extra_special_tokens dict (as the hub checkpoints have)
        obj["extra_special_tokens"] = named
        changed = True
    for k in RUNTIME_KEYS:
        if k in obj:
            del obj[k]
            changed = True
    for v in obj.values():
        if isinstance(v, dict):
            changed |= _strip_runtime(v)
    return changed


def _clean_templates_in(obj) -> bool:
    """Strip generation tags from every `chat_template` value of a JSON config (a string, or
    a list of {name, template})."""
    changed = False
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "chat_template" and isinstance(v, str) and has_generation_tags(v):
                obj[k] = serving_template(v)
                changed = True
            elif k == "chat_template" and isinstance(v, list):
                for t in v:
                    if isinstance(t, dict) and has_generation_tags(t.get("template", "")):
                        t["template"] = serving_template(t["template"])
                        changed = True
            else:
                changed |= _clean_templates_in(v)
    return changed


# ------------------------------------------------------------------------------ legacy config
def _legacy_rope(sub: dict) -> dict:
    """transformers-4 keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) equivalent to a
    config's `rope_parameters`; {} when there is nothing to add."""
    rp = sub.get("rope_parameters")
    if not isinstance(rp, dict) or not rp:
        return {}
    out: dict = {}
    if all(isinstance(v, dict) for v in rp.values()):
        # per layer type (Gemma 3: full_attention / sliding_attention)
        full = rp.get("full_attention") or next(iter(rp.values()))
        sliding = rp.get("sliding_attention")
        if sliding is not None and "rope_theta" in sliding:
            out["rope_local_base_freq"] = sliding["rope_theta"]
        rp = full
    if "rope_theta" in rp:
        out["rope_theta"] = rp["rope_theta"]
    rest = {k: v for k, v in rp.items() if k != "rope_theta"}
    kind = rest.get("rope_type", rest.get("type", "default"))
    if kind != "axial":
        # Written for the default type too: some v4 models read `rope_scaling["rope_type"]`
        # unconditionally (Mllama). v4 spells M-RoPE `type: mrope` (Qwen2/2.5-VL): both names
        # are kept. Vision towers with axial RoPE had no such key in v4.
        out["rope_scaling"] = rest if "rope_type" in rest else {"rope_type": kind, **rest}
    return out


# Model types that transformers 4 never had: their folders need transformers 5, and v4 keys
# would only mislead v5 (it reads `rope_scaling` first: Gemma 4's `proportional` RoPE then
# lacks its `rope_theta` and the folder does not load).
V5_ONLY_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_moe", "gemma4", "gemma4_unified"})


def legacy_config_keys(config: dict) -> dict:
    """A config.json dict with the transformers-4 spellings added beside the v5 ones (returns a
    new dict; keys already present are kept). Unchanged for a model type v4 does not have."""
    out = json.loads(json.dumps(config))
    if out.get("model_type") in V5_ONLY_MODEL_TYPES:
        return out

    def fix(sub: dict) -> None:
        for k, v in _legacy_rope(sub).items():
            sub.setdefault(k, v)
        if "dtype" in sub and "torch_dtype" not in sub:
            sub["torch_dtype"] = sub["dtype"]
        for v in list(sub.values()):
            if isinstance(v, dict) and ("model_type" in v or "rope_parameters" in v):
                fix(v)

    fix(out)
    return out


# ------------------------------------------------------------------------------------ cleaning
def clean_export(folder: str | Path, *, processor=None) -> dict:
    """Clean an exported folder in place (see the module docstring). `processor`: the loaded
    processor, used to write `preprocessor_config.json` / `video_preprocessor_config.json` when
    transformers saved only `processor_config.json`. Returns what was done."""
    folder = Path(folder)
    done: dict = {}
    for tpl in [
        folder / "chat_template.jinja",
        *sorted(folder.glob("additional_chat_templates/*")),
    ]:
        if tpl.is_file() and has_generation_tags(text := tpl.read_text()):
            _replace_text(tpl, serving_template(text))
            done.setdefault("templates_without_generation_tags", []).append(
                str(tpl.relative_to(folder))
            )
    if processor is not None:
        for attr, name in (
            ("image_processor", "preprocessor_config.json"),
            ("video_processor", "video_preprocessor_config.json"),
        ):
            sub = getattr(processor, attr, None)
            if sub is not None and not (folder / name).exists():
                d = sub.to_dict()
                d["processor_class"] = type(processor).__name__
                _write_json(folder / name, d)
                done.setdefault("written", []).append(name)
    for name in PROCESSOR_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        obj = _read_json(path)
        changed = _strip_runtime(obj) | _clean_templates_in(obj)
        if changed:
            _write_json(path, obj)
            done.setdefault("cleaned", []).append(name)
    config = folder / "config.json"
    if config.is_file():
        obj = _read_json(config)
        new = legacy_config_keys(obj)
        if new != obj:
            _write_json(config, new)
            done["config_legacy_keys"] = True
    return done


def base_reference(name: str) -> str:
    """How an exported folder names its base: the hub id, or the absolute path of a local
    folder (a relative path breaks as soon as the folder is used from elsewhere)."""
    p = Path(name)
    return str(p.resolve()) if p.is_dir() else name


def fix_adapter_config(folder: str | Path, base_name: str) -> bool:
    """`base_model_name_or_path` of a PEFT adapter folder: hub id or absolute local path."""
    path = Path(folder) / "adapter_config.json"
    obj = _read_json(path)
    want = base_reference(base_name)
    if obj.get("base_model_name_or_path") == want:
        return False
    obj["base_model_name_or_path"] = want
    _write_json(path, obj)
    return True
