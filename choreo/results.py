"""Writing results without ever losing or corrupting what is already there.

- ``write_json`` / ``write_text`` / ``write_bytes``: write to a temporary file in the same folder, then atomically
  rename. ``write_json`` writes NaN and infinities as null (JSON has no such numbers), numpy and torch numbers as
  numbers.
- ``JsonlLog``: append-only records (one finished workflow instance per line), flushed and fsynced per
  record, so an interrupted run resumes from what is on disk. A torn last line (the process died while
  writing) is ignored; a line anywhere else that is not UTF-8 or not JSON is an error naming the file and
  line (``read_jsonl`` and ``logged_results`` name them too). Each record is
  stamped with the commit and date that computed it (``written``): a table rendered later from resumed
  records names the code that computed them (``JsonlLog.written_summary``), not only the code that rendered.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import provenance  # imported with the package, so that it reads the commit of the code as imported


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) as the whole of ``path``, written atomically (``write_bytes``)."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` as the whole of ``path``: written to a temporary file in the same folder, fsynced, then renamed over
    ``path``, so a reader (or a run interrupted meanwhile) sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as indented JSON, written atomically; NaN and infinities (a mean over no step, say) become null,
    since JSON has no such numbers (Python writes them as NaN / Infinity, which other readers refuse)."""
    return write_text(path, json.dumps(finite(payload), indent=2, sort_keys=False, default=str,
                                       allow_nan=False) + "\n")


def finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite, inside dicts, lists and tuples too, replaced by None, and
    numpy and torch numbers and arrays as Python ones (JSON would otherwise get their ``str``: "0.25", "tensor(1.)").

    Example: ``finite({"seconds": float("nan"), "steps": [1.5, float("inf")]})`` -> ``{"seconds": None, "steps":
    [1.5, None]}``.
    """
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # a numpy scalar or array, a torch tensor
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _line(record: dict) -> str:
    """One JSON line of a log, as ``write_json`` writes a value (no NaN, numpy numbers as numbers)."""
    return json.dumps(finite(record), default=str, allow_nan=False) + "\n"


class JsonlLog:
    """Append-only JSON-lines records keyed by a field, for resumable runs.

    Example::

        log = JsonlLog("results/leakage/games.jsonl", key="game")
        done = log.keys()                   # keys already finished
        log.append({"game": 7, "coop": True})
    """

    STAMP = "written"  # the field each appended record gets: {"git_commit", "date"} of the process that wrote it
    # (its commit as read when it started: provenance.COMMIT_AT_START)

    def __init__(self, path: str | os.PathLike, *, key: str):
        self.path, self.key = Path(path), key
        self._commit: str | None = None

    def records(self) -> Iterator[dict]:
        for _, record in self.numbered_records():
            yield record

    def numbered_records(self) -> Iterator[tuple[int, dict]]:
        """(line number, record) of every record, each checked to be a JSON object with the key field."""
        for number, record in self._parsed():
            if not isinstance(record, dict) or self.key not in record:
                raise ValueError(f"{self.path}:{number}: record without the key field {self.key!r}")
            yield number, record

    def _parsed(self) -> Iterator[tuple[int, Any]]:
        if not self.path.exists():
            return
        yield from _json_lines(self.path, torn_ok=True)  # a torn final write is redone on resume

    def keys(self) -> set:
        return {_freeze(r[self.key]) for r in self.records()}

    def append(self, record: dict) -> None:
        record = self._stamped(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        with open(self.path, "a") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())

    def write(self, records: Sequence[dict]) -> None:
        """Replace the log with ``records``, stamped as ``append`` stamps them, in one atomic write (``write_text``):
        for records that are only of use together (a training set), so that no one ever reads part of them."""
        write_text(self.path, "".join(_line(self._stamped(r)) for r in records))

    def _stamped(self, record: dict) -> dict:
        """``record`` checked to have the key field, with the commit and date of this process (``STAMP``)."""
        if self.key not in record:
            raise ValueError(f"record lacks the key field {self.key!r}: {sorted(record)}")
        if self.STAMP in record:
            return record
        if self._commit is None:  # the code this process imported, not what the checkout holds by now
            self._commit = provenance.COMMIT_AT_START or "unknown"
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {**record, self.STAMP: {"git_commit": self._commit, "date": now}}

    def written_summary(self) -> dict:
        """Which code computed the records: the commits and date range of the stamped ones, the count of records
        from before stamping, and the commit that last changed the log file where it is tracked by git."""
        records = [r for _, r in self._parsed() if isinstance(r, dict)]
        stamps = [r[self.STAMP] for r in records if isinstance(r.get(self.STAMP), dict)]
        total = len(records)
        dates = sorted(s.get("date") for s in stamps if s.get("date"))
        return {"log": self.path.name, "records": total, "unstamped": total - len(stamps),
                "git_commits": sorted({s.get("git_commit") for s in stamps if s.get("git_commit")}),
                "first": dates[0] if dates else None, "last": dates[-1] if dates else None,
                "file_last_committed": _last_commit_of(self.path)}

    def _repair(self) -> None:
        """Make the next append start on a fresh line: a final line cut off before its newline is kept (ended with
        one) when it is a whole JSON value, as ``records`` reads it, and dropped when it is torn."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                json.loads(data[cut:])
            except ValueError:  # torn (JSONDecodeError, or bytes that are not UTF-8): redone on resume
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
            else:
                with open(self.path, "ab") as f:
                    f.write(b"\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a line that is not UTF-8 or not JSON is a ValueError
    naming file:line. Lines end at "\\n" only (``str.splitlines`` would also cut at U+2028 and the like, which JSON
    strings may hold)."""
    yield from _json_lines(Path(path), torn_ok=False)


def _json_lines(path: Path, *, torn_ok: bool) -> Iterator[tuple[int, Any]]:
    """``read_jsonl``, each line decoded on its own so that an error names its line (``path:3: not UTF-8 ...``).
    ``torn_ok``: a final line without its newline that is not UTF-8 or not JSON (a write cut off) is skipped."""
    lines = path.read_bytes().split(b"\n")  # b"\n" never occurs inside a multi-byte UTF-8 character
    for number, raw in enumerate(lines, start=1):
        torn = torn_ok and number == len(lines)  # the piece after the last newline: empty unless a write was cut
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            if torn:
                continue
            raise ValueError(f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at byte {error.start + 1} "
                             f"of the line: {error.reason})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            if torn:
                continue
            raise ValueError(f"{path}:{number}: malformed JSON line ({error.msg})") from None
        yield number, value


def logs_written(paths) -> list[dict]:
    """``JsonlLog.written_summary`` of each existing log in ``paths``: which code computed a table's records."""
    return [JsonlLog(p, key="").written_summary() for p in sorted(set(map(Path, paths))) if Path(p).exists()]


def fingerprint(**parts) -> str:
    """A short hash of ``parts``: what a run's records depend on, as the caller lists it (each suite's key says
    what it names; a part left out, such as a prompt's wording, does not change the key)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resumable(path: str | os.PathLike, items: Sequence, run: Callable,
              redo: Callable[[Any, Any], bool] | None = None) -> list:
    """Results for ``items``, reusing those already logged in the ``JsonlLog`` at ``path`` and logging new ones.

    ``run(todo_items, on_result)`` computes the missing items (``on_result(j, result)`` for todo item j), and
    those whose logged result ``redo(result, item)`` rejects (e.g. a record format that lacks a field now reported,
    or one computed from another item than the one now at its index).
    The log is append-only: an interrupted session resumes where it stopped, and the last record of an index
    is the one used.
    """
    log = JsonlLog(path, key="index")
    done = {i: result for i, result in logged_results(path).items() if i < len(items)}
    todo = [i for i in range(len(items)) if i not in done or (redo is not None and redo(done[i], items[i]))]
    if todo:
        def on_result(j, result):
            log.append({"index": todo[j], "result": result})
            done[todo[j]] = result

        run([items[i] for i in todo], on_result)
    return [done[i] for i in range(len(items))]


def logged_results(path: str | os.PathLike) -> dict[int, Any]:
    """{index: result} of the ``resumable`` log at ``path`` (the last record of an index wins; {} without a file).
    A record whose index is not an integer >= 0, or that has no result, is a ValueError naming ``path:line``.

    Example: a log holding ``{"index": 0, "result": "a"}`` -> ``{0: "a"}``.
    """
    done = {}
    for number, record in JsonlLog(path, key="index").numbered_records():
        index = record["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{path}:{number}: index {index!r} is not an integer >= 0")
        if "result" not in record:
            raise ValueError(f"{path}:{number}: the record of index {index} has no 'result'")
        done[index] = record["result"]
    return done


def _last_commit_of(path: Path) -> str | None:
    """The commit (short hash and date) that last changed ``path`` in its git checkout, if tracked."""
    try:
        out = subprocess.run(["git", "-C", str(path.parent), "log", "-1", "--format=%h %cI", "--", path.name],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value
