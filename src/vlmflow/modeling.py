"""Loading base models and processors, and putting LoRA on them (FastVisionModel semantics)."""

from __future__ import annotations

import logging

import torch

from .families import Family, family_for_model_type, lora_target_names

log = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, else fp16; fp32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_processor(model_cfg: dict):
    from transformers import AutoProcessor

    kwargs = {}
    if model_cfg["min_pixels"] is not None:
        kwargs["min_pixels"] = model_cfg["min_pixels"]
    if model_cfg["max_pixels"] is not None:
        kwargs["max_pixels"] = model_cfg["max_pixels"]
    return AutoProcessor.from_pretrained(
        model_cfg["name"],
        revision=model_cfg["revision"],
        trust_remote_code=model_cfg["trust_remote_code"],
        **kwargs,
    )


def model_family(name_or_path: str, model_cfg: dict | None = None) -> Family:
    from transformers import AutoConfig

    kw = {}
    if model_cfg is not None:
        kw = dict(revision=model_cfg["revision"], trust_remote_code=model_cfg["trust_remote_code"])
    return family_for_model_type(AutoConfig.from_pretrained(name_or_path, **kw).model_type)


def load_model(model_cfg: dict, device: torch.device | None = None, *, quantize: bool = True):
    """Load the base model as configured. Returns (model, family).

    With `load_in_4bit` the language model's linears are NF4 (double quantization, compute in the
    run's dtype); the vision tower, the projector and lm_head stay in 16-bit: they are a small
    share of the weights, and quantizing them costs accuracy on image features for little memory.
    """
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    device = device or pick_device()
    dtype = resolve_dtype(model_cfg["dtype"], device)
    family = model_family(model_cfg["name"], model_cfg)
    kwargs = dict(
        dtype=dtype,
        revision=model_cfg["revision"],
        trust_remote_code=model_cfg["trust_remote_code"],
        attn_implementation=model_cfg["attn_implementation"],
    )
    if quantize and model_cfg["load_in_4bit"]:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=[family.vision_tower, family.projector, family.lm_head],
        )
        kwargs["device_map"] = {"": "cpu"}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # load straight onto the GPU
    model = AutoModelForImageTextToText.from_pretrained(model_cfg["name"], **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    if quantize and model_cfg["load_in_4bit"] and device.type == "cpu":
        _cpu_4bit_workaround(model)
    return model, family


def _cpu_4bit_workaround(model) -> None:
    """bitsandbytes 0.50 on CPU repacks 4-bit weights for AVX512-BF16 after an eval-mode forward,
    and a later training step then fails; keep the portable layout."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(family: Family, lora_cfg: dict):
    from peft import LoraConfig

    regex = family.lora_target_regex(
        vision=lora_cfg["finetune_vision_layers"],
        language=lora_cfg["finetune_language_layers"],
        attention=lora_cfg["finetune_attention_modules"],
        mlp=lora_cfg["finetune_mlp_modules"],
    )
    if regex is None:
        raise ValueError(
            "the lora.finetune_* flags select no module: enable vision or language layers, "
            "and attention or MLP modules"
        )
    return LoraConfig(
        r=lora_cfg["r"],
        lora_alpha=lora_cfg["lora_alpha"],
        lora_dropout=lora_cfg["lora_dropout"],
        bias=lora_cfg["bias"],
        target_modules=regex,
        use_rslora=lora_cfg["use_rslora"],
        modules_to_save=[family.resolve_module_name(m) for m in lora_cfg["modules_to_save"]]
        or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, family: Family, lora_cfg: dict, *, gradient_checkpointing: bool):
    """Wrap `model` with LoRA as `FastVisionModel.get_peft_model` would. Returns the PeftModel."""
    from peft import get_peft_model

    config = lora_config(family, lora_cfg)
    targets = lora_target_names(model.named_modules(), config.target_modules)
    log.info("LoRA on %d modules (r=%d, alpha=%s)", len(targets), config.r, config.lora_alpha)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(lora_cfg["random_state"])
    peft_model = get_peft_model(model, config)
    # LoRA weights train in fp32 whatever the base dtype (PEFT casts their inputs); fully trained
    # modules (modules_to_save) keep the base dtype so that they match their neighbours.
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
