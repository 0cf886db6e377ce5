"""The quote: sentence bounds from the document's characters, the sentence the question's attention points to."""
import torch

from reading import quotes

TEXT = ("1.4 Input File Structure\n"
        "When LaTeX processes an input file, it expects it to follow a certain struc-\nture, e.g. a preamble. "
        "Thus every input file must start with the command \\documentclass{...} as shown on p. 7 by D. Knuth.\n"
        "This specifies what sort of document you intend to write!\n\n"
        "A new paragraph? Yes.")


def bounds(text: str) -> list[str]:
    return [text[a:b] for a, b in quotes.sentences(text, 0, len(text))]


def test_sentences_end_at_full_stops_but_not_after_abbreviations_initials_or_page_numbers():
    assert bounds(TEXT) == [
        "1.4 Input File Structure",                                        # a short line without a full stop
        "When LaTeX processes an input file, it expects it to follow a certain struc-\nture, e.g. a preamble.",
        "Thus every input file must start with the command \\documentclass{...} as shown on p. 7 by D. Knuth.",
        "This specifies what sort of document you intend to write!",
        "A new paragraph?", "Yes."]


def test_a_lists_numbers_start_sentences():
    assert bounds("1. Use \\documentclass first. 2. Then \\begin{document}.") == [
        "1. Use \\documentclass first.", "2. Then \\begin{document}."]


def test_sentences_cover_only_what_overlaps_the_range_and_stay_inside_a_paragraph():
    at = TEXT.index("Thus")
    got = [TEXT[a:b] for a, b in quotes.sentences(TEXT, at, at + 10)]
    assert got == ["Thus every input file must start with the command \\documentclass{...} as shown on p. 7 by D. Knuth."]


def test_a_long_run_without_full_stops_is_cut_at_line_ends():
    listing = "\n".join(f"\\item entry number {i} of a long list" for i in range(40))
    pieces = bounds(listing)
    assert len(pieces) > 1 and all(len(p) <= quotes.MAX_SENTENCE for p in pieces)
    assert "".join(p.replace("\n", "") for p in pieces) == listing.replace("\n", "")


def tokens(text: str) -> list[int]:
    """Where each 'token' starts: one token per word (a stand-in for the tokenizer's offsets)."""
    return [m.start() for m in __import__("re").finditer(r"\S+", text)]


def test_the_quote_is_the_sentence_whose_tokens_drew_the_words_most_with_the_next_one():
    starts = tokens(TEXT)
    spans = [{"start_token": 0, "end_token": 20}, {"start_token": 20, "end_token": len(starts)}]
    pages = [{"label": "p. 7", "physical": 21, "start_token": 0}, {"label": "p. 8", "physical": 22, "start_token": 25}]
    word = lambda w: next(i for i, a in enumerate(starts) if TEXT.startswith(w, a))        # noqa: E731
    votes = {0: torch.zeros(2, 20), 1: torch.zeros(2, len(starts) - 20)}
    votes[0][0, word("When")] = 0.3
    votes[1][0, word("\\documentclass") - 20] = 0.5          # the words point at the command ...
    votes[1][0, word("specifies") - 20] = 0.9                 # ... and at a token every question draws,
    votes[1][1, word("specifies") - 20] = 0.8                 # which the template's tokens draw too
    quote = quotes.choose(votes, spans, TEXT, starts, pages)
    assert quote.text == ("Thus every input file must start with the command \\documentclass{...} as shown on p. 7 "
                          "by D. Knuth. This specifies what sort of document you intend to write!")   # and the next
    assert TEXT[slice(*quote.chars)].startswith("Thus") and quote.span == 1
    assert (quote.page, quote.physical) == ("p. 7", 21)               # the page its first token is on
    assert abs(quote.weight - 0.5 / 0.9) < 1e-6                        # its part of what the sentences drew
    votes[0][0, word("When")] = 0.7
    assert quotes.choose(votes, spans, TEXT, starts, pages).text.startswith("When LaTeX processes")
    assert quotes.choose({}, spans, TEXT, starts, pages) is None


def test_a_best_sentence_that_opens_on_a_pronoun_is_quoted_with_the_one_before():
    text = "Note the semicolon (;) character. It separates the individual commands. Then draw."
    starts = tokens(text)
    votes = {0: torch.zeros(2, len(starts))}
    votes[0][0, 6] = 1.0                                       # "separates"
    quote = quotes.choose(votes, [{"start_token": 0}], text, starts, [{"label": "p. 1", "start_token": 0}])
    assert quote.text == "Note the semicolon (;) character. It separates the individual commands."


def test_two_sentences_longer_than_a_quote_are_quoted_alone():
    text = "The answer is here. " + "A long sentence goes on " * 20 + "to the end."
    starts = tokens(text)
    votes = {0: torch.zeros(2, len(starts))}
    votes[0][0, 2] = 1.0
    quote = quotes.choose(votes, [{"start_token": 0}], text, starts, [{"label": "p. 1", "start_token": 0}])
    assert quote.text == "The answer is here."


def test_the_questions_words_choose_among_sentences_the_attention_cannot_tell_apart():
    starts = tokens(TEXT)
    spans = [{"start_token": 0}]
    pages = [{"label": "p. 7", "start_token": 0}]
    flat = {0: torch.stack([torch.full((len(starts),), 0.01), torch.zeros(len(starts))])}
    assert quotes.choose(flat, spans, TEXT, starts, pages).text.startswith("When LaTeX")   # the most tokens
    quote = quotes.choose(flat, spans, TEXT, starts, pages, "Is there a new paragraph?")
    assert quote.text == "A new paragraph? Yes."
    assert quotes.content_words("Which commands does the Input file start with?") == {"comma", "input", "file", "start"}
