"""The streaming LoRA merge (`merged_16bit`, and the first step of `merged_4bit`).

It folds the adapter into the ORIGINAL 16-bit base weights, read fresh from the base checkpoint
(also when training ran in 4-bit): never into dequantized 4-bit weights. It streams tensor by
tensor, so that merging a 7B model fits a 24 GB CPU node:

- the base checkpoint's safetensors shards are read one tensor at a time (`safe_open`);
- a LoRA-targeted weight becomes `W + scale * B @ A` (in float32, then cast to the export dtype);
  a `modules_to_save` weight (e.g. lm_head, the projector) is replaced by its trained copy;
  everything else is only cast;
- output shards are planned up front from the tensors' shapes, and each tensor is written to its
  shard as soon as it is computed (the safetensors layout: an 8-byte header length, a JSON header
  with every tensor's dtype, shape and byte range, then the raw bytes), so that at most one tensor
  (plus the small adapter) is in memory at a time. `safetensors.torch.save_file` would need a
  whole shard in memory.

Names: PEFT stores adapter weights under the model's own module names
(`base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight`), while checkpoints
on the hub may use older names (`model.layers.0.mlp.up_proj.weight`) that transformers renames
while loading. The checkpoint keys are mapped to the model's names with transformers' own
conversion mapping (the one `from_pretrained` applies), on a model built on the meta device; the
output keeps the checkpoint's names, so that whatever loads the base loads the merged model.
Every adapter tensor must land on exactly one base tensor, or the merge stops naming the key.

Fused MoE experts (Qwen3-VL-MoE, Qwen3.5-MoE) get LoRA through PEFT's `target_parameters`
(ParamWrapper: one low-rank pair per 3-D parameter, rank r per expert). Their checkpoint tensors
are converted on load (Qwen3.5-MoE: one tensor per expert and projection, stacked and
concatenated; Qwen3-VL-MoE hub checkpoints: (experts, in, out), transposed), so the update,
computed in the model's layout, is converted back with transformers' own inverse of those
conversions (what save_pretrained applies) and added to each checkpoint tensor in its layout.
The fused update of a layer's experts (a few GB in float32 for a 30B-A3B model) is the largest
tensor in memory then.

The export pipeline that calls this merge, checks it and re-quantizes it for `merged_4bit`
is `vlmflow.export`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import VlmflowError
from .export_files import clean_export
from .io import write_json

log = logging.getLogger(__name__)

SAVE_METHODS = ("lora", "merged_16bit", "merged_4bit", "gguf", "gguf_q8_0", "gguf_q4_k_m")

# safetensors dtype tags <-> torch dtypes.
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
ADAPTER_PREFIX = "base_model.model."


class MergeError(VlmflowError, ValueError):
    """The adapter cannot be merged into this base (names the key or setting)."""


# ------------------------------------------------------------------------------------ utilities
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """`5GB`, `500MiB`, `1e6` or an int → bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMG]?i?B?)\s*", str(size), re.I)
    if not m or m[2].upper() not in _SIZE_UNITS:
        raise MergeError(f"export.max_shard_size: cannot read '{size}' (e.g. 5GB, 500MiB)")
    return int(float(m[1]) * _SIZE_UNITS[m[2].upper()])


def _tensor_bytes(shape, tag: str) -> int:
    return math.prod(shape) * torch.empty((), dtype=ST_DTYPES[tag]).element_size()


# ------------------------------------------------------------------------------- base checkpoint
@dataclass
class BaseCheckpoint:
    folder: Path
    weight_map: dict[str, str]
    """checkpoint key -> shard file name, in checkpoint order."""
    info: dict
    """name, revision, resolved commit (hub) and the folder."""


