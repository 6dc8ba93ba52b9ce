"""The serving engine: a saved medmllm model behind a dynamic batcher with a bounded queue.

Life of a request::

    engine.prepare(messages, params)     # any thread: files -> tensors (PartLoader), chat template,
                                         # context check, media encoded and projected (off the worker,
                                         # so it overlaps decoding) -> Prepared (ServeError 422 on bad input)
    handle = engine.submit(prepared, sink)   # QueueFull (429) when queue_size requests wait already
    # the worker thread takes the first waiting request, waits up to batch_window_ms for more
    # (at most max_batch), collates them left-padded (as medmllm.eval.inprocess.predict does) and
    # decodes them together (medmllm.serve.decode.run_batch); each request's sink receives
    # Delta(text) events as its text grows, then one Done (or Failed) event.
    handle.cancel()                      # e.g. the client went away: the row leaves the batch

With ``decode_process=True`` (:mod:`medmllm.serve.decode_process`) the decode loop runs in a child
process instead of the worker thread: ``prepare`` also prefills the prompt on the caller's thread, and
``submit`` sends that one-row state to the child, whose events come back on a reader thread. The
answers are the same; the decode steps no longer share an interpreter lock with the request threads.

``sink`` is called on the worker thread and must return quickly (the app hands events to its
event loop). :meth:`Engine.complete` and :meth:`Engine.stream` are blocking conveniences for the
CLI, tests and benchmarks. ``Engine.stats`` counts ``batches`` (one ``run_batch`` = one generate call),
``requests``, ``joined_running_batch`` (requests that joined a batch already decoding: continuous
batching), ``forward_passes``, ``decode_steps`` and ``row_steps`` (rows decoded summed over steps:
``row_steps / decode_steps`` is the mean batch occupancy), ``largest_batch`` (at the start) and
``longest_cache`` (the longest KV cache a step ran with, in positions).
"""

from __future__ import annotations

import atexit
import copy
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from medmllm.errors import InputError, MedmllmError
from medmllm.serve import llama_step
from medmllm.serve.decode import Row, RowParams, run_batch
from medmllm.serve.errors import QueueFull, ServeError, invalid

log = logging.getLogger("medmllm.serve")

_BIG = 1 << 30  # collator max_length: the engine checks the context itself, with the numbers


