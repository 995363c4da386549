"""Writing results without ever losing or corrupting what is already there.

- ``write_json`` / ``write_text``: write to a temporary file in the same folder, then atomically rename.
- ``JsonlLog``: append-only records (one finished workflow instance per line), flushed and fsynced per
  record, so an interrupted run resumes from what is on disk. A torn last line (the process died while
  writing) is ignored; a malformed line anywhere else is an error naming the file and line. Each record is
  stamped with the commit and date that computed it (``written``): a table rendered later from resumed
  records names the code that computed them (``JsonlLog.written_summary``), not only the code that rendered.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
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
    return write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


class JsonlLog:
    """Append-only JSON-lines records keyed by a field, for resumable runs.

    Example::

        log = JsonlLog("results/leakage/games.jsonl", key="game")
        done = log.keys()                   # keys already finished
        log.append({"game": 7, "coop": True})
    """

    STAMP = "written"  # the field each appended record gets: {"git_commit", "date"} of the process that wrote it

    def __init__(self, path: str | os.PathLike, *, key: str):
        self.path, self.key = Path(path), key
        self._commit: str | None = None

    def records(self) -> Iterator[dict]:
        for number, record in self._parsed():
            if not isinstance(record, dict) or self.key not in record:
                raise ValueError(f"{self.path}:{number}: record without the key field {self.key!r}")
            yield record

    def _parsed(self) -> Iterator[tuple[int, Any]]:
        if not self.path.exists():
            return
        lines = self.path.read_text().split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):  # a torn final write; the record is redone on resume
                    continue
                raise ValueError(f"{self.path}:{number}: malformed JSON line ({error.msg})") from None
            yield number, record

    def keys(self) -> set:
        return {_freeze(r[self.key]) for r in self.records()}

    def append(self, record: dict) -> None:
        if self.key not in record:
            raise ValueError(f"record lacks the key field {self.key!r}: {sorted(record)}")
        if self.STAMP not in record:
            if self._commit is None:  # once per log: a subprocess per record would slow long runs
                from .provenance import git_commit

                self._commit = git_commit() or "unknown"
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            record = {**record, self.STAMP: {"git_commit": self._commit, "date": now}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
    """(line number, parsed value) for each non-blank line; a malformed line is an error naming file:line. Lines
    end at "\\n" only (``str.splitlines`` would also cut at U+2028 and the like, which JSON strings may hold)."""
    path = Path(path)
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: malformed JSON line ({error.msg})") from None


def logs_written(paths) -> list[dict]:
    """``JsonlLog.written_summary`` of each existing log in ``paths``: which code computed a table's records."""
    return [JsonlLog(p, key="").written_summary() for p in sorted(set(map(Path, paths))) if Path(p).exists()]


def fingerprint(**parts) -> str:
    """A short hash of everything a run's records depend on (model hash, profile, sizes, prompts, seeds)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resumable(path: str | os.PathLike, items: Sequence, run: Callable,
              redo: Callable[[Any], bool] | None = None) -> list:
    """Results for ``items``, reusing those already logged in the ``JsonlLog`` at ``path`` and logging new ones.

    ``run(todo_items, on_result)`` computes the missing items (``on_result(j, result)`` for todo item j), and
    those whose logged result ``redo(result)`` rejects (e.g. a record format that lacks a field now reported).
    The log is append-only: an interrupted session resumes where it stopped, and the last record of an index
    is the one used.
    """
    log = JsonlLog(path, key="index")
    done = {r["index"]: r["result"] for r in log.records() if r["index"] < len(items)}
    todo = [i for i in range(len(items)) if i not in done or (redo is not None and redo(done[i]))]
    if todo:
        def on_result(j, result):
            log.append({"index": todo[j], "result": result})
            done[todo[j]] = result

        run([items[i] for i in todo], on_result)
    return [done[i] for i in range(len(items))]


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
