"""Things several benchmarks share, built once per run in a scratch directory (never the repo).

* :func:`scratch_root`: ``$KUBETUNE_BENCH_SCRATCH`` or ``/tmp/kubetune-bench``.
* :func:`bench_tokenizer`: a byte-level BPE tokenizer (kubetune's own trainer) fitted on the
  cleaned tldr lines, saved with ``save_pretrained`` so subprocesses can load it. Every side
  of every benchmark uses this one tokenizer, so token counts are comparable.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_VOCAB = 8192


def scratch_root() -> Path:
    root = Path(os.environ.get("KUBETUNE_BENCH_SCRATCH") or "/tmp/kubetune-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def bench_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """Directory of the shared tokenizer (trained on first use, then reused)."""
    path = scratch_root() / f"tokenizer-{vocab_size}"
    if (path / "tokenizer.json").exists():
        return path
    from bench.data import clean_tldr_lines
    from kubetune_trainer.tokenizer_build import train_bpe_tokenizer

    lines = clean_tldr_lines()
    tokenizer = train_bpe_tokenizer(lines, vocab_size, model_max_length=1024, length=len(lines))
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(path) if not path.exists() else None
    return path
