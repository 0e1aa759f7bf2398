"""The prepare stage end to end on real text (tldr-pages), on file:// and on a moto S3 server.

Covers: outputs and their consistency (jsonl lines vs token offsets, decode round trip,
sha256), the no-overlap split by line and by document, reproducible seeds, idempotent
reruns, every kind of unusable input, and bounded memory on 1,000,000 streamed lines.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datapaths import TINY_SHAKESPEARE, require, tldr_files
from fixtures_s3 import s3_client

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.results import PrepareResult
from kubetune.schema import CleanSpec, FineTuneJob, SplitSpec, job_manifest, parse_job
from kubetune.storage import open_storage
from kubetune_trainer.context import make_context
from kubetune_trainer.prepare import prepare_lines, run
from kubetune_trainer.sources import open_source
from kubetune_trainer.tokenizer_build import EOS, train_bpe_tokenizer

N_DOCS = 300


def make_job(source: str, output: str, **dataset: Any) -> FineTuneJob:
    """A job whose prepare stage reads ``source`` (dataset overrides) and writes ``output``."""
    return parse_job(
        job_manifest(
            "prep-test",
            model={
                "fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 32, "nPositions": 128, "vocabSize": 400}
            },
            training={"maxSeqLength": 128},
            dataset={"source": source, **dataset},
            storage={"output": output},
        )
    )


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tldr_common() -> Path:
    return tldr_files("common")[0].parent


@pytest.fixture(scope="module")
def small_tokenizer() -> Any:
    """A tiny byte-level BPE trained on a slice of tinyshakespeare (fast to build)."""
    lines = require(TINY_SHAKESPEARE).read_text(encoding="utf-8").splitlines()[:3000]
    return train_bpe_tokenizer(lines, 300, model_max_length=128)


@pytest.fixture(scope="module")
def file_run(tldr_common: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One prepare run on the first 300 tldr common pages, output on file://."""
    base = tmp_path_factory.mktemp("file-run")
    job = make_job(f"file://{tldr_common}/", f"file://{base}/out", maxDocuments=N_DOCS)
    ctx = make_context(job, scratch=base / "scratch")
    result = run(ctx)
    return {"result": result, "out": base / "out", "ctx": ctx, "job": job, "base": base}


# --------------------------------------------------------------------------- end to end


def test_run_writes_every_artifact_and_a_consistent_result(file_run: dict[str, Any]) -> None:
    out: Path = file_run["out"]
    result: PrepareResult = file_run["result"]
    for key in (
        RunLayout.TRAIN_TEXT,
        RunLayout.TEST_TEXT,
        RunLayout.TRAIN_TOKENS,
        RunLayout.TRAIN_OFFSETS,
        RunLayout.TEST_TOKENS,
        RunLayout.TEST_OFFSETS,
        RunLayout.PREPARE_RESULT,
        f"{RunLayout.TOKENIZER}/tokenizer.json",
    ):
        assert (out / key).is_file(), key
    on_disk = PrepareResult.model_validate_json((out / RunLayout.PREPARE_RESULT).read_text())
    assert on_disk == result
    stats = result.stats
    assert stats.documents == N_DOCS
    assert stats.overlap == 0
    assert stats.kept_lines == stats.train_lines + stats.test_lines
    assert stats.lines == stats.kept_lines + stats.dropped_short + stats.duplicates_removed
    assert stats.duplicates_removed > 0  # "Display help:"-style lines repeat across pages
    assert stats.dropped_short > 0  # "# tar"-style titles are shorter than minChars=16
    assert len(read_jsonl(out / RunLayout.TRAIN_TEXT)) == stats.train_lines
    assert len(read_jsonl(out / RunLayout.TEST_TEXT)) == stats.test_lines
    assert result.config["source"].endswith("/common/")
    assert result.config["maxDocuments"] == N_DOCS
    assert result.dataset_uri == f"file://{out}/dataset"
    assert "vocab 400" in result.tokenizer


def test_prepare_json_is_written_last(file_run: dict[str, Any]) -> None:
    dataset = file_run["out"] / "dataset"
    result_mtime = (dataset / "prepare.json").stat().st_mtime_ns
    others = [p for p in dataset.rglob("*") if p.is_file() and p.name != "prepare.json"]
    assert others and all(p.stat().st_mtime_ns <= result_mtime for p in others)


def test_sha256_in_the_result_matches_the_files(file_run: dict[str, Any]) -> None:
    import hashlib

    out: Path = file_run["out"]
    result: PrepareResult = file_run["result"]
    assert hashlib.sha256((out / RunLayout.TRAIN_TEXT).read_bytes()).hexdigest() == (
        result.train_sha256
    )
    assert hashlib.sha256((out / RunLayout.TEST_TEXT).read_bytes()).hexdigest() == (
        result.test_sha256
    )


