"""Chat templates of the LLM families medmllm trains on, as Jinja strings.

Each template is written here (no hub access) to follow the structure of the family's
official template, with one addition: every assistant turn (its content and the
end-of-turn token, not the newline after it) sits inside ``{% generation %}...
{% endgeneration %}`` so that ``tokenizer.apply_chat_template(...,
return_assistant_tokens_mask=True)`` marks exactly the tokens a model is trained on.

Message ``content`` must be a string: the collator flattens typed parts to text with one
modality placeholder (``<image>``...) per modality part before rendering.

Families (registry :data:`CHAT_TEMPLATES`, exact names):

- ``llama3``: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
- ``qwen2``:  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a default system prompt
  ("You are a helpful assistant.") when the conversation has none, as Qwen2 does.
- ``gemma``:  ``<bos><start_of_turn>{user|model}\\n{content}<end_of_turn>\\n``; the system
  message is folded into the first user turn (``system + "\\n\\n" + user``); roles must
  alternate user/model after it.
- ``chatml``: generic ChatML, like ``qwen2`` without a default system prompt and without bos.

Every template supports ``add_generation_prompt`` (the empty assistant header).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medmllm.registry import Registry


@dataclass(frozen=True)
class ChatTemplate:
    """A family's chat template and the special tokens it emits.

    ``eot_token`` closes every turn; medmllm uses it as the tokenizer's ``eos_token`` so
    ``generate()`` stops at the end of the assistant turn. ``control_tokens`` lists every
    special token the template writes (bos and eot included); ``pad_token`` is never
    written by the template.
    """

    name: str
    template: str
    eot_token: str
    pad_token: str
    bos_token: str | None = None
    control_tokens: tuple[str, ...] = ()
    assistant_header: str = ""  # what add_generation_prompt appends

    @property
    def special_tokens(self) -> list[str]:
        """bos, eot, pad and the control tokens, each once, in that order."""
        out: list[str] = []
        for t in (self.bos_token, self.eot_token, self.pad_token, *self.control_tokens):
            if t is not None and t not in out:
                out.append(t)
        return out


_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str | None) -> bool:
    """True when ``template`` marks assistant spans with ``{% generation %}`` (HF's assistant mask)."""
    return bool(template) and _GENERATION_RE.search(template) is not None


# Literal newlines below are layout only: every tag strips the whitespace around it
# (``{%-``/``{{-``) and HF renders with trim_blocks/lstrip_blocks. '\n' inside Jinja
# string literals is the rendered newline.

LLAMA3_TEMPLATE = r"""
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN2_TEMPLATE = r"""
{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = r"""
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] + '<|im_end|>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

GEMMA_TEMPLATE = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
        {%- generation %}
            {{- message['content'] | trim + '<end_of_turn>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + (first_user_prefix if loop.first else '') }}
        {{- message['content'] | trim + '<end_of_turn>' }}
    {%- endif %}
    {{- '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\n' }}
{%- endif %}
"""

CHAT_TEMPLATES: Registry[ChatTemplate] = Registry("chat template")

CHAT_TEMPLATES.register("llama3", ChatTemplate(
    name="llama3", template=LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eot_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    control_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"),
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n"))
CHAT_TEMPLATES.register("qwen2", ChatTemplate(
    name="qwen2", template=QWEN2_TEMPLATE, bos_token=None, eot_token="<|im_end|>", pad_token="<|endoftext|>",
    control_tokens=("<|im_start|>",), assistant_header="<|im_start|>assistant\n"))
CHAT_TEMPLATES.register("gemma", ChatTemplate(
    name="gemma", template=GEMMA_TEMPLATE, bos_token="<bos>", eot_token="<end_of_turn>", pad_token="<pad>",
    control_tokens=("<start_of_turn>", "<eos>"), assistant_header="<start_of_turn>model\n"))
CHAT_TEMPLATES.register("chatml", ChatTemplate(
    name="chatml", template=CHATML_TEMPLATE, bos_token=None, eot_token="<|im_end|>", pad_token="<|endoftext|>",
    control_tokens=("<|im_start|>",), assistant_header="<|im_start|>assistant\n"))


def get_chat_template(family: str) -> ChatTemplate:
    """The :class:`ChatTemplate` of ``family``; ConfigError listing the known names otherwise."""
    return CHAT_TEMPLATES.get(family)
