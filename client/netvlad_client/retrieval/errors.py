"""The retrieval evaluation's error, and the optional dependencies (the ``eval`` extra) that
are imported only when a step needs them."""

from __future__ import annotations

import importlib
from typing import Any

from netvlad_client.evaluation import EvaluationError

EXTRA_HINT = "pip install 'netvlad-service[eval]'"


class RetrievalError(EvaluationError):
    """A bad input to the retrieval evaluation; the message says what is wrong and what to do."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency of the ``eval`` extra, or say which extra provides it."""
    package = {"faiss": "faiss-cpu"}.get(module, module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RetrievalError(
            f"{purpose} needs {package}, which is not installed: {EXTRA_HINT} "
            f"(or pip install {package})"
        ) from exc
