"""The `medmllm` command. Each sub-command is thin: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from medmllm.errors import MedmllmError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="medmllm: medical multimodal LLMs — data, models, training, evaluation, serving.")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main() -> None:
    """medmllm command line."""


@app.command("read")
def read_cmd(
    path: Path = typer.Argument(..., help="A DICOM/NIfTI/PNG/JPEG/TIFF/WFDB/CSV/JSON file or a DICOM series folder."),
    reader: Optional[str] = typer.Option(None, help="Force a reader by name (default: detect from content)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Read a medical file the way the models will see it and print its shape and metadata."""
    import numpy as np

    from medmllm.data.readers import read

    try:
        arr, meta = read(path, reader=reader)
    except MedmllmError as exc:
        _fail(exc)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    summary = {"shape": list(arr.shape), "dtype": str(arr.dtype),
               "min": float(finite.min()) if finite.size else None,
               "max": float(finite.max()) if finite.size else None}
    if as_json:
        typer.echo(json.dumps({**summary, "meta": meta}, indent=2, default=str))
        return
    typer.echo(f"{meta['path']}: {meta['format']} {meta['kind']} shape={tuple(arr.shape)} dtype={arr.dtype} "
               f"range=[{summary['min']}, {summary['max']}]")
    for key, value in meta.items():
        if key in ("path", "format", "kind", "affine"):
            continue
        text = json.dumps(value, default=str)
        typer.echo(f"  {key}: {text if len(text) < 120 else text[:117] + '...'}")


@app.command("convert")
def convert_cmd(
    name: str = typer.Argument(..., help="Dataset converter: vqa_rad, slake, pathvqa, pmc_vqa, mimic_cxr, iu_xray."),
    src: Path = typer.Option(..., "--src", help="Folder holding the dataset's official files."),
    out: Path = typer.Option(..., "--out", help="Output JSONL; a split manifest is written next to it."),
    splits: Optional[List[str]] = typer.Option(None, "--split", help="Only these splits/source files (repeatable)."),
    limit: Optional[int] = typer.Option(None, help="Convert at most this many items (for a quick look)."),
    hash_files: bool = typer.Option(True, "--hash-files/--no-hash-files",
                                    help="Include image bytes in the manifest hashes (slow for very large datasets)."),
    lang: Optional[str] = typer.Option(None, help="SLAKE only: en, zh or both."),
    section: Optional[str] = typer.Option(None, help="MIMIC-CXR only: findings, impression or both."),
) -> None:
    """Convert a public medical dataset's local files to medmllm's instruction format."""
    from medmllm.data.converters import convert

    try:
        options = {k: v for k, v in (("lang", lang), ("section", section)) if v is not None}
        report = convert(name, src, out, splits=splits, limit=limit, hash_files=hash_files, **options)
    except MedmllmError as exc:
        _fail(exc)
    typer.echo(str(report))


@app.command("phantoms")
def phantoms_cmd(
    out: Path = typer.Option(Path("data/medphantom"), "--out", help="Output folder."),
    n: int = typer.Option(2000, "--n", min=1, help="Number of cases (patients)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, byte-identical output."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: up to 2)."),
    gallery: bool = typer.Option(True, "--gallery/--no-gallery", help="Draw gallery.png with example cases."),
) -> None:
    """Generate MedPhantom: a seeded synthetic medical dataset with exact ground truth."""
    from medmllm.data.phantoms.build import build_phantoms

    try:
        summary = build_phantoms(out, n, seed=seed, workers=workers)
    except MedmllmError as exc:
        _fail(exc)
    mods = ", ".join(f"{k} {v}" for k, v in summary.get("modalities", {}).items())
    splits = ", ".join(f"{k} {v}" for k, v in summary.get("splits", {}).items())
    typer.echo(f"MedPhantom: {summary.get('n')} cases (seed {summary.get('seed')}) in {summary.get('seconds', 0):.1f} s -> {out}")
    typer.echo(f"  cases:   {mods} (+{summary.get('counterfactual_pairs', 0)} counterfactual twins)")
    typer.echo(f"  records: {splits}; alignment {summary.get('alignment', 0)}  -> {out / 'records'}")
    typer.echo(f"  datasheet: {out / 'DATASHEET.md'}   summary: {out / 'summary.json'}")
    if gallery:
        from medmllm.data.phantoms.gallery import write_gallery

        try:
            typer.echo(f"  gallery: {write_gallery(out)}")
        except Exception as exc:  # a picture must never fail a finished build
            typer.secho(f"  gallery not drawn: {type(exc).__name__}: {exc}", fg=typer.colors.YELLOW, err=True)
    failed = summary.get("failed") or []
    if failed:
        typer.secho(f"  {len(failed)} case(s) failed and were skipped (listed in summary.json); first: {failed[0]}",
                    fg=typer.colors.YELLOW, err=True)

if __name__ == "__main__":
    app()
