"""Backends that answer evaluation records: the in-process model and any OpenAI-compatible endpoint.

A backend has ``answer(records, base_dir, gen, *, on_batch=None, ablation=None, seed=0)`` returning
one answer per record (``None`` where the record's files could not be read), in the records'
order. It works through them in consecutive groups of ``batch_size`` records and calls
``on_batch(ids, answers)`` after each group, in order, so a caller can stream the answers to disk.

``gen`` holds the task's generation settings: ``max_new_tokens`` (int) and ``temperature``
(float, 0 = greedy; the default, so results are deterministic). ``ablation`` (``"blank"`` or
``"noise"``, see :mod:`medmllm.eval.inprocess`) is only for backends with
``supports_ablation``. ``describe()`` returns the provenance of the answers (model id/revision).

* :class:`InProcessBackend`: a saved :class:`~medmllm.model.mllm.MedMLLM` (``from_pretrained`` +
  its tokenizer), batched greedy decoding through :func:`medmllm.eval.inprocess.predict`. Each
  batch is decoded by its own ``predict`` call with a seed derived from ``(seed, first id)``, so
  the noise of an ablation — and the batch composition — depend only on which records form the
  batch, never on what ran before (a resumed run reproduces an uninterrupted one).
* :class:`OpenAIBackend`: ``POST {base_url}/chat/completions`` (vLLM, SGLang, medmllm's server),
  ``concurrency`` requests in flight at most, retries with exponential backoff on 429, 5xx and
  connection errors, an :class:`EndpointError` saying what to check on any other 4xx. Images go as
  base64 data URLs (``image/png``, ``image/jpeg``, ``application/dicom`` from the file's magic
  bytes, then its suffix; TIFF/BMP/GIF/WebP re-encoded as PNG); volumes, signals and EHR go as
  extension parts ``{"type": "input_file", "input_file": {"kind": "volume"|"signal"|"ehr",
  "data": base64, "filename": name}}`` — the layout :mod:`medmllm.serve` accepts. A part's CT
  ``window`` option goes in ``input_file.window`` (an image with one is sent as an ``input_file``
  of kind ``image``). A WFDB record (``.hea`` + ``.dat``) is sent as one flat zip, a folder (a
  DICOM series) as a zip too (``filename`` ends in ``.zip``); inline EHR data as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

from medmllm.errors import ConfigError, InputError, MedmllmError

log = logging.getLogger(__name__)

OnBatch = Callable[[list[str], list["str | None"]], None]


@runtime_checkable
class Backend(Protocol):
    """What the runner needs from a backend (see the module doc)."""

    name: str
    batch_size: int
    supports_ablation: bool

    def answer(self, records: Sequence[dict], base_dir: str | os.PathLike, gen: dict, *,
               on_batch: OnBatch | None = None, ablation: str | None = None, seed: int = 0) -> list[str | None]:
        ...

    def describe(self) -> dict:
        ...


def generation_settings(gen: dict | None) -> dict:
    """``gen`` checked and completed: ``{"max_new_tokens": int >= 1, "temperature": float >= 0}``."""
    gen = dict(gen or {})
    unknown = sorted(set(gen) - {"max_new_tokens", "temperature", "top_p"})
    if unknown:
        raise ConfigError(f"generation settings: unknown keys {unknown}; known: max_new_tokens, temperature, top_p")
    out = {"max_new_tokens": int(gen.get("max_new_tokens", 32)), "temperature": float(gen.get("temperature", 0.0))}
    if out["max_new_tokens"] < 1:
        raise ConfigError(f"max_new_tokens: expected >= 1, got {out['max_new_tokens']}")
    if out["temperature"] < 0:
        raise ConfigError(f"temperature: expected >= 0, got {out['temperature']}")
    if "top_p" in gen:
        out["top_p"] = float(gen["top_p"])
    return out


def batch_seed(seed: int, first_id: str) -> int:
    """A 63-bit seed from ``(seed, id)``: stable across runs, machines and batch order."""
    h = hashlib.sha256(f"{int(seed)}/{first_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ============================================================================= in-process

class InProcessBackend:
    """A composed model evaluated in this process, ``batch_size`` records per greedy ``generate``.

    ``InProcessBackend(model_dir)`` loads ``MedMLLM.from_pretrained(model_dir)`` and the tokenizer
    saved beside it; :meth:`from_model` wraps a model already in memory. ``shapes`` (a
    :class:`~medmllm.data.dataset.ModalityShapes`) defaults to what the model's encoders fix
    (:func:`medmllm.model.inspect.modality_shapes_for`). ``max_length``: prompt tokens (modality
    tokens included); a longer record is answered ``None``.
    """

    name = "in-process"
    supports_ablation = True

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 32, device: str | None = None,
                 shapes=None, max_length: int = 512):
        from medmllm.data.tokenizers import load_tokenizer
        from medmllm.model.mllm import MedMLLM

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise InputError(model_dir, "expected a model folder written by MedMLLM.save_pretrained (with "
                                        "config.json and the tokenizer), found none")
        model = MedMLLM.from_pretrained(model_dir)
        self._setup(model, load_tokenizer(model_dir), batch_size, device, shapes, max_length)
        self.model_dir = model_dir
        self._identity = {"model_id": str(model_dir.resolve()), **_folder_revision(model_dir)}

    @classmethod
    def from_model(cls, model, tokenizer, model_id: str = "in-memory", batch_size: int = 32,
                   device: str | None = None, shapes=None, max_length: int = 512) -> "InProcessBackend":
        """Wrap a model in memory; ``model_id`` names it in the results (its config hash is added)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, batch_size, device, shapes, max_length)
        self.model_dir = None
        cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
        self._identity = {"model_id": model_id, "config_sha256": hashlib.sha256(cfg).hexdigest()}
        return self

    def _setup(self, model, tokenizer, batch_size: int, device: str | None, shapes, max_length: int) -> None:
        import torch

        from medmllm.model.inspect import modality_shapes_for

        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.shapes = shapes if shapes is not None else modality_shapes_for(model)
        self.max_length = int(max_length)
        self.device = str(device)

    def describe(self) -> dict:
        """Model id (folder), config and weights hashes, parameter count, device, decoding, input shapes."""
        n_params = sum(p.numel() for p in self.model.parameters())
        from dataclasses import asdict

        return {"backend": self.name, **self._identity, "parameters": int(n_params), "device": self.device,
                "decoding": "greedy", "batch_size": self.batch_size, "max_length": self.max_length,
                "shapes": json.loads(json.dumps(asdict(self.shapes)))}

    def answer(self, records: Sequence[dict], base_dir: str | os.PathLike, gen: dict, *,
               on_batch: OnBatch | None = None, ablation: str | None = None, seed: int = 0) -> list[str | None]:
        """Answers, ``batch_size`` records per batch (see the module doc): greedy at temperature 0, else
        nucleus sampling seeded per batch (the same seed and records give the same answers)."""
        from medmllm.eval.inprocess import predict

        g = generation_settings(gen)
        records = list(records)
        out: list[str | None] = []
        for start in range(0, len(records), self.batch_size):
            chunk = records[start:start + self.batch_size]
            answers = predict(self.model, self.tokenizer, chunk, base_dir, self.shapes, batch_size=len(chunk),
                              max_new_tokens=g["max_new_tokens"], max_length=self.max_length, ablation=ablation,
                              seed=batch_seed(seed, chunk[0]["id"]), progress=False,
                              temperature=g["temperature"], top_p=g.get("top_p", 1.0))
            out.extend(answers)
            if on_batch is not None:
                on_batch([r["id"] for r in chunk], list(answers))
        return out


