# The comparison of an experiment's runs (config `runs:` / `sweep:`): table, overlaid loss
# curves, a gallery of every run's answers, the best run (best.json) and the experiment's
# archive, under results/experiments/{experiment.name}/ and in the report's "Experiment"
# category.


if EXPERIMENT:

    rule compare_runs:
        input:
            configs=expand("results/runs/{run}/config.yaml", run=RUNS),
            metrics=expand("results/runs/{run}/eval/metrics.json", run=RUNS),
            predictions=expand("results/runs/{run}/eval/predictions.parquet", run=RUNS),
            adapters=expand("results/runs/{run}/adapter", run=RUNS),
        output:
            table=report(
                f"{EXPERIMENT_DIR}/table.html",
                caption="../report/experiment_table.rst",
                category="Experiment",
            ),
            tsv=f"{EXPERIMENT_DIR}/table.tsv",
            loss=report(
                f"{EXPERIMENT_DIR}/loss.png",
                caption="../report/experiment_loss.rst",
                category="Experiment",
            ),
            gallery=report(
                f"{EXPERIMENT_DIR}/gallery.html",
                caption="../report/experiment_gallery.rst",
                category="Experiment",
            ),
            best=report(
                f"{EXPERIMENT_DIR}/best.json",
                caption="../report/experiment_best.rst",
                category="Experiment",
            ),
        log:
            f"logs/compare_runs/{config['experiment']['name']}.log",
        benchmark:
            f"benchmarks/compare_runs/{config['experiment']['name']}.tsv"
        conda:
            "../envs/vlmflow.yaml"
        threads: 1
        resources:
            **cpu_resources(),
        params:
            script=script("compare"),
            config=json.dumps(
                {s: config[s] for s in ("experiment", "report")}, sort_keys=True
            ),
            runs=experiment_runs_json(),
            out_dir=subpath(output.best, parent=True),
        shell:
            "python {params.script:q} compare --config {params.config:q} "
            "--runs {params.runs:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"

    rule experiment_archive:
        input:
            configs=expand("results/runs/{run}/config.yaml", run=RUNS),
            comparison=[
                f"{EXPERIMENT_DIR}/table.tsv",
                f"{EXPERIMENT_DIR}/table.html",
                f"{EXPERIMENT_DIR}/loss.png",
                f"{EXPERIMENT_DIR}/gallery.html",
                f"{EXPERIMENT_DIR}/best.json",
            ],
        output:
            archive=f"{EXPERIMENT_DIR}/archive.tar.gz",
        log:
            f"logs/experiment_archive/{config['experiment']['name']}.log",
        benchmark:
            f"benchmarks/experiment_archive/{config['experiment']['name']}.tsv"
        conda:
            "../envs/vlmflow.yaml"
        threads: 1
        resources:
            **cpu_resources(),
        params:
            script=script("compare"),
            config=json.dumps(
                {s: config[s] for s in ("experiment", "report")}, sort_keys=True
            ),
            runs=experiment_runs_json(),
        shell:
            "python {params.script:q} archive --config {params.config:q} "
            "--runs {params.runs:q} --comparison {input.comparison:q} "
            "--out {output.archive:q} > {log:q} 2>&1"
