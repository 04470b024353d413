"""fetch_model against a Hugging Face Hub stand-in on 127.0.0.1 (serving the tiny model as
`vlmflow-test/tiny-qwen`): only what from_pretrained needs lands in the cache (no pickles), the
marker names the snapshot, and the model then loads by its hub id with HF_HUB_OFFLINE=1."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from vlmflow.hub import is_hub_id, marker_path

ROOT = Path(__file__).resolve().parents[2]
REPO = "vlmflow-test/tiny-qwen"
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_hub_ids_and_marker_paths(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct")
    assert not is_hub_id("resources/models/tiny-qwen2_5_vl")
    assert not is_hub_id("/abs/model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_hub_id("org/local")  # an existing folder is a local model
    assert marker_path("Qwen/Qwen2.5-VL-7B-Instruct", None) == (
        "resources/hub/Qwen/Qwen2.5-VL-7B-Instruct/default.json"
    )
    assert marker_path("a/b", "refs/pr/3") == "resources/hub/a/b/refs_pr_3.json"


@pytest.fixture
def fake_hub(tiny_qwen):
    files = {
        str(p.relative_to(tiny_qwen)): p.read_bytes()
        for p in Path(tiny_qwen).rglob("*")
        if p.is_file()
    }
    files["pytorch_model.bin"] = b"a pickle that must never be downloaded"
    files["README.md"] = b"# tiny"
    requests = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, body: bytes, ctype="application/json", extra=None, head=False):
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head=False):
            path = unquote(urlparse(self.path).path)
            requests.append((self.command, path))
            api = f"/api/models/{REPO}/"
            if path.startswith(api + "revision/"):
                body = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                return self._send(json.dumps(body).encode(), head=head)
            if path.startswith(api + "tree/"):
                tree = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._send(json.dumps(tree).encode(), head=head)
            prefix = f"/{REPO}/resolve/"
            if path.startswith(prefix):
                rev, _, name = path[len(prefix) :].partition("/")
                if name in files:
                    b = files[name]
                    headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(b).hexdigest()}"'}
                    return self._send(b, "application/octet-stream", headers, head=head)
            # what the real Hub answers for an unknown (or private) repo
            self.send_response(401 if path.startswith("/api/") else 404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            self._route()

        def do_HEAD(self):
            self._route(head=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()


def online_env(endpoint: str, tmp_path) -> dict:
    """The environment of a fetch_model run against the fake hub, with a cache of its own."""
    return dict(
        os.environ,
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        PYTHONPATH=str(ROOT / "src"),
    )


def test_fetch_model_cli_then_offline_load(fake_hub, tmp_path):
    endpoint, requests = fake_hub
    env = online_env(endpoint, tmp_path)
    marker = tmp_path / "resources/hub" / REPO / "default.json"
    cfg = json.dumps({"model": {"name": REPO, "revision": None, "trust_remote_code": False}})
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/fetch_model.py"),
            "--config",
            cfg,
            "--out",
            str(marker),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(marker.read_text())
    assert info["repo_id"] == REPO and info["commit"] == SHA
    assert "config.json" in info["files"] and "model.safetensors" in info["files"]
    assert "pytorch_model.bin" not in info["files"]
    assert "README.md" in info["files"]  # the base's card: publish copies its license
    assert not any(p.endswith("pytorch_model.bin") for _, p in requests)  # never requested
    assert Path(info["snapshot"]).is_relative_to(tmp_path / "hf")

    # a compute node: no network, the same cache; the model is found by its hub id
    offline = dict(env, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    code = (
        "from vlmflow.modeling import load_model, load_processor\n"
        "from vlmflow.config import resolve_sections\n"
        f"m = resolve_sections({{'model': {{'name': '{REPO}'}}}}, ['model'])['model']\n"
        "load_processor(m); model, fam = load_model(m); print('loaded', fam.name)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded qwen2_5_vl" in res.stdout


def test_fetch_reports_a_missing_model_clearly(fake_hub, tmp_path):
    env = online_env(fake_hub[0], tmp_path)
    cfg = json.dumps({"model": {"name": "nobody/nothing"}})
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts/fetch_model.py"), "--config", cfg, "--out", "x.json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode != 0
    assert "model.name 'nobody/nothing' is not a model on the Hub" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


def _model_folder(path, files):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("{}")
    return path


def test_local_paths_are_never_hub_ids(tmp_path, monkeypatch):
    from vlmflow.hub import ModelSourceError, check_model_source, model_location

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./models/foo", "/abs/missing", "models/foo", "../x/y", "a/b/c", "~/m"):
        assert model_location(name) == "local" and not is_hub_id(name), name
        with pytest.raises(ModelSourceError, match="is a local path") as e:
            check_model_source({"name": name})
        assert "no such folder" in str(e.value)
    assert model_location("Qwen/Qwen2.5-VL-7B-Instruct") == "hub"
    assert check_model_source({"name": "Qwen/Qwen2.5-VL-7B-Instruct"}) == "hub"
    # a tiny model that a rule builds is checked once it exists
    assert check_model_source({"name": "models/tiny-x"}, built_by_rule="models/tiny-") == "local"


def test_fetch_refuses_a_local_path_before_any_network(tmp_path, monkeypatch):
    import huggingface_hub

    from vlmflow.hub import HubError, fetch

    def no_network(*a, **k):
        raise AssertionError("snapshot_download called for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_that_must_not_travel")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(HubError, match="is a local path"):
        fetch("models/foo")


def test_unusable_model_folders_are_refused_with_the_reason(tmp_path, tiny_qwen):
    from vlmflow.hub import ModelSourceError, check_model_source

    ok = check_model_source({"name": str(tiny_qwen)})
    assert ok == "local"
    weights = ["config.json", "model.safetensors"]
    tok = ["tokenizer.json", "tokenizer_config.json"]
    cases = {
        "no-config": (["model.safetensors", *tok, "processor_config.json"], "no config.json"),
        "no-tokenizer": (
            [*weights, "processor_config.json"],
            "has no tokenizer (one of tokenizer.json",
        ),
        "no-processor": ([*weights, *tok], "has no image processor (processor_config.json"),
        "pickle-only": (
            ["config.json", "pytorch_model.bin", *tok, "preprocessor_config.json"],
            "only pickle weights (pytorch_model.bin)",
        ),
        "no-weights": (["config.json", *tok, "processor_config.json"], "no weights"),
    }
    for name, (files, message) in cases.items():
        folder = _model_folder(tmp_path / name, files)
        with pytest.raises(ModelSourceError) as e:
            check_model_source({"name": str(folder)})
        assert message in str(e.value) and str(folder) in str(e.value), name


def test_clis_that_load_a_model_say_a_local_folder_is_missing(tmp_path):
    cfg = json.dumps({"model": {"name": str(tmp_path / "nope")}})
    for script, extra in (
        ("token_budget.py", ["--data", str(tmp_path), "--outdir", str(tmp_path / "o")]),
        ("merge.py", ["--adapter", str(tmp_path), "--out", str(tmp_path / "m")]),
    ):
        res = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script), "--config", cfg, *extra],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert res.returncode == 1, res.stderr[-2000:]
        assert f"model.name '{tmp_path / 'nope'}' is a local path (no such folder" in res.stderr
