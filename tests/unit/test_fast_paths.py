"""train.fast_paths: every monkeypatch can be switched off; a patch a family takes that patches
nothing, transformers / PEFT outside the tested range and a failed compile are logged."""

import logging
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from vlmflow import modeling, patches
from vlmflow.config import resolve_sections
from vlmflow.families import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")


def sections(model, fast_paths=None, **train):
    return resolve_sections(
        {
            "model": {"name": model, "max_seq_length": 512},
            "lora": {"r": 4, "lora_alpha": 8},
            "train": {
                "use_gradient_checkpointing": False,
                "fast_paths": fast_paths or {},
                **train,
            },
        },
        ["model", "lora", "train"],
    )


def patched_modules(model) -> Counter:
    """How many modules each patch changed, read off the model itself."""
    declared = FAMILIES["qwen2_5_vl"].patches
    kinds = Counter()
    for m in model.modules():
        name, cfg = type(m).__name__, getattr(m, "config", None)
        for patch in ("vision_attention", "patch_embed"):
            kinds[patch] += name in declared[patch] and "forward" in vars(m)
        kinds["lora"] += hasattr(m, "_vlmflow_peft_forward")
        kinds["padded_attention"] += "vlmflow_padded_attention" in vars(m)
        kinds["compile"] += bool(getattr(m, "_vlmflow_compiled", False))
        kinds["packed_attention"] += getattr(m, "is_causal", False) and (
            getattr(cfg, "_attn_implementation", None) == patches.PACKED_ATTENTION
        )
    return +kinds  # the patches that changed something


def compile_with_aot_eager(mp):
    """train.compile with the aot_eager backend: no C++ build on the CPU (nothing runs here)."""
    orig = patches.compile_layers
    mp.setattr(
        modeling, "compile_layers", lambda model, **kw: orig(model, backend="aot_eager", **kw)
    )


@pytest.fixture(scope="module")
def all_on(tiny_qwen):
    with pytest.MonkeyPatch.context() as mp:
        compile_with_aot_eager(mp)
        cfg = sections(tiny_qwen, compile=True, packing=True)
        model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    return patched_modules(model)


@pytest.mark.parametrize(
    "patch",
    ["vision_attention", "patch_embed", "lora", "packed_attention", "padded_attention", "compile"],
)
def test_each_fast_path_can_be_switched_off(patch, tiny_qwen, all_on, monkeypatch):
    compile_with_aot_eager(monkeypatch)
    cfg = sections(tiny_qwen, {patch: False}, compile=True, packing=True)
    assert cfg["train"]["fast_paths"] == {
        **{k: True for k in cfg["train"]["fast_paths"]},
        patch: False,
    }  # schema defaults: all on
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    got = patched_modules(model)
    assert all_on[patch] > 0
    assert patch not in got
    assert {k: v for k, v in all_on.items() if k != patch} == got  # the others stay on


