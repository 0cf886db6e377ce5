"""The one config of the engine: every InfLLM knob, validated when it is made."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from kernels.chunk import CHOICES as KERNELS   # auto | torch | triton

from .errors import EngineError
from .precision import best_dtype

METHODS = ("infllm", "streaming", "full")
# Knobs that never shape a stored memory: where and in what precision it runs (a memory is stored
# packed, the same in every dtype), limits, and what only questions use.
QUESTION_ONLY = ("device", "dtype", "kernels", "cache_blocks", "blocks_on", "max_tokens", "focus_blocks", "focus_layers",
                 "focus_gap", "focus_alone", "focus_lexical", "focus_meaning", "no_repeat_ngram")
# Knobs of experiments that lost, removed (their measurements stay in bench/results and docs/): a library
# document stored with them still loads, the knob ignored (InfLLMConfig.from_dict). All were question-time
# only, so the memory they stored is the same.
#   focus_window      "window" (read the window as it is) and "pin" lost to re-reading window evidence alone;
#   focus_neighbours  "better" and "both" lost to pinning each best block with the next one;
#   repetition_penalty  off: at 1.1 it turned "June 19, 1910" into "June 19, 2023";
#   focus_topk        a layer's own retrieval beside the question focus: 0 by default, and nothing measured kept it.
RETIRED = ("focus_window", "focus_neighbours", "repetition_penalty", "focus_topk")
# The compute dtype of the model's products, a chunk's attention and the memory's K/V while they are in RAM.
# "mixed" loads the weights in fp32, reads documents with a bf16 copy of them and answers in fp32
# (Engine.answering): on an Intel Xeon with AMX a 512-row product runs 7x faster in bf16, and a one-row
# product, what decoding is, 2x faster in fp32 (precision.best_dtype measures both).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "mixed": torch.bfloat16}


@dataclass(slots=True, frozen=True)
class InfLLMConfig:
    """Knobs of the context memory (names follow the InfLLM paper and reference code).

    The defaults suit the embedded SmolLM2-135M (trained to 8K) on a CPU: attended context per
    query is n_init + topk * block_size + n_local = 128 + 1024 + 2048, well inside 8K.
    """

    method: str = "infllm"          # infllm | streaming (sinks + window) | full (the model's own attention)
    n_init: int = 128               # sink tokens, attended at the fixed memory distance
    n_local: int = 2048             # sliding local window, attended at real relative positions
    block_size: int = 128           # evicted tokens per memory block
    repr_topk: int = 4              # most-attended tokens whose keys represent a block, per head
    topk: int = 8                   # blocks retrieved per layer per step
    chunk_size: int = 512           # queries per prefill chunk
    cache_blocks: int = 64          # blocks_on="host": blocks held on the accelerator (LRU)
    # Where the packed block K/V live (infllm_engine.blocks): "host" (RAM or the file's mapping; an accelerator
    # caches recent blocks), "device" (all on the accelerator: no step waits for the host), "auto": device
    # on an accelerator, host on the CPU (where they are the same memory, and decode refills only new slots).
    blocks_on: str = "auto"
    max_tokens: int = 2_000_000     # longest input accepted
    device: str = "cpu"
    dtype: str = "float32"          # or bfloat16, float16, mixed (above), or "auto": what this machine runs fastest (precision.best_dtype)
    kernels: str = "auto"           # auto (Triton on CUDA, torch elsewhere) | torch | triton
    # Question time only (Engine.ask): the question's own words vote, in the focus layers, for the
    # blocks that every layer re-reads just before the question, instead of retrieving its own
    # (infllm_engine.probe, infllm_engine.evidence). 0: plain InfLLM.
    focus_blocks: int = 4
    focus_layers: tuple[float, float] = (1 / 3, 2 / 3)   # the voting layers, as fractions of the depth
    focus_gap: int = 64             # tokens between the re-read focus blocks and the question (less if n_local is short)
    # Read the pinned blocks alone as well: the answer attends sinks, the re-read blocks and the question,
    # not the window, as the model handed the answering passage does. On real questions about lshort.pdf
    # (bench.questions, 42 in the book's words) 15 answers were right against 10 with the window. On planted
    # facts (bench.needle, 2 blocks) it lifted 64K (67/75 against 55/75) and lost at 16K and 32K.
    focus_alone: bool = True
    # Weight of the question's word matches (Engine.ask's `lexical`, from storage.lexical) beside the
    # attention vote; the engine alone never has any, so the passkey and throughput benchmarks stay pure InfLLM.
    focus_lexical: float = 1.0
    # Weight of the spans' meaning (Engine.ask's `meaning`: cosine with the question, infllm_engine.encoder);
    # with it, the words' and the meaning's weights follow how strongly the question's words match
    # (evidence.fuse). Paraphrased questions about 136 facts of two books found their page first 49 times
    # against 29 without it, questions in the book's words 132 both (bench/results/meaning-cpu.md).
    focus_meaning: float = 1.0
    # Answer time only: greedy, the 135M model loops ("The license also requires ..." again and again).
    # The block acts on the answer's own tokens, never the document's (infllm_engine.generate.decode). On
    # 16 vague questions about 4 licenses, 10 answers repeated a sentence; with a 6-token n-gram block none do.
    no_repeat_ngram: int = 6        # no run of this many tokens twice in one answer; 0: off

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "focus_layers", tuple(self.focus_layers))   # JSON gives a list
        except TypeError:
            pass
        problems = []
        if self.dtype == "auto":
            try:
                object.__setattr__(self, "dtype", best_dtype(self.device))
            except (RuntimeError, TypeError):
                pass                        # a bad device: reported below
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("n_init", "n_local", "block_size", "repr_topk", "chunk_size", "max_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("topk", "cache_blocks", "focus_blocks", "focus_gap"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not problems:
            if self.repr_topk > self.block_size:
                problems.append(f"repr_topk ({self.repr_topk}) cannot exceed block_size ({self.block_size})")
            if self.topk > self.cache_blocks:
                problems.append(f"topk ({self.topk}) cannot exceed cache_blocks ({self.cache_blocks}): "
                                "every retrieved block must fit in the accelerator cache")
            if self.chunk_size > self.n_local:
                problems.append(f"chunk_size ({self.chunk_size}) cannot exceed n_local ({self.n_local})")
        for name in ("focus_lexical", "focus_meaning"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 100:
                problems.append(f"{name} must be a number from 0 (off) to 100, got {w!r}")
        if self.blocks_on not in ("auto", "host", "device"):
            problems.append(f"blocks_on must be auto, host or device, got {self.blocks_on!r}")
        if not isinstance(self.focus_alone, bool):
            problems.append(f"focus_alone must be true or false, got {self.focus_alone!r}")
        ngram = self.no_repeat_ngram
        if isinstance(ngram, bool) or not isinstance(ngram, int) or not (ngram == 0 or ngram >= 3):
            problems.append(f"no_repeat_ngram must be 0 (off) or an integer of at least 3 (shorter ones ban "
                            f"every repeated word or word pair), got {ngram!r}")
        layers = self.focus_layers
        if not (isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(x, (int, float)) for x in layers)
                and 0 <= layers[0] < layers[1] <= 1):
            problems.append(f"focus_layers must be two fractions 0 <= from < to <= 1, got {self.focus_layers!r}")
        if self.kernels not in KERNELS:
            problems.append(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        elif self.kernels == "triton" and not self.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            problems.append("kernels='triton' needs a CUDA device (or TRITON_INTERPRET=1, Triton's slow CPU interpreter)")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            problems.append(f"device {self.device!r} is not a torch device")
        if problems:
            raise EngineError("invalid engine config: " + "; ".join(problems))

    @property
    def resident_blocks(self) -> bool:
        """Whether block K/V live on the compute device (blocks_on resolved)."""
        return self.blocks_on == "device" or (self.blocks_on == "auto" and torch.device(self.device).type != "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def weights_dtype(self) -> torch.dtype:
        """The weights as loaded: fp32 under "mixed" (reading runs on a bf16 copy), else the compute dtype."""
        return torch.float32 if self.dtype == "mixed" else self.torch_dtype

    @property
    def answer_dtype(self) -> str:
        """The dtype questions are asked in: "float32" under "mixed", else this one."""
        return "float32" if self.dtype == "mixed" else self.dtype

    @property
    def signal_weights(self) -> dict[str, float]:
        """The weights of the signals fused beside attention (infllm_engine.evidence.fuse)."""
        return {"words": self.focus_lexical, "meaning": self.focus_meaning}

    @property
    def max_position(self) -> int:
        """Largest rotary position infllm/streaming ever use: the local window plus one chunk."""
        return self.n_local + self.chunk_size

    @classmethod
    def from_dict(cls, stored: dict) -> "InfLLMConfig":
        """The config a stored dict (to_dict, JSON) describes; knobs removed since it was stored are ignored."""
        return cls(**{name: value for name, value in stored.items() if name not in RETIRED})

    def for_memory(self, stored: "InfLLMConfig") -> "InfLLMConfig":
        """The config to run on a memory stored under `stored`: its knobs that shape a memory, this config's
        that never do (QUESTION_ONLY: where and in what precision it runs, the question focus)."""
        return stored.replace(**{k: getattr(self, k) for k in QUESTION_ONLY})

    def answering(self, stored: "InfLLMConfig | None" = None, topk: int | None = None) -> "InfLLMConfig":
        """The config to ask a memory stored under `stored` (default: this one) with, on this machine: its
        layout, this config's run-time knobs and topk (unless given), in answer_dtype ("mixed" answers in fp32)."""
        base = self if stored is None else self.for_memory(stored)
        return base.replace(topk=self.topk if topk is None else int(topk), dtype=self.answer_dtype)

    def replace(self, **changes) -> "InfLLMConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def layout(self) -> tuple:
        """The knobs that shape a memory's structure; a memory is usable by any config with the same layout."""
        return (self.method, self.n_init, self.n_local, self.block_size)

    def memory_hash(self) -> str:
        """Hash of the knobs that shape a stored memory.

        Retrieval while reading feeds later layers, so topk and chunk_size shape the K/V too; only
        where and with which kernels it runs, the limits and the question-time focus do not.
        """
        shaping = {k: v for k, v in self.to_dict().items() if k not in QUESTION_ONLY}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
