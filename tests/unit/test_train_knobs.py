"""The FastVisionModel / SFTConfig knobs beyond the defaults: gradient checkpointing modes,
target_modules, rsLoRA, random_state, 8-bit loading, attention kernel, remote code, chat-template
repair, schedulers, optimizers, and the non-finite-loss stop."""

import json

import pytest
import torch

from vlmflow.collate import Encoder, collate
from vlmflow.config import resolve_sections
from vlmflow.families import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")


def sections(model, lora=None, train=None, **model_kw):
    return resolve_sections(
        {
            "model": {"name": model, "max_seq_length": 512, **model_kw},
            "lora": {"r": 4, "lora_alpha": 8, **(lora or {})},
            "train": {"use_gradient_checkpointing": False, **(train or {})},
        },
        ["model", "lora", "train"],
    )


def lora_b_drawn_and_batch(model, proc, fam, rows) -> dict:
    """LoRA B drawn non-zero (it starts at zero, which would make A's gradient zero too), and
    `rows` encoded and collated for the model's family."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    enc = Encoder(proc, fam, max_seq_length=512)
    return collate([enc(r) for r in rows], enc.pad_id, fam.batch_layout)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mllama"])
def test_offloaded_checkpointing_has_the_numerics_of_true_and_false(family, tiny_model, chat_rows):
    """Same loss and same gradients (LoRA A and B, vision and language side) with
    use_gradient_checkpointing false / true / offload; offload moved layer inputs to the host
    and brought them back. Mllama passes the image states to its cross-attention layers."""
    from vlmflow.modeling import build_training_model

    results = {}
    for mode in (False, True, "offload"):
        cfg = sections(tiny_model(family), train={"use_gradient_checkpointing": mode})
        model, proc, fam = build_training_model(cfg, torch.device("cpu"))
        batch = lora_b_drawn_and_batch(model, proc, fam, chat_rows)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (loss.item(), grads, model.vlmflow_offloader)
    ref_loss, ref_grads, _ = results[False]
    assert any("visual" in n or "vision" in n for n, g in ref_grads.items() if g.abs().sum() > 0)
    for mode in (True, "offload"):
        loss, grads, _ = results[mode]
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert results[True][2] is None
    offloader = results["offload"][2]
    assert offloader.offloaded_bytes > 0 and offloader.restored > 0


def test_offloaded_inputs_come_back_with_their_strides():
    """A checkpointed layer's input that is a transposed view (Gemma 3's SigLIP patch
    embeddings) is restored for the recomputation with its own strides, not contiguous: a
    compiled layer's graph asserts them (it failed so on an H200). Overlapping views (expand)
    come back dense. Same loss and gradient as without offloading. On the CPU the round trip
    runs the host path; the GPU path allocates both copies with `_same_layout`, checked here
    directly (a plain `torch.empty(size)` there was the bug)."""
    from vlmflow.offload import OffloadedCheckpoint, _same_layout

    seen = []
    weight = torch.randn(6, 6, dtype=torch.float64)

    def layer(x):
        seen.append(x.stride())
        return torch.tanh(x @ weight).sum()

    base = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    offloader = OffloadedCheckpoint()
    loss = offloader(layer, base.transpose(1, 2))
    loss.backward()
    assert offloader.offloaded_bytes > 0 and offloader.restored > 0
    assert seen == [(30, 1, 5), (30, 1, 5)]  # the call and its recomputation
    grad = base.grad.clone()
    base.grad = None
    layer(base.transpose(1, 2)).backward()
    torch.testing.assert_close(grad, base.grad)

    assert _same_layout(base.transpose(1, 2), "cpu").stride() == (30, 1, 5)
    expanded = torch.randn(3, 1).expand(3, 5)
    assert _same_layout(expanded, "cpu").stride() == (5, 1)


def test_checkpointing_modes_are_validated():
    from vlmflow.modeling import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="use_gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "sometimes")


def test_auto_checkpointing_offloads_where_measured_on_a_gpu():
    """The default, auto: offloaded checkpointing on CUDA for a 4-bit / 8-bit base of a family
    measured with it, and for a 16-bit base of a family measured with it in 16-bit (Pixtral,
    not Mllama); plain checkpointing on the CPU (where the host copy is a second copy in the
    same memory) and for the other families; explicit settings as given."""
    from vlmflow.modeling import gradient_checkpointing_mode as mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_sections({}, ["train"])["train"]["use_gradient_checkpointing"] == "auto"
    four = {"load_in_4bit": True, "load_in_8bit": False}
    eight = {"load_in_4bit": False, "load_in_8bit": True}
    sixteen = {"load_in_4bit": False, "load_in_8bit": False}
    pixtral, mllama = FAMILIES["pixtral"], FAMILIES["mllama"]
    assert pixtral.offload_quantized and not mllama.offload_quantized
    assert mode("auto", four, cuda, pixtral) == "offload"
    assert mode("auto", eight, cuda, pixtral) == "offload"
    assert pixtral.offload_16bit and not mllama.offload_16bit
    assert mode("auto", sixteen, cuda, pixtral) == "offload"
    assert mode("auto", sixteen, cpu, pixtral) is True
    assert mode("auto", four, cpu, pixtral) is True
    assert mode("auto", four, cuda, mllama) is True
    assert mode("auto", sixteen, cuda, mllama) is True
    gemma = FAMILIES["gemma3"]  # offloads its 4-bit base only
    assert mode("auto", four, cuda, gemma) == "offload"
    assert mode("auto", sixteen, cuda, gemma) is True
    assert {n for n, f in FAMILIES.items() if f.offload_16bit} == {
        "qwen2_vl",
        "qwen3_vl",
        "pixtral",
        "llava",
        "llava_next",
    }
    for setting in (False, True, "offload", "unsloth"):
        assert mode(setting, four, cuda, pixtral) == setting
        assert mode(setting, sixteen, cpu, mllama) == setting


def test_build_training_model_applies_the_resolved_checkpointing(tiny_qwen, monkeypatch):
    """build_training_model checkpoints as `gradient_checkpointing_mode` resolves `auto`: plain
    on the CPU; offloaded where it resolves to offload (as for a 4-bit base on a GPU)."""
    from vlmflow import modeling

    cfg = sections(tiny_qwen, train={"use_gradient_checkpointing": "auto"})
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    assert model.is_gradient_checkpointing and model.vlmflow_offloader is None

    resolved = modeling.gradient_checkpointing_mode
    monkeypatch.setattr(
        modeling,
        "gradient_checkpointing_mode",
        lambda s, m, d, f: "offload" if s == "auto" and f.offload_quantized else s,
    )
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    assert model.is_gradient_checkpointing and model.vlmflow_offloader is not None
    assert resolved("auto", cfg["model"], torch.device("cpu"), FAMILIES["qwen2_vl"]) is True


def test_unsloth_is_an_alias_of_offload_in_the_schema():
    cfg = resolve_sections({"train": {"use_gradient_checkpointing": "unsloth"}}, ["train"])
    assert cfg["train"]["use_gradient_checkpointing"] == "unsloth"
    from vlmflow.config import ConfigError

    with pytest.raises(ConfigError, match="use_gradient_checkpointing"):
        resolve_sections({"train": {"use_gradient_checkpointing": "yes"}}, ["train"])


@pytest.fixture(scope="module")
def qwen_named(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    return list(AutoModelForImageTextToText.from_pretrained(tiny_qwen).named_modules())


def test_target_modules_list_and_regex(qwen_named):
    from vlmflow.modeling import lora_target_modules

    fam = FAMILIES["qwen2_5_vl"]

    def lora(**kw):
        return resolve_sections({"lora": kw}, ["lora"])["lora"]

    # a list names linears inside the layers the vision/language flags select
    got = lora_target_modules(qwen_named, fam, lora(target_modules=["q_proj", "down_proj"]))
    assert sorted(got) == sorted(
        [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(2)]
        + [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)]
        + [f"model.visual.blocks.{i}.mlp.down_proj" for i in range(2)]
    )
    got = lora_target_modules(
        qwen_named,
        fam,
        lora(target_modules=["down_proj"], finetune_vision_layers=False),
    )
    assert sorted(got) == [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)]
    # a regex is matched against full names, flags not applied: here also the projector
    got = lora_target_modules(
        qwen_named, fam, lora(target_modules=r".*merger\.mlp\.\d+", finetune_vision_layers=False)
    )
    assert sorted(got) == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    with pytest.raises(ValueError, match="selects no linear module"):
        lora_target_modules(qwen_named, fam, lora(target_modules=r"nothing\.here"))


def test_rslora_scaling_and_random_state(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    from vlmflow.modeling import apply_lora

    fam = FAMILIES["qwen2_5_vl"]

    def build(**kw):
        base = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
        cfg = resolve_sections({"lora": {"r": 4, "lora_alpha": 8, **kw}}, ["lora"])["lora"]
        model = apply_lora(base, fam, cfg)
        q = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
        return q.scaling["default"], q.lora_A["default"].weight.detach().clone()

    s_plain, a1 = build(random_state=1)
    s_rs, _ = build(use_rslora=True)
    assert s_plain == 8 / 4 and s_rs == 8 / 4**0.5
    _, a1_again = build(random_state=1)
    _, a2 = build(random_state=2)
    assert torch.equal(a1, a1_again) and not torch.equal(a1, a2)


def test_load_in_8bit_keeps_the_vision_side_in_16_bit_and_trains(tiny_qwen, chat_rows):
    pytest.importorskip("bitsandbytes")
    from vlmflow.modeling import build_training_model

    model, proc, fam = build_training_model(
        sections(tiny_qwen, load_in_8bit=True), torch.device("cpu")
    )
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert any(k == "Linear8bitLt" and "language_model" in n for n, k in kinds.items())
    assert not any(k == "Linear8bitLt" and "visual" in n for n, k in kinds.items())
    enc = Encoder(proc, fam, max_seq_length=512)
    loss = model(**collate([enc(r) for r in chat_rows], enc.pad_id)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_4bit_and_8bit_together_is_an_error(tiny_qwen):
    from vlmflow.modeling import load_model

    cfg = sections(tiny_qwen, load_in_4bit=True, load_in_8bit=True)["model"]
    with pytest.raises(ValueError, match="load_in_4bit and model.load_in_8bit"):
        load_model(cfg, torch.device("cpu"))


def test_dtype_and_attention_kernel(tiny_qwen):
    from vlmflow.modeling import load_model, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    cfg = sections(tiny_qwen, attn_implementation="eager", dtype="bfloat16")["model"]
    model, _ = load_model(cfg, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_remote_code_never_runs_unless_the_config_allows_it(tmp_path):
    from vlmflow.modeling import model_family

    marker = tmp_path / "executed"
    (tmp_path / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
        )
    )
    cfg = resolve_sections({"model": {"name": str(tmp_path)}}, ["model"])["model"]
    assert cfg["trust_remote_code"] is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        model_family(str(tmp_path), cfg)
    assert not marker.exists()


def test_templates_that_do_not_close_answers_are_replaced(tiny_model, tiny_qwen):
    from transformers import AutoProcessor

    from vlmflow.modeling import ensure_chat_template

    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
    ]
    llava = AutoProcessor.from_pretrained(tiny_model("llava"))
    assert not llava.apply_chat_template(msgs, tokenize=False).rstrip().endswith("</s>")
    assert ensure_chat_template(llava, FAMILIES["llava"]) is True
    assert llava.apply_chat_template(msgs, tokenize=False) == "USER: q ASSISTANT: a</s>"
    assert ensure_chat_template(llava, FAMILIES["llava"]) is False

    qwen = AutoProcessor.from_pretrained(tiny_qwen)
    before = qwen.chat_template
    assert ensure_chat_template(qwen, FAMILIES["qwen2_5_vl"]) is False
    assert qwen.chat_template == before
    qwen.chat_template = "{% for m in messages %}{{ m['role'] }}: x\n{% endfor %}"
    with pytest.raises(ValueError, match="does not end assistant turns"):
        ensure_chat_template(qwen, FAMILIES["qwen2_5_vl"])


def test_epochs_schedulers_and_optimizers():
    from vlmflow.train import build_optimizer, build_scheduler, total_steps

    train = resolve_sections({"train": {"max_steps": None, "num_train_epochs": 2}}, ["train"])
    t = train["train"]
    t.update(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert total_steps(t, 10) == 5  # ceil(10 samples x 2 epochs / 4 per step)
    t["num_train_epochs"] = 0.5
    assert total_steps(t, 10) == 2

    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    t.update(optim="adamw_torch", learning_rate=1.0, warmup_steps=2, lr_scheduler_type="cosine")
    opt = build_optimizer(p, t, torch.device("cpu"))
    sched = build_scheduler(opt, t, 6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[3] < 1.0 and lrs[5] < lrs[4]
    t["lr_scheduler_type"] = "constant_with_warmup"
    sched = build_scheduler(build_optimizer(p, t, torch.device("cpu")), t, 6)
    assert sched.get_last_lr()[0] == 0.0

    pytest.importorskip("bitsandbytes")
    names = {
        "adamw_8bit": "AdamW8bit",
        "paged_adamw_8bit": "PagedAdamW8bit",
        "paged_adamw": "PagedAdamW",
        "paged_adamw_32bit": "PagedAdamW32bit",
    }
    for optim, cls in names.items():
        t["optim"] = optim
        assert type(build_optimizer(p, t, torch.device("cpu"))).__name__ == cls


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tiny_qwen, chat_rows, tmp_path, monkeypatch
):
    import vlmflow.train as T

    cfg = sections(
        tiny_qwen,
        train={
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 1,
            "max_steps": 5,
            "save_steps": 2,
            "optim": "adamw_torch",
            "cache_encoded": True,
        },
    )
    orig = T.train_step
    calls = []

    def poisoned(model, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # step 3: a weight goes bad
            lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                lora_b.fill_(float("nan"))
        return orig(model, *a, **k)

    monkeypatch.setattr(T, "train_step", poisoned)
    with pytest.raises(T.NonFiniteLossError, match="at step 3"):
        T.train(cfg, chat_rows, tmp_path / "adapter", tmp_path / "work")
    assert not (tmp_path / "adapter").exists()
    ckpts = sorted(p.name for p in (tmp_path / "work").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-00000002"]
    assert [r["step"] for r in T.read_log(tmp_path / "work" / "train_log.jsonl")] == [1, 2]

    # the kept checkpoint is good: a re-run resumes from it and finishes
    monkeypatch.setattr(T, "train_step", orig)
    res = T.train(cfg, chat_rows, tmp_path / "adapter", tmp_path / "work")
    assert res.resumed_from == 2 and res.steps == 5
    assert all(
        torch.isfinite(torch.tensor(r["loss"]))
        for r in T.read_log(tmp_path / "adapter" / "train_log.jsonl")
    )


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_host_embeddings_and_compiled_layers_keep_the_numerics(tiny_qwen, chat_rows):
    """model.offload_embeddings (lookup on the CPU) and regionally compiled layers (checked with
    the aot_eager backend: same graphs as inductor, without its C++ build) give the plain
    model's loss and gradients."""
    from vlmflow.modeling import build_training_model
    from vlmflow.offload import HostEmbedding
    from vlmflow.patches import compile_layers

    results = []
    for offload, compiled in ((False, False), (True, False), (False, True)):
        cfg = sections(
            tiny_qwen, train={"use_gradient_checkpointing": True}, offload_embeddings=offload
        )
        model, proc, fam = build_training_model(cfg, torch.device("cpu"))
        assert isinstance(model.get_input_embeddings(), HostEmbedding) == offload
        if compiled:
            n_layers = len(model.base_model.model.model.language_model.layers)
            n_blocks = len(model.base_model.model.model.visual.blocks)
            assert compile_layers(model, backend="aot_eager") == n_layers + n_blocks
        batch = lora_b_drawn_and_batch(model, proc, fam, chat_rows)
        results.append(_loss_and_grads(model, batch))
    ref_loss, ref_grads = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_host_embeddings_are_not_used_for_trained_embeddings(tiny_qwen):
    from vlmflow.modeling import build_training_model
    from vlmflow.offload import HostEmbedding

    cfg = sections(tiny_qwen, lora={"modules_to_save": ["embed_tokens"]}, offload_embeddings=True)
    model, _, _ = build_training_model(cfg, torch.device("cpu"))
    assert not isinstance(model.get_input_embeddings(), HostEmbedding)


