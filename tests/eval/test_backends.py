"""Backends: OpenAI-compatible requests against a fake server on loopback (request shape, bounded
concurrency, retries, clear 4xx errors) and the in-process backend on a tiny model."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from medmllm.data.records import make_record, media
from medmllm.errors import ConfigError
from medmllm.eval.backends import (EndpointError, InProcessBackend, OpenAIBackend, batch_seed, image_mime,
                                   openai_messages)


# ----------------------------------------------------------------------------- fake OpenAI server

class FakeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers ``ans:<last user text>``.

    ``fail[text] = [code, ...]``: the first requests for that question get these HTTP codes.
    ``delay``: seconds each request is held (to observe concurrency).
    """

    def __init__(self):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.fail: dict[str, list[int]] = {}
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    time.sleep(server.delay)
                    question = _last_text(body)
                    with server.lock:
                        codes = server.fail.get(question) or []
                        code = codes.pop(0) if codes else 200
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if code != 200:
                        extra = {"Retry-After": "0"} if code == 429 else {}
                        return self._send(code, {"error": {"message": f"scripted {code}"}}, extra)
                    self._send(200, {"model": "served-" + body["model"], "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": f" ans:{question} "}}]})
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def attempts(self, question: str) -> int:
        return sum(1 for b in self.bodies if _last_text(b) == question)


def _last_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p["type"] == "text")


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def text_record(i: int, q: str | None = None) -> dict:
    return make_record(f"r{i:03d}", [q or f"question {i}"], "gold answer", {"dataset": "t", "split": "test"})


# ----------------------------------------------------------------------------- request shape

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("files")
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(d / "a.png")
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(d / "b.jpg")
    (d / "c.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00")
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(d / "t.tif")
    (d / "scan.nii").write_bytes(b"nifti-bytes")
    (d / "series").mkdir()
    (d / "series" / "1.dcm").write_bytes(b"one")
    (d / "series" / "2.dcm").write_bytes(b"two")
    (d / "ecg.hea").write_bytes(b"ecg 12 500 5000\n")
    (d / "ecg.dat").write_bytes(b"\x01\x02")
    (d / "ecg.atr").write_bytes(b"annotations: not sent")
    return d


def _unzip(b64: str) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(b64))) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _record_with_everything() -> dict:
    return make_record("x", [media("image", "a.png"), media("image", "b.jpg"), media("image", "c.dcm"),
                             media("image", "t.tif"), media("image", "c.dcm", window="lung"),
                             media("volume", "scan.nii", window="lung", reader="nifti"), media("volume", "series"),
                             media("signal", "ecg.hea"), media("ehr", data={"hr": [80]}), "What is shown?"],
                       "gold", {"dataset": "t", "split": "test"}, system="Be brief.")


