"""Loading base models and processors, and putting LoRA on them (FastVisionModel semantics).

`build_training_model(cfg)` is the one entry point the train rule and the benchmarks use:
processor + base model (16-bit, 8-bit or 4-bit) + gradient checkpointing + LoRA.
"""

from __future__ import annotations

import logging
import re

import torch

from .families import family_for_config, lora_target_names, parameter_names
from .loss import model_loss
from .models.base import Family
from .offload import offload_checkpointed_layers, offload_input_embeddings
from .patches import (
    batched_vision_attention,
    block_attention,
    checkpoint_every_layer,
    compile_layers,
    fast_lora,
    fla_backward_broken,
    linear_patch_embed,
    packed_attention,
    save_attention,
    slow_linear_attention,
    tile_attention,
    use_torch_gated_delta_rule,
    warn_unpatched,
    warn_untested_versions,
)
from .quantization import nf4_config

log = logging.getLogger(__name__)

GRADIENT_CHECKPOINTING_MODES = (False, True, "offload", "unsloth")


def gradient_checkpointing_mode(setting, model_cfg: dict, device: torch.device, family: Family):
    """`train.use_gradient_checkpointing` as applied: `auto` (the default) is "offload" on a
    CUDA device for a quantized base (`load_in_4bit` / `load_in_8bit`) of a family measured
    with it (`Family.offload_quantized`) and for a 16-bit base of a family measured with it
    (`Family.offload_16bit`), True otherwise; any other setting as given. Offloading took the
    4-bit peaks of Pixtral, Qwen3-VL and Qwen2-VL down by 1.47, 0.32 and 0.43 GiB, to or under
    Unsloth's (whose default it is), at 0.91-0.98x the speed; at full depth in 16-bit, where
    plain checkpointing peaked 4-11% above Unsloth, it took Qwen2-VL, Qwen3-VL, LLaVA-NeXT and
    Pixtral to 0.87-0.95x Unsloth's peak at 1.00, 0.98, 0.98 and 0.92x the speed (BENCHMARKS.md,
    2026-12-04), and LLaVA-1.5 from 1.02x to 0.96x at 0.99x (2026-12-06). On the CPU the "host"
    copy would be a second copy in the same memory."""
    if setting != "auto":
        return setting
    quantized = model_cfg["load_in_4bit"] or model_cfg["load_in_8bit"]
    measured = family.offload_quantized if quantized else family.offload_16bit
    return "offload" if device.type == "cuda" and measured else True


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, else fp16; fp32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _hub_kwargs(model_cfg: dict) -> dict:
    return dict(revision=model_cfg["revision"], trust_remote_code=model_cfg["trust_remote_code"])


def model_family(name_or_path: str, model_cfg: dict | None = None) -> Family:
    from transformers import AutoConfig

    kw = _hub_kwargs(model_cfg) if model_cfg is not None else {}
    return family_for_config(AutoConfig.from_pretrained(name_or_path, **kw))


