"""GGUF export for llama.cpp / Ollama, with llama.cpp's own converter and tools.

The converter is not re-implemented: `convert_hf_to_gguf.py` (with its `conversion/` package and
the matching `gguf-py`) is taken from the llama.cpp source that llama-cpp-python's source
distribution vendors. `fetch_source` downloads that sdist (`pip download --no-binary :all:
llama-cpp-python==VERSION`) into the cache once, in the local rule llama_cpp_source (the only
step that goes online); the converter is unpacked from it and run on the merged 16-bit folder
twice: once for the language model (`model-<type>.gguf`) and once with `--mmproj` for the vision
tower + projector (`mmproj-bf16.gguf`, kept in 16-bit: llama.cpp's own recommendation). An
Ollama `Modelfile` names both.

`export.save_method`: `gguf` writes bf16, `gguf_q8_0` Q8_0 (both by the converter);
`gguf_q4_k_m` quantizes the bf16 file with llama.cpp's `llama-quantize`, which
`llama_cpp_tools` builds once from the same sdist with cmake (beside `llama-mtmd-cli`, which the
serve check runs; see `vlmflow.serve_check`).

Tokenizers: the converter identifies a BPE pre-tokenizer by hashing how it splits a test text
and refuses unknown ones; `export.gguf_pretokenizer` names it for a tokenizer the table does not
know (the tiny test models, whose vocabulary is trained locally, use `qwen2`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import VlmflowError
from .io import atomic_dir

LLAMA_CPP_PYTHON = "0.3.36"
GGUF_METHODS = {"gguf": "bf16", "gguf_q8_0": "q8_0", "gguf_q4_k_m": "q4_k_m"}
# Registry families (vlmflow.families names) whose architecture llama.cpp's converter registers
# both as a language model and as a vision projector (mmproj) (checked against the converter's
# own tables in tests/unit/test_gguf.py). Not among them, so refused before any job: LLaVA-NeXT
# and Mllama (neither table), Idefics3 / SmolVLM (an mmproj only: the converter has no text
# model for them) and LLaVA 1.5 (its mmproj converter takes Pixtral towers only; a CLIP tower
# stops it with "Unsupported model type: clip_vision_model").
GGUF_FAMILIES = {
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "gemma3",
    "gemma4",
    "pixtral",
    "mistral3",
}


class GGUFError(VlmflowError, RuntimeError):
    """The GGUF conversion failed (names the step and the converter's message)."""


def cache_root() -> Path:
    base = os.environ.get("VLMFLOW_CACHE") or Path.home() / ".cache" / "vlmflow"
    return Path(base) / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


# What the converter imports beyond torch/numpy/transformers (installed beside it, --target).
CONVERTER_REQUIREMENTS = ("sentencepiece",)
SDIST_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"


def _pip(*args: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=900
    )
    if res.returncode != 0:
        raise GGUFError(f"pip {' '.join(args)} failed: {res.stderr[-800:]}")


@contextlib.contextmanager
def _cache_lock(root: Path):
    """Hold the cache's lock file (`root/.lock`) while filling the cache: a second process (two
    test workers, two jobs, a build started ahead of the tests) waits for the first, then finds
    what it made, instead of fetching or building it again."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_source(root: Path | None = None) -> dict:
    """The one step that goes online (rule llama_cpp_source, a local rule: compute nodes have no
    internet): llama-cpp-python's source distribution (llama.cpp's converter, gguf-py and C++
    source) and the converter's Python requirements, into the cache `root`. Returns what is
    there (sdist path and sha256)."""
    root = root or cache_root()
    with _cache_lock(root):
        return _fetch_source(root)


def _fetch_source(root: Path) -> dict:
    if not (root / "site").is_dir():
        with atomic_dir(root / "site") as tmp:
            _pip("install", "-q", "--no-deps", "--target", str(tmp), *CONVERTER_REQUIREMENTS)
    dl = root / "sdist"
    if not list(dl.glob("llama_cpp_python-*.tar.gz")):
        with atomic_dir(dl) as tmp:
            _pip(
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                str(tmp),
                f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            )
    sdist = _sdist(root)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    return {"root": str(root), "sdist": str(sdist), "sha256": digest, "site": str(root / "site")}


def _sdist(root: Path) -> Path:
    found = sorted((root / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not found or not (root / "site").is_dir():
        raise GGUFError(
            f"llama.cpp's source (llama-cpp-python {LLAMA_CPP_PYTHON}) is not in {root}: it is "
            "fetched by the local rule llama_cpp_source (`snakemake --cores 1 llama_cpp_source` "
            "on a machine with internet; VLMFLOW_CACHE must name a folder the compute nodes see)"
        )
    return found[-1]


def _unpack(sdist: Path, out: Path, wanted: tuple[str, ...] | None) -> None:
    """Members of the sdist's vendored llama.cpp (those starting with one of `wanted`, or all)
    into `out`, refusing any that would leave it."""
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name[len(SDIST_PREFIX) :] if m.name.startswith(SDIST_PREFIX) else None
            if not rel or not (m.isfile() or m.isdir()):
                continue
            if wanted is not None and not rel.startswith(wanted):
                continue
            if ".." in Path(rel).parts or Path(rel).is_absolute():
                raise GGUFError(f"{sdist}: unsafe member {m.name}")
            target = out / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if m.mode & 0o111:
                target.chmod(0o755)


def converter_dir(root: Path | None = None) -> Path:
    """llama.cpp's converter, unpacked (once) from the fetched sdist; no network."""
    root = root or cache_root()
    out = root / "llama.cpp"
    if (out / "convert_hf_to_gguf.py").is_file() and (root / "site").is_dir():
        return out
    sdist = _sdist(root)
    with atomic_dir(out) as tmp:
        _unpack(sdist, tmp, ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE"))
    return out


# The C++ tools: llama-quantize (Q4_K_M) and llama-mtmd-cli (the serve check), nothing else.
BUILD_TARGETS = ("llama-mtmd-cli", "llama-quantize")
CMAKE_FLAGS = (
    "-DGGML_NATIVE=ON",
    "-DGGML_OPENMP=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


# The CMake build type of the tools: Release (-O3) unless this environment variable names another
# (e.g. None: no optimisation flags, no -g, several times faster to compile; what the tests use).
BUILD_TYPE_ENV = "VLMFLOW_LLAMA_CPP_BUILD_TYPE"


def build_type() -> str:
    value = os.environ.get(BUILD_TYPE_ENV) or "Release"
    if not value.isalnum():
        raise GGUFError(f"{BUILD_TYPE_ENV}={value!r} is not a CMake build type (e.g. Release)")
    return value


def cpu_key() -> str:
    """GGML_NATIVE binaries use this CPU's instruction set: one build per machine type and CPU
    flags (a cluster with several node types gets one each, all in the same cache)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    digest = hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]
    return f"{platform.machine()}-{digest}"


def llama_cpp_tools(root: Path | None = None, threads: int = 2) -> Path:
    """The folder holding llama.cpp's `llama-mtmd-cli` and `llama-quantize`, built once from the
    fetched sdist with cmake (the build type of `build_type()`, GGML_NATIVE, static, only those
    two targets) into the cache, one folder per CPU type and build type; `build.json` there
    records the flags and the build's seconds (wall and CPU)."""
    root = root or cache_root()
    btype = build_type()
    out = root / f"bin-{cpu_key()}-{btype.lower()}"
    if all((out / t).is_file() for t in BUILD_TARGETS):
        return out
    with _cache_lock(root):
        if not all((out / t).is_file() for t in BUILD_TARGETS):  # not built meanwhile
            _build_tools(root, btype, out, threads)
    return out


def _build_tools(root: Path, btype: str, out: Path, threads: int) -> None:
    sdist = _sdist(root)
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise GGUFError(
            f"building llama.cpp's {', '.join(BUILD_TARGETS)} needs {' and '.join(missing)} "
            "(a C++17 compiler and cmake >= 3.14) on this machine"
        )
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = [f"-DCMAKE_BUILD_TYPE={btype}", *CMAKE_FLAGS]
    t0, cpu0 = time.monotonic(), _children_cpu()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as work, atomic_dir(out) as tmp:
        src, build = Path(work) / "src", Path(work) / "build"
        _unpack(sdist, src, None)
        steps = [
            ["cmake", "-S", str(src), "-B", str(build), *generator, *flags],
            ["cmake", "--build", str(build), "-j", str(threads), "--target", *BUILD_TARGETS],
        ]
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise GGUFError(
                    f"building llama.cpp failed ({' '.join(cmd[:2])}):\n"
                    f"{(res.stdout + res.stderr)[-3000:]}"
                )
        for t in BUILD_TARGETS:
            shutil.copy2(build / "bin" / t, tmp / t)
        info = {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "targets": list(BUILD_TARGETS),
            "build_type": btype,
            "cmake_flags": flags,
            "threads": threads,
            "seconds": round(time.monotonic() - t0, 1),
            "cpu_seconds": round(_children_cpu() - cpu0, 1),
        }
        (tmp / "build.json").write_text(json.dumps(info, indent=2))


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes (the compilers)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


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


def _family_of_config(cfg: dict) -> str | None:
    from .families import family_for_model_type

    vision = (cfg.get("vision_config") or {}).get("model_type")
    key = cfg.get("model_type")
    if key == "llava" and vision == "pixtral":
        key = "llava:pixtral"
    try:
        return family_for_model_type(key).name
    except KeyError:
        return None


def family_of(folder: str | os.PathLike) -> str | None:
    """The registry family of a model folder (its config.json), None if not in the registry."""
    return _family_of_config(json.loads((Path(folder) / "config.json").read_text()))


def check_gguf_family(family: str | None, where: str) -> str:
    if family not in GGUF_FAMILIES:
        raise GGUFError(
            f"export.save_method gguf*: the model family {family or 'unknown'!r} ({where}) is "
            "not one llama.cpp's converter writes as GGUF + mmproj (supported: "
            f"{', '.join(sorted(GGUF_FAMILIES))}); use save_method merged_16bit"
        )
    return family


def check_gguf_source(model_cfg: dict, *, built_by_rule: str | None = None) -> None:
    """A GGUF export of a family llama.cpp cannot convert fails when the config is read, before
    any job, wherever the family is known without a download: a tiny model built by a rule (its
    name says the family), a local folder, a hub model already in the Hugging Face cache (else
    fetch_model checks it once downloaded)."""
    name = model_cfg["name"]
    if built_by_rule and name.startswith(built_by_rule) and not Path(name).is_dir():
        check_gguf_family(name[len(built_by_rule) :], f"model.name {name}")
        return
    from .hub import is_hub_id

    cfg_file = Path(name).expanduser() / "config.json"
    if is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=model_cfg["revision"])
        if not isinstance(cached, str):
            return
        cfg_file = Path(cached)
    family = _family_of_config(json.loads(cfg_file.read_text()))
    check_gguf_family(family, f"model.name {name}")


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


def quantize_q4_k_m(src: Path, dst: Path, tools: Path, threads: int) -> None:
    """llama.cpp's own quantizer (`llama-quantize`, built from the same source)."""
    cmd = [str(tools / "llama-quantize"), str(src), str(dst), "Q4_K_M", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not dst.is_file():
        raise GGUFError(f"llama-quantize failed on {src}:\n{(res.stdout + res.stderr)[-2000:]}")


def export_gguf(
    merged_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str,
    *,
    pretokenizer: str | None = None,
    root: Path | None = None,
    threads: int = 2,
) -> dict:
    """Convert the merged folder to GGUF files in `out_dir` with the converter of the fetched
    source in `root` (the cache). Returns the summary (also written as gguf_export.json)."""
    merged = Path(merged_dir)
    if method not in GGUF_METHODS:
        raise GGUFError(
            f"export.save_method {method!r} is not a GGUF method ({list(GGUF_METHODS)})"
        )
    quant = GGUF_METHODS[method]
    model_type = json.loads((merged / "config.json").read_text())["model_type"]
    family = check_gguf_family(family_of(merged), f"{merged}/config.json")
    conv = converter_dir(root)
    summary: dict = {
        "save_method": method,
        "quantization": quant,
        "model_type": model_type,
        "family": family,
    }
    with atomic_dir(out_dir) as tmp:
        outtype = "bf16" if quant == "q4_k_m" else quant
        lm = tmp / f"model-{outtype}.gguf"
        _convert(conv, merged, lm, outtype, pretokenizer, mmproj=False)
        if quant == "q4_k_m":
            q = tmp / "model-q4_k_m.gguf"
            quantize_q4_k_m(lm, q, llama_cpp_tools(root, threads), threads)
            lm.unlink()
            lm = q
        mm = tmp / "mmproj-bf16.gguf"
        _convert(conv, merged, mm, "bf16", pretokenizer, mmproj=True)
        summary["model"] = lm.name
        summary["mmproj"] = mm.name
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
