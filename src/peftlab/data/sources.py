"""Rows from local files and Hugging Face datasets, each tagged with where it came from.

:func:`read_records` yields ``(where, row)`` pairs; ``where`` is what an error message about the
row should point at:

=========================================  ===========================================
source                                     ``where``
=========================================  ===========================================
``.jsonl`` / ``.json`` (lines or a list)   ``"data/train.jsonl:12"`` (1-based line)
``.csv`` / ``.tsv``                        ``"x.csv:3"`` (file line; the header is line 1)
``.parquet``                               ``"x.parquet:row 5"`` (0-based, as ``table[5]``)
a ``Dataset.save_to_disk`` directory,      ``"dir[train]:row 5"`` (0-based, as ``ds[5]``;
other local directories and hub ids        no ``[split]`` for a saved single ``Dataset``)
=========================================  ===========================================

A line that cannot be parsed (invalid JSON, a CSV line with the wrong number of fields, bytes
that are not UTF-8) is not raised: it arrives as a :class:`DataError` *instance* in place of the
row, so :func:`peftlab.data.encode_records` can report it with the other bad rows or skip it
(``skip_bad_rows=True``). A caller iterating by hand can ``raise row`` when it sees one.

``datasets`` is imported only for directories and hub ids: importing it costs most of a second.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from pathlib import Path
from typing import Iterator

Record = tuple[str, "dict | DataError"]

# Files read through a `datasets` packaged builder: plain text gives one {"text": line} row per
# line; .arrow is a single Arrow file.
_BUILDERS = {".txt": "text", ".arrow": "arrow"}
_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", *_BUILDERS)

# "org/name" or "name": what the Hub accepts as a dataset id. A missing path of another shape (or
# with a data file's suffix) is a mistyped local path, reported at once instead of asking the Hub.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_CSV_INT = re.compile(r"^\s*-?\d+\s*$")


class DataError(ValueError):
    """A data problem, worded as ``"<where>: <what is wrong>; <how to fix it>"``."""


def read_records(source: str | os.PathLike, *, split: str = "train",
                 config: str | None = None) -> Iterator[Record]:
    """An iterator of ``(where, row)``, one per row of ``source``.

    Args:
        source: a ``.jsonl``/``.json`` file (JSON lines, or one JSON list of rows), a ``.csv`` or
            ``.tsv`` file (first line = column names), a ``.parquet`` file, a ``.txt`` or
            ``.arrow`` file (through ``datasets``), a directory written by
            ``datasets.Dataset(Dict).save_to_disk``, any other local directory
            ``datasets.load_dataset`` understands (e.g. ``train.jsonl`` + ``test.jsonl``), or a
            Hugging Face Hub dataset id such as ``"HuggingFaceTB/smoltalk"`` (only when no local
            path of that name exists; needs internet access).
        split: the split to read from a source that has several (directories, hub ids); a
            single file is one split and ignores it.
        config: the dataset configuration of a hub id or directory (``load_dataset``'s
            ``name``), e.g. ``"everyday-conversations"`` for SmolTalk.

    CSV cells are strings, except a ``label`` column whose every value is an integer: it is read
    as ``int`` (class indices), so ``0``/``1`` labels mean the same in CSV as in JSON.

    The source is found, opened and (for ``datasets``) loaded by the call itself; rows are read
    as they are iterated.

    Raises:
        DataError: the source does not exist, cannot be read as a whole (unsupported suffix,
            broken JSON list, not Parquet, the Hub refused it, a missing split), or holds no rows.
            Problems confined to one line are yielded instead, as described in the module
            docstring.
    """
    name = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _json_rows(path, name)
        elif suffix in (".csv", ".tsv"):
            rows = _csv_rows(path, name, delimiter="," if suffix == ".csv" else "\t")
        elif suffix == ".parquet":
            rows = _parquet_rows(path, name)
        elif suffix in _BUILDERS:
            rows = _load_dataset(name, None, _BUILDERS[suffix], data_files=str(path))
        else:
            raise DataError(f"{name}: unsupported file type {suffix or '(no suffix)'!r}; use one of "
                            f"{', '.join(_SUFFIXES)}, or a dataset directory")
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            rows = _saved_rows(path, name, split)
        else:
            rows = _load_dataset(name, split, str(path), config)
    elif _HUB_ID.match(name) and Path(name).suffix.lower() not in _SUFFIXES:
        rows = _load_dataset(name, split, name, config, hub=True)
    else:
        raise DataError(f"{name}: no such file or directory (and not a Hub id like 'org/name'); "
                        "check the path")
    return _nonempty(rows, name)


def _nonempty(rows: Iterator[Record], name: str) -> Iterator[Record]:
    count = 0
    for record in rows:
        count += 1
        yield record
    if count == 0:
        raise DataError(f"{name} holds no rows; check the file or split")


def _json_rows(path: Path, name: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        yield from _json_list_rows(path, name)
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            where = f"{name}:{line_no}"
            try:
                yield where, json.loads(raw.rstrip(b"\r\n"))  # so error columns stay on this line
            except UnicodeDecodeError as err:
                yield where, DataError(f"{where}: not UTF-8 text ({err})")
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno}); "
                                       "a JSON lines file holds one JSON object per line")


def _json_list_rows(path: Path, name: str) -> Iterator[Record]:
    """Rows of a file holding one JSON list, each tagged with the line its item starts on."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text ({err}); re-save it as UTF-8") from err
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text).end() + 1  # just past "["
    line, counted = 1, 0  # line number at offset `counted`, advanced as items are found
    try:
        while True:
            pos = ws.match(text, pos).end()
            if text.startswith("]", pos):
                break
            item, end = decoder.raw_decode(text, pos)
            line, counted = line + text.count("\n", counted, pos), pos
            yield f"{name}:{line}", item
            pos = ws.match(text, end).end()
            if text.startswith(",", pos):
                pos += 1
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("Expecting ',' or ']'", text, pos)
    except json.JSONDecodeError as err:
        raise DataError(f"{name}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno}); a .json "
                        "file holds one JSON list of rows, or one JSON object per line") from err


