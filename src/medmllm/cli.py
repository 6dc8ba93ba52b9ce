"""The `medmllm` command. Each sub-command is thin: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from medmllm.errors import ConfigError, MedmllmError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="medmllm: medical multimodal LLMs — data, models, training, evaluation, serving.")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main() -> None:
    """medmllm command line."""


from medmllm.eval.cli import eval_app  # noqa: E402  (a typer sub-app; its heavy imports are lazy)

app.add_typer(eval_app, name="eval")

from medmllm.serve import cli as serve_cli  # noqa: E402  (adds `serve` and `chat`)

app.add_typer(serve_cli.app)


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
    name: str = typer.Argument(..., help="Dataset converter: vqa_rad, slake, pathvqa, pmc_vqa, mimic_cxr, iu_xray, "
                                         "omnimedvqa, medxpertqa_mm, gmai_mmbench, mediconfusion."),
    src: Path = typer.Option(..., "--src", help="Folder holding the dataset's official files."),
    out: Path = typer.Option(..., "--out", help="Output JSONL; a split manifest is written next to it."),
    splits: Optional[List[str]] = typer.Option(None, "--split", help="Only these splits/source files (repeatable)."),
    limit: Optional[int] = typer.Option(None, help="Convert at most this many items (for a quick look)."),
    hash_files: bool = typer.Option(True, "--hash-files/--no-hash-files",
                                    help="Include image bytes in the manifest hashes (slow for very large datasets)."),
    lang: Optional[str] = typer.Option(None, help="SLAKE only: en, zh or both."),
    section: Optional[str] = typer.Option(None, help="MIMIC-CXR only: findings, impression or both."),
    access: Optional[str] = typer.Option(None, help="OmniMedVQA only: open, restricted or both."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir",
                                             help="GMAI-MMBench only: where to write the images decoded from the TSV."),
) -> None:
    """Convert a public medical dataset's local files to medmllm's instruction format."""
    from medmllm.data.converters import convert

    try:
        options = {k: v for k, v in (("lang", lang), ("section", section), ("access", access),
                                     ("image_dir", image_dir)) if v is not None}
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
    modalities: Optional[list[str]] = typer.Option(
        None, "--modalities", help="Only these modalities (repeat the option), e.g. --modalities ct3d."),
) -> None:
    """Generate MedPhantom: a seeded synthetic medical dataset with exact ground truth."""
    from medmllm.data.phantoms.build import build_phantoms

    try:
        summary = build_phantoms(out, n, seed=seed, workers=workers, modalities=modalities or None)
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

@app.command("train")
def train_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML (stage: encoder | alignment | instruction | dpo | grpo | distill)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=500"),
) -> None:
    """Run one training stage from a recipe YAML with key=value overrides."""
    from medmllm.config import load_config, read_yaml

    try:
        raw = read_yaml(recipe)
        stage = raw.get("stage") if isinstance(raw, dict) else None
        for ov in overrides or []:
            if ov.startswith("stage="):
                stage = ov.split("=", 1)[1]
        if stage in ("alignment", "instruction"):
            from medmllm.train.sft import SFTConfig, run

            summary = run(load_config(recipe, overrides or [], schema=SFTConfig))
        elif stage == "encoder":
            from medmllm.train.encoder_stage import run_from_config

            summary = run_from_config(recipe, overrides or [])
        elif stage == "dpo":
            from medmllm.train.dpo import DPOConfig, run as run_dpo

            summary = run_dpo(load_config(recipe, overrides or [], schema=DPOConfig))
        elif stage == "grpo":
            from medmllm.train.grpo import GRPOConfig, run as run_grpo

            summary = run_grpo(load_config(recipe, overrides or [], schema=GRPOConfig))
        elif stage == "distill":
            from medmllm.train.distill import DistillConfig, run as run_distill

            summary = run_distill(load_config(recipe, overrides or [], schema=DistillConfig))
        else:
            raise ConfigError(f"{recipe}: stage: expected alignment, instruction, encoder, dpo, grpo or distill, "
                              f"got {stage!r}")
    except MedmllmError as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("quickstart")
def quickstart_cmd(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where data, models and the report go."),
    smoke: bool = typer.Option(False, "--smoke", help="The same path at toy size (about 3 minutes)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate MedPhantom, train encoder -> alignment -> instruction stages of the small model,
    evaluate on held-out data with blank/noise ablations, write a report, and answer one question."""
    import logging

    from medmllm.quickstart import quickstart

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = quickstart(out, smoke=smoke, seed=seed)
    except MedmllmError as exc:
        _fail(exc)
    h, a = res["headline"], res["ablation_check"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    typer.echo("")
    typer.echo(f"medmllm quickstart finished in {res['seconds']['total'] / 60:.1f} min")
    for k, v in h.items():
        typer.echo(f"  {k.replace('_', ' '):24s} {pct(v['accuracy']):>7s}  (n={v['n']})")
    typer.echo(f"  closed, real input {pct(a['closed_real'])} | blank {pct(a['closed_blank'])} | noise "
               f"{pct(a['closed_noise'])} | text-only prior {pct(a['closed_text_only_prior'])}")
    typer.echo(f"report:  {res['report']}")
    typer.echo(f"results: {out / 'results.json'}")
    ex = res["ask_example"]
    typer.echo(f"\nTry it:  {ex['command']}")
    typer.echo(f"  -> {ex['answer']!r} (ground truth: {ex['ground_truth']!r})")


@app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="Your question."),
    model: Optional[Path] = typer.Option(None, "--model", help="A saved medmllm model folder (default: the quickstart's)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="DICOM/PNG/JPEG/TIFF (repeatable)."),
    volume: Optional[Path] = typer.Option(None, "--volume", help="NIfTI file or DICOM series folder."),
    ecg: Optional[Path] = typer.Option(None, "--ecg", help="WFDB .hea or signal CSV."),
    ehr: Optional[Path] = typer.Option(None, "--ehr", help="EHR JSON/CSV or FHIR Bundle."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    stream: bool = typer.Option(False, "--stream", help="Print the answer token by token as it is generated."),
) -> None:
    """Ask a question about your own files with a trained medmllm model."""
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.eval.inprocess import predict
    from medmllm.model.mllm import MedMLLM

    model = model or Path("runs/quickstart/instruct/model")
    if not (model / "config.json").exists():
        _fail(ConfigError(f"--model: no trained model at {model}; run `medmllm quickstart` first or pass --model DIR"))
    parts = [{"type": "image", "path": str(p.resolve())} for p in image or []]
    for kind, p in (("volume", volume), ("signal", ecg), ("ehr", ehr)):
        if p is not None:
            parts.append({"type": kind, "path": str(p.resolve())})
    if stream:
        from medmllm.serve.errors import ServeError

        try:
            serve_cli.stream_answer(model, parts, question, max_new_tokens=max_new_tokens,
                                    write=lambda t: typer.echo(t, nl=False))
        except (ServeError, MedmllmError) as exc:
            _fail(ConfigError(getattr(exc, "detail", None) or str(exc)))
        typer.echo("")
        return
    rec = {"id": "ask", "stage": "instruction", "meta": {"dataset": "user", "split": "test"},
           "messages": [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]}
    try:
        m, tok = MedMLLM.from_pretrained(model), load_tokenizer(model)
        missing = sorted({p["type"] for p in parts} - set(m.encoders))
        if missing:
            raise ConfigError(f"--model {model} has no encoder for {missing}; it takes {sorted(m.encoders)}")
        answer = predict(m, tok, [rec], ".", max_new_tokens=max_new_tokens, progress=False)[0]
    except MedmllmError as exc:
        _fail(exc)
    if answer is None:
        _fail(ConfigError("the input files could not be read (see the warning above)"))
    typer.echo(answer)


def _load_medmllm(model_dir: Path):
    """A saved MedMLLM (eval mode) and the tokenizer saved in the same folder."""
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.errors import InputError
    from medmllm.model.mllm import MedMLLM

    if not (model_dir / "config.json").is_file():
        raise InputError(model_dir, "expected a folder written by MedMLLM.save_pretrained (with config.json), "
                                    "found none")
    return MedMLLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)


