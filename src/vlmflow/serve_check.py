"""Serve check: the exported artefact, loaded by the serving library in a fresh process, answers
the merge check's sample prompts as the merged model does in transformers.

GGUF: llama.cpp's `llama-mtmd-cli` (built from the same source as the converter, see
`vlmflow.gguf.llama_cpp_tools`) runs the language model + mmproj, with the chat template stored
in the GGUF (`--jinja`), greedy (`--temp 0`), one process per prompt. The reference is the merged
folder in transformers (float32 compute of its 16-bit weights), same prompt and image.

Each served answer is scored by the reference, teacher-forced (`ServedTextWalk`): the reference
generates on the same prompt, and at each step the first of its top-`TOP_K` tokens whose text
continues llama.cpp's answer is forced; that token's gap (the reference's top logit minus its
logit, in standard deviations of that step's logits) says how far from the reference's own greedy
choice llama.cpp went. A served token agrees when its gap is within
`export.serve_check_gap_tolerance`. Greedy decoding of a tiny random model meets near-tied logits
(a gap of a few hundredths of a standard deviation), where llama.cpp's bf16 rounding of the
activations may pick the second token and the answers part for good; the walk scores every later
token on its own, so such a tie costs one near-zero gap, not the rest of the answer. An
unquantized (bf16) GGUF must have every served token agree; a quantized one at least
`export.serve_check_min_agreement` of them. The exact agreement (the share of the reference's
greedy tokens llama.cpp reproduces before the first difference) is reported beside it.
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


TOP_K = 50  # the reference tokens the walk tries, best first, at each step


FFFD = "\ufffd".encode()


class TokenBytes:
    """Token ids -> the bytes the model emits for them (what llama.cpp prints). Exact for byte-level
    BPE tokenizers (Qwen, Llama 3, Mistral's Tekken: each vocabulary character stands for one
    byte, added tokens for their text); for any other tokenizer the UTF-8 of `tok.decode`, where
    bytes that are not UTF-8 read as U+FFFD (`exact` False)."""

    def __init__(self, tok):
        self.tok = tok
        backend = getattr(tok, "backend_tokenizer", None)
        decoder = (json.loads(backend.to_str()).get("decoder") or {}) if backend else {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self.exact = "ByteLevel" in kinds
        if self.exact:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self.table = {c: b for b, c in bytes_to_unicode().items()}
            self.added = set(tok.added_tokens_decoder)

    def __call__(self, ids: list[int]) -> bytes:
        if not self.exact:
            return self.tok.decode(ids).encode()
        out = bytearray()
        for i, t in zip(ids, self.tok.convert_ids_to_tokens(ids), strict=True):
            out += t.encode() if i in self.added else bytes(self.table[c] for c in t)
        return bytes(out)

    def served(self, raw: bytes) -> bytes:
        """llama.cpp's printed bytes in the same form."""
        return raw if self.exact else raw.decode("utf-8", "replace").encode()


def consistent(emitted: bytes, served: bytes) -> bool:
    """Whether `emitted` (the tokens chosen so far) can continue into `served`: a prefix of it,
    or (tokens decoded to text) a prefix followed by U+FFFD where a token ends inside a
    multi-byte character that the served text goes on with."""
    if served.startswith(emitted):
        return True
    head = emitted
    while head.endswith(FFFD):
        head = head[: -len(FFFD)]
    return (
        head != emitted
        and served.startswith(head)
        and len(served) > len(head)
        and served[len(head)] >= 0x80
    )


