# Evaluation: base vs tuned model (the merged export, or the adapter on the base when
# export.save_method is lora) on the test split.


rule evaluate:
    input:
        test="results/runs/{run}/data/test.parquet",
        tuned=tuned_model,
        model=model_input,
    output:
        metrics="results/runs/{run}/eval/metrics.json",
        predictions="results/runs/{run}/eval/predictions.parquet",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: config["eval"]["threads"]
    resources:
        **gpu_resources(config["eval"]["gpus"]),
    params:
        script=script("evaluate"),
        config=as_json("model", "eval"),
    shell:
        "exec python {params.script:q} --config {params.config:q} "
        "--test {input.test:q} --tuned {input.tuned:q} --metrics {output.metrics:q} "
        "--predictions {output.predictions:q} --threads {threads:q} > {log:q} 2>&1"
