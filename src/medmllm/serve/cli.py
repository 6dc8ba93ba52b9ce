"""``medmllm serve`` and ``medmllm chat`` (a typer app to attach to the main CLI), and
:func:`stream_answer` for ``medmllm ask --stream``.

Attach with ``app.add_typer(serve_cli.app)`` (commands ``serve`` and ``chat``) or
``app.command("serve")(serve_cli.serve_cmd)`` / ``app.command("chat")(serve_cli.chat_cmd)``.

The default model is the quickstart's (:data:`DEFAULT_MODEL`) when ``--model`` is not given.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import typer

from medmllm.errors import ConfigError, MedmllmError

DEFAULT_MODEL = Path("runs/quickstart/instruct/model")
KEYS_ENV = "MEDMLLM_API_KEYS"
FILE_COMMANDS = {"/image": "image", "/volume": "volume", "/ecg": "signal", "/signal": "signal", "/ehr": "ehr"}

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Serve a medmllm model over an OpenAI-compatible API, or chat with it in the terminal.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def resolve_model(model: Path | None) -> Path:
    """``model``, else the quickstart's model when it exists; ConfigError saying how to get one."""
    path = model if model is not None else DEFAULT_MODEL
    if (path / "config.json").is_file():
        return path
    if model is None:
        raise ConfigError(f"no --model given and no quickstart model at {DEFAULT_MODEL}: run `medmllm quickstart` "
                          "(or `medmllm quickstart --smoke` for a toy model in minutes), or pass --model DIR "
                          "(a folder written by MedMLLM.save_pretrained with its tokenizer)")
    raise ConfigError(f"--model: no saved medmllm model at {path} (expected config.json written by "
                      "MedMLLM.save_pretrained, with the tokenizer in the same folder)")


def api_keys(given: Sequence[str] | None, env: str | None = None) -> list[str]:
    """Keys from ``--api-key`` plus ``$MEDMLLM_API_KEYS`` (comma or whitespace separated), de-duplicated."""
    env = os.environ.get(KEYS_ENV, "") if env is None else env
    keys = list(given or []) + [k for k in env.replace(",", " ").split() if k]
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def _media_parts(image: Sequence[Path] | None, volume: Path | None, ecg: Path | None, ehr: Path | None) -> list[dict]:
    parts = [{"type": "image", "path": str(p.resolve())} for p in image or []]
    for kind, p in (("volume", volume), ("signal", ecg), ("ehr", ehr)):
        if p is not None:
            parts.append({"type": kind, "path": str(p.resolve())})
    for part in parts:
        if not Path(part["path"]).exists():
            raise ConfigError(f"{part['type']} file not found: {part['path']}")
    return parts


def stream_answer(model, parts: Sequence[dict], question: str, *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  write: Callable[[str], None] | None = None, history: Sequence[dict] = ()) -> str:
    """Answer ``question`` about local files, writing the text as it is generated; returns the answer.

    ``model``: a started :class:`~medmllm.serve.engine.Engine` or a saved model folder (an engine is
    made and closed here). ``parts``: media parts ``{"type": "image"|"volume"|"signal"|"ehr", "path"}``.
    ``write`` (default: stdout, flushed) receives each piece. ``history``: earlier messages (medmllm
    record messages). Raises ServeError (e.g. an unreadable file: its ``detail`` says why).
    """
    from medmllm.serve.engine import Delta, Done, Engine, SamplingParams

    own = not isinstance(model, Engine)
    engine = Engine.from_pretrained(model).start() if own else model
    write = write or _stdout
    try:
        messages = list(history) + [{"role": "user", "content": list(parts) + [{"type": "text", "text": question}]}]
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        for event in engine.stream(messages, params):
            if isinstance(event, Delta):
                write(event.text)
            elif isinstance(event, Done):
                return event.text
        return ""
    finally:
        if own:
            engine.close()


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ============================================================================= serve

