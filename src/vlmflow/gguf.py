"""GGUF export for llama.cpp / Ollama, with llama.cpp's own converter.

The converter is not re-implemented: `convert_hf_to_gguf.py` (with its `conversion/` package and
the matching `gguf-py`) is taken from the llama.cpp source that llama-cpp-python's source
distribution vendors (`pip download --no-binary :all: llama-cpp-python==VERSION`, once, into a
cache folder), and run on the merged 16-bit folder twice: once for the language model
(`model-<type>.gguf`) and once with `--mmproj` for the vision tower + projector
(`mmproj-<type>.gguf`, kept in 16-bit: llama.cpp's own recommendation). An Ollama `Modelfile`
names both.

`export.save_method`: `gguf` writes bf16, `gguf_q8_0` Q8_0 (both by the converter);
`gguf_q4_k_m` needs llama.cpp's quantizer (`llama_model_quantize` of the llama-cpp-python
wheel) on the bf16 file.

Tokenizers: the converter identifies a BPE pre-tokenizer by hashing how it splits a test text
and refuses unknown ones; `export.gguf_pretokenizer` names it for a tokenizer the table does not
know (the tiny test models, whose vocabulary is trained locally, use `qwen2`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .errors import VlmflowError
from .io import atomic_dir

LLAMA_CPP_PYTHON = "0.3.36"
GGUF_METHODS = {"gguf": "bf16", "gguf_q8_0": "q8_0", "gguf_q4_k_m": "q4_k_m"}
# model_type -> does llama.cpp's converter write a vision projector (mmproj) for it
MMPROJ_FAMILIES = {
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "llava",
    "llava_next",
    "idefics3",
    "smolvlm",
    "mistral3",
    "mllama",
}


class GGUFError(VlmflowError, RuntimeError):
    """The GGUF conversion failed (names the step and the converter's message)."""


def cache_root() -> Path:
    base = os.environ.get("VLMFLOW_CACHE") or Path.home() / ".cache" / "vlmflow"
    return Path(base) / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


# What the converter imports beyond torch/numpy/transformers (installed beside it, --target).
CONVERTER_REQUIREMENTS = ("sentencepiece",)


def _pip(*args: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        raise GGUFError(f"pip {' '.join(args)} failed: {res.stderr[-800:]}")


def converter_dir(root: Path | None = None) -> Path:
    """llama.cpp's converter from llama-cpp-python's sdist (downloaded and unpacked once, with
    the converter's own Python requirements in `<root>/site`)."""
    root = root or cache_root()
    out = root / "llama.cpp"
    if (out / "convert_hf_to_gguf.py").is_file() and (root / "site").is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "site").is_dir():
        with atomic_dir(root / "site") as tmp:
            _pip("install", "-q", "--no-deps", "--target", str(tmp), *CONVERTER_REQUIREMENTS)
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    dl = root / "sdist"
    if not list(dl.glob("llama_cpp_python-*.tar.gz")):
        _pip(
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(dl),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        )
    (sdist,) = dl.glob("llama_cpp_python-*.tar.gz")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with atomic_dir(out) as tmp, tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prefix) :] if m.name.startswith(prefix) else None
            if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                if ".." in Path(rel).parts:
                    raise GGUFError(f"{sdist}: unsafe member {m.name}")
                target = tmp / rel
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return out


