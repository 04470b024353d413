# Figures and pages for `snakemake --report report.html`: data QC, training curves, base vs tuned
# metrics and a gallery of test samples. Captions live in report/*.rst.


rule report_data:
    input:
        summary=f"results/data/{DATASET}/summary.json",
        rejected=f"results/data/{DATASET}/rejected.parquet",
        images=f"results/data/{DATASET}/images.parquet",
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
        "python {params.script} data --config {params.config:q} "
        "--summary {input.summary} --rejected {input.rejected} --images {input.images} "
        "--extra {input.extra} --html {output.html} --figures {output.figures} > {log} 2>&1"


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
        "python {params.script} training --config {params.config:q} "
        "--log {input.adapter}/train_log.jsonl --png {output.png} > {log} 2>&1"


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
            f"--merge-check {input.merge_check}"
            if "merge_check" in input.keys()
            else ""
        ),
    shell:
        "python {params.script} evaluation --config {params.config:q} "
        "--metrics {input.metrics} --predictions {input.predictions} {params.merge_check} "
        "--html {output.html} --png {output.png} --gallery {output.gallery} > {log} 2>&1"


# The landing page of the report (report/workflow.rst) shows this fragment inline: the metrics
# base vs tuned, the run's facts and the training curves, without a click.
rule report_summary:
    input:
        data=f"results/data/{DATASET}/summary.json",
        budget="results/runs/{run}/data/summary.json",
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
        dataset=DATASET,
        lora_only="" if MERGED else "--lora-only",
    shell:
        "python {params.script} summary --config {params.config:q} --run {wildcards.run} "
        "--dataset {params.dataset} {params.lora_only} --png {input.training} "
        "--html {output.html} > {log} 2>&1"
