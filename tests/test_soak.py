"""bench.soak's short run: two readers ask a served tiny model through the page's API for a minute while a
dropped file is read; what they were answered is in the library, and the server's memory was sampled."""
import json
from contextlib import closing
from itertools import groupby
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")
ROOT = Path(__file__).resolve().parents[1]

# The tiny tokenizer takes a token a byte: about 2,300 tokens to ask about, and 900 dropped.
BOOK = "\f".join(f"Page {p}. " + " ".join(f"The harbour keeps boat {p}-{i} by the old pier." for i in range(10))
                 for p in range(1, 6))
DROP = " ".join(f"The lighthouse keeper number {i} painted the tower red." for i in range(16))


def test_two_readers_for_a_minute_are_all_answered_and_stored_while_a_dropped_file_is_read(tmp_path, tiny_model_dir):
    from bench import soak, soak_table

    (tmp_path / "harbour.txt").write_text(BOOK)
    (tmp_path / "lighthouse.txt").write_text(DROP)
    data, out = tmp_path / "data", tmp_path / "soak.json"
    result = soak.main(["--readers", "2", "--seconds", "60", "--book", str(tmp_path / "harbour.txt"),
                        "--drop", str(tmp_path / "lighthouse.txt"), "--model", str(tiny_model_dir),
                        "--data-dir", str(data), "--max-new-tokens", "16", "--json", str(out)])
    s = result["summary"]
    assert s["answers"] > 0 and s["errors"] == 0 and s["tracebacks"] == 0, result["answers"]
    assert json.loads(out.read_text())["summary"] == s
    for a in result["answers"]:
        assert a["chars"] > 0 and 0 <= a["started_s"] <= a["first_s"] <= a["end_s"]
    assert s["first_p50_s"] <= s["first_p95_s"] and s["end_p50_s"] <= s["end_p95_s"]

    # Each reader keeps a conversation for 4 questions, then opens another: the library holds exactly those.
    turns = {r: [a["turn"] for a in mine] for r, mine in groupby(sorted(result["answers"], key=lambda a: a["reader"]),
                                                                 key=lambda a: a["reader"])}
    assert all(t == [i % 4 for i in range(len(t))] for t in turns.values())
    with closing(soak.library(data)) as db:
        held = [n for (n,) in db.execute("SELECT count(*) FROM messages GROUP BY conversation_id")]
    assert sorted(held) == sorted(2 * len(t[i:i + 4]) for t in turns.values() for i in range(0, len(t), 4))
    assert s["stored_answers"] == s["answers"] and s["trace_bytes_per_answer"] > 0
    assert s["bytes_per_answer"] > 0 and s["row_bytes_per_answer"] > s["trace_bytes_per_answer"]

    # The server's memory at the start, every 30 s and at the end, its anonymous and file-backed parts apart.
    samples = result["rss_mib"]
    times = [x["t_s"] for x in samples]
    assert len(samples) >= 3 and times == sorted(times) and times[-1] >= 60
    assert all(x["anon"] > 0 and x["file"] > 0 and x["peak"] >= x["rss"] for x in samples)

    drop = result["drop"]
    assert drop["status"] == "ready" and drop["read_tokens"] == drop["tokens"] > 800 and drop["ready_after_s"] > 0
    # The row pastes into the results file's table: its columns, in order.
    row, table = soak_table.table_row(result), (ROOT / "bench" / "results" / "soak-cpu.md").read_text()
    header = soak_table.TABLE_HEADER
    assert header in table and row.count(" | ") == header.splitlines()[0].count(" | ")
    assert f"| 2 | 60 | {s['answers']} |" in row and "ready after" in row
