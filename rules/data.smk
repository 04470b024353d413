# Data stage: validate every referenced image, then convert sources to conversation Parquet.


rule validate_images:
    input:
        sources=source_files,
        images=dataset_images,
    output:
        images="results/data/{dataset}/images.parquet",
    log:
        "logs/validate_images/{dataset}.log",
    benchmark:
        "benchmarks/validate_images/{dataset}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: workflow.cores
    resources:
        **cpu_resources(),
    params:
        script=script("validate_images"),
        dataset=dataset_json,
    shell:
        "python {params.script} --config {params.dataset:q} "
        "--out {output.images} --threads {threads} > {log} 2>&1"


rule format_conversations:
    input:
        sources=source_files,
        images="results/data/{dataset}/images.parquet",
    output:
        train="results/data/{dataset}/train.parquet",
        val="results/data/{dataset}/val.parquet",
        test="results/data/{dataset}/test.parquet",
        rejected="results/data/{dataset}/rejected.parquet",
        summary="results/data/{dataset}/summary.json",
    log:
        "logs/format_conversations/{dataset}.log",
    benchmark:
        "benchmarks/format_conversations/{dataset}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    resources:
        **cpu_resources(),
    params:
        script=script("format_conversations"),
        dataset=dataset_json,
        outdir=subpath(output.summary, parent=True),
    shell:
        "python {params.script} --config {params.dataset:q} "
        "--images {input.images} --outdir {params.outdir} > {log} 2>&1"
