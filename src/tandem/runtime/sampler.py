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
        ids = None  # candidates: all tokens, or these ids (most likely first)
        if 0 < p.top_k < logits.numel():
            logits, ids = logits.topk(p.top_k)
        probs = logits.softmax(dim=-1)
        if not torch.isfinite(total := probs.sum()):
            raise TandemError(f"cannot sample: the probabilities sum to {float(total)} (the "
                              "model's logits hold NaN or infinity)")
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0
        if p.top_p < 1.0:
            probs, order = _nucleus(probs, p.top_p)
            ids = order if ids is None else ids[order]
        choice = _draw(probs, self.generator)
        return int(choice if ids is None else ids[choice])

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


# Sorting a 129k vocabulary takes ~9 ms on a CPU core; the nucleus of a trained model's
# distribution lies almost always among its few hundred most likely tokens.
NUCLEUS_TRIES = (256, 4096)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest prefix of the tokens sorted by probability whose mass reaches top_p of the
    total (the first token always stays): its probabilities and their positions in `probs`.
    Tries the top 256 and 4096 first, exact whenever their mass reaches top_p: any token past
    them has at least that much mass before it, so it would be dropped too."""
    goal = top_p * probs.sum()
    for k in NUCLEUS_TRIES:
        if k >= probs.numel():
            break
        top, order = probs.topk(k)
        if top.sum() >= goal:
            return _prefix(top, order, goal)
    return _prefix(*probs.sort(descending=True), goal)


def _prefix(top: torch.Tensor, order: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of tokens sorted by probability, those with less than `goal` of mass ahead of them."""
    keep = int(((top.cumsum(0) - top) < goal).sum().clamp(min=1))
    return top[:keep], order[:keep]


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """A position drawn with chances proportional to `probs` (not normalized; zeros never):
    one uniform number against the running sum, not torch.multinomial's pass over them all."""
    cumulative = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    return min(int(torch.searchsorted(cumulative, u, right=True)), probs.numel() - 1)