def test_the_gated_delta_fallback_can_be_switched_off(tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(modeling, "fla_backward_broken", lambda device: "broken here")
    monkeypatch.setattr(modeling, "use_torch_gated_delta_rule", lambda m: calls.append(m) or 1)
    for on in (True, False):
        cfg = sections(tiny_model("qwen3_5"), {"torch_gated_delta_rule": on})
        modeling.build_training_model(cfg, torch.device("cpu"))
    assert len(calls) == 1  # only with the switch on


def test_a_declared_patch_that_patches_nothing_is_a_warning(tiny_qwen, caplog, monkeypatch):
    fam = FAMILIES["qwen2_5_vl"]
    renamed = {**fam.patches, "vision_attention": ("Qwen2_5_VLRenamedAttention",)}
    monkeypatch.setitem(FAMILIES, "qwen2_5_vl", replace(fam, patches=renamed))
    with caplog.at_level(logging.WARNING, logger="vlmflow.patches"):
        modeling.build_training_model(sections(tiny_qwen), torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "vision_attention" in warned[0] and "qwen2_5_vl" in warned[0]
    assert "Qwen2_5_VLRenamedAttention" in warned[0]
    caplog.clear()
    # the real class names: silent
    monkeypatch.setitem(FAMILIES, "qwen2_5_vl", fam)
    with caplog.at_level(logging.WARNING, logger="vlmflow.patches"):
        modeling.build_training_model(sections(tiny_qwen), torch.device("cpu"))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_untested_transformers_or_peft_is_one_warning_with_the_range(caplog, monkeypatch):
    assert patches.untested_versions({"transformers": "5.17.0", "peft": "0.21.2"}) == []
    assert patches.untested_versions({"transformers": "5.18.0", "peft": "0.20.9"}) == [
        "transformers 5.18.0",
        "peft 0.20.9",
    ]
    assert patches.untested_versions() == []  # the pinned versions are the tested ones
    monkeypatch.setattr(patches, "_VERSIONS_CHECKED", [])
    monkeypatch.setattr(patches, "untested_versions", lambda: ["transformers 6.0.0"])
    with caplog.at_level(logging.WARNING, logger="vlmflow.patches"):
        patches.warn_untested_versions()
        patches.warn_untested_versions()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert "transformers 6.0.0" in warned[0] and "transformers >=5.17,<5.18" in warned[0]
    assert "peft >=0.21,<0.22" in warned[0]


class ToyDecoderLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.linear(x))


def test_a_failed_compile_names_the_layer_and_runs_it_eagerly(caplog):
    import torch._dynamo

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no kernel for you")

    # torch's own config patch, not pytest's monkeypatch: its undo deletes the attribute of
    # torch's config module, which hides `suppress_errors` from every later torch.compile
    # in the process ("torch._dynamo.config.suppress_errors does not exist").
    with torch._dynamo.config.patch(suppress_errors=False):
        _compile_with_a_failing_backend(caplog, failing_backend)
    assert torch._dynamo.config.suppress_errors is False


def _compile_with_a_failing_backend(caplog, failing_backend):
    torch._dynamo.reset()
    net = torch.nn.Sequential(ToyDecoderLayer(), ToyDecoderLayer())
    x = torch.randn(3, 4)
    want = net(x)
    assert patches.compile_layers(net, backend=failing_backend) == 2
    assert torch._dynamo.config.suppress_errors is False  # not switched on process-wide
    with caplog.at_level(logging.WARNING, logger="vlmflow.patches"):
        got = net(x)
        again = net(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # once per layer, not once per call
    assert "layer 0 (ToyDecoderLayer)" in warned[0] and "layer 1 (ToyDecoderLayer)" in warned[1]
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "family, patch, cls, name",
    [
        ("mllama", "tile_attention", "MllamaVisionAttention", patches.TILE_ATTENTION),
        ("pixtral", "block_attention", "PixtralAttention", patches.BLOCK_ATTENTION),
    ],
)
@pytest.mark.parametrize("on", [True, False])
def test_vision_attention_functions_follow_their_switch(tiny_model, family, patch, cls, name, on):
    """A family's own vision attention function (Mllama's tile attention, Pixtral's block
    attention) is what its vision attention modules use, unless `train.fast_paths` turns it off."""
    cfg = sections(tiny_model(family), {patch: on})
    model, _, _ = modeling.build_training_model(cfg, torch.device("cpu"))
    impls = {m.config._attn_implementation for m in model.modules() if type(m).__name__ == cls}
    assert impls == ({name} if on else {"sdpa"})


def counting_aot_eager(calls: Counter):
    """aot_eager that counts the calls of the compiled forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def counted(kind):
        def compiler(graph, example_inputs):
            def run(*args):
                calls[kind] += 1
                return graph(*args)

            return make_boxed_func(run)

        return compiler

    return aot_autograd(fw_compiler=counted("forward"), bw_compiler=counted("backward"))


def _gemma3_step(model_dir, chat_rows, *, compile, mode=True, fast_paths=None, calls=None):
    from test_train_knobs import _loss_and_grads, lora_b_drawn_and_batch

    cfg = sections(
        model_dir, fast_paths, compile=compile, use_gradient_checkpointing=mode, max_steps=1
    )
    with pytest.MonkeyPatch.context() as mp:
        orig = patches.compile_layers
        backend = counting_aot_eager(calls if calls is not None else Counter())
        mp.setattr(modeling, "compile_layers", lambda m, **kw: orig(m, backend=backend, **kw))
        model, proc, fam = modeling.build_training_model(cfg, torch.device("cpu"))
    batch = lora_b_drawn_and_batch(model, proc, fam, chat_rows[:1])
    compiled_checkpoints = sum(hasattr(m, "_vlmflow_compiled_checkpoint") for m in model.modules())
    layers = sum(bool(getattr(m, "_vlmflow_compiled", False)) for m in model.modules())
    if calls is not None:
        _loss_and_grads(model, batch)  # compiles; the counts below are of the next step
        calls.clear()
    loss, grads = _loss_and_grads(model, batch)
    return loss, grads, compiled_checkpoints, layers


def test_compiled_checkpoint_keeps_the_numerics_with_one_compiled_forward_a_layer(
    tiny_model, chat_rows, caplog
):
    """train.fast_paths.compiled_checkpoint (Gemma 3 declares it for its decoder and SigLIP
    layers): each checkpointed layer runs one compiled forward a step instead of two (the
    recomputation is in its backward graph), with the loss and gradients of the eager model
    and of the compiled one under torch.utils.checkpoint. Switched off, or with offloaded
    checkpointing, the layers keep the default checkpoint (and no warning says the patch
    patched nothing: with offloading, what `auto` is for some families, it does not apply)."""
    import torch._dynamo

    model_dir = tiny_model("gemma3")
    torch._dynamo.reset()
    ref_loss, ref_grads, none, _ = _gemma3_step(model_dir, chat_rows, compile=False)
    assert none == 0
    runs = {}
    for on in (True, False):
        calls = Counter()
        loss, grads, n_ck, n_layers = _gemma3_step(
            model_dir, chat_rows, compile=True, fast_paths={"compiled_checkpoint": on}, calls=calls
        )
        runs[on] = calls
        assert n_layers > 0 and n_ck == (n_layers if on else 0)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        assert any("vision_tower" in k for k in grads) and any("language" in k for k in grads)
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert runs[True] == {"forward": n_layers, "backward": n_layers}
    assert runs[False] == {"forward": 2 * n_layers, "backward": n_layers}
    # over the offloaded checkpoint too: one compiled forward a layer, the same numerics
    calls = Counter()
    with caplog.at_level(logging.WARNING, logger="vlmflow"):
        loss, grads, n_ck, n_layers = _gemma3_step(
            model_dir, chat_rows, compile=True, mode="offload", calls=calls
        )
    assert n_layers > 0 and n_ck == n_layers
    assert calls == {"forward": n_layers, "backward": n_layers}
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    assert not [r for r in caplog.records if "compiled_checkpoint" in r.getMessage()]
    torch._dynamo.reset()


def test_compiled_checkpoint_over_the_offloader_moves_the_layer_inputs_and_not_the_weights():
    """With `use_gradient_checkpointing: offload` the compiled checkpoint runs under the
    offloader's hooks: the layer inputs its backward graph keeps go to host memory (and come
    back for the recomputation), the weights it keeps beside them stay put; the loss and
    gradients are those of the eager offloaded checkpoint."""
    import torch._dynamo

    from vlmflow.offload import OffloadedCheckpoint

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.ModuleList([ToyCheckpointedDecoderLayer(), ToyCheckpointedDecoderLayer()])
    x = torch.randn(3, 4, requires_grad=True)

    def checkpoint_with(offloader):
        for layer in net:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = offloader

    def run():
        net.zero_grad()
        x.grad = None
        out = net[1](net[0](x, scale=2.0), scale=0.5).sum()
        out.backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in net.parameters()]

    eager = OffloadedCheckpoint()
    checkpoint_with(eager)
    want = run()
    assert eager.offloaded_bytes == 2 * x.nbytes and eager.restored == 2
    offloader = OffloadedCheckpoint()
    checkpoint_with(offloader)
    n = patches.compile_layers(
        net, backend="aot_eager", checkpoint_classes=("ToyCheckpointedDecoderLayer",)
    )
    assert n == 2 and all(layer._vlmflow_compiled_checkpoint for layer in net)
    packed = []
    pack = offloader._pack
    offloader._pack = lambda t: packed.append((t.untyped_storage().data_ptr(), t)) or pack(t)
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    for _ in range(2):  # the first call compiles
        offloader.offloaded_bytes = offloader.restored = 0
        packed.clear()
        got = run()
        torch.testing.assert_close(got, want)
        # the compiled graph keeps the weights for its recomputation: they are not offloaded
        assert weights <= {ptr for ptr, _ in packed}
        moved = [t for ptr, t in packed if ptr not in weights]
        assert [t.shape for t in moved if t.dim()] == [x.shape, x.shape]  # each layer's input
        assert offloader.offloaded_bytes == sum(t.nbytes for t in moved)
        assert offloader.restored == len(moved)
    torch._dynamo.reset()


class ToyCheckpointedDecoderLayer(GradientCheckpointingLayer):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, scale=1.0):
        return torch.relu(self.linear(x)) * scale


def test_a_failed_compiled_checkpoint_names_the_layer_and_checkpoints_it_eagerly(caplog):
    import functools

    import torch._dynamo
    import torch.utils.checkpoint

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no kernel for you")

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.ModuleList([ToyCheckpointedDecoderLayer(), ToyCheckpointedDecoderLayer()])
    for layer in net:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False
        )
    x = torch.randn(3, 4, requires_grad=True)

    def run():
        net.zero_grad()
        out = net[1](net[0](x, scale=2.0), scale=0.5).sum()
        out.backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    want = run()
    with torch._dynamo.config.patch(suppress_errors=False):
        n = patches.compile_layers(
            net, backend=failing_backend, checkpoint_classes=("ToyCheckpointedDecoderLayer",)
        )
        assert n == 2 and all(layer._vlmflow_compiled_checkpoint for layer in net)
        with caplog.at_level(logging.WARNING, logger="vlmflow.patches"):
            got, again = run(), run()
    for result in (got, again):
        torch.testing.assert_close(result, want)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # once per layer
    assert "layer 0 (ToyCheckpointedDecoderLayer)" in warned[0]
    torch._dynamo.reset()


class Linear4bit(torch.nn.Linear):
    """Named as bitsandbytes' 4-bit linear (and PEFT's LoRA wrapper of it)."""


def test_layers_with_quantized_linears_keep_the_default_checkpoint():
    """In a 4-bit layer the compiled checkpoint kept the dequantized weights for the backward
    pass (more memory, no faster on a GPU): such layers are left to torch.utils.checkpoint."""
    import functools

    import torch._dynamo
    import torch.utils.checkpoint

    net = torch.nn.ModuleList([ToyCheckpointedDecoderLayer(), ToyCheckpointedDecoderLayer()])
    net[1].linear = Linear4bit(4, 4)
    default = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for layer in net:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = default
    n = patches.compile_layers(
        net, backend="aot_eager", checkpoint_classes=("ToyCheckpointedDecoderLayer",)
    )
    assert n == 2
    assert hasattr(net[0], "_vlmflow_compiled_checkpoint")
    assert not hasattr(net[1], "_vlmflow_compiled_checkpoint")
    assert net[1]._gradient_checkpointing_func is default
    torch._dynamo.reset()


class AttentionKernelCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the fused attention kernels' calls that actually run (a call the checkpoint
    serves from its saved outputs never reaches this mode, which sits below it)."""

    @classmethod
    def ignore_compile_internals(cls):
        return True

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in patches._ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _saved_attention_step(model_dir, chat_rows, monkeypatch, *, on, compile, declare=None):
    """(loss, grads, attention kernel calls of one step, layers with the saving checkpoint,
    layers whose checkpoint is compiled) with train.fast_paths.saved_attention `on`."""
    import torch._dynamo
    from test_train_knobs import _loss_and_grads, lora_b_drawn_and_batch

    from vlmflow.families import family_for_config

    torch._dynamo.reset()
    cfg = sections(
        model_dir,
        {"saved_attention": on},
        compile=compile,
        use_gradient_checkpointing=True,
        max_steps=1,
    )
    with monkeypatch.context() as mp:
        if declare:
            from transformers import AutoConfig

            family = family_for_config(AutoConfig.from_pretrained(model_dir))
            declared = replace(family, patches={**family.patches, "saved_attention": declare})
            mp.setitem(FAMILIES, family.name, declared)
        compile_with_aot_eager(mp)
        model, proc, fam = modeling.build_training_model(cfg, torch.device("cpu"))
    batch = lora_b_drawn_and_batch(model, proc, fam, chat_rows[:1])
    _loss_and_grads(model, batch)  # compiles
    with AttentionKernelCalls() as calls:
        loss, grads = _loss_and_grads(model, batch)
    saving = sum(hasattr(m, "_vlmflow_saved_attention") for m in model.modules())
    compiled_ck = sum(hasattr(m, "_vlmflow_compiled_checkpoint") for m in model.modules())
    torch._dynamo.reset()
    return loss, grads, calls.n, saving, compiled_ck


