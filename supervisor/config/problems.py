"""What is wrong with a manifest, and where: the one error type the loader raises."""

from __future__ import annotations

from dataclasses import dataclass

#: A manifest with more problems than this is reported by its first ones and a count of the rest:
#: a generated file with ten thousand bad entries must not make a ten-thousand-line answer.
MAX_PROBLEMS = 100


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a manifest, with where it is and what was expected."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(Exception):
    """The manifest cannot be used; ``problems`` lists every reason, each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        count = len(problems)
        if len(problems) > MAX_PROBLEMS:
            rest = len(problems) - MAX_PROBLEMS
            last = problems[MAX_PROBLEMS - 1]
            problems = [
                *problems[:MAX_PROBLEMS],
                Problem(last.file, None, None, "", f"… and {rest} more problem{'s' if rest != 1 else ''}"),
            ]
        self.problems = problems
        head = f"{count} problem{'s' if count != 1 else ''} in the manifest:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


def shown_key(part: str | int) -> str:
    """A key as a message shows it: control characters escaped, a very long one cut short."""
    text = str(part)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 60 else f"{text[:40]}…({len(text)} characters)"
