# Evaluation on the test split: the base model once per (base model, data, eval settings), shared
# by every run with those, then each run's tuned model (the merged export, or the adapter on the
# base when export.save_method is lora) next to the base's answers.


rule evaluate_base:
    input:
        test=lambda wildcards: f"results/data/{wildcards.dataset}/budget/"
        f"{budget_key(base_cfg(wildcards))}/test.parquet",
        model=model_input_of(base_cfg),
    output:
        answers="results/base/{dataset}/{base}/answers.parquet",
        stats="results/base/{dataset}/{base}/generation.json",
    log:
        "logs/evaluate_base/{dataset}/{base}.log",
    benchmark:
        "benchmarks/evaluate_base/{dataset}/{base}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: threads_of("eval", of=base_cfg)
    resources:
        **gpu_resources("eval", of=base_cfg),
    params:
        script=script("evaluate"),
        config=as_json("model", "eval", of=base_cfg),
        launch=eval_launcher(base_cfg),
    shell:
        "exec {params.launch} {params.script:q} --config {params.config:q} --test {input.test:q} "
        "--base-answers {output.answers:q} --base-stats {output.stats:q} "
        "--threads {threads:q} > {log:q} 2>&1"


rule evaluate:
    input:
        test=run_file("{budget}/test.parquet"),
        tuned=tuned_model,
        model=model_input,
        base_answers=run_file("{base}/answers.parquet"),
        base_stats=run_file("{base}/generation.json"),
    output:
        metrics="results/runs/{run}/eval/metrics.json",
        predictions="results/runs/{run}/eval/predictions.parquet",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: threads_of("eval")
    resources:
        **gpu_resources("eval"),
    params:
        script=script("evaluate"),
        config=as_json("model", "eval"),
        launch=eval_launcher(),
    shell:
        "exec {params.launch} {params.script:q} --config {params.config:q} "
        "--test {input.test:q} --tuned {input.tuned:q} --base-answers {input.base_answers:q} "
        "--base-stats {input.base_stats:q} --metrics {output.metrics:q} "
        "--predictions {output.predictions:q} --threads {threads:q} > {log:q} 2>&1"
