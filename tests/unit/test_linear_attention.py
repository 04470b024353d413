"""Qwen3.5's Gated DeltaNet layers: which kernels run, and the warning when the slow PyTorch
reference does."""

import logging

import pytest

from vlmflow import patches
from vlmflow.modeling import warn_slow_linear_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def test_kernel_detection_reads_what_transformers_resolved():
    """transformers' decorator picks the package's function when it imports, else the torch
    reference: the check reports exactly that."""
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    def reference(x):
        return x

    found = use_kernel_func_from_hub_with_fallback("dumps", "json")(reference)
    missing = use_kernel_func_from_hub_with_fallback("no_such_kernel", "json")(reference)
    absent = use_kernel_func_from_hub_with_fallback("dumps", "vlmflow_no_such_package")(reference)
    assert patches._uses_fast_kernel(found, "json") is True
    assert patches._uses_fast_kernel(missing, "json") is False
    assert patches._uses_fast_kernel(absent, "vlmflow_no_such_package") is False


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_slow_fallback_is_one_loud_warning_naming_the_packages(
    family, tiny_model, caplog, monkeypatch
):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    # this machine has neither package (the CPU cannot run their Triton kernels anyway)
    with caplog.at_level(logging.WARNING, logger="vlmflow.modeling"):
        missing = warn_slow_linear_attention(model)
    assert missing == ["flash-linear-attention", "causal-conv1d"]
    lines = [r for r in caplog.records if r.name == "vlmflow.modeling"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "Gated DeltaNet" in msg and "pip install flash-linear-attention causal-conv1d" in msg

    # flash-linear-attention there, causal-conv1d not (it often does not build): INFO only
    caplog.clear()
    monkeypatch.setattr(patches, "_uses_fast_kernel", lambda fn, name: name == "fla")
    with caplog.at_level(logging.INFO, logger="vlmflow.modeling"):
        assert warn_slow_linear_attention(model) == ["causal-conv1d"]
    lines = [r for r in caplog.records if r.name == "vlmflow.modeling"]
    assert [r.levelno for r in lines] == [logging.INFO]
    assert "pip install causal-conv1d" in lines[0].getMessage()

    # with both kernels resolved: silent
    caplog.clear()
    monkeypatch.setattr(patches, "_uses_fast_kernel", lambda fn, name: True)
    with caplog.at_level(logging.INFO, logger="vlmflow.modeling"):
        assert warn_slow_linear_attention(model) == []
    assert not [r for r in caplog.records if r.name == "vlmflow.modeling"]


def test_models_without_linear_attention_never_warn(tiny_model, caplog):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen3_vl"))
    with caplog.at_level(logging.WARNING, logger="vlmflow.modeling"):
        assert warn_slow_linear_attention(model) == []
    assert not caplog.records


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_vl_moe", "qwen3_5_moe"])
def test_qwen3_5_vision_tower_takes_the_batched_window_attention(family, tiny_model):
    import copy

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmflow.patches import batched_vision_attention

    path = tiny_model(family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64)
    proc = AutoProcessor.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        for h, w in ((64, 96), (128, 64))
    ]
    px = proc.image_processor(images=images, return_tensors="pt")
    patched = copy.deepcopy(model)
    assert batched_vision_attention(patched) == 2
    with torch.no_grad():
        want = model.model.visual(px["pixel_values"].double(), grid_thw=px["image_grid_thw"])
        got = patched.model.visual(px["pixel_values"].double(), grid_thw=px["image_grid_thw"])
    want = getattr(want, "pooler_output", want)
    got = getattr(got, "pooler_output", got)
    assert torch.allclose(got, want, atol=1e-10)


def test_fla_with_a_broken_triton_on_hopper_trains_with_the_reference(tiny_model, monkeypatch):
    """flash-linear-attention refuses its gated backward with Triton 3.4.0 - 3.7.0 on Hopper
    (seen on an H200 with Triton 3.6: every Qwen3.5 run stopped at the first backward). The
    check names the case, and the model's code is pointed at transformers' PyTorch reference."""
    import importlib.metadata
    import importlib.util
    import inspect
    import sys

    import torch
    from transformers import AutoModelForImageTextToText

    real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    installed = {"fla"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name in installed else real_find_spec(name, *a),
    )
    triton = {"v": "3.6.0"}
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: triton["v"] if name == "triton" else real_version(name),
    )
    capability = {"cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability["cc"])
    cuda = torch.device("cuda", 0)

    assert "Triton 3.6.0" in patches.fla_backward_broken(cuda)
    assert patches.fla_backward_broken(torch.device("cpu")) is None
    for v in ("3.3.1", "3.7.1", "3.8.0"):
        triton["v"] = v
        assert patches.fla_backward_broken(cuda) is None, v
    triton["v"] = "3.4.0"
    assert patches.fla_backward_broken(cuda) is not None
    capability["cc"] = (8, 0)  # an A100: fine
    assert patches.fla_backward_broken(cuda) is None
    capability["cc"] = (9, 0)
    installed.add("tilelang")  # fla's own workaround
    assert patches.fla_backward_broken(cuda) is None

    model = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen3_5"))
    code = sys.modules[
        next(type(m).__module__ for m in model.modules() if type(m).__name__.endswith("DeltaNet"))
    ]
    decorated = code.torch_chunk_gated_delta_rule
    reference = inspect.unwrap(decorated)
    assert reference is not decorated
    monkeypatch.setattr(code, "torch_chunk_gated_delta_rule", decorated)  # restored after
    assert patches.use_torch_gated_delta_rule(model) == 1
    assert code.torch_chunk_gated_delta_rule is reference
    assert patches.use_torch_gated_delta_rule(model) == 0  # already the reference
