"""Errors of data_prep and the per-file record of bad input.

Two kinds of failure reach the user:
- `DataPrepError`: something to fix before a run can work (missing tokenizer, no input
  files, an output directory holding a different run). The CLIs print it and exit 2.
- `BadInputError`: one document (or a whole file) that cannot be read; it names the file
  and the line (SlimPajama) or row (StarCoder). By default the run stops on it; with
  `--skip-bad` each case is skipped and counted by reason in the summary instead.

`BadInputReport` is the one place that decides between the two, so every reader applies
the same policy and the counts in the summary always match what was dropped.
"""
from __future__ import annotations

from collections import Counter

# Reasons a document is dropped; the keys of "skipped_documents" in summary.json.
MALFORMED_JSON = "malformed_json"      # a SlimPajama line that is not a JSON object
MISSING_TEXT = "missing_text"          # no "text"/"content", or not a string
INVALID_UTF8 = "invalid_utf8"          # bytes that are not UTF-8 (or lone surrogates)
EMPTY = "empty"                        # empty or whitespace-only text: always skipped
TRUNCATED_ZST = "truncated_zst"        # the .zst stream ends mid-frame
CORRUPT_ZST = "corrupt_zst"            # the .zst stream cannot be decoded at all
CORRUPT_PARQUET = "corrupt_parquet"    # pyarrow cannot read (part of) the file
BAD_REASONS = (MALFORMED_JSON, MISSING_TEXT, INVALID_UTF8, TRUNCATED_ZST, CORRUPT_ZST, CORRUPT_PARQUET)

MAX_EXAMPLES = 20  # skipped-document locations kept per input file for the summary


class DataPrepError(Exception):
    """A problem the user must fix; the message says what and how."""


class BadInputError(DataPrepError):
    """One bad document or file. Picklable (plain args) so it crosses the process pool."""

    def __init__(self, path: str, location: str | None, reason: str, detail: str):
        super().__init__(path, location, reason, detail)
        self.path, self.location, self.reason, self.detail = path, location, reason, detail

    def __str__(self) -> str:
        where = f"{self.path}, {self.location}" if self.location else self.path
        return (f"{where}: {self.reason}: {self.detail}\n"
                f"  fix the input, or pass --skip-bad to skip such documents and count them "
                f"in summary.json")


class BadInputReport:
    """Applies the bad-input policy for one input file and counts what it skipped."""

    def __init__(self, path: str, skip_bad: bool):
        self.path = path
        self.skip_bad = skip_bad
        self.skipped: Counter[str] = Counter()
        self.excluded: Counter[str] = Counter()
        self.examples: list[str] = []

    def bad(self, location: str | None, reason: str, detail: str) -> None:
        """Raise (default) or count-and-continue (--skip-bad)."""
        if not self.skip_bad:
            raise BadInputError(self.path, location, reason, detail)
        self._count(location, reason)

    def empty(self, location: str) -> None:
        """Empty documents carry no tokens: skipped and counted whatever the policy."""
        self._count(location, EMPTY)

    def exclude(self, set_name: str) -> None:
        """A well-formed document left out on purpose (e.g. RedPajamaGithub)."""
        self.excluded[set_name] += 1

    def _count(self, location: str | None, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            where = f"{self.path}, {location}" if location else self.path
            self.examples.append(f"{where}: {reason}")
