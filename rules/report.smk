# Figures and pages for `snakemake --report report.html`: data QC, training curves, base vs tuned
# metrics and a gallery of test samples. Captions live in report/*.rst.


rule report_data:
    input:
        summary=run_file("results/data/{dataset}/summary.json"),
        rejected=run_file("results/data/{dataset}/rejected.parquet"),
        images=run_file("results/data/{dataset}/images.parquet"),
        extra=optional_figures,
    output:
        html=report(
            "results/runs/{run}/report/data_qc.html",
            caption="../report/data_qc.rst",
            category="1. Data",
        ),
        figures=report(
            directory("results/runs/{run}/report/data"),
            patterns=["{figure}.png"],
            caption="../report/data_figure.rst",
            category="1. Data",
        ),
    log:
        "logs/report_data/{run}.log",
    benchmark:
        "benchmarks/report_data/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("report"),
        config=as_json("report"),
    shell:
        "python {params.script:q} data --config {params.config:q} "
        "--summary {input.summary:q} --rejected {input.rejected:q} --images {input.images:q} "
        "--extra {input.extra:q} --html {output.html:q} --figures {output.figures:q} > {log:q} 2>&1"


rule report_training:
    input:
        adapter="results/runs/{run}/adapter",
    output:
        png=report(
            "results/runs/{run}/report/training.png",
            caption="../report/training.rst",
            category="2. Training",
        ),
    log:
        "logs/report_training/{run}.log",
    benchmark:
        "benchmarks/report_training/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("report"),
        config=as_json("report"),
    shell:
        "python {params.script:q} training --config {params.config:q} "
        "--log {input.adapter:q}/train_log.jsonl --png {output.png:q} > {log:q} 2>&1"


rule report_evaluation:
    input:
        unpack(export_outputs),
        metrics="results/runs/{run}/eval/metrics.json",
        predictions="results/runs/{run}/eval/predictions.parquet",
    output:
        html=report(
            "results/runs/{run}/report/metrics.html",
            caption="../report/metrics.rst",
            category="3. Evaluation",
        ),
        png=report(
            "results/runs/{run}/report/metrics.png",
            caption="../report/metrics_plot.rst",
            category="3. Evaluation",
        ),
        gallery=report(
            "results/runs/{run}/report/gallery.html",
            caption="../report/gallery.rst",
            category="3. Evaluation",
        ),
    log:
        "logs/report_evaluation/{run}.log",
    benchmark:
        "benchmarks/report_evaluation/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("report"),
        config=as_json("report"),
        merge_check=lambda wildcards, input: (
            ["--merge-check", input.merge_check]
            if "merge_check" in input.keys()
            else []
        ),
        serve_check=lambda wildcards, input: (
            ["--serve-check", input.serve_check]
            if "serve_check" in input.keys()
            else []
        ),
    shell:
        "python {params.script:q} evaluation --config {params.config:q} "
        "--metrics {input.metrics:q} --predictions {input.predictions:q} {params.merge_check:q} "
        "{params.serve_check:q} "
        "--html {output.html:q} --png {output.png:q} --gallery {output.gallery:q} > {log:q} 2>&1"


# The landing page of the report (report/workflow.rst) shows this fragment inline: the metrics
# base vs tuned, the run's facts and the training curves, without a click.
rule report_summary:
    input:
        data=run_file("results/data/{dataset}/summary.json"),
        budget=run_file("{budget}/summary.json"),
        adapter="results/runs/{run}/adapter",
        metrics="results/runs/{run}/eval/metrics.json",
        training="results/runs/{run}/report/training.png",
    output:
        html=report(
            "results/runs/{run}/report/summary.html",
            caption="../report/summary.rst",
            category="0. Summary",
        ),
    log:
        "logs/report_summary/{run}.log",
    benchmark:
        "benchmarks/report_summary/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("report"),
        config=as_json("report"),
        dataset=lambda wildcards: run_cfg(wildcards)["run"]["dataset"],
        lora_only=lambda wildcards: (
            [] if merged(run_cfg(wildcards)) else ["--lora-only"]
        ),
    shell:
        "python {params.script:q} summary --config {params.config:q} --run {wildcards.run:q} "
        "--dataset {params.dataset:q} {params.lora_only:q} --budget {input.budget:q} "
        "--png {input.training:q} "
        "--html {output.html:q} > {log:q} 2>&1"
