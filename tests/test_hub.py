"""Hub-ready folders: their cards' metadata, the folder check, and pushing to a local stand-in for the Hub API."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import compress
from compress.cli import main
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


def _saved_adapter(case_index: int, folder: Path) -> Path:
    _, model = build(CASES[case_index])
    perturb_adapters(model)
    model.save_pretrained(folder)
    return folder


def _rewrite_weights(folder: Path, name: str, change) -> None:
    """Replace the tensors of ``folder``'s weights file ``name`` by ``change(tensors)``."""
    tensors = load_file(folder / name)
    save_file(change(tensors), folder / name, metadata={"format": "pt"})


#: tensors a method adds (not the modules_to_save copies, which only the base model can check)
_ADAPTER_TENSOR = re.compile(r"\.(pa_|sparse_|lora_)|exit_heads|lst_network")


def _assert_reshaped_tensors_are_refused(folder: Path, broken: Path) -> None:
    """The folder check compares each tensor a method adds with what the adapter config gives it (no base model)."""
    keys = sorted(k for k in load_file(folder / "adapter_model.safetensors") if _ADAPTER_TENSOR.search(k))
    for key in {keys[0], keys[len(keys) // 2], keys[-1]}:  # one more row and column: what no config gives
        shutil.copytree(folder, broken, dirs_exist_ok=True)
        _rewrite_weights(broken, "adapter_model.safetensors",
                         lambda t, key=key: {**t, key: torch.zeros([n + 1 for n in t[key].shape])})
        with pytest.raises(compress.CompressError, match="adapter_model.safetensors does not match "
                                                         "adapter_config.json"):
            check_folder(broken)


# -- cards ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_method_saves_hub_ready_folders(case, tmp_path):
    _, model = build(case)
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    checked = check_folder(tmp_path / "adapter")
    _assert_reshaped_tensors_are_refused(tmp_path / "adapter", tmp_path / "broken")
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


def test_the_check_refuses_an_edited_pruning_plan(tmp_path):
    folder = _saved_adapter(0, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    event = config["pruning_plan"][0]
    unit, removed = next((k, v) for k, v in event["removed"].items() if k.endswith("ffn"))
    removed[0] = next(i for i in range(event["widths_before"]["ffn"][0]) if i not in removed)  # still a valid plan
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(compress.CompressError, match=r"pruning_plan\[0\] differs from the copy saved with the "
                                                     rf"adapter weights .* 'removed'\['{unit}'\]"):
        check_folder(folder)


def test_the_check_refuses_sparse_soup_masks_that_differ_from_their_checksums(tmp_path):
    """The same count of kept weights, so every shape still fits: only the checksums saved with the masks notice."""
    from tests.test_sparse_soup_checks import edit_masks, saved_adapter, swap_one_kept_and_one_removed

    folder = saved_adapter(tmp_path)
    assert check_folder(folder).kind == "adapter"
    edit_masks(folder, swap_one_kept_and_one_removed)
    with pytest.raises(compress.CompressError, match=r"mask of bert\.encoder\.layer\.0\.attention\.self\.query .* "
                                                     "differs from the checksum"):
        check_folder(folder)


def test_the_check_refuses_a_model_folder_missing_weights(tmp_path):
    """transformers would initialise a missing weight at random and load without an error."""
    folder = _merged_bert(tmp_path)
    dropped = "bert.encoder.layer.1.output.dense.weight"
    _rewrite_weights(folder, "model.safetensors", lambda tensors: {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(compress.CompressError, match=r"1 weights of BertForSequenceClassification are missing \(e\.g\. "
                                                     r"bert\.encoder\.layer\.1\.output\.dense\.weight\)"):
        check_folder(folder)


def test_the_check_validates_a_merged_multi_exit_config(tmp_path):
    # the config class's own validation on load (plugins/multi_exit) refuses an exit policy it does not know
    _, model = build(next(c for c in CASES if c.method == "MULTI_EXIT"))
    folder = compress.save_pretrained(model.merge_and_unload(), tmp_path / "merged")
    assert check_folder(folder).kind == "model"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "exit_policy": "bogus"}))
    with pytest.raises(compress.CompressError, match="exit_policy"):
        check_folder(folder)


def test_links_out_of_the_folder_are_refused_by_name(tmp_path, hub):
    endpoint, calls = hub
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    folder = _merged_bert(tmp_path)
    (folder / "card-copy.md").symlink_to(folder / "README.md")  # inside the folder: uploaded as a copy, fine
    assert check_folder(folder).kind == "model"
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(compress.CompressError) as error:
        push_to_hub(folder, "user/model", endpoint=endpoint)
    assert f"{folder / 'notes.txt'} is a symbolic link to {secret}, outside" in str(error.value)
    (folder / "notes.txt").unlink()
    (folder / "extra").symlink_to(tmp_path, target_is_directory=True)  # a linked folder, too
    with pytest.raises(compress.CompressError, match="extra is a symbolic link"):
        push_to_hub(folder, "user/model", endpoint=endpoint)
    (folder / "extra").unlink()
    (folder / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(compress.CompressError, match="dangling.txt is a symbolic link to .*gone.txt, which does not"):
        push_to_hub(folder, "user/model", endpoint=endpoint)
    assert calls == []


def _linked_folder(tmp_path: Path) -> tuple[Path, Path]:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    folder = _merged_bert(tmp_path)
    (folder / "notes.txt").symlink_to(secret)
    return folder, secret


def test_push_command_refuses_a_link_out_of_the_folder(tmp_path, capsys):
    folder, secret = _linked_folder(tmp_path)
    capsys.readouterr()
    assert main(["push", str(folder), "user/model", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compress: error:")
    assert str(folder / "notes.txt") in err and str(secret) in err


@pytest.mark.slow
def test_push_command_refuses_a_link_out_of_the_folder_through_the_entry_point(tmp_path):
    folder, secret = _linked_folder(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "compress", "push", str(folder), "user/model"],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_TOKEN": "hf_x",
                               "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and str(folder / "notes.txt") in proc.stderr and str(secret) in proc.stderr


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
