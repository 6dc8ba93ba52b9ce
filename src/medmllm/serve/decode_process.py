"""The decode loop in a process of its own, fed with prompts already prefilled where they were prepared.

Why: with a small model on CPU, a decode step is mostly Python and operator dispatch, and in one process
the decode thread and the request threads (media encoding, prefill) take turns on one interpreter lock.
Here the serving process prepares each request on its thread (files, chat template, media encoded,
prompt prefilled: a one-row :class:`~medmllm.serve.decode.DecodeState`) and sends that state through a
pipe; a child process holds the running batch, merges arriving rows in between two steps (as
:func:`~medmllm.serve.decode.run_batch` does with requests that join) and sends back each step's events.

Wire format (``pickle`` of plain Python objects and NumPy arrays; tensors go as raw bytes, so bf16 travels
too; no shared memory to leak). Parent -> child::

    ("join", rid, RowParams, stream, state)       # state: pack_state(one-row DecodeState)
    ("cancel", rid)                                # the row leaves the batch at the next step
    ("stop",)                                      # finish nothing more; exit

Child -> parent: ``("ready", None)`` once the model is loaded, then ``("events", [event, ...], stats)``
after every step that produced events, where an event is ``("delta", rid, text)``, ``("done", rid, text,
finish_reason, completion_tokens)`` or ``("failed", rid)``; ``("error", message)`` if loading fails.

The child decodes with :func:`~medmllm.serve.decode._step` (the written-out Llama step where it applies), so
a greedy answer is the token sequence the in-process engine gives. CPU models with caches that can be
merged (:func:`~medmllm.serve.decode.mergeable`) only.
"""

from __future__ import annotations

import logging
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from medmllm.serve import llama_step
from medmllm.serve.decode import (DecodeState, Row, RowParams, _grow_in_place, merge, push_tokens, seed_rows,
                                  step_rows)

log = logging.getLogger("medmllm.serve")


# ----------------------------------------------------------------------------- wire

def _tensor_out(t: torch.Tensor) -> tuple[str, tuple, np.ndarray]:
    t = t.detach().contiguous().cpu()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.view(torch.uint8).numpy()


def _tensor_in(wire: tuple[str, tuple, np.ndarray]) -> torch.Tensor:
    dtype, shape, data = wire
    return torch.from_numpy(np.array(data, copy=True)).view(getattr(torch, dtype)).reshape(shape)


def pack_state(st: DecodeState) -> dict:
    """A one-row prefilled state as plain data: per-layer keys/values ``[1, heads, L, dim]``, next-token
    logits ``[1, V]``, next position, attention mask ``[1, L]`` (or None) and length."""
    if len(st.rows) > 1 or st.logits.shape[0] != 1:
        raise ValueError(f"pack_state: expected a one-row state, got {st.logits.shape[0]} rows")
    return {"kv": [(_tensor_out(x.keys), _tensor_out(x.values)) for x in st.cache.layers],
            "logits": _tensor_out(st.logits), "next_pos": int(st.next_pos[0, 0]),
            "attention": None if st.attention is None else _tensor_out(st.attention), "length": st.length}


