"""bench.throughput end to end on a tiny model: every method in its own process, figures that add up."""
import json

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