def test_token_offsets_match_the_jsonl_lines_and_decode_back(file_run: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    out: Path = file_run["out"]
    tok = AutoTokenizer.from_pretrained(str(out / RunLayout.TOKENIZER))
    assert tok.eos_token == EOS and tok.pad_token == EOS and tok.bos_token == EOS
    assert len(tok) <= 400
    for split in ("train", "test"):
        lines = [r["text"] for r in read_jsonl(out / f"dataset/{split}.jsonl")]
        tokens = np.load(out / f"dataset/{split}.tokens.npy")
        offsets = np.load(out / f"dataset/{split}.offsets.npy")
        assert tokens.dtype == np.uint32 and offsets.dtype == np.int64
        assert len(offsets) == len(lines) + 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        assert np.all(np.diff(offsets) > 0)  # every kept line has at least one token
        assert int(tokens.max()) < len(tok)
        for i in range(0, len(lines), 7):
            ids = tokens[offsets[i] : offsets[i + 1]].tolist()
            assert ids == tok.encode(lines[i], add_special_tokens=False)
            assert tok.decode(ids) == lines[i]
    result: PrepareResult = file_run["result"]
    assert result.stats.train_tokens == len(np.load(out / RunLayout.TRAIN_TOKENS))
    assert result.stats.test_tokens == len(np.load(out / RunLayout.TEST_TOKENS))


def test_fresh_tokenizer_is_trained_on_the_train_split_only(
    file_run: dict[str, Any], tmp_path: Path
) -> None:
    # Retraining on train.jsonl alone gives the identical vocabulary.
    from transformers import AutoTokenizer

    out: Path = file_run["out"]
    saved = AutoTokenizer.from_pretrained(str(out / RunLayout.TOKENIZER))
    train = [r["text"] for r in read_jsonl(out / RunLayout.TRAIN_TEXT)]
    again = train_bpe_tokenizer(train, 400)
    assert again.get_vocab() == saved.get_vocab()


def test_rerun_is_idempotent_and_replaces_stale_files(file_run: dict[str, Any]) -> None:
    out: Path = file_run["out"]
    stale = out / RunLayout.TOKENIZER / "vocab.json"
    stale.write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p != stale)
    again = run(make_context(file_run["job"], scratch=file_run["base"] / "scratch2"))
    first: PrepareResult = file_run["result"]
    assert again.train_sha256 == first.train_sha256
    assert again.test_sha256 == first.test_sha256
    assert again.stats == first.stats
    assert not stale.exists()
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == before


def test_run_with_source_and_output_on_s3_matches_the_file_run(
    file_run: dict[str, Any], s3_bucket: str, moto_s3: str, tmp_path: Path
) -> None:
    client = s3_client(moto_s3)
    files = [f for f in tldr_files("common") if not f.name.startswith(".")][:N_DOCS]
    for f in files:
        client.put_object(Bucket=s3_bucket, Key=f"corpora/tldr/{f.name}", Body=f.read_bytes())
    job = make_job(f"s3://{s3_bucket}/corpora/tldr/", f"s3://{s3_bucket}/runs/r1")
    result = run(make_context(job, scratch=tmp_path / "scratch"))
    first: PrepareResult = file_run["result"]
    # Same files, same order, same doc ids -> byte-identical datasets.
    assert result.train_sha256 == first.train_sha256
    assert result.test_sha256 == first.test_sha256
    assert result.stats == first.stats
    store = open_storage(f"s3://{s3_bucket}/runs/r1")
    keys = store.list("dataset")
    assert "dataset/prepare.json" in keys and "dataset/tokenizer/tokenizer.json" in keys
    assert PrepareResult.model_validate_json(store.read_text("dataset/prepare.json")) == result
    local = tmp_path / "tokens.npy"
    store.download_file(RunLayout.TRAIN_TOKENS, local)
    assert np.array_equal(np.load(local), np.load(file_run["out"] / RunLayout.TRAIN_TOKENS))
    assert not (tmp_path / "scratch" / "prepare").exists()  # scratch cleaned after success


# --------------------------------------------------------------------------- the split


def tldr_pairs(root: Path, scratch: Path, n_docs: int = N_DOCS) -> Iterator[tuple[str, str]]:
    spec = make_job(f"file://{root}/", "file:///unused", maxDocuments=n_docs).spec.dataset
    return open_source(spec, open_storage, scratch).lines()


