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
    conda:
        "../envs/vlmflow.yaml"
    threads: 2
    resources:
        **cpu_resources(),
    params:
        script=script("merge"),
        config=as_json("model", "export"),
    shell:
        "python {params.script} --config {params.config:q} "
        "--adapter {input.adapter} --out {output.merged} --threads {threads} > {log} 2>&1"
