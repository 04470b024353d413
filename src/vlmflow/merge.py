"""Export a trained LoRA adapter: `lora`, `merged_16bit` or `merged_4bit` (Unsloth's names).

`merged_16bit` folds the adapter into the ORIGINAL 16-bit base weights, read fresh from the base
checkpoint (also when training ran in 4-bit): never into dequantized 4-bit weights. It streams
tensor by tensor, so that merging a 7B model fits a 24 GB CPU node:

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

`merged_4bit` writes the 16-bit merge to a scratch folder, then quantizes it with bitsandbytes
(NF4, double quantization; vision tower, projector and lm_head stay 16-bit) and saves that. It is
about 3.5x smaller than 16-bit, but the rounding of every language-model weight to 4 bits costs
accuracy, and the 4-bit model cannot be merged into or trained further in 16-bit: keep the adapter
(and the 16-bit merge, if you can afford the disk) when quality matters.

The merge check compares, on a sample batch of training conversations, the logits of the
exported model (loaded with plain `from_pretrained`) with those of the adapter applied to the
fresh base (PEFT, unmerged): max |diff| must stay below `check_atol + check_rtol * max |ref|`,
else the export fails. Both models run in float32 when a float32 copy fits in memory (the check
then sees only the rounding of the merged weights; default rtol 0.02), else in the export dtype
(16-bit noise in both forward passes; default rtol 0.1, which only catches gross errors).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .export_files import clean_export, fix_adapter_config
from .io import atomic_dir, write_json

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
# Default relative tolerance of the merge check: {check in float32: 0.02, in 16-bit: 0.1}.
DEFAULT_RTOL = {True: 0.02, False: 0.1}


class MergeError(ValueError):
    """The adapter cannot be merged into this base (names the key or setting)."""


class MergeCheckError(RuntimeError):
    """The merged model's logits differ from the adapter's by more than the tolerance."""


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


def _folder_processor(folder: Path, model_cfg: dict):
    """The processor saved in an adapter folder (None when it holds none)."""
    if not (folder / "tokenizer_config.json").exists():
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, trust_remote_code=model_cfg["trust_remote_code"])


def unquantized_modules(family) -> list[str]:
    """Modules that stay 16-bit in a 4-bit export, as in QLoRA training: the vision tower, the
    projector and lm_head."""
    if hasattr(family, "unquantized_modules"):
        return list(family.unquantized_modules(quantize_vision=False))
    names = []
    for x in (family.vision_tower, family.projector, family.lm_head):
        names += [x] if isinstance(x, str) else list(x)
    return names


def quantize_4bit(src: Path, out_dir: Path, model_cfg: dict, export_dtype: torch.dtype) -> None:
    """Load the 16-bit merge in NF4 (as QLoRA training does) and save it quantized."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from .modeling import model_family

    family = model_family(str(src))
    model = AutoModelForImageTextToText.from_pretrained(
        src,
        dtype=export_dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=export_dtype,
            llm_int8_skip_modules=unquantized_modules(family),
        ),
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        trust_remote_code=model_cfg["trust_remote_code"],
    )
    model.save_pretrained(out_dir)
    del model
    gc.collect()


# ------------------------------------------------------------------------------------ the check
def sample_batch(rows: list[dict], processor, family, model_cfg: dict, n: int) -> dict:
    """Encode up to `n` rows (skipping ones that are too long) into one padded batch."""
    from .collate import SampleTooLongError
    from .evaluate import collate_batch, make_encoder

    encoder = make_encoder(processor, family, model_cfg)
    items = []
    for row in rows:
        if len(items) == n:
            break
        try:
            items.append(encoder(row))
        except SampleTooLongError as e:
            log.info("merge check skips a sample: %s", e)
    if not items:
        raise MergeError("merge check: no sample of the train split fits max_seq_length")
    batch = collate_batch(items, encoder.pad_id, family)
    batch.pop("labels")
    return batch


def check_dtype_for(export_cfg: dict, n_params: int) -> torch.dtype:
    """`auto`: float32 when a float32 copy of the model fits comfortably in free memory (the check
    then measures only the rounding of the merged weights), else the export dtype."""
    name = export_cfg["check_dtype"]
    if name != "auto":
        return getattr(torch, name)
    import psutil

    if n_params * 4 * 1.5 < psutil.virtual_memory().available * 0.8:
        return torch.float32
    return getattr(torch, export_cfg["dtype"])


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return out[batch["attention_mask"].bool()]


