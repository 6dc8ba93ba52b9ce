"""The engine: answers equal medmllm.model.generate's on the same batch, dynamic batching (fewer
generate calls than requests, each answer the same as alone), stop strings, max_tokens, seeded
sampling, cancellation, the bounded queue, refusals, a zipped DICOM series reaching the model as the same
NIfTI volume does."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from medmllm.serve.engine import Delta, Done, Engine, SamplingParams
from medmllm.serve.errors import QueueFull, ServeError


@pytest.fixture(scope="module")
def files(tmp_path_factory, xray_png):
    """Local files of every kind the tiny model takes."""
    import json

    from medmllm.data.phantoms.writers import write_nifti

    d = tmp_path_factory.mktemp("engine_files")
    (d / "x.png").write_bytes(xray_png)
    rng = np.random.default_rng(0)
    write_nifti(d / "v.nii.gz", (rng.normal(40, 30, (6, 20, 20))).astype(np.int16), (2.0, 1.0, 1.0))
    (d / "e.json").write_text(json.dumps({"vitals": {"heart_rate": 88, "sbp": 92}, "labs": {"lactate": 2.4},
                                          "notes": ["Confused overnight."]}))
    t = np.arange(500) / 250.0
    rows = ["time,I,II"] + [f"{x:.4f},{np.sin(7 * x):.4f},{np.cos(5 * x):.4f}" for x in t]
    (d / "ecg.csv").write_text("\n".join(rows) + "\n")
    return d


def _msg(text: str, *parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts) + [{"type": "text", "text": text}]}]


def _part(kind: str, path) -> dict:
    return {"type": kind, "path": str(path)}


def test_greedy_answer_equals_model_generate_on_the_same_batch(engine, files):
    from medmllm.data.collate import MultimodalCollator
    from medmllm.model.generate import generate

    messages = _msg("What is shown?", _part("image", files / "x.png"))
    done = engine.complete(messages, SamplingParams(max_tokens=10))
    prepared = engine.prepare(messages, SamplingParams(max_tokens=10))
    collate = MultimodalCollator(engine.tokenizer, 4096, engine.model.num_tokens, train=False)
    batch = collate([prepared.example])
    assert done.prompt_tokens == int(batch["attention_mask"].sum())
    with torch.no_grad():
        ref = generate(engine.model, batch, engine.tokenizer, max_new_tokens=10)[0]
    assert done.text == ref


def test_seeded_sampling_equals_model_generate_with_the_same_seed(engine, files):
    from medmllm.data.collate import MultimodalCollator
    from medmllm.model.generate import generate

    messages = _msg("Describe the image.", _part("image", files / "x.png"))
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=123)
    done = engine.complete(messages, params)
    batch = MultimodalCollator(engine.tokenizer, 4096, engine.model.num_tokens, train=False)(
        [engine.prepare(messages, params).example])
    ref = generate(engine.model, batch, engine.tokenizer, max_new_tokens=10, do_sample=True, temperature=0.8,
                   top_p=0.9, seed=123)[0]
    assert done.text == ref
    assert engine.complete(messages, params).text == done.text


def test_concurrent_requests_are_batched_and_answer_as_alone(model_dir, files, shapes):
    """Six requests of mixed modalities and lengths submitted together: one batch (one generate call)
    instead of six, and every answer equals the one the request gets alone."""
    eng = Engine.from_pretrained(model_dir, shapes=shapes, max_batch=8, batch_window_ms=300.0)
    requests = [(_msg("What is shown?", _part("image", files / "x.png")), SamplingParams(max_tokens=8)),
                (_msg("Is the heart enlarged in this chest x-ray? Answer with one word.",
                      _part("image", files / "x.png"), _part("ehr", files / "e.json")), SamplingParams(max_tokens=5)),
                (_msg("Describe the ECG.", _part("signal", files / "ecg.csv")), SamplingParams(max_tokens=9)),
                (_msg("hi"), SamplingParams(max_tokens=3)),
                (_msg("Axial CT?", _part("volume", files / "v.nii.gz")), SamplingParams(max_tokens=7)),
                (_msg("Sample something.", _part("image", files / "x.png")),
                 SamplingParams(max_tokens=8, temperature=1.0, seed=5))]
    eng.start()
    try:
        alone = [eng.complete(m, p) for m, p in requests]
        assert eng.stats["batches"] == len(requests)
        prepared = [eng.prepare(m, p) for m, p in requests]
        results: list = [None] * len(prepared)
        finished = threading.Event()

        def sink_for(i):
            def sink(event):
                if isinstance(event, Done):
                    results[i] = event
                    if all(r is not None for r in results):
                        finished.set()
            return sink

        for i, p in enumerate(prepared):
            eng.submit(p, sink_for(i))
        assert finished.wait(60)
    finally:
        eng.close()
    assert eng.stats["batches"] == len(requests) + 1       # all six in one batch
    assert eng.stats["largest_batch"] == len(requests)
    for got, ref in zip(results, alone):
        assert (got.text, got.finish_reason, got.prompt_tokens, got.completion_tokens) == \
               (ref.text, ref.finish_reason, ref.prompt_tokens, ref.completion_tokens)


def test_stop_string_cuts_and_is_never_streamed(engine, files):
    messages = _msg("Describe the ECG.", _part("signal", files / "ecg.csv"))
    full = engine.complete(messages, SamplingParams(max_tokens=16))
    assert len(full.text) >= 6
    stop = full.text[4:6]
    cut_at = full.text.find(stop)
    events = list(engine.stream(messages, SamplingParams(max_tokens=16, stop=(stop,))))
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == "stop"
    assert streamed == done.text == full.text[:cut_at]


def test_max_tokens_ends_with_length_and_counts_tokens(engine, files):
    messages = _msg("Summarise the record.", _part("ehr", files / "e.json"))
    long = engine.complete(messages, SamplingParams(max_tokens=24))
    if long.completion_tokens < 3:
        pytest.skip("the tiny model ends this answer at once")
    n = long.completion_tokens - 1   # one short of its natural end (or of 24): must end by length
    short = engine.complete(messages, SamplingParams(max_tokens=n))
    assert short.finish_reason == "length" and short.completion_tokens == n
    assert long.text.startswith(short.text)
    assert short.usage["total_tokens"] == short.prompt_tokens + n


def test_ehr_notes_and_volume_reach_the_prompt(engine, files):
    with_notes = engine.prepare(_msg("Q?", _part("ehr", files / "e.json")))
    record_text = [p["text"] for p in with_notes.example["record"]["messages"][0]["content"] if p["type"] == "text"]
    assert record_text[0] == "Clinical note: Confused overnight."
    vol = engine.prepare(_msg("Q?", _part("volume", files / "v.nii.gz")))
    kind, tensor = vol.example["modalities"][0]
    assert kind == "volume" and tuple(tensor.shape) == (1, *engine.shapes.volume_shape)


def test_media_are_encoded_when_prepared_and_not_again_in_the_batch(engine, files, monkeypatch):
    """prepare() runs each media part through its encoder and projector (on the caller's thread); the
    worker uses those tokens, so a later change to the encoder does not reach a prepared request."""
    messages = _msg("What is shown?", _part("image", files / "x.png"), _part("ehr", files / "e.json"))
    prepared = engine.prepare(messages, SamplingParams(max_tokens=6))
    assert [k for k, _, _ in prepared.encoded] == ["image", "ehr"]
    for (kind, tensor), (_, tokens, mask) in zip(prepared.example["modalities"], prepared.encoded):
        with torch.no_grad():
            want, want_mask = engine.model.encode_item(kind, tensor)
        torch.testing.assert_close(tokens, want)
        assert torch.equal(mask, want_mask)
    alone = engine.complete(messages, SamplingParams(max_tokens=6)).text
    encoder = engine.model.encoders["image"]
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("encoder ran")))
    events = []
    finished = threading.Event()
    engine.submit(prepared, lambda ev: (events.append(ev), isinstance(ev, Done) and finished.set()))
    assert finished.wait(60)
    assert isinstance(events[-1], Done) and events[-1].text == alone


def test_an_input_the_encoder_refuses_is_a_422_naming_the_kind(engine, files, monkeypatch):
    from medmllm.errors import InputError

    def refuse(kind, x):
        raise InputError("pixel_values", f"expected 1 channel, got shape {tuple(x.shape)}")

    monkeypatch.setattr(engine.model, "encode_item", refuse)
    with pytest.raises(ServeError) as info:
        engine.prepare(_msg("Q?", _part("image", files / "x.png")))
    assert info.value.status == 422 and info.value.code == "invalid_input"
    assert "image" in info.value.message and "expected 1 channel" in info.value.detail


def _series_zip(tmp_path, vol: np.ndarray, spacing, truncate: bool = False) -> bytes:
    """``vol`` written by the phantom series writer and zipped in one folder (last slice cut short if asked)."""
    import io
    import zipfile

    from medmllm.data.phantoms.writers import write_dicom_series

    paths = write_dicom_series(tmp_path / "series", vol, spacing, patient_id="P0001", uid_seed="engine-series")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in paths:
            data = p.read_bytes()
            zf.writestr(f"ct/{p.name}", data[:-50] if truncate and p == paths[-1] else data)
    return buf.getvalue()


def _series_request(data: bytes):
    import base64

    from medmllm.serve.schema import ChatRequest

    return ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "input_file", "input_file": {"kind": "volume", "filename": "ct.zip",
                                              "data": base64.b64encode(data).decode()}},
        {"type": "text", "text": "Q?"}]}]}).messages


def test_dicom_series_zip_reaches_the_prompt_as_the_same_nifti_volume_does(engine, tmp_path):
    from medmllm.data.phantoms.writers import write_nifti
    from medmllm.serve.inputs import InputLimits, to_record_messages

    vol = np.random.default_rng(5).normal(40, 60, (6, 20, 18)).round().astype(np.int16)
    spacing = (2.0, 1.0, 1.0)
    (tmp_path / "req").mkdir()
    messages, params = to_record_messages(_series_request(_series_zip(tmp_path, vol, spacing)), tmp_path / "req",
                                          InputLimits())
    part = messages[0]["content"][0]
    assert part["type"] == "volume" and (tmp_path / "req" / "m0").is_dir() and part["path"].endswith("m0")
    kind, tensor = engine.prepare(messages, SamplingParams(), params).example["modalities"][0]
    assert kind == "volume" and tuple(tensor.shape) == (1, *engine.shapes.volume_shape)
    write_nifti(tmp_path / "v.nii.gz", vol, spacing)
    _, ref = engine.prepare(_msg("Q?", _part("volume", tmp_path / "v.nii.gz"))).example["modalities"][0]
    torch.testing.assert_close(tensor, ref)


def test_dicom_series_with_truncated_pixel_data_is_refused_naming_the_part(engine, tmp_path):
    from medmllm.serve.inputs import InputLimits, to_record_messages

    vol = np.zeros((4, 16, 16), np.int16)
    (tmp_path / "req").mkdir()
    messages, params = to_record_messages(_series_request(_series_zip(tmp_path, vol, (1.0, 1.0, 1.0), True)),
                                          tmp_path / "req", InputLimits())  # the headers are fine
    with pytest.raises(ServeError) as info:
        engine.prepare(messages, SamplingParams(), params)
    err = info.value
    assert (err.status, err.code, err.param) == (422, "unreadable_file", "messages.0.content.0.input_file")
    assert "truncated" in err.detail and "truncated" not in err.message  # the reader's reason stays local


def test_cancelled_stream_stops_decoding(engine, files):
    messages = _msg("Describe the image in detail.", _part("image", files / "x.png"))
    before = engine.stats["forward_passes"]
    stream = engine.stream(messages, SamplingParams(max_tokens=400))
    first = next(stream)
    assert isinstance(first, Delta)
    stream.close()  # cancels the request
    after = engine.complete(_msg("ok?"), SamplingParams(max_tokens=2))  # the worker is free again
    assert after.completion_tokens >= 1
    assert engine.stats["forward_passes"] - before < 400 + 2


def test_queue_full_is_refused_with_429(model_dir, shapes):
    eng = Engine.from_pretrained(model_dir, shapes=shapes, queue_size=2)   # not started: nothing is taken
    prepared = eng.prepare(_msg("hi"), SamplingParams(max_tokens=2))
    events = []
    eng.submit(prepared, events.append)
    eng.submit(prepared, events.append)
    with pytest.raises(QueueFull) as info:
        eng.submit(prepared, events.append)
    assert info.value.status == 429 and info.value.code == "queue_full" and "2 requests" in info.value.message
    eng.close()  # the waiting ones are told the server stops
    assert [type(e).__name__ for e in events] == ["Failed", "Failed"]
    assert events[0].error.status == 503


def test_refusals(engine, files):
    with pytest.raises(ServeError) as info:
        engine.prepare(_msg("look at <image> this"))
    assert info.value.status == 422 and info.value.code == "reserved_tokens"
    bad = files / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ServeError) as info:
        engine.prepare(_msg("Q?", _part("image", bad)))
    assert info.value.code == "unreadable_file" and info.value.detail  # the reason is kept for local callers
    with pytest.raises(ServeError) as info:
        engine.prepare(_msg("hi"), SamplingParams(max_tokens=engine.max_context))
    assert info.value.code == "context_length_exceeded"


def test_requests_arriving_mid_decode_join_the_running_batch(model_dir, files, shapes):
    """Continuous batching: A is decoding (paused inside its first token callback, on the worker thread)
    when B and C arrive; they join A's batch at the next step (no second generate call) and all three
    answers equal the ones they get alone."""
    eng = Engine.from_pretrained(model_dir, shapes=shapes, max_batch=8, batch_window_ms=0.0).start()
    try:
        a_msg = (_msg("Describe the image in detail.", _part("image", files / "x.png")), SamplingParams(max_tokens=20))
        others = [(_msg("Describe the ECG.", _part("signal", files / "ecg.csv")), SamplingParams(max_tokens=7)),
                  (_msg("hi"), SamplingParams(max_tokens=5, temperature=1.0, seed=3))]
        alone = [eng.complete(m, p) for m, p in [a_msg] + others]
        assert alone[0].completion_tokens > 1
        batches = eng.stats["batches"]
        release, first_seen = threading.Event(), threading.Event()
        results: dict = {}

        def sink(name):
            def put(event):
                if name == "A" and not first_seen.is_set():
                    first_seen.set()
                    release.wait(30)       # holds the worker inside A's first step
                if isinstance(event, Done):
                    results[name] = event
            return put

        eng.submit(eng.prepare(*a_msg), sink("A"))
        assert first_seen.wait(30)
        for name, (m, p) in zip("BC", others):
            eng.submit(eng.prepare(m, p), sink(name))
        release.set()
        deadline = threading.Event()
        for _ in range(600):
            if len(results) == 3:
                break
            deadline.wait(0.05)
    finally:
        eng.close()
    assert len(results) == 3
    assert eng.stats["batches"] == batches + 1 and eng.stats["joined_running_batch"] >= 2
    for name, ref in zip("ABC", alone):
        got = results[name]
        assert (got.text, got.finish_reason, got.prompt_tokens, got.completion_tokens) == \
               (ref.text, ref.finish_reason, ref.prompt_tokens, ref.completion_tokens), name


def test_a_batch_that_never_drains_keeps_its_cache_bounded_and_answers_as_alone(engine, files):
    """Twenty short requests join a 2-row batch one by one as rows end, so the batch never drains:
    the cache stays within the longest prompt + max_tokens (positions every row masks are dropped;
    without that it grows by one per step) and every answer equals the request's answer alone."""
    from medmllm.data.collate import MultimodalCollator
    from medmllm.serve.decode import Row, run_batch

    questions = ["What is shown?", "Is there a nodule in this chest x-ray?", "hi", "Describe the image."]
    requests = [(_msg(q, _part("image", files / "x.png")) if k % 2 == 0 else _msg(q), SamplingParams(max_tokens=4))
                for k, q in enumerate(questions * 5)]
    alone = [engine.complete(m, p) for m, p in requests]
    prepared = [engine.prepare(m, p) for m, p in requests]
    collate = MultimodalCollator(engine.tokenizer, 4096, engine.model.num_tokens, train=False)
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    texts: dict = {}

    def row(i: int) -> Row:
        r = Row(prepared[i].params, decode, stream=False)
        r.finish = lambda reason: texts.__setitem__(i, (r.text, reason, r.steps))
        return r

    waiting = list(range(1, len(prepared)))

    def admit(n: int):
        if not waiting:
            return None
        i = waiting.pop(0)
        return collate([prepared[i].example]), [row(i)]

    stats: dict = {}
    run_batch(engine.model, engine.tokenizer, collate([prepared[0].example]), [row(0)], admit=admit, capacity=2,
              stats=stats)
    assert sorted(texts) == list(range(len(requests)))
    for i, ref in enumerate(alone):
        assert texts[i] == (ref.text, ref.finish_reason, ref.completion_tokens), i
    longest_prompt = max(p.prompt_tokens for p in prepared)
    assert stats["decode_steps"] > 2 * 4 + longest_prompt // 4     # long enough to grow without trimming
    assert stats["longest_cache"] <= longest_prompt + 4



@pytest.mark.parametrize("slots", [1, 2])
def test_prepare_runs_at_most_prepare_concurrency_requests_at_once(model_dir, files, shapes, monkeypatch, slots):
    """Request threads queue for prepare (files, encoders, prefill) instead of all running it at once."""
    import time

    eng = Engine.from_pretrained(model_dir, shapes=shapes, prepare_concurrency=slots)
    inside, most, lock = [0], [0], threading.Lock()
    real = eng._encode

    def slow_encode(rid, mods):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)                                  # long enough for the other threads to arrive
        try:
            return real(rid, mods)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(eng, "_encode", slow_encode)
    messages = _msg("What is shown?", _part("image", files / "x.png"))
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(eng.prepare(messages, SamplingParams(max_tokens=2))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 4 and most[0] == slots
    with pytest.raises(ServeError, match="prepare_concurrency must be >= 1.*got 8, 64 and 0"):
        Engine.from_pretrained(model_dir, shapes=shapes, prepare_concurrency=0)