def load_processor(model_cfg: dict, family: Family | None = None):
    """The model's processor, with `min_pixels`/`max_pixels` passed to processors that take
    them (Qwen) and a chat template that closes assistant turns (see `ensure_chat_template`)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_cfg["name"], **_hub_kwargs(model_cfg))
    pixels = {k: model_cfg[k] for k in ("min_pixels", "max_pixels") if model_cfg[k] is not None}
    if pixels and hasattr(getattr(processor, "image_processor", None), "max_pixels"):
        # processors with a pixel budget (Qwen) resize within it themselves; others get images
        # already resized by the Encoder (vlmflow.collate.fit_pixels)
        processor = AutoProcessor.from_pretrained(
            model_cfg["name"], **_hub_kwargs(model_cfg), **pixels
        )
    family = family or model_family(model_cfg["name"], model_cfg)
    ensure_chat_template(processor, family)
    return processor


_PROBE = "vlmflow probe answer"


def ensure_chat_template(processor, family: Family) -> bool:
    """Make sure the processor's chat template closes an assistant turn with the family's
    end-of-turn token. Some released templates do not (llava-hf's LLaVA-1.5 template stops
    after the answer; LLaVA-NeXT's writes `<\\s>`): a model trained on them never learns to
    stop. Those get the family's template (saved with the adapter and the merged model).
    Returns True when the template was replaced."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "question"}]},
        {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]},
    ]
    ok = False
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, tokenize=False)
        tail = text[text.find(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
        ok = tail.lstrip(" ").startswith(family.end_of_turn) and family.response_part in text
    if ok:
        return False
    if family.chat_template is None:
        raise ValueError(
            f"the chat template of this {family.name} model does not end assistant turns with "
            f"{family.end_of_turn!r} after {family.response_part!r}; set a matching template "
            "on the processor"
        )
    log.warning("chat template does not close assistant turns: using the %s one", family.name)
    processor.chat_template = family.chat_template
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.chat_template = family.chat_template
    return True


def load_model(model_cfg: dict, device: torch.device | None = None, *, quantize: bool = True):
    """Load the base model as configured. Returns (model, family).

    `load_in_4bit`: the language model's linears in NF4 with double quantization, computing in
    the run's dtype (bf16 on a recent GPU). `load_in_8bit`: LLM.int8(). Either way the vision
    tower, the projector and lm_head stay in 16-bit unless `quantize_vision`: they are a few
    percent of the weights (0.68B of 8.3B in Qwen2.5-VL-7B) but every image passes through
    them, and NF4 noise there costs more in image features than the memory it saves.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig

    device = device or pick_device()
    dtype = resolve_dtype(model_cfg["dtype"], device)
    config = AutoConfig.from_pretrained(model_cfg["name"], **_hub_kwargs(model_cfg))
    family = family_for_config(config)
    kwargs = dict(dtype=dtype, attn_implementation=model_cfg["attn_implementation"])
    four, eight = quantize and model_cfg["load_in_4bit"], quantize and model_cfg["load_in_8bit"]
    if four and eight:
        raise ValueError("model.load_in_4bit and model.load_in_8bit cannot both be true")
    if four or eight:
        skip = family.unquantized_modules(quantize_vision=model_cfg["quantize_vision"])
        if four:
            kwargs["quantization_config"] = nf4_config(dtype, skip, quant_storage=torch.uint8)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_skip_modules=skip
            )
        kwargs["device_map"] = {"": "cpu"}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # load straight onto the GPU
    model = AutoModelForImageTextToText.from_pretrained(
        model_cfg["name"], **_hub_kwargs(model_cfg), **kwargs
    )
    if "device_map" not in kwargs:
        model.to(device)
    if four and device.type == "cpu":
        _cpu_4bit_workaround(model)
    warn_slow_linear_attention(model)
    return model, family


def warn_slow_linear_attention(model) -> list[str]:
    """One WARNING line when the model's Gated DeltaNet layers will run transformers' PyTorch
    reference of the gated delta rule instead of flash-linear-attention's Triton kernels
    (training then takes many times longer, with nothing else to show for it). Without
    `causal-conv1d` alone (it compiles against CUDA and often does not install) the short
    convolution runs as `F.conv1d`: an INFO line. Returns the missing pip distributions."""
    missing = slow_linear_attention(model)
    if not missing:
        return missing
    n = sum(type(m).__name__.endswith("GatedDeltaNet") for m in model.modules())
    where = f"the {n} Gated DeltaNet (linear-attention) layers of this {type(model).__name__}"
    if "flash-linear-attention" in missing:
        log.warning(
            "SLOW PATH: %s run the PyTorch reference of the gated delta rule, many times slower "
            "than the kernels: pip install %s",
            where,
            " ".join(missing),
        )
    else:
        log.info("%s run their short convolution as F.conv1d: pip install %s", where, *missing)
    return missing


def _cpu_4bit_workaround(model) -> None:
    """bitsandbytes 0.50 on CPU repacks 4-bit weights for AVX512-BF16 after an eval-mode forward,
    and a later training step then fails; keep the portable layout."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------------------- LoRA
def lora_target_modules(named_modules, family: Family, lora_cfg: dict) -> list[str]:
    """Names of the linear modules LoRA wraps, as FastVisionModel.get_peft_model selects them,
    and of the fused MoE expert parameters (`module.parameter`, see `Family.expert_parameters`)
    it wraps through PEFT's `target_parameters`.

    `target_modules`:
    - "all-linear" (default): the attention and/or MLP linears (finetune_attention_modules,
      finetune_mlp_modules) of the vision blocks and/or decoder layers
      (finetune_vision_layers, finetune_language_layers), from the family registry. Never the
      projector or lm_head (use modules_to_save for those). The MLP modules of an MoE
      decoder layer are its fused experts (both parameters) and its shared expert's linears;
      the routers never get LoRA.
    - a list of names: linears (and expert parameters) whose name is, or ends with `.`+, one
      of them (PEFT's rule), inside the layers the finetune_{vision,language}_layers flags
      select.
    - any other string: a regex matched against full module (and expert parameter) names
      (re.fullmatch, PEFT's rule); the finetune_* flags are not applied.
    """
    named = list(named_modules)
    target = lora_cfg["target_modules"]
    vision, language = lora_cfg["finetune_vision_layers"], lora_cfg["finetune_language_layers"]
    experts = parameter_names(named, family.expert_regex())
    if target == "all-linear":
        regex = family.lora_target_regex(
            vision=vision,
            language=language,
            attention=lora_cfg["finetune_attention_modules"],
            mlp=lora_cfg["finetune_mlp_modules"],
        )
        names = lora_target_names(named, regex)
        names += experts if language and lora_cfg["finetune_mlp_modules"] else []
        what = "the lora.finetune_* flags select"
    elif isinstance(target, list):
        layers = family.layers_regex(vision=vision, language=language)
        in_layers = lora_target_names(named, layers) + (experts if language else [])
        names = [n for n in in_layers if any(n == t or n.endswith("." + t) for t in target)]
        what = f"lora.target_modules {target} (in the layers finetune_*_layers select) selects"
    else:
        names = lora_target_names(named, target) + [e for e in experts if re.fullmatch(target, e)]
        what = f"the lora.target_modules regex {target!r} selects"
    if not names:
        raise ValueError(
            f"{what} no linear module of this {family.name} model: enable vision or language "
            "layers, and attention or MLP modules, or fix target_modules"
        )
    return names


def modules_to_save(model, family: Family, names: list[str]) -> list[str] | None:
    """lora.modules_to_save with the `projector` / `lm_head` aliases resolved (a ModuleList,
    e.g. Qwen3-VL's DeepStack mergers, is expanded to its items)."""
    modules = dict(model.named_modules())
    out = []
    for alias in names:
        for name in family.resolve_module_name(alias):
            mod = modules.get(name)
            if mod is None and not any(n.endswith("." + name) for n in modules):
                raise ValueError(f"lora.modules_to_save: no module '{name}' in this model")
            if isinstance(mod, torch.nn.ModuleList):
                out += [f"{name}.{i}" for i in range(len(mod))]
            else:
                out.append(name)
    return out or None


def lora_config(family: Family, lora_cfg: dict, target_modules: list[str], save=None):
    """The PEFT LoraConfig for `target_modules` (as `lora_target_modules` returns them): linear
    modules by name, fused MoE expert parameters as `target_parameters` (PEFT's ParamWrapper,
    which refuses dropout: it cannot factor the input out of a fused expert's matmul)."""
    from peft import LoraConfig

    experts = family.expert_regex()
    params = [n for n in target_modules if experts and re.fullmatch(experts, n)]
    modules = [n for n in target_modules if n not in params]
    if params and lora_cfg["lora_dropout"]:
        raise ValueError(
            f"lora.lora_dropout is {lora_cfg['lora_dropout']}, but LoRA on the fused MoE experts "
            f"of this {family.name} model (PEFT's target_parameters) takes no dropout: set "
            "lora.lora_dropout: 0, or lora.finetune_mlp_modules: false to leave the experts out"
        )
    return LoraConfig(
        r=lora_cfg["r"],
        lora_alpha=lora_cfg["lora_alpha"],
        lora_dropout=lora_cfg["lora_dropout"],
        bias=lora_cfg["bias"],
        # exact names, fully matched: PEFT's suffix rule could reach a same-named module elsewhere
        target_modules="|".join(re.escape(n) for n in modules) if modules else None,
        target_parameters=params or None,
        use_rslora=lora_cfg["use_rslora"],
        modules_to_save=save,
        task_type="CAUSAL_LM",
    )


def enable_gradient_checkpointing(model, mode, family: Family | None = None):
    """`mode` False / True / "offload" ("unsloth" is an alias). With `family`, its layers that
    transformers leaves out of checkpointing are checkpointed too
    (`patches.checkpoint_every_layer`). Returns the offloader
    (`vlmflow.offload.OffloadedCheckpoint`) for "offload", else None."""
    if mode not in GRADIENT_CHECKPOINTING_MODES:
        raise ValueError(
            f"use_gradient_checkpointing must be one of {GRADIENT_CHECKPOINTING_MODES}"
        )
    if not mode:
        return None
    if family is not None:
        n = checkpoint_every_layer(model, family)
        if n:
            log.info("gradient checkpointing extended to %d %s layers", n, family.name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if mode is True:
        return None
    return offload_checkpointed_layers(model)


def apply_lora(model, family: Family, lora_cfg: dict, *, gradient_checkpointing=False):
    """Wrap `model` with LoRA as `FastVisionModel.get_peft_model` would. Returns the PeftModel."""
    from peft import get_peft_model

    targets = lora_target_modules(model.named_modules(), family, lora_cfg)
    save = modules_to_save(model, family, lora_cfg["modules_to_save"])
    config = lora_config(family, lora_cfg, targets, save)
    n_params = len(config.target_parameters or ())
    log.info(
        "LoRA on %d modules and %d fused expert parameters (r=%d, alpha=%s)",
        len(targets) - n_params,
        n_params,
        config.r,
        config.lora_alpha,
    )
    offloader = enable_gradient_checkpointing(model, gradient_checkpointing, family)
    torch.manual_seed(lora_cfg["random_state"])
    peft_model = get_peft_model(model, config)
    peft_model.vlmflow_offloader = offloader
    # LoRA weights train in fp32 whatever the base dtype (PEFT casts their inputs); fully trained
    # modules (modules_to_save) keep the base dtype so that they match their neighbours.
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def build_training_model(cfg: dict, device: torch.device | None = None):
    """Processor + base model + LoRA from the resolved `model`, `lora` and `train` sections.
    Returns (peft_model, processor, family). The train rule and bench/ both call this."""
    model_cfg, lora_cfg, train_cfg = cfg["model"], cfg["lora"], cfg["train"]
    device = device or pick_device()
    model, family = load_model(model_cfg, device)
    processor = load_processor(model_cfg, family)
    model.config.use_cache = False
    model = apply_fast_paths(model, family, cfg, device, lora=False)
    if model_cfg["offload_embeddings"] and offload_input_embeddings(model, device, lora_cfg):
        log.info("input embeddings kept in host memory")
    setting = train_cfg["use_gradient_checkpointing"]
    mode = gradient_checkpointing_mode(setting, model_cfg, device, family)
    if setting == "auto":
        log.info("gradient checkpointing (use_gradient_checkpointing: auto): %s", mode)
    model = apply_lora(model, family, lora_cfg, gradient_checkpointing=mode)
    model_loss(model)  # the training loss (vlmflow.loss), set up once on the model
    model = apply_fast_paths(model, family, cfg, device, lora=True)
    return model, processor, family


def apply_fast_paths(model, family: Family, cfg: dict, device: torch.device, *, lora: bool):
    """The monkeypatches of `vlmflow.patches` that `train.fast_paths` leaves on: before LoRA
    (`lora=False`) those of the base model, after it (`lora=True`) the LoRA branches and
    compilation. A patch the family takes that patches nothing is a WARNING. Returns `model`."""
    model_cfg, train_cfg = cfg["model"], cfg["train"]
    fast = train_cfg["fast_paths"]
    if lora:
        if fast["padded_attention"] and family.causal_text:
            model.vlmflow_padded_attention = causal_attention_span(model.config)
            log.info(
                "right-padded batches train without the padding mask (causal attention%s)",
                ""
                if model.vlmflow_padded_attention == float("inf")
                else f" up to {model.vlmflow_padded_attention} tokens, the sliding window",
            )
        if fast["lora"]:
            n = fast_lora(model)
            log.info("LoRA branches in the compute dtype: %d modules", n)
            warn_unpatched(model, family, "lora", n)
        classes = family.patches.get("saved_attention", ())
        setting = train_cfg["use_gradient_checkpointing"]
        gc = gradient_checkpointing_mode(setting, model_cfg, device, family)
        if fast["saved_attention"] and classes and gc is True:
            n = save_attention(model, classes)
            if n:
                log.info("gradient checkpointing keeps the attention outputs in %d layers", n)
            warn_unpatched(model, family, "saved_attention", n, classes)
        if fast["compile"] and use_compile(train_cfg["compile"], family, device):
            # Over transformers' own checkpoint or the offloader's, of 16-bit layers.
            quantized = model_cfg["load_in_4bit"] or model_cfg["load_in_8bit"]
            compiled_checkpoint = fast["compiled_checkpoint"] and bool(gc) and not quantized
            classes = family.patches.get("compiled_checkpoint", ())
            n = compile_layers(model, checkpoint_classes=classes if compiled_checkpoint else ())
            log.info("torch.compile on %d layers", n)
            warn_unpatched(model, family, "compile", n)
            if classes and compiled_checkpoint:
                n = sum(hasattr(m, "_vlmflow_compiled_checkpoint") for m in model.modules())
                log.info("their checkpoint compiled with them in %d layers", n)
                warn_unpatched(model, family, "compiled_checkpoint", n, classes)
        return model
    warn_untested_versions()
    broken = fla_backward_broken(device)  # training needs the backward; generation does not
    if broken and fast["torch_gated_delta_rule"] and use_torch_gated_delta_rule(model):
        log.warning(
            "SLOW PATH: %s; the Gated DeltaNet layers train with the PyTorch reference instead "
            "(install tilelang, or Triton >= 3.7.1, for the kernels)",
            broken,
        )
    for patch, function, what in (
        ("vision_attention", batched_vision_attention, "batched window attention in %d modules"),
        ("patch_embed", linear_patch_embed, "patch embedding as one GEMM in %d modules"),
        ("tile_attention", tile_attention, "tile attention without the dense mask in %d modules"),
        (
            "block_attention",
            block_attention,
            "per-image vision attention without the mask in %d modules",
        ),
    ):
        if fast[patch] and patch in family.patches:
            n = function(model, family.patches[patch])
            if n:
                log.info(what, n)
            warn_unpatched(model, family, patch, n, family.patches[patch])
    sdpa = model_cfg["attn_implementation"] == "sdpa"
    if fast["packed_attention"] and train_cfg["packing"] and sdpa:
        n = packed_attention(model)
        log.info("packed rows: one causal SDPA call per sample in %d modules", n)
        warn_unpatched(model, family, "packed_attention", n)
    return model


def causal_attention_span(config) -> float:
    """How many tokens the language model's causal attention spans: its sliding window where
    its layers use one (beyond it the mask hides more than the future), else infinity."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return float("inf")
    types = getattr(text, "layer_types", None)
    if types is not None and not any("sliding" in t for t in types):
        return float("inf")
    return window


def use_compile(setting, family: Family, device: torch.device) -> bool:
    """train.compile: true / false, or `auto` = a CUDA device and a family measured with it
    (`Family.compile_measured`: BENCHMARKS.md, Qwen-VL in issue 7; Gemma 4 1.45x and Mistral 3
    1.09x in 16-bit, 2026-12-01)."""
    if setting == "auto":
        return device.type == "cuda" and family.compile_measured
    return bool(setting)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
