"""From a generated text to a verdict: cut at stop strings, extract the answer, normalize, compare.

Each step is defined as lm-evaluation-harness defines it, so a task exported to lm-eval
(`lmeval.task_spec`) gives the same verdicts:

- cut: the text before the first occurrence of any stop string (`postprocess_generated_text`);
- extract: `re.findall(pattern)`, the match `group` picks (0 first, -1 last); a match with
  several groups gives its first non-empty one; stripped (lm-eval's `regex` filter). A text
  with no match has no answer (lm-eval's "[invalid]") and is wrong; the harness counts these;
- normalize both the answer and the gold: strip, then numbers, then case, then punctuation
  (lm-eval's `exact_match`: `regexes_to_ignore`, `ignore_case`, `ignore_punctuation`).
  `numbers` removes thousands separators and `$` and compares numbers by value:
  `1,000` = `1000` = `1000.0`. Exported to lm-eval it removes `,`, `$` and a `.0…` tail, so the
  two differ only for decimals with trailing zeros after a non-zero digit (`2.50` vs `2.5`).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..errors import MergeSearchError

NUMBER = r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?"
# Named extractions, each a regex and a group: what they mean is exactly what they export.
EXTRACTORS = {
    "first_number": (NUMBER, 0),
    "last_number": (NUMBER, -1),
    "first_line": (r"(?m)^[ \t]*(\S[^\n]*)", 0),
}


def cut_at_stops(text: str, stops: list[str]) -> str:
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@dataclass(frozen=True)
class Extractor:
    """An answer out of a generated text: `re.findall(pattern)[group]`, or None."""

    pattern: str
    group: int = 0

    def __call__(self, text: str) -> str | None:
        found = re.findall(self.pattern, text)
        if not found:
            return None
        m = found[self.group]
        if isinstance(m, tuple):
            m = next((g for g in m if g), None)
            if m is None:
                return None
        return m.strip()

    @classmethod
    def parse(cls, spec, where: str) -> Extractor | None:
        """`extract:` of a task file: a name (first_number, last_number, first_line) or
        {regex: PATTERN, group: first|last}."""
        if spec is None:
            return None
        if isinstance(spec, str):
            if spec not in EXTRACTORS:
                raise MergeSearchError(
                    f"{where}: extract: {spec!r} is not one of {', '.join(EXTRACTORS)}, "
                    "or give {regex: PATTERN, group: first|last}"
                )
            return cls(*EXTRACTORS[spec])
        if not isinstance(spec, dict) or "regex" not in spec or set(spec) - {"regex", "group"}:
            raise MergeSearchError(
                f"{where}: extract must be a name or {{regex: PATTERN, group: first|last}}"
            )
        group = spec.get("group", "first")
        if group not in ("first", "last"):
            raise MergeSearchError(f"{where}: extract.group is {group!r}; use first or last")
        try:
            re.compile(spec["regex"])
        except (re.error, TypeError) as e:
            raise MergeSearchError(f"{where}: extract.regex {spec['regex']!r} does not compile ({e})") from e
        return cls(str(spec["regex"]), 0 if group == "first" else -1)


_NUM_NOISE = re.compile(r"[,$]")
_ZERO_TAIL = re.compile(r"(?<=\d)\.0+$")


@dataclass(frozen=True)
class Normalizer:
    strip: bool = True
    case: bool = False  # True: ignore case
    punctuation: bool = False  # True: ignore punctuation
    numbers: bool = False  # True: compare numbers by value

    KEYS = ("strip", "case", "punctuation", "numbers")

    def __call__(self, s: str) -> str:
        if self.strip:
            s = s.strip()
        if self.numbers:
            s = _NUM_NOISE.sub("", s)
            try:
                d = Decimal(s)
                if d.is_finite():
                    s = format(d.normalize(), "f") if d != d.to_integral_value() else str(int(d))
            except (InvalidOperation, ValueError):
                s = _ZERO_TAIL.sub("", s)
        if self.case:
            s = s.lower()
        if self.punctuation:
            s = s.translate(str.maketrans("", "", string.punctuation))
        return s

    def lm_eval_args(self) -> dict:
        """The same normalization as lm-eval `exact_match` arguments."""
        regexes = []
        if self.strip:
            regexes += [r"^\s+", r"\s+$"]
        if self.numbers:
            regexes += [",", r"\$", _ZERO_TAIL.pattern]
        args: dict = {"ignore_case": self.case, "ignore_punctuation": self.punctuation}
        if regexes:
            args["regexes_to_ignore"] = regexes
        return args

    @classmethod
    def parse(cls, spec, where: str) -> Normalizer:
        """`normalize:` of a task file: a list of the steps to apply, e.g. [strip, case, numbers]."""
        if spec is None:
            return cls()
        if isinstance(spec, str):
            spec = [spec]
        if not isinstance(spec, list) or any(k not in cls.KEYS for k in spec):
            raise MergeSearchError(
                f"{where}: normalize must be a list of {', '.join(cls.KEYS)} (got {spec!r})"
            )
        return cls(**{k: k in spec for k in cls.KEYS})


def verdict(text: str, gold: str, extractor: Extractor | None, norm: Normalizer) -> tuple[float, str | None]:
    """(1.0 or 0.0, the extracted answer or None when the extraction found nothing)."""
    answer = extractor(text) if extractor else text
    if answer is None:
        return 0.0, None
    return float(norm(answer) == norm(gold)), answer
