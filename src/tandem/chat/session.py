"""A conversation with a model: history, chat template, thinking, streamed answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tandem.chat.reasoning import ReasoningStream, split_reasoning
from tandem.chat.template import ChatTemplate, prompt_ids, template_for
from tandem.runtime.sampler import SamplingParams
from tandem.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Reply:
    reasoning: str = ""
    answer: str = ""
    finish_reason: str = "stop"  # stop | length | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ChatSession:
    llm: object  # tandem.LLM
    tokenizer: Tokenizer
    template: ChatTemplate
    params: SamplingParams
    force_think: bool = False
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    @classmethod
    def for_model(cls, llm, params: SamplingParams | None = None, model_path=None,
                  **kwargs) -> ChatSession:
        """Tokenizer and template from the GGUF; a tokenizer.json in `model_path` (the original
        Hugging Face folder) takes the tokenizer's place when present."""
        meta = llm.file.metadata
        hf_tokenizer = Path(model_path).expanduser() / "tokenizer.json" if model_path else None
        if hf_tokenizer is not None and hf_tokenizer.is_file():
            tokenizer = Tokenizer.from_file(hf_tokenizer)
        else:
            tokenizer = Tokenizer.from_gguf(meta, str(llm.file.path))
        return cls(llm, tokenizer, template_for(meta, tokenizer),
                   params or SamplingParams.defaults_for(meta), **kwargs)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, user: str) -> tuple[list[int], list[dict]]:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        messages += self.history + [{"role": "user", "content": user}]
        return prompt_ids(self.template, self.tokenizer, messages, self.force_think), messages

    def ask(self, user: str, reply: Reply | None = None) -> Iterator[tuple[str, str]]:
        """Stream ('reasoning' | 'answer', text) pieces; `reply` collects the whole answer.
        The turn enters the history when the stream ends, even if it was cut short; earlier
        reasoning is left out of the history (DeepSeek-R1's rule)."""
        reply = reply if reply is not None else Reply()
        ids, _ = self.prompt_ids(user)
        reply.prompt_tokens = len(ids)
        decoder = StreamDecoder(self.tokenizer)
        router = ReasoningStream(forced_open=self.force_think)
        stops = self.tokenizer.stop_ids() | set(self.params.stop_token_ids)
        params = self.params.updated(stop_token_ids=tuple(stops))
        text, count = "", 0
        reply.finish_reason = "cancelled"
        try:
            for token in self.llm.stream(ids, params):
                count += 1
                if token in stops:
                    reply.finish_reason = "stop"
                    break
                piece = decoder.push(token)
                text += piece
                hit = _stop_string(text, self.params.stop)
                if hit is not None:
                    piece = piece[: len(piece) - (len(text) - hit)]
                    text = text[:hit]
                    yield from router.feed(piece)
                    reply.finish_reason = "stop"
                    break
                yield from router.feed(piece)
            else:
                reply.finish_reason = "length" if count >= params.max_new_tokens else "stop"
            yield from router.flush()
        finally:
            reply.completion_tokens = count
            reply.reasoning, reply.answer = split_reasoning(text, forced_open=self.force_think)
            self.history += [{"role": "user", "content": user},
                             {"role": "assistant", "content": reply.answer}]


def _stop_string(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
