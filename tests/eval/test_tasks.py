"""Task YAML loading, validation errors (file + field named), registry and record selection."""

from pathlib import Path

import pytest

from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError
from medmllm.eval import tasks as T
from medmllm.eval.metrics import METRICS
from medmllm.eval.protocols import PROTOCOLS

BUILTIN = ["gmai_mmbench", "iu_xray_report", "mediconfusion", "medphantom_ct", "medphantom_ct3d", "medphantom_ecg",
           "medphantom_ehr", "medphantom_reasoning", "medphantom_report", "medphantom_xray", "medxpertqa_mm",
           "mimic_cxr_report",
           "omnimedvqa", "pathvqa", "pmc_vqa_test", "pmc_vqa_test_clean", "slake_en", "slake_zh", "vqa_rad"]

GOOD = """\
name: {name}
version: 1
description: a test task
data:
  source: converter
  converter: vqa_rad
  records: vqa_rad/test.jsonl
  manifest: vqa_rad/test.manifest.json
prompt:
  template: "{{question}}\\nShort answer."
generation:
  max_new_tokens: 8
protocols: [exact]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_every_builtin_task_is_registered_and_valid():
    assert T.TASKS.names() == BUILTIN
    for name in BUILTIN:
        spec = T.load_task(name)
        assert spec.name == name and Path(spec.source_file).stem == name
        assert spec.generation.temperature == 0 and spec.generation.max_new_tokens >= 1
        assert all(p in PROTOCOLS for p in spec.protocols)
        assert all(m in METRICS for m in spec.metrics + spec.optional_metrics)
        assert spec.protocols or spec.metrics


def test_builtin_tasks_score_what_they_should():
    assert T.load_task("vqa_rad").protocols == ("llava-med", "multimedeval", "exact", "f1")
    for name in ("pmc_vqa_test", "pmc_vqa_test_clean", "omnimedvqa", "medxpertqa_mm", "gmai_mmbench", "mediconfusion"):
        assert T.load_task(name).protocols == ("mcq",)
    for name in ("mimic_cxr_report", "iu_xray_report"):
        spec = T.load_task(name)
        assert spec.metrics == ("bleu", "rouge_l", "cider", "meteor")
        assert set(spec.optional_metrics) == {"bertscore", "radgraph_f1", "chexbert_f1", "green"}
    assert T.load_task("pmc_vqa_test_clean").data.records == "pmc_vqa/test_clean.jsonl"
    assert T.load_task("slake_zh").filters.lang == "zh"


def test_unknown_task_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'vqarad'; known: gmai_mmbench, iu_xray_report"):
        T.load_task("vqarad")


def test_duplicate_task_name_fails():
    with pytest.raises(ConfigError, match="duplicate task name 'vqa_rad'"):
        T.TASKS.register("vqa_rad", T.load_task("vqa_rad"))


def test_user_task_file_loads(tmp_path):
    spec = T.load_task(write(tmp_path, "mine", GOOD.format(name="mine")))
    assert spec.name == "mine" and spec.protocols == ("exact",) and spec.data.split == "test"
    assert spec.paths("/d") == (Path("/d/vqa_rad/test.jsonl"), Path("/d/vqa_rad/test.manifest.json"))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "scorer: exact\n", r"unknown key 'scorer'"),
    (lambda t: t.replace("  manifest:", "  splt: test\n  manifest:"), r"unknown key 'data.splt'; did you mean 'split'"),
    (lambda t: t.replace("max_new_tokens: 8", "max_new_tokens: many"), r"generation.max_new_tokens: expected int"),
    (lambda t: t.replace("max_new_tokens: 8", "max_new_tokens: 0"), r"max_new_tokens: expected >= 1"),
    (lambda t: t.replace("protocols: [exact]", "protocols: [exact, lava-med]"),
     r"protocols\[1\]: unknown protocol 'lava-med'; known: exact, f1, llava-med, mcq, multimedeval"),
    (lambda t: t + "metrics: [bleu4]\n", r"metrics\[0\]: unknown metric 'bleu4'"),
    (lambda t: t.replace("protocols: [exact]", "protocols: []"), r"at least one protocol or metric"),
    (lambda t: t.replace("{question}", "{answer}"), r"template: unknown field\(s\) \['answer'\]"),
    (lambda t: t.replace("{question}", "question"), r"template: must contain \{question\}"),
    (lambda t: t.replace("  records: vqa_rad/test.jsonl", "  records: /abs/test.jsonl"),
     r"records: expected a non-empty path relative to the data root"),
    (lambda t: t.replace("  converter: vqa_rad\n", ""), r"converter: source 'converter' needs"),
    (lambda t: t.replace("source: converter", "source: hub"), r"data.source: expected one of 'converter'"),
    (lambda t: t + "filters: {answer_types: [yesno]}\n", r"answer_types: unknown \['yesno'\]"),
    (lambda t: t.replace("version: 1\n", ""), r"version: missing required key"),
    (lambda t: t + "version: 2\n", r"duplicate key 'version'"),
])
def test_yaml_errors_name_file_and_field(tmp_path, edit, message):
    path = write(tmp_path, "broken", edit(GOOD.format(name="broken")))
    with pytest.raises(ConfigError, match=message) as info:
        T.load_task(path)
    assert str(path) in str(info.value)


def test_name_must_equal_file_name(tmp_path):
    path = write(tmp_path, "mine", GOOD.format(name="other"))
    with pytest.raises(ConfigError, match=r"mine.yaml: name: expected 'mine' \(the file name\), got 'other'"):
        T.load_task(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="task file does not exist"):
        T.load_task(tmp_path / "nope.yaml")


def test_hooks_only_from_the_allowlisted_module(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    path = write(tmp_path, "evil", GOOD.format(name="evil") + 'filters: {hook: "os:system"}\n')
    allowed = r"hook: module 'os' is not allowed; hooks come from \['medmllm.eval.tasks.hooks'\]"
    with pytest.raises(ConfigError, match=allowed):
        T.load_task(path)
    assert called == []
    path = write(tmp_path, "typo", GOOD.format(name="typo") + 'filters: {hook: "medmllm.eval.tasks.hooks:slake_fr"}\n')
    with pytest.raises(ConfigError, match="has no hook 'slake_fr'; known: not_counterfactual, slake_en"):
        T.load_task(path)
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        T.resolve_hook("medmllm.eval.tasks.hooks.slake_en")


# ----------------------------------------------------------------------------- selection and prompts

def rec(i, dataset, answer_type, answer="yes", text="Is there a nodule?", **meta):
    m = {"dataset": dataset, "split": "test", "answer_type": answer_type, "answer": answer, **meta}
    return make_record(f"{dataset}-{i}", [media("image", "img.png"), text], answer, m)


def test_select_by_filters_and_hook():
    records = [
        rec(0, "slake", "closed", lang="en"),
        rec(1, "slake", "open", answer="liver", lang="zh"),
        rec(2, "slake", "open", answer="liver", lang="en"),
        rec(3, "vqa_rad", "closed"),
        rec(4, "medphantom", "closed", modality="xray", task="vqa"),
        rec(5, "medphantom", "report", answer="No nodule.", modality="xray", task="report"),
        rec(6, "medphantom", "choice", answer="B", modality="ct", task="vqa", choices=["a", "b"]),
    ]
    ids = lambda name: [r["id"] for r in T.load_task(name).select(records)]  # noqa: E731
    assert ids("slake_en") == ["slake-0", "slake-2"]
    assert ids("slake_zh") == ["slake-1"]
    assert ids("medphantom_xray") == ["medphantom-4"]
    assert ids("medphantom_ct") == ["medphantom-6"]
    assert ids("medphantom_report") == ["medphantom-5"]
    assert ids("pmc_vqa_test") == ["medphantom-6"]       # choice records, any dataset


def test_build_prompt():
    r = rec(0, "vqa_rad", "closed", text="Is the heart enlarged?")
    assert T.load_task("vqa_rad").build_prompt(r) == \
        "Is the heart enlarged?\nAnswer the question using a single word or phrase."
    r = rec(1, "omni", "choice", answer="B", text="Which organ?", choices=["Liver", "Spleen"])
    assert T.load_task("omnimedvqa").build_prompt(r) == \
        "Which organ?\nA. Liver\nB. Spleen\nAnswer with the option's letter from the given choices directly."


def test_hooks():
    from medmllm.eval.tasks import hooks

    assert hooks.slake_en(rec(0, "slake", "closed", lang="en"))
    assert not hooks.slake_en(rec(0, "slake", "closed", lang="zh"))
    assert not hooks.slake_en(rec(0, "vqa_rad", "closed", lang="en"))
    assert hooks.yes_no_gold(rec(0, "x", "closed", answer="No"))
    assert not hooks.yes_no_gold(rec(0, "x", "closed", answer="left"))
    assert hooks.not_counterfactual(rec(0, "medphantom", "closed"))
    assert not hooks.not_counterfactual(rec(0, "medphantom", "closed", extra={"counterfactual_of": "case1"}))
