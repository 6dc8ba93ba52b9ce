"""Evaluation reports: ``write_report(run_dir)`` and ``compare(run_dirs, out)``.

``write_report`` reads every ``RUN/<task>/results.json`` written by :func:`medmllm.eval.runner.run_eval`
and writes ``RUN/report.md`` (plots as ``RUN/plots/*.png``) and ``RUN/report.html`` (one
self-contained file: the same plots embedded as base64 PNG). Plots: scores per task under each
protocol/metric, real vs blank vs noise input (the blind baseline), confusion matrices of the
closed questions, per-modality scores and trust-suite figures, each drawn when the results hold
the numbers.

``compare`` puts several runs side by side: ``OUT/compare.md`` (a table: one row per task and
protocol/metric, one column per run, model ids on top), ``OUT/compare.png`` and
``OUT/compare.json``. A folder holding no results fails with an InputError naming it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from medmllm.errors import InputError
from medmllm.io import write_bytes, write_json, write_text


# ============================================================================= reading

def load_results(run_dir: str | os.PathLike) -> dict[str, dict]:
    """``{task: results}`` from ``RUN/<task>/results.json`` (sorted by task); InputError when none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "expected an evaluation output folder (medmllm eval --out DIR), found no folder")
    out = {}
    for path in sorted(run_dir.glob("*/results.json")):
        try:
            res = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(path, f"expected a results JSON, got invalid JSON ({exc.msg})") from None
        name = (res.get("task") or {}).get("name") or path.parent.name
        out[name] = res
    if not out:
        raise InputError(run_dir, "holds no results: expected <dir>/<task>/results.json written by `medmllm eval`")
    return out


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{100 * x:.1f}" if pct else f"{x:.4g}"
    return str(x)


def _drop(x: Any) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


# ============================================================================= blocks -> md / html