class ServedTextWalk:
    """A transformers LogitsProcessor scoring the served answer (`served`, the bytes llama.cpp
    printed) with the reference model: at each step it records the reference's logits, forces
    the first of its top-`top_k` tokens whose bytes, after those chosen so far, stay consistent
    with `served`, and records that token's gap (top logit minus its logit, relative to the std
    of the step's logits; 0 for the reference's own greedy token, inf when no top-k token is
    consistent, which ends the walk). Once `served` is consumed it records `end_gap` (the best
    end-of-answer token's gap) and forces the end. Independent of how llama.cpp split the text
    into tokens."""

    def __init__(self, tok, served: bytes, eos: list[int], top_k: int = TOP_K, to_bytes=None):
        self.tok, self.eos, self.top_k = tok, eos, top_k
        self.to_bytes = to_bytes or TokenBytes(tok)  # pass one to share it between walks
        self.served = self.to_bytes.served(served)
        self.chosen: list[int] = []
        self.gaps: list[float] = []
        self.end_gap: float | None = None
        self.done = False

    def emitted(self) -> bytes:
        return self.to_bytes(self.chosen)

    def rest(self) -> bytes:
        """The part of the served answer the walk did not reach (b"" once consumed)."""
        emitted, n = self.emitted(), 0
        while n < min(len(emitted), len(self.served)) and emitted[n] == self.served[n]:
            n += 1
        return b"" if n == len(emitted) == len(self.served) else self.served[n:]

    def step(self, logits: torch.Tensor) -> int:
        """The token forced after the reference's logits `logits` (1-D, one step)."""
        if self.done:
            return self.eos[0]
        logits = logits.float()
        std = float(logits.std()) or 1.0
        top = logits.topk(min(self.top_k, logits.numel()))
        best = float(top.values[0])
        if self.emitted() == self.served:
            self.done = True
            self.end_gap = (best - float(logits[self.eos].max())) / std
            return self.eos[0]
        for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if consistent(self.to_bytes([*self.chosen, token]), self.served):
                self.chosen.append(token)
                self.gaps.append((best - value) / std)
                return token
        self.gaps.append(float("inf"))
        self.done = True
        return self.eos[0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[0, self.step(scores[0])] = 0.0
        return forced


class Reference:
    """The merged folder in transformers (float32): its greedy answers and its walks of served
    answers, on the serve check's prompts."""

    def __init__(self, merged: Path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .modeling import model_family

        self.processor = AutoProcessor.from_pretrained(merged)
        self.tok = tok = self.processor.tokenizer
        family = model_family(str(merged))
        self.model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32)
        self.model.eval()
        self.eos = [tok.convert_tokens_to_ids(family.end_of_turn)]
        if tok.eos_token_id is not None and tok.eos_token_id not in self.eos:
            self.eos.append(tok.eos_token_id)
        self.image_id = tok.convert_tokens_to_ids(family.image_token)
        self.to_bytes = TokenBytes(tok)  # parses the tokenizer's JSON: once, for every walk

    def batch(self, prompt: dict, images) -> dict:
        from .collate import to_hf_messages

        msgs = to_hf_messages([{"role": "user", "content": prompt["parts"]}])
        text = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        kwargs = {"images": [images]} if images else {}
        batch = self.processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
        return {k: v for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, processors=None) -> list[int]:
        """Greedy new tokens up to the first end-of-answer token (llama.cpp's sampling: no
        repetition penalty, whatever generation_config.json says)."""
        tok = self.tok
        gen = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=self.eos,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else self.eos[0],
            logits_processor=processors,
        )
        ids = []
        for t in gen[0, batch["input_ids"].shape[1] :].tolist():
            if t in self.eos:
                break
            ids.append(t)
        return ids

    def image_tokens(self, batch: dict, n_images: int) -> int:
        return int((batch["input_ids"] == self.image_id).sum()) // max(1, n_images)

    def walk(self, batch: dict, served: bytes, max_steps: int) -> ServedTextWalk:
        from transformers import LogitsProcessorList

        walk = ServedTextWalk(self.tok, served, self.eos, to_bytes=self.to_bytes)
        self.generate(batch, max_steps, LogitsProcessorList([walk]))
        return walk


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
) -> bytes:
    """llama.cpp's greedy answer to one prompt (a fresh `llama-mtmd-cli` process), as the bytes
    it printed."""
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
    marker = MARKER.encode() + b"\n"
    if res.returncode != 0 or marker not in res.stdout:
        err = res.stderr.decode("utf-8", errors="replace")
        raise ServeCheckError(f"llama-mtmd-cli failed (exit {res.returncode}):\n{err[-2000:]}")
    answer = res.stdout.split(marker, 1)[1]
    return answer.removeprefix(b"\n").removesuffix(b"\n\n")


def agreement(ids: list[int], text: str, tok) -> int:
    """How many of the reference tokens `ids` the served answer `text` reproduces, in order
    starting at the first (its text starts with their decoded text)."""
    k = 0
    while k < len(ids) and text.startswith(tok.decode(ids[: k + 1])):
        k += 1
    return k