@pytest.mark.parametrize(
    "family,compile,declare",
    [
        ("mllama", True, None),  # compiled layers (and eager attention) under the eager checkpoint
        ("gemma3", True, ("Gemma3DecoderLayer", "SiglipEncoderLayer")),  # compiled checkpoint
    ],
)
def test_saved_attention_runs_each_attention_kernel_once_with_the_same_gradients(
    family, compile, declare, tiny_model, chat_rows, monkeypatch
):
    """train.fast_paths.saved_attention: the checkpoint keeps the attention kernels' outputs,
    so a step runs each attention kernel once (forward) instead of twice (forward and the
    backward pass's recomputation), with the loss and LoRA gradients of plain checkpointing:
    Mllama's compiled layers under the eager checkpoint (its tile attention runs eagerly
    between their graphs), and a checkpoint compiled into its layer (the policy traced into
    the graph)."""
    model_dir = tiny_model(family)
    kw = dict(compile=compile, declare=declare)
    ref_loss, ref_grads, ref_calls, none, ck = _saved_attention_step(
        model_dir, chat_rows, monkeypatch, on=False, **kw
    )
    loss, grads, calls, saving, ck_on = _saved_attention_step(
        model_dir, chat_rows, monkeypatch, on=True, **kw
    )
    assert none == 0 and saving > 0
    assert ck == ck_on == (saving if family == "gemma3" else 0)
    assert ref_calls == 2 * calls > 0
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert any("vision" in k for k in grads) and any("language" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)


