"""The engine's API: read a text into a context memory, then ask questions against forks of it."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from . import stopping
from .answer import Answer, Found
from .config import InfLLMConfig
from .errors import EngineError
from .evidence import Evidence, choose
from .generate import Call, decode, prefill
from .loading import default_data_dir, load_model, prepare
from .memory import ContextMemory
from .precision import on_own_thread
from .probe import Probe, voting_layers
from .rope import Rotary

Progress = Callable[[int, int], None]


class Engine:
    def __init__(self, model, tokenizer, cfg: InfLLMConfig = InfLLMConfig(), fingerprint: str = "in-memory",
                 reader=None):
        """model: the weights, in cfg.weights_dtype. Under "mixed" (config.DTYPES) this engine computes on a
        bf16 copy of them, `reader` when given (engines of one load share it), and answering() on them."""
        prepare(model)
        self.weights, self.tokenizer, self.cfg, self.fingerprint = model, tokenizer, cfg, fingerprint
        # A copy, not autocast over the fp32 weights: autocast casts every weight at every chunk, and read 8-10 %
        # slower (bench/results/throughput-cpu.md); the copy costs 2 bytes a parameter (270 MB for the 135M model).
        self.model = model if cfg.torch_dtype == cfg.weights_dtype else reader or _copy_in(model, cfg.torch_dtype)
        mc = model.config
        self.n_layers = mc.num_hidden_layers
        self.n_heads = mc.num_attention_heads
        self.n_kv_heads = getattr(mc, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // self.n_heads
        self.device = torch.device(cfg.device)
        self.rope = Rotary(model.base_model.rotary_emb, self.head_dim, self.device, cfg.torch_dtype)
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        self.stop_ids = {eos} if isinstance(eos, int) else set(eos or [])

    @classmethod
    def load(cls, model: str | None = None, cfg: InfLLMConfig = InfLLMConfig(), data_dir: Path | None = None) -> "Engine":
        def load() -> "Engine":
            lm, tokenizer, fingerprint = load_model(model, Path(data_dir or default_data_dir()), cfg.device, cfg.weights_dtype)
            return cls(lm, tokenizer, cfg, fingerprint)
        return on_own_thread(load)          # the threads OpenMP starts for it end with it

    def with_config(self, cfg: InfLLMConfig) -> "Engine":
        """The same model under other knobs (another method, topk, ...): nothing is reloaded. The dtype may
        change only where the weights stay as they are ("mixed" <-> "float32")."""
        if (cfg.device, cfg.weights_dtype) != (self.cfg.device, self.cfg.weights_dtype):
            raise EngineError("the device and the weights' dtype are fixed when the model loads")
        reader = self.model if self.model is not self.weights and cfg.torch_dtype == self.cfg.torch_dtype else None
        return Engine(self.weights, self.tokenizer, cfg, self.fingerprint, reader)

    def answering(self, stored: InfLLMConfig | None = None, topk: int | None = None) -> "Engine":
        """The engine to ask a memory read under `stored` (default: this engine's config) with
        (InfLLMConfig.answering); topk: the probe's per-layer retrieval, this engine's by default."""
        cfg = self.cfg.answering(stored, topk)
        return self if cfg == self.cfg else self.with_config(cfg)

    # -- text <-> tokens --------------------------------------------------------------------------
    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device=self.device)

    def chat_parts(self) -> tuple[str, str]:
        """The chat template split around the user's message: (before, after)."""
        marker = "\x00MESSAGE\x00"
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
            before, after = rendered.split(marker)
            return before, after
        return "", "\nAnswer:"

    def turn_break(self) -> str:
        """What the chat template puts between an assistant's answer and the user's next message."""
        answer, question = "\x00ANSWER\x00", "\x00QUESTION\x00"
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "document"}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
            return rendered.split(answer)[1].split(question)[0]
        return "\n\nQuestion: "

    # -- memory -----------------------------------------------------------------------------------
    def new_memory(self) -> ContextMemory:
        return ContextMemory(self.cfg, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim)

    def read(self, ids: torch.Tensor, memory: ContextMemory | None = None, progress: Progress | None = None
             ) -> ContextMemory:
        """Prefill ids [n] into memory (a new one by default) and return it."""
        memory = memory if memory is not None else self.new_memory()
        self._check_input(memory, ids)
        prefill(self.model, memory, self.rope, ids.to(self.device), Call(self.cfg), progress, want_logits=False)
        return memory

    def generate(self, memory: ContextMemory, ids: torch.Tensor, max_new_tokens: int = 64,
                 progress: Progress | None = None) -> Answer:
        """Prefill ids after what memory holds (memory is changed), then stream the continuation: plain InfLLM,
        each layer retrieving its own blocks (the passkey and throughput benchmarks)."""
        return self._generate(memory, ids, max_new_tokens, progress)

    def find(self, memories: ContextMemory | Sequence[ContextMemory], question: str,
             history: Sequence[tuple[str, str]] = (),
             lexical: dict[int, float] | Sequence[dict[int, float] | None] | None = None,
             meaning: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> Found:
        """What a question about one memory or several (a document is a shelf of one) points to, before any
        answer: each memory is probed (Engine.probe); the votes, the word matches and the meaning choose the
        host memory and what its answer re-reads (infllm_engine.evidence). The memories are untouched.

        history: the conversation's earlier (question, answer) turns, re-read before this question, so a
        conversation needs no memory of its own and survives a restart as plain text.
        lexical: each memory's span -> how well its text matches the question's words (storage.lexical, one
        query over the library), spans numbered as Library.spans numbers them; weighed by focus_lexical.
        meaning: each memory's [spans] cosine of its spans' embeddings with the question's (infllm_engine.encoder);
        weighed by focus_meaning. For one memory, its own. The engine never sees texts: the caller has them.
        """
        memories = [memories] if isinstance(memories, ContextMemory) else list(memories)
        lexical = [] if lexical is None else [lexical] if isinstance(lexical, dict) else list(lexical)
        meaning = [] if meaning is None else [meaning] if isinstance(meaning, torch.Tensor) else list(meaning)
        if (lexical and len(lexical) != len(memories)) or (meaning and len(meaning) != len(memories)):
            raise EngineError(f"word matches or meanings do not match the {len(memories)} memories asked")
        if not question.strip():
            raise EngineError("the question is empty")
        if not memories:
            raise EngineError("no document to ask")
        if len(memories) > 1 and (self.cfg.method != "infllm" or not self.cfg.focus_blocks):
            raise EngineError("a question across documents needs the infllm method with a question focus")
        ids, span = self.question_ids(question, history)
        for memory in memories:
            self._check_input(memory, ids)
        t0 = time.perf_counter()
        probes = [self.probe(m, ids, span) for m in memories]
        cfg = self.cfg
        attention = [p.attention() if p else None for p in probes]
        evidence = choose(memories, attention, lexical, cfg.focus_blocks, cfg.signal_weights, cfg.focus_alone,
                          cfg.focus_gap, meaning)
        host = evidence.host if evidence is not None else 0
        token_votes = {}
        if evidence is not None and probes[host] is not None:     # only the host's tokens: its sentence is quoted
            token_votes = probes[host].weigh(memories[host], evidence.of(host))
        return Found(memories, ids, evidence, attention, token_votes, time.perf_counter() - t0)

    def ask(self, memories: ContextMemory | Sequence[ContextMemory], question: str, max_new_tokens: int = 256,
            history: Sequence[tuple[str, str]] = (),
            lexical: dict[int, float] | Sequence[dict[int, float] | None] | None = None,
            meaning: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> Answer:
        """Answer a question about one memory or several: what Engine.find points to, re-read just before the
        question, then the answer streamed after the host memory's sinks. The memories are untouched."""
        found = self.find(memories, question, history, lexical, meaning)
        evidence, host = found.evidence, found.host
        first_span = evidence.offsets[host] if evidence is not None else 0
        answer = self._generate(found.memories[host].fork(), found.ids, max_new_tokens, None, evidence, first_span)
        answer.timings["focus_s"] = found.seconds          # every memory's probe
        answer.document, answer.evidence, answer.token_votes = host, evidence, found.token_votes
        if evidence is not None:
            answer.trace.votes, answer.trace.pinned = evidence.scores, evidence.pinned
            answer.trace.parts, answer.trace.ranks = list(evidence.sizes), evidence.signals()
        return answer

    def probe(self, memory: ContextMemory, ids: torch.Tensor, span: tuple[int, int]) -> Probe | None:
        """Let the question's words [span) of ids vote for the memory's spans (infllm_engine.probe), over a
        throwaway fork; None where there is nothing to vote on (another method, no focus, no document)."""
        if self.cfg.method != "infllm" or not self.cfg.focus_blocks or memory.length <= self.cfg.n_init:
            return None
        probe = Probe((memory.length + span[0], memory.length + span[1]), memory.length,
                      voting_layers(self.n_layers, self.cfg.focus_layers))
        prefill(self.model, memory.fork(), self.rope, ids.to(self.device), Call(self.cfg, probe=probe),
                want_logits=False)
        return probe

    def question_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> tuple[torch.Tensor, tuple[int, int]]:
        """Token ids of question_text, and the span [a, b) of the question's own words among them."""
        text, words = self.question_text(question, history), question.strip()
        _, after = self.chat_parts()
        head = text[: len(text) - len(after) - len(words)]
        if head.endswith(" "):                      # " What" is one token: keep the space with the word
            head, words = head[:-1], " " + words
        parts = [self.encode(head), self.encode(words), self.encode(after)]
        a = parts[0].numel()
        return torch.cat(parts), (a, a + parts[1].numel())

    def question_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """What follows the document for a question after earlier turns: it closes the document's chat turn."""
        _, after = self.chat_parts()
        asked = [q for q, _ in history] + [question]
        text = f"\n\nQuestion: {asked[0].strip()}{after}"
        between = self.turn_break() if history else ""
        for (_, answer), q in zip(history, asked[1:]):
            text += f"{answer.strip()}{between}{q.strip()}{after}"
        return text

    def document_prompt(self, text: str) -> str:
        """The text a document is read as: the start of a chat turn that the question later closes."""
        before, _ = self.chat_parts()
        return f"{before}Read this document and answer questions about it.\n\n{text}"

    # -- internals --------------------------------------------------------------------------------
    def _check_input(self, memory: ContextMemory, ids: torch.Tensor) -> None:
        if ids.ndim != 1 or ids.numel() == 0:
            raise EngineError("the input is empty: there is nothing to read")
        if memory.cfg.layout() != self.cfg.layout():
            raise EngineError(
                f"this memory was built as {memory.cfg.method} with n_init={memory.cfg.n_init}, n_local="
                f"{memory.cfg.n_local}, block_size={memory.cfg.block_size}; read the document again for these settings")
        if memory.cfg.torch_dtype != self.cfg.torch_dtype:
            raise EngineError(f"this memory holds {memory.cfg.dtype} tensors and the engine computes in {self.cfg.dtype}: "
                              "load it from its library with this engine (a stored memory loads in any dtype)")
        if memory.length + ids.numel() > self.cfg.max_tokens:
            raise EngineError(
                f"the input is too long: {memory.length + ids.numel():,} tokens, over the configured maximum "
                f"of {self.cfg.max_tokens:,}")

    def _generate(self, memory: ContextMemory, ids: torch.Tensor, max_new_tokens: int, progress: Progress | None,
                  evidence: Evidence | None = None, first_span: int = 0) -> Answer:
        """Prefill ids after what memory holds (memory is changed), then stream the continuation.

        The continuation passes the config's n-gram block (no_repeat_ngram; 0: off), which sees the
        continuation's own tokens only.
        """
        self._check_input(memory, ids)
        if max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        answer = Answer(iter(()))
        call = Call(self.cfg, answer.trace, None, evidence, first_span)
        answer.pieces = self._stream(memory, ids.to(self.device), max_new_tokens, answer, progress, call)
        return answer

    def _stream(self, memory, ids, max_new_tokens, answer: Answer, progress, call: Call) -> Iterator[str]:
        t0 = time.perf_counter()
        logits = prefill(self.model, memory, self.rope, ids, call, progress)
        answer.timings["prefill_s"] = time.perf_counter() - t0
        shown, looped, t_first = "", None, time.perf_counter()
        for token in decode(self.model, memory, self.rope, logits, max_new_tokens, self.stop_ids, call,
                            no_repeat_ngram=self.cfg.no_repeat_ngram):
            if not answer.token_ids:
                t_first = time.perf_counter()
                answer.timings["first_token_s"] = t_first - t0
            answer.token_ids.append(token)
            text = self.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):       # wait for the rest of a multi-byte character
                continue
            if (looped := stopping.loop_start(text)) is not None:
                break
            # The last few words wait: a loop found with the next token may take them back.
            ready = text[: stopping.settled(text)]
            if len(ready) > len(shown):
                yield ready[len(shown):]
                shown = ready
        # The first token comes from the prefill's logits; the rate counts the ones decoded after it.
        elapsed = time.perf_counter() - t_first
        answer.timings["decode_tokens_per_s"] = (len(answer.token_ids) - 1) / elapsed if elapsed > 0 else 0.0
        text = self.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
        if looped is not None:
            keep = max(looped, len(shown))
            answer.cut, text = text[keep:], text[:keep].rstrip()
            if text and text[-1] not in ".!?:":
                text += " …"            # cut mid-sentence: the reader sees that it was cut
        if len(text) > len(shown):
            yield text[len(shown):]


def _copy_in(model, dtype: torch.dtype):
    """The model with its weights in dtype, the original untouched."""
    return copy.deepcopy(model).to(dtype)