@dataclass(frozen=True)
class SamplingParams:
    """What the client asks for. ``max_tokens`` None: up to ``Engine.default_max_tokens`` within the context."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Prepared:
    """A request ready to batch: the collator example, its prompt length, resolved parameters and the
    projected tokens of its media, in order (``(kind, tokens [M, H], mask [M])``, see ``MedMLLM.encode_item``)."""

    id: str
    example: dict
    prompt_tokens: int
    params: RowParams
    encoded: list = field(default_factory=list)
    state: dict | None = None            # the prefilled prompt (decode_process engines), see pack_state


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str
    finish_reason: str            # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Failed:
    error: ServeError


@dataclass
class Handle:
    """A submitted request; ``cancel()`` removes it from its batch at the next step."""

    prepared: Prepared
    sink: Callable[[object], None]
    stream: bool = True
    submitted: float = field(default_factory=time.perf_counter)
    on_cancel: Callable[[], None] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, event: object) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a sink must never stop the worker
            log.exception("event sink failed for %s", self.prepared.id)


class Engine:
    """A medmllm model answering chat requests in dynamic batches (see module doc).

    ``shapes``: the :class:`~medmllm.data.dataset.ModalityShapes` files are loaded with (default:
    what the model fixes, :func:`medmllm.model.inspect.modality_shapes_for`). ``max_context``:
    prompt + max_tokens ceiling (default: the LLM's ``max_position_embeddings``). ``decode_process``:
    decode in a child process (see module doc); needs a CPU model loaded with :meth:`from_pretrained`
    (the child loads the same folder, ``source``) whose KV cache can be merged (not Gemma 3's sliding window);
    ``"auto"``: in a child process where that is possible, else in this one (``medmllm serve``'s default).
    ``prepare_concurrency``: how many requests :meth:`prepare` works on at once (files, template, encoders and,
    with ``decode_process``, prefill); the others wait their turn. 1 (the default) is fastest on a few cores:
    request threads running the model side by side fight over the cores and the interpreter lock (at 8
    clients on 2 cores, 1 gave 1.2x the tokens/s of 8: ``python bench/serve_load.py --prepare-concurrency N``).
    """

    def __init__(self, model, tokenizer, *, model_id: str = "medmllm", shapes=None, max_batch: int = 8,
                 queue_size: int = 64, batch_window_ms: float = 5.0, max_context: int | None = None,
                 default_max_tokens: int = 256, decode_process: bool | str = False, source: str | Path | None = None,
                 prepare_concurrency: int = 1):
        from medmllm.data.collate import MultimodalCollator
        from medmllm.data.dataset import PartLoader
        from medmllm.model.inspect import modality_shapes_for

        if max_batch < 1 or queue_size < 1 or prepare_concurrency < 1:
            raise ServeError(500, f"max_batch, queue_size and prepare_concurrency must be >= 1, got {max_batch}, "
                                  f"{queue_size} and {prepare_concurrency}", "bad_config")
        self.model = model.eval()
        llama_step.pack_weights(model.llm)              # CPU fp32 Llama/Qwen2: projections without repacking
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_batch, self.queue_size = int(max_batch), int(queue_size)
        self.batch_window_s = max(0.0, batch_window_ms / 1000.0)
        self.max_context = int(max_context or getattr(model.llm.config, "max_position_embeddings", 2048))
        self.default_max_tokens = int(default_max_tokens)
        self.shapes = shapes if shapes is not None else modality_shapes_for(model)
        self.loader = PartLoader(self.shapes)
        self._prep_collator = MultimodalCollator(tokenizer, _BIG, model.num_tokens, train=False)
        self._prep_lock = threading.Lock()  # fast tokenizers must not be used by two threads at once
        self.prepare_concurrency = int(prepare_concurrency)
        self._prepare_slots = threading.Semaphore(self.prepare_concurrency)   # requests in prepare at once
        self._worker_tokenizer = copy.deepcopy(tokenizer)
        self._collator = MultimodalCollator(self._worker_tokenizer, _BIG, model.num_tokens, train=False)
        self._queue: queue.Queue[Handle | None] = queue.Queue(maxsize=self.queue_size)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._special = [t for t in tokenizer.all_special_tokens if t]
        self.stats = {"batches": 0, "requests": 0, "forward_passes": 0, "largest_batch": 0,
                      "joined_running_batch": 0, "decode_steps": 0, "row_steps": 0,
                      "longest_cache": 0}
        if decode_process not in (True, False, "auto"):
            raise ServeError(500, f"decode_process: expected True, False or 'auto', got {decode_process!r}",
                             "bad_config")
        self.source = source
        self._proc = None                                  # the DecodeProcess, once started
        self._handles: dict[str, Handle] = {}              # decode_process: submitted, not yet ended
        self._handles_lock = threading.Lock()
        self._auto, self.decode_process = decode_process == "auto", bool(decode_process)
        if self.decode_process:
            try:
                self._check_decode_process()
            except ServeError as exc:
                if not self._auto:
                    raise
                log.info("decoding in this process: %s", exc.message)
                self.decode_process = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "Engine":
        """Load ``MedMLLM.from_pretrained(path)`` and the tokenizer saved next to it."""
        from medmllm.data.tokenizers import load_tokenizer
        from medmllm.model.mllm import MedMLLM

        p = Path(path)
        if not (p / "config.json").is_file():
            raise InputError(p, "expected a folder written by MedMLLM.save_pretrained (with config.json), found none")
        kw.setdefault("model_id", p.name if p.name != "model" else f"{p.parent.name}-model")
        kw.setdefault("source", p)
        return cls(MedMLLM.from_pretrained(p).eval(), load_tokenizer(p), **kw)

    @property
    def modalities(self) -> list[str]:
        return sorted(self.model.encoders)

    # ------------------------------------------------------------------ worker

    def start(self) -> "Engine":
        """Start the worker thread, or the decode process (idempotent). With ``decode_process="auto"``, a decode
        process that fails to start is logged and the engine decodes in this process instead."""
        if self.decode_process:
            if self._proc is None:
                import torch

                from medmllm.serve.decode_process import DecodeProcess

                try:
                    self._proc = DecodeProcess(self.source, self.max_batch, torch.get_num_threads(), self._on_event,
                                               self._on_exit, stats=self.stats).start()
                except ServeError as exc:
                    if not self._auto:
                        raise
                    log.warning("decoding in this process: %s", exc.message)
                    self.decode_process = False
                    return self.start()
                atexit.register(self.close)
            return self
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="medmllm-serve-engine", daemon=True)
            self._thread.start()
            atexit.register(self.close)  # a daemon thread inside torch at interpreter exit aborts the process
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch it is running; waiting requests get a 503."""
        self._stop.set()
        atexit.unregister(self.close)
        if self._proc is not None:
            self._proc.close(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                h = self._queue.get_nowait()
            except queue.Empty:
                break
            if h is not None:
                h.send(Failed(ServeError(503, "the server is shutting down", "shutting_down")))

    @property
    def alive(self) -> bool:
        """Whether the worker thread (or the decode process) runs."""
        if self.decode_process:
            return self._proc is not None and self._proc.alive
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        if self.decode_process:
            return max(0, len(self._handles) - int(self.stats.get("running", 0)))
        return self._queue.qsize()

    # ------------------------------------------------------------------ decode process

    def _check_decode_process(self) -> None:
        from transformers.cache_utils import DynamicCache

        from medmllm.serve.decode import mergeable

        llm = self.model.llm
        if self.source is None:
            raise ServeError(500, "decode_process needs a model loaded from a folder (Engine.from_pretrained)",
                             "bad_config")
        if next(llm.parameters()).device.type != "cpu":
            raise ServeError(500, f"decode_process runs CPU models only; this one is on "
                                  f"{next(llm.parameters()).device}", "bad_config")
        cache = DynamicCache(config=llm.config)
        if not mergeable(cache):
            raise ServeError(500, f"decode_process needs a KV cache whose rows can be merged; {type(llm).__name__}'s "
                                  f"has {type(cache.layers[0]).__name__} layers", "bad_config")

    def _prefill_here(self, p: Prepared) -> dict:
        """``p``'s prompt prefilled on the caller's thread, packed for the decode process."""
        import torch

        from medmllm.serve.decode import _prefill
        from medmllm.serve.decode_process import pack_state

        with self._prep_lock:
            batch = self.collate([p], self._prep_collator)
        with torch.inference_mode():
            return pack_state(_prefill(self.model, batch, []))

    def _on_event(self, ev: tuple) -> None:
        kind, rid = ev[0], ev[1]
        with self._handles_lock:
            h = self._handles.get(rid) if kind == "delta" else self._handles.pop(rid, None)
        if h is None:
            return
        if kind == "delta":
            h.send(Delta(ev[2]))
        elif kind == "done":
            h.send(Done(ev[2], ev[3], h.prepared.prompt_tokens, ev[4]))
        else:
            h.send(Failed(ServeError(500, "the model failed while generating; the error was logged",
                                     "internal_error")))

    def _on_exit(self) -> None:
        """The decode process has gone (closed or died): every request still open gets a 503."""
        with self._handles_lock:
            left, self._handles = list(self._handles.values()), {}
        if left and not self._stop.is_set():
            log.error("the decode process stopped with %d requests open", len(left))
        for h in left:
            h.send(Failed(ServeError(503, "the server is shutting down" if self._stop.is_set() else
                                     "the model's decode process stopped; the error was logged",
                                     "shutting_down" if self._stop.is_set() else "engine_unavailable")))

    def _cancel_in_process(self, rid: str) -> None:
        with self._handles_lock:
            if rid not in self._handles:
                return
        self._proc.send(("cancel", rid))                   # if the child is gone, _on_exit answers the request

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first] + self._gather(self.max_batch - 1)
            batch = [h for h in batch if not h.cancelled]
            if batch:
                self._run(batch)

    def _gather(self, n: int) -> list[Handle]:
        """Up to ``n`` more waiting requests: what is queued now, then what arrives within the window."""
        out: list[Handle] = []
        deadline = time.perf_counter() + self.batch_window_s
        while len(out) < n:
            try:
                out.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                out.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
        return out

    def _run(self, handles: list[Handle]) -> None:
        """Decode ``handles`` together; requests arriving meanwhile join the running batch (continuous
        batching, up to ``max_batch`` rows). Any failure is logged and answered with a generic 500."""
        decode = lambda ids: self._worker_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        active: list[tuple[Handle, Row]] = []

        def collate(hs: list[Handle]) -> tuple[dict, list[Row]]:
            rows = [self._row(h, decode) for h in hs]
            active.extend(zip(hs, rows))
            batch = self.collate([h.prepared for h in hs])
            self.stats["requests"] += len(hs)
            return batch, rows

        def admit(n: int) -> tuple[dict, list[Row]] | None:
            if self._stop.is_set():
                return None
            hs = []
            while len(hs) < n:
                try:
                    h = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not h.cancelled:
                    hs.append(h)
            if hs and n < self.max_batch:                  # rows still running: these join them
                self.stats["joined_running_batch"] += len(hs)
            elif hs:                                       # the batch had ended: these start a new one
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(hs))
            return collate(hs) if hs else None

        # counted before decoding: a client may read the stats as soon as its Done arrives
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(handles))
        try:
            batch, rows = collate(handles)
            passes = run_batch(self.model, self._worker_tokenizer, batch, rows, admit=admit,
                               capacity=self.max_batch, stats=self.stats)
        except Exception:  # noqa: BLE001 - logged here, the clients get a generic 500
            log.exception("generation failed for a batch of %d", len(active))
            err = ServeError(500, "the model failed while generating; the error was logged", "internal_error")
            for h, r in active:
                if r.reason is None:
                    h.send(Failed(err))
            return
        self.stats["forward_passes"] += passes

    def collate(self, prepared: Sequence[Prepared], collator=None) -> dict:
        """The worker's left-padded batch of ``prepared`` requests, in order, carrying their encoded media as
        ``modality_tokens`` (the raw media tensors are left out: the model does not encode them again).
        Call it from the worker thread only (it uses the worker's tokenizer), or pass another ``collator``."""
        batch = (collator or self._collator)([p.example for p in prepared])
        if batch["ids"] != [p.id for p in prepared]:
            raise RuntimeError(f"collator dropped {batch['dropped']}")
        done: dict[str, list] = {}                           # batch order: row by row, then order of appearance
        for p in prepared:
            for kind, tokens, mask in p.encoded:
                done.setdefault(kind, []).append((tokens, mask))
        batch["modality_tokens"] = done
        batch["modality_inputs"] = {k: v for k, v in batch["modality_inputs"].items() if k not in done}
        return batch

    def _row(self, h: Handle, decode) -> Row:
        row = Row(h.prepared.params, decode, cancelled=lambda: h.cancelled, stream=h.stream)
        row.emit = lambda text: h.send(Delta(text))
        row.finish = lambda reason: h.send(Done(row.text, reason, h.prepared.prompt_tokens, row.steps))
        return row

    # ------------------------------------------------------------------ requests

    def submit(self, prepared: Prepared, sink: Callable[[object], None], stream: bool = True) -> Handle:
        """Queue ``prepared``; ``sink`` receives its events (see module doc). QueueFull when full.

        ``stream=False``: no Delta events, only the Done (the text is decoded once, at the end).
        """
        h = Handle(prepared, sink, stream)
        if self.decode_process:
            return self._submit_to_process(h)
        try:
            self._queue.put_nowait(h)
        except queue.Full:
            raise QueueFull(self.queue_size) from None
        return h

    def _submit_to_process(self, h: Handle) -> Handle:
        rid = h.prepared.id
        if self._proc is None or not self._proc.alive:
            raise ServeError(503, "the model's decode process is not running", "engine_unavailable")
        if h.prepared.state is None:
            raise ServeError(500, "the request was prepared without its prefill", "internal_error")
        with self._handles_lock:
            if len(self._handles) >= self.max_batch + self.queue_size:
                raise QueueFull(self.queue_size)
            self._handles[rid] = h
        h.on_cancel = lambda: self._cancel_in_process(rid)
        if not self._proc.alive:                           # died meanwhile: _on_exit may have run already
            with self._handles_lock:
                self._handles.pop(rid, None)
            raise ServeError(503, "the model's decode process is not running", "engine_unavailable")
        self.stats["requests"] += 1
        state, h.prepared.state = h.prepared.state, None   # the sender thread owns the arrays from here
        self._proc.send(("join", rid, h.prepared.params, h.stream, state))
        return h

    def prepare(self, messages: Sequence[dict], params: SamplingParams = SamplingParams(),
                media_params: Sequence[str] | None = None) -> Prepared:
        """medmllm record ``messages`` (media parts with a ``path``) -> a :class:`Prepared` request.

        Loads every media part with :class:`~medmllm.data.dataset.PartLoader` (EHR notes become text
        after the part, as in :class:`~medmllm.data.dataset.RecordDataset`), renders the chat template
        and checks prompt + ``max_tokens`` against ``max_context``. ``media_params`` names each media
        part's request field for error messages. Raises ServeError (422).
        """
        with self._prepare_slots:
            return self._prepare(messages, params, list(media_params or []))

    def _prepare(self, messages: Sequence[dict], params: SamplingParams, media_params: list[str]) -> Prepared:
        rid = f"req-{next(self._ids)}"
        content, mods = self._load(messages, media_params)
        record = {"id": rid, "stage": "instruction", "meta": {"dataset": "serve", "split": "test"},
                  "messages": content}
        example = {"record": record, "modalities": mods}
        try:
            with self._prep_lock:
                sample = self._prep_collator.encode(example)
        except MedmllmError as exc:
            log.info("conversation refused (%s): %s", rid, exc)
            raise invalid("messages: the conversation does not fit the model's chat template (for example "
                          "roles must alternate user/assistant for some models)", "invalid_conversation",
                          "messages", detail=str(exc)) from None
        n = len(sample.input_ids)
        row_params = self._row_params(params, n)
        prepared = Prepared(rid, example, n, row_params, self._encode(rid, mods))
        if self.decode_process:
            prepared.state = self._prefill_here(prepared)
        return prepared

    def _encode(self, rid: str, mods: list) -> list:
        """Each media tensor -> ``(kind, tokens [M, H], mask [M])`` through its encoder and projector.

        Runs on the caller's thread: torch releases the GIL inside the encoders' kernels, so a request's
        encoding overlaps the worker's decoding of the others (the worker then only embeds and prefills).
        """
        import torch

        out = []
        with torch.inference_mode():
            for kind, tensor in mods:
                try:
                    tokens, mask = self.model.encode_item(kind, tensor)
                except MedmllmError as exc:
                    log.info("input refused by the %s encoder (%s): %s", kind, rid, exc)
                    raise invalid(f"the {kind} input does not fit the model's {kind} encoder", "invalid_input",
                                  "messages", detail=str(exc)) from None
                out.append((kind, tokens, mask))
        return out

    def _row_params(self, p: SamplingParams, n: int) -> RowParams:
        ctx = self.max_context
        if n >= ctx:
            raise invalid(f"this model's context is {ctx} tokens; the prompt alone has {n} tokens (images and "
                          f"files included): shorten it", "context_length_exceeded", "messages")
        max_tokens = p.max_tokens if p.max_tokens is not None else min(self.default_max_tokens, ctx - n)
        if n + max_tokens > ctx:
            raise invalid(f"this model's context is {ctx} tokens; the prompt has {n} tokens and max_tokens is "
                          f"{max_tokens} ({n + max_tokens} > {ctx}): ask for at most {ctx - n} tokens or shorten "
                          f"the prompt", "context_length_exceeded", "max_tokens")
        return RowParams(max_tokens, float(p.temperature), float(p.top_p), p.seed, tuple(s for s in p.stop if s))

    def _load(self, messages: Sequence[dict], media_params: list[str]) -> tuple[list[dict], list]:
        """Messages with EHR notes inserted, and the (kind, tensor) of every media part in order."""
        from medmllm.data.records import MODALITY_PARTS

        out, mods = [], []
        for i, m in enumerate(messages):
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            new = []
            for j, part in enumerate(parts):
                new.append(part)
                if part["type"] == "text":
                    self._check_text(part["text"], f"messages.{i}.content.{j}.text")
                    continue
                if part["type"] not in MODALITY_PARTS:
                    raise invalid(f"messages.{i}.content.{j}.type: expected text or one of {MODALITY_PARTS}",
                                  "invalid_part", f"messages.{i}.content.{j}")
                param = media_params[len(mods)] if len(mods) < len(media_params) else f"messages.{i}.content.{j}"
                if part["type"] not in self.model.encoders:
                    raise invalid(f"{param}: this model takes no {part['type']} input; it takes "
                                  f"{self.modalities}", "unsupported_modality", param)
                try:
                    tensor, text = self.loader(part, ".")
                except Exception as exc:  # noqa: BLE001 - readers raise InputError; anything else is logged too
                    log.info("unreadable %s at %s: %s", part["type"], param, exc,
                             exc_info=not isinstance(exc, MedmllmError))
                    raise invalid(f"{param}: the {part['type']} file could not be read (a corrupt or unsupported "
                                  "file)", "unreadable_file", param, detail=str(exc)) from None
                mods.append((part["type"], tensor))
                if text:
                    new.append({"type": "text", "text": text})
            out.append({"role": m["role"], "content": new})
        return out, mods

    def _check_text(self, text: str, param: str) -> None:
        found = [t for t in self._special if t in text]
        if found:
            raise invalid(f"{param}: the text holds the model's control or placeholder tokens {found[:4]}, "
                          "which are reserved", "reserved_tokens", param)

    # ------------------------------------------------------------------ blocking helpers

    def stream(self, messages: Sequence[dict], params: SamplingParams = SamplingParams(),
               timeout: float | None = None) -> Iterator[Delta | Done]:
        """Blocking: yield Delta events, then the Done event (a Failed event raises its ServeError).

        The engine must be started. Closing the iterator early cancels the request.
        """
        events: queue.Queue = queue.Queue()
        h = self.submit(self.prepare(messages, params), events.put)
        try:
            while True:
                ev = events.get(timeout=timeout)
                if isinstance(ev, Failed):
                    raise ev.error
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            h.cancel()

    def complete(self, messages: Sequence[dict], params: SamplingParams = SamplingParams(),
                 timeout: float | None = None) -> Done:
        """Blocking: the finished answer (see :meth:`stream`)."""
        for ev in self.stream(messages, params, timeout):
            if isinstance(ev, Done):
                return ev
        raise ServeError(500, "the request ended without an answer", "internal_error")


__all__ = ["Delta", "Done", "Engine", "Failed", "Handle", "Prepared", "SamplingParams"]
