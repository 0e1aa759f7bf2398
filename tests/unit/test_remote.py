"""compareWith endpoints against a real local HTTP server speaking the OpenAI completions API."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubetune.contract import Env
from kubetune.dataset_format import ExampleRow
from kubetune.schema import CompareWithSpec
from kubetune_trainer.bleu import BleuSample
from kubetune_trainer.remote import (
    NO_ANSWER_PERPLEXITY_NOTE,
    NO_LOGPROBS_NOTE,
    Endpoint,
    RemoteError,
    score_endpoint,
    score_endpoint_answers,
)

KEY = "sk-test-secret-value-123"
SAMPLES = [
    BleuSample("list all files", "in the current directory"),
    BleuSample("create an archive", "from a directory"),
    BleuSample("show the", "manual page"),
]
TEXTS = ["list all files in the current directory", "show the manual page"]


@dataclass
class Behaviour:
    """How the fake server answers; tests flip these switches."""

    logprobs: bool = True
    completions: bool = True  # False: /completions is 404 (chat-only server)
    reject_zero_max_tokens: bool = False
    fail_first: int = 0  # answer 503 this many times first
    always_status: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)


def _token_logprobs(text: str) -> tuple[list[str], list[float | None], list[int]]:
    """Whitespace 'tokens' with log-probability -0.5 * (length of the word)."""
    tokens: list[str] = []
    offsets: list[int] = []
    pos = 0
    for word in text.split(" "):
        tokens.append(word if not offsets else " " + word)
        offsets.append(pos)
        pos += len(tokens[-1])
    values: list[float | None] = [None] + [-0.5 * len(t.strip()) for t in tokens[1:]]
    return tokens, values, offsets


def _make_handler(state: Behaviour) -> type[BaseHTTPRequestHandler]:
    answers = {s.prompt: s.reference for s in SAMPLES}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append({"path": self.path, **payload})
            state.auth.append(self.headers.get("Authorization"))
            if state.always_status:
                return self._send(state.always_status, {"error": "down"})
            if state.fail_first > 0:
                state.fail_first -= 1
                return self._send(503, {"error": "warming up"})
            if self.path == "/v1/chat/completions":
                prompt = payload["messages"][-1]["content"]
                return self._send(
                    200,
                    {
                        "choices": [
                            {
                                "message": {
                                    "role": "assistant",
                                    "content": answers.get(prompt, "?") + "\nmore",
                                }
                            }
                        ]
                    },
                )
            if self.path != "/v1/completions" or not state.completions:
                return self._send(404, {"error": "not found"})
            prompt = payload["prompt"]
            if payload.get("echo"):
                if payload["max_tokens"] == 0 and state.reject_zero_max_tokens:
                    return self._send(400, {"error": "max_tokens must be at least 1"})
                if not state.logprobs:
                    return self._send(200, {"choices": [{"text": prompt, "logprobs": None}]})
                tokens, values, offsets = _token_logprobs(prompt)
                if payload["max_tokens"] > 0:  # echo plus one generated token
                    tokens, values = [*tokens, " extra"], [*values, -9.0]
                    offsets = [*offsets, len(prompt)]
                return self._send(
                    200,
                    {
                        "choices": [
                            {
                                "text": prompt,
                                "logprobs": {
                                    "tokens": tokens,
                                    "token_logprobs": values,
                                    "text_offset": offsets,
                                },
                            }
                        ]
                    },
                )
            return self._send(200, {"choices": [{"text": " " + answers.get(prompt, "?")}]})

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    state = Behaviour()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _endpoint(url: str, **kwargs: Any) -> Endpoint:
    spec = CompareWithSpec(name="local-llm", base_url=url, model="tiny", api_key_env="MY_KEY")
    return Endpoint.from_spec(spec, {"MY_KEY": KEY}, backoff=0.01, **kwargs)


def _expected_perplexity(texts: list[str]) -> float:
    values = [v for t in texts for v in _token_logprobs(t)[1] if v is not None]
    return math.exp(-sum(values) / len(values))


def test_endpoint_bleu_and_perplexity_from_completions(server: tuple[str, Behaviour]) -> None:
    url, state = server
    comparison, continuations = score_endpoint(_endpoint(url), SAMPLES, TEXTS, max_new_tokens=8)
    assert continuations == [s.reference for s in SAMPLES]
    assert comparison.bleu == pytest.approx(100.0)
    assert comparison.perplexity == pytest.approx(_expected_perplexity(TEXTS))
    assert comparison.note is None
    generation = [r for r in state.requests if not r.get("echo")]
    assert all(
        r["max_tokens"] == 8 and r["temperature"] == 0 and r["model"] == "tiny" for r in generation
    )
    scoring = [r for r in state.requests if r.get("echo")]
    assert all(r["max_tokens"] == 0 and r["logprobs"] == 1 for r in scoring)
    assert set(state.auth) == {f"Bearer {KEY}"}


def test_endpoint_without_logprobs_reports_why_perplexity_is_missing(
    server: tuple[str, Behaviour],
) -> None:
    url, state = server
    state.logprobs = False
    comparison, _ = score_endpoint(_endpoint(url), SAMPLES, TEXTS, max_new_tokens=8)
    assert comparison.perplexity is None
    assert comparison.note == NO_LOGPROBS_NOTE
    assert comparison.bleu == pytest.approx(100.0)


def test_endpoint_refusing_zero_max_tokens_still_scores_only_the_prompt(
    server: tuple[str, Behaviour],
) -> None:
    url, state = server
    state.reject_zero_max_tokens = True
    comparison, _ = score_endpoint(_endpoint(url), [], TEXTS, max_new_tokens=8)
    # The generated token (-9.0) must not leak into the prompt's perplexity.
    assert comparison.perplexity == pytest.approx(_expected_perplexity(TEXTS))


def test_chat_only_endpoint_falls_back_to_chat_completions(server: tuple[str, Behaviour]) -> None:
    url, state = server
    state.completions = False
    comparison, continuations = score_endpoint(
        _endpoint(url), SAMPLES, [], max_new_tokens=8, perplexity=False
    )
    assert continuations == [s.reference for s in SAMPLES]  # cut at the newline
    assert comparison.bleu == pytest.approx(100.0)
    assert any(r["path"] == "/v1/chat/completions" for r in state.requests)


def test_transient_503_is_retried(server: tuple[str, Behaviour]) -> None:
    url, state = server
    state.fail_first = 2
    comparison, _ = score_endpoint(
        _endpoint(url, concurrency=1), SAMPLES[:1], [], max_new_tokens=4, perplexity=False
    )
    assert comparison.bleu == pytest.approx(100.0)
    assert len(state.requests) == 3


def test_persistent_failure_becomes_a_note_without_the_key(
    server: tuple[str, Behaviour],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, state = server
    state.always_status = 500
    endpoint = _endpoint(url, retries=2)
    with caplog.at_level(logging.DEBUG):
        comparison, _ = score_endpoint(endpoint, SAMPLES[:1], TEXTS[:1], max_new_tokens=4)
        with pytest.raises(RemoteError) as info:
            endpoint.post("completions", {"model": "tiny", "prompt": "x"})
    assert comparison.bleu is None and comparison.perplexity is None
    assert comparison.note and "HTTP 500" in comparison.note
    assert KEY not in comparison.note and KEY not in str(info.value) and KEY not in repr(endpoint)
    assert KEY not in caplog.text
    assert len(state.requests) == 3 * 3  # 2 retries for each of the 3 calls


def test_unreachable_endpoint_names_the_url() -> None:
    endpoint = _endpoint("http://127.0.0.1:9/v1", retries=0, timeout=2)
    with pytest.raises(RemoteError, match=r"cannot reach http://127\.0\.0\.1:9/v1/completions"):
        endpoint.post("completions", {})


def test_api_key_comes_from_named_variable_then_operator_variable() -> None:
    spec = CompareWithSpec(name="my-vllm.prod", base_url="http://x/v1", model="m")
    assert Env.compare_api_key(spec.name) == "KUBETUNE_COMPARE_MY_VLLM_PROD_API_KEY"
    assert Endpoint.from_spec(spec, {"KUBETUNE_COMPARE_MY_VLLM_PROD_API_KEY": "k"}).api_key == "k"
    assert Endpoint.from_spec(spec, {}).api_key is None
    named = spec.model_copy(update={"api_key_env": "OPENAI_API_KEY"})
    assert (
        Endpoint.from_spec(
            named, {"OPENAI_API_KEY": "a", "KUBETUNE_COMPARE_MY_VLLM_PROD_API_KEY": "b"}
        ).api_key
        == "a"
    )


def test_endpoint_answers_examples_through_chat_and_keeps_multiline_answers(
    server: tuple[str, Behaviour],
) -> None:
    url, state = server
    examples = [
        ExampleRow(text="t", doc="d", prompt=s.prompt, answer=s.reference + "\nmore")
        for s in SAMPLES
    ]
    chat = ExampleRow(
        text="t",
        doc="d",
        prompt="show the",
        answer="wrong",
        messages=({"role": "system", "content": "short"}, {"role": "user", "content": "show the"}),
    )
    comparison, answers = score_endpoint_answers(
        _endpoint(url), [*examples, chat], max_new_tokens=32, perplexity=False
    )
    # Answers are not cut at a newline (they may span lines), only stripped.
    assert answers == [s.reference + "\nmore" for s in SAMPLES] + ["manual page\nmore"]
    assert comparison.exact_match == pytest.approx(75.0)
    assert comparison.chrf is not None and comparison.bleu is not None
    assert comparison.perplexity is None and comparison.note is None
    assert {r["path"] for r in state.requests} == {"/v1/chat/completions"}
    messages = sorted((r["messages"] for r in state.requests), key=len)
    assert messages[-1] == [dict(m) for m in chat.messages or ()]
    assert [{"role": "user", "content": SAMPLES[0].prompt}] in messages
    assert all(r["max_tokens"] == 32 and r["temperature"] == 0 for r in state.requests)
    assert set(state.auth) == {f"Bearer {KEY}"}


def test_endpoint_answers_note_why_perplexity_is_missing_and_failures(
    server: tuple[str, Behaviour],
) -> None:
    url, state = server
    example = ExampleRow(text="t", doc="d", prompt="list all files", answer="x")
    comparison, _ = score_endpoint_answers(_endpoint(url), [example], max_new_tokens=4)
    assert comparison.note == NO_ANSWER_PERPLEXITY_NOTE and comparison.exact_match == 0.0
    state.always_status = 500
    comparison, answers = score_endpoint_answers(
        _endpoint(url, retries=1), [example], max_new_tokens=4
    )
    assert answers == [] and comparison.chrf is None and comparison.exact_match is None
    assert comparison.note and "HTTP 500" in comparison.note
    assert NO_ANSWER_PERPLEXITY_NOTE in comparison.note and KEY not in comparison.note