def locate_base(model_cfg: dict) -> tuple[Path, dict]:
    """The base model's folder: a local folder as is, a hub id through the local cache (or a
    download). Returns (folder, info) with the resolved commit hash for hub models."""
    name = model_cfg["name"]
    info = {"name": name, "revision": model_cfg["revision"], "commit": None}
    if Path(name).is_dir():
        return Path(name), info
    from huggingface_hub import snapshot_download

    folder = Path(
        snapshot_download(
            name,
            revision=model_cfg["revision"],
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md"],
        )
    )
    if folder.parent.name == "snapshots":
        info["commit"] = folder.name
    return folder, info


def read_base(model_cfg: dict) -> BaseCheckpoint:
    folder, info = locate_base(model_cfg)
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif single.exists():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            weight_map = dict.fromkeys(f.keys(), single.name)
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise MergeError(
            f"{folder}: no safetensors weights (model.safetensors[.index.json]) found"
            + (f"; only pickle files {found}, which vlmflow does not load" if found else "")
        )
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise MergeError(
            f"{folder}: the base checkpoint is already quantized "
            f"({cfg['quantization_config'].get('quant_method')}); merged_16bit needs the original "
            "16-bit checkpoint: set model.name to it (model.load_in_4bit quantizes at load time)"
        )
    info["folder"] = str(folder)
    return BaseCheckpoint(folder=folder, weight_map=weight_map, info=info)


# ------------------------------------------------------------------------------------- adapter
@dataclass
class LoraDelta:
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    experts: int = 0
    """> 0: a PEFT ParamWrapper update of a fused 3-D expert weight with this many experts
    (A: (experts x r, in), B: (out, r x experts))."""
    transposed: bool = False
    """experts stored (experts, in, out) (the module's `is_transposed`), not (experts, out, in)."""

    @property
    def shape(self) -> list[int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        if self.experts:
            return [self.experts, inp, out] if self.transposed else [self.experts, out, inp]
        return [inp, out] if self.embedding or self.fan_in_fan_out else [out, inp]

    def delta(self) -> torch.Tensor:
        """The weight update in float32: scale * B @ A (transposed for embeddings and
        fan_in_fan_out layers, per expert for fused experts, as PEFT's get_delta_weight)."""
        if self.experts:
            a = self.A.float().reshape(self.experts, -1, self.A.shape[-1])  # (e, r, in)
            b = self.B.float().reshape(self.B.shape[0], -1, self.experts)  # (out, r, e)
            eq = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
            return torch.einsum(eq, b, a) * self.scale
        d = self.B.float() @ self.A.float()
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d * self.scale


@dataclass
class Adapter:
    config: dict
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    """model parameter name (e.g. model.language_model.layers.0.mlp.up_proj.weight) -> delta."""
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    """model parameter name -> trained tensor (modules_to_save, trained biases)."""
    param_deltas: dict[str, tuple[list[str], LoraDelta]] = field(default_factory=dict)
    """PEFT ParamWrapper (target_parameters) module -> (the parameters it may adapt, delta):
    which one it is follows from the shapes (`resolve_param_deltas`)."""


_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
}