def test_compile_auto_is_on_for_measured_families_on_cuda_only():
    from vlmflow.modeling import use_compile

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_compile("auto", FAMILIES["qwen2_5_vl"], cuda)
    assert not use_compile("auto", FAMILIES["qwen2_5_vl"], cpu)
    for unmeasured in ("qwen3_5", "qwen3_5_moe", "qwen3_vl_moe", "smolvlm"):
        assert not use_compile("auto", FAMILIES[unmeasured], cuda), unmeasured
    for measured in (
        "gemma3",
        "gemma4",
        "mllama",
        "pixtral",
        "mistral3",
        "llava",
        "llava_next",
        "idefics3",
        "internvl",
        "llava_onevision",
    ):
        assert use_compile("auto", FAMILIES[measured], cuda), measured
    assert not use_compile("auto", FAMILIES["gemma4"], cpu)
    assert use_compile(True, FAMILIES["mllama"], cpu) and not use_compile(
        False, FAMILIES["qwen2_5_vl"], cuda
    )


def test_fp16_steps_use_loss_scaling_and_skip_an_overflowing_step(tiny_qwen, chat_rows):
    """model.dtype float16: the step scales the loss, unscales the gradients, updates the LoRA
    weights; when the scaled gradients overflow, the weights stay and the scale is halved."""
    from vlmflow.modeling import build_training_model
    from vlmflow.train import build_optimizer, build_scheduler, train_step

    cfg = sections(
        tiny_qwen, lora={"modules_to_save": []}, train={"warmup_steps": 0}, dtype="float16"
    )
    model, proc, fam = build_training_model(cfg, torch.device("cpu"))
    assert model.get_input_embeddings().weight.dtype == torch.float16
    batch = lora_b_drawn_and_batch(model, proc, fam, chat_rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, {**cfg["train"], "learning_rate": 1e-2}, torch.device("cpu"))
    sched = build_scheduler(opt, cfg["train"], 10)
    model.train()

    def step(scaler):
        before = [p.detach().clone() for p in params]
        res = train_step(
            model,
            [batch],
            opt,
            sched,
            params,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            scaler=scaler,
        )
        changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
        return res, changed

    ok = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    res, changed = step(ok)
    assert res.loss == res.loss and 0 < res.grad_norm < float("inf")  # finite, unscaled norm
    assert changed == len(params) and ok.get_scale() == 2.0**10

    huge = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow
    res, changed = step(huge)
    assert changed == 0 and huge.get_scale() == 2.0**39


