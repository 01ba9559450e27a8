"""Chat templates from GGUF files, rendered by jinja2 in a sandbox.

Templates come from downloaded files and are untrusted: the sandbox refuses attribute access
that could reach Python internals (`__class__`, `__mro__`, `__globals__`, ...), and such a
template fails with a TemplateError, never runs.
"""

from __future__ import annotations

from datetime import datetime

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tandem.chat.reasoning import THINK_OPEN
from tandem.errors import TandemError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['role'] == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}"
    "{% else %}{% if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% endif %}{{ m['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PLAIN = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% else %}{{ m['role'].capitalize() + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class TemplateError(TandemError):
    """A chat template that is broken, unsafe, or fails on the given messages."""


def fallback_template(vocabulary: set[str]) -> tuple[str, str]:
    """(name, template) for files without one, chosen by the special tokens the vocab has."""
    if "<|im_start|>" in vocabulary:
        return "chatml", CHATML
    if "<start_of_turn>" in vocabulary:
        return "gemma", GEMMA
    return "plain", PLAIN


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "GGUF"):
        self.name = name
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=jinja2.Undefined)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except JinjaTemplateError as exc:
            raise TemplateError(f"chat template ({name}) does not parse: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except SecurityError as exc:
            raise TemplateError(f"chat template ({self.name}) tried something unsafe and was "
                                f"refused: {exc}") from None
        except JinjaTemplateError as exc:
            raise TemplateError(f"chat template ({self.name}) failed: {exc}") from None


def template_for(metadata: dict, tokenizer) -> ChatTemplate:
    """The file's chat template (or the fallback its vocabulary suggests), with the tokenizer's
    BOS and EOS texts."""
    source, name = metadata.get("tokenizer.chat_template"), "GGUF"
    if not source:
        name, source = fallback_template(set(tokenizer.backend.get_vocab()))

    def text(token_id):
        return (tokenizer.backend.id_to_token(token_id) or "") if token_id is not None else ""

    return ChatTemplate(source, text(tokenizer.bos_id), text(tokenizer.eos_id), name=name)


def prompt_ids(template: ChatTemplate, tokenizer, messages: list[dict], force_think: bool) -> list[int]:
    """Token ids of the rendered conversation, ready for the assistant's turn; with
    `force_think` the turn starts inside <think> (KTransformers' --force_think)."""
    text = template.render(messages, add_generation_prompt=True)
    if force_think:
        text += THINK_OPEN + "\n"
    return tokenizer.encode(text, add_bos=False)  # the template writes BOS where it belongs


def _raise(message: str):
    raise JinjaTemplateError(message)
