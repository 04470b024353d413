# vlmflow: fine-tune vision-language models with LoRA/QLoRA, from image folders to a merged,
# evaluated model. Run `snakemake --cores all` (workstation) or `--profile profiles/slurm`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
