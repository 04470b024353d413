# The run's fully resolved config (defaults filled in), next to its outputs: each rule's params
# are sections of this same config, so it records exactly what every step ran with.


rule resolved_config:
    output:
        config="results/runs/{run}/config.yaml",
    log:
        "logs/resolved_config/{run}.log",
    benchmark:
        "benchmarks/resolved_config/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: 1
    resources:
        **cpu_resources(),
    params:
        script=script("write_config"),
        config=run_config_json,
    shell:
        "python {params.script:q} --config {params.config:q} --out {output.config:q} > {log:q} 2>&1"
