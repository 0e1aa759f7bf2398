"""Read ``spec.dataset.source`` as a stream of documents and their lines.

Usage::

    from kubetune_trainer.sources import open_source
    source = open_source(job.spec.dataset, ctx.open, ctx.scratch_dir("download"))
    for doc_id, line in source.lines():       # streaming: one file open at a time
        ...
    source.documents, source.lines_read       # counted while iterating

A source is one file or a prefix of files (``file://`` absolute or relative to
the working directory, ``s3://``), or a hub dataset ``hf://<dataset>[/<config>][@<split>]``
(``<dataset>`` may be ``owner/name``; needs a reachable hub). Files are read in
sorted key order, so the same source always gives the same stream.

Formats: ``text``, ``markdown`` and ``rst`` files are one document each (id = the key
relative to the source; reStructuredText markup is removed per document by
:mod:`kubetune_trainer.rst` when ``clean.stripMarkup`` is on); ``jsonl``, ``csv`` and
``parquet`` records are one document each (id = ``<key>:<record index>``), their
``textField`` split into lines. Only non-blank lines are yielded. Nothing holds more than one line,
record or Parquet batch in memory; ``s3://`` objects are downloaded to scratch
one at a time and deleted after reading.

Every problem with the input raises :class:`StageError` with reason
``DatasetUnusable``, naming the file (and field) and saying what to do.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.contract import StageError
from kubetune.layout import join_uri
from kubetune.preflight import missing_path
from kubetune.schema import DatasetFormat, DatasetKind, DatasetSpec, Reason
from kubetune.storage import FileStorage, Storage, StorageError
from kubetune_trainer.rst import rst_to_text

log = logging.getLogger(__name__)

UNUSABLE = Reason.DATASET_UNUSABLE

EXTENSIONS: dict[str, DatasetFormat] = {
    ".txt": DatasetFormat.TEXT,
    ".text": DatasetFormat.TEXT,
    ".md": DatasetFormat.MARKDOWN,
    ".markdown": DatasetFormat.MARKDOWN,
    ".rst": DatasetFormat.RST,
    ".rest": DatasetFormat.RST,
    ".jsonl": DatasetFormat.JSONL,
    ".ndjson": DatasetFormat.JSONL,
    ".csv": DatasetFormat.CSV,
    ".parquet": DatasetFormat.PARQUET,
    ".pq": DatasetFormat.PARQUET,
}
RECORD_FORMATS = (DatasetFormat.JSONL, DatasetFormat.CSV, DatasetFormat.PARQUET)
PARQUET_BATCH_ROWS = 1024

# One CSV field may hold a whole article; csv's default limit is 128 KiB.
csv.field_size_limit(64 * 1024 * 1024)


def unusable(message: str) -> StageError:
    return StageError(message, reason=UNUSABLE)


def format_for(key: str, declared: DatasetFormat, *, single_file: bool) -> DatasetFormat | None:
    """The format of one file: the declared one, else by extension (None: skip the file).

    A single file with an unknown extension is read as text: the user pointed at it.
    """
    if declared != DatasetFormat.AUTO:
        return declared
    suffix = Path(key).suffix.lower()
    fmt = EXTENSIONS.get(suffix)
    if fmt is None and single_file:
        return DatasetFormat.TEXT
    return fmt


def iter_text_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[str]:
    """Decode binary lines as UTF-8, newline stripped; a clear error at the first bad byte.

    A NUL byte is valid UTF-8 but never appears in text, so it marks a binary file.
    """
    offset = 0
    for raw in raw_lines:
        if b"\x00" in raw:
            at = offset + raw.index(b"\x00")
            raise unusable(
                f"{name}: not UTF-8 text at byte {at} (a NUL byte: this looks like a binary "
                "file); convert it or remove it from dataset.source"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise unusable(
                f"{name}: not UTF-8 text at byte {offset + exc.start}; convert it (e.g. "
                "iconv -t UTF-8) or remove it from dataset.source"
            ) from None
        offset += len(raw)
        if offset == len(raw) and line.startswith("\ufeff"):
            line = line[1:]  # a UTF-8 BOM is an encoding mark, not text
        yield line.rstrip("\r\n")


def split_lines(text: str) -> Iterator[str]:
    """Non-blank lines of a record's text."""
    for line in text.splitlines():
        if line and not line.isspace():
            yield line


