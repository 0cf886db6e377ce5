"""bench.throughput and bench.profile end to end on a tiny model: every method in its own process,
figures that add up, operator tables for prefill and decode."""
import json

from bench import profile
from bench.throughput import main


def test_the_throughput_bench_measures_each_method_in_its_own_process(tmp_path, tiny_model_dir):
    out = tmp_path / "throughput.json"
    main(["--lengths", "1200", "3000", "--decode", "3", "--full-max", "2000", "--model", str(tiny_model_dir),
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m bench.throughput --lengths 1200 3000") and result["machine"]
    rows = {(r["method"], r["length"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((m, n) for m in ("infllm", "full", "floor") for n in (1200, 3000))
    assert "--full-max" in rows["full", 3000]["skipped"]                 # quadratic: not run past the limit
    for key, r in rows.items():
        if key == ("full", 3000):
            continue
        assert "error" not in r, r
        assert r["tokens"] > 0.9 * r["length"] and r["ingest_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert r["peak_rss_mib"] >= r["rss_after_load_mib"] > 0
        assert r["of_floor"] == round(r["ingest_tok_s"] / rows["floor", r["length"]]["ingest_tok_s"], 3)
    assert rows["floor", 3000]["of_floor"] == 1.0


def test_the_profile_prints_operator_tables_for_a_prefill_chunk_and_decode(tiny_model_dir, capsys):
    profile.main(["--length", "1024", "--decode", "3", "--model", str(tiny_model_dir), "--rows", "100"])
    out = capsys.readouterr().out
    assert "torch.float32   linear" in out and "torch.bfloat16  linear" in out and "GFLOP/s" in out
    assert "read 1,024 tokens" in out
    prefill, decode = out.split("## prefill")[1].split("## decode")
    assert "ms per chunk" in prefill and "aten::mm" in prefill
    assert "3 steps" in decode and "ms per token" in decode and "aten::mm" in decode      # the model ran
    answer = out.split("an answer's decode (as Engine.ask)")[1]
    assert "operators at infllm_engine/generate.py" in answer and "operators at infllm_engine/attention.py" in answer


def test_the_needle_bench_plants_every_fact_once_and_records_each_question(tmp_path, tiny_model_dir):
    from bench import needle, needle_table

    book = tmp_path / "book.txt"
    book.write_text("\n".join(f"Line {i} of a long and rather dull manual about typesetting." for i in range(400)))
    out = tmp_path / "needle.json"
    args = ["--book", str(book), "--lengths", "6000", "--docs", "1", "--reference-length", "1500", "--model",
            str(tiny_model_dir), "--data-dir", str(tmp_path / "lib"), "--max-new-tokens", "2", "--json", str(out),
            "--variants", "plain:focus_blocks=0", "focus"]
    result = needle.main(args)
    samples = result["samples"]
    assert [s["variant"] for s in samples].count("plain") == 15 == [s["variant"] for s in samples].count("focus")
    assert [s["variant"] for s in samples].count("reference") == 15
    mine = [s for s in samples if s["variant"] == "focus"]
    assert sorted({s["depth"] for s in mine}) == list(needle.DEPTHS) and len({s["kind"] for s in mine}) == 5
    assert all(s["fact_blocks"] for s in mine if s["depth"] <= 0.5)          # early facts left the 2K window
    assert all(s["in_window"] for s in mine if s["depth"] == 0.9)
    assert all(s["pinned"] is not None for s in mine) and all(s["pinned"] is None for s in samples if s["variant"] == "plain")
    again = needle.main(args)                                                 # the planted documents are kept
    assert all(s["read_seconds"] < 1 for s in again["samples"])
    assert [s["answer"] for s in again["samples"]] == [s["answer"] for s in samples]
    assert "| focus | 5K (" in needle_table.tables(json.loads(out.read_text()))


def test_the_question_bench_asks_every_fact_both_ways_of_every_system_and_scores_it(tmp_path, tiny_model_dir):
    from bench import questions

    assert questions.holds("It is the  Seventeenth\nedition.", ["seventeenth edition"])
    assert questions.first_sentence("Donald E. Knuth wrote it. Then more.") == "Donald E. Knuth wrote it."
    assert questions.repeats("a b c d, a b c d and a b c d") and not questions.repeats("a b c d a b c d")
    lines = [f"Line {i} of a long and rather dull manual about typesetting." for i in range(60)]
    lines[30] = "The lighthouse keeper of Port Emberly is Mirela Vance."
    book = tmp_path / "book.txt"
    book.write_text("\n".join(lines))
    fact = {"id": "keeper", "label": "1", "physical": 1, "sentence": lines[30], "expect": ["Mirela Vance"],
            "book": "Who is the lighthouse keeper of Port Emberly?", "paraphrase": "Who tends the light?"}
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"book": "book.txt", "facts": [fact]}))
    out = tmp_path / "questions.json"
    result = questions.main(["--facts", str(facts), "--book", str(book), "--model", str(tiny_model_dir),
                             "--data-dir", str(tmp_path / "lib"), "--max-new-tokens", "4", "--vague",
                             "--systems", *questions.SYSTEMS, "--json", str(out)])
    samples = result["samples"]
    assert [(s["system"], s["wording"]) for s in samples] == [
        (system, wording) for wording in questions.WORDINGS for system in questions.SYSTEMS]
    app, library, bm25 = samples[0], samples[1], samples[2]
    assert app["cited_right"] == (app["citation"] == "(p. 1)") and "quote_holds" in app
    assert library["document_right"] and library["cited_right"] == (library["citation"] == "(book, p. 1)")
    assert bm25["passages_hold"]                    # the rare words find the fact's passage
    assert [v["question"] for v in result["vague"]] == list(questions.VAGUE)
    table = questions.table(json.loads(out.read_text()))
    assert "| app | book | " in table and "| oracle | paraphrase | " in table
    assert f"{len(questions.VAGUE)} vague questions" in table
