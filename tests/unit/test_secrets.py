"""Planted secrets (git remote, uncommitted diff, image URL, environment, pip freeze) reach
no output: archive members, images.parquet, rejected rows, logs."""

import base64
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading

import pandas as pd
import pytest
from helpers import download_policy, image_policy
from PIL import Image

from vlmflow import archive as archive_module
from vlmflow.archive import build_archive
from vlmflow.data import _rejected
from vlmflow.image_refs import ImageRef
from vlmflow.image_validation import validate_refs
from vlmflow.redact import redact_url

GH_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 2
HF_TOKEN = "hf_" + "QwErTyUiOpAsDfGhJkLz" * 2
AWS_KEY = "AKIA" + "QWERTYUIOPASDFGH"
URL_PASSWORD = "url-pass-7731"
URL_TOKEN = "url-token-99c1"
ENV_SECRET = "env-only-secret-5512"
SECRETS = [GH_TOKEN, HF_TOKEN, AWS_KEY, URL_PASSWORD, URL_TOKEN, ENV_SECRET]

_buf = io.BytesIO()
Image.new("RGB", (6, 5), (1, 2, 3)).save(_buf, "PNG")
PNG = _buf.getvalue()


AUTH: list = []


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        AUTH.append(self.headers.get("Authorization"))
        ok = self.path.startswith("/ok.png")
        body = PNG if ok else b"no"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "image/png" if ok else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def assert_clean(where: str, text: str):
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} leaks {leaked}"


def test_redact_url_strips_userinfo_and_token_parameters():
    assert redact_url(f"https://me:{GH_TOKEN}@github.com/o/r.git") == "https://github.com/o/r.git"
    got = redact_url(f"https://h/a.png?w=2&token={URL_TOKEN}&X-Amz-Signature=abc")
    assert got == "https://h/a.png?w=2&token=REDACTED&X-Amz-Signature=REDACTED"
    assert redact_url("https://h/a.png?w=2") == "https://h/a.png?w=2"


def test_no_planted_secret_reaches_any_output(tmp_path, server, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_SERVICE_TOKEN", ENV_SECRET)
    # A checkout cloned with a token in its remote, with an uncommitted token in a file.
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "remote", "add", "origin", f"https://me:{GH_TOKEN}@github.com/lab/vlmflow.git")
    (repo / "train.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (repo / "train.py").write_text(f'x = 1\nHF_TOKEN = "{HF_TOKEN}"\nAWS = "{AWS_KEY}"\n')
    # pip freeze of an editable install from that remote.
    monkeypatch.setattr(
        archive_module,
        "pip_freeze",
        lambda: f"-e git+https://me:{GH_TOKEN}@github.com/lab/vlmflow.git@abc#egg=vlmflow\n",
    )

    # An image URL with credentials: its images.parquet row and a rejected row.
    url = f"http://me:{URL_PASSWORD}@{server}/ok.png?token={URL_TOKEN}&w=1"
    bad_url = f"http://me:{URL_PASSWORD}@{server}/gone.png?token={URL_TOKEN}"
    policy = download_policy(timeout=2, retries=0, allow_private_addresses=True)
    recs = validate_refs(
        [ImageRef("url", "", url), ImageRef("url", "", bad_url)],
        image_policy(),
        cache_dir=tmp_path / "cache",
        download=policy,
        progress=False,
    )
    assert recs[0]["ok"] and not recs[1]["ok"], recs
    # user:password@ went to the server as basic authentication, not as part of the host.
    assert AUTH[0] == "Basic " + base64.b64encode(f"me:{URL_PASSWORD}".encode()).decode()
    assert recs[0]["path"] == f"http://{server}/ok.png?token=REDACTED&w=1"
    assert ImageRef("url", "", url).key == ("url", "", recs[0]["path"])  # the join still works
    pd.DataFrame(recs).to_parquet("images.parquet")
    rejected = _rejected("d.jsonl", 2, None, f"bad_image: '{bad_url}': 404", {"image": bad_url})

    # A step's log that printed the URL and the environment secret.
    (tmp_path / "logs/train").mkdir(parents=True)
    (tmp_path / "logs/train/run.log").write_text(f"GET {url}\nusing {ENV_SECRET}\n")
    # What a step logs, and the traceback of an uncaught error naming the URL.
    script = (
        "import logging, sys\n"
        "from vlmflow.cli import setup_logging\n"
        "setup_logging()\n"
        f"logging.getLogger('vlmflow.x').warning('fetching %s', {url!r})\n"
        f"raise RuntimeError('failed: ' + {url!r} + ' ' + {ENV_SECRET!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "fetching http://127.0.0.1" in res.stderr and "RuntimeError: failed" in res.stderr
    assert_clean("log", res.stderr)

    (tmp_path / "base").mkdir()
    (tmp_path / "base/config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text("{}")
    for name in ("summary.json", "metrics.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "predictions.parquet").write_bytes(b"PAR1")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": url}) + "\n")
    config = {
        "run": {"name": "run", "dataset": "d"},
        "model": {"name": "base", "revision": "main"},
        "train": {"seed": 1},
        "lora": {"random_state": 1},
        "datasets": {"d": {"split": {"seed": 1}, "sources": [{"path": "d.jsonl"}]}},
        "eval": {"seed": 1},
        "export": {"save_method": "lora"},
    }
    build_archive(
        "archive.tar.gz",
        config=config,
        images_parquet="images.parquet",
        data_files=["d.jsonl"],
        summary="summary.json",
        adapter="adapter",
        metrics="metrics.json",
        predictions="predictions.parquet",
        repo=repo,
        log_dirs=["logs"],
    )
    with tarfile.open("archive.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    for must in (
        "run/env/git.json",
        "run/env/git.diff",
        "run/REPRODUCE.md",
        "run/logs/train/run.log",
    ):
        assert must in members, must
    for name, data in members.items():
        assert_clean(name, data.decode("utf-8", "replace"))
    assert "https://github.com/lab/vlmflow.git" in members["run/REPRODUCE.md"].decode()
    diff = members["run/env/git.diff"].decode()
    assert "<redacted:huggingface_token>" in diff and "<redacted:aws_access_key>" in diff
    assert_clean("images.parquet", json.dumps(pd.read_parquet("images.parquet").to_dict("records")))
    assert_clean("rejected row", json.dumps(rejected))
    warned = [m for m in caplog.messages if "credentials redacted before archiving" in m]
    assert any(m.startswith("run/env/git.diff") for m in warned)
    assert_clean("warnings", "\n".join(caplog.messages))