def test_request_carries_images_as_data_urls_and_other_inputs_as_input_files(files):
    from PIL import Image

    msgs = openai_messages(_record_with_everything(), files)
    assert [m["role"] for m in msgs] == ["system", "user"]  # the gold assistant turn is not sent
    assert msgs[0]["content"] == "Be brief."
    parts = msgs[1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["input_file"] * 5 + ["text"]
    urls = [p["image_url"]["url"] for p in parts[:4]]
    assert urls[0] == "data:image/png;base64," + base64.b64encode((files / "a.png").read_bytes()).decode()
    assert urls[1].startswith("data:image/jpeg;base64,") and urls[2].startswith("data:application/dicom;base64,")
    assert urls[3].startswith("data:image/png;base64,")  # TIFF re-encoded as PNG, pixels unchanged
    tif = Image.open(io.BytesIO(base64.b64decode(urls[3].split(",", 1)[1])))
    assert tif.format == "PNG" and np.array_equal(np.asarray(tif), np.arange(12, dtype=np.uint8).reshape(3, 4))
    windowed = parts[4]["input_file"]  # an image with a CT window goes as an input_file carrying it
    assert windowed == {"kind": "image", "data": base64.b64encode((files / "c.dcm").read_bytes()).decode(),
                        "filename": "c.dcm", "window": "lung"}
    vol = parts[5]["input_file"]
    assert vol == {"kind": "volume", "data": base64.b64encode(b"nifti-bytes").decode(), "filename": "scan.nii",
                   "window": "lung"}  # the reader option is not sent
    series = parts[6]["input_file"]
    assert series["kind"] == "volume" and series["filename"] == "series.zip"
    assert _unzip(series["data"]) == {"1.dcm": b"one", "2.dcm": b"two"}
    ecg = parts[7]["input_file"]
    assert ecg["kind"] == "signal" and ecg["filename"] == "ecg.zip"
    assert _unzip(ecg["data"]) == {"ecg.hea": b"ecg 12 500 5000\n", "ecg.dat": b"\x01\x02"}
    ehr = parts[8]["input_file"]
    assert ehr["kind"] == "ehr" and json.loads(base64.b64decode(ehr["data"])) == {"hr": [80]}
    assert parts[9] == {"type": "text", "text": "What is shown?"}


def test_request_fits_medmllm_servers_schema(files):
    from medmllm.serve.schema import ChatRequest

    be = OpenAIBackend("http://127.0.0.1:1/v1", "m")
    body = be.request_body(_record_with_everything(), files, {"max_new_tokens": 5, "temperature": 0})
    req = ChatRequest.model_validate(body)  # strict: unknown keys in a part are refused (raises)
    assert req.max_tokens == 5 and req.model == "m"
    assert len(req.messages[-1].content) == len(body["messages"][-1]["content"])


def test_image_type_comes_from_magic_bytes_before_the_suffix(tmp_path):
    assert image_mime(tmp_path / "x.jpg", b"\x89PNG\r\n\x1a\n" + b"\0" * 10) == "image/png"
    assert image_mime(tmp_path / "x.png", b"\0" * 128 + b"DICM") == "application/dicom"
    assert image_mime(tmp_path / "x.JPEG", b"????") == "image/jpeg"
    with pytest.raises(Exception, match="cannot tell the image type"):
        image_mime(tmp_path / "x.xyz", b"????")


def test_body_fields_key_and_served_model_recorded(server):
    be = OpenAIBackend(server.url, "m1", api_key="sk-secret", concurrency=2, retries=0)
    out = be.answer([text_record(0)], ".", {"max_new_tokens": 7, "temperature": 0})
    assert out == ["ans:question 0"]
    body = server.bodies[0]
    assert body["model"] == "m1" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert "seed" not in body  # greedy: no seed needed
    assert body["messages"] == [{"role": "user", "content": "question 0"}]
    assert server.headers[0]["Authorization"] == "Bearer sk-secret"
    desc = be.describe()
    assert desc["served_model"] == "served-m1" and "sk-secret" not in json.dumps(desc)


# ----------------------------------------------------------------------------- concurrency, order, retries

def test_concurrency_is_bounded_and_batches_come_in_order(server):
    server.delay = 0.15
    recs = [text_record(i) for i in range(10)]
    seen = []
    be = OpenAIBackend(server.url, "m", concurrency=3, retries=0, batch_size=4)
    out = be.answer(recs, ".", {"max_new_tokens": 4}, on_batch=lambda ids, preds: seen.append((ids, preds)))
    assert out == [f"ans:question {i}" for i in range(10)]
    assert [ids for ids, _ in seen] == [["r000", "r001", "r002", "r003"], ["r004", "r005", "r006", "r007"],
                                        ["r008", "r009"]]
    assert [p for _, preds in seen for p in preds] == out
    assert 2 <= server.max_inflight <= 3  # never more than the bound (10 requests would all overlap otherwise)


def test_retries_on_5xx_and_429_then_succeeds(server):
    server.fail = {"question 0": [503, 500], "question 1": [429]}
    be = OpenAIBackend(server.url, "m", concurrency=2, retries=2, backoff=0.01)
    out = be.answer([text_record(0), text_record(1), text_record(2)], ".", {"max_new_tokens": 4})
    assert out == ["ans:question 0", "ans:question 1", "ans:question 2"]
    assert (server.attempts("question 0"), server.attempts("question 1"), server.attempts("question 2")) == (3, 2, 1)


def test_gives_up_after_the_retries(server):
    server.fail = {"question 0": [503, 503, 503]}
    be = OpenAIBackend(server.url, "m", retries=1, backoff=0.01)
    with pytest.raises(EndpointError, match=r"after 2 attempt\(s\).*HTTP 503 scripted 503"):
        be.answer([text_record(0)], ".", {"max_new_tokens": 4})
    assert server.attempts("question 0") == 2


def test_4xx_fails_at_once_with_the_server_message_and_a_hint(server):
    server.fail = {"question 0": [400]}
    be = OpenAIBackend(server.url, "m", retries=3, backoff=0.01)
    with pytest.raises(EndpointError, match="HTTP 400 scripted 400 .*does the model accept these inputs"):
        be.answer([text_record(0)], ".", {"max_new_tokens": 4})
    assert server.attempts("question 0") == 1
    wrong = OpenAIBackend(server.url.removesuffix("/v1"), "m", retries=3)
    with pytest.raises(EndpointError, match="HTTP 404 .*check --endpoint"):
        wrong.answer([text_record(1)], ".", {"max_new_tokens": 4})


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(EndpointError, match=r"after 3 attempt\(s\).*(Connection|refused)"):
        be.answer([text_record(0)], ".", {"max_new_tokens": 4})


def test_unreadable_file_gives_none_and_endpoint_cannot_ablate(server, tmp_path):
    rec = make_record("bad", [media("image", "missing.png"), "q"], "a", {"dataset": "t", "split": "test"})
    be = OpenAIBackend(server.url, "m", retries=0)
    assert be.answer([rec, text_record(1)], tmp_path, {"max_new_tokens": 4}) == [None, "ans:question 1"]
    assert server.attempts("q") == 0
    with pytest.raises(ConfigError, match="cannot ablate"):
        be.answer([text_record(1)], ".", {"max_new_tokens": 4}, ablation="blank")
    with pytest.raises(ConfigError, match="http"):
        OpenAIBackend("localhost:8000", "m")


# ----------------------------------------------------------------------------- in process

@pytest.fixture(scope="module")
def tiny_backend():
    from medmllm.model.builders import tiny

    model, tok = tiny(modalities=["image"], seed=0)
    from medmllm.data.dataset import ModalityShapes

    shapes = ModalityShapes(image_size=32)
    return InProcessBackend.from_model(model, tok, model_id="tiny", batch_size=2, shapes=shapes), model, tok


def _image_records(d: Path, n: int) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"{i}.png")
        recs.append(make_record(f"img{i}", [media("image", f"{i}.png"), f"Is there a nodule {i}?"], "no",
                                {"dataset": "t", "split": "test"}))
    return recs