def unpack_state(data: dict, row: Row) -> DecodeState:
    """The :class:`DecodeState` of :func:`pack_state`'s ``data`` for ``row`` (a fresh ``DynamicCache``)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache()
    layers = []
    for k, v in data["kv"]:
        layer = DynamicLayer()
        layer.lazy_initialization(_tensor_in(k), _tensor_in(v))
        layer.keys, layer.values = _tensor_in(k), _tensor_in(v)
        layers.append(layer)
    cache.layers = layers
    _grow_in_place(cache)                                        # decode steps append in place
    attention = None if data["attention"] is None else _tensor_in(data["attention"])
    return DecodeState(cache, _tensor_in(data["logits"]), attention, torch.tensor([[data["next_pos"]]]), [row],
                       int(data["length"]))


# ----------------------------------------------------------------------------- child

class _Loop:
    """The child's batch: admits joined rows between steps, steps, reports events and stats."""

    def __init__(self, model, tokenizer, capacity: int, conn_in, conn_out):
        from medmllm.model.generate import eos_ids

        self.model, self.tok, self.capacity = model, tokenizer, capacity
        self.conn_in, self.conn_out = conn_in, conn_out
        self.eos = set(eos_ids(model, tokenizer))
        self.waiting: deque = deque()
        self.cancelled: set[str] = set()
        self.events: list = []
        self.stats = {"batches": 0, "forward_passes": 0, "largest_batch": 0, "joined_running_batch": 0,
                      "decode_steps": 0, "row_steps": 0, "longest_cache": 0, "running": 0}
        self.st: DecodeState | None = None
        self.joining: list[Row] = []          # rows taken from ``waiting`` and not yet in ``st``

    def run(self) -> None:
        while self._intake(block=self.st is None and not self.waiting):
            try:
                self._admit()
                if self.st is not None:
                    self._advance()
            except Exception:  # noqa: BLE001 - logged; the batch's clients get a 500, the loop goes on
                log.exception("the decode process failed on a batch")
                for row in [*(self.st.rows if self.st is not None else []), *self.joining]:
                    if row.reason is None:
                        self.events.append(("failed", row.rid))
                self.st, self.joining = None, []
            self.stats["running"] = len(self.st.rows) if self.st is not None else 0
            if self.events:
                self.conn_out.send_bytes(pickle.dumps(("events", self.events, dict(self.stats))))
                self.events = []

    def _intake(self, block: bool) -> bool:
        """Read every waiting message (blocking for one when ``block``); False on stop or a closed pipe."""
        try:
            while block or self.conn_in.poll():
                block = False
                msg = pickle.loads(self.conn_in.recv_bytes())
                if msg[0] == "stop":
                    return False
                if msg[0] == "join":
                    self.waiting.append(msg[1:])
                elif msg[0] == "cancel":
                    self._cancel(msg[1])
        except (EOFError, OSError):
            return False
        return True

    def _cancel(self, rid: str) -> None:
        for item in self.waiting:
            if item[0] == rid:                       # not decoding yet: leaves without a step
                self.waiting.remove(item)
                self.events.append(("done", rid, "", "cancelled", 0))
                return
        self.cancelled.add(rid)

    def _row(self, rid: str, params: RowParams, stream: bool) -> Row:
        row = Row(params, lambda ids: self.tok.decode(ids, skip_special_tokens=True), stream=stream,
                  cancelled=lambda: rid in self.cancelled)
        row.rid = rid
        row.emit = lambda text: self.events.append(("delta", rid, text))
        row.finish = lambda reason: self._finish(row, reason)
        return row

    def _finish(self, row: Row, reason: str) -> None:
        self.cancelled.discard(row.rid)
        self.events.append(("done", row.rid, row.text, reason, row.steps))

    def _admit(self) -> None:
        running = len(self.st.rows) if self.st is not None else 0
        states = []
        while self.waiting and running + len(states) < self.capacity:
            rid, params, stream, data = self.waiting.popleft()
            row = self._row(rid, params, stream)
            self.joining.append(row)
            seed_rows([row], "cpu")
            states.append(unpack_state(data, row))
        if not states:
            return
        if self.st is None:
            self.stats["batches"] += 1
        else:
            self.stats["joined_running_batch"] += len(states)
        self.st = merge(([self.st] if self.st is not None else []) + states)
        self.joining = []
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.st.rows))

    def _advance(self) -> None:
        """One token for every row (the step of :func:`~medmllm.serve.decode.run_batch`)."""
        with torch.inference_mode():
            tok, keep = push_tokens(self.st, self.eos)
            if not keep:
                self.st = None
                return
            step_rows(self.model, self.st, tok, keep, self.stats)
        self.stats["forward_passes"] += 1


