# Reproducibility archive of a run: config, data manifest, environment, code version, logs,
# adapter, metrics, report and REPRODUCE.md (not the base weights: their id and revision).
# It runs last, so that every other step's log is complete.


rule archive:
    input:
        unpack(export_outputs),
        images=run_file("results/data/{dataset}/images.parquet"),
        data=data_files,
        summary=run_file("results/data/{dataset}/summary.json"),
        adapter="results/runs/{run}/adapter",
        metrics="results/runs/{run}/eval/metrics.json",
        predictions="results/runs/{run}/eval/predictions.parquet",
        lock=lock_file(),
        report=[
            "results/runs/{run}/report/data_qc.html",
            "results/runs/{run}/report/data",
            "results/runs/{run}/report/training.png",
            "results/runs/{run}/report/metrics.html",
            "results/runs/{run}/report/metrics.png",
            "results/runs/{run}/report/gallery.html",
        ],
    output:
        archive="results/runs/{run}/archive.tar.gz",
    log:
        "logs/archive/{run}.log",
    benchmark:
        "benchmarks/archive/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("archive"),
        config=run_config_json,
        repo=os.path.relpath(workflow.basedir),
        # Lists: the shell command quotes each item (`:q`).
        export=lambda wildcards, input: (
            ["--merged", input.merged, "--merge-check", input.merge_check]
            if "merged" in input.keys()
            else []
        ),
        lock=lambda wildcards, input: ["--lock", *input.lock] if input.lock else [],
    shell:
        "python {params.script:q} --config {params.config:q} --out {output.archive:q} "
        "--images {input.images:q} --data {input.data:q} --summary {input.summary:q} "
        "--adapter {input.adapter:q} --metrics {input.metrics:q} "
        "--predictions {input.predictions:q} {params.export:q} {params.lock:q} "
        "--report {input.report:q} "
        "--repo {params.repo:q} > {log:q} 2>&1"
