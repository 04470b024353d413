import json
import os
import sys
from pathlib import Path

SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
# The rules' scripts import vlmflow from this checkout, also inside a conda env
# (--software-deployment-method conda) where the package is not installed: jobs inherit this.
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [SRC]
        + [p for p in os.getenv("PYTHONPATH", "").split(os.pathsep) if p and p != SRC]
    )
)

from snakemake.exceptions import WorkflowError  # noqa: E402
from snakemake.utils import update_config  # noqa: E402
from vlmflow.cluster import job_resources, launch_prefix  # noqa: E402
from vlmflow.config import (  # noqa: E402
    check_config_files,
    describe_settings,
    typed_cli_config,
    validate_config,
)
from vlmflow.gguf import check_gguf_source  # noqa: E402
from vlmflow.hub import check_model_source, is_hub_id, marker_path  # noqa: E402
from vlmflow.paths import cache_dir_of, referenced_images  # noqa: E402

# The config files this run is made of: those of --configfile, else the demo's. Each is re-read
# strictly (a key given twice is an error naming both lines; Snakemake keeps the last silently),
# then every key is checked (and defaults filled) before the job graph is built, so a typo or a
# bad value fails here, naming the key.
CONFIG_FILES = [
    str(f) if os.path.relpath(f).startswith("..") else os.path.relpath(f)
    for f in workflow.configfiles
]
check_config_files(CONFIG_FILES)
# `--config section={key: value}` arrives with string leaves, and YAML 1.1 reads `2e-4` as text:
# a string where the schema takes none is read as a YAML 1.2 value.
update_config(config, typed_cli_config(workflow.config_settings.config))
config.update(typed_cli_config(config))
validate_config(config)
if workflow.is_main_process:
    print(describe_settings(config, CONFIG_FILES), file=sys.stderr)

# Jobs read base models from the Hugging Face cache only: a hub model is put there by rule
# fetch_model (which alone goes online), on the login node. An explicit HF_HUB_OFFLINE wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUN = config["run"]["name"]
DATASET = config["run"]["dataset"]
DEMO_DIGITS = config["demo"]["digits"]
TINY_MODEL_PREFIX = "resources/models/tiny-"
# A missing or unusable local base model fails here, before any job (hub ids: rule fetch_model).
check_model_source(config["model"], built_by_rule=TINY_MODEL_PREFIX)
# A GGUF export of a family llama.cpp's converter cannot write fails here too.
if config["export"]["save_method"].startswith("gguf"):
    check_gguf_source(config["model"], built_by_rule=TINY_MODEL_PREFIX)