def read_adapter(adapter_dir: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter folder into per-parameter deltas and replacements."""
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise MergeError(
            f"{adapter_dir}: not a PEFT adapter folder (adapter_config.json and "
            "adapter_model.safetensors expected)"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA merges")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise MergeError(f"{cfg_path}: {what} adapters are not supported by the merge")
    tensors = load_file(weights)
    out = Adapter(config=cfg)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise MergeError(f"{weights}: unexpected key '{key}' (no '{ADAPTER_PREFIX}' prefix)")
        name = key[len(ADAPTER_PREFIX) :]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_[AB])", name)
        if m:
            module = m[1] or m[3]
            pairs.setdefault(module, {})[m[2] or m[4]] = t
        elif "lora_" in name:
            raise MergeError(
                f"{weights}: adapter tensor '{key}' is of a kind the merge does not know"
            )
        else:
            out.replacements[name] = t
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for module, p in sorted(pairs.items()):
        embedding = "lora_embedding_A" in p
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        )
        if a_key not in p or b_key not in p:
            raise MergeError(f"{weights}: '{module}' has only one of {a_key}/{b_key}")
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        params = _wrapped_parameters(module, cfg.get("target_parameters") or ())
        if params:
            if p[a_key].shape[0] % r:
                raise MergeError(f"{weights}: '{module}' has {p[a_key].shape[0]} rows, not r x n")
            delta = LoraDelta(A=p[a_key], B=p[b_key], scale=scale, experts=p[a_key].shape[0] // r)
            out.param_deltas[module] = (params, delta)
            continue
        if p[a_key].shape[0] != r:
            raise MergeError(f"{weights}: '{module}' has rank {p[a_key].shape[0]}, config says {r}")
        out.deltas[f"{module}.weight"] = LoraDelta(
            A=p[a_key],
            B=p[b_key],
            scale=scale,
            embedding=embedding,
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
        )
    return out


def _wrapped_parameters(module: str, target_parameters) -> list[str]:
    """The full parameter names a ParamWrapper saved under `module` may adapt: PEFT nests one
    wrapper per targeted parameter of a module (`experts.lora_A`, `experts.base_layer.lora_A`),
    and a target names `module.parameter` in full or by suffix."""
    owner = module.replace(".base_layer", "")
    out = []
    for target in target_parameters:
        mod, _, param = target.rpartition(".")
        if owner == mod or owner.endswith(f".{mod}"):
            out.append(f"{owner}.{param}")
    return out


def resolve_param_deltas(adapter: Adapter, keymap: KeyMap) -> None:
    """Turn the ParamWrapper updates into per-parameter deltas: each is the one of its module's
    targeted parameters whose shape it has (gate_up_proj (E, 2I, H) vs down_proj (E, H, I))."""
    for module, (params, delta) in sorted(adapter.param_deltas.items()):
        matches = []
        for name in params:
            shape = keymap.shapes.get(name)
            if shape is None:
                continue
            if len(shape) == 2:
                candidate = LoraDelta(A=delta.A, B=delta.B, scale=delta.scale)
            else:
                transposed = name.rpartition(".")[0] in keymap.transposed
                candidate = LoraDelta(**{**vars(delta), "transposed": transposed})
            if candidate.shape == shape and name not in adapter.deltas:
                matches.append((name, candidate))
        if len(matches) != 1:
            raise MergeError(
                f"adapter module '{module}' (target_parameters, update shape "
                f"{delta.shape}) matches {len(matches)} of the parameters {params}"
            )
        adapter.deltas[matches[0][0]] = matches[0][1]
    adapter.param_deltas.clear()


# ---------------------------------------------------------------------------------- key mapping
@dataclass
class KeyMap:
    to_model: dict[str, str]
    """checkpoint key -> model parameter name (as in model.state_dict())."""
    converted: set[str]
    """checkpoint keys that transformers converts (fuses, splits) on load: copied unchanged."""
    model_keys: set[str]
    tied: dict[str, str]
    """model parameter -> the parameter it is tied to, when the config ties them."""
    keep_fp32: set[str]
    to_checkpoint: callable = None
    converted_to: dict[str, str] = field(default_factory=dict)
    """converted checkpoint key -> the model parameter it becomes (part of)."""
    maybe_transposed: set[str] = field(default_factory=set)
    """converted checkpoint keys that transformers transposes (dims 1, 2) on load when their
    shape is not the model's (Qwen3-VL-MoE's hub experts are (experts, in, out)); saving does
    not transpose back, so `revert` gives the model's layout for those."""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    """model parameter name -> shape."""
    transposed: set[str] = field(default_factory=set)
    """modules whose fused expert weights are stored (experts, in, out) (`is_transposed`)."""
    revert: callable = None
    """revert({model key: tensor}) -> {checkpoint key: tensor}: transformers' inverse of the
    load-time conversions (what save_pretrained applies), for updates of converted tensors."""


def _transposes_if_needed(converters, pattern: str) -> bool:
    from transformers.core_model_loading import Transpose

    return any(
        pattern in c.source_patterns
        and any(
            isinstance(op, Transpose) and op.check_dims and {op.dim0, op.dim1} == {1, 2}
            for op in c.operations
        )
        for c in converters
    )


