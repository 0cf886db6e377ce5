"""Issue 12, defect 9: greedy answers looped ("The license also requires ..." again and again).

The repetition guard (generate.decode: transformers' no-repeat-n-gram processor over the answer's own
tokens) on a tiny random model, then on the real embedded model.
"""
import re
from pathlib import Path

import pytest
import torch

from infllm_engine import Engine, EngineError, InfLLMConfig
from infllm_engine.stopping import loop_start, settled

from .conftest import tiny_llama, tiny_tokenizer

SMALL = dict(n_init=4, n_local=32, block_size=8, repr_topk=2, chunk_size=16, topk=2, cache_blocks=8)
OFF = dict(no_repeat_ngram=0)


def repeated_sentence(text: str) -> str | None:
    """The first sentence (of 4+ words) that the text says twice, else None."""
    seen = set()
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        key = " ".join(re.findall(r"\w+", sentence.lower()))
        if len(key.split()) >= 4 and key in seen:
            return sentence
        seen.add(key)
    return None


def repeated_run(text: str, words: int = 8) -> str | None:
    """The first run of `words` words that the text says twice, else None."""
    tokens = re.findall(r"\w+", text.lower())
    runs = [" ".join(tokens[i: i + words]) for i in range(len(tokens) - words + 1)]
    return next((run for i, run in enumerate(runs) if run in runs[:i]), None)


def first_repeat(ids: list[int], n: int) -> int:
    """Index of the first token that completes an n-gram already in ids (len(ids) if none)."""
    grams = [tuple(ids[i: i + n]) for i in range(len(ids) - n + 1)]
    return next((i + n - 1 for i, g in enumerate(grams) if g in grams[:i]), len(ids))


def test_the_helpers_find_a_repeated_sentence_or_long_run_and_nothing_else():
    assert repeated_sentence("It uses relax. It uses relax. Then more.") is None           # 3 words: too short
    assert repeated_sentence("It uses the \\relax command. Then more. It uses the \\relax command") == \
        "It uses the \\relax command"
    assert repeated_run("a b c d e f g h, and a b c d e f g h") == "a b c d e f g h"
    text = "The pass key is 51061. Remember it: 51061 is the pass key."
    assert repeated_sentence(text) is None and repeated_run(text, 4) is None
    assert first_repeat([1, 2, 3, 1, 2, 3], 3) == 5 and first_repeat([1, 2, 3, 1, 2], 3) == 5


def test_a_loop_is_found_where_a_four_word_phrase_comes_back_the_third_time():
    text = "TeX has commands that produce commands that produce commands that produce commands that"
    at = loop_start(text)
    assert text[:at] == "TeX has commands that produce commands that produce "
    assert loop_start("The pass key is 51061. The pass key is 51061.") is None          # twice is an answer
    assert loop_start("go on and on and on and on and o") == loop_start("go on and on and on and on and on ")
    assert loop_start("A b c d. a B c D; A b C d") is None          # the last word may still grow: not yet
    assert loop_start("A b c d. a B c D; A b C d.") == 18           # case is ignored


def test_the_last_words_wait_until_no_loop_can_take_them_back():
    text = "one two three four five six seven"
    assert text[: settled(text)] == "one two "
    assert settled("one two three") == 0


@pytest.mark.parametrize("changes, words", [
    ({"no_repeat_ngram": 2}, "no_repeat_ngram must be 0 (off) or an integer of at least 3"),
    ({"no_repeat_ngram": -1}, "no_repeat_ngram must be 0 (off) or an integer of at least 3"),
    ({"no_repeat_ngram": 4.5}, "no_repeat_ngram must be 0 (off) or an integer of at least 3"),
    ({"no_repeat_ngram": True}, "no_repeat_ngram must be 0 (off) or an integer of at least 3"),
])
def test_absurd_repetition_knobs_are_refused_with_the_reason(changes, words):
    with pytest.raises(EngineError, match=re.escape(words)):
        InfLLMConfig(**changes)


def test_the_repetition_knob_never_changes_a_stored_memory():
    base = InfLLMConfig()
    assert base.memory_hash() == "6d962958fcad1c00"         # libraries read before the guard stay valid
    assert base.replace(no_repeat_ngram=5).memory_hash() == base.memory_hash()
    assert base.replace(**OFF).memory_hash() == base.memory_hash()


