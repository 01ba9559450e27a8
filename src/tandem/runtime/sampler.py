"""Next-token choice: greedy, or temperature with top-k, top-p and min-p, after repetition,
presence and frequency penalties; seeded for reproducible output."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from tandem.errors import TandemError

# DeepSeek-R1's model card recommends these where a file carries no defaults.
R1_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}
# GGUF general.sampling.* keys (llama.cpp) -> SamplingParams fields
GGUF_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "penalty_repeat": "repetition_penalty"}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6
    top_k: int = 0  # 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (divides positive logits of seen tokens)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature {self.temperature} < 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p {self.top_p} not in (0, 1]")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p {self.min_p} not in [0, 1)")
        if self.top_k < 0:
            problems.append(f"top_k {self.top_k} < 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty {self.repetition_penalty} <= 0")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens} < 1")
        if problems:
            raise TandemError("bad sampling parameters: " + "; ".join(problems))

    @classmethod
    def defaults_for(cls, metadata: dict) -> SamplingParams:
        """The file's general.sampling.* values where present, else R1's recommendation."""
        from_file = {GGUF_KEYS[k.split(".")[-1]]: v for k, v in metadata.items()
                     if k.startswith("general.sampling.") and k.split(".")[-1] in GGUF_KEYS}
        return cls(**{**R1_DEFAULTS, **from_file})

    def updated(self, **changes) -> SamplingParams:
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in changes.items() if k in known and v is not None})


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None
                                   else torch.seed() & 0xFFFF_FFFF)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        """One token from logits [V] given the ids generated (and prompted) so far."""
        p = self.params
        if p.temperature == 0 and not self._penalizes(history):
            return int(logits.argmax())  # where the logits are: one id crosses, not the vocabulary
        logits = self._penalized(logits.float().cpu().clone(), history)
        if p.temperature == 0:
            return int(logits.argmax())
        logits /= p.temperature
        if 0 < p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = logits.softmax(dim=-1)
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p * sorted_probs.sum()
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _penalizes(self, history: list[int]) -> bool:
        p = self.params
        return bool(history) and (p.repetition_penalty != 1 or bool(p.presence_penalty)
                                  or bool(p.frequency_penalty))

    def _penalized(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        p = self.params
        if not self._penalizes(history):
            return logits
        ids, counts = torch.tensor(history).unique(return_counts=True)
        seen = logits[ids]
        if p.repetition_penalty != 1:  # CTRL's penalty, as llama.cpp and transformers apply it
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen = seen - p.presence_penalty - p.frequency_penalty * counts.float()
        logits[ids] = seen
        return logits

