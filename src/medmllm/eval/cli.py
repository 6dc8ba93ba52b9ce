"""`medmllm eval`: evaluate a model on benchmark tasks, and `medmllm eval compare` runs side by side.

    medmllm eval --model runs/quickstart/instruct/model --task medphantom_xray --out runs/eval
    medmllm eval --endpoint http://localhost:8000/v1 --model my-served-model --task vqa_rad --out runs/eval-vllm
    medmllm eval compare runs/eval runs/eval-vllm --out runs/compare

The main CLI attaches :data:`eval_app` with ``app.add_typer(eval_app, name="eval")``. The callback
runs the evaluation when no sub-command is given (``invoke_without_command``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medmllm.errors import ConfigError, MedmllmError

eval_app = typer.Typer(add_completion=False, help="Evaluate models on benchmark tasks with named scoring protocols, "
                                                  "blind baselines and trust suites; compare runs.")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _list_everything() -> None:
    from medmllm.eval.protocols import PROTOCOLS
    from medmllm.eval.tasks import TASKS

    typer.echo("tasks:")
    for name in TASKS.names():
        spec = TASKS.get(name)
        typer.echo(f"  {name:22s} v{spec.version}  {spec.description.strip()[:90]}")
    typer.echo("protocols:")
    for name in PROTOCOLS.names():
        typer.echo(f"  {name:22s} v{PROTOCOLS.get(name).version}")
    try:
        from medmllm.eval.trust import SUITES
    except ImportError:
        return
    typer.echo("trust suites:")
    for name in SUITES.names():
        typer.echo(f"  {name:22s} v{SUITES.get(name).version}")


def make_backend(model: str, endpoint: Optional[str], api_key: Optional[str], batch_size: int, concurrency: int,
                 retries: int, timeout: float, device: Optional[str]):
    """An OpenAIBackend when ``endpoint`` is given, else an InProcessBackend of the model folder."""
    from medmllm.eval.backends import InProcessBackend, OpenAIBackend

    if endpoint:
        return OpenAIBackend(endpoint, model, api_key=api_key, concurrency=concurrency, retries=retries,
                             timeout=timeout)
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {model}: expected a model folder written by save_pretrained (config.json + "
                          f"tokenizer; e.g. runs/quickstart/instruct/model after `medmllm quickstart`), or pass "
                          f"--endpoint URL to evaluate a served model by name")
    return InProcessBackend(folder, batch_size=batch_size, device=device)


@eval_app.callback(invoke_without_command=True)
def eval_main(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Saved model folder; with --endpoint, the served "
                                                              "model name."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="Task name (see --list) or a task YAML path; "
                                                                  "repeatable."),
    protocol: Optional[List[str]] = typer.Option(None, "--protocol", help="Score with these protocols instead of "
                                                                          "each task's own; repeatable."),
    trust: Optional[List[str]] = typer.Option(None, "--trust", help="Trust suite to run on each task; repeatable."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL, e.g. "
                                                                    "http://localhost:8000/v1."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MEDMLLM_API_KEY", show_default=False,
                                          help="API key for --endpoint (or env MEDMLLM_API_KEY); never written "
                                               "to the results."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many records per task."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (predictions, results, report)."),
    data_root: Path = typer.Option(Path("data"), "--data-root", help="Folder the task data paths are relative to."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="In-process batch size."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight (--endpoint)."),
    retries: int = typer.Option(3, "--retries", min=0, help="Retries on 429/5xx/connection errors (--endpoint)."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per request (--endpoint)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise baseline and of trust-suite probes."),
    self_consistency: int = typer.Option(1, "--self-consistency", min=1,
                                         help="Answer by majority over this many sampled answers (1: off)."),
    sc_temperature: float = typer.Option(0.7, "--sc-temperature", help="Sampling temperature of --self-consistency."),
    blind: bool = typer.Option(True, "--blind/--no-blind", help="Blank/noise-input baseline (in-process only)."),
    manifest_check: bool = typer.Option(True, "--manifest-check/--no-manifest-check",
                                        help="Check the records against their split manifest."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    list_: bool = typer.Option(False, "--list", help="List tasks, protocols and trust suites, then exit."),
) -> None:
    """Evaluate a model (in process, or served behind --endpoint) on tasks; write predictions,
    results.json per task and a report (report.md, report.html) in --out."""
    if ctx.invoked_subcommand is not None:
        return
    if list_:
        _list_everything()
        return
    if not task and model is None and out is None:
        typer.echo(ctx.get_help())
        return
    try:
        missing = [o for o, v in (("--model", model), ("--task", task), ("--out", out)) if not v]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)}: usage: medmllm eval --model M --task T --out DIR")
        from medmllm.eval.report import write_report
        from medmllm.eval.runner import headline, resolve_protocols, resolve_tasks, resolve_trust, run_eval

        specs = resolve_tasks(task)              # names checked before a model is loaded
        resolve_protocols(protocol or None)
        resolve_trust(trust or [])
        backend = make_backend(model, endpoint, api_key, batch_size, concurrency, retries, timeout, device)
        if self_consistency > 1:
            from medmllm.eval.self_consistency import SelfConsistency

            backend = SelfConsistency(backend, self_consistency, temperature=sc_temperature)
        res = run_eval(backend, specs, out, protocols=protocol or None, data_root=data_root, limit=limit,
                       trust=trust or [], seed=seed, progress=progress, blind=blind, manifest_check=manifest_check)
        report = write_report(out)
    except MedmllmError as exc:
        _fail(exc)
    for name, r in res["tasks"].items():
        figures = headline(r)
        shown = ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:+.1f}' if 'drop' in k else f'{v:.3f}'}"
                          for k, v in figures.items())
        typer.echo(f"{name} (n={r['counts']['n']}): {shown}")
    typer.echo(f"results: {out}/<task>/results.json")
    typer.echo(f"report:  {report}  ({out / 'report.html'})")


@eval_app.command("compare")
def compare_cmd(
    dirs: List[Path] = typer.Argument(..., help="Output folders of `medmllm eval`."),
    out: Path = typer.Option(..., "--out", help="Folder for compare.md, compare.png and compare.json."),
) -> None:
    """Put several evaluation runs side by side (table + plot)."""
    from medmllm.eval.report import compare

    try:
        path = compare(dirs, out)
    except MedmllmError as exc:
        _fail(exc)
    typer.echo(f"comparison: {path}")


__all__ = ["eval_app", "make_backend"]
