"""The merge check: does the exported model reproduce the adapter?

On a sample batch of training conversations, the logits of the exported model (loaded with plain
`from_pretrained`) are compared with those of the adapter applied to the fresh base (PEFT,
unmerged): max |diff| must stay below `check_atol + check_rtol * max |ref|`, else the export
fails (`MergeCheckError`). Both models run in float32 when a float32 copy fits in memory (the
check then sees only the rounding of the merged weights; default rtol 0.02), else in the export
dtype (16-bit noise in both forward passes; default rtol 0.1, which only catches gross errors).
A 4-bit export's quantization error is measured the same way and reported, not gated.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch

from .artifacts import MergeCheck
from .collate import SampleTooLongError, collate_batch, make_encoder
from .errors import VlmflowError
from .merge import MergeError
from .modeling import load_model

log = logging.getLogger(__name__)

# Default relative tolerance of the merge check: {check in float32: 0.02, in 16-bit: 0.1}.
DEFAULT_RTOL = {True: 0.02, False: 0.1}


class MergeCheckError(VlmflowError, RuntimeError):
    """The merged model's logits differ from the adapter's by more than the tolerance."""


def sample_batch(rows: list[dict], processor, family, model_cfg: dict, n: int) -> dict:
    """Encode up to `n` rows (skipping ones that are too long) into one padded batch."""
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


def check_merge(
    model_cfg: dict,
    adapter_dir: Path,
    merged: Path,
    export_cfg: dict,
    rows: list[dict],
    *,
    n_params: int,
    family,
    save_method: str,
    check_path: str | os.PathLike | None = None,
) -> tuple[MergeCheck, tuple[torch.Tensor, dict]]:
    """Compare the 16-bit merge in `merged` with the adapter on the base, on up to
    `export.check_samples` of `rows`. Raises MergeCheckError (after writing the check to
    `check_path`) above the tolerance. Returns the check and (reference logits, batch), for
    measuring a 4-bit export the same way (`quantization_error`)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(merged)
    batch = sample_batch(rows, processor, family, model_cfg, export_cfg["check_samples"])
    cdtype = check_dtype_for(export_cfg, n_params)
    ref = reference_logits(model_cfg, adapter_dir, batch, cdtype)
    got = exported_logits(merged, batch, cdtype, model_cfg["trust_remote_code"])
    rtol = export_cfg["check_rtol"]
    if rtol is None:
        rtol = DEFAULT_RTOL[cdtype == torch.float32]
    check = MergeCheck(
        save_method=save_method,
        **compare_logits(ref, got, export_cfg["check_atol"], rtol),
        compared="merged 16-bit weights vs adapter on the fresh base (PEFT)",
        check_dtype=str(cdtype).removeprefix("torch."),
        export_dtype=export_cfg["dtype"],
        samples=int(batch["input_ids"].shape[0]),
        atol=export_cfg["check_atol"],
        rtol=rtol,
    )
    log.info(
        "merge check: max |logit diff| %.3g (tolerance %.3g, %s), top-1 agreement %.3f",
        check.max_abs_diff,
        check.tolerance,
        check.check_dtype,
        check.top1_agreement,
    )
    if not check.passed:
        if check_path is not None:
            check.write(check_path)
        raise MergeCheckError(
            f"merge check failed: max |logit diff| {check.max_abs_diff:.4g} > "
            f"tolerance {check.tolerance:.4g} (atol {check.atol} + "
            f"rtol {check.rtol} x max |logit| "
            f"{check.max_abs_reference_logit:.4g}); the merged weights do not "
            "reproduce the adapter. Details in merge_check.json."
        )
    return check, (ref, batch)


def quantization_error(folder: Path, ref: torch.Tensor, batch: dict, trust: bool) -> dict:
    """A 4-bit export's logits vs the adapter's on the 16-bit base: reported, not gated."""
    q = exported_logits(folder, batch, None, trust)
    out = {
        k: v
        for k, v in compare_logits(ref, q, 0.0, 0.0).items()
        if k not in ("tolerance", "passed")
    }
    out["note"] = (
        "4-bit export vs adapter on the 16-bit base: the quantization error, reported, not gated"
    )
    return out
