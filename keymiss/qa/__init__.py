"""Extractive question answering over contexts tokenised once: the built-in ``bertqa`` keyspace.

Needs the ``qa`` extra (openvino, tokenizers: no torch) or, for ``--qa-backend torch``, torch and
transformers (``qa-torch``); nothing here downloads anything.
"""

from keymiss.qa.app import QA_PATTERN, QAService, build_qa_app, qa_service, reader_factory
from keymiss.qa.contexts import ContextRecord, UnknownContextError, context_store_key

__all__ = [
    "QA_PATTERN",
    "ContextRecord",
    "QAService",
    "UnknownContextError",
    "build_qa_app",
    "context_store_key",
    "qa_service",
    "reader_factory",
]
