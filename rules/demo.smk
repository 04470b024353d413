# Embedded demo inputs, built locally: no downloads.


if DEMO_DIGITS:

    checkpoint demo_digits:
        output:
            data=f"{DEMO_DIGITS}/data.jsonl",
            images=directory(f"{DEMO_DIGITS}/images"),
        log:
            "logs/demo_digits/demo_digits.log",
        benchmark:
            "benchmarks/demo_digits/demo_digits.tsv"
        params:
            folder=DEMO_DIGITS,
            scale=config["demo"]["digits_scale"],
            limit=config["demo"]["digits_limit"] or 0,
        threads: 1
        conda:
            "../envs/vlmflow.yaml"
        shell:
            "python {workflow.basedir}/scripts/make_demo_data.py --out {params.folder} "
            "--scale {params.scale} --limit {params.limit} > {log} 2>&1"


rule build_tiny_model:
    output:
        model=directory(f"{TINY_MODEL_PREFIX}{{family}}"),
    log:
        "logs/build_tiny_model/{family}.log",
    benchmark:
        "benchmarks/build_tiny_model/{family}.tsv"
    params:
        seed=0,
    threads: 1
    conda:
        "../envs/vlmflow.yaml"
    shell:
        "python {workflow.basedir}/scripts/build_tiny_model.py --family {wildcards.family} "
        "--out {output.model} --seed {params.seed} > {log} 2>&1"