def compare_logits(ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> dict:
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    tol = atol + rtol * scale
    return {
        "max_abs_diff": diff,
        "max_abs_reference_logit": scale,
        "tolerance": tol,
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "tokens": int(ref.shape[0]),
        "passed": diff <= tol,
    }


def reference_logits(
    model_cfg: dict, adapter_dir: Path, batch: dict, dtype: torch.dtype
) -> torch.Tensor:
    """Logits of the adapter applied (unmerged, PEFT) to the fresh 16-bit base."""
    from peft import PeftModel

    from .modeling import load_model

    base, _ = load_model(
        dict(model_cfg, dtype=str(dtype).removeprefix("torch.")),
        torch.device("cpu"),
        quantize=False,
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    ref = _logits(model, batch)
    del model, base
    gc.collect()
    return ref


def exported_logits(folder: Path, batch: dict, dtype: torch.dtype | None, trust: bool):
    """Logits of an exported folder loaded with plain `from_pretrained`."""
    from transformers import AutoModelForImageTextToText

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=trust, **kwargs)
    got = _logits(model, batch)
    del model
    gc.collect()
    return got


# ---------------------------------------------------------------------------------------- export
def export_model(
    model_cfg: dict,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    export_cfg: dict,
    *,
    check_rows: list[dict] | None = None,
    check_path: str | os.PathLike | None = None,
    data_summary: dict | None = None,
    metrics: dict | None = None,
) -> dict:
    """Export the adapter as `export_cfg["save_method"]` into `out_dir`, check it, write the
    model card. Returns the summary (also written as vlmflow_export.json).

    Raises MergeCheckError (after writing `check_path`) when the check fails; `out_dir` is then
    left untouched.
    """
    from .modeling import model_family

    method = export_cfg["save_method"]
    if method.startswith("gguf"):  # GGUF is converted from the 16-bit merge (rule gguf)
        method = "merged_16bit"
    adapter_dir = Path(adapter_dir)
    dtype = getattr(torch, export_cfg["dtype"])
    summary: dict = {"save_method": method, "dtype": export_cfg["dtype"]}
    check: dict = {"save_method": method}
    with atomic_dir(out_dir) as tmp:
        if method == "lora":
            for f in adapter_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            clean_export(tmp, processor=_folder_processor(tmp, model_cfg))
            fix_adapter_config(tmp, model_cfg["name"])
            base = read_base(model_cfg)
            summary["base"] = base.info
            check["skipped"] = "save_method lora: nothing is merged"
        else:
            target = tmp if method == "merged_16bit" else tmp / ".merged_16bit"
            target.mkdir(exist_ok=True)
            stats = merge_weights(
                model_cfg, adapter_dir, target, dtype, export_cfg["max_shard_size"]
            )
            save_processor(model_cfg, adapter_dir, target)
            summary.update(stats)
            summary["base"] = stats.pop("base")
            if check_rows is not None and export_cfg["check_samples"] > 0:
                family = model_family(str(target))
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(target)
                batch = sample_batch(
                    check_rows, processor, family, model_cfg, export_cfg["check_samples"]
                )
                cdtype = check_dtype_for(export_cfg, stats["parameters"])
                ref = reference_logits(model_cfg, adapter_dir, batch, cdtype)
                got = exported_logits(target, batch, cdtype, model_cfg["trust_remote_code"])
                rtol = export_cfg["check_rtol"]
                if rtol is None:
                    rtol = DEFAULT_RTOL[cdtype == torch.float32]
                check.update(compare_logits(ref, got, export_cfg["check_atol"], rtol))
                check.update(
                    compared="merged 16-bit weights vs adapter on the fresh base (PEFT)",
                    check_dtype=str(cdtype).removeprefix("torch."),
                    export_dtype=export_cfg["dtype"],
                    samples=int(batch["input_ids"].shape[0]),
                    atol=export_cfg["check_atol"],
                    rtol=rtol,
                )
                log.info(
                    "merge check: max |logit diff| %.3g (tolerance %.3g, %s), top-1 agreement %.3f",
                    check["max_abs_diff"],
                    check["tolerance"],
                    check["check_dtype"],
                    check["top1_agreement"],
                )
                if not check["passed"]:
                    if check_path is not None:
                        write_json(check_path, check)
                    raise MergeCheckError(
                        f"merge check failed: max |logit diff| {check['max_abs_diff']:.4g} > "
                        f"tolerance {check['tolerance']:.4g} (atol {check['atol']} + "
                        f"rtol {check['rtol']} x max |logit| "
                        f"{check['max_abs_reference_logit']:.4g}); the merged weights do not "
                        "reproduce the adapter. Details in merge_check.json."
                    )
            else:
                check["skipped"] = (
                    "export.check_samples is 0"
                    if check_rows is not None
                    else "no sample rows were given (--train)"
                )
            if method == "merged_4bit":
                quantize_4bit(target, tmp, model_cfg, dtype)
                save_processor(model_cfg, adapter_dir, tmp)
                if "max_abs_diff" in check:
                    q = exported_logits(tmp, batch, None, model_cfg["trust_remote_code"])
                    check["quantized"] = {
                        k: v
                        for k, v in compare_logits(ref, q, 0.0, 0.0).items()
                        if k not in ("tolerance", "passed")
                    }
                    check["quantized"]["note"] = (
                        "4-bit export vs adapter on the 16-bit base: the quantization error, "
                        "reported, not gated"
                    )
                shutil.rmtree(target)
        summary["check"] = {k: v for k, v in check.items() if k != "save_method"}
        summary["adapter"] = str(adapter_dir)
        summary["family"] = model_family(str(tmp)).name if method != "lora" else None
        write_json(tmp / "vlmflow_export.json", summary)
        if method != "lora":
            (tmp / "README.md").write_text(
                model_card(
                    summary,
                    adapter_dir=adapter_dir,
                    data_summary=data_summary,
                    metrics=metrics,
                )
            )
    if check_path is not None:
        write_json(check_path, check)
    return summary


# ------------------------------------------------------------------------------------ model card
def _json_block(obj) -> list[str]:
    return ["```json", json.dumps(obj, indent=2, sort_keys=True, default=str), "```"]


def model_card(
    summary: dict,
    *,
    adapter_dir: Path,
    data_summary: dict | None = None,
    metrics: dict | None = None,
) -> str:
    """The merged model's README.md: what it is, how to load it, how it was made."""
    cfg_path = adapter_dir / "vlmflow_train_config.json"
    train_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    train_summary_path = adapter_dir / "train_summary.json"
    train_summary = (
        json.loads(train_summary_path.read_text()) if train_summary_path.exists() else {}
    )
    base = summary["base"]
    base_id = base["name"]
    method = summary["save_method"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"base_model: {base_id}",
        "tags: [vlmflow, lora, merged]",
        "---",
        "",
        f"# Fine-tuned {base_id}",
        "",
        f"A LoRA adapter trained with vlmflow and merged into the base weights "
        f"(`save_method: {method}`, {summary['dtype']}).",
    ]
    if method == "merged_4bit":
        lines += [
            "The weights of the language model are stored in 4-bit NF4 (bitsandbytes, double "
            "quantization); the vision tower, projector and lm_head stay 16-bit. This is about "
            "3.5x smaller than 16-bit, at the cost of a quantization error on every language "
            "weight (see the check below); it needs `bitsandbytes` to load.",
        ]
    lines += [
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        'model = AutoModelForImageTextToText.from_pretrained("<this folder>")',
        'processor = AutoProcessor.from_pretrained("<this folder>")',
        "```",
        "",
        "## Base model",
        "",
        f"- id: `{base_id}`",
        f"- revision: `{base.get('revision') or 'default branch'}`"
        + (f", commit `{base['commit']}`" if base.get("commit") else ""),
        "",
        "## Data",
        "",
    ]
    if data_summary:
        lines += _json_block(data_summary)
    else:
        lines += ["(no data summary was given to the export)"]
    lines += ["", "## LoRA and training settings", ""]
    lines += _json_block(
        {k: train_cfg.get(k) for k in ("model", "lora", "train") if k in train_cfg}
    )
    lines += ["", "## Metrics", ""]
    if train_summary:
        lines += [
            f"- training: {train_summary.get('steps')} steps on {train_summary.get('train_samples')} "
            f"samples, final loss {train_summary.get('final_loss'):.4f}"
            if isinstance(train_summary.get("final_loss"), float)
            else f"- training: {train_summary}"
        ]
    check = summary.get("check") or {}
    if "max_abs_diff" in check:
        lines += [
            f"- merge check ({check['samples']} samples, {check['tokens']} tokens, "
            f"{check['check_dtype']}): max |logit diff| vs the adapter on the base "
            f"{check['max_abs_diff']:.4g} (tolerance {check['tolerance']:.4g}), top-1 agreement "
            f"{check['top1_agreement']:.4f}"
        ]
        if "quantized" in check:
            q = check["quantized"]
            lines += [
                f"- 4-bit quantization error: max |logit diff| {q['max_abs_diff']:.4g}, top-1 "
                f"agreement {q['top1_agreement']:.4f}"
            ]
    if metrics:
        lines += ["", "| metric | base | tuned | delta |", "|---|---|---|---|"]
        for name in metrics.get("metrics", sorted(metrics.get("tuned", {}))):
            b, t, d = (metrics[k].get(name) for k in ("base", "tuned", "delta"))
            lines.append(f"| {name} | {b:.4f} | {t:.4f} | {d:+.4f} |")
        lines.append(f"\nTest split: {metrics.get('n')} samples.")
    else:
        lines += [
            "- evaluation: base vs tuned on the held-out test split is written by the evaluate "
            "step (`eval/metrics.json` of the run)"
        ]
    return "\n".join(lines) + "\n"