def _folder_revision(model_dir: Path) -> dict:
    """sha256 of config.json, and one sha256 over the weight files (``*.safetensors``/``*.bin``: each
    file's name then bytes, in name order) when they total at most 4 GiB."""
    out = {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()}
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    size = sum(p.stat().st_size for p in weights)
    if weights and size <= 4 << 30:
        out["weights_sha256"] = _sha256_files(weights)
    elif weights:
        out["weights_sha256"] = None
        out["weights_bytes"] = size  # too large to hash on every run; the config hash still names it
    return out


# ============================================================================= OpenAI-compatible

class EndpointError(MedmllmError):
    """An OpenAI-compatible endpoint refused a request or could not be reached (after retries)."""


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"), (b"BM", "image/bmp"))
_SUFFIX_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom",
                ".dicom": "application/dicom", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff",
                ".bmp": "image/bmp", ".webp": "image/webp"}
_FILE_KINDS = ("volume", "signal", "ehr")


def image_mime(path: Path, head: bytes) -> str:
    """MIME type of an image file from its first bytes (DICOM: ``DICM`` at offset 128), then its suffix."""
    if head[128:132] == b"DICM":
        return "application/dicom"
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    mime = _SUFFIX_MIME.get(path.suffix.lower())
    if mime is None:
        raise InputError(path, f"cannot tell the image type: expected PNG, JPEG, DICOM, TIFF, BMP, GIF or WebP, "
                               f"got suffix {path.suffix!r} and magic bytes {head[:8]!r}")
    return mime


