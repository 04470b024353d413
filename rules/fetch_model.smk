# Base models from the Hugging Face Hub into the HF cache, on the machine running snakemake (the
# login node: compute nodes often have no internet), once per (hub id, revision) of any run. Only
# in the DAG for hub ids; every other job runs with HF_HUB_OFFLINE=1 (set in rules/common.smk)
# and reads the cache.


if HUB_MODELS:

    localrules:
        fetch_model,

    rule fetch_model:
        output:
            marker="resources/hub/{org}/{repo}/{revision}.json",
        log:
            "logs/fetch_model/{org}/{repo}/{revision}.log",
        benchmark:
            "benchmarks/fetch_model/{org}/{repo}/{revision}.tsv"
        conda:
            "../envs/vlmflow.yaml"
        threads: 1
        params:
            script=script("fetch_model"),
            model=model_source_json,
            gguf=fetch_gguf_flag,
        shell:
            "HF_HUB_OFFLINE=0 python {params.script:q} --config {params.model:q} {params.gguf} "
            "--out {output.marker:q} > {log:q} 2>&1"