@pytest.mark.parametrize("unit", ["line", "document"])
@pytest.mark.parametrize("dedup", ["exact", "none"])
def test_no_text_is_in_both_splits(
    unit: str, dedup: str, tldr_common: Path, small_tokenizer: Any, tmp_path: Path
) -> None:
    out = prepare_lines(
        tldr_pairs(tldr_common, tmp_path),
        CleanSpec(dedup=dedup),
        SplitSpec(unit=unit),
        small_tokenizer,
        tmp_path / "out",
    )
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in test})
    assert out.stats.overlap == 0
    if unit == "document":
        assert {r["doc"] for r in train}.isdisjoint({r["doc"] for r in test})
    if dedup == "none" and unit == "document":
        # Repeated lines ("Display the version:") sit in train and test documents:
        # prepare removes them from test and counts them.
        assert out.stats.duplicates_removed > 0
    if dedup == "none" and unit == "line":
        assert out.stats.duplicates_removed == 0
        assert len(train) + len(test) > len({r["text"] for r in train + test})
    assert not list((tmp_path / "out").glob(".*"))  # no temporaries left behind


@pytest.mark.parametrize("unit", ["line", "document"])
def test_split_is_reproducible_per_seed_and_the_fraction_is_about_right(
    unit: str, tldr_common: Path, small_tokenizer: Any, tmp_path: Path
) -> None:
    def split(seed: int, fraction: float, name: str) -> tuple[Any, list[dict[str, str]]]:
        out = prepare_lines(
            tldr_pairs(tldr_common, tmp_path),
            CleanSpec(),
            SplitSpec(seed=seed, test_fraction=fraction, unit=unit),
            small_tokenizer,
            tmp_path / name,
        )
        return out, read_jsonl(tmp_path / name / "test.jsonl")

    a, test_a = split(7, 0.2, "a")
    b, test_b = split(7, 0.2, "b")
    _, test_c = split(8, 0.2, "c")
    assert (a.train_sha256, a.test_sha256) == (b.train_sha256, b.test_sha256)
    assert test_a == test_b
    assert test_a != test_c
    if unit == "line":
        share = a.stats.test_lines / a.stats.kept_lines
        assert 0.17 < share < 0.23, share  # ~3400 lines: 3 sigma is about 0.02
    else:
        docs = {r["doc"] for r in test_a}
        share = len(docs) / N_DOCS
        assert 0.12 < share < 0.28, share  # 300 documents: 3 sigma is about 0.07


# --------------------------------------------------------------------------- bad input


def run_expecting_unusable(job: FineTuneJob, tmp_path: Path) -> str:
    with pytest.raises(StageError) as info:
        run(make_context(job, scratch=tmp_path / "scratch"))
    assert info.value.reason == "DatasetUnusable"
    out = Path(job.spec.storage.output.removeprefix("file://"))
    assert not (out / RunLayout.PREPARE_RESULT).exists()
    return str(info.value)


