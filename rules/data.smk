# Data stage. Per dataset (model-independent): validate every referenced image, then convert the
# sources to canonical conversation Parquet. Per (dataset, model settings), shared by the runs with
# those settings: count tokens with the model and drop (or fail on) samples over max_seq_length.


rule validate_images:
    input:
        sources=source_files,
        images=dataset_images,
    output:
        images="results/data/{dataset}/images.parquet",
        rejected="results/data/{dataset}/images_rejected.tsv",
    log:
        "logs/validate_images/{dataset}.log",
    benchmark:
        "benchmarks/validate_images/{dataset}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: all_cores()
    resources:
        **cpu_resources(),
    params:
        script=script("validate_images"),
        dataset=dataset_json,
        cache=dataset_cache_dir,
    shell:
        "python {params.script:q} --config {params.dataset:q} --cache-dir {params.cache:q} "
        "--name {wildcards.dataset:q} --out {output.images:q} --rejected {output.rejected:q} "
        "--threads {threads:q} > {log:q} 2>&1"


rule format_conversations:
    input:
        sources=source_files,
        images="results/data/{dataset}/images.parquet",
    output:
        train="results/data/{dataset}/train.parquet",
        val="results/data/{dataset}/val.parquet",
        test="results/data/{dataset}/test.parquet",
        rejected="results/data/{dataset}/rejected.parquet",
        rejected_table="results/data/{dataset}/rejected.tsv",
        summary="results/data/{dataset}/summary.json",
    log:
        log="logs/format_conversations/{dataset}.log",
        # A copy of rejected.tsv that Snakemake keeps when the job fails (max_bad_fraction).
        rejected="logs/format_conversations/{dataset}.rejected.tsv",
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
        "python {params.script:q} --config {params.dataset:q} --images {input.images:q} "
        "--outdir {params.outdir:q} --rejects-copy {log.rejected:q} --name {wildcards.dataset:q} "
        "> {log.log:q} 2>&1"


rule token_budget:
    input:
        train="results/data/{dataset}/train.parquet",
        val="results/data/{dataset}/val.parquet",
        test="results/data/{dataset}/test.parquet",
        images="results/data/{dataset}/images.parquet",
        model=model_input_of(budget_cfg),
    output:
        train="results/data/{dataset}/budget/{budget}/train.parquet",
        val="results/data/{dataset}/budget/{budget}/val.parquet",
        test="results/data/{dataset}/budget/{budget}/test.parquet",
        lengths="results/data/{dataset}/budget/{budget}/token_lengths.parquet",
        table="results/data/{dataset}/budget/{budget}/token_lengths.tsv",
        histogram="results/data/{dataset}/budget/{budget}/token_lengths.png",
        rejected="results/data/{dataset}/budget/{budget}/rejected.parquet",
        rejected_table="results/data/{dataset}/budget/{budget}/rejected.tsv",
        summary="results/data/{dataset}/budget/{budget}/summary.json",
    log:
        log="logs/token_budget/{dataset}/{budget}.log",
        rejected="logs/token_budget/{dataset}/{budget}.rejected.tsv",
    benchmark:
        "benchmarks/token_budget/{dataset}/{budget}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    params:
        script=script("token_budget"),
        config=as_json("model", of=budget_cfg),
        max_bad_fraction=lambda wildcards: config["datasets"][wildcards.dataset][
            "max_bad_fraction"
        ],
        datadir=subpath(input.train, parent=True),
        outdir=subpath(output.summary, parent=True),
    shell:
        "python {params.script:q} --config {params.config:q} --data {params.datadir:q} "
        "--images {input.images:q} --outdir {params.outdir:q} "
        "--max-bad-fraction {params.max_bad_fraction:q} --rejects-copy {log.rejected:q} "
        "--threads {threads:q} > {log.log:q} 2>&1"
