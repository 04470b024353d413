"""Serve check: the exported artefact, loaded by the serving library in a fresh process, answers
the merge check's sample prompts as the merged model does in transformers.

GGUF: llama.cpp's `llama-mtmd-cli` (built from the same source as the converter, see
`vlmflow.gguf.llama_cpp_tools`) runs the language model + mmproj, with the chat template stored
in the GGUF (`--jinja`), greedy (`--temp 0`), one process per prompt. The reference is the merged
folder in transformers (float32 compute of its 16-bit weights), greedy, same prompt and image.

Agreement of one answer = the share of the reference's tokens that llama.cpp reproduces before
the first difference (its text starts with the reference's first k tokens, decoded). Tiny random
models answer with garbage, but greedy decoding of the same weights is deterministic, so an
unquantized (bf16) GGUF must reproduce it: llama.cpp's only differences are its kernels' rounding.
Quantized GGUFs are gated by `export.serve_check_min_agreement`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from .errors import VlmflowError

log = logging.getLogger(__name__)
MARKER = "<<vlmflow-serve-check-answer>>"


class ServeCheckError(VlmflowError, RuntimeError):
    """The served model's answers do not match the merged model's."""


def serve_prompts(rows: list[dict], n: int) -> list[dict]:
    """The first `n` rows that open with one user turn: its parts (text and images, in order)
    are the prompt; the merge check's sample rows, as a server would receive them."""
    prompts = []
    for row in rows:
        if len(prompts) == n:
            break
        msgs = row["messages"]
        if not msgs or msgs[0]["role"] != "user" or len(msgs) < 2:
            continue
        parts = msgs[0]["content"]
        n_images = sum(p["type"] == "image" for p in parts)
        if n_images > len(row.get("images") or []):
            continue
        prompts.append({"id": row.get("id"), "parts": parts, "images": row["images"][:n_images]})
    if not prompts:
        raise ServeCheckError("serve check: no sample row opens with a user turn")
    return prompts


@torch.no_grad()
def transformers_answers(merged: Path, prompts: list[dict], max_new_tokens: int, images) -> list:
    """Greedy answers of the merged folder in transformers: (token ids, text, image tokens per
    image) per prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .collate import to_hf_messages
    from .modeling import model_family

    processor = AutoProcessor.from_pretrained(merged)
    tok = processor.tokenizer
    family = model_family(str(merged))
    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    eos = [tok.convert_tokens_to_ids(family.end_of_turn)]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    image_id = tok.convert_tokens_to_ids(family.image_token)
    out = []
    for p, imgs in zip(prompts, images, strict=True):
        msgs = to_hf_messages([{"role": "user", "content": p["parts"]}])
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        kwargs = {"images": [imgs]} if imgs else {}
        batch = processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
        batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        gen = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
        )
        ids = []
        for t in gen[0, batch["input_ids"].shape[1] :].tolist():
            if t in eos:
                break
            ids.append(t)
        n_image = int((batch["input_ids"] == image_id).sum())
        out.append((ids, tok.decode(ids), n_image // max(1, len(imgs))))
    return out, tok


# llama.cpp's Qwen-VL preprocessing resizes an image to at least 8 (and at most 4096) image tokens
# whatever the checkpoint's processor says; the check gives it transformers' count, so that both
# see the image at the same size.
IMAGE_TOKEN_LIMITS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def llama_cpp_answer(
    tools: Path,
    gguf_dir: Path,
    summary: dict,
    prompt: dict,
    image_files,
    n: int,
    threads: int,
    image_tokens: int | None = None,
) -> str:
    """llama.cpp's greedy answer to one prompt (a fresh `llama-mtmd-cli` process)."""
    marker = "<__media__>"  # mtmd's default media marker: where each image goes
    text = "".join(marker if p["type"] == "image" else (p["text"] or "") for p in prompt["parts"])
    cmd = [
        str(tools / "llama-mtmd-cli"),
        "-m",
        str(gguf_dir / summary["model"]),
        "-p",
        text,
        "-n",
        str(n),
        "--temp",
        "0",
        "--jinja",
        "-t",
        str(threads),
        "-c",
        "4096",
        "--no-warmup",
    ]
    if summary.get("mmproj"):
        cmd += ["--mmproj", str(gguf_dir / summary["mmproj"])]
    for f in image_files:
        cmd += ["--image", str(f)]
    if image_files and image_tokens and summary.get("family") in IMAGE_TOKEN_LIMITS:
        cmd += ["--image-min-tokens", str(image_tokens), "--image-max-tokens", str(image_tokens)]
    env = dict(os.environ, MTMD_TEST_RESPONSE_MARKER=MARKER)
    res = subprocess.run(cmd, capture_output=True, env=env, timeout=900)
    stdout = res.stdout.decode("utf-8", errors="replace")
    if res.returncode != 0 or MARKER not in stdout:
        err = res.stderr.decode("utf-8", errors="replace")
        raise ServeCheckError(f"llama-mtmd-cli failed (exit {res.returncode}):\n{err[-2000:]}")
    answer = stdout.split(MARKER + "\n", 1)[1]
    return answer.removeprefix("\n").removesuffix("\n\n")