def test_inprocess_batches_match_predict_and_report_unreadable_records(tiny_backend, tmp_path):
    from medmllm.eval.inprocess import predict

    be, model, tok = tiny_backend
    recs = _image_records(tmp_path, 3)
    recs.insert(1, make_record("broken", [media("image", "nope.png"), "q"], "no", {"dataset": "t", "split": "test"}))
    seen = []
    out = be.answer(recs, tmp_path, {"max_new_tokens": 3}, on_batch=lambda ids, p: seen.append((ids, p)))
    assert [ids for ids, _ in seen] == [["img0", "broken"], ["img1", "img2"]]  # the unreadable one is reported too
    assert out[1] is None and all(isinstance(a, str) for i, a in enumerate(out) if i != 1)
    ref = predict(model, tok, recs[2:], tmp_path, be.shapes, batch_size=2, max_new_tokens=3, progress=False)
    assert out[2:] == ref  # the same batch decoded by inprocess.predict directly
    assert be.describe()["decoding"] == "greedy" and be.describe()["model_id"] == "tiny"


def test_inprocess_noise_depends_on_the_batch_not_on_history(tiny_backend, tmp_path, monkeypatch):
    import medmllm.eval.inprocess as ip

    be, _, _ = tiny_backend
    recs = _image_records(tmp_path, 4)
    seeds = []
    real_predict = ip.predict
    monkeypatch.setattr(ip, "predict", lambda *a, **kw: seeds.append(kw["seed"]) or real_predict(*a, **kw))
    full = be.answer(recs, tmp_path, {"max_new_tokens": 3}, ablation="noise", seed=5)
    tail = be.answer(recs[2:], tmp_path, {"max_new_tokens": 3}, ablation="noise", seed=5)
    assert tail == full[2:]
    assert seeds == [batch_seed(5, "img0"), batch_seed(5, "img2"), batch_seed(5, "img2")]
    assert batch_seed(5, "img0") != batch_seed(6, "img0")
    # sampling (temperature > 0) is seeded the same way: per batch, from the seed and its first id
    hot = {"max_new_tokens": 3, "temperature": 0.7}
    assert be.answer(recs[2:], tmp_path, hot, seed=5) == be.answer(recs, tmp_path, hot, seed=5)[2:]


def test_inprocess_loads_a_saved_model_and_names_its_revision(tmp_path):
    import hashlib

    from medmllm.model.builders import tiny

    model, tok = tiny(modalities=["image"], seed=1)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    be = InProcessBackend(tmp_path / "m", batch_size=3, device="cpu")
    desc = be.describe()
    assert desc["config_sha256"] == hashlib.sha256((tmp_path / "m" / "config.json").read_bytes()).hexdigest()
    assert desc["weights_sha256"] and desc["parameters"] == sum(p.numel() for p in model.parameters())
    assert torch.equal(next(be.model.parameters()).cpu(), next(model.parameters()).cpu())
    with pytest.raises(Exception, match="save_pretrained"):
        InProcessBackend(tmp_path)
