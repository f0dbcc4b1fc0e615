"""StreamingLLM: keep the first ``sinks`` tokens (attention sinks) and the most recent ones.

Nothing is scored, so the graph's attention is untouched: the pass only declares the eviction policy,
which drops the oldest non-sink slot of each head whenever a sequence exceeds its budget. Keys keep
their original positions (the reference re-rotates kept keys to contiguous positions instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tokenpass.errors import PassError
from tokenpass.methods.kvevict import KVEviction
from tokenpass.passes.registry import register


@register
@dataclass(repr=True)
class StreamingLLM(KVEviction):
    name: ClassVar[str] = "streamingllm"
    scores: ClassVar[bool] = False

    sinks: int = 4

    def validate(self) -> None:
        super().validate()
        if self.sinks < 0:
            raise PassError(f"streamingllm: sinks must be a non-negative number of tokens, got {self.sinks}")

    def policy_options(self) -> dict[str, object]:
        return {**super().policy_options(), "sinks": self.sinks}