def agreement(ids: list[int], text: str, tok) -> int:
    """How many of the reference tokens `ids` the served answer `text` reproduces, in order
    starting at the first (its text starts with their decoded text)."""
    k = 0
    while k < len(ids) and text.startswith(tok.decode(ids[: k + 1])):
        k += 1
    return k


def serve_check_gguf(
    merged_dir: str | os.PathLike,
    gguf_dir: str | os.PathLike,
    rows: list[dict],
    export_cfg: dict,
    model_cfg: dict,
    *,
    root: Path | None = None,
    threads: int = 2,
) -> dict:
    """Run the serve check of a GGUF export; returns the result (the rule writes it as
    serve_check.json) and raises ServeCheckError, with the result attached, when it fails."""
    from .collate import fit_pixels
    from .gguf import llama_cpp_tools
    from .images import load_rgb

    merged, gguf_dir = Path(merged_dir), Path(gguf_dir)
    summary = json.loads((gguf_dir / "gguf_export.json").read_text())
    n_tokens = export_cfg["serve_check_tokens"]
    prompts = serve_prompts(rows, export_cfg["check_samples"])
    fitted = [
        [
            fit_pixels(load_rgb(f), model_cfg["min_pixels"], model_cfg["max_pixels"])
            for f in p["images"]
        ]
        for p in prompts
    ]
    reference, tok = transformers_answers(merged, prompts, n_tokens, fitted)
    tools = llama_cpp_tools(root, threads)
    quantized = summary["quantization"] not in ("bf16", "f16", "f32")
    need = export_cfg["serve_check_min_agreement"] if quantized else 1.0
    samples = []
    with tempfile.TemporaryDirectory(prefix="serve-check-") as tmp:
        for i, (p, imgs, (ids, ref_text, n_img)) in enumerate(
            zip(prompts, fitted, reference, strict=True)
        ):
            files = []
            for j, im in enumerate(imgs):
                files.append(Path(tmp) / f"{i}-{j}.png")
                im.save(files[-1])
            got = llama_cpp_answer(tools, gguf_dir, summary, p, files, n_tokens, threads, n_img)
            k = agreement(ids, got, tok)
            samples.append(
                {
                    "id": p["id"],
                    "reference": ref_text,
                    "served": got,
                    "reference_tokens": len(ids),
                    "agreeing_tokens": k,
                    "identical": k == len(ids) and got.rstrip() == ref_text.rstrip(),
                    "image_tokens": n_img,
                }
            )
    total = sum(s["reference_tokens"] for s in samples)
    rate = sum(s["agreeing_tokens"] for s in samples) / total if total else 1.0
    result = {
        "format": "gguf",
        "quantization": summary["quantization"],
        "served_by": f"llama.cpp llama-mtmd-cli ({summary['converter']}), greedy, --jinja",
        "reference": "merged folder in transformers, float32, greedy",
        "max_new_tokens": n_tokens,
        "samples": samples,
        "token_agreement": round(rate, 4),
        "identical_answers": sum(s["identical"] for s in samples),
        "required_agreement": need,
        "passed": rate >= need,
    }
    log.info(
        "serve check (%s): token agreement %.3f over %d samples (required %.2f)",
        summary["quantization"],
        rate,
        len(samples),
        need,
    )
    if not result["passed"]:
        err = ServeCheckError(
            f"serve check failed: llama.cpp reproduces {rate:.1%} of the merged model's greedy "
            f"answer tokens ({summary['quantization']} GGUF; required {need:.0%}). "
            "Details in serve_check.json."
        )
        err.result = result
        raise err
    return result