def test_empty_source_fails_naming_the_uri(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    job = make_job(f"file://{tmp_path}/empty/", f"file://{tmp_path}/out")
    message = run_expecting_unusable(job, tmp_path)
    assert f"file://{tmp_path}/empty" in message and "empty source" in message


def test_no_text_after_cleaning_says_what_dropped_it(tldr_common: Path, tmp_path: Path) -> None:
    job = make_job(
        f"file://{tldr_common}/",
        f"file://{tmp_path}/out",
        maxDocuments=5,
        clean={"minChars": 5000},
    )
    message = run_expecting_unusable(job, tmp_path)
    assert message.startswith(f"no text left after cleaning file://{tldr_common}")
    assert "lines read, all dropped by minChars=5000" in message
    assert "lower dataset.clean.minChars or check the format/textField" in message


def test_blank_only_source_has_no_text_left(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    job = make_job(f"file://{tmp_path}/blank.txt", f"file://{tmp_path}/out")
    assert "0 lines read" in run_expecting_unusable(job, tmp_path)


def test_binary_file_fails_naming_the_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plenty of normal text on this line\n" * 3)
    (src / "b.txt").write_bytes(bytes(range(256)))
    job = make_job(f"file://{src}/", f"file://{tmp_path}/out")
    message = run_expecting_unusable(job, tmp_path)
    assert f"file://{src}/b.txt" in message and "not UTF-8 text at byte 0" in message


def test_non_utf8_file_fails_naming_the_file_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "cp1252.md"
    path.write_bytes("# Title\n\u201csmart quotes\u201d here\n".encode("cp1252"))
    job = make_job(f"file://{path}", f"file://{tmp_path}/out")
    message = run_expecting_unusable(job, tmp_path)
    assert "cp1252.md" in message and "not UTF-8 text at byte 8" in message
    assert "convert it" in message


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_missing_text_field_fails_naming_file_and_field(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / f"records.{fmt}"
    if fmt == "jsonl":
        path.write_text(json.dumps({"instruction": "a long enough instruction", "output": "x"}))
    else:
        path.write_text("instruction,output\na long enough instruction,x\n")
    job = make_job(f"file://{path}", f"file://{tmp_path}/out", textField="body")
    message = run_expecting_unusable(job, tmp_path)
    assert f"records.{fmt}" in message and "'body'" in message
    assert "'instruction'" in message and "'output'" in message


def test_one_line_cannot_be_split(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("just one line of perfectly good text\n")
    job = make_job(f"file://{path}", f"file://{tmp_path}/out")
    message = run_expecting_unusable(job, tmp_path)
    assert "split of file://" in message and "one.txt" in message and "is empty" in message
    assert "testFraction" in message


def test_one_document_cannot_be_split_by_document(tmp_path: Path) -> None:
    path = tmp_path / "single.txt"
    path.write_text("".join(f"line number {i} of one document\n" for i in range(50)))
    job = make_job(f"file://{path}", f"file://{tmp_path}/out", split={"unit": "document"})
    message = run_expecting_unusable(job, tmp_path)
    assert "single.txt" in message and "unit: line" in message


# --------------------------------------------------------------------------- memory


def synthetic_lines(n: int) -> Iterator[tuple[str, str]]:
    """n lines, generated on the fly: ~5% exact repeats, documents of 100 lines."""
    words = [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "echo",
        "foxtrot",
        "golf",
        "hotel",
        "india",
        "juliet",
        "kilo",
        "lima",
        "mike",
        "november",
        "oscar",
        "papa",
    ]
    for i in range(n):
        k = i - 1 if i % 20 == 0 and i else i  # every 20th line repeats the previous one
        text = f"record {k} " + " ".join(words[(k * j) % 16] for j in range(3, 9))
        yield f"doc-{i // 100}", text


@pytest.mark.slow
def test_one_million_streamed_lines_keep_memory_bounded(
    small_tokenizer: Any, tmp_path: Path
) -> None:
    import psutil

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = 1_000_000
    try:
        out = prepare_lines(
            synthetic_lines(n), CleanSpec(), SplitSpec(), small_tokenizer, tmp_path / "out"
        )
    finally:
        done.set()
        sampler.join()
    stats = out.stats
    assert stats.lines == n
    assert stats.duplicates_removed == n // 20 - 1
    assert stats.kept_lines == n - stats.duplicates_removed
    offsets = np.load(tmp_path / "out" / "train.offsets.npy", mmap_mode="r")
    assert len(offsets) == stats.train_lines + 1
    growth_mb = (peak - baseline) / 2**20
    assert growth_mb < 500, f"peak RSS grew by {growth_mb:.0f} MB"
    shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("dedup", ["exact", "none"])
def test_worker_pool_output_is_byte_identical_to_one_process(
    dedup: str, tldr_common: Path, small_tokenizer: Any, tmp_path: Path
) -> None:
    """Several CHUNK_LINES chunks, so the forked pool really runs with two workers."""
    clean = CleanSpec.model_validate({"dedup": dedup})
    split = SplitSpec.model_validate({"unit": "document"})
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        prepared = prepare_lines(
            tldr_pairs(tldr_common, tmp_path / f"s{workers}", n_docs=800),
            clean,
            split,
            small_tokenizer,
            out,
            workers=workers,
        )
        assert prepared.stats.lines > 4 * 1024
        outputs[workers] = (
            prepared.stats,
            {
                name: (out / name).read_bytes()
                for name in (
                    "train.jsonl",
                    "test.jsonl",
                    "train.tokens.npy",
                    "test.tokens.npy",
                    "train.offsets.npy",
                    "test.offsets.npy",
                )
            },
        )
    assert outputs[1] == outputs[2]


def test_fast_encoder_gives_the_rust_tokenizers_ids(small_tokenizer: Any) -> None:
    from kubetune_trainer.tokenizer_build import FastEncoder

    lines = [
        line
        for f in tldr_files("common")[:400]
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    lines += ["héllo wörld ✓", "tabs\tand  double  spaces", "<|endoftext|> inside", "'s 've 123"]
    encoder = FastEncoder(small_tokenizer)
    assert encoder.fast_path, "the GPT-2-style tokenizer should take the fast path"
    backend = small_tokenizer.backend_tokenizer
    expected = [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)]
    assert encoder.encode(lines) == expected
