"""StarCoder reader: finds the parquet files and yields the source files they hold.

Layout (as published, starcoderdata): ROOT/<language>/*.parquet, the source text in column
`content`. Every parquet file under ROOT is read, sorted by its path under ROOT. Files are
read one row group batch at a time, so memory stays bounded however large a file is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.errors import CORRUPT_PARQUET, INVALID_UTF8, MISSING_TEXT, BadInputReport, DataPrepError

COLUMN = "content"
_BATCH_ROWS = 1024


def find_inputs(root: str | Path, split: str | None = None) -> list[Path]:
    """All `*.parquet` under ROOT (any depth), sorted by path under ROOT."""
    root = Path(root)
    if not root.is_dir():
        raise DataPrepError(f"--input {root} is not a directory (expected the StarCoder root: "
                            f"one folder of parquet files per language)")
    files = sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataPrepError(f"no *.parquet files under {root}")
    return files


def read_documents(path: Path, report: BadInputReport) -> Iterator[tuple[str, str]]:
    """Yield (location, text) for each row's `content`; bad rows go to `report`."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        report.bad(None, CORRUPT_PARQUET, f"pyarrow cannot open it as parquet ({e})")
        return
    schema = parquet.schema_arrow
    if COLUMN not in schema.names:
        report.bad(None, MISSING_TEXT, f"no '{COLUMN}' column (columns: {', '.join(schema.names)})")
        return
    kind = schema.field(COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        report.bad(None, MISSING_TEXT, f"column '{COLUMN}' has type {kind}; expected string or binary")
        return
    # Decode in Python from raw bytes: a binary column (or an unvalidated string column)
    # may hold bytes that are not UTF-8, and this finds the row instead of failing a batch.
    as_bytes = pa.large_binary()
    row = 0
    batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[COLUMN])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            report.bad(f"row {row + 1}", CORRUPT_PARQUET, f"pyarrow cannot read the rows from here on ({e})")
            return
        for value in batch.column(0).cast(as_bytes).to_pylist():
            row += 1
            location = f"row {row}"
            if value is None:
                report.bad(location, MISSING_TEXT, f"'{COLUMN}' is null")
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as e:
                report.bad(location, INVALID_UTF8, f"byte {e.start} of '{COLUMN}' is not UTF-8 ({e.reason})")
                continue
            yield location, text
