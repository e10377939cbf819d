"""``taqrir model ...``: prepare a released checkpoint, write the tiny one, serve a local model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from ground.errors import ConfigError

from .errors import BackendUnavailable

# Each command imports its torch/transformers/uvicorn modules inside its body: `taqrir --help` and
# every other command import this module, and torch alone costs 1.3-2 s of start-up.

model_app = typer.Typer(help="Model checkpoints and a local OpenAI-compatible server.", no_args_is_help=True)
log = logging.getLogger(__name__)


@model_app.command("prepare")
def prepare(
    src: Annotated[Path, typer.Argument(help="Released BiMediX2 folder (model_type llava_llama).")],
    dst: Annotated[Path, typer.Argument(help="Output folder, loadable by transformers and SGLang.")],
    vision_tower: Annotated[
        Path | None, typer.Option(help="Local openai/clip-vit-large-patch14-336 folder, if SRC does not bundle one.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
) -> None:
    """Convert a released llava_llama checkpoint (config, weight names, tokenizer, processor, CLIP)."""
    from .checkpoint import checkpoint_revision, prepare_checkpoint

    try:
        out = prepare_checkpoint(src, dst, vision_tower=vision_tower, overwrite=overwrite)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"prepared {out} ({checkpoint_revision(out)})")


@model_app.command("tiny")
def tiny(
    dst: Annotated[Path, typer.Argument(help="Output folder.")],
    layout: Annotated[str, typer.Option(help="hf (transformers/SGLang) or released (llava_llama).")] = "hf",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
) -> None:
    """Write a tiny random-weight checkpoint of BiMediX2's architecture (tests and the CPU demo)."""
    from .tiny import write_tiny

    if layout not in ("hf", "released"):
        typer.echo("error: --layout must be hf or released", err=True)
        raise typer.Exit(2)
    chosen: Literal["hf", "released"] = "hf" if layout == "hf" else "released"
    try:
        out = write_tiny(dst, layout=chosen, seed=seed, overwrite=overwrite)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote tiny {layout} checkpoint to {out}")


@model_app.command("serve")
def serve(
    model_path: Annotated[Path, typer.Option(help="Checkpoint in transformers layout.")] = Path(".taqrir/models/tiny-hf"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 30000,
    served_model_name: Annotated[str | None, typer.Option(help="Model id in /v1/models; default: folder name.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16, float32.")] = "auto",
    max_tokens: Annotated[int, typer.Option(help="Default max_tokens when a request names none.")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Concurrent requests generated as one batch.")] = 8,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Serve a local checkpoint over OpenAI's /v1/chat/completions (development without a GPU)."""
    import uvicorn

    from .server import create_app
    from .transformers_backend import TransformersBackend

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        typer.echo("error: --dtype must be auto, bfloat16, float16 or float32", err=True)
        raise typer.Exit(2)
    try:
        backend = TransformersBackend(
            model_path, device=device, dtype=dtype, model_name=served_model_name, batch_size=max_batch
        )
    except BackendUnavailable as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    app = create_app(
        backend, served_name=served_model_name or model_path.name, default_max_tokens=max_tokens, max_batch=max_batch
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
