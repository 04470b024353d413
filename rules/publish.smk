# Publish: the adapter and the merged model as folders ready to push (cleaned for serving, hard
# links of the exported files), with final model cards that carry the evaluation. Nothing is
# uploaded: pushing stays the user's command (README, "Deploying").
import shlex


rule publish:
    input:
        unpack(export_outputs),
        adapter="results/runs/{run}/adapter",
        metrics="results/runs/{run}/eval/metrics.json",
        summary=run_file("results/data/{dataset}/summary.json"),
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


# GGUF for llama.cpp / Ollama (export.save_method gguf, gguf_q8_0, gguf_q4_k_m), converted from
# the 16-bit merge by llama.cpp's own converter.
rule gguf:
    input:
        merged="results/runs/{run}/merged",
    output:
        gguf=directory("results/runs/{run}/gguf"),
    log:
        "logs/gguf/{run}.log",
    benchmark:
        "benchmarks/gguf/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 2
    resources:
        **cpu_resources(),
    params:
        script=script("gguf"),
        config=as_json("export"),
    shell:
        "python {params.script} --config {params.config:q} --merged {input.merged:q} "
        "--out {output.gguf:q} --threads {threads} > {log:q} 2>&1"