class Doc:
    """A tiny document model rendered both as Markdown and as self-contained HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []
        self.images: dict[str, bytes] = {}

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[Any]]):
        if rows:
            self.blocks.append(("table", header, [[str(c) for c in r] for r in rows]))

    def img(self, name: str, png: bytes | None, alt: str):
        if png:
            self.images[name] = png
            self.blocks.append(("img", name, alt))

    def markdown(self, img_dir: str) -> str:
        lines: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                lines += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                lines += [b[1], ""]
            elif b[0] == "table":
                esc = lambda c: c.replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines.append("| " + " | ".join(esc(c) for c in b[1]) + " |")
                lines.append("|" + "---|" * len(b[1]))
                lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in b[2]]
                lines.append("")
            elif b[0] == "img":
                lines += [f"![{b[2]}]({img_dir}/{b[1]})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        body: list[str] = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(self.images[b[1]]).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:0.5em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:left;font-size:0.9em}th{background:#f3f3f3}img{max-width:100%}"
                 "figcaption{font-size:0.8em;color:#666}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ============================================================================= plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def _grid(n: int):
    plt = _plt()
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], title: str, ylabel: str = "score"):
    k = max(1, len(series))
    width = 0.8 / k
    top = 1.0
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(groups))]
        ys = [0.0 if v is None else float(v) for v in vals]
        top = max(top, *ys) if ys else top
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 3 else 0, ha="right" if len(groups) > 3
                  else "center", fontsize=8)
    ax.set_ylim(0, top * 1.05)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)


def plot_scores(results: dict[str, dict]) -> bytes | None:
    """One panel per task: its protocols' and metrics' scores."""
    items = [(t, _task_scores(r)) for t, r in results.items()]
    items = [(t, s) for t, s in items if s]
    if not items:
        return None
    fig, axes = _grid(len(items))
    for ax, (task, scores) in zip(axes, items):
        _bars(ax, list(scores), {"score": list(scores.values())}, task)
    return _png(fig)


def _task_scores(res: dict) -> dict[str, float | None]:
    out = {p: b["overall"].get("score") if b.get("n") else None for p, b in (res.get("protocols") or {}).items()}
    out.update({m: b.get("score") for m, b in (res.get("metrics") or {}).items() if "unavailable" not in b})
    return out


def plot_blind(results: dict[str, dict]) -> bytes | None:
    """One panel per task: real vs blank vs noise input under each protocol."""
    items = [(t, r["blind"]["protocols"]) for t, r in results.items()
             if (r.get("blind") or {}).get("status") == "done"]
    if not items:
        return None
    fig, axes = _grid(len(items))
    for ax, (task, rows) in zip(axes, items):
        protos = list(rows)
        _bars(ax, protos, {how: [rows[p].get(how) for p in protos] for how in ("real", "blank", "noise")},
              f"{task}: real vs blank vs noise input")
    return _png(fig)


def plot_confusion(task: str, conf: dict) -> bytes:
    """Counts of (gold, prediction) labels of the closed questions as a heat map."""
    plt = _plt()
    m = conf["matrix"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(conf["labels_pred"]), 1.0 + 0.5 * len(conf["labels_gold"])))
    ax.imshow(m, cmap="Blues")
    peak = max((v for row in m for v in row), default=0)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(len(conf["labels_pred"])), conf["labels_pred"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(conf["labels_gold"])), conf["labels_gold"], fontsize=8)
    ax.set_xlabel("prediction", fontsize=8)
    ax.set_ylabel("gold", fontsize=8)
    ax.set_title(f"{task}: closed questions (n={conf['n']})", fontsize=9)
    return _png(fig)


def plot_modality(results: dict[str, dict]) -> bytes | None:
    """One panel per task: each protocol's score per modality."""
    items = [(t, r["by_modality"]) for t, r in results.items() if r.get("by_modality")]
    items = [(t, bm) for t, bm in items if any(v["scores"] for v in bm.values())]
    if not items:
        return None
    fig, axes = _grid(len(items))
    for ax, (task, bm) in zip(axes, items):
        mods = list(bm)
        protos = list(next(iter(bm.values()))["scores"])
        _bars(ax, [f"{m} (n={bm[m]['n']})" for m in mods], {p: [bm[m]["scores"].get(p) for m in mods] for p in protos},
              f"{task}: by modality")
    return _png(fig)


