"""Config problems: what is wrong, and exactly where (file, document, field path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    doc: int  # 0-based index of the YAML document in its file
    path: str  # field path inside the document, e.g. spec.http[0].route[0].weight
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.doc}: {self.path or '(document)'}"
        if self.severity == "warning":
            return f"{where}: warning: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration Istio would reject; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DocProblems:
    """Problem collector for one YAML document: its file and index go into every Problem."""

    __slots__ = ("file", "index", "problems", "errors")

    def __init__(self, file: str, index: int, problems: list[Problem]) -> None:
        self.file, self.index, self.problems, self.errors = file, index, problems, 0

    def error(self, path: str, message: str) -> None:
        self.errors += 1
        self.problems.append(Problem(self.file, self.index, path, message))

    def warn(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, self.index, path, message, "warning"))