def _field_text(value: Any, name: str, text_field: str, index: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise unusable(
        f"{name}: record {index}: field {text_field!r} holds {type(value).__name__}, not text; "
        "set dataset.textField to a text column"
    )


def _missing_field(name: str, text_field: str, columns: Iterable[str]) -> StageError:
    found = ", ".join(repr(c) for c in columns) or "none"
    return unusable(
        f"{name}: no field {text_field!r} (dataset.textField); columns found: {found}. "
        "Set dataset.textField to the column holding the text"
    )


@dataclass
class Source:
    """A dataset source opened for streaming. Iterate :meth:`lines` once."""

    uri: str
    spec: DatasetSpec
    storage: Storage | None  # None for hf://
    scratch: Path
    documents: int = 0
    lines_read: int = 0
    skipped_files: list[str] = field(default_factory=list)
    _keys: list[str] | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- iteration

    def lines(self) -> Iterator[tuple[str, str]]:
        """``(document id, line)`` for every non-blank line, in a deterministic order."""
        for doc_id, lines in self._documents():
            for line in lines:
                if line and not line.isspace():
                    self.lines_read += 1
                    yield doc_id, line

    def _documents(self) -> Iterator[tuple[str, Iterable[str]]]:
        limit = self.spec.max_documents
        if limit is not None and self.documents >= limit:
            return
        for doc_id, lines in self._all_documents():
            self.documents += 1
            yield doc_id, lines
            if limit is not None and self.documents >= limit:
                return

    def records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(record id, record)`` of every jsonl, csv or parquet record, in order.

        For ``dataset.kind`` promptCompletion and chat. Counts ``documents`` (one per
        record, up to ``maxDocuments``); text files are refused with a clear error.
        """
        limit = self.spec.max_documents
        for record_id, record in self._all_records():
            if limit is not None and self.documents >= limit:
                return
            self.documents += 1
            self.lines_read += 1
            yield record_id, record

    def _all_records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.storage is None:
            yield from self._hf_records()
            return
        keys = self.keys()
        single = keys == [""]
        declared = DatasetFormat(self.spec.format)
        readable = []
        for key in keys:
            fmt = format_for(key or self.uri, declared, single_file=single)
            if fmt in RECORD_FORMATS:
                readable.append((key, fmt))
            else:
                self.skipped_files.append(key)
        if self.skipped_files:
            log.warning(
                "%s: skipping %d file(s) that are not jsonl, csv or parquet records (e.g. %s)",
                self.uri,
                len(self.skipped_files),
                self.skipped_files[0] or self.uri,
            )
        if not readable:
            raise unusable(
                f"dataset.source {self.uri}: no .jsonl, .csv or .parquet files; dataset.kind "
                f"{DatasetKind(self.spec.kind).value} reads records with "
                f"{_record_fields(self.spec)}"
            )
        for key, fmt in readable:
            name = self.storage.uri(key) if key else self.uri
            doc_base = key or Path(self.uri.split("://", 1)[1]).name
            with self._local_copy(key) as path:
                if fmt == DatasetFormat.JSONL:
                    rows: Iterator[dict[str, Any]] = (
                        record for _, record in self._jsonl_records(path, name)
                    )
                elif fmt == DatasetFormat.CSV:
                    rows = self._csv_records(path, name)
                else:
                    rows = self._parquet_records(path, name)
                for index, record in enumerate(rows):
                    yield f"{doc_base}:{index}", record

    @staticmethod
    def _jsonl_records(
        path: Path, name: str, wanted: str = "an object"
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(line number, record)`` of each non-blank line; ``wanted`` words the error."""
        with open(path, "rb") as fh:
            for number, line in enumerate(iter_text_lines(fh, name), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise unusable(
                        f"{name}: line {number} is not JSON ({exc.msg}); each line of a .jsonl "
                        "file must be one JSON object"
                    ) from None
                if not isinstance(record, dict):
                    raise unusable(
                        f"{name}: line {number} is a JSON {type(record).__name__}, not {wanted}"
                    )
                yield number, record

    @staticmethod
    def _csv_records(path: Path, name: str) -> Iterator[dict[str, Any]]:
        with open(path, "rb") as fh:
            decoded = (line + "\n" for line in iter_text_lines(fh, name))
            yield from csv.DictReader(decoded)

    @staticmethod
    def _parquet_records(path: Path, name: str) -> Iterator[dict[str, Any]]:
        with _open_parquet(path, name) as parquet:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                yield from batch.to_pylist()

    def _hf_records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        dataset, config, split = parse_hf_uri(self.uri)
        try:
            import datasets

            stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
        except Exception as exc:
            raise unusable(
                f"dataset.source {self.uri}: cannot load hub dataset {dataset!r}: "
                f"{type(exc).__name__}: {exc}. Mirror it to S3 as .jsonl or .parquet files"
            ) from None
        for index, record in enumerate(stream):
            yield f"{dataset}:{index}", dict(record)

    def _all_documents(self) -> Iterator[tuple[str, Iterable[str]]]:
        if self.storage is None:
            yield from self._hf_documents()
            return
        keys = self.keys()
        single = keys == [""]
        declared = DatasetFormat(self.spec.format)
        readable: list[tuple[str, DatasetFormat]] = []
        for key in keys:
            fmt = format_for(key or self.uri, declared, single_file=single)
            if fmt is None:
                self.skipped_files.append(key)
            else:
                readable.append((key, fmt))
        if self.skipped_files:
            log.warning(
                "%s: skipping %d file(s) with no known extension (e.g. %s); set dataset.format "
                "to read them",
                self.uri,
                len(self.skipped_files),
                self.skipped_files[0],
            )
        if not readable:
            exts = sorted({Path(k).suffix or "(none)" for k in self.skipped_files})
            raise unusable(
                f"dataset.source {self.uri}: no readable files ({len(keys)} found, with extensions "
                f"{', '.join(exts)}); use .txt, .md, .rst, .jsonl, .csv or .parquet files, or set "
                "dataset.format"
            )
        for key, fmt in readable:
            name = self.storage.uri(key) if key else self.uri
            doc_base = key or Path(self.uri.split("://", 1)[1]).name
            with self._local_copy(key) as path:
                if fmt in (DatasetFormat.TEXT, DatasetFormat.MARKDOWN):
                    yield doc_base, self._read_text_file(path, name)
                elif fmt == DatasetFormat.RST:
                    lines = self._read_text_file(path, name)
                    yield doc_base, rst_to_text(lines) if self.spec.clean.strip_markup else lines
                elif fmt == DatasetFormat.JSONL:
                    yield from self._jsonl_documents(path, name, doc_base)
                elif fmt == DatasetFormat.CSV:
                    yield from self._csv_documents(path, name, doc_base)
                else:
                    yield from self._parquet_documents(path, name, doc_base)

    def keys(self) -> list[str]:
        """The files of the source (keys relative to it; ``[""]`` for a single file), sorted.

        Raises StageError for an empty or unreadable source.
        """
        assert self.storage is not None
        if self._keys is not None:
            return self._keys
        try:
            keys = self.storage.list("")
        except StorageError as exc:
            raise unusable(f"dataset.source {self.uri}: {exc}") from None
        if not keys:
            raise unusable(self._nothing_there())
        self._keys = sorted(keys)
        return self._keys

    def _nothing_there(self) -> str:
        """Why a source lists no files: a path that does not exist, or an empty directory."""
        assert self.storage is not None
        missing = missing_path("dataset.source", self.uri, self.storage)
        return missing or (
            f"dataset.source {self.uri}: empty source, no files found there; check the path "
            "or prefix (a prefix should end with /) and that the files were uploaded"
        )

    @contextmanager
    def _local_copy(self, key: str) -> Iterator[Path]:
        """The file as a local path: itself for file://, a scratch download for s3://."""
        assert self.storage is not None
        if isinstance(self.storage, FileStorage):
            yield self.storage.path(key)
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.scratch, prefix="source-", suffix=Path(key).suffix)
        os.close(fd)
        path = Path(tmp)
        try:
            try:
                self.storage.download_file(key, path)
            except StorageError as exc:
                raise unusable(f"dataset.source {self.uri}: {exc}") from None
            yield path
        finally:
            path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- formats

    @staticmethod
    def _read_text_file(path: Path, name: str) -> Iterator[str]:
        with open(path, "rb") as fh:
            yield from iter_text_lines(fh, name)

    def _jsonl_documents(
        self, path: Path, name: str, doc_base: str
    ) -> Iterator[tuple[str, Iterable[str]]]:
        text_field = self.spec.text_field
        wanted = f"an object with a {text_field!r} field"
        for index, (number, record) in enumerate(self._jsonl_records(path, name, wanted)):
            if text_field not in record:
                raise _missing_field(f"{name} (line {number})", text_field, record.keys())
            text = _field_text(record[text_field], name, text_field, index)
            yield f"{doc_base}:{index}", split_lines(text) if text else ()

    def _csv_documents(
        self, path: Path, name: str, doc_base: str
    ) -> Iterator[tuple[str, Iterable[str]]]:
        text_field = self.spec.text_field
        with open(path, "rb") as fh:
            # csv wants str lines with their newlines (quoted fields span lines).
            decoded = (line + "\n" for line in iter_text_lines(fh, name))
            reader = csv.reader(decoded)
            header = next(reader, None)
            if header is None:
                return
            if text_field not in header:
                raise _missing_field(name, text_field, header)
            column = header.index(text_field)
            for index, row in enumerate(reader):
                text = row[column] if column < len(row) else ""
                yield f"{doc_base}:{index}", split_lines(text) if text else ()

    def _parquet_documents(
        self, path: Path, name: str, doc_base: str
    ) -> Iterator[tuple[str, Iterable[str]]]:
        text_field = self.spec.text_field
        with _open_parquet(path, name) as parquet:
            columns = parquet.schema_arrow.names
            if text_field not in columns:
                raise _missing_field(name, text_field, columns)
            index = 0
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    text = _field_text(value, name, text_field, index)
                    yield f"{doc_base}:{index}", split_lines(text) if text else ()
                    index += 1

    def _hf_documents(self) -> Iterator[tuple[str, Iterable[str]]]:
        dataset, config, split = parse_hf_uri(self.uri)
        text_field = self.spec.text_field
        try:
            import datasets

            stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
            records = iter(stream)
            first = next(records, None)
        except Exception as exc:
            raise unusable(
                f"dataset.source {self.uri}: cannot load hub dataset {dataset!r} "
                f"(config {config!r}, split {split!r}): {type(exc).__name__}: {exc}. If the hub "
                "is not reachable from here, mirror the dataset to S3 (e.g. as .jsonl or "
                ".parquet files) and set dataset.source to that s3:// prefix"
            ) from None
        if first is None:
            return
        if text_field not in first:
            raise _missing_field(self.uri, text_field, first.keys())
        for index, record in enumerate(_chain_first(first, records)):
            text = _field_text(record.get(text_field), self.uri, text_field, index)
            yield f"{dataset}:{index}", split_lines(text) if text else ()


def _open_parquet(path: Path, name: str) -> Any:
    """``pyarrow.parquet.ParquetFile`` of ``path`` (a context manager); a clear error if not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise unusable(
            f"{name}: not a readable Parquet file ({exc}); convert it or remove it"
        ) from None


def _record_fields(spec: DatasetSpec) -> str:
    if spec.kind == DatasetKind.CHAT:
        return f"a {spec.messages_field!r} field (dataset.messagesField)"
    return (
        f"{spec.prompt_field!r} and {spec.completion_field!r} fields "
        "(dataset.promptField, dataset.completionField)"
    )


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://owner/name/config@split`` -> (dataset, config, split); split defaults to train.

    One path segment is a dataset; two are ``owner/name``; a third is the config.
    """
    rest = uri.split("://", 1)[1].strip("/")
    rest, _, split = rest.partition("@")
    parts = [p for p in rest.split("/") if p]
    if not parts or len(parts) > 3:
        raise unusable(
            f"dataset.source {uri}: expected hf://<dataset>[/<config>][@<split>] "
            "(<dataset> may be owner/name)"
        )
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2], split or "train"
    return "/".join(parts), None, split or "train"


def open_source(spec: DatasetSpec, open_storage: Callable[[str], Storage], scratch: Path) -> Source:
    """A :class:`Source` for ``spec.source``; ``open_storage`` is usually ``ctx.open``."""
    uri = spec.source
    if uri.startswith("hf://"):
        return Source(uri=uri, spec=spec, storage=None, scratch=scratch)
    try:
        storage = open_storage(uri)
    except StorageError as exc:
        raise unusable(f"dataset.source {uri}: {exc}") from None
    return Source(uri=join_uri(uri), spec=spec, storage=storage, scratch=scratch)
