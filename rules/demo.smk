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
        conda:
            "../envs/vlmflow.yaml"
        threads: 1
        resources:
            **cpu_resources(),
        params:
            script=script("make_demo_data"),
            folder=subpath(output.data, parent=True),
            scale=config["demo"]["digits_scale"],
            limit=config["demo"]["digits_limit"] or 0,
        shell:
            "python {params.script} --out {params.folder} "
            "--scale {params.scale} --limit {params.limit} > {log} 2>&1"


rule build_tiny_model:
    output:
        model=directory(f"{TINY_MODEL_PREFIX}{{family}}"),
    log:
        "logs/build_tiny_model/{family}.log",
    benchmark:
        "benchmarks/build_tiny_model/{family}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    resources:
        **cpu_resources(),
    params:
        script=script("build_tiny_model"),
        seed=0,
    shell:
        "python {params.script} --family {wildcards.family} "
        "--out {output.model} --seed {params.seed} > {log} 2>&1"