# -- the decode loop on a tiny random model (seed 2 loops greedily: 200, 211, 200, 211, ...) -----------
@pytest.fixture(scope="module")
def tiny_engine():
    return Engine(tiny_llama(seed=2), tiny_tokenizer(), InfLLMConfig(**SMALL, **OFF))


def answer_ids(engine: Engine, **knobs) -> list[int]:
    engine = engine.with_config(engine.cfg.replace(**knobs))
    memory = engine.read(torch.arange(100) % 256)
    return engine.ask(memory, "what is it?", max_new_tokens=40).wait().token_ids


def test_no_repeat_ngram_changes_a_greedy_answer_only_at_the_token_that_would_repeat_one(tiny_engine):
    off, on = answer_ids(tiny_engine), answer_ids(tiny_engine, no_repeat_ngram=3)
    k = first_repeat(off, 3)
    assert k < 20                                       # the loop this guards against
    assert on[:k] == off[:k] and on[k] != off[k]        # nothing changes before the answer would repeat
    assert first_repeat(on, 3) == len(on) == 40


# -- the embedded model ------------------------------------------------------------------------------
GPL3 = Path("/usr/share/common-licenses/GPL-3")
LOOPING = ("Summarize the document.", "What does the license say about patents?")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not GPL3.is_file():
        pytest.skip("Debian's /usr/share/common-licenses is not here")
    return Engine.load(None, InfLLMConfig(), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def memory(engine):
    # The license's first 4,000 characters (~900 tokens): the whole text is in the local window.
    return engine.read(engine.encode(engine.document_prompt(GPL3.read_text()[:4000])))


@pytest.mark.parametrize("question", LOOPING)
def test_without_the_guard_a_greedy_answer_repeats_a_sentence(engine, memory, question):
    answer = engine.with_config(engine.cfg.replace(**OFF)).ask(memory, question, max_new_tokens=150)
    for _ in answer:
        if repeated_sentence(answer.text):               # stop as soon as one comes twice
            break
    print(repr(answer.text))
    # Either a sentence came twice, or the engine's loop stop (stopping.loop_start, not a config knob) cut
    # the answer where a phrase came a third time.
    assert repeated_sentence(answer.text) or loop_start(answer.text + (answer.cut or "")) is not None
    if answer.cut is not None:
        assert answer.text.endswith((".", "!", "?", ":", " …"))     # cut mid-sentence: it says so


@pytest.mark.parametrize("question", LOOPING)
def test_with_the_default_guard_no_sentence_repeats(engine, memory, question):
    answer = engine.ask(memory, question, max_new_tokens=150)
    pieces = list(answer)
    print(repr(answer.text))
    assert "".join(pieces) == answer.text and loop_start(answer.text) is None     # what streamed is what stays
    # A sentence never comes twice. A run of words may, with another capital or end ("The license
    # also requires that the work must ..."): the n-gram block sees tokens, not words.
    assert repeated_sentence(answer.text) is None
    assert len(answer.text.split()) > 30 and ("GPL" in answer.text or "General Public License" in answer.text)


def test_planted_facts_are_still_copied_exactly_under_the_default_guard(engine):
    text = GPL3.read_text()[:4000]
    at = text.find("\n", 2000)
    text = (f"{text[:at]}\n\nA note left in this book: the pass key is 51061. Remember it. 51061 is the pass key."
            f"\n\nThe lighthouse keeper of Port Emberly is Mirela Vance."
            f"\n\nThe Harwick Bridge was opened on 19 June 1910.{text[at:]}")
    memory = engine.read(engine.encode(engine.document_prompt(text)))
    key = engine.ask(memory, "What is the pass key?", max_new_tokens=24).wait().text
    name = engine.ask(memory, "Who is the lighthouse keeper of Port Emberly?", max_new_tokens=24).wait().text
    # A year whose digits the answer has said before ("June 19, 1910"): a repetition penalty (removed) broke it.
    year = engine.ask(memory, "When was the Harwick Bridge opened?", max_new_tokens=24).wait().text
    print(repr(key), repr(name), repr(year))
    assert "51061" in key and "Mirela Vance" in name and "1910" in year
