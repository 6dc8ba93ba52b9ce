"""The live server through the official ``openai`` client: text, PNG and DICOM data URLs, a zipped DICOM
series as a volume, streaming, API keys, the context check, /v1/models, /health, the error shape and the
access log."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

API_KEY = "sk-test"
QUESTION = "Is there a pleural effusion?"


def _client(server, key=API_KEY):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=30)


def _image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _local_answer(engine, tmp_path, name: str, data: bytes, text: str, max_tokens: int):
    """The engine's answer for the same file given as a local path (no HTTP): the reference."""
    from medmllm.serve.engine import SamplingParams

    path = tmp_path / name
    path.write_bytes(data)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": text}]}]
    return engine.complete(messages, SamplingParams(max_tokens=max_tokens))


def test_png_and_dicom_data_urls_answer_as_the_engine_does_locally(server, engine, xray_png, ct_dicom,
                                                                    make_data_url, tmp_path):
    client = _client(server)
    for name, mime, data in (("x.png", "image/png", xray_png), ("ct.dcm", "application/dicom", ct_dicom)):
        res = client.chat.completions.create(model="tiny-test", messages=_image_message(make_data_url(mime, data)),
                                             max_tokens=6)
        ref = _local_answer(engine, tmp_path, name, data, QUESTION, 6)
        assert res.object == "chat.completion"
        assert res.choices[0].message.role == "assistant"
        assert res.choices[0].message.content == ref.text
        assert res.choices[0].finish_reason == ref.finish_reason
        assert res.usage.prompt_tokens == ref.prompt_tokens
        assert res.usage.completion_tokens == ref.completion_tokens
        assert res.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def _zip(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _volume_message(data: bytes, text: str = "Is there a focal lesion?") -> list[dict]:
    import base64

    return [{"role": "user", "content": [{"type": "input_file", "input_file": {
        "kind": "volume", "data": base64.b64encode(data).decode(), "filename": "ct_series.zip"}},
        {"type": "text", "text": text}]}]


def test_dicom_series_zip_answers_as_the_engine_does_on_the_series_folder(server, engine, tmp_path):
    import numpy as np

    from medmllm.data.phantoms.writers import write_dicom_series
    from medmllm.serve.engine import SamplingParams

    vol = np.random.default_rng(2).normal(40, 60, (5, 16, 14)).round().astype(np.int16)
    paths = write_dicom_series(tmp_path / "ct", vol, (2.0, 1.0, 1.0), patient_id="P0001", uid_seed="app-series")
    data = _zip({f"ct/{p.name}": p.read_bytes() for p in paths})
    res = _client(server).chat.completions.create(model="tiny-test", messages=_volume_message(data), max_tokens=6)
    ref = engine.complete([{"role": "user", "content": [{"type": "volume", "path": str(tmp_path / "ct")},
                                                        {"type": "text", "text": "Is there a focal lesion?"}]}],
                          SamplingParams(max_tokens=6))
    assert res.choices[0].message.content == ref.text
    assert res.usage.prompt_tokens == ref.prompt_tokens and res.usage.completion_tokens == ref.completion_tokens


def test_bad_dicom_series_zips_are_refused_naming_the_part(server, tmp_path):
    import numpy as np

    from medmllm.data.phantoms.writers import write_dicom_series

    paths = write_dicom_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16), (1.0, 1.0, 1.0), patient_id="P",
                               uid_seed="bad-series")
    one = paths[0].read_bytes()
    huge = bytearray(one)  # Rows and Columns (US, explicit VR LE) patched to 65535: 3 x 65535^2 voxels declared
    for tag in (b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x11\x00US\x02\x00"):
        at = bytes(huge).index(tag) + len(tag)
        huge[at: at + 2] = b"\xff\xff"
    for members, status, code in (
            ({"../evil.dcm": one}, 422, "invalid_archive"),
            ({"0.dcm": one, "notes.txt": b"hello"}, 422, "invalid_archive"),
            ({f"{k}.dcm": b"x" for k in range(1025)}, 422, "too_many_slices"),         # default limit: 1024
            ({f"{k}.dcm": bytes(huge) for k in range(3)}, 422, "volume_too_large"),
            ({"0.dcm": one, "1.dcm": b"\0" * 128 + b"DICM" + b"\xff" * 64}, 422, "invalid_dicom"),
            ({"0.dcm": one, "1.dcm": b"\0" * (600 << 10)}, 413, "file_too_large")):     # server: 512 KiB files
        with pytest.raises(openai.APIStatusError) as info:
            _client(server).chat.completions.create(model="tiny-test", messages=_volume_message(_zip(members)),
                                                    max_tokens=2)
        err = info.value.body
        assert info.value.status_code == status and err["code"] == code, (sorted(members)[:2], err)
        assert err["param"] == "messages.0.content.0.input_file" and set(err) == {"message", "type", "param", "code"}
        assert "pydicom" not in err["message"] and "Traceback" not in err["message"]


def test_the_image_changes_the_prompt_length_by_its_feature_tokens(server, engine, xray_png, make_data_url):
    client = _client(server)
    text_only = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=2)
    with_image = client.chat.completions.create(model="tiny-test", max_tokens=2,
                                                messages=_image_message(make_data_url("image/png", xray_png)))
    n_image = engine.model.num_tokens("image", (1, 32, 32))  # the test engine loads images at 32 x 32
    # the image part adds its placeholder copies and one "\n" separator token before the question
    sep = len(engine.tokenizer("\n", add_special_tokens=False)["input_ids"])
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == n_image + sep


