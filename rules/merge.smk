# Export: the adapter merged into the original 16-bit base weights (export.save_method
# merged_16bit; merged_4bit quantizes that merge), checked against the adapter on the base.
# With save_method lora there is nothing to merge: evaluation applies the adapter to the base.


rule merge:
    input:
        adapter="results/runs/{run}/adapter",
        train=run_file("results/data/{dataset}/train.parquet"),
        summary=run_file("results/data/{dataset}/summary.json"),
        model=model_input,
    output:
        merged=directory("results/runs/{run}/merged"),
        check="results/runs/{run}/merge_check.json",
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
        "python {params.script:q} --config {params.config:q} "
        "--adapter {input.adapter:q} --train {input.train:q} --data-summary {input.summary:q} "
        "--out {output.merged:q} --check {output.check:q} --threads {threads:q} > {log:q} 2>&1"
