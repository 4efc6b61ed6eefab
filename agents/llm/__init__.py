"""LLM backends behind one interface (see base.LLMBackend)."""
from agents.llm.base import (CallRecord, Completion, LLMBackend, LLMError, LLMTimeout, LLMUnavailable, OptionScore,
                             ScoredOptions, StructuredOutputError)
from agents.llm.factory import BackendPool, backend_from_config

__all__ = ["LLMBackend", "LLMError", "LLMUnavailable", "LLMTimeout", "StructuredOutputError", "Completion",
           "CallRecord", "OptionScore", "ScoredOptions", "BackendPool", "backend_from_config"]