@app.command("export")
def export_cmd(
    model_dir: Path = typer.Argument(..., help="A saved MedMLLM (save_pretrained) with its tokenizer in the same folder."),
    to: str = typer.Option("hf-llava", "--to", help="Target layout: hf-llava (LlavaForConditionalGeneration)."),
    out: Path = typer.Option(..., "--out", help="Output folder (absent or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
) -> None:
    """Export a composed model to the Hugging Face Llava layout (what vLLM / SGLang serve)."""
    try:
        if to != "hf-llava":
            raise ConfigError(f"--to: expected 'hf-llava', got {to!r}")
        from medmllm.model.export import export_hf_llava

        model, tokenizer = _load_medmllm(model_dir)
        path = export_hf_llava(model, tokenizer, out, overwrite=overwrite)
    except MedmllmError as exc:
        _fail(exc)
    cfg = json.loads((path / "config.json").read_text())
    typer.echo(f"exported {model_dir} -> {path}: LlavaForConditionalGeneration ({cfg['vision_config']['model_type']} "
               f"+ {cfg['text_config']['model_type']}, {cfg['image_seq_length']} image tokens, "
               f"vision_feature_select_strategy={cfg['vision_feature_select_strategy']})")


@app.command("inspect")
def inspect_cmd(
    model_dir: Path = typer.Argument(..., help="A saved MedMLLM (save_pretrained) with its tokenizer in the same folder."),
    question: str = typer.Option(..., "--question", help="The question asked with the files."),
    image: Optional[Path] = typer.Option(None, "--image", help="DICOM/PNG/JPEG/TIFF."),
    volume: Optional[Path] = typer.Option(None, "--volume", help="NIfTI file or DICOM series folder."),
    ecg: Optional[Path] = typer.Option(None, "--ecg", help="WFDB .hea or signal CSV."),
    ehr: Optional[Path] = typer.Option(None, "--ehr", help="EHR JSON/CSV or FHIR Bundle."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the flow as a PNG here."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Also write the flow as JSON here."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image side for a CNN encoder (a HF tower fixes it)."),
    volume_shape: Optional[str] = typer.Option(None, "--volume-shape", help="D,H,W the volume is resized to."),
    signal_samples: Optional[int] = typer.Option(None, "--signal-samples", help="ECG samples after resampling."),
    signal_fs: Optional[float] = typer.Option(None, "--signal-fs", help="ECG sampling rate (Hz) fed to the encoder."),
) -> None:
    """Follow the feature vectors of your files through encoders -> projectors -> LLM.

    Files are loaded with the shapes the model's encoders fix (image channels, a HF tower's image size,
    ECG leads, EHR features: medmllm.model.inspect.modality_shapes_for); the free ones take
    ModalityShapes' defaults unless given here (use the values the model was trained with).
    """
    from medmllm.data.collate import MultimodalCollator
    from medmllm.data.dataset import PartLoader, RecordDataset
    from medmllm.data.records import make_record, media
    from medmllm.model.inspect import format_flow, inspect_flow, modality_shapes_for, plot_flow

    try:
        parts = [media(kind, str(p.resolve())) for kind, p in
                 (("image", image), ("volume", volume), ("signal", ecg), ("ehr", ehr)) if p is not None]
        if not parts:
            raise ConfigError("give at least one of --image, --volume, --ecg, --ehr")
        model, tokenizer = _load_medmllm(model_dir)
        missing = sorted({p["type"] for p in parts} - set(model.encoders))
        if missing:
            raise ConfigError(f"{model_dir} has no encoder for {missing}; it takes {sorted(model.encoders)}")
        shape = None
        if volume_shape:
            try:
                shape = tuple(int(s) for s in volume_shape.split(","))
            except ValueError:
                raise ConfigError(f"--volume-shape: expected D,H,W integers, got {volume_shape!r}") from None
        shapes = modality_shapes_for(model, image_size=image_size, volume_shape=shape,
                                     signal_samples=signal_samples, signal_fs=signal_fs)
        rec = make_record("inspect", parts + [question], None, {"dataset": "user", "split": "test"})
        ds = RecordDataset([rec], PartLoader(shapes), base_dir=".")
        example = ds[0]
        if example is None:
            raise ConfigError(f"the input files could not be read: {ds.errors[0]}")
        collator = MultimodalCollator(tokenizer, 1 << 20, model.num_tokens, train=False)
        flow = inspect_flow(model, collator([example]), tokenizer, max_new_tokens=max_new_tokens)
        if plot is not None:
            plot_flow(flow, plot)
        if as_json is not None:
            from medmllm.io import write_json

            write_json(as_json, flow)
    except MedmllmError as exc:
        _fail(exc)
    typer.echo(format_flow(flow))
    if plot is not None:
        typer.echo(f"\nplot: {plot}")


if __name__ == "__main__":
    app()
