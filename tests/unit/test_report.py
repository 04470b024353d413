import json

import pandas as pd
from PIL import Image

from vlmflow.report import gallery_page, metrics_page, reason_label


def test_reason_label():
    assert (
        reason_label("bad_image: 'x.png': decode_error: cannot identify")
        == "bad_image: decode_error"
    )
    assert reason_label("too_long: 900 tokens > 512") == "too_long"


def test_gallery_and_metrics_pages(tmp_path):
    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    preds = pd.DataFrame(
        {
            "id": ["s1", "s2"],
            "image": [str(tmp_path / "a.png"), str(tmp_path / "missing.png")],
            "question": ["Which digit <b>?", "Which digit?"],
            "reference": ["7", "1"],
            "base_answer": ["3", ""],
            "tuned_answer": ["7", "1"],
            "base_cer": [1.0, 1.0],
            "tuned_cer": [0.0, 0.0],
        }
    )
    preds.to_parquet(tmp_path / "p.parquet")
    metrics = {
        "n": 2,
        "metrics": ["cer"],
        "base": {"cer": 1.0},
        "tuned": {"cer": 0.0},
        "delta": {"cer": -1.0},
        "higher_is_better": {"cer": False},
        "generation": {"base": {"generated_tokens": 4, "seconds": 1, "tokens_per_s": 4}},
        "settings": {"batch_size": 8},
    }
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    assert gallery_page(tmp_path / "p.parquet", tmp_path / "m.json", tmp_path / "g.html") == 2
    page = (tmp_path / "g.html").read_text()
    assert page.count("<div class='card'>") == 2 and page.count("data:image/png;base64,") == 1
    assert "&lt;b&gt;" in page and "<i>(empty)</i>" in page  # escaped, and empty shown
    assert page.count("class='ok'") == 2 and page.count("class='bad'") == 2  # cer 0 is right
    metrics_page(tmp_path / "m.json", tmp_path / "m.html", tmp_path / "m.png")
    html = (tmp_path / "m.html").read_text()
    assert "cer (lower is better)" in html and "class='better'" in html
    assert Image.open(tmp_path / "m.png").size[0] > 200
