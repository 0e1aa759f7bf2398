"""The evaluate stage on promptCompletion and chat datasets: answer-only perplexity, greedy
answers to held-out prompts scored with BLEU, chrF and exact match, for the fine-tuned model,
the baseline and a chat endpoint on a local HTTP server.

The fine-tuned model is a tiny GPT-2 fitted to the held-out examples themselves (train.jsonl
holds other examples, so the overlap check passes): its greedy answers are the references,
which pins down the prompt ids, the stop at eos and the cut at the template's end-of-turn
text exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
import torch

from kubetune.dataset_format import (
    TEST,
    TRAIN,
    ExampleRow,
    JsonlWriter,
    TokenWriter,
    upload_splits,
)
from kubetune.layout import RunLayout
from kubetune.results import EvaluateResult, PrepareResult, TrainingRecord
from kubetune.schema import DatasetStats, FineTuneJob, job_manifest, parse_job
from kubetune.storage import Storage, open_storage
from kubetune_trainer import evaluate
from kubetune_trainer.bleu import (
    _single_token,
    corpus_chrf,
    cut_answer,
    exact_match,
    generate_answers,
)
from kubetune_trainer.context import make_context
from kubetune_trainer.modeling import load_model
from kubetune_trainer.remote import NO_ANSWER_PERPLEXITY_NOTE

EOS = "<|endoftext|>"
END = "<|end|>"  # the chat template's end-of-turn text: ordinary (multi-token) text here
N_POSITIONS = 64
SEED = 5
FINGERPRINT = "f" * 64
VERBS = [
    ("list the files in", "ls"),
    ("show the disk usage of", "du -sh"),
    ("remove the directory", "rm -r"),
    ("count the lines of", "wc -l"),
    ("print the file", "cat"),
    ("make the directory", "mkdir -p"),
]
OBJECTS = ["docs", "src", "tmp", "build", "notes", "data"]
N_TEST = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Split:
    rows: list[ExampleRow]
    ids: list[list[int]]
    masks: list[list[int]]


@dataclass
class Built:
    kind: str
    tokenizer: Any
    model: Any
    test: Split
    train: Split
    root: Path


def _pairs() -> list[tuple[str, str]]:
    # Answers of 4+ words: corpus BLEU needs 4-grams to be above 0.
    return [(f"{v} {o}", f"{c} {o} > out.txt") for o in OBJECTS for v, c in VERBS]


def _render(kind: str, prompt: str, answer: str) -> tuple[str, str, tuple[dict[str, str], ...]]:
    """(prompt text, answer text, chat messages before the answer) as a template renders them."""
    if kind == "chat":
        messages = ({"role": "system", "content": "be brief"}, {"role": "user", "content": prompt})
        return (
            f"<|system|>\nbe brief\n<|user|>\n{prompt}\n<|assistant|>\n",
            f"{answer}{END}",
            messages,
        )
    return f"{prompt}\n", answer, ()


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def _split(kind: str, pairs: list[tuple[str, str]], tokenizer: Any) -> Split:
    rows, ids, masks = [], [], []
    for i, (prompt, answer) in enumerate(pairs):
        prompt_text, answer_text, messages = _render(kind, prompt, answer)
        p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        rows.append(
            ExampleRow(
                text=prompt_text + answer_text,
                doc=f"record-{i}",
                prompt=prompt,
                answer=answer,
                messages=messages if kind == "chat" else None,
            )
        )
        ids.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    return Split(rows, ids, masks)


def _tiny_gpt2(vocab_size: int, seed: int = SEED) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=N_POSITIONS,
        vocab_size=vocab_size,
        bos_token_id=0,  # <|endoftext|>, the tokenizer's only special token
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _fit(model: Any, split: Split, eos: int, steps: int = 300, lr: float = 3e-3) -> Any:
    """Fit the answers (and the eos after them) given the prompts, as training does."""
    seqs = [[eos, *ids, eos] for ids in split.ids]
    trained = [[0, *m, 1] for m in split.masks]
    width = max(map(len, seqs))
    x = torch.full((len(seqs), width), eos)
    labels = torch.full((len(seqs), width), -100)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, t) in enumerate(zip(seqs, trained, strict=True)):
        x[r, : len(s)] = torch.tensor(s)
        attention[r, : len(s)] = 1
        labels[r, : len(s)] = torch.where(torch.tensor(t) == 1, torch.tensor(s), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=attention, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _write_dataset(store: Storage, work: Path, splits: dict[str, Split]) -> dict[str, str]:
    out = work / "dataset"
    out.mkdir(parents=True)
    shas = {}
    for name, split in splits.items():
        text = JsonlWriter(out / f"{name}.jsonl")
        tokens = TokenWriter(out, name, masked=True)
        for row in split.rows:
            text.write_example(row)
        tokens.add(split.ids, split.masks)
        shas[name] = text.close()
        tokens.close()
    upload_splits(store, out)
    return shas


def _build(root: Path, kind: str) -> Built:
    pairs = _pairs()
    test_pairs, train_pairs = pairs[:N_TEST], pairs[N_TEST:]
    texts = ["".join(_render(kind, p, a)[:2]) for p, a in pairs]
    tokenizer = _train_tokenizer(texts)
    test, train = _split(kind, test_pairs, tokenizer), _split(kind, train_pairs, tokenizer)
    eos = tokenizer.eos_token_id
    model = _fit(_tiny_gpt2(len(tokenizer)), test, eos)

    store = open_storage(f"file://{root}")
    work = root.parent / f"{root.name}-work"
    shas = _write_dataset(store, work, {TEST: test, TRAIN: train})
    tokenizer.save_pretrained(work / "tokenizer")
    store.upload_dir(work / "tokenizer", RunLayout.TOKENIZER)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    store.upload_dir(work / "model", RunLayout.MODEL)
    stats = DatasetStats(
        documents=1,
        lines=len(pairs),
        kept_lines=len(pairs),
        train_lines=len(train_pairs),
        test_lines=N_TEST,
        train_tokens=sum(map(len, train.ids)),
        test_tokens=sum(map(len, test.ids)),
    )
    store.write_text(
        RunLayout.PREPARE_RESULT,
        PrepareResult(
            stats=stats,
            train_sha256=shas[TRAIN],
            test_sha256=shas[TEST],
            tokenizer="trained byte-level BPE",
            dataset_uri=store.uri(RunLayout.DATASET),
            fingerprint=FINGERPRINT,
            answer_end=END if kind == "chat" else None,
        ).to_json(),
    )
    store.write_text(
        RunLayout.MODEL_RECORD,
        TrainingRecord(
            dataset_fingerprint=FINGERPRINT, train_sha256=shas[TRAIN], training_fingerprint="t" * 64
        ).to_json(),
    )
    return Built(kind, tokenizer, model, test, train, root)


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("chat") / "out", "chat")


@pytest.fixture(scope="module")
def completion(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("completion") / "out", "promptCompletion")


def _job(built: Built, **evaluation: Any) -> FineTuneJob:
    return parse_job(
        job_manifest(
            "tiny-instruct",
            model={
                "fresh": {
                    "nLayer": 2,
                    "nHead": 2,
                    "nEmbd": 64,
                    "nPositions": N_POSITIONS,
                    "vocabSize": len(built.tokenizer),
                }
            },
            dataset={"source": "file:///dev/null/records.jsonl", "kind": built.kind},
            training={"maxSeqLength": N_POSITIONS, "seed": SEED},
            evaluation=evaluation
            | {"bleu": {"maxSamples": 8, "maxNewTokens": 16} | evaluation.get("bleu", {})},
            storage={"output": f"file://{built.root}"},
        )
    )


def _evaluate(
    built: Built, tmp_path: Path, answer_end: str | None = None, **evaluation: Any
) -> EvaluateResult:
    ctx = make_context(_job(built, **evaluation), scratch=tmp_path / "scratch")
    return evaluate.run(ctx, answer_end=answer_end)


def _samples(built: Built) -> list[dict[str, Any]]:
    text = (built.root / RunLayout.EVAL_SAMPLES).read_text()
    return [json.loads(line) for line in text.splitlines()]


@torch.no_grad()
def _answer_nll(model: Any, split: Split, eos: int, limit: int) -> tuple[float, int]:
    """Independently: each example as [eos] + ids + [eos], NLL of answer tokens and the eos."""
    nll, count = 0.0, 0
    for ids, mask in list(zip(split.ids, split.masks, strict=True))[:limit]:
        x = torch.tensor([[eos, *ids, eos]])
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
        picked = logp.gather(1, x[0, 1:, None]).squeeze(1)
        keep = torch.tensor([*mask, 1], dtype=torch.bool)
        nll -= picked[keep].sum().item()
        count += int(keep.sum())
    return nll, count


# --------------------------------------------------------------------------- scoring helpers


def test_exact_match_normalises_whitespace_only() -> None:
    refs = ["ls  docs", "du -sh src", "Cat notes", "x"]
    hyps = ["ls docs", " du -sh\nsrc ", "cat notes", "x."]
    assert exact_match(hyps, refs) == pytest.approx(50.0)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_chrf_is_sacrebleu_corpus_chrf_with_its_signature() -> None:
    refs = ["ls docs", "du -sh src", "rm -r build", "wc -l notes"]
    hyps = ["ls docs", "du src", "rm build -r", ""]
    score, signature = corpus_chrf(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert signature.startswith("nrefs:1|") and "nc:6" in signature and "nw:0" in signature


def test_cut_answer_at_the_end_of_turn_text() -> None:
    assert cut_answer("  ls docs<|end|>\n<|user|> more ") == "ls docs<|end|>\n<|user|> more"
    assert cut_answer("  ls docs<|end|>\n<|user|> more ", "<|end|>") == "ls docs"
    assert cut_answer("ls docs <|im_end|>", "<|im_end|>\n") == "ls docs"
    assert cut_answer("first\n\nsecond", "\n\n") == "first"


def test_single_token_end_marker_is_recognised(chat: Built) -> None:
    tok = chat.tokenizer
    assert _single_token(tok, EOS) == tok.eos_token_id
    assert _single_token(tok, END) is None  # ordinary text of several tokens here


# --------------------------------------------------------------------------- generation


def _prompt_ids(split: Split) -> list[list[int]]:
    from kubetune.dataset_format import answer_start

    return [ids[: answer_start(m)] for ids, m in zip(split.ids, split.masks, strict=True)]


def test_fitted_model_answers_its_prompts_and_stops(chat: Built) -> None:
    tok = chat.tokenizer
    prompts = _prompt_ids(chat.test)
    kwargs: dict[str, Any] = {"max_new_tokens": 16, "max_length": N_POSITIONS}
    cut, _ = generate_answers(chat.model, tok, prompts, answer_end=END, **kwargs)
    assert cut == [r.answer for r in chat.test.rows]
    # Without the end-of-turn text the answers keep it: the model stopped at eos after it.
    raw, _ = generate_answers(chat.model, tok, prompts, **kwargs)
    assert raw == [f"{r.answer}{END}" for r in chat.test.rows]


def test_batched_answers_equal_one_at_a_time_and_generate(chat: Built) -> None:
    # The fitted model with noise on its weights: some rows stop at once, others run to
    # max_new_tokens, so finished rows leave the batch at different steps.
    tok = chat.tokenizer
    model = copy.deepcopy(chat.model)
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise) * 0.2)
    prompts = _prompt_ids(chat.test) + _prompt_ids(chat.train)
    kwargs: dict[str, Any] = {"max_new_tokens": 24, "max_length": N_POSITIONS}
    batched, _ = generate_answers(model, tok, prompts, batch_size=8, **kwargs)
    single, _ = generate_answers(model, tok, prompts, batch_size=1, **kwargs)
    with_generate, _ = generate_answers(
        model, tok, prompts, batch_size=8, use_generate=True, **kwargs
    )
    assert batched == single == with_generate
    lengths = [len(tok(a)["input_ids"]) for a in batched]
    assert max(lengths) >= 16 and min(lengths) == 0, lengths


# --------------------------------------------------------------------------- the stage


def test_chat_evaluation_scores_answers_of_model_and_baseline(chat: Built, tmp_path: Path) -> None:
    # answer_end comes from prepare.json (PrepareResult.answer_end) when not given.
    result = _evaluate(chat, tmp_path, maxSamples=10)
    ft, base = result.fine_tuned, result.baseline
    assert base is not None
    assert result.kind == "chat" and result.is_instruction
    assert result.test_lines == N_TEST

    # Answer perplexity equals an independent per-example computation.
    # (The fitted model's NLL is near 0, so float32 logits bound it in absolute terms.)
    eos = chat.tokenizer.eos_token_id
    nll, count = _answer_nll(chat.model, chat.test, eos, 10)
    assert ft.perplexity_lines == 10 and ft.predicted_tokens == count
    assert ft.nll_sum == pytest.approx(nll, rel=1e-5, abs=1e-5)
    assert ft.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    job = _job(chat)
    baseline_model = load_model(
        job.spec.model,
        make_context(job, scratch=tmp_path / "base"),
        len(chat.tokenizer),
        seed=job.spec.training.seed,  # the untrained init the fine-tune started from
    ).eval()
    base_nll, _ = _answer_nll(baseline_model, chat.test, eos, 10)
    assert base.predicted_tokens == count and base.nll_sum == pytest.approx(base_nll, rel=1e-5)
    assert base.perplexity is not None and ft.perplexity < base.perplexity / 10

    # The fitted model answers every prompt exactly; its untrained baseline does not.
    assert ft.bleu_samples == 8 and base.bleu_samples == 8
    assert ft.exact_match == pytest.approx(100.0)
    assert ft.chrf == pytest.approx(100.0) and ft.bleu == pytest.approx(100.0)
    assert base.exact_match == pytest.approx(0.0) and base.chrf is not None
    assert base.chrf < 50
    assert result.chrf_signature and result.chrf_signature.startswith("nrefs:1|")
    assert result.bleu_signature and "tok:13a" in result.bleu_signature

    rows = _samples(chat)
    assert len(rows) == 8
    for row, example in zip(rows, chat.test.rows, strict=False):
        assert set(row) == {"prompt", "reference", "fine_tuned", "baseline"}
        assert row["prompt"] == example.prompt and row["reference"] == example.answer
        assert row["fine_tuned"] == example.answer
    # The scores are recomputable from the samples file.
    hyps, refs = [r["baseline"] for r in rows], [r["reference"] for r in rows]
    assert base.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert base.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    stored = EvaluateResult.model_validate_json((chat.root / RunLayout.EVAL_RESULT).read_text())
    assert stored == result


def test_answer_end_argument_overrides_prepare(chat: Built, tmp_path: Path) -> None:
    result = _evaluate(
        chat, tmp_path, answer_end="", perplexity=False, baseline=False, bleu={"maxSamples": 3}
    )
    # "" (no end-of-turn text): the answers keep the template's end marker.
    assert [r["fine_tuned"] for r in _samples(chat)] == [
        f"{e.answer}{END}" for e in chat.test.rows[:3]
    ]
    assert result.fine_tuned.exact_match == 0.0 and result.fine_tuned.perplexity is None


def test_prompt_completion_perplexity_only_respects_max_samples(
    completion: Built, tmp_path: Path
) -> None:
    result = _evaluate(completion, tmp_path, baseline=False, maxSamples=5, bleu={"enabled": False})
    nll, count = _answer_nll(
        completion.model, completion.test, completion.tokenizer.eos_token_id, 5
    )
    ft = result.fine_tuned
    assert ft.perplexity_lines == 5 and ft.predicted_tokens == count
    assert ft.nll_sum == pytest.approx(nll, rel=1e-5, abs=1e-5)
    assert ft.bleu is None and ft.chrf is None and ft.exact_match is None
    assert result.chrf_signature is None and result.samples_uri is None
    assert result.kind == "promptCompletion"


# --------------------------------------------------------------------------- endpoints


@dataclass
class Chat:
    """A chat-completions server: answers from ``answers`` (by the last user message)."""

    answers: dict[str, str]
    status: int = 200
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def chat_server() -> Iterator[tuple[str, Chat]]:
    state = Chat({})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append({"path": self.path, **payload})
            if state.status != 200 or self.path != "/v1/chat/completions":
                body: dict[str, Any] = {"error": "no"}
                status = state.status if state.status != 200 else 404
            else:
                last = payload["messages"][-1]["content"]
                content = state.answers.get(last, "no idea")
                body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                status = 200
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _compare(url: str) -> dict[str, Any]:
    return {"compareWith": [{"name": "local-chat", "baseUrl": url, "model": "tiny"}]}


@pytest.mark.parametrize("kind", ["chat", "promptCompletion"])
def test_endpoint_answers_the_same_prompts_through_chat_completions(
    kind: str,
    chat: Built,
    completion: Built,
    chat_server: tuple[str, Chat],
    tmp_path: Path,
) -> None:
    built = chat if kind == "chat" else completion
    url, state = chat_server
    examples = built.test.rows[:4]
    # Two right (one with extra spacing), one wrong, one unknown.
    state.answers = {
        examples[0].prompt: examples[0].answer,
        examples[1].prompt: "  " + examples[1].answer.replace(" ", "   ") + "\n",
        examples[2].prompt: "something else entirely",
    }
    result = _evaluate(
        built, tmp_path, baseline=False, bleu={"maxSamples": 4, "maxNewTokens": 16}, **_compare(url)
    )
    (comparison,) = result.comparisons
    assert comparison.name == "local-chat"
    assert comparison.exact_match == pytest.approx(50.0)
    answers = [r["comparisons"]["local-chat"] for r in _samples(built)]
    refs = [e.answer for e in examples]
    assert answers[0] == refs[0] and answers[3] == "no idea"
    assert comparison.chrf == pytest.approx(sacrebleu.corpus_chrf(answers, [refs]).score)
    assert comparison.bleu == pytest.approx(sacrebleu.corpus_bleu(answers, [refs]).score)
    assert comparison.perplexity is None and comparison.note == NO_ANSWER_PERPLEXITY_NOTE

    assert len(state.requests) == 4
    for request in state.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["temperature"] == 0 and request["max_tokens"] == 16
        assert request["model"] == "tiny"
    sent = sorted((r["messages"] for r in state.requests), key=lambda m: m[-1]["content"])
    if kind == "chat":
        expected = [[dict(m) for m in (e.messages or ())] for e in examples]
        assert all(m[0] == {"role": "system", "content": "be brief"} for m in sent)
    else:
        expected = [[{"role": "user", "content": e.prompt}] for e in examples]
    assert sent == sorted(expected, key=lambda m: m[-1]["content"])


def test_failing_endpoint_is_a_note_not_a_failed_stage(
    completion: Built, chat_server: tuple[str, Chat], tmp_path: Path
) -> None:
    url, state = chat_server
    state.status = 400
    result = _evaluate(
        completion,
        tmp_path,
        baseline=False,
        perplexity=False,
        bleu={"maxSamples": 2},
        **_compare(url),
    )
    (comparison,) = result.comparisons
    assert comparison.bleu is None and comparison.chrf is None and comparison.exact_match is None
    assert comparison.note and "HTTP 400" in comparison.note
    assert NO_ANSWER_PERPLEXITY_NOTE not in comparison.note  # perplexity was not asked for
    assert result.fine_tuned.exact_match == pytest.approx(100.0)
    assert all("comparisons" not in row for row in _samples(completion))


def test_overlap_with_training_examples_is_refused(chat: Built, tmp_path: Path) -> None:
    import shutil

    from kubetune.contract import StageError

    out = tmp_path / "out"
    shutil.copytree(chat.root, out)
    test_jsonl = (out / RunLayout.TEST_TEXT).read_text().splitlines()
    with open(out / RunLayout.TRAIN_TEXT, "a", encoding="utf-8") as fh:
        fh.write(test_jsonl[0] + "\n")
    record = TrainingRecord.model_validate_json((out / RunLayout.MODEL_RECORD).read_text())
    prepare = PrepareResult.model_validate_json((out / RunLayout.PREPARE_RESULT).read_text())
    sha = hashlib.sha256((out / RunLayout.TRAIN_TEXT).read_bytes()).hexdigest()
    (out / RunLayout.MODEL_RECORD).write_text(
        record.model_copy(update={"train_sha256": sha}).to_json()
    )
    (out / RunLayout.PREPARE_RESULT).write_text(
        prepare.model_copy(update={"train_sha256": sha}).to_json()
    )
    copy = Built(chat.kind, chat.tokenizer, chat.model, chat.test, chat.train, out)
    with pytest.raises(StageError, match="1 test lines") as info:
        _evaluate(copy, tmp_path)
    assert info.value.reason == "DatasetUnusable"
