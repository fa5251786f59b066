"""Extractive question answering over contexts tokenised once: the built-in ``bertqa`` keyspace.

Needs the ``qa`` extra (torch, transformers, tokenizers); nothing here downloads anything.
"""

from .app import QA_PATTERN, build_qa_app
from .contexts import ContextRecord, UnknownContextError, context_store_key

__all__ = ["QA_PATTERN", "ContextRecord", "UnknownContextError", "build_qa_app", "context_store_key"]
