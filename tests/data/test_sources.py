import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftlab.data import DataError, read_records

ROWS = [
    {"text": "a film, with a comma", "label": "pos"},
    {"text": 'a "quoted" line', "label": "neg"},
    {"text": "über naïve", "label": "pos"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def _read(source, **kwargs):
    return list(read_records(source, **kwargs))


def _writers(tmp_path):
    """Each file format, written from ROWS: name -> (source, the `where` of the first row)."""
    _write_jsonl(tmp_path / "r.jsonl", ROWS)
    (tmp_path / "r.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    _write_csv(tmp_path / "r.csv", ROWS)
    _write_csv(tmp_path / "r.tsv", ROWS, delimiter="\t")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "r.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    return {
        "jsonl": (tmp_path / "r.jsonl", "r.jsonl:1"),
        "json list": (tmp_path / "r.json", "r.json:2"),  # "[" on line 1, first item on line 2
        "csv": (tmp_path / "r.csv", "r.csv:2"),  # the header is line 1
        "tsv": (tmp_path / "r.tsv", "r.tsv:2"),
        "parquet": (tmp_path / "r.parquet", "r.parquet:row 0"),
        "save_to_disk Dataset": (tmp_path / "saved", "saved:row 0"),
        "save_to_disk DatasetDict": (tmp_path / "dict", "dict[test]:row 0"),
    }


def test_every_format_reads_the_same_rows(tmp_path):
    for fmt, (source, first_where) in _writers(tmp_path).items():
        records = _read(source, split="test")
        assert [row for _, row in records] == ROWS, fmt
        assert records[0][0] == f"{tmp_path}/{first_where}", fmt


def test_local_dataset_directory_goes_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d").mkdir()
    _write_jsonl(tmp_path / "d" / "train.jsonl", ROWS)
    _write_jsonl(tmp_path / "d" / "test.jsonl", ROWS[:2])
    records = _read(tmp_path / "d", split="test")
    assert [row for _, row in records] == ROWS[:2]
    assert records[1][0] == f"{tmp_path}/d[test]:row 1"
    with pytest.raises(DataError, match=r"d: .*Unknown split \"dev\""):
        _read(tmp_path / "d", split="dev")


def test_text_file_gives_one_text_row_per_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "notes.txt").write_text("first line\nsecond line\n")
    assert [row for _, row in _read(tmp_path / "notes.txt")] == [{"text": "first line"}, {"text": "second line"}]


def test_hub_id_is_asked_only_when_no_such_path_exists(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(*args, split, **kwargs):
        calls.append((args, split))
        return [{"text": "from the hub"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    records = _read("HuggingFaceTB/smoltalk", split="test", config="everyday-conversations")
    assert records == [("HuggingFaceTB/smoltalk[test]:row 0", {"text": "from the hub"})]
    assert calls == [(("HuggingFaceTB/smoltalk", "everyday-conversations"), "test")]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/gone' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^org/gone: the Hugging Face Hub could not provide it .*OfflineMode"):
        _read("org/gone")
    # Shaped like a local file: reported at once, without asking the Hub.
    for missing in ("data/train.jsonl", "./train", "/nowhere/x"):
        with pytest.raises(DataError, match=f"^{missing}: no such file or directory"):
            read_records(missing)
    assert len(calls) == 1


def test_missing_split_lists_the_splits(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict has splits train; there is no 'validation'"):
        read_records(tmp_path / "dict", split="validation")


def test_jsonl_line_numbers_count_blank_lines_and_bad_lines_are_yielded(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\n{"text": \n{"text": "\xff"}\n{"text": "d"}\n')
    records = _read(path)
    assert [where.rsplit(":", 1)[1] for where, _ in records] == ["1", "3", "4", "5"]
    assert records[0][1] == {"text": "a"} and records[3][1] == {"text": "d"}
    invalid, not_utf8 = records[1][1], records[2][1]
    assert isinstance(invalid, DataError) and str(invalid).startswith(f"{path}:3: invalid JSON: Expecting value")
    assert isinstance(not_utf8, DataError) and str(not_utf8).startswith(f"{path}:4: not UTF-8 text")


def test_json_list_items_carry_their_line_and_a_broken_list_raises(tmp_path):
    path = tmp_path / "l.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"text":\n     "b"}, {"text": "c"}\n]\n')
    assert [(where, row["text"]) for where, row in _read(path)] == [
        (f"{path}:2", "a"), (f"{path}:4", "b"), (f"{path}:5", "c")]
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]')
    with pytest.raises(DataError, match=r"l.json:3: invalid JSON: Expecting ',' or ']'"):
        _read(path)


def test_csv_lines_multiline_cells_field_counts_and_int_labels(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,label\n"two\nlines",1\n\nok,0\ntoo,many,fields\n', encoding="utf-8")
    records = _read(path)
    assert [where for where, _ in records] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    # Every label is an integer, so all are read as ints (the bad row does not count).
    assert records[0][1] == {"text": "two\nlines", "label": 1} and records[1][1] == {"text": "ok", "label": 0}
    assert isinstance(records[2][1], DataError)
    assert str(records[2][1]) == f"{path}:6: 3 fields, but the header has 2 (text, label); quote cells that contain ','"
    path.write_text("text,label\na,1\nb,pos\n")
    assert [row["label"] for _, row in _read(path)] == ["1", "pos"]  # not all integers: strings


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "\n\n", "empty.jsonl holds no rows"),
    ("header.csv", "text,label\n", "header.csv holds no rows"),
    ("rows.xlsx", "x", "rows.xlsx: unsupported file type '.xlsx'"),
    ("table.parquet", "not parquet", "table.parquet: not a readable Parquet file"),
])
def test_unreadable_sources(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        _read(tmp_path / name)
