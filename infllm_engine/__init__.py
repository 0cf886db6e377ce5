"""InfLLM context memory on Hugging Face causal LMs: read once, retrieve per layer, answer."""
from .config import InfLLMConfig
from .answer import Answer
from .engine import Engine
from .errors import EngineError
from . import snapshot
from .memory import ContextMemory
from .trace import Summary, Trace

__all__ = ["snapshot", "Answer", "ContextMemory", "Engine", "EngineError", "InfLLMConfig", "Summary", "Trace"]
