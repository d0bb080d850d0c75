"""hopgate-screen's results file: one row per screened path, appended as results come, read
back to resume and to summarise.

The format follows the extension: ``.csv``, ``.jsonl`` (or ``.ndjson``), or ``.parquet``
(needs pyarrow). CSV and JSONL are appended and flushed after every batch, so a killed run
loses at most the batches in flight; a row cut short by the kill is dropped on the next open.
Parquet cannot be appended to: its rows go to a JSONL journal beside it
(``<name>.parquet.partial.jsonl``) and the Parquet file is written from everything when the
run ends (a killed run resumes from the journal).

Columns: path, ood, score, threshold, p_value, predicted_class, label, memories (JSON in CSV
and Parquet, a list in JSONL), model_version, error_status, error_reason, error_message.
"""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path
from typing import IO, Any

from ..client.results import Result

FIELDS = ("path", "ood", "score", "threshold", "p_value", "predicted_class", "label", "memories",
          "model_version", "error_status", "error_reason", "error_message")
_FLOATS = ("score", "threshold", "p_value")
_INTS = ("predicted_class", "error_status")
KINDS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

Row = dict[str, Any]


class OutputError(ValueError):
    """The results file cannot be used (unknown extension, pyarrow missing)."""


def row_of(path: str, r: Result) -> Row:
    e = r.error
    return {"path": path, "ood": r.ood, "score": r.score, "threshold": r.threshold,
            "p_value": r.p_value, "predicted_class": r.predicted_class, "label": r.label,
            "memories": None if e else [{"index": m.index, "weight": m.weight}
                                        for m in r.memories],
            "model_version": r.model_version,
            "error_status": e.status if e else None, "error_reason": e.reason if e else None,
            "error_message": e.message if e else None}


def kind_of(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise OutputError(f"{path.name}: the results file must end in "
                          f"{', '.join(KINDS)} (the format follows the extension)")
    if kind == "parquet":
        try:
            _arrow()
        except ImportError:
            raise OutputError("Parquet output needs pyarrow (pip install pyarrow); or write "
                              ".csv or .jsonl") from None
    return kind


class Output:
    """Append rows to ``path``; ``rows()`` reads back every row written so far (this run's
    and earlier runs')."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kind = kind_of(self.path)
        self.journal = (self.path.with_name(self.path.name + ".partial.jsonl")
                        if self.kind == "parquet" else self.path)
        self._file: IO[str] | None = None
        self._csv: Any = None

    def remove(self) -> None:
        """Start afresh: drop earlier results."""
        for p in {self.path, self.journal}:
            p.unlink(missing_ok=True)

    def rows(self) -> list[Row]:
        out: list[Row] = []
        if self.kind == "parquet" and self.path.exists():
            _, pq = _arrow()
            out += [_typed(r) for r in pq.read_table(self.path).to_pylist()]
        if self.journal.exists():
            _drop_cut_row(self.journal)
            with open(self.journal, newline="", encoding="utf-8") as f:
                if self.kind == "csv":
                    out += [_typed(r) for r in csv.DictReader(f)]
                else:
                    out += [json.loads(line) for line in f if line.strip()]
        return out

    def append(self, rows: list[Row]) -> None:
        if self._file is None:
            _drop_cut_row(self.journal)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            new = not self.journal.exists() or self.journal.stat().st_size == 0
            # open across appends, closed by close(): one handle for the whole run
            self._file = open(self.journal, "a", newline="", encoding="utf-8")  # noqa: SIM115
            if self.kind == "csv":
                self._csv = csv.DictWriter(self._file, FIELDS)
                if new:
                    self._csv.writeheader()
        for row in rows:
            if self.kind == "csv":
                self._csv.writerow(_flat(row))
            else:
                self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.kind == "parquet" and self.journal.exists():
            pa, pq = _arrow()
            rows = [_flat(r) for r in self.rows()]
            pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema(pa)), self.path)
            self.journal.unlink()


def _arrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet (optional: ImportError when absent)."""
    return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")


def _flat(row: Row) -> Row:
    """CSV and Parquet cells: ``memories`` as JSON, booleans as true/false in CSV."""
    m = row.get("memories")
    return {**row, "memories": None if m is None else json.dumps(m)}


def _typed(r: dict[str, Any]) -> Row:
    """A CSV or Parquet row back to JSONL's types."""
    out: Row = {k: (None if r.get(k) in ("", None) else r.get(k)) for k in FIELDS}
    if isinstance(out["ood"], str):
        out["ood"] = out["ood"].lower() == "true"
    for k in _FLOATS:
        out[k] = None if out[k] is None else float(out[k])
    for k in _INTS:
        out[k] = None if out[k] is None else int(out[k])
    if isinstance(out["memories"], str):
        out["memories"] = json.loads(out["memories"])
    return out


def _arrow_schema(pa: Any) -> Any:
    types = {"ood": pa.bool_(), "score": pa.float64(), "threshold": pa.float64(),
             "p_value": pa.float64(), "predicted_class": pa.int64(), "error_status": pa.int64()}
    return pa.schema([(k, types.get(k, pa.string())) for k in FIELDS])


def _drop_cut_row(path: Path) -> None:
    """Cut a file back to its last complete line (a kill mid-write leaves half a row)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.seek(0)
        f.truncate(data.rfind(b"\n") + 1)
