# Base model from the Hugging Face Hub into the HF cache, on the machine running snakemake (the
# login node: compute nodes often have no internet). Only in the DAG for a hub id; every other
# job runs with HF_HUB_OFFLINE=1 (set in rules/common.smk) and reads the cache.


if is_hub_id(config["model"]["name"]):

    localrules:
        fetch_model,

    rule fetch_model:
        output:
            marker=marker_path(config["model"]["name"], config["model"]["revision"]),
        log:
            "logs/fetch_model/fetch_model.log",
        benchmark:
            "benchmarks/fetch_model/fetch_model.tsv"
        conda:
            "../envs/vlmflow.yaml"
        threads: 1
        params:
            script=script("fetch_model"),
            model=model_source_json(),
            gguf="--check-gguf" if GGUF else "",
        shell:
            "HF_HUB_OFFLINE=0 python {params.script:q} --config {params.model:q} {params.gguf} "
            "--out {output.marker:q} > {log:q} 2>&1"
