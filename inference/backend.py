"""The one protocol every backend implements, and the one factory that picks a backend."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .config import InferenceSettings
from .sglang import SGLangBackend
from .types import GenerationRequest, GenerationResult

# The modules that import torch and transformers (tiny, checkpoint, transformers_backend: 1.3-2 s
# of start-up) are imported inside the functions that need them, so that a process using the
# SGLang backend (workers beside a GPU server, the API, every CLI command) never loads them.

log = logging.getLogger(__name__)


@runtime_checkable
class InferenceBackend(Protocol):
    """Turns generation requests into results; one instance per worker process."""

    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Answer every request, in order. Raises BackendUnavailable when the model cannot answer."""
        ...

    def ready(self) -> None:
        """Return when the backend can answer; raise BackendUnavailable otherwise."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, model name and revision, and where it runs (for provenance and health pages)."""
        ...

    def close(self) -> None:
        """Release connections, threads and device memory."""
        ...


def ensure_tiny(path: Path) -> Path:
    """Write the tiny demo checkpoint at ``path`` unless present; safe when workers race.

    Written beside the target and renamed into place, so a reader never sees half a checkpoint.
    """
    import os
    import shutil
    import tempfile

    from .checkpoint import relocate_checkpoint  # torch: see the note on imports at the top
    from .tiny import write_tiny

    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_tiny(staging / "model", layout="hf")
        log.info("wrote the tiny demo model to %s", path)
        relocate_checkpoint(staging / "model", final=path)
        try:
            os.rename(staging / "model", path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def make_backend(settings: InferenceSettings, *, data_dir: Path) -> InferenceBackend:
    """Build the backend ``settings.backend`` names (the only place backends are constructed)."""
    if settings.backend == "sglang":
        return SGLangBackend(
            settings.server_url,
            model_name=settings.model_name,
            api_key=settings.api_key,
            connect_timeout=settings.connect_timeout,
            request_timeout=settings.request_timeout,
            max_retries=settings.max_retries,
            retry_backoff=settings.retry_backoff,
            retry_backoff_max=settings.retry_backoff_max,
            max_concurrency=settings.max_concurrency,
            max_connections=settings.max_connections,
        )
    # torch + transformers: only a process that runs this backend loads them
    from .transformers_backend import TransformersBackend

    path = settings.resolved_model_path(data_dir)
    if settings.model_path is None and settings.auto_tiny and not (path / "config.json").is_file():
        ensure_tiny(path)
    return TransformersBackend(
        path,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        model_name=settings.model_name if settings.model_path is not None else path.name,
        torch_threads=settings.torch_threads,
        prefix_cache=settings.prefix_cache,
    )