def build_key_map(config, ckpt_keys, *, trust_remote_code: bool, export_dtype) -> KeyMap:
    """Map checkpoint keys to the model's parameter names the way `from_pretrained` does."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    meta_sd = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        conversions = get_model_conversion_mapping(model)
    except ImportError:  # older transformers: checkpoint names are the model's names
        conversions = None
    to_model, converted, converted_to, maybe_transposed = {}, set(), {}, set()
    if conversions:
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        reverse = [c.reverse_transform() for c in conversions[::-1]]
        rev_renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
        rev_converters = [c for c in reverse if isinstance(c, WeightConverter)]
        for k in ckpt_keys:
            new, pattern = rename_source_key(
                k, renamings, converters, model.base_model_prefix, meta_sd
            )
            if pattern is not None:
                converted.add(k)
                converted_to[k] = new
                if _transposes_if_needed(converters, pattern):
                    maybe_transposed.add(k)
            else:
                to_model[k] = new

        def to_checkpoint(model_key: str) -> str:
            return rename_source_key(model_key, rev_renamings, rev_converters, reverse=True)[0]

    else:
        to_model = {k: k for k in ckpt_keys}

        def to_checkpoint(model_key: str) -> str:
            return model_key

    tied = {}
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "tie_word_embeddings", False) or getattr(
        text_cfg, "tie_word_embeddings", False
    ):
        tied = dict(getattr(model, "_tied_weights_keys", None) or {})
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if export_dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())

    def revert(tensors: dict) -> dict:
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, tensors)

    return KeyMap(
        to_model=to_model,
        converted=converted,
        model_keys=set(meta_sd),
        tied=tied,
        keep_fp32=keep,
        to_checkpoint=to_checkpoint,
        converted_to=converted_to,
        maybe_transposed=maybe_transposed,
        shapes={k: list(v.shape) for k, v in meta_sd.items()},
        transposed={n for n, m in model.named_modules() if getattr(m, "is_transposed", False)},
        revert=revert,
    )


# -------------------------------------------------------------------------------------- writing
@dataclass
class OutTensor:
    key: str
    """name in the output checkpoint."""
    shape: list[int]
    src_tag: str
    out_tag: str
    src_file: str | None = None
    src_key: str | None = None
    delta: LoraDelta | None = None
    replacement: torch.Tensor | None = None
    converted_from: str | None = None
    """the model parameter the delta is of, when transformers converts this checkpoint tensor
    into (part of) it on load (fused experts): the delta is reverted to this tensor's layout."""

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.shape, self.out_tag)


def _header(tensors: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.key] = {
            "dtype": t.out_tag,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: Path, tensors: list[OutTensor], produce) -> None:
    """Write one safetensors file, computing and writing one tensor at a time."""
    with open(path, "wb") as f:
        f.write(_header(tensors))
        for t in tensors:
            value = produce(t)
            if list(value.shape) != list(t.shape) or value.dtype != ST_DTYPES[t.out_tag]:
                raise MergeError(f"internal: '{t.key}' came out {value.dtype} {list(value.shape)}")
            data = value.contiguous().reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != t.nbytes:
                raise MergeError(f"internal: '{t.key}' has {data.nbytes} bytes, {t.nbytes} planned")
            f.write(memoryview(data))
            del value, data


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ---------------------------------------------------------------------------------------- merge
@dataclass
class MergePlan:
    shards: list[list[OutTensor]]
    untie: bool
    stats: dict