def walk_summary(walk: ServedTextWalk, tolerance: float) -> dict:
    """The served tokens the walk scored and how many agree (gap <= tolerance). Served text the
    walk did not reach (no top-k token continued it) counts as disagreeing tokens, as many as
    the reference's tokenizer makes of it (at least one). Gaps are in std of the step's logits;
    null stands for infinite (no consistent token)."""
    rest = walk.rest().decode("utf-8", "replace")
    unscored = len(walk.tok.encode(rest, add_special_tokens=False)) if rest else 0
    finite = [g for g in walk.gaps if g != float("inf")]
    return {
        "served_tokens": len(finite) + (max(unscored, 1) if rest else 0),
        "agreeing_served_tokens": sum(g <= tolerance for g in finite),
        "max_gap": None if rest else round(max(finite, default=0.0), 4),
        "mean_gap": round(sum(finite) / len(finite), 4) if finite else None,
        "gaps": [round(g, 4) for g in finite] + ([None] if rest else []),
        "end_gap": None if walk.end_gap is None else round(walk.end_gap, 4),
        "unscored": rest,
    }


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
    tolerance = export_cfg["serve_check_gap_tolerance"]
    prompts = serve_prompts(rows, export_cfg["check_samples"])
    ref = Reference(merged)
    tools = llama_cpp_tools(root, threads)
    quantized = summary["quantization"] not in ("bf16", "f16", "f32")
    need = export_cfg["serve_check_min_agreement"] if quantized else 1.0
    samples = []
    with tempfile.TemporaryDirectory(prefix="serve-check-") as tmp:
        for i, p in enumerate(prompts):
            imgs = [
                fit_pixels(load_rgb(f), model_cfg["min_pixels"], model_cfg["max_pixels"])
                for f in p["images"]
            ]
            batch = ref.batch(p, imgs)
            ids = ref.generate(batch, n_tokens)
            ref_text, n_img = ref.tok.decode(ids), ref.image_tokens(batch, len(imgs))
            files = []
            for j, im in enumerate(imgs):
                files.append(Path(tmp) / f"{i}-{j}.png")
                im.save(files[-1])
            raw = llama_cpp_answer(tools, gguf_dir, summary, p, files, n_tokens, threads, n_img)
            got = raw.decode("utf-8", errors="replace")
            k = agreement(ids, got, ref.tok)
            samples.append(
                {
                    "id": p["id"],
                    "reference": ref_text,
                    "served": got,
                    "reference_tokens": len(ids),
                    "agreeing_tokens": k,
                    "identical": k == len(ids) and got.rstrip() == ref_text.rstrip(),
                    "image_tokens": n_img,
                    **walk_summary(ref.walk(batch, raw, 2 * n_tokens + 2), tolerance),
                }
            )
    total = sum(s["reference_tokens"] for s in samples)
    prefix = sum(s["agreeing_tokens"] for s in samples) / total if total else 1.0
    served = sum(s["served_tokens"] for s in samples)
    rate = sum(s["agreeing_served_tokens"] for s in samples) / served if served else 1.0
    gaps = [g for s in samples for g in s["gaps"]]
    result = {
        "format": "gguf",
        "quantization": summary["quantization"],
        "served_by": f"llama.cpp llama-mtmd-cli ({summary['converter']}), greedy, --jinja",
        "reference": "merged folder in transformers, float32, greedy",
        "max_new_tokens": n_tokens,
        "samples": samples,
        "token_agreement": round(rate, 4),
        "gap_tolerance": tolerance,
        "max_gap": None if None in gaps or not gaps else max(gaps),
        "prefix_agreement": round(prefix, 4),
        "identical_answers": sum(s["identical"] for s in samples),
        "required_agreement": need,
        "passed": rate >= need,
    }
    log.info(
        "serve check (%s): %.3f of the served tokens within %.3g std of the reference's top "
        "logit over %d samples (required %.2f); exact prefix agreement %.3f",
        summary["quantization"],
        rate,
        tolerance,
        len(samples),
        need,
        prefix,
    )
    if not result["passed"]:
        err = ServeCheckError(
            f"serve check failed: {rate:.1%} of llama.cpp's answer tokens are within "
            f"{tolerance:g} std of the merged model's top logit ({summary['quantization']} GGUF; "
            f"required {need:.0%}; max gap {result['max_gap']}). Details in serve_check.json."
        )
        err.result = result
        raise err
    return result