def _zip(files: Sequence[tuple[str, Path]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, p in files:
            zf.writestr(zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0)), p.read_bytes())
    return buf.getvalue()


def file_payload(path: Path) -> tuple[bytes, str]:
    """(bytes, filename) sent for a volume/signal/EHR file: a folder or a WFDB record becomes a zip."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise InputError(path, "expected a folder holding files (a DICOM series), found an empty folder")
        return _zip([(str(p.relative_to(path)), p) for p in files]), path.name + ".zip"
    if not path.is_file():
        raise InputError(path, "file does not exist")
    if path.suffix.lower() == ".hea":  # WFDB: the header and the signal files sharing its stem
        files = [path] + sorted(p for p in path.parent.glob(path.stem + ".dat") if p.is_file())
        return _zip([(p.name, p) for p in files]), path.stem + ".zip"
    return path.read_bytes(), path.name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_SENT_AS_IS = ("image/png", "image/jpeg", "application/dicom")


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """(bytes, mime) of an image file; types other than PNG/JPEG/DICOM are re-encoded as PNG (lossless)."""
    if not path.is_file():
        raise InputError(path, "image file does not exist")
    data = path.read_bytes()
    mime = image_mime(path, data[:132])
    if mime in _SENT_AS_IS:
        return data, mime
    from PIL import Image

    buf = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.save(buf, format="PNG")
    except Exception as exc:  # PIL raises many types for bad files
        raise InputError(path, f"could not re-encode the {mime} image as PNG: {exc}") from None
    return buf.getvalue(), "image/png"


_MIME_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "application/dicom": ".dcm"}


def openai_part(part: dict, base_dir: str | os.PathLike) -> dict:
    """One record content part as an OpenAI chat content part (see the module doc).

    A ``window`` option (CT window preset) travels as ``input_file.window``, so an image with one is
    sent as an ``input_file`` of kind ``image``; other part options are not sent.
    """
    from medmllm.data.records import resolve_path

    kind = part["type"]
    if kind == "text":
        return {"type": "text", "text": part["text"]}
    window = (part.get("options") or {}).get("window")
    if "path" not in part:
        if kind == "ehr":
            data = json.dumps(part["data"], sort_keys=True).encode()
            return {"type": "input_file", "input_file": {"kind": "ehr", "data": _b64(data), "filename": "ehr.json"}}
        raise InputError(f"{kind} part", "inline data is supported for ehr parts only; give a 'path'")
    path = resolve_path(part, base_dir)
    if kind == "image":
        data, mime = _image_bytes(path)
        if window is None:
            return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{_b64(data)}"}}
        entry = {"kind": "image", "data": _b64(data), "filename": path.stem + _MIME_SUFFIX[mime]}
    else:
        data, filename = file_payload(path)
        entry = {"kind": kind, "data": _b64(data), "filename": filename}
    if window is not None and kind in ("image", "volume"):
        entry["window"] = str(window)
    return {"type": "input_file", "input_file": entry}


def openai_messages(record: dict, base_dir: str | os.PathLike) -> list[dict]:
    """A record's prompt as OpenAI chat messages: trailing assistant turns (the gold answer) removed;
    text-only messages as plain strings, others as lists of content parts."""
    msgs = list(record["messages"])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs:
        raise InputError(f"record {record.get('id')}", "expected a prompt (system/user messages), got none")
    out = []
    for m in msgs:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
        elif all(p["type"] == "text" for p in content):
            out.append({"role": m["role"], "content": "\n".join(p["text"] for p in content)})
        else:
            out.append({"role": m["role"], "content": [openai_part(p, base_dir) for p in content]})
    return out


def _response_text(obj: dict, url: str) -> str:
    try:
        content = obj["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{url}: expected a chat completion with choices[0].message.content, got "
                            f"{json.dumps(obj)[:200]}") from None
    if content is None:
        return ""
    if isinstance(content, list):  # some servers return content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)).strip()
    return str(content).strip()


_HINTS = {400: "the server rejected the request body (does the model accept these inputs, e.g. input_file parts "
               "or several images?)",
          401: "check --api-key", 403: "check --api-key and the key's permissions",
          404: "check --endpoint (the base URL, usually ending in /v1) and --model (the served model name)",
          413: "the request is too large for the server (large volumes?)",
          422: "the server could not process the request body"}


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint (see the module doc).

    ``base_url``: e.g. ``http://localhost:8000/v1`` (requests go to ``base_url + "/chat/completions"``);
    ``model``: the served model name; ``api_key``: sent as a Bearer token, never recorded;
    ``concurrency``: requests in flight at most; ``retries``: extra attempts after a 429, 5xx,
    timeout or connection error, waiting ``backoff * 2**k`` seconds (at most ``max_backoff``; a
    ``Retry-After`` header wins); ``timeout``: seconds per request; ``batch_size``: how many records
    make one ``on_batch`` group (default ``4 * concurrency``).
    """

    name = "openai"
    supports_ablation = False

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 retries: int = 3, timeout: float = 120.0, batch_size: int | None = None, backoff: float = 1.0,
                 max_backoff: float = 30.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"endpoint: expected an http(s) base URL such as http://localhost:8000/v1, "
                              f"got {base_url!r}")
        if not model:
            raise ConfigError("model: the served model name is needed for an OpenAI-compatible endpoint")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ConfigError(f"expected concurrency >= 1, retries >= 0, timeout > 0; got {concurrency}, {retries}, "
                              f"{timeout}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.concurrency = int(concurrency)
        self.retries = int(retries)
        self.timeout = float(timeout)
        self.batch_size = int(batch_size or 4 * self.concurrency)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.served_model: str | None = None  # the "model" field of the first response

    def describe(self) -> dict:
        """Endpoint URL, requested and served model names (the API key is left out)."""
        return {"backend": self.name, "model_id": self.model, "endpoint": self.base_url,
                "served_model": self.served_model, "decoding": "server-side", "concurrency": self.concurrency}

    def request_body(self, record: dict, base_dir: str | os.PathLike, gen: dict, seed: int = 0) -> dict:
        """The chat-completions request for one record."""
        g = generation_settings(gen)
        body = {"model": self.model, "messages": openai_messages(record, base_dir),
                "max_tokens": g["max_new_tokens"], "temperature": g["temperature"]}
        if "top_p" in g:
            body["top_p"] = g["top_p"]
        if g["temperature"] > 0:
            body["seed"] = batch_seed(seed, record["id"]) % (2 ** 31)
        return body

    def answer(self, records: Sequence[dict], base_dir: str | os.PathLike, gen: dict, *,
               on_batch: OnBatch | None = None, ablation: str | None = None, seed: int = 0) -> list[str | None]:
        """Answers of the endpoint, ``concurrency`` requests at a time; ``on_batch`` in record order."""
        if ablation is not None:
            raise ConfigError("ablation: an OpenAI-compatible endpoint cannot ablate inputs in process; "
                              "use a trust suite that writes blank/noise files instead")
        generation_settings(gen)  # fail before any request
        records = list(records)
        out: list[str | None] = [None] * len(records)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="medmllm-openai") as pool:
            futures = [pool.submit(self._answer_one, r, base_dir, gen, seed) for r in records]
            try:
                for start in range(0, len(records), self.batch_size):
                    stop = min(start + self.batch_size, len(records))
                    for i in range(start, stop):
                        out[i] = futures[i].result()
                    if on_batch is not None:
                        on_batch([r["id"] for r in records[start:stop]], out[start:stop])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    def _answer_one(self, record: dict, base_dir, gen: dict, seed: int) -> str | None:
        try:
            body = self.request_body(record, base_dir, gen, seed)
        except InputError as exc:  # an unreadable file: no answer, as in process
            log.warning("record %s: %s", record.get("id"), exc)
            return None
        obj = self.post(body)
        if self.served_model is None and isinstance(obj.get("model"), str):
            self.served_model = obj["model"]
        return _response_text(obj, self.url)

    def post(self, body: dict) -> dict:
        """POST ``body`` as JSON with retries; the decoded JSON response."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            wait = None
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError:
                    raise EndpointError(f"{self.url}: the response is not JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code != 429 and exc.code < 500:
                    hint = _HINTS.get(exc.code, "the server refused the request")
                    raise EndpointError(f"{self.url}: HTTP {exc.code} {detail} — {hint}") from None
                last = f"HTTP {exc.code} {detail}"
                wait = _retry_after(exc)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            if attempt < self.retries:
                delay = wait if wait is not None else self.backoff * 2 ** attempt
                time.sleep(min(self.max_backoff, max(0.0, delay)))
        raise EndpointError(f"{self.url}: no answer after {self.retries + 1} attempt(s); last error: {last}")


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
    except Exception:  # the body is only for the message
        return str(exc.reason)
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg if msg is not None else obj)[:300]
    except (json.JSONDecodeError, AttributeError):
        return raw[:300].decode("utf-8", "replace") or str(exc.reason)


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


__all__ = ["Backend", "EndpointError", "InProcessBackend", "OpenAIBackend", "batch_seed", "file_payload",
           "generation_settings", "image_mime", "openai_messages", "openai_part"]
