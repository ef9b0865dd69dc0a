"""What ``irefine setup`` did: one line per Prefect object it created, updated or left alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["created", "updated", "unchanged"]


@dataclass(frozen=True)
class SetupItem:
    """One object and what setup did to it."""

    kind: str  # "work-pool", "work-queue", "concurrency-limit", "notification-block" or "automation"
    name: str
    outcome: Outcome
    detail: str = ""

    def line(self) -> str:
        return f"{self.outcome:<9} {self.kind} {self.name}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SetupReport:
    """What :func:`setup_prefect` created, updated and found unchanged, in order."""

    items: list[SetupItem] = field(default_factory=list)

    def add(self, kind: str, name: str, outcome: Outcome, detail: str = "") -> None:
        self.items.append(SetupItem(kind, name, outcome, detail))

    def names(self, outcome: Outcome) -> list[str]:
        return [f"{i.kind} {i.name}" for i in self.items if i.outcome == outcome]

    @property
    def created(self) -> list[str]:
        return self.names("created")

    @property
    def updated(self) -> list[str]:
        return self.names("updated")

    @property
    def unchanged(self) -> list[str]:
        return self.names("unchanged")
