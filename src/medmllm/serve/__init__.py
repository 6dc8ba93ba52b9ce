"""Serving medmllm models: an OpenAI-compatible HTTP server with medical inputs, and a terminal chat.

* :mod:`medmllm.serve.engine` — :class:`~medmllm.serve.engine.Engine`: a saved model behind a
  dynamic batcher (bounded queue, streaming, per-request sampling, usage counts).
* :mod:`medmllm.serve.inputs` — OpenAI messages -> medmllm messages: strict data URLs, MIME
  allowlist checked against the bytes, decompression bombs refused from the header.
* :mod:`medmllm.serve.app` — ``create_app(engine, api_keys, cors_origins, limits)`` (FastAPI):
  ``/v1/chat/completions`` (SSE streaming too), ``/v1/models``, ``/health``, ``/v1/preview``, the web page.
* :mod:`medmllm.serve.cli` — ``medmllm serve``, ``medmllm chat``, ``stream_answer``.

FastAPI and uvicorn are imported only by :mod:`~medmllm.serve.app` and the ``serve`` command.
"""