def all_cores():
    """`--cores` (a rule's threads: "all the cores"), or 1 for the commands that run no job and
    need no core count (--report, --unlock, ...)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def script(name):
    """Path of a CLI under scripts/, relative to the working directory (a params value, so
    that moving the checkout does not re-run anything)."""
    return os.path.relpath(Path(workflow.basedir) / "scripts" / f"{name}.py")


def as_json(*sections):
    """The named config sections as one JSON string: a rule's params, so that editing a
    section re-runs exactly the rules that read it."""
    return json.dumps({s: config[s] for s in sections}, sort_keys=True)


def dataset_json(wildcards):
    return json.dumps(config["datasets"][wildcards.dataset], sort_keys=True)


def source_files(wildcards):
    return [s["path"] for s in config["datasets"][wildcards.dataset]["sources"]]


def dataset_images(wildcards):
    """Every existing image file the dataset's rows reference, so that editing one image
    re-runs validation and what depends on it (embedded and URL images: the source file stands
    for them). Missing or escaping paths are left to validate_images, which quarantines their
    rows with a reason. `track_image_files: false` skips this listing (for millions of
    images)."""
    ds = config["datasets"][wildcards.dataset]
    if not ds["track_image_files"]:
        return []
    sources = ds["sources"]
    if DEMO_DIGITS and any(
        Path(s["path"]).is_relative_to(DEMO_DIGITS) for s in sources
    ):
        checkpoints.demo_digits.get()
    return referenced_images(sources)


def dataset_cache_dir(wildcards):
    """Blob store and validation cache of a dataset (`cache_dir`, else under results/data)."""
    return cache_dir_of(wildcards.dataset, config["datasets"][wildcards.dataset])


def model_input(wildcards):
    """The base model folder when it is local (a tiny one is built by a rule); for a hub id, the
    marker of rule fetch_model, which puts the model into the Hugging Face cache."""
    name = config["model"]["name"]
    if name.startswith(TINY_MODEL_PREFIX) or Path(name).is_dir():
        return [name]
    if is_hub_id(name):
        return [marker_path(name, config["model"]["revision"])]
    return []


def model_source_json():
    """The model settings fetch_model reads (hub id, revision, remote-code permission)."""
    m = config["model"]
    keys = ("name", "revision", "trust_remote_code")
    return json.dumps({"model": {k: m[k] for k in keys}}, sort_keys=True)


# ---- cluster resources (config section `resources`; see vlmflow.cluster)
def cpu_resources():
    """resources: of a job without GPUs."""
    return job_resources(config["resources"])


def gpu_resources(gpus, nodes=1, time_limit_signal=False):
    """resources: of a job with `gpus` GPUs per node (CPU resources when gpus is 0)."""
    signal_s = config["resources"]["time_limit_signal_s"] if time_limit_signal else 0
    return job_resources(
        config["resources"], gpus=gpus, nodes=nodes, time_limit_signal_s=signal_s
    )


def train_launcher():
    """python, torchrun (N GPUs) or srun + torchrun (M nodes): see vlmflow.cluster."""
    t = config["train"]
    return launch_prefix(
        t["gpus"],
        t["nodes"],
        max(60, config["resources"]["time_limit_signal_s"]),
        t["threads"],
    )


MERGED = config["export"]["save_method"] != "lora"
GGUF = config["export"]["save_method"].startswith("gguf")
SERVE_CHECK = GGUF and config["export"]["serve_check"]


def tuned_model(wildcards):
    """What evaluation calls the tuned model: the merged export, or the adapter (applied to the
    base) when export.save_method is lora."""
    if MERGED:
        return f"results/runs/{wildcards.run}/merged"
    return f"results/runs/{wildcards.run}/adapter"


def export_outputs(wildcards):
    """The merged model and its merge check, when there is a merge (and the GGUF serve check)."""
    if not MERGED:
        return {}
    outputs = {
        "merged": f"results/runs/{wildcards.run}/merged",
        "merge_check": f"results/runs/{wildcards.run}/merge_check.json",
    }
    if SERVE_CHECK:
        outputs["serve_check"] = f"results/runs/{wildcards.run}/serve_check.json"
    return outputs


def optional_figures(wildcards):
    """Figures another stage may produce for the report (the token-length histogram of the
    run's filtered data): included when a rule of this workflow makes them."""
    paths = [f"results/runs/{wildcards.run}/data/token_lengths.png"]
    return [p for p in paths if any(r.is_producer(p) for r in workflow.rules)]


def data_files(wildcards):
    """The dataset's source files and Parquet files, for the archive's data manifest."""
    sources = [s["path"] for s in config["datasets"][DATASET]["sources"]]
    return sources + [
        f"results/data/{DATASET}/{split}.parquet"
        for split in ("train", "val", "test", "rejected")
    ]


def lock_file():
    path = Path(workflow.basedir) / "requirements.lock"
    return [os.path.relpath(path)] if path.is_file() else []


def final_outputs():
    run_dir = f"results/runs/{RUN}"
    outputs = [
        f"{run_dir}/config.yaml",
        f"results/data/{DATASET}/summary.json",
        f"{run_dir}/adapter",
        f"{run_dir}/eval/metrics.json",
        f"{run_dir}/eval/predictions.parquet",
        f"{run_dir}/report/data_qc.html",
        f"{run_dir}/report/training.png",
        f"{run_dir}/report/metrics.html",
        f"{run_dir}/report/gallery.html",
        f"{run_dir}/report/summary.html",
        f"{run_dir}/archive.tar.gz",
        f"{run_dir}/publish",
    ]
    if MERGED:
        outputs += [f"{run_dir}/merged", f"{run_dir}/merge_check.json"]
    if GGUF:
        outputs.append(f"{run_dir}/gguf")
    if SERVE_CHECK:
        outputs.append(f"{run_dir}/serve_check.json")
    return outputs


def print_run_summary():
    """The end of a successful `snakemake` run: rows, steps, loss, metrics, where things are."""
    if not workflow.is_main_process:
        return
    from vlmflow.summary import format_summary, run_summary

    # With --configfile, CONFIG_FILES are exactly those (the demo's is not read).
    cli_files = CONFIG_FILES if workflow.overwrite_configfiles else []
    summary = run_summary(RUN, DATASET, merged=MERGED, configfiles=cli_files)
    print(format_summary(summary), file=sys.stderr)
