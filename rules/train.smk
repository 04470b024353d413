# Training: LoRA/QLoRA on the train split; checkpoints live in a work folder outside the
# outputs, so that a re-run after a crash resumes instead of starting over.


rule train:
    input:
        train=run_file("{budget}/train.parquet"),
        model=model_input,
    output:
        adapter=directory("results/runs/{run}/adapter"),
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    conda:
        "../envs/vlmflow.yaml"
    threads: threads_of("train")
    resources:
        **gpu_resources("train", time_limit_signal=True),
    params:
        script=script("train"),
        config=as_json("model", "lora", "train"),
        work_dir="results/runs/{run}/work/train",
        launch=train_launcher,
    # `exec`: SLURM's SIGTERM (time limit, preemption) reaches the training process itself,
    # which checkpoints and exits 75; the retried job resumes. --stop-with-parent: the same
    # when Snakemake (its parent) is killed, so that no orphan trains on beside the next run.
    shell:
        "exec {params.launch} {params.script:q} --config {params.config:q} "
        "--train {input.train:q} --out {output.adapter:q} --work-dir {params.work_dir:q} "
        "--threads {threads:q} --stop-with-parent > {log:q} 2>&1"
