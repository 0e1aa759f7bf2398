"""Reading dataset sources: formats, prefixes, order, limits, S3, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datapaths import TINY_SHAKESPEARE, require, tldr_files
from fixtures_s3 import s3_client

from kubetune.contract import StageError
from kubetune.schema import DatasetSpec
from kubetune.storage import open_storage
from kubetune_trainer.sources import Source, open_source, parse_hf_uri


def source_for(uri: str, scratch: Path, **spec: object) -> Source:
    dataset = DatasetSpec.model_validate({"source": uri, **spec})
    return open_source(dataset, open_storage, scratch)


def read_all(uri: str, scratch: Path, **spec: object) -> list[tuple[str, str]]:
    return list(source_for(uri, scratch, **spec).lines())


def expect_unusable(uri: str, scratch: Path, **spec: object) -> str:
    with pytest.raises(StageError) as info:
        read_all(uri, scratch, **spec)
    assert info.value.reason == "DatasetUnusable"
    return str(info.value)


# --------------------------------------------------------------------------- text files


def test_single_text_file_is_one_document_of_its_non_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\r\n\r\n   \nsecond line\nthird")
    source = source_for(f"file://{path}", tmp_path)
    assert list(source.lines()) == [
        ("notes.txt", "first line"),
        ("notes.txt", "second line"),
        ("notes.txt", "third"),
    ]
    assert source.documents == 1
    assert source.lines_read == 3


def test_file_uri_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("alpha line\n")
    monkeypatch.chdir(tmp_path)
    assert read_all("file://corpus/", tmp_path / "scratch") == [("a.txt", "alpha line")]


def test_real_text_file_streams_all_lines() -> None:
    path = require(TINY_SHAKESPEARE)
    expected = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    source = source_for(f"file://{path}", path.parent)
    got = [line for _, line in source.lines()]
    assert got == expected
    assert len(got) > 30000


def test_prefix_reads_files_in_sorted_order_with_relative_ids(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# z page\n")
    (tmp_path / "a.txt").write_text("a one\na two\n")
    (tmp_path / "c.md").write_text("c one\n")
    (tmp_path / "LICENSE").write_text("not read\n")  # no known extension: skipped
    source = source_for(f"file://{tmp_path}/", tmp_path / "scratch")
    assert list(source.lines()) == [
        ("a.txt", "a one"),
        ("a.txt", "a two"),
        ("b/z.md", "# z page"),
        ("c.md", "c one"),
    ]
    assert source.documents == 3
    assert source.skipped_files == ["LICENSE"]


def test_declared_format_overrides_the_extension(tmp_path: Path) -> None:
    (tmp_path / "data.log").write_text(json.dumps({"body": "from a .log file"}) + "\n")
    assert read_all(f"file://{tmp_path}/", tmp_path / "s", format="jsonl", textField="body") == [
        ("data.log:0", "from a .log file")
    ]


def test_max_documents_stops_after_that_many_files_of_tldr_pages(tmp_path: Path) -> None:
    # file:// storage skips dot files (its own temp files start with "."), e.g. tldr's "..md".
    files = [f for f in tldr_files("common") if not f.name.startswith(".")]
    root = files[0].parent
    source = source_for(f"file://{root}/", tmp_path, maxDocuments=25)
    lines = list(source.lines())
    assert source.documents == 25
    docs = sorted({doc for doc, _ in lines})
    assert docs == [f.name for f in files[:25]]
    expected = sum(
        1 for f in files[:25] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    assert len(lines) == expected == source.lines_read


def test_reading_is_deterministic(tmp_path: Path) -> None:
    root = tldr_files("common")[0].parent
    first = read_all(f"file://{root}/", tmp_path, maxDocuments=40)
    assert first == read_all(f"file://{root}/", tmp_path, maxDocuments=40)


# --------------------------------------------------------------------------- records


def test_jsonl_records_are_documents_and_multiline_text_is_split(tmp_path: Path) -> None:
    rows = [{"text": "one\ntwo", "id": 1}, {"text": None}, {"text": "three"}, {"text": ["x", "y"]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    source = source_for(f"file://{path}", tmp_path)
    assert list(source.lines()) == [
        ("d.jsonl:0", "one"),
        ("d.jsonl:0", "two"),
        ("d.jsonl:2", "three"),
        ("d.jsonl:3", "x"),
        ("d.jsonl:3", "y"),
    ]
    assert source.documents == 4


def test_max_documents_counts_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(10)))
    source = source_for(f"file://{path}", tmp_path, maxDocuments=3)
    assert [line for _, line in source.lines()] == ["record 0", "record 1", "record 2"]
    assert source.documents == 3


def test_jsonl_missing_text_field_names_file_field_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "x", "title": "y"}) + "\n")
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "bad.jsonl" in message
    assert "'text'" in message and "dataset.textField" in message
    assert "'content'" in message and "'title'" in message


def test_jsonl_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "broken.jsonl" in message and "line 2" in message


def test_jsonl_non_text_field_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "typed.jsonl"
    path.write_text(json.dumps({"text": {"nested": 1}}) + "\n")
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "typed.jsonl" in message and "dict" in message


def test_csv_reads_the_text_column_including_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('id,text\n1,"first, with comma"\n2,"multi\nline"\n3,\n')
    assert read_all(f"file://{path}", tmp_path) == [
        ("d.csv:0", "first, with comma"),
        ("d.csv:1", "multi"),
        ("d.csv:1", "line"),
    ]


def test_csv_missing_text_field_names_file_field_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("id,body\n1,hello\n")
    message = expect_unusable(f"file://{path}", tmp_path, textField="content")
    assert "table.csv" in message and "'content'" in message
    assert "'id'" in message and "'body'" in message


def test_parquet_is_read_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    texts = [f"row number {i}" for i in range(2500)]  # more than one 1024-row batch
    table = pa.table({"id": list(range(2500)), "text": texts})
    pq.write_table(table, path, row_group_size=700)
    lines = read_all(f"file://{path}", tmp_path)
    assert [line for _, line in lines] == texts
    assert lines[2499] == ("d.parquet:2499", "row number 2499")


def test_parquet_missing_text_field_lists_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "completion": ["b"]}), path)
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "d.parquet" in message and "'text'" in message
    assert "'prompt'" in message and "'completion'" in message


def test_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"this is not parquet at all")
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "fake.parquet" in message and "Parquet" in message


# --------------------------------------------------------------------------- bad input


def test_binary_file_is_named_with_the_offset(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine text\n")
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    (tmp_path / "image.txt").write_bytes(png)
    message = expect_unusable(f"file://{tmp_path}/", tmp_path / "s")
    assert "image.txt" in message
    assert "not UTF-8 text at byte 0" in message  # \x89 is not a UTF-8 start byte


def test_nul_byte_marks_a_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.md"
    path.write_bytes(b"looks like text\nthen\x00binary")
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "blob.md" in message and "byte 20" in message and "binary" in message


def test_non_utf8_file_is_named_with_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncafé au lait\n".encode("latin-1"))
    message = expect_unusable(f"file://{path}", tmp_path)
    assert "latin1.txt" in message
    assert "not UTF-8 text at byte 14" in message  # 11 bytes of line 1 + "caf"
    assert "convert it or remove it" in message or "convert it" in message


def test_empty_prefix_names_the_uri(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = expect_unusable(f"file://{tmp_path}/empty/", tmp_path)
    assert f"file://{tmp_path}/empty" in message and "empty source" in message


def test_missing_path_names_the_uri(tmp_path: Path) -> None:
    message = expect_unusable(f"file://{tmp_path}/nowhere", tmp_path)
    assert f"{tmp_path}/nowhere" in message
    assert "no such file or directory" in message and "empty source" not in message


def test_prefix_with_no_readable_files_lists_the_extensions(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00")
    (tmp_path / "b.docx").write_bytes(b"\x00")
    message = expect_unusable(f"file://{tmp_path}/", tmp_path / "s")
    assert ".bin" in message and ".docx" in message and "dataset.format" in message


# --------------------------------------------------------------------------- s3


def test_s3_prefix_streams_objects_in_order_and_cleans_scratch(
    s3_bucket: str, moto_s3: str, tmp_path: Path
) -> None:
    client = s3_client(moto_s3)
    files = tldr_files("common")[:5]
    for f in files:
        client.put_object(Bucket=s3_bucket, Key=f"corpus/pages/{f.name}", Body=f.read_bytes())
    client.put_object(Bucket=s3_bucket, Key="corpus2/other.md", Body=b"a sibling prefix\n")
    scratch = tmp_path / "download"
    got = read_all(f"s3://{s3_bucket}/corpus/", scratch)
    expected = [
        (f"pages/{f.name}", line)
        for f in files
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    assert got == expected
    assert list(scratch.iterdir()) == []  # each download is deleted after reading


def test_s3_single_object_and_bad_object_is_named_by_its_s3_uri(
    s3_bucket: str, moto_s3: str, tmp_path: Path
) -> None:
    client = s3_client(moto_s3)
    client.put_object(Bucket=s3_bucket, Key="one.txt", Body=b"single object line\n")
    client.put_object(Bucket=s3_bucket, Key="bad/x.txt", Body=b"ok\n\xff\xfe")
    assert read_all(f"s3://{s3_bucket}/one.txt", tmp_path) == [("one.txt", "single object line")]
    message = expect_unusable(f"s3://{s3_bucket}/bad/", tmp_path)
    assert f"s3://{s3_bucket}/bad/x.txt" in message and "byte 3" in message


def test_empty_s3_prefix_names_the_uri(s3_bucket: str, tmp_path: Path) -> None:
    message = expect_unusable(f"s3://{s3_bucket}/nothing/", tmp_path)
    assert f"s3://{s3_bucket}/nothing" in message and "empty source" in message


# --------------------------------------------------------------------------- hub


def test_hf_uri_parsing() -> None:
    assert parse_hf_uri("hf://imdb") == ("imdb", None, "train")
    assert parse_hf_uri("hf://stanfordnlp/imdb@test") == ("stanfordnlp/imdb", None, "test")
    assert parse_hf_uri("hf://Salesforce/wikitext/wikitext-2-raw-v1@validation") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "validation",
    )
    with pytest.raises(StageError, match="expected hf://"):
        parse_hf_uri("hf://a/b/c/d")


def test_unreachable_hub_says_to_mirror_the_dataset_to_s3(tmp_path: Path) -> None:
    # A subprocess, because the hub libraries read HF_HUB_OFFLINE at import time.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kubetune.contract import StageError\n"
        "from kubetune.schema import DatasetSpec\n"
        "from kubetune_trainer.sources import open_source\n"
        "from kubetune.storage import open_storage\n"
        "spec = DatasetSpec(source='hf://someone/some-corpus@train')\n"
        "try:\n"
        "    list(open_source(spec, open_storage, Path(sys.argv[1])).lines())\n"
        "except StageError as exc:\n"
        "    print(exc.reason, exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")  # no cached copy to fall back on
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.startswith("DatasetUnusable")
    assert "hf://someone/some-corpus@train" in out
    assert "mirror" in out and "s3://" in out
