"""Hub-ready folders: their cards' metadata, the folder check, and pushing to a local stand-in for the Hub API."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import get_peft_model

import compress
from compress.export import TAG
from compress.hub import annotate_card, check_folder, push_to_hub
from tests import tiny
from tests.methods import CASES, MERGES, build, perturb_adapters


class _Hub(http.server.BaseHTTPRequestHandler):
    """Just enough of the Hub's API for create_repo, create_branch and upload_folder; records every request."""

    calls: list[tuple[str, str, bytes, str | None]] = []

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append(("POST", self.path, data, self.headers.get("authorization")))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            return self._send(200, {"url": f"{base}/user/model", "name": "user/model", "id": "1"})
        if "/branch/" in self.path:
            return self._send(200, {})
        if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before the commit
            return self._send(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(data)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if "/commit/" in self.path:
            return self._send(200, {"commitUrl": f"{base}/user/model/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._send(404, {"error": "unknown endpoint"})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _Hub.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _Hub.calls
    server.shutdown()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _merged_bert(tmp_path: Path) -> Path:
    model = tiny.make_model("bert")
    report = compress.prune_model(model, sparsity=0.5, structures="ffn", importance="magnitude", mode="global")
    return compress.save_pretrained(model, tmp_path / "pruned", report=report)


# -- cards ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_method_saves_hub_ready_folders(case, tmp_path):
    _, model = build(case)
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    checked = check_folder(tmp_path / "adapter")
    method = compress.export.method_tag(case.method)
    assert checked.kind == "adapter" and checked.metadata["library_name"] == "peft"
    assert {TAG, method} <= set(checked.metadata["tags"]) and checked.metadata.get("base_model") is not None
    if MERGES[case.method]:
        compress.save_pretrained(model.merge_and_unload(), tmp_path / "merged")
        merged = check_folder(tmp_path / "merged")
        assert merged.kind == "model" and merged.metadata["library_name"] == "transformers"
        assert {TAG, method} <= set(merged.metadata["tags"]) and merged.metadata["pipeline_tag"]


def test_pruned_and_sparse_folders_have_parsed_cards(tmp_path):
    pruned = check_folder(_merged_bert(tmp_path))
    assert pruned.metadata["pipeline_tag"] == "text-classification" and "pruning" in pruned.metadata["tags"]
    sparse = get_peft_model(tiny.make_model("bert"), compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5))
    soup = compress.make_soup([sparse.merge_and_unload()])
    compress.save_sparse(soup, tmp_path / "compact")
    checked = check_folder(tmp_path / "compact")
    assert checked.kind == "sparse" and {"sparse-soup", TAG} <= set(checked.metadata["tags"])


def test_annotate_card_records_the_run(tmp_path):
    folder = _merged_bert(tmp_path)
    metadata = annotate_card(folder, base_model="sentence-transformers/all-MiniLM-L6-v2", datasets=["glue"],
                             metrics={"accuracy": 0.8911}, tags=["sst2"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" == metadata["base_model"]
    assert card.data.datasets == ["glue"] and "accuracy" in card.data.metrics and "sst2" in card.data.tags
    assert "| accuracy | 0.8911 |" in card.text


# -- the folder check -------------------------------------------------------------------------------------------
def test_broken_folders_are_refused_before_anything_is_sent(tmp_path, hub):
    endpoint, calls = hub
    folder = _merged_bert(tmp_path)
    (folder / "README.md").write_text("---\nlibrary_name: [unclosed\n---\ntext")
    with pytest.raises(compress.CompressError, match="does not parse"):
        push_to_hub(folder, "user/model", endpoint=endpoint)
    (folder / "README.md").unlink()
    with pytest.raises(compress.CompressError, match="no model card"):
        push_to_hub(folder, "user/model", endpoint=endpoint)
    damaged = _merged_bert(tmp_path / "again")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(compress.CompressError, match="weights do not load"):
        push_to_hub(damaged, "user/model", endpoint=endpoint)
    assert calls == []


# -- pushing ----------------------------------------------------------------------------------------------------
def test_push_uploads_the_folder_as_it_is(tmp_path, hub, monkeypatch):
    endpoint, calls = hub
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    folder = _merged_bert(tmp_path)
    before = _tree_digest(folder)
    url = push_to_hub(folder, "user/model", private=True, revision="pruned", endpoint=endpoint)
    assert url.endswith("a" * 40)
    paths = [path for _, path, _, _ in calls]
    assert paths[0] == "/api/repos/create" and json.loads(calls[0][2])["visibility"] == "private"
    assert any("/branch/pruned" in p for p in paths)
    assert paths[-1] == "/api/models/user/model/commit/pruned"
    committed = [json.loads(line)["value"]["path"] for line in calls[-1][2].splitlines()
                 if json.loads(line)["key"] == "file"]
    assert sorted(committed) == sorted(before)  # every file, nothing else
    assert all(auth == "Bearer hf_from_env" for *_, auth in calls)
    assert _tree_digest(folder) == before


def test_push_without_network_fails_in_one_line_and_changes_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = _merged_bert(tmp_path)
    before = _tree_digest(folder)
    with pytest.raises(compress.CompressError) as error:
        push_to_hub(folder, "user/model", token="hf_x", endpoint="http://127.0.0.1:9")  # nothing listens there
    assert "cannot be reached" in str(error.value) and "\n" not in str(error.value)
    assert _tree_digest(folder) == before


@pytest.mark.slow
def test_push_command(tmp_path):
    folder = _merged_bert(tmp_path)
    help_text = subprocess.run([sys.executable, "-m", "compress", "push", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "REPO_ID" in help_text and "--private" in help_text and "HF_TOKEN" in help_text
    proc = subprocess.run([sys.executable, "-m", "compress", "push", str(folder), "user/model"],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_TOKEN": "hf_x",
                               "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot be reached" in proc.stderr