def _configure_access_log(path: Path | None) -> None:
    logger = logging.getLogger("medmllm.serve.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers = [handler]


@app.command("serve")
def serve_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="A saved medmllm model folder (default: the quickstart's)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: Optional[List[str]] = typer.Option(None, "--api-key", help=f"Accepted Bearer key (repeatable; also ${KEYS_ENV}, comma separated)."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests decoded together at most."),
    queue_size: int = typer.Option(64, "--queue-size", min=1, help="Requests waiting at most; more get 429."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0.0, help="How long the first request waits for company."),
    allow_remote_urls: bool = typer.Option(False, "--allow-remote-urls", help="Fetch http(s) image URLs (off: data URLs only)."),
    cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="Origin allowed by CORS (repeatable; none: CORS off)."),
    max_body_mb: float = typer.Option(48.0, "--max-body-mb", min=0.001, help="Request body limit (413 above)."),
    max_media: int = typer.Option(8, "--max-media", min=0, help="Images/files per request."),
    access_log: Optional[Path] = typer.Option(None, "--access-log", help="JSON-lines access log file (default: stderr)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="The name clients pass as `model` (default: from the folder)."),
    decode_process: Optional[bool] = typer.Option(None, "--decode-process/--no-decode-process", help="Decode in a child process, prompts prefilled where requests are prepared (no shared interpreter lock). Default: where possible (a CPU model whose KV cache rows can be merged)."),
    prepare_concurrency: int = typer.Option(1, "--prepare-concurrency", min=1, help="Requests loaded, encoded and prefilled at the same time (1: one after another, fastest on few cores)."),
) -> None:
    """Serve a model over an OpenAI-compatible API (POST /v1/chat/completions), with a web page at /."""
    import dataclasses

    import uvicorn

    from medmllm.serve.app import ServeLimits, create_app
    from medmllm.serve.engine import Engine
    from medmllm.serve.errors import ServeError
    from medmllm.serve.inputs import InputLimits

    keys = api_keys(api_key)
    try:
        path = resolve_model(model)
        if threads:
            import torch

            torch.set_num_threads(threads)
        extra = {"model_id": model_id} if model_id else {}
        engine = Engine.from_pretrained(path, max_batch=max_batch, queue_size=queue_size,
                                        batch_window_ms=batch_window_ms,
                                        decode_process="auto" if decode_process is None else decode_process,
                                        prepare_concurrency=prepare_concurrency, **extra)
    except (MedmllmError, ServeError) as exc:
        _fail(str(exc))
    inputs = dataclasses.replace(InputLimits(), allow_remote_urls=allow_remote_urls, max_media=max_media)
    limits = ServeLimits(max_body_bytes=int(max_body_mb * (1 << 20)), inputs=inputs)
    server_app = create_app(engine, api_keys=keys, cors_origins=cors_origin or (), limits=limits,
                            close_engine_on_shutdown=True)
    _configure_access_log(access_log)
    if not keys and host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: listening on {host} without an API key; anyone who reaches it can use the model",
                    fg=typer.colors.YELLOW, err=True)
    typer.echo(f"medmllm: serving {engine.model_id} ({', '.join(engine.modalities)}) on http://{host}:{port}  "
               f"(web page at /, API at /v1, {'API key required' if keys else 'no API key'})", err=True)
    uvicorn.run(server_app, host=host, port=port, access_log=False, log_level="warning")


# ============================================================================= chat

_HELP = ("commands: /image PATH, /volume PATH, /ecg PATH, /ehr PATH attach a file to the next question; "
         "/reset starts over; /quit leaves")


@app.command("chat")
def chat_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help="A saved medmllm model folder (default: the quickstart's)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="DICOM/PNG/JPEG/TIFF (repeatable)."),
    volume: Optional[Path] = typer.Option(None, "--volume", help="NIfTI file or DICOM series folder."),
    ecg: Optional[Path] = typer.Option(None, "--ecg", help="WFDB .hea or signal CSV."),
    ehr: Optional[Path] = typer.Option(None, "--ehr", help="EHR JSON/CSV or FHIR Bundle."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0, help="0: greedy."),
    seed: Optional[int] = typer.Option(None, "--seed"),
) -> None:
    """Multi-turn chat in the terminal; the files given are attached to the first question."""
    from medmllm.serve.engine import Engine
    from medmllm.serve.errors import ServeError

    try:
        engine = Engine.from_pretrained(resolve_model(model)).start()
        pending = _media_parts(image, volume, ecg, ehr)
    except MedmllmError as exc:
        _fail(str(exc))
    typer.echo(f"medmllm chat with {engine.model_id} (takes {', '.join(engine.modalities)}). {_HELP}")
    history: list[dict] = []
    try:
        while True:
            line = _read_line("you> ")
            if line is None or line.strip() in ("/quit", "/exit"):
                break
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                history, pending = [], []
                typer.echo("(conversation cleared)")
            elif line == "/help":
                typer.echo(_HELP)
            elif line.split(" ", 1)[0] in FILE_COMMANDS:
                pending = _attach(line, pending)
            elif line.startswith("/"):
                typer.echo(f"unknown command {line.split()[0]!r}; {_HELP}")
            else:
                history, pending = _turn(engine, history, pending, line, max_new_tokens, temperature, seed,
                                         ServeError)
    finally:
        engine.close()


def _read_line(prompt: str) -> str | None:
    typer.echo(prompt, nl=False)
    line = sys.stdin.readline()
    return None if line == "" else line


def _attach(line: str, pending: list[dict]) -> list[dict]:
    command, _, arg = line.partition(" ")
    path = Path(arg.strip()).expanduser()
    if not arg.strip() or not path.exists():
        typer.echo(f"no such file: {arg.strip() or '(none given)'}")
        return pending
    typer.echo(f"(attached {path.name} as {FILE_COMMANDS[command]} to the next question)")
    return pending + [{"type": FILE_COMMANDS[command], "path": str(path.resolve())}]


def _turn(engine, history, pending, question, max_new_tokens, temperature, seed, ServeError):
    """One question: stream the answer; returns the new (history, pending)."""
    typer.echo("model> ", nl=False)
    try:
        answer = stream_answer(engine, pending, question, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed, write=lambda t: typer.echo(t, nl=False), history=history)
    except ServeError as exc:
        typer.echo("")
        typer.secho(f"error: {exc.message}" + (f" ({exc.detail})" if exc.detail else ""), fg=typer.colors.RED,
                    err=True)
        if pending:
            typer.echo("(the attached files were dropped; attach them again if needed)")
        return history, []
    typer.echo("")
    user = {"role": "user", "content": list(pending) + [{"type": "text", "text": question}]}
    return history + [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], []


def main() -> None:  # pragma: no cover - `python -m medmllm.serve.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["DEFAULT_MODEL", "api_keys", "app", "chat_cmd", "resolve_model", "serve_cmd", "stream_answer"]