def _csv_rows(path: Path, name: str, delimiter: str) -> list[Record]:
    # Read whole: the label column's type is known only after its last value.
    records: list[Record] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            end = reader.line_num
            for cells in reader:
                # A quoted cell may span lines; the row starts on the line after the last one.
                start, end = end + 1, reader.line_num
                if not cells:
                    continue  # a blank line
                where = f"{name}:{start}"
                if len(cells) != len(header):
                    records.append((where, DataError(
                        f"{where}: {len(cells)} fields, but the header has {len(header)} "
                        f"({', '.join(header)}); quote cells that contain {delimiter!r}")))
                else:
                    records.append((where, dict(zip(header, cells))))
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: not UTF-8 text ({err}); re-save it as UTF-8") from err
    except csv.Error as err:
        raise DataError(f"{name}:{reader.line_num}: unreadable CSV ({err})") from err
    rows = [row for _, row in records if isinstance(row, dict)]
    if rows and all("label" in row and _CSV_INT.match(row["label"]) for row in rows):
        for row in rows:
            row["label"] = int(row["label"])
    return records


def _parquet_rows(path: Path, name: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise DataError(f"{name}: not a readable Parquet file ({err})") from err
    rows = (row for batch in parquet.iter_batches() for row in batch.to_pylist())
    return ((f"{name}:row {index}", row) for index, row in enumerate(rows))


def _saved_rows(path: Path, name: str, split: str) -> Iterator[Record]:
    """Rows of a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{name} has splits {', '.join(data)}; there is no {split!r}, pick one "
                            "of those (split=... / --split)")
        data, name = data[split], f"{name}[{split}]"
    return ((f"{name}:row {index}", row) for index, row in enumerate(data))


def _load_dataset(name: str, split: str | None, *args, hub: bool = False, **kwargs) -> Iterator[Record]:
    """Rows from ``datasets.load_dataset(*args, split=..., **kwargs)``; a single file's
    builder names its one split "train"."""
    import datasets

    try:
        data = datasets.load_dataset(*args, split=split or "train", **kwargs)
    except Exception as err:  # the Hub, the network and the builders raise many kinds
        if hub:
            raise DataError(f"{name}: the Hugging Face Hub could not provide it ({type(err).__name__}: "
                            f"{err}); offline, use a local .jsonl/.csv/.parquet file or a directory "
                            "written by save_to_disk") from err
        raise DataError(f"{name}: datasets.load_dataset could not read it ({type(err).__name__}: "
                        f"{err})") from err
    label = f"{name}[{split}]" if split else name
    return ((f"{label}:row {index}", row) for index, row in enumerate(data))
