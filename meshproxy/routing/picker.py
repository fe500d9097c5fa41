"""Weighted destination pick, as Envoy's weighted clusters: `random % total` over cumulative ranges."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WeightedPicker(Generic[T]):
    """Destinations with weight 0 never win unless all are 0; a single destination always wins."""

    choices: tuple[T, ...]
    upper_bounds: tuple[int, ...]  # cumulative weights: choice i owns [upper[i-1], upper[i])
    total: int

    @classmethod
    def compile(cls, weighted: Sequence[tuple[T, int]]) -> WeightedPicker[T]:
        kept = [(c, w) for c, w in weighted if w > 0] or list(weighted[:1])
        bounds, running = [], 0
        for _, weight in kept:
            running += max(weight, 0)
            bounds.append(running)
        return cls(tuple(c for c, _ in kept), tuple(bounds), running)

    def pick(self, randbelow: Callable[[int], int]) -> T:
        if len(self.choices) == 1:
            return self.choices[0]
        return self.choices[bisect_right(self.upper_bounds, randbelow(self.total))]

    def pick_hashed(self, key_hash: int) -> T:
        """Sticky pick: the same key always lands on the same destination for the same weights."""
        if len(self.choices) == 1:
            return self.choices[0]
        return self.choices[bisect_right(self.upper_bounds, key_hash % self.total)]
