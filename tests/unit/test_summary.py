"""The end-of-run summary and the report landing page's fragment, from a run's files."""

import json

from vlmflow.summary import format_summary, run_summary, summary_html

BUDGET = "results/data/d/budget/m-1/summary.json"


def write_run(root):
    data = root / "results/data/d"
    data.mkdir(parents=True)
    (data / "summary.json").write_text(
        json.dumps(
            {
                "accepted": 97,
                "rejected": 3,
                "splits": {"test": 10, "train": 80, "val": 7},
                "rejected_by_reason": {"bad_image": 2, "missing_field": 1},
            }
        )
    )
    (data / "budget/m-1").mkdir(parents=True)  # the token budget, shared by runs
    (data / "budget/m-1/summary.json").write_text(
        json.dumps({"dropped": 1, "rows_in": 97, "max_seq_length": 256})
    )
    run = root / "results/runs/r"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/train_log.jsonl").write_text(
        "\n".join(json.dumps({"step": i, "loss": 2.0 / i}) for i in range(1, 5)) + "\n"
    )
    (run / "eval").mkdir()
    (run / "eval/metrics.json").write_text(
        json.dumps(
            {
                "n": 10,
                "metrics": ["exact_match", "cer"],
                "base": {"exact_match": 0.1, "cer": 0.9},
                "tuned": {"exact_match": 0.8, "cer": 0.125},
                "higher_is_better": {"exact_match": True, "cer": False},
            }
        )
    )
    (run / "archive.tar.gz").write_bytes(b"x")
    return run


def test_the_terminal_summary_says_what_the_run_did(tmp_path):
    write_run(tmp_path)
    s = run_summary("r", "d", root=tmp_path, merged=True, configfiles=["my.yaml"], budget=BUDGET)
    text = format_summary(s)
    assert text.splitlines() == [
        "vlmflow run 'r' (dataset 'd'):",
        "  data      97 rows accepted, 3 rejected (bad_image 2, missing_field 1; "
        "results/data/d/rejected.tsv); train 80 / val 7 / test 10",
        "  tokens    1 of 97 samples over max_seq_length 256 dropped",
        "  training  4 steps, final loss 0.5",
        "  metrics   exact_match 0.1 -> 0.8; cer 0.9 -> 0.125 (lower is better) (10 test samples)",
        "  adapter   results/runs/r/adapter",
        "  archive   results/runs/r/archive.tar.gz",
        "  report    not built yet (snakemake --report report.html --configfile my.yaml)",
    ]
    # A stage that has not run is left out; no merged folder, none listed.
    assert "merged" not in text


def test_the_landing_fragment_has_the_metrics_table_and_the_curves(tmp_path):
    write_run(tmp_path)
    png = tmp_path / "training.png"
    png.write_bytes(b"\x89PNG fake")
    html = summary_html(run_summary("r", "d", root=tmp_path, budget=BUDGET), png)
    assert "<table" in html and "cer (lower is better)" in html and "<b>0.125</b>" in html
    assert "src='data:image/png;base64,iVBORyBmYWtl'" in html
    assert "<li><b>training</b> 4 steps, final loss 0.5</li>" in html