def _child_main(model_dir: str, capacity: int, threads: int, fd: int) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        torch.set_num_threads(threads)
        from medmllm.data.tokenizers import load_tokenizer
        from medmllm.model.mllm import MedMLLM

        model = MedMLLM.from_pretrained(model_dir).eval()
        llama_step.pack_weights(model.llm)
        loop = _Loop(model, load_tokenizer(model_dir), capacity, conn, conn)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which refuses to start
        conn.send_bytes(pickle.dumps(("error", f"{type(exc).__name__}: {exc}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    loop.run()


# ----------------------------------------------------------------------------- parent

class DecodeProcess:
    """The parent's end: starts the child, sends rows and cancellations, and hands each event to
    ``on_event(event)`` on a reader thread, updating ``stats`` with the child's counters (its own
    ``requests`` aside: the child counts ``batches``, ``decode_steps``, ``row_steps``, ``running`` ...);
    ``on_exit()`` is called once when the child goes away (closed or dead).

    The child is ``python -m medmllm.serve.decode_process`` (not a ``multiprocessing`` spawn, which would
    import the caller's ``__main__`` again), talking over a socket pair."""

    def __init__(self, model_dir: str | Path, capacity: int, threads: int,
                 on_event: Callable[[tuple], None], on_exit: Callable[[], None], stats: dict | None = None):
        self.model_dir, self.capacity, self.threads = str(model_dir), int(capacity), int(threads)
        self.on_event, self.on_exit = on_event, on_exit
        self.stats: dict = stats if stats is not None else {}      # updated with the child's counters
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()     # messages for the sender thread
        self._sender: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 300.0) -> "DecodeProcess":
        from multiprocessing.connection import Connection

        from medmllm.serve.errors import ServeError

        ours, theirs = socket.socketpair()
        for sock in (ours, theirs):                      # room for a few prompts' KV caches in flight
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        fd = theirs.fileno()
        self._proc = subprocess.Popen([sys.executable, "-m", "medmllm.serve.decode_process", self.model_dir,
                                       str(self.capacity), str(self.threads), str(fd)], pass_fds=(fd,))
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            if not self._conn.poll(timeout):
                raise ServeError(500, f"the decode process did not start within {timeout:.0f} s", "bad_config")
            kind, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            kind, payload = "error", f"it exited with code {self._proc.wait(timeout)}"
        except ServeError:
            self.close()
            raise
        if kind != "ready":
            self.close()
            raise ServeError(500, f"the decode process could not load {self.model_dir}: {payload}", "bad_config")
        self._reader = threading.Thread(target=self._read, name="medmllm-decode-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._write, name="medmllm-decode-sender", daemon=True)
        self._sender.start()
        return self

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._reader is not None \
            and self._reader.is_alive()

    def send(self, msg: tuple) -> None:
        """Queue one message for the child. The sender thread pickles and writes it, so the caller (the
        server's event loop) never waits while the child is busy with a step and the pipe is full."""
        self._outbox.put(msg)

    def _write(self) -> None:
        while True:
            msg = self._outbox.get()
            try:
                self._conn.send_bytes(pickle.dumps(msg))
            except (OSError, ValueError):
                return                                   # the child is gone: the reader reports it
            if msg[0] == "stop":
                return

    def _read(self) -> None:
        try:
            while True:
                kind, events, stats = pickle.loads(self._conn.recv_bytes())
                self.stats.update(stats)
                for ev in events:
                    self.on_event(ev)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a bug in a handler must not leave clients waiting silently
            log.exception("the decode process reader failed")
        self.on_exit()

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, wait for it (then kill it), and close the connection."""
        if self._proc is None:
            return
        if self._sender is not None and self._sender.is_alive():
            self.send(("stop",))
            self._sender.join(timeout)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)
        self._conn.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)


if __name__ == "__main__":                      # the child: MODEL_DIR CAPACITY THREADS FD (see DecodeProcess)
    _child_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))


__all__ = ["DecodeProcess", "pack_state", "unpack_state"]
