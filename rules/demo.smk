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
            "python {params.script:q} --out {params.folder:q} "
            "--scale {params.scale:q} --limit {params.limit:q} > {log:q} 2>&1"


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
        "python {params.script:q} --family {wildcards.family:q} "
        "--out {output.model:q} --seed {params.seed:q} > {log:q} 2>&1"