def _saved_bytes_of_a_training_forward(model, batch) -> int:
    """Bytes autograd keeps for the backward pass of one forward (checkpointed layers keep only
    what their checkpoint needs)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(saved)


def test_layers_transformers_does_not_checkpoint_are_checkpointed(tiny_model, chat_rows):
    """Mllama's vision encoder layers are plain modules in transformers (not
    GradientCheckpointingLayer): with checkpointing on they are checkpointed too (their class
    name unchanged, for regional compile), and the forward keeps far fewer activations."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from vlmflow.modeling import build_training_model

    saved = {}
    for mode in (False, True):
        cfg = sections(tiny_model("mllama"), train={"use_gradient_checkpointing": mode})
        model, proc, fam = build_training_model(cfg, torch.device("cpu"))
        vision = [
            m
            for n, m in model.named_modules()
            if n.endswith(("transformer.layers.0", "global_transformer.layers.0"))
        ]
        assert len(vision) == 2
        for m in vision:
            assert type(m).__name__ == "MllamaVisionEncoderLayer"
            assert isinstance(m, GradientCheckpointingLayer) == bool(mode)
            assert getattr(m, "gradient_checkpointing", False) == bool(mode)
        model.train()
        saved[mode] = _saved_bytes_of_a_training_forward(
            model, lora_b_drawn_and_batch(model, proc, fam, chat_rows)
        )
    assert saved[True] < 0.5 * saved[False]


def test_checkpointing_leaves_layers_transformers_checkpoints_alone(tiny_model):
    from vlmflow.modeling import load_model
    from vlmflow.patches import checkpoint_every_layer

    model, fam = load_model(sections(tiny_model("qwen2_5_vl"))["model"], torch.device("cpu"))
    before = {n: type(m) for n, m in model.named_modules()}
    assert checkpoint_every_layer(model, fam) == 0
    assert {n: type(m) for n, m in model.named_modules()} == before
