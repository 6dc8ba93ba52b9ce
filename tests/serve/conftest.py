"""Shared fixtures of the serving tests: one tiny saved model, one engine, one live server (per session).

The tiny model's LLM matrices are redrawn with a larger spread (as tests/model/test_generate.py does)
so that greedy answers differ between prompts. The server listens on a free loopback port in a
thread, with the API key ``sk-test`` and small limits so oversize requests stay cheap to send.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
import time

import numpy as np
import pytest
import torch

API_KEY = "sk-test"
LIMITS = dict(max_body_bytes=1 << 20, max_media=3, max_file_bytes=512 << 10, max_image_pixels=1 << 22)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from medmllm.model.builders import tiny

    model, tok = tiny("llama", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0.0, 0.2, generator=g)
    path = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def small_shapes():
    from medmllm.data.dataset import ModalityShapes

    return ModalityShapes(image_size=32, volume_shape=(4, 16, 16), signal_samples=500)


@pytest.fixture(scope="session")
def shapes():
    """Small input shapes (fast tests): 32 px images, 4 x 16 x 16 volumes, 500-sample ECGs."""
    return small_shapes()


@pytest.fixture(scope="session")
def engine(model_dir):
    from medmllm.serve.engine import Engine

    eng = Engine.from_pretrained(model_dir, model_id="tiny-test", shapes=small_shapes(), max_batch=8,
                                 queue_size=64, batch_window_ms=20.0).start()
    yield eng
    eng.close()


class AccessLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def access_lines():
    handler = AccessLines()
    logger = logging.getLogger("medmllm.serve.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                        lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as url: ...`` — a live server for an app of the test's own."""
    return running


@pytest.fixture(scope="session")
def server(engine, access_lines):
    """Base URL (``http://127.0.0.1:PORT``) of a live server on ``engine`` (key ``sk-test``, small limits)."""
    from medmllm.serve.app import ServeLimits, create_app
    from medmllm.serve.inputs import InputLimits

    inputs = InputLimits(max_media=LIMITS["max_media"], max_file_bytes=LIMITS["max_file_bytes"],
                         max_image_pixels=LIMITS["max_image_pixels"])
    app = create_app(engine, api_keys=[API_KEY], limits=ServeLimits(LIMITS["max_body_bytes"], inputs))
    with running(app) as url:
        yield url


# ----------------------------------------------------------------------------- files

@pytest.fixture(scope="session")
def xray_png() -> bytes:
    """A MedPhantom chest radiograph (12-bit values in a 16-bit PNG)."""
    from PIL import Image

    from medmllm.data.phantoms.radiograph import generate_xray

    img, _ = generate_xray(np.random.default_rng(0), size=64)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def ct_dicom(tmp_path_factory) -> bytes:
    """A MedPhantom axial CT slice written as DICOM (HU, rescale slope/intercept)."""
    from medmllm.data.phantoms.radiograph import generate_ct_slice
    from medmllm.data.phantoms.writers import write_dicom_image

    hu, _ = generate_ct_slice(np.random.default_rng(1), size=64)
    path = tmp_path_factory.mktemp("dcm") / "ct.dcm"
    write_dicom_image(path, hu, modality="CT", pixel_spacing_mm=0.7, patient_id="PHANTOM", uid_seed="serve-test")
    return path.read_bytes()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def make_data_url():
    return data_url


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core machine two threads competing with other jobs are
    many times slower (see bench/generation_throughput.py); restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
