"""The page through Gradio's API, as any client can call it: a session's state travels between its calls."""
import socket

import pytest

from infllm_engine import Engine, InfLLMConfig
from reading.service import ReadingService
from storage.library import Library

from .conftest import tiny_llama, tiny_tokenizer

gradio_client = pytest.importorskip("gradio_client")
SMALL = dict(n_init=4, n_local=64, block_size=16, repr_topk=2, chunk_size=32, topk=2, cache_blocks=8)
BOOK = "\f".join(f"Page {p}. " + " ".join(f"Word {p} {i} is here." for i in range(40)) for p in range(1, 4))


@pytest.fixture
def served(tmp_path):
    from ui.handlers import Settings
    from ui.layout import build

    engine = Engine(tiny_llama(), tiny_tokenizer(), InfLLMConfig(**SMALL), fingerprint="tiny")
    service = ReadingService.start(engine, Library(tmp_path / "data"))
    for name, text in (("harbour.txt", BOOK), ("market.txt", BOOK.replace("Word", "Stall"))):
        (tmp_path / name).write_text(text)
        service.read_now(tmp_path / name)
    demo = build(service, Settings("infllm", 2, 64, 6))
    demo.queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield service, gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_a_session_that_asks_another_document_starts_that_documents_own_conversation(served):
    service, client = served
    harbour, market = (d["id"] for d in service.library.documents())
    client.predict(harbour, "Who is the harbour master?", "infllm", 2, 512, 16, api_name="/asked")
    client.predict(market, "Who is the harbour master?", "infllm", 2, 512, 16, api_name="/asked")
    first, = service.library.conversations(harbour)
    second, = service.library.conversations(market)
    # Each document's conversation holds its own turn only: the second question re-read nothing of the first.
    assert [m["role"] for m in service.library.messages(first["id"])] == ["user", "assistant"]
    assert [m["role"] for m in service.library.messages(second["id"])] == ["user", "assistant"]
    trace = service.library.messages(second["id"])[1]["trace"]
    assert trace["tokens"]["prefill"] == service.engine.question_ids("Who is the harbour master?")[0].numel()    # no earlier turn in it


def test_a_session_asks_all_documents_then_one_and_keeps_two_conversations(served):
    service, client = served
    harbour, market = (d["id"] for d in service.library.documents())
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/asked"]["parameters"]
    # The dropdown offers "all"; the box of documents ticked together comes last, so a client may leave it out.
    assert "'all'" in info[0]["python_type"]["type"] and info[-1]["parameter_has_default"]
    client.predict("all", "Who is the harbour master?", "infllm", 2, 512, 16, api_name="/asked")
    client.predict(market, "Who is the harbour master?", "infllm", 2, 512, 16, api_name="/asked")
    shelf, = service.library.conversations("all")
    one, = service.library.conversations(market)
    assert [m["role"] for m in service.library.messages(shelf["id"])] == ["user", "assistant"]
    assert service.library.messages(shelf["id"])[1]["trace"]["documents"] in ([harbour, market], [market, harbour])
    assert [m["role"] for m in service.library.messages(one["id"])] == ["user", "assistant"]
