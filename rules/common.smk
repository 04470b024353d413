import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

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
from vlmflow.experiments import (  # noqa: E402
    base_eval_key,
    budget_key,
    is_experiment,
    resolve_runs,
    shared_jobs,
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
# One fully resolved, validated config per run (the single `run:`, or `runs:` / `sweep:`): every
# problem of every run fails here, naming the run and the key. Rule params come from these.
RUNS = resolve_runs(config)
EXPERIMENT = is_experiment(config)
if workflow.is_main_process:
    print(describe_settings(config, CONFIG_FILES), file=sys.stderr)
    if EXPERIMENT:
        print(
            f"vlmflow experiment: {len(RUNS)} runs: {', '.join(RUNS)}", file=sys.stderr
        )

# Jobs read base models from the Hugging Face cache only: a hub model is put there by rule
# fetch_model (which alone goes online), on the login node. An explicit HF_HUB_OFFLINE wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_DIGITS = config["demo"]["digits"]
TINY_MODEL_PREFIX = "resources/models/tiny-"
# A missing or unusable local base model fails here, before any job (hub ids: rule fetch_model).
for _cfg in {c["model"]["name"]: c for c in RUNS.values()}.values():
    check_model_source(_cfg["model"], built_by_rule=TINY_MODEL_PREFIX)


def is_gguf(cfg):
    """Whether the run exports GGUF (export.save_method gguf, gguf_q8_0, gguf_q4_k_m)."""
    return cfg["export"]["save_method"].startswith("gguf")


# A GGUF export of a family llama.cpp's converter cannot write fails here too.
for _cfg in {c["model"]["name"]: c for c in RUNS.values() if is_gguf(c)}.values():
    check_gguf_source(_cfg["model"], built_by_rule=TINY_MODEL_PREFIX)
# What runs share, each taking its settings from the first run with it: the token budget per
# (dataset, model settings), the base model's evaluation per (base model, data, eval settings).
BUDGETS = shared_jobs(RUNS, budget_key)
BASE_EVALS = shared_jobs(RUNS, base_eval_key)
# Hub models to fetch: {marker path: the model section of a run that uses it}.
HUB_MODELS = {
    marker_path(c["model"]["name"], c["model"]["revision"]): c["model"]
    for c in RUNS.values()
    if is_hub_id(c["model"]["name"])
}


def run_cfg(wildcards):
    """The resolved config of the job's run (an unknown run name is an error, not a run with the
    top-level settings)."""
    try:
        return RUNS[wildcards.run]
    except KeyError:
        raise WorkflowError(
            f"no run named '{wildcards.run}' in this config (runs: {', '.join(RUNS)})"
        ) from None


def budget_dir(wildcards):
    """Folder of the run's token budget (shared by the runs with the same data and model)."""
    cfg = run_cfg(wildcards)
    return f"results/data/{cfg['run']['dataset']}/budget/{budget_key(cfg)}"


def base_eval_dir(wildcards):
    """Folder of the base model's answers on the run's test split (shared by runs)."""
    cfg = run_cfg(wildcards)
    return f"results/base/{cfg['run']['dataset']}/{base_eval_key(cfg)}"


def run_file(template):
    """Input function: `template` with {dataset}, {budget}, {base} of the job's run."""

    def path(wildcards):
        cfg = run_cfg(wildcards)
        return template.format(
            dataset=cfg["run"]["dataset"],
            budget=budget_dir(wildcards),
            base=base_eval_dir(wildcards),
        )

    return path


def shared_cfg(jobs, key):
    """Resolved config of the run whose settings a shared job (budget, base eval) takes."""

    def cfg(wildcards):
        job = (wildcards.dataset, getattr(wildcards, key))
        if job not in jobs:
            raise WorkflowError(
                f"no run of this config has {key} '{job[1]}' on '{job[0]}'"
            )
        return RUNS[jobs[job]]

    return cfg


budget_cfg = shared_cfg(BUDGETS, "budget")
base_cfg = shared_cfg(BASE_EVALS, "base")


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


def sections_json(cfg, sections):
    return json.dumps({s: cfg[s] for s in sections}, sort_keys=True)


def as_json(*sections, of=run_cfg):
    """Params function: the named sections of the job's run config (`of`: another resolved
    config of the job) as one JSON string, so that editing a section of one run re-runs
    exactly that run's rules that read it."""
    return lambda wildcards: sections_json(of(wildcards), sections)


def run_config_json(wildcards):
    """The run's whole resolved config, as JSON."""
    return json.dumps(run_cfg(wildcards), sort_keys=True)


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


def model_input_of(cfg_of):
    """Input function: the base model folder when it is local (a tiny one is built by a rule);
    for a hub id, the marker of rule fetch_model, which puts the model into the HF cache.
    """

    def model_input(wildcards):
        model = cfg_of(wildcards)["model"]
        name = model["name"]
        if name.startswith(TINY_MODEL_PREFIX) or Path(name).is_dir():
            return [name]
        if is_hub_id(name):
            return [marker_path(name, model["revision"])]
        return []

    return model_input


model_input = model_input_of(run_cfg)


def model_source_json(wildcards, output):
    """The model settings fetch_model reads (hub id, revision, remote-code permission)."""
    m = HUB_MODELS[output.marker]
    keys = ("name", "revision", "trust_remote_code")
    return json.dumps({"model": {k: m[k] for k in keys}}, sort_keys=True)


# ---- cluster resources (config section `resources`; see vlmflow.cluster)
def cpu_resources():
    """resources: of a job without GPUs."""
    return job_resources(config["resources"])


def gpu_resources(section, time_limit_signal=False, of=run_cfg):
    """resources: of a job with the GPUs of config section `section` (train, eval) of its run
    (`of`: the job's resolved config), CPU resources when gpus is 0. Each resource is a
    function of the job; one a run does not ask for is None (Snakemake leaves it out).
    """
    signal_s = config["resources"]["time_limit_signal_s"] if time_limit_signal else 0

    def of_run(cfg):
        s = cfg[section]
        return job_resources(
            cfg["resources"],
            gpus=s["gpus"],
            nodes=s.get("nodes", 1),
            time_limit_signal_s=signal_s,
        )

    keys = sorted({k for cfg in RUNS.values() for k in of_run(cfg)})

    def resource(key):
        def value(wildcards, attempt):
            v = of_run(of(wildcards)).get(key)
            return v(wildcards, attempt) if callable(v) else v

        value.__name__ = f"{section}_{key}_of_run"
        return value

    return {k: resource(k) for k in keys}


def threads_of(section, of=run_cfg):
    """threads: `section`.threads of the job's run."""
    return lambda wildcards: of(wildcards)[section]["threads"]


def gpu_slot(gpus):
    """The prefix that gives a job on one machine its own `gpus` GPUs (vlmflow.gpu_slots), so
    that `--resources gpu=N` jobs at once do not share a device; none without GPUs."""
    return f"python -m vlmflow.gpu_slots --gpus {gpus} -- " if gpus > 0 else ""


def train_launcher(wildcards):
    """python, torchrun (N GPUs) or srun + torchrun (M nodes): see vlmflow.cluster."""
    cfg = run_cfg(wildcards)
    t = cfg["train"]
    launch = launch_prefix(
        t["gpus"],
        t["nodes"],
        max(60, cfg["resources"]["time_limit_signal_s"]),
        t["threads"],
    )
    return launch if t["nodes"] > 1 else gpu_slot(t["gpus"]) + launch


def eval_launcher(of=run_cfg):
    """Params function: python, on the job's own GPUs (gpu_slot)."""
    return lambda wildcards: gpu_slot(of(wildcards)["eval"]["gpus"]) + "python"


def merged(cfg):
    return cfg["export"]["save_method"] != "lora"


def gguf_source_cfg(wildcards):
    """Config of the llama.cpp source fetch (one per workflow): the first GGUF run's."""
    return next((c for c in RUNS.values() if is_gguf(c)), next(iter(RUNS.values())))


def fetch_gguf_flag(wildcards, output):
    """fetch_model's --check-gguf when a run exports this model as GGUF."""
    runs = [c for c in RUNS.values() if is_gguf(c)]
    model = HUB_MODELS[output.marker]
    same = [c for c in runs if c["model"]["name"] == model["name"]]
    return "--check-gguf" if same else ""


def serve_checked(cfg):
    """Whether the run's GGUF export is served by llama.cpp and checked (export.serve_check)."""
    return is_gguf(cfg) and cfg["export"]["serve_check"]


def tuned_model(wildcards):
    """What evaluation calls the tuned model: the merged export, or the adapter (applied to the
    base) when export.save_method is lora."""
    if merged(run_cfg(wildcards)):
        return f"results/runs/{wildcards.run}/merged"
    return f"results/runs/{wildcards.run}/adapter"


def export_outputs(wildcards):
    """The merged model and its merge check, when there is a merge (and the GGUF serve check)."""
    if not merged(run_cfg(wildcards)):
        return {}
    outputs = {
        "merged": f"results/runs/{wildcards.run}/merged",
        "merge_check": f"results/runs/{wildcards.run}/merge_check.json",
    }
    if serve_checked(run_cfg(wildcards)):
        outputs["serve_check"] = f"results/runs/{wildcards.run}/serve_check.json"
    return outputs


def optional_figures(wildcards):
    """Figures another stage may produce for the report (the token-length histogram of the
    run's filtered data): included when a rule of this workflow makes them."""
    paths = [f"{budget_dir(wildcards)}/token_lengths.png"]
    return [p for p in paths if any(r.is_producer(p) for r in workflow.rules)]


def data_files(wildcards):
    """The dataset's source files and Parquet files, for the archive's data manifest."""
    dataset = run_cfg(wildcards)["run"]["dataset"]
    sources = [s["path"] for s in config["datasets"][dataset]["sources"]]
    return sources + [
        f"results/data/{dataset}/{split}.parquet"
        for split in ("train", "val", "test", "rejected")
    ]


def lock_file():
    path = Path(workflow.basedir) / "requirements.lock"
    return [os.path.relpath(path)] if path.is_file() else []


def run_outputs(run):
    """What `snakemake` makes of one run."""
    cfg = RUNS[run]
    run_dir = f"results/runs/{run}"
    outputs = [
        f"{run_dir}/config.yaml",
        f"results/data/{cfg['run']['dataset']}/summary.json",
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
    if merged(cfg):
        outputs += [f"{run_dir}/merged", f"{run_dir}/merge_check.json"]
    if is_gguf(cfg):
        outputs.append(f"{run_dir}/gguf")
    if serve_checked(cfg):
        outputs.append(f"{run_dir}/serve_check.json")
    return outputs


EXPERIMENT_DIR = f"results/experiments/{config['experiment']['name']}"


def final_outputs():
    outputs = [p for run in RUNS for p in run_outputs(run)]
    if EXPERIMENT:
        outputs += [f"{EXPERIMENT_DIR}/best.json", f"{EXPERIMENT_DIR}/archive.tar.gz"]
    return outputs


def print_run_summary():
    """The end of a successful `snakemake` run: rows, steps, loss, metrics, where things are."""
    if not workflow.is_main_process:
        return
    from vlmflow.summary import format_summary, run_summary

    # With --configfile, CONFIG_FILES are exactly those (the demo's is not read).
    cli_files = CONFIG_FILES if workflow.overwrite_configfiles else []
    for run, cfg in RUNS.items():
        summary = run_summary(
            run,
            cfg["run"]["dataset"],
            merged=merged(cfg),
            configfiles=cli_files,
            budget=f"{budget_dir(SimpleNamespace(run=run))}/summary.json",
        )
        print(format_summary(summary), file=sys.stderr)
    if EXPERIMENT and Path(f"{EXPERIMENT_DIR}/best.json").is_file():
        best = json.loads(Path(f"{EXPERIMENT_DIR}/best.json").read_text())
        print(
            f"experiment {config['experiment']['name']}: best run {best['run']} "
            f"({best['metric']} {best['value']:.4g}), comparison in {EXPERIMENT_DIR}/",
            file=sys.stderr,
        )


def experiment_runs_json():
    """The files of every run that the comparison reads, as JSON (run order kept)."""
    runs = {}
    for run, cfg in RUNS.items():
        d = f"results/runs/{run}"
        runs[run] = {
            "config": f"{d}/config.yaml",
            "metrics": f"{d}/eval/metrics.json",
            "predictions": f"{d}/eval/predictions.parquet",
            "train_log": f"{d}/adapter/train_log.jsonl",
            "adapter": f"{d}/adapter",
            "merged": f"{d}/merged" if merged(cfg) else None,
        }
    return json.dumps(runs)
