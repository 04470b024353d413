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


# llama.cpp's source (converter, gguf-py, C++ tools) from llama-cpp-python's sdist, into the
# cache (VLMFLOW_CACHE, else ~/.cache/vlmflow): the only GGUF step that goes online, so it runs
# where snakemake runs (the login node under SLURM), never on a compute node.
localrules:
    llama_cpp_source,


rule llama_cpp_source:
    output:
        stamp="results/tools/llama_cpp_source.json",
    log:
        "logs/llama_cpp_source.log",
    benchmark:
        "benchmarks/llama_cpp_source.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    resources:
        **cpu_resources(),
    params:
        script=script("fetch_llama_cpp"),
        config=as_json("export", of=gguf_source_cfg),
    shell:
        "python {params.script:q} --config {params.config:q} --out {output.stamp:q} > {log:q} 2>&1"


# GGUF for llama.cpp / Ollama (export.save_method gguf, gguf_q8_0, gguf_q4_k_m), converted from
# the 16-bit merge by llama.cpp's own converter (Q4_K_M by its llama-quantize, built once).
rule gguf:
    input:
        merged="results/runs/{run}/merged",
        source="results/tools/llama_cpp_source.json",
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
        "python {params.script:q} convert --config {params.config:q} --merged {input.merged:q} "
        "--source {input.source:q} --out {output.gguf:q} --threads {threads} > {log:q} 2>&1"


# The GGUF served by llama.cpp (llama-mtmd-cli, fresh processes) answers the merge check's
# sample prompts as the merged model does in transformers (export.serve_check).
rule serve_check:
    input:
        gguf="results/runs/{run}/gguf",
        merged="results/runs/{run}/merged",
        source="results/tools/llama_cpp_source.json",
        train=run_file("results/data/{dataset}/train.parquet"),
    output:
        check="results/runs/{run}/serve_check.json",
    log:
        "logs/serve_check/{run}.log",
    benchmark:
        "benchmarks/serve_check/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 2
    resources:
        **cpu_resources(),
    params:
        script=script("gguf"),
        config=as_json("model", "export"),
    shell:
        "python {params.script:q} serve-check --config {params.config:q} "
        "--merged {input.merged:q} --source {input.source:q} --gguf {input.gguf:q} "
        "--train {input.train:q} --out {output.check:q} --threads {threads} > {log:q} 2>&1"
