# Merge: the adapter folded into fresh 16-bit base weights, saved as a plain transformers model.


rule merge:
    input:
        adapter="results/runs/{run}/adapter",
        model=model_input,
    output:
        merged=directory("results/runs/{run}/merged"),
    log:
        "logs/merge/{run}.log",
    benchmark:
        "benchmarks/merge/{run}.tsv"
    params:
        config=as_json("model", "export"),
    threads: 2
    conda:
        "../envs/vlmflow.yaml"
    shell:
        "python {workflow.basedir}/scripts/merge.py --config {params.config:q} "
        "--adapter {input.adapter} --out {output.merged} --threads {threads} > {log} 2>&1"
