"""Chat templates: sandboxed rendering, fallbacks, history rules."""

from __future__ import annotations

import pytest

from tandem.chat.template import CHATML, ChatTemplate, TemplateError, fallback_template

R1_LIKE = (  # the shape of DeepSeek-R1's template, reasoning stripped from earlier answers
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

INJECTIONS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
]


@pytest.mark.parametrize("source", INJECTIONS)
def test_template_injection_is_refused(source):
    template = ChatTemplate(source, name="evil")
    with pytest.raises(TemplateError, match=r"chat template \(evil\)"):
        template.render([{"role": "user", "content": "hi"}])


def test_chatml_render():
    text = ChatTemplate(CHATML).render([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_template_errors_are_reported():
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(TemplateError, match="failed: only user and assistant"):
        ChatTemplate("{{ raise_exception('only user and assistant') }}").render([])


def test_r1_history_drops_earlier_reasoning():
    template = ChatTemplate(R1_LIKE, bos_token="<｜begin▁of▁sentence｜>")
    text = template.render([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
    ])
    assert "add them" not in text and "<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>" in text
    assert text.endswith("<｜User｜>and 3+3?<｜Assistant｜>")


def test_fallbacks_follow_the_vocabulary():
    assert fallback_template({"<|im_start|>", "<|im_end|>"})[0] == "chatml"
    assert fallback_template({"<start_of_turn>", "<end_of_turn>"})[0] == "gemma"
    name, source = fallback_template({"a", "b"})
    assert name == "plain"
    text = ChatTemplate(source, bos_token="<s>").render([{"role": "user", "content": "Hi"}])
    assert text == "<s>User: Hi\nAssistant:"
    gemma = ChatTemplate(fallback_template({"<start_of_turn>"})[1], bos_token="<bos>")
    assert gemma.render([{"role": "user", "content": "Hi"}]) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
