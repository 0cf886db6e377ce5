"""The command line in subprocesses, with a tiny model saved to disk: JSON output, errors, kill -9."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storage import tensors


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def app(*args, check=True):
    run = subprocess.run([sys.executable, "app.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def test_ingest_list_ask_delete_with_json(tmp_path, model_dir):
    book = tmp_path / "notes.txt"
    book.write_text("The key to the shed is under the blue pot. " * 80)
    data = tmp_path / "data"
    line = json.loads(app("ingest", book, "--json", "--data-dir", data, "--model", model_dir).stdout)
    assert line["status"] == "ready" and line["tokens"] > 3000
    listed = json.loads(app("--data-dir", data, "list", "--json").stdout)
    assert listed == [{"id": line["id"], "title": "notes", "status": "ready", "pages": 1,
                       "tokens": line["tokens"], "bytes": listed[0]["bytes"]}] and listed[0]["bytes"] > 0
    asked = json.loads(app("--model", model_dir, "ask", "notes", "Where is the key?", "--json",
                           "--max-new-tokens", "5", "--data-dir", data).stdout)
    assert set(asked["timings"]) >= {"memory_load_s", "prefill_s", "first_token_s", "decode_tokens_per_s"}
    # One page, so every piece of evidence is on it, and the answer cites it inline.
    assert asked["evidence"] and {e["pages"] for e in asked["evidence"]} == {asked["evidence"][0]["pages"]}
    assert asked["citation"] and asked["answer"].endswith(asked["citation"])
    # A question across the library: every passage names its document, the citation the document's title.
    other = tmp_path / "pets.txt"
    other.write_text("The cat sleeps on the red chair by the window. " * 80)
    second = json.loads(app("ingest", other, "--json", "--data-dir", data, "--model", model_dir).stdout)["id"]
    across = json.loads(app("--model", model_dir, "ask", "all", "Where is the key to the shed?", "--json",
                            "--max-new-tokens", "4", "--data-dir", data).stdout)
    assert across["documents"] == "all" and across["evidence"]
    assert {e["document"] for e in across["evidence"]} <= {line["id"], second}
    title = {line["id"]: "notes", second: "pets"}[across["evidence"][0]["document"]]
    assert across["citation"].startswith(f"({title}, ") and across["answer"].endswith(across["citation"])
    assert app("--data-dir", data, "delete", str(second)).returncode == 0
    assert app("--data-dir", data, "delete", str(line["id"])).returncode == 0
    assert json.loads(app("--data-dir", data, "list", "--json").stdout) == []


def test_errors_exit_non_zero_with_the_message_on_stderr(tmp_path, model_dir):
    missing = app("--data-dir", tmp_path, "ask", "nothing", "q", check=False)
    assert missing.returncode == 2 and "no document 'nothing'" in missing.stderr
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"not a pdf at all")
    out = app("ingest", bad, "--json", "--data-dir", tmp_path, "--model", model_dir, check=False)
    assert out.returncode == 2 and json.loads(out.stdout)["status"] == "error" and "readable PDF" in out.stderr
    wrong = app("ingest", bad, "--data-dir", tmp_path, "--model", tmp_path / "no-model", check=False)
    assert wrong.returncode == 2 and "does not exist" in wrong.stderr


def read_memory(data: Path):
    folder = next((data / "memory").iterdir())
    state, _ = tensors.read(next(folder.glob("state-*.safetensors")))
    return state, {p.name: p.read_bytes() for p in folder.glob("*.raw")}


def test_an_ingest_killed_mid_document_resumes_to_the_same_memory(tmp_path, model_dir):
    book = tmp_path / "long.txt"
    book.write_text("".join(f"Line {i}: the quick brown fox number {i} jumps. " for i in range(900)))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cmd = [sys.executable, "app.py", "ingest", str(book), "--json", "--data-dir", str(killed), "--model", str(model_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db, deadline, progress = killed / "library.db", time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db) as conn:
                    row = conn.execute("SELECT read_tokens, tokens FROM documents").fetchone()
            except sqlite3.OperationalError:     # created, not yet migrated
                row = None
            if row and 0 < row[0] < row[1]:
                progress = row[0]
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert progress > 0, "the ingest finished before it could be killed"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM documents").fetchone()[0] == "reading"   # never shown as ready
    resumed = json.loads(app(*cmd[2:]).stdout)
    assert resumed["status"] == "ready" and resumed["resumed_from"] >= progress
    app("ingest", book, "--data-dir", whole, "--model", model_dir)
    state_a, raw_a = read_memory(killed)
    state_b, raw_b = read_memory(whole)
    assert raw_a.keys() == raw_b.keys() == {"k.int8.raw", "k_scale.bfloat16.raw", "v.int8.raw", "v_scale.bfloat16.raw",
                                            "reprs.float16.raw"}
    for name in raw_a:                  # every commit restores what it saved, so a resume is exact
        assert raw_a[name] == raw_b[name], name
    for name in state_b:
        assert torch.equal(state_a[name], state_b[name]), name


def test_serve_is_the_default_and_binds_to_this_machine_only():
    sys.path.insert(0, str(ROOT))
    import app as cli

    args = cli.parse_args([])
    assert (args.command, args.host, args.port) == ("serve", "127.0.0.1", 7860)
    assert cli.parse_args(["--port", "8000", "list"]).port == 8000


def test_serve_refuses_a_malformed_auth_before_loading_anything(tmp_path):
    run = app("--data-dir", tmp_path, "serve", "--auth", "no-colon", check=False)
    assert run.returncode == 2 and "--auth takes USER:PASSWORD" in run.stderr


def test_bad_flags_are_usage_errors_and_a_newer_library_is_refused_in_words(tmp_path):
    port = app("--data-dir", tmp_path, "serve", "--port", "70000", check=False)
    assert port.returncode == 2 and "usage:" in port.stderr and "--port must be between 1 and 65535" in port.stderr
    assert "Traceback" not in port.stderr and "LibraryError" not in port.stderr
    device = app("--data-dir", tmp_path, "list", "--device", "tpu", check=False)
    assert device.returncode == 2 and "--device must be cpu, cuda or cuda:N" in device.stderr
    if not torch.cuda.is_available():
        cuda = app("--data-dir", tmp_path, "list", "--device", "cuda", check=False)
        assert cuda.returncode == 2 and "this machine has no such device" in cuda.stderr
    dtype = app("--data-dir", tmp_path, "list", "--dtype", "int4", check=False)
    assert dtype.returncode == 2 and "invalid choice: 'int4'" in dtype.stderr
    data = tmp_path / "newer"
    data.mkdir()
    db = sqlite3.connect(data / "library.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    newer = app("--data-dir", data, "list", check=False)
    assert newer.returncode == 2 and "Traceback" not in newer.stderr
    assert "written by a newer version of this app" in newer.stderr


def test_an_error_names_the_file_once(tmp_path, model_dir):
    empty = tmp_path / "x.pdf"
    empty.write_bytes(b"")
    out = app("ingest", empty, "--data-dir", tmp_path / "data", "--model", model_dir, check=False)
    assert out.returncode == 2 and out.stderr.count("x.pdf") == 1, out.stderr


def test_ask_uses_the_mode_and_window_the_document_was_read_with(tmp_path, model_dir):
    book = tmp_path / "notes.txt"
    book.write_text("The key to the shed is under the blue pot. " * 80)
    data = tmp_path / "data"
    app("ingest", book, "--json", "--data-dir", data, "--model", model_dir, "--method", "streaming", "--n-local", "1024")
    asked = app("--model", model_dir, "ask", "notes", "Where is the key?", "--json", "--max-new-tokens", "3",
                "--data-dir", data)                  # no --method, no --n-local: the stored ones apply
    assert json.loads(asked.stdout)["answer"]


def test_ask_json_carries_the_quote_with_its_page_document_and_characters(tmp_path, model_dir):
    book = tmp_path / "notes.txt"
    book.write_text(" ".join(f"Crate {i} of rope was loaded on day {i % 30}." for i in range(200))
                    + " The key to the shed is under the blue pot.")
    data = tmp_path / "data"
    doc = json.loads(app("ingest", book, "--json", "--data-dir", data, "--model", model_dir).stdout)["id"]
    asked = json.loads(app("--model", model_dir, "ask", "notes", "Where is the key to the shed?", "--json",
                           "--max-tokens", "3", "--data-dir", data).stdout)
    quote = asked["quote"]
    assert {"text", "page", "physical", "chars", "document", "title"} <= quote.keys()
    assert quote["document"] == doc and quote["title"] == "notes" and quote["page"] == "text"
    a, b = quote["chars"]
    assert " ".join(book.read_text()[a:b].split()) == quote["text"]
    assert asked["citation"] == "(see text)" and asked["answer"].endswith("(see text)")
    refused = app("--model", model_dir, "ask", "notes", "Where?", "--max-tokens", "0", "--data-dir", data, check=False)
    assert refused.returncode == 2 and "--max-tokens must be at least 1" in refused.stderr


def test_what_is_asked_is_all_or_ids_or_one_document_and_one_named_twice_is_that_one(tmp_path):
    from reading.asked import Asked, parse
    from storage.library import Library, LibraryError

    library = Library(tmp_path)
    a, b = (library.add(title=t, source_name=f"{t}.txt", kind="txt", sha256=t, fingerprint="m", config_hash="c",
                        config={}, tokens=1, pages=[], memory_format=2) for t in ("notes", "pets"))
    assert parse("all", library) == parse(" ALL ", library) == Asked(None) and parse("all", library).scope == "all"
    assert parse(f"{b},{a}", library) == parse([b, a], library) == Asked((a, b)) and Asked((a, b)).scope == f"{a},{b}"
    assert parse("pets", library) == parse(b, library) == parse(f"{b},{b}", library) == parse([b], library) == Asked((b,))
    assert Asked((b,)).one and Asked((b,)).scope == b and not Asked(None).one
    with pytest.raises(LibraryError, match="no document 99"):
        parse(f"{a},99", library)