def test_streaming_chunks_add_up_to_the_non_streaming_answer(server, xray_png, make_data_url):
    client = _client(server)
    messages = _image_message(make_data_url("image/png", xray_png), "Describe the image.")
    full = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10)
    stream = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really incremental


def test_sse_wire_format_ends_with_done(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}).encode()
    req = urllib.request.Request(f"{server}/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers.get_content_type() == "text/event-stream"
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        json.loads(e[len("data: "):])


def test_api_key_rejected_then_accepted(server):
    with pytest.raises(openai.AuthenticationError) as info:
        _client(server, "sk-wrong").chat.completions.create(model="tiny-test", max_tokens=2,
                                                             messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-wrong").models.list()
    ok = _client(server).chat.completions.create(model="tiny-test", max_tokens=2,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert ok.usage.completion_tokens >= 1
    assert [m.id for m in _client(server).models.list().data] == ["tiny-test"]


def test_health_needs_no_key_and_models_lists_the_context(server, engine):
    with urllib.request.urlopen(f"{server}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["model"] == "tiny-test"
    model = _client(server).models.list().data[0]
    assert model.model_extra["max_model_len"] == engine.model.llm.config.max_position_embeddings


def test_context_length_error_states_the_numbers(server, engine):
    ctx = engine.max_context
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _client(server).chat.completions.create(model="tiny-test", max_tokens=ctx,
                                                messages=[{"role": "user", "content": "hi"}])
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    prompt = engine.prepare([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]).prompt_tokens
    assert f"context is {ctx} tokens" in err["message"]
    assert f"prompt has {prompt} tokens and max_tokens is {ctx}" in err["message"]
    assert f"at most {ctx - prompt}" in err["message"]


def test_unknown_model_and_sampling_ranges_are_refused(server):
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    for kw, param in (({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
                      ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        with pytest.raises(openai.UnprocessableEntityError) as info:
            client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}], **kw)
        assert info.value.body["param"] == param, kw
        assert set(info.value.body) == {"message", "type", "param", "code"}


def test_stop_string_and_seeded_sampling_through_the_api(server):
    client = _client(server)
    msgs = [{"role": "user", "content": "Describe the ECG."}]
    full = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"
    a, b = (client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=12, temperature=1.0,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_preview_renders_png_and_dicom(server, xray_png, ct_dicom):
    from PIL import Image
    import io

    for data, name in ((xray_png, "x.png"), (ct_dicom, "ct.dcm")):
        req = urllib.request.Request(f"{server}/v1/preview?kind=image&window=auto&filename={name}", data=data,
                                     method="POST", headers={"Authorization": f"Bearer {API_KEY}",
                                                             "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers.get_content_type() == "image/png"
            assert resp.headers["X-Medmllm-Slices"] == "1"
            img = Image.open(io.BytesIO(resp.read()))
        assert img.size == (64, 64)
        assert img.getextrema()[1] > img.getextrema()[0]  # not a blank image


def test_access_log_is_json_without_content(server, access_lines):
    secret = "PATIENT-NAME-Zebulon"
    _client(server).chat.completions.create(model="tiny-test", max_tokens=2,
                                            messages=[{"role": "user", "content": f"Is {secret} ill?"}])
    lines = [json.loads(x) for x in access_lines]
    chat = [x for x in lines if x["route"] == "/v1/chat/completions" and x["status"] == 200]
    assert chat, lines[-3:]
    assert {"time", "method", "route", "status", "latency_ms", "prompt_tokens", "completion_tokens"} <= set(chat[-1])
    assert not any(secret in x for x in access_lines)
    assert not any(API_KEY in x for x in access_lines)


def test_web_page_and_static_files_are_served_without_a_key(server):
    with urllib.request.urlopen(f"{server}/", timeout=10) as resp:
        html = resp.read().decode()
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert '<script src="/static/app.js">' in html and "http" not in html.split("<body>")[1]  # no CDN
    with urllib.request.urlopen(f"{server}/static/app.js", timeout=10) as resp:
        assert "getReader" in resp.read().decode()


def test_cors_is_off_unless_configured(server):
    req = urllib.request.Request(f"{server}/health", headers={"Origin": "http://evil.example"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers.get("Access-Control-Allow-Origin") is None


def test_full_queue_answers_429_and_shutdown_503(model_dir, shapes, serve_app):
    """An engine whose worker never runs (start() is a no-op) and a queue of one: the first request
    waits, the second gets 429; closing the engine answers the waiting one with 503."""
    import threading

    from medmllm.serve.app import create_app
    from medmllm.serve.engine import Engine

    class Stalled(Engine):
        def start(self):
            return self

    eng = Stalled.from_pretrained(model_dir, model_id="stalled", shapes=shapes, queue_size=1)
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    def post():
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    first: list = []
    with serve_app(create_app(eng)) as url:
        waiting = threading.Thread(target=lambda: first.append(post()))
        waiting.start()
        for _ in range(200):
            if eng.waiting == 1:
                break
            threading.Event().wait(0.02)
        status, err = post()
        assert status == 429 and err["error"]["code"] == "queue_full" and err["error"]["type"] == "rate_limit_error"
        eng.close()
        waiting.join(30)
    assert first and first[0][0] == 503 and first[0][1]["error"]["code"] == "shutting_down"
