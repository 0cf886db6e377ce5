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
