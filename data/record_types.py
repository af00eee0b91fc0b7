"""What every caption reader shares (data/records.py, scale/shard_reader.py, data/images.py): the `Record`, the
errors for bad data, and the bad-record accounting (`Tally`) with its max-bad-fraction rule."""
import sys
from collections import Counter
from dataclasses import dataclass, field

from utils import UserError


@dataclass
class Record:
    id: str               # "id" field if present, else "<file stem>:<line>" / "<file stem>:<index>" / tar key
    caption: str          # stripped
    image: str | None     # absolute path (of the image, or of the tar shard holding it), None for text-only
    extra: dict = field(default_factory=dict)  # every other field, untouched
    image_span: tuple | None = None  # (offset, size) of the image's bytes inside `image` (tar member); None: whole file


class DataError(UserError):
    """Bad user data; the message says which file and what is wrong with it (a UserError: one line, exit 2)."""


class BadRecord(Exception):
    """One bad record; args: a short reason (the counting key), optionally a detail."""


class Tally:
    """Bad-record accounting of one pass over a data source, in bounded memory (counts per reason and the first
    five problems), so a stream of any length can be checked with the max-bad-fraction rule."""

    def __init__(self, what="records", where=""):
        self.what, self.where = what, where
        self.total = self.good = 0  # records seen (good or bad), records handed on
        self.counts = Counter()
        self.first = []  # (location, reason, detail) of the first five problems
        # tar shards read, and the broken ones (path, reason): a broken shard lost every sample after the break,
        # which no count of records can say, so the bad-fraction rule counts shards too
        self.shards, self.broken = 0, []

    def bad(self, location, reason, detail=""):
        self.counts[reason] += 1
        if len(self.first) < 5:
            self.first.append((location, reason, detail))

    def report(self, max_bad_fraction):
        """Print the skip summary (if anything was skipped) and raise DataError above max_bad_fraction."""
        if not self.counts:
            return
        n_bad = self.counts.total()
        summary = (f"skipped {n_bad} of {self.total} {self.what} in {self.where}: "  # ties: first seen first
                   + ", ".join(f"{r} x {n}" for r, n in self.counts.most_common()))
        first = "\n".join(f"  {loc}: {reason}{': ' + detail if detail else ''}" for loc, reason, detail in self.first)
        if self.broken:
            summary += (f"; {len(self.broken)} of {self.shards} shards are broken (lost every sample after the "
                        f"break: {', '.join(sorted({r for _, r in self.broken}))})")
        print(summary + "\n" + first, file=sys.stderr)
        shard_frac = len(self.broken) / max(1, self.shards)
        if self.broken and shard_frac > max_bad_fraction:
            raise DataError(f"{self.where}: {len(self.broken)} of {self.shards} shards are broken ({shard_frac:.2%} "
                            f"of the shards, more than max_bad_fraction={max_bad_fraction:.2%}; first: "
                            f"{self.broken[0][0]}: {self.broken[0][1]}): a broken shard loses all its samples after "
                            f"the break, however few records that counts; fix or remove the shard, or raise "
                            f"max_bad_fraction")
        frac = n_bad / max(1, self.total)
        if frac > max_bad_fraction:
            raise DataError(f"{self.where}: {n_bad} of {self.total} {self.what} are bad ({frac:.2%}), more than "
                            f"max_bad_fraction={max_bad_fraction:.2%}; first problems:\n{first}\n"
                            f"fix the data or raise max_bad_fraction")

    def finish(self, max_bad_fraction):
        """The end-of-pass checks: not empty, not too many bad, at least one good."""
        if self.total == 0:
            raise DataError(f"{self.where}: empty file, no {self.what}")
        self.report(max_bad_fraction)
        if self.good == 0:
            raise DataError(f"{self.where}: none of the {self.total} {self.what} is usable")


def report_bad(what, where, bad, total, max_bad_fraction):
    """Print the skip summary and enforce the bad fraction. bad = [(location, reason, detail)]."""
    tally = Tally(what, where)
    for loc, reason, detail in bad:
        tally.bad(loc, reason, detail)
    tally.total = total
    tally.report(max_bad_fraction)