def _figures(block: dict) -> dict[str, float]:
    figs = block.get("figures") or {}
    return {k: float(v) for k, v in figs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def plot_trust(task: str, trust: dict) -> bytes | None:
    """One horizontal bar panel per trust suite: its figures (rates in [0, 1], drops in points)."""
    items = [(name, _figures(b)) for name, b in trust.items()]
    items = [(n, f) for n, f in items if f]
    if not items:
        return None
    plt = _plt()
    heights = [0.8 + 0.28 * len(f) for _, f in items]
    fig, axes = plt.subplots(len(items), 1, figsize=(7.5, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, figs) in zip(axes[:, 0], items):
        labels, values = list(figs), list(figs.values())
        ax.barh(range(len(labels)), values, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        lo, hi = min(0.0, *values), max(1.0, *values)
        ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(f"{task}: {name}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


# ============================================================================= report

def _model_line(res: dict) -> str:
    m = res.get("model") or {}
    rev = m.get("weights_sha256") or m.get("config_sha256") or m.get("served_model") or ""
    return f"{m.get('backend', '?')}: {m.get('model_id', '?')}" + (f" (revision {rev[:12]})" if rev else "")


def _task_section(doc: Doc, task: str, res: dict) -> None:
    t, data = res.get("task", {}), res.get("data", {})
    doc.h(2, f"{task} (v{t.get('version', '?')})")
    if t.get("description"):
        doc.p(t["description"])
    man = data.get("manifest") or {}
    gen = res.get("generation") or {}
    doc.table(["item", "value"], [
        ["records", f"{data.get('records')} (split {t.get('split')}, {res.get('counts', {}).get('n')} evaluated"
                    + (f", limit {data['limit']}" if data.get("limit") else "") + ")"],
        ["split manifest", f"{man.get('status')}" + (f", hash {man['hash']}" if man.get("hash") else "")],
        ["model", _model_line(res)],
        ["generation", ", ".join(f"{k}={v}" for k, v in gen.items())],
        ["prompt", repr((t.get("prompt") or {}).get("template"))],
        ["answers missing (unreadable input)", (data.get("counts") or {}).get("predictions_none", 0)],
    ])
    blind = (res.get("blind") or {})
    rows = []
    for name, b in (res.get("protocols") or {}).items():
        br = (blind.get("protocols") or {}).get(name, {})
        rows.append([f"{name} v{b.get('version')}", _fmt(b["overall"].get("score") if b.get("n") else None, True),
                     b.get("n"), _fmt(br.get("blank"), True), _drop(br.get("drop_blank")),
                     _fmt(br.get("noise"), True), _drop(br.get("drop_noise"))])
    if rows:
        doc.h(3, "Scores by protocol (%)")
        doc.table(["protocol", "score", "n", "blank input", "drop", "noise input", "drop"], rows)
        if blind.get("status") != "done":
            doc.p(f"Blind baseline: {blind.get('status')}" + (f" ({blind['reason']})" if blind.get("reason") else ""))
        types = sorted({at for b in res["protocols"].values() for at in b.get("by_answer_type", {})})
        doc.table(["protocol"] + [f"{at} (%)" for at in types],
                  [[n] + [_fmt(b["by_answer_type"].get(at, {}).get("score"), True) for at in types]
                   for n, b in res["protocols"].items()])
        for name, b in res["protocols"].items():
            doc.p(f"{name} v{b.get('version')}: {b.get('description', '')}")
    metrics = res.get("metrics") or {}
    if metrics:
        doc.h(3, "Report metrics")
        doc.table(["metric", "score", "details"],
                  [[m, _fmt(b.get("score")), b.get("unavailable") or ", ".join(
                      f"{k}={_fmt(v)}" for k, v in b.items() if k not in ("score", "optional", "n"))]
                   for m, b in metrics.items()])
    bm = res.get("by_modality") or {}
    if bm and any(v["scores"] for v in bm.values()):
        protos = list(next(iter(bm.values()))["scores"])
        doc.h(3, "By modality (%)")
        doc.table(["modality", "n"] + protos, [[m, v["n"]] + [_fmt(v["scores"].get(p), True) for p in protos]
                                               for m, v in bm.items()])
    conf = (res.get("confusion") or {}).get("closed")
    if conf:
        doc.h(3, "Closed questions: confusion matrix (rows gold, columns prediction; exact-normalised)")
        doc.table(["gold \\ prediction"] + conf["labels_pred"],
                  [[g] + row for g, row in zip(conf["labels_gold"], conf["matrix"])])
        doc.img(f"confusion_{task}.png", plot_confusion(task, conf), f"{task}: confusion matrix of closed questions")
    trust = res.get("trust") or {}
    if trust:
        doc.h(3, "Trust suites")
        doc.table(["suite", "version", "probes", "figures"],
                  [[n, b.get("version"), b.get("n_probes"),
                    ", ".join(f"{k}={_fmt(v)}" for k, v in (b.get("figures") or {}).items()) or b.get("status", "")]
                   for n, b in trust.items()])
        doc.img(f"trust_{task}.png", plot_trust(task, trust), f"{task}: trust-suite figures")


def build_report(results: dict[str, dict]) -> Doc:
    """The report document of one run (see the module doc)."""
    doc = Doc()
    first = next(iter(results.values()))
    prov = first.get("provenance") or {}
    doc.h(1, "medmllm evaluation report")
    doc.p(f"Model: {_model_line(first)}. medmllm {prov.get('medmllm_version')}, created "
          f"{prov.get('created_at')}, seed {prov.get('seed')}. Every score names its protocol and version; "
          "'drop' is the real-input score minus the score with blank (or noise) inputs, in points.")
    summary = []
    for task, res in results.items():
        blind = (res.get("blind") or {}).get("protocols") or {}
        for name, score in _task_scores(res).items():
            b = blind.get(name, {})
            summary.append([task, name, _fmt(score, name in (res.get("protocols") or {})),
                            _drop(b.get("drop_blank")), _drop(b.get("drop_noise"))])
    doc.h(2, "Summary")
    doc.table(["task", "protocol / metric", "score", "drop (blank)", "drop (noise)"], summary)
    doc.img("scores.png", plot_scores(results), "scores per task")
    doc.img("blind.png", plot_blind(results), "real vs blank vs noise input")
    doc.img("modality.png", plot_modality(results), "scores by modality")
    for task, res in results.items():
        _task_section(doc, task, res)
    return doc


def write_report(out_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` (+ ``plots/``) and a self-contained ``report.html`` in ``out_dir``;
    returns the markdown path."""
    out = Path(out_dir)
    doc = build_report(load_results(out))
    for name, png in doc.images.items():
        write_bytes(out / "plots" / name, png)
    md = out / "report.md"
    write_text(md, doc.markdown("plots"))
    write_text(out / "report.html", doc.html("medmllm evaluation report"))
    return md


# ============================================================================= compare

def _labels(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name or str(d) for d in dirs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def compare(dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Side-by-side table (+ plot) of several run folders; returns ``OUT/compare.md``."""
    from medmllm.eval.runner import headline

    dirs = [Path(d) for d in dirs]
    if len(dirs) < 1:
        raise InputError("dirs", "expected at least one run folder to compare")
    runs = [load_results(d) for d in dirs]  # InputError naming a folder without results
    labels = _labels(dirs)
    keys: list[tuple[str, str]] = []
    for res in runs:
        for task, r in res.items():
            keys += [(task, k) for k in headline(r) if (task, k) not in keys]
    keys.sort(key=lambda k: (k[0], "drop" in k[1], k[1]))
    table = {f"{t} / {k}": [headline(res[t]).get(k) if t in res else None for res in runs] for t, k in keys}
    doc = Doc()
    doc.h(1, "medmllm evaluation: runs side by side")
    doc.table(["run", "folder", "model"], [[lab, str(d), _model_line(next(iter(res.values())))]
                                           for lab, d, res in zip(labels, dirs, runs)])
    doc.p("Scores of protocols in %, metrics as their libraries report them; drops in points (real - ablated). "
          "'–': the run has no such number.")
    doc.table(["task / protocol or metric"] + labels,
              [[name] + [(_drop(v) if "drop" in name else _fmt(v, _is_protocol(name, runs))) for v in vals]
               for name, vals in table.items()])
    doc.img("compare.png", _plot_compare(table, labels), "runs side by side")
    out = Path(out)
    for name, png in doc.images.items():
        write_bytes(out / name, png)
    md = out / "compare.md"
    write_text(md, doc.markdown("."))
    write_json(out / "compare.json", {"runs": [{"label": lab, "dir": str(d)} for lab, d in zip(labels, dirs)],
                                      "rows": table})
    return md


def _is_protocol(name: str, runs: list[dict]) -> bool:
    task, key = name.split(" / ", 1)
    return any(key in (res.get(task, {}).get("protocols") or {}) for res in runs)


def _plot_compare(table: dict[str, list], labels: list[str]) -> bytes | None:
    rows = {k: v for k, v in table.items() if "drop" not in k and any(x is not None for x in v)}
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) * max(1, len(labels)) * 0.5 + 2), 4.0))
    _bars(ax, list(rows), {lab: [rows[k][i] for k in rows] for i, lab in enumerate(labels)}, "runs side by side")
    ax.tick_params(axis="x", labelrotation=30)
    return _png(fig)


__all__ = ["compare", "load_results", "write_report", "build_report", "plot_scores", "plot_blind", "plot_confusion",
           "plot_modality", "plot_trust"]