# Run inside the converter's process: optional pre-tokenizer name, then the converter's main().
_RUNNER = """
import sys
conv, pre, *argv = sys.argv[1:]
sys.path[:0] = [conv, conv + "/gguf-py"]
import conversion.base as base
if pre:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", *argv]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def _convert(conv: Path, merged: Path, outfile: Path, outtype: str, pre: str | None, mmproj: bool):
    args = [str(merged), "--outfile", str(outfile), "--outtype", outtype]
    if mmproj:
        args.append("--mmproj")
    site = str(conv.parent / "site")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    res = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(conv), pre or "", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode != 0 or not outfile.is_file():
        raise GGUFError(
            f"llama.cpp's convert_hf_to_gguf.py failed on {merged} "
            f"({'mmproj' if mmproj else 'language model'}):\n{res.stderr[-2000:]}"
        )
    return res.stderr


def modelfile(model: str, mmproj: str | None, template_note: str) -> str:
    lines = [
        "# Ollama: `ollama create <name> -f Modelfile`, then `ollama run <name>`.",
        f"# {template_note}",
        f"FROM ./{model}",
    ]
    if mmproj:
        lines.append(f"FROM ./{mmproj}")
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)


def quantize_q4_k_m(src: Path, dst: Path) -> None:
    """llama.cpp's quantizer through llama-cpp-python (the compiled wheel)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFError(
            "export.save_method gguf_q4_k_m needs llama-cpp-python (pip install "
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}): the K-quants are made by llama.cpp's C++ "
            "quantizer"
        ) from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise GGUFError(f"llama_model_quantize failed on {src} (code {rc})")


def export_gguf(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str,
    *,
    pretokenizer: str | None = None,
) -> dict:
    """Convert the merged folder to GGUF files in `out_dir`. Returns the summary (also written as
    gguf_export.json)."""
    merged = Path(merged_dir)
    if method not in GGUF_METHODS:
        raise GGUFError(
            f"export.save_method {method!r} is not a GGUF method ({list(GGUF_METHODS)})"
        )
    quant = GGUF_METHODS[method]
    model_type = json.loads((merged / "config.json").read_text())["model_type"]
    conv = converter_dir()
    summary: dict = {"save_method": method, "quantization": quant, "model_type": model_type}
    with atomic_dir(out_dir) as tmp:
        outtype = "bf16" if quant == "q4_k_m" else quant
        lm = tmp / f"model-{outtype}.gguf"
        _convert(conv, merged, lm, outtype, pretokenizer, mmproj=False)
        if quant == "q4_k_m":
            q = tmp / "model-q4_k_m.gguf"
            quantize_q4_k_m(lm, q)
            lm.unlink()
            lm = q
        mm = None
        if model_type in MMPROJ_FAMILIES:
            mm = tmp / "mmproj-bf16.gguf"
            _convert(conv, merged, mm, "bf16", pretokenizer, mmproj=True)
        summary["model"] = lm.name
        summary["mmproj"] = mm.name if mm else None
        summary["converter"] = f"llama.cpp vendored in llama-cpp-python {LLAMA_CPP_PYTHON}"
        (tmp / "Modelfile").write_text(
            modelfile(
                lm.name,
                summary["mmproj"],
                "the chat template is the one stored in the GGUF (from chat_template.jinja)",
            )
        )
        (tmp / "gguf_export.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


_READER = """
import sys, json
sys.path.insert(0, sys.argv[1] + "/gguf-py")
import gguf
from gguf.quants import dequantize
r = gguf.GGUFReader(sys.argv[2])
f = lambda k: (r.fields[k].contents() if k in r.fields else None)
out = {"arch": f("general.architecture"), "tensors": len(r.tensors),
       "names": [t.name for t in r.tensors], "chat_template": f("tokenizer.chat_template"),
       "types": sorted({t.tensor_type.name for t in r.tensors}), "values": {}}
for name in sys.argv[3:]:
    t = next(t for t in r.tensors if t.name == name)
    out["values"][name] = dequantize(t.data, t.tensor_type).astype("float32").ravel().tolist()
print(json.dumps(out))
"""


def read_gguf(path: str | os.PathLike, tensors=(), conv: Path | None = None) -> dict:
    """Architecture, tensor names and types, chat template (and the values of `tensors`) of a
    GGUF file, read with llama.cpp's own `gguf` reader (the converter's gguf-py)."""
    conv = conv or converter_dir()
    res = subprocess.run(
        [sys.executable, "-c", _READER, str(conv), str(path), *tensors],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise GGUFError(f"cannot read {path}: {res.stderr[-800:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