def plan_merge(
    base: BaseCheckpoint,
    adapter: Adapter,
    keymap: KeyMap,
    export_dtype: torch.dtype,
    max_shard_bytes: int,
) -> MergePlan:
    """Decide every output tensor (name, dtype, shape, how it is computed) and its shard."""
    from safetensors import safe_open

    out_tag = ST_NAMES[export_dtype]
    resolve_param_deltas(adapter, keymap)
    by_model = {m: c for c, m in keymap.to_model.items()}
    used: set[str] = set()
    tensors: list[OutTensor] = []
    files: dict[str, list[str]] = {}
    for key, fname in base.weight_map.items():
        files.setdefault(fname, []).append(key)
    n_merged = n_replaced = 0
    for fname, keys in files.items():
        with safe_open(base.folder / fname, "pt") as f:
            for key in keys:
                sl = f.get_slice(key)
                shape, tag = list(sl.get_shape()), sl.get_dtype()
                model_key = keymap.to_model.get(key)
                t = OutTensor(key=key, shape=shape, src_tag=tag, out_tag=tag)
                t.src_file, t.src_key = fname, key
                if tag in FLOAT_TAGS:
                    keep = tag == "F32" and model_key and _matches_any(model_key, keymap.keep_fp32)
                    t.out_tag = "F32" if keep else out_tag
                if model_key is None and keymap.converted_to.get(key) in adapter.deltas:
                    model_key = t.converted_from = keymap.converted_to[key]
                if model_key in adapter.deltas:
                    t.delta = adapter.deltas[model_key]
                    used.add(model_key)
                    n_merged += 1
                if model_key in adapter.replacements:
                    t.replacement = adapter.replacements[model_key]
                    used.add(model_key)
                    n_replaced += 1
                if (t.delta is not None or t.replacement is not None) and tag not in FLOAT_TAGS:
                    raise MergeError(f"base tensor '{key}' is {tag}; cannot merge into it")
                tensors.append(t)
    # A trained copy of a module whose weight the base ties to another one (lm_head tied to the
    # input embeddings): written as its own tensor, and the config unties them.
    untie = False
    for model_key in sorted(set(adapter.replacements) - used):
        if model_key in keymap.tied and model_key not in by_model:
            rep = adapter.replacements[model_key]
            tensors.append(
                OutTensor(
                    key=keymap.to_checkpoint(model_key),
                    shape=list(rep.shape),
                    src_tag=ST_NAMES[rep.dtype],
                    out_tag=out_tag,
                    replacement=rep,
                )
            )
            used.add(model_key)
            untie = True
    missing = sorted((set(adapter.deltas) | set(adapter.replacements)) - used)
    if missing:
        converted = sorted(keymap.converted)[:5]
        raise MergeError(
            f"{len(missing)} adapter weight(s) match no tensor of the base checkpoint "
            f"{base.folder}: {missing[:8]}"
            + (
                f" (transformers converts some checkpoint tensors on load, e.g. {converted}; "
                "LoRA on those is not supported by the streaming merge)"
                if converted
                else " (was the adapter trained on another base model?)"
            )
        )
    for t in tensors:
        if t.delta is not None:
            want = t.delta.shape
            if t.converted_from is not None:  # checked against the reverted update when written
                want = keymap.shapes.get(t.converted_from)
                if want != t.delta.shape:
                    raise MergeError(
                        f"LoRA update of '{t.converted_from}' has shape {t.delta.shape}, the "
                        f"model's parameter {want}"
                    )
            elif want != t.shape:
                raise MergeError(f"LoRA update of '{t.key}' has shape {want}, the weight {t.shape}")
        if t.replacement is not None and list(t.replacement.shape) != t.shape:
            raise MergeError(
                f"trained '{t.key}' has shape {list(t.replacement.shape)}, the base {t.shape}"
            )
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    stats = {
        "tensors": len(tensors),
        "lora_merged": n_merged,
        "replaced": n_replaced + int(untie),
        "parameters": sum(math.prod(t.shape) for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "shards": len(shards),
    }
    return MergePlan(shards=shards, untie=untie, stats=stats)


def _matches_any(key: str, modules: set[str]) -> bool:
    return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", key) for m in modules)


def _produce(base: BaseCheckpoint, keymap: KeyMap | None = None):
    from safetensors import safe_open

    # The updates of converted parameters in checkpoint layout, for the last two parameters
    # (a layer's gate_up_proj and down_proj, whose per-expert tensors alternate in the shards):
    # one fused update serves all the checkpoint tensors it is split into.
    reverted: dict[str, dict[str, torch.Tensor]] = {}

    def converted_delta(t: OutTensor) -> torch.Tensor:
        if t.converted_from not in reverted:
            if len(reverted) >= 2:
                reverted.pop(next(iter(reverted)))
            reverted[t.converted_from] = keymap.revert({t.converted_from: t.delta.delta()})
        d = reverted[t.converted_from].get(t.key)
        if d is not None and list(d.shape) != t.shape and t.key in keymap.maybe_transposed:
            d = d.transpose(1, 2)  # the checkpoint's (experts, in, out), transposed on load
        if d is None or list(d.shape) != t.shape:
            raise MergeError(
                f"the LoRA update of '{t.converted_from}' does not convert back to the "
                f"checkpoint tensor '{t.key}' {t.shape} (got "
                f"{sorted(reverted[t.converted_from])[:4]})"
            )
        return d

    def produce(t: OutTensor) -> torch.Tensor:
        out_dtype = ST_DTYPES[t.out_tag]
        if t.replacement is not None:
            return t.replacement.to(out_dtype)
        # Opened per tensor: the memory map (and its resident pages) goes away with it.
        with safe_open(base.folder / t.src_file, "pt") as f:
            w = f.get_tensor(t.src_key)
        if t.delta is not None:
            w = w.float()
            w += converted_delta(t) if t.converted_from is not None else t.delta.delta()
        return w.to(out_dtype)

    return produce


def merge_weights(
    model_cfg: dict,
    adapter_dir: str | os.PathLike,
    out_dir: Path,
    export_dtype: torch.dtype,
    max_shard_size: int | str,
) -> dict:
    """Stream the merged weights + config + generation config into `out_dir` (must exist).
    Returns the merge statistics."""
    from transformers import AutoConfig, GenerationConfig

    base = read_base(model_cfg)
    adapter = read_adapter(adapter_dir)
    config = AutoConfig.from_pretrained(
        base.folder, trust_remote_code=model_cfg["trust_remote_code"]
    )
    keymap = build_key_map(
        config,
        list(base.weight_map),
        trust_remote_code=model_cfg["trust_remote_code"],
        export_dtype=export_dtype,
    )
    plan = plan_merge(base, adapter, keymap, export_dtype, parse_size(max_shard_size))
    log.info(
        "merging %d LoRA updates and %d trained tensors into %d base tensors (%s) -> %d shard(s)",
        plan.stats["lora_merged"],
        plan.stats["replaced"],
        plan.stats["tensors"],
        base.folder,
        plan.stats["shards"],
    )
    names = _shard_names(len(plan.shards))
    produce = _produce(base, keymap)
    weight_map = {}
    for name, shard in zip(names, plan.shards):
        write_shard(out_dir / name, shard, produce)
        weight_map.update({t.key: name for t in shard})
        gc.collect()
    if len(names) > 1:
        write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": plan.stats["bytes"]}, "weight_map": weight_map},
        )
    config.dtype = export_dtype
    if plan.untie:
        config.tie_word_embeddings = False
        text = config.get_text_config()
        if text is not config:
            text.tie_word_embeddings = False
    config.save_pretrained(out_dir)
    if (base.folder / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(base.folder)
    else:
        gen = GenerationConfig.from_model_config(config)
    gen.save_pretrained(out_dir)
    return {**plan.stats, "base": base.info, "untied_embeddings": plan.untie}


def save_processor(model_cfg: dict, adapter_dir: Path, out_dir: Path) -> None:
    """The processor the adapter was trained with (saved beside it), else the base's."""
    from transformers import AutoProcessor

    source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else None
    if source is None:
        from .modeling import load_processor

        processor = load_processor(model_cfg)
    else:
        processor = AutoProcessor.from_pretrained(
            source, trust_remote_code=model_cfg["trust_remote_code"]
        )
    processor.save_pretrained(out_dir)
    clean_export(out_dir, processor=processor)
