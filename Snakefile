# vlmflow: fine-tune vision-language models with LoRA/QLoRA, from image folders to a merged,
# evaluated model. Run `snakemake --cores all` (workstation) or `--profile profiles/slurm`.
from snakemake.utils import min_version

min_version("9.0")


# With no --configfile, the demo runs. A --configfile stands alone: what it leaves out takes the
# schema's defaults (config/schema/config.schema.yaml), never the demo's values.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


wildcard_constraints:
    dataset=r"[A-Za-z0-9._-]+",
    run=r"[A-Za-z0-9._-]+",
    family=r"[a-z0-9_]+",
    budget=r"[A-Za-z0-9._-]+",
    base=r"[A-Za-z0-9._-]+",
    org=r"[A-Za-z0-9._-]+",
    repo=r"[A-Za-z0-9._-]+",
    revision=r"[A-Za-z0-9._-]+",


include: "rules/config.smk"
include: "rules/demo.smk"
include: "rules/fetch_model.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"
include: "rules/publish.smk"
include: "rules/report.smk"
include: "rules/archive.smk"
include: "rules/experiment.smk"


rule all:
    default_target: True
    input:
        final_outputs(),


onsuccess:
    print_run_summary()
