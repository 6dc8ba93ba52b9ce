"""Evaluation: named, versioned scoring protocols, report metrics and task specs.

* :mod:`medmllm.eval.protocols` — ``PROTOCOLS`` (``llava-med``, ``multimedeval``, ``exact``,
  ``mcq``, ``f1``; each ``score(prediction, meta)`` / ``aggregate(items)``) and
  ``score_all(predictions, metas, protocols)`` for side-by-side numbers.
* :mod:`medmllm.eval.normalize` — the answer normalisers each protocol reproduces, and
  ``extract_answer_tag`` for ``<answer>…</answer>`` outputs.
* :mod:`medmllm.eval.metrics` — ``METRICS`` for report generation: BLEU-1..4, ROUGE-L, CIDEr,
  METEOR (pycocoevalcap; METEOR needs Java) and optional model-based BERTScore, RadGraph F1,
  CheXbert F1, GREEN (``MetricUnavailable`` says how to get their models).
* :mod:`medmllm.eval.tasks` — ``TASKS`` / ``load_task(name)``: one validated YAML per benchmark
  task (data, prompt, generation settings, protocols, metrics, filters).
* :mod:`medmllm.eval.inprocess` — batched greedy answers of a composed model, with ablations.

Nothing heavy is imported here; import the submodule you need.
"""