def test_saved_attention_leaves_quantized_models_and_other_checkpoints_alone():
    """QLoRA keeps plain checkpointing (memory first); a layer whose checkpoint function is not
    transformers' default (offloaded checkpointing's) keeps it; undeclared classes too."""
    import functools

    import torch.utils.checkpoint

    default = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    other = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    net = torch.nn.ModuleList([ToyCheckpointedDecoderLayer() for _ in range(3)])
    for layer, function in zip(net, (default, other, default), strict=True):
        layer._gradient_checkpointing_func = function
    net[2].__class__ = type("OtherDecoderLayer", (ToyCheckpointedDecoderLayer,), {})
    assert patches.save_attention(net, ("ToyCheckpointedDecoderLayer",)) == 1
    assert net[0]._gradient_checkpointing_func.keywords["context_fn"] is (
        patches._saving_attention_context
    )
    assert net[1]._gradient_checkpointing_func is other
    assert net[2]._gradient_checkpointing_func is default
    # a compiled checkpoint is still built on top of the saving one
    assert patches._plain_checkpoint(net[0]._gradient_checkpointing_func)

    quantized = torch.nn.ModuleList([ToyCheckpointedDecoderLayer()])
    quantized[0].linear = Linear4bit(4, 4)
    quantized[0]._gradient_checkpointing_func = default
    assert patches.save_attention(quantized, ("ToyCheckpointedDecoderLayer",)) == 0
    assert quantized[0]._gradient_checkpointing_func is default
