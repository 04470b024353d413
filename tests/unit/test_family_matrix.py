"""Every registry family, end to end on a tiny random model of the real architecture:
LoRA module selection, label masks, mixed batches, 16-bit LoRA and 4-bit QLoRA training,
adapter reload with plain PEFT, and generation stopping at the end-of-turn token."""

import copy
import itertools

import pytest
import torch

from vlmflow.collate import IGNORE_INDEX, Encoder, collate
from vlmflow.config import resolve_sections
from vlmflow.families import FAMILIES
from vlmflow.modeling import lora_target_modules, modules_to_save

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILY_NAMES = sorted(FAMILIES)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CLIP_QKVO = ["q_proj", "k_proj", "v_proj", "out_proj"]
GUD = ["gate_proj", "up_proj", "down_proj"]


def blocks(prefix, n, attn, mlp):
    return [(f"{prefix}.{i}", attn, mlp) for i in range(n)]


def decoder(*attn):
    """Language layers 0, 1, ... with these attention linears each and a gate/up/down MLP."""
    return [
        (f"model.language_model.layers.{i}", a, [f"mlp.{x}" for x in GUD])
        for i, a in enumerate(attn)
    ]


SELF_QKVO = [f"self_attn.{x}" for x in QKVO]
LANG = decoder(SELF_QKVO, SELF_QKVO)
CLIP = blocks(
    "model.vision_tower.encoder.layers",
    2,
    [f"self_attn.{x}" for x in CLIP_QKVO],
    ["mlp.fc1", "mlp.fc2"],
)
PIXTRAL = blocks(
    "model.vision_tower.transformer.layers",
    2,
    [f"attention.{x}" for x in QKVO],
    [f"feed_forward.{x}" for x in GUD],
)
QWEN_ATTN = ["attn.qkv", "attn.proj"]
GDN = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHARED = [f"mlp.shared_expert.{x}" for x in GUD]
# (vision blocks, language layers), each a list of (layer name, attention linears, MLP linears),
# read off the named_modules() of transformers 5.17's classes.
SPEC = {
    "qwen2_vl": (blocks("model.visual.blocks", 2, QWEN_ATTN, ["mlp.fc1", "mlp.fc2"]), LANG),
    "qwen2_5_vl": (blocks("model.visual.blocks", 2, QWEN_ATTN, [f"mlp.{x}" for x in GUD]), LANG),
    "qwen3_vl": (
        blocks("model.visual.blocks", 2, QWEN_ATTN, ["mlp.linear_fc1", "mlp.linear_fc2"]),
        LANG,
    ),
    # layer 0 a Gated DeltaNet (linear attention), layer 1 full attention
    "qwen3_5": (
        blocks("model.visual.blocks", 2, QWEN_ATTN, ["mlp.linear_fc1", "mlp.linear_fc2"]),
        decoder([f"linear_attn.{x}" for x in GDN], SELF_QKVO),
    ),
    # MoE: the fused experts are two parameters (PEFT target_parameters), the routers nothing
    "qwen3_vl_moe": (
        blocks("model.visual.blocks", 2, QWEN_ATTN, ["mlp.linear_fc1", "mlp.linear_fc2"]),
        blocks("model.language_model.layers", 2, SELF_QKVO, EXPERTS),
    ),
    "qwen3_5_moe": (
        blocks("model.visual.blocks", 2, QWEN_ATTN, ["mlp.linear_fc1", "mlp.linear_fc2"]),
        [
            ("model.language_model.layers.0", [f"linear_attn.{x}" for x in GDN], SHARED + EXPERTS),
            ("model.language_model.layers.1", SELF_QKVO, SHARED + EXPERTS),
        ],
    ),
    "mllama": (
        blocks(
            "model.vision_model.transformer.layers",
            2,
            [f"self_attn.{x}" for x in QKVO],
            ["mlp.fc1", "mlp.fc2"],
        )
        + blocks(
            "model.vision_model.global_transformer.layers",
            1,
            [f"self_attn.{x}" for x in QKVO],
            ["mlp.fc1", "mlp.fc2"],
        ),
        decoder(SELF_QKVO, [f"cross_attn.{x}" for x in QKVO], SELF_QKVO),
    ),
    "pixtral": (PIXTRAL, LANG),
    "mistral3": (PIXTRAL, LANG),
    "llava": (CLIP, LANG),
    "llava_next": (CLIP, LANG),
    "gemma3": (CLIP, LANG),
    # vision linears inside Gemma4ClippableLinear; layer 1 (full attention, attention_k_eq_v)
    # has no v_proj
    "gemma4": (
        blocks(
            "model.vision_tower.encoder.layers",
            2,
            [f"self_attn.{x}.linear" for x in QKVO],
            [f"mlp.{x}.linear" for x in GUD],
        ),
        decoder(SELF_QKVO, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj"]),
    ),
    "idefics3": (
        blocks(
            "model.vision_model.encoder.layers",
            2,
            [f"self_attn.{x}" for x in CLIP_QKVO],
            ["mlp.fc1", "mlp.fc2"],
        ),
        blocks(
            "model.text_model.layers",
            2,
            [f"self_attn.{x}" for x in QKVO],
            [f"mlp.{x}" for x in GUD],
        ),
    ),
}
SPEC["smolvlm"] = SPEC["idefics3"]
SPEC["internvl"] = (
    blocks(
        "model.vision_tower.encoder.layer",
        2,
        [f"attention.{x}" for x in ["q_proj", "k_proj", "v_proj", "projection_layer"]],
        ["mlp.fc1", "mlp.fc2"],
    ),
    LANG,
)
SPEC["llava_onevision"] = (CLIP, LANG)
# What the template puts between the assistant marker and the answer.
ANSWER_PREFIX = {"llava": " ", "llava_next": " ", "idefics3": " ", "smolvlm": " "}


def expected(family, vision, language, attention, mlp):
    v_layers, l_layers = SPEC[family]
    names = []
    for on, layers in ((vision, v_layers), (language, l_layers)):
        if on:
            for layer, attn, ffn in layers:
                names += [
                    f"{layer}.{n}" for n in (attn if attention else []) + (ffn if mlp else [])
                ]
    return sorted(names)


def end_of_turn(family, tiny_model) -> str:
    """What closes an assistant turn: the token the built tiny model stops generating at, which
    must be the registry's `end_of_turn`."""
    from transformers import AutoTokenizer, GenerationConfig

    path = tiny_model(family)
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    token = AutoTokenizer.from_pretrained(path).convert_ids_to_tokens(eos)
    assert token == FAMILIES[family].end_of_turn, (family, token)
    return token


def lora_cfg(**kw):
    return resolve_sections({"lora": kw}, ["lora"])["lora"]


@pytest.fixture(scope="module")
def base_models(tiny_model):
    from transformers import AutoModelForImageTextToText

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_selection_is_exact_for_every_flag_combination(family, base_models):
    model = base_models(family)
    named = list(model.named_modules())
    assert sorted(SPEC) == FAMILY_NAMES
    for flags in itertools.product([True, False], repeat=4):
        kw = dict(zip(("vision", "language", "attention", "mlp"), flags))
        want = expected(family, **kw)
        cfg = lora_cfg(
            finetune_vision_layers=kw["vision"],
            finetune_language_layers=kw["language"],
            finetune_attention_modules=kw["attention"],
            finetune_mlp_modules=kw["mlp"],
        )
        if not want:
            with pytest.raises(ValueError, match="no linear module"):
                lora_target_modules(named, FAMILIES[family], cfg)
            continue
        got = sorted(lora_target_modules(named, FAMILIES[family], cfg))
        assert got == want, (family, kw)


def lora_name(name, module):
    """A LoRA layer's name; for a ParamWrapper (fused MoE experts, nested one per parameter) the
    parameter it adapts."""
    param = getattr(module, "parameter_name", None)
    return f"{name.replace('.base_layer', '')}.{param}" if param else name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_peft_wraps_exactly_the_selection_and_saves_the_projector(family, base_models):
    """Through PEFT itself: all four flags on, then each one off."""
    from peft import get_peft_model

    from vlmflow.modeling import lora_config

    fam = FAMILIES[family]
    combos = [(True,) * 4] + [tuple(i != j for j in range(4)) for i in range(4)]
    for flags in combos:
        model = copy.deepcopy(base_models(family))
        cfg = lora_cfg(
            r=2,
            finetune_vision_layers=flags[0],
            finetune_language_layers=flags[1],
            finetune_attention_modules=flags[2],
            finetune_mlp_modules=flags[3],
            modules_to_save=["projector"],
        )
        targets = lora_target_modules(model.named_modules(), fam, cfg)
        save = modules_to_save(model, fam, cfg["modules_to_save"])
        peft_model = get_peft_model(model, lora_config(fam, cfg, targets, save))
        wrapped = sorted(
            lora_name(n.removeprefix("base_model.model."), m)
            for n, m in peft_model.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
        )
        assert wrapped == expected(family, *flags), (family, flags)
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        for proj in save:
            assert any(f"{proj}.modules_to_save." in n for n in trainable), proj
        assert not any("lm_head" in n for n in trainable)


def encoder_for(family, tiny_model, **kw):
    from vlmflow.modeling import load_processor

    model_cfg = resolve_sections({"model": {"name": tiny_model(family)}}, ["model"])["model"]
    return Encoder(load_processor(model_cfg), FAMILIES[family], max_seq_length=512, **kw)


def kept_runs(labels):
    """Contiguous runs of trained positions, as lists of token ids."""
    runs, cur = [], []
    for t in labels.tolist():
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_label_masks_are_exact(family, tiny_model, chat_rows):
    enc = encoder_for(family, tiny_model)
    tok = enc.tokenizer
    eot, sp = end_of_turn(family, tiny_model), ANSWER_PREFIX.get(family, "")
    answers = [["7"], ["a red circle", "yes"], ["2"]]
    samples = [enc(r) for r in chat_rows]
    image_ids = {tok.convert_tokens_to_ids(t) for t in FAMILIES[family].image_tokens}
    for row, sample, turns in zip(chat_rows, samples, answers):
        ids, labels = sample["input_ids"], sample["labels"]
        runs = kept_runs(labels)
        # one contiguous run per assistant turn: its answer and the end-of-turn token, nothing else
        assert [tok.decode(r) for r in runs] == [f"{sp}{a}{eot}" for a in turns], row["id"]
        assert runs[-1][-1] == tok.convert_tokens_to_ids(eot)
        # kept labels are the input ids themselves (the model shifts them)
        keep = labels != IGNORE_INDEX
        assert torch.equal(labels[keep], ids[keep])
        n_image_tokens = int(sum((ids == i).sum() for i in image_ids))
        assert (n_image_tokens > 0) == bool(row["images"])
        assert all(labels[ids == i].eq(IGNORE_INDEX).all() for i in image_ids)

    batch = collate(samples, enc.pad_id, FAMILIES[family].batch_layout)
    for i, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        assert torch.equal(batch["labels"][i, :n], s["labels"])
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()  # padding never trains
        assert (batch["input_ids"][i, n:] == enc.pad_id).all()
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()


def test_pad_equal_to_end_of_turn_still_trains_the_end_of_turn(tiny_model, chat_rows):
    """Idefics3/SmolVLM ship pad == eos == <end_of_utterance>: the answer's closing token is
    trained, the padding after it (the same id) is not."""
    enc = encoder_for("idefics3", tiny_model)
    eou = enc.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert enc.pad_id == eou == enc.tokenizer.eos_token_id
    short, long = enc(chat_rows[2]), enc(chat_rows[1])
    batch = collate([short, long], enc.pad_id, FAMILIES["idefics3"].batch_layout)
    n = short["input_ids"].shape[0]
    assert batch["labels"][0, n - 1] == eou  # the end-of-turn token of the answer
    assert (batch["input_ids"][0, n:] == eou).all()  # padding: same id ...
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # ... never trained


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_sequence_labels_still_mask_image_tokens(family, tiny_model, chat_rows):
    enc = encoder_for(family, tiny_model, train_on_responses_only=False)
    s = enc(chat_rows[0])
    image_ids = [enc.tokenizer.convert_tokens_to_ids(t) for t in FAMILIES[family].image_tokens]
    is_image = torch.isin(s["input_ids"], torch.tensor(image_ids))
    assert is_image.any()
    assert (s["labels"][is_image] == IGNORE_INDEX).all()
    assert torch.equal(s["labels"][~is_image], s["input_ids"][~is_image])


def train_config(model, **model_kw):
    return resolve_sections(
        {
            "model": {"name": model, "max_seq_length": 512, **model_kw},
            "lora": {"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]},
            "train": {
                "per_device_train_batch_size": 3,
                "gradient_accumulation_steps": 1,
                "max_steps": 8,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "lr_scheduler_type": "constant",
                "optim": "adamw_torch",
                "weight_decay": 0.0,
                "use_gradient_checkpointing": False,
                "cache_encoded": True,
                "seed": 0,
            },
        },
        ["model", "lora", "train"],
    )


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_trains_reloads_identically_and_generation_stops(
    family, tiny_model, chat_rows, tmp_path
):
    """16-bit LoRA on a batch mixing one image, two images over two turns, and no image."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmflow.train import read_log, train

    res = train(train_config(tiny_model(family)), chat_rows, tmp_path / "a", tmp_path / "w")
    losses = [r["loss"] for r in read_log(tmp_path / "a" / "train_log.jsonl")]
    assert losses[-1] < 0.5 * losses[0], losses

    # plain PEFT, no vlmflow code: same logits as the model in memory
    proc = AutoProcessor.from_pretrained(tmp_path / "a")
    enc = Encoder(proc, FAMILIES[family], max_seq_length=512)
    batch = collate([enc(r) for r in chat_rows], enc.pad_id, FAMILIES[family].batch_layout)
    trained = res.model.eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "a").eval()
    with torch.no_grad():
        want = trained(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # greedy generation answers and stops at the end-of-turn token
    eot = enc.tokenizer.convert_tokens_to_ids(end_of_turn(family, tiny_model))
    text, images = enc.prompt(chat_rows[0])
    inputs = proc(text=[text], images=[images], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = reloaded.generate(
            **inputs, max_new_tokens=8, do_sample=False, eos_token_id=eot, pad_token_id=enc.pad_id
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert eot in new, enc.tokenizer.decode(new)
    assert enc.tokenizer.decode(new[: new.index(eot)]).strip() == "7"
    assert len(new) == new.index(eot) + 1  # nothing generated after it


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qlora_4bit_trains_with_the_vision_side_unquantized(
    family, tiny_model, chat_rows, tmp_path
):
    pytest.importorskip("bitsandbytes")
    from vlmflow.train import read_log, train

    cfg = train_config(tiny_model(family), load_in_4bit=True)
    cfg["train"]["max_steps"] = 3
    res = train(cfg, chat_rows, tmp_path / "a", tmp_path / "w")
    losses = [r["loss"] for r in read_log(tmp_path / "a" / "train_log.jsonl")]
    assert losses[-1] < losses[0], losses
    fam = FAMILIES[family]
    kinds = {
        n.removeprefix("base_model.model."): type(m).__name__ for n, m in res.model.named_modules()
    }
    language = [n for n, k in kinds.items() if k == "Linear4bit"]
    assert language and all(not n.startswith(fam.vision_tower + fam.projector) for n in language)
    vision_linear = [
        n
        for n, k in kinds.items()
        if k == "Linear" and n.startswith(fam.vision_tower) and "lora_" not in n
    ]
    assert vision_linear  # the tower stays in 16-bit
