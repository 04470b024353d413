# Publish: the adapter and the merged model as folders ready to push (cleaned for serving, hard
# links of the exported files), with final model cards that carry the evaluation. Nothing is
# uploaded: pushing stays the user's command (README, "Deploying").
import shlex


rule publish:
    input:
        unpack(export_outputs),
        adapter="results/runs/{run}/adapter",
        metrics="results/runs/{run}/eval/metrics.json",
        summary=f"results/data/{DATASET}/summary.json",
        model=model_input,
    output:
        publish=directory("results/runs/{run}/publish"),
    log:
        "logs/publish/{run}.log",
    benchmark:
        "benchmarks/publish/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    resources:
        **cpu_resources(),
    params:
        script=script("publish"),
        config=as_json("run", "model", "export"),
        export=lambda wildcards, input: (
            f"--merged {shlex.quote(input.merged)} "
            f"--merge-check {shlex.quote(input.merge_check)}"
            if "merged" in input.keys()
            else ""
        ),
    shell:
        "python {params.script} --config {params.config:q} --adapter {input.adapter:q} "
        "{params.export} --metrics {input.metrics:q} --data-summary {input.summary:q} "
        "--out {output.publish:q} --threads {threads} > {log:q} 2>&1"
