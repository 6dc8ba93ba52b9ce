"""The `medmllm` command. Each sub-command is thin: parse, call the library, print."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="medmllm: medical multimodal LLMs — data, models, training, evaluation, serving.")


@app.callback()
def _main() -> None:
    """medmllm command line."""


if __name__ == "__main__":
    app()
