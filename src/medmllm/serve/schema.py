"""The OpenAI chat-completions request, validated with pydantic (strict types, bounded sizes).

Accepted (``POST /v1/chat/completions``)::

    {"model": "<id from /v1/models>",            # optional
     "messages": [{"role": "system" | "developer" | "user" | "assistant",
                   "content": "text" | [part, ...]}, ...],   # the last one from the user
     "max_tokens": 64, "max_completion_tokens": 64,  # either (same value if both)
     "temperature": 0.0..2.0 (0 = greedy), "top_p": (0, 1], "seed": int,
     "stop": "str" | ["str", ... up to 4], "stream": false,
     "stream_options": {"include_usage": true}}

Content parts: ``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}`` (see :mod:`medmllm.serve.inputs`) and the medmllm extension
``{"type": "input_file", "input_file": {"kind": "image" | "volume" | "signal" | "ehr",
"data": "<base64 or a data URL>", "filename": "ct.nii.gz", "window": "lung"}}``.

Refused with a 422 naming the field: ``n`` other than 1, ``logprobs``, ``tools``/``functions``,
a ``response_format`` other than text, non-zero ``presence_penalty``/``frequency_penalty``. Other
unknown top-level fields (``user``, ``metadata``...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_MESSAGES = 256
MAX_TEXT_CHARS = 1 << 20          # one text part
MAX_URL_CHARS = 1 << 27           # one data URL (the body limit is usually lower)
MAX_STOP = 4
MAX_STOP_CHARS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class ImageURL(_Strict):
    url: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputFile(_Strict):
    kind: Literal["image", "volume", "signal", "ehr"]
    data: Annotated[str, Field(min_length=1, max_length=MAX_URL_CHARS)]
    filename: Annotated[str, Field(max_length=255)] | None = None
    window: Annotated[str, Field(max_length=32)] | None = None


class FilePart(_Strict):
    type: Literal["input_file"]
    input_file: InputFile


Part = Annotated[Union[TextPart, ImagePart, FilePart], Field(discriminator="type")]


class Message(_Strict):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)  # e.g. "refusal": null echoed back

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Annotated[str, Field(max_length=MAX_TEXT_CHARS)],
                   Annotated[list[Part], Field(min_length=1, max_length=64)]]
    name: Annotated[str, Field(max_length=64)] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class ChatRequest(BaseModel):
    """A chat-completions request (see module doc); fields not listed are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Annotated[str, Field(max_length=256)] | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1)] | None = None
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOP)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _one_max_tokens(self) -> "ChatRequest":
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(f"max_tokens ({a}) and max_completion_tokens ({b}) differ; give one")
        return self

    @property
    def limit_tokens(self) -> int | None:
        """``max_tokens`` or ``max_completion_tokens`` (None when neither is given)."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


__all__ = ["ChatRequest", "FilePart", "ImagePart", "InputFile", "Message", "TextPart"]
