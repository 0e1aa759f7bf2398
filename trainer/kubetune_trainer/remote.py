"""Score an OpenAI-compatible endpoint (Ollama, vLLM, OpenAI) on the same test prompts.

Usage (what the evaluate stage does for each ``spec.evaluation.compareWith`` entry)::

    from kubetune_trainer.remote import Endpoint, score_endpoint
    endpoint = Endpoint.from_spec(spec.evaluation.compare_with[0])
    comparison, continuations = score_endpoint(endpoint, samples, texts, max_new_tokens=48)

* BLEU: each BLEU prompt goes to ``POST {baseUrl}/completions`` (greedy:
  ``temperature 0``, ``stop ["\\n"]``); an endpoint without the completions API
  (404/405) is asked through ``/chat/completions`` instead, with an instruction
  to continue the text. Continuations are cut at the first newline and scored
  with the same sacrebleu settings as the local models.
* Perplexity: only when the endpoint returns log-probabilities of the prompt
  tokens (``echo: true, logprobs: 1, max_tokens: 0``). It is computed over the
  endpoint's own tokens, so it is comparable in trend, not token for token,
  with the local models. Otherwise the comparison says why it is missing.
* promptCompletion and chat datasets (:func:`score_endpoint_answers`): each held-out
  example's conversation goes to ``POST {baseUrl}/chat/completions`` (chat: the
  turns before the answer, ending with the user's; promptCompletion: the prompt as
  one user message), greedy, and the answers are scored against the references with
  BLEU, chrF and exact match like the local models. Answer perplexity is not
  computed: a chat API gives no log-probabilities of a given answer.
* The API key comes from the variable named by ``apiKeyEnv``, else from
  ``KUBETUNE_COMPARE_<NAME>_API_KEY`` (the operator injects it from
  ``apiKeySecret`` and drops ``apiKeyEnv`` from the spec its pods read). It is only
  ever sent in the Authorization header: never logged, never in an error message.
* Each request has a timeout; 429 and 5xx answers and connection errors are
  retried with exponential backoff (``Retry-After`` honoured up to 30 s).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kubetune.contract import Env
from kubetune.dataset_format import ExampleRow
from kubetune.schema import CompareWithSpec, Comparison
from kubetune_trainer.bleu import BleuSample, corpus_bleu, corpus_chrf, exact_match

log = logging.getLogger(__name__)

NO_LOGPROBS_NOTE = "endpoint returns no prompt log-probabilities; perplexity not computed"
NO_ANSWER_PERPLEXITY_NOTE = (
    "answer perplexity not computed: a chat endpoint gives no log-probabilities of the "
    "reference answers"
)
CHAT_INSTRUCTION = (
    "Continue the following text. Reply with the continuation only, on one line, "
    "without repeating the text."
)


class RemoteError(RuntimeError):
    """An endpoint call failed for good; the message names the URL and the HTTP status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Endpoint:
    """Where to send requests; ``api_key`` is kept out of repr()."""

    name: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    concurrency: int = 4

    @classmethod
    def from_spec(
        cls, spec: CompareWithSpec, environ: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Endpoint:
        env = os.environ if environ is None else environ
        key = env.get(spec.api_key_env) if spec.api_key_env else None
        key = key or env.get(Env.compare_api_key(spec.name)) or None
        return cls(spec.name, spec.base_url.rstrip("/"), spec.model, key, **kwargs)

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to ``base_url + path``; retries 429/5xx/connection errors."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(payload).encode()
        attempt = 0
        while True:
            attempt += 1
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            delay = self.backoff * 2 ** (attempt - 1)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data: dict[str, Any] = json.loads(response.read().decode("utf-8"))
                    return data
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if (exc.code != 429 and exc.code < 500) or attempt > self.retries:
                    raise RemoteError(
                        f"{self.name}: POST {url} answered HTTP {exc.code}: {detail}", exc.code
                    ) from None
                retry_after = exc.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = min(float(retry_after), 30.0)
                log.info(
                    "%s: HTTP %s from %s, retry %d in %.1fs",
                    self.name,
                    exc.code,
                    url,
                    attempt,
                    delay,
                )
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt > self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise RemoteError(
                        f"{self.name}: cannot reach {url} ({reason}); check compareWith.baseUrl"
                    ) from None
                log.info("%s: %s unreachable, retry %d in %.1fs", self.name, url, attempt, delay)
            except json.JSONDecodeError:
                raise RemoteError(f"{self.name}: {url} did not answer JSON") from None
            time.sleep(delay)


class _Client:
    """Completions with a chat fallback, remembered after the first 404/405."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.use_chat = False

    def continuation(self, prompt: str, max_new_tokens: int) -> str:
        ep = self.endpoint
        if not self.use_chat:
            try:
                data = ep.post(
                    "completions",
                    {
                        "model": ep.model,
                        "prompt": prompt,
                        "max_tokens": max_new_tokens,
                        "temperature": 0,
                        "stop": ["\n"],
                    },
                )
                return str(data["choices"][0].get("text") or "")
            except RemoteError as exc:
                if exc.status not in (404, 405):
                    raise
                self.use_chat = True
        data = ep.post(
            "chat/completions",
            {
                "model": ep.model,
                "max_tokens": max_new_tokens,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": CHAT_INSTRUCTION},
                    {"role": "user", "content": prompt},
                ],
            },
        )
        return str(data["choices"][0]["message"].get("content") or "")

    def answer(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> str:
        """The endpoint's greedy chat answer to ``messages``."""
        ep = self.endpoint
        data = ep.post(
            "chat/completions",
            {
                "model": ep.model,
                "max_tokens": max_new_tokens,
                "temperature": 0,
                "messages": [dict(m) for m in messages],
            },
        )
        try:
            return str(data["choices"][0]["message"].get("content") or "")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RemoteError(
                f"{ep.name}: {ep.base_url}/chat/completions answered without choices[0].message"
            ) from None

    def prompt_logprobs(self, text: str) -> list[float] | None:
        """Log-probabilities of the tokens of ``text`` (the first has none), or None."""
        ep = self.endpoint
        payload = {
            "model": ep.model,
            "prompt": text,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 0,
            "temperature": 0,
        }
        try:
            data = ep.post("completions", payload)
        except RemoteError as exc:
            if exc.status not in (400, 422):
                raise
            # Some servers refuse max_tokens 0: take one token and drop it below.
            data = ep.post("completions", payload | {"max_tokens": 1})
        try:
            logprobs = data["choices"][0]["logprobs"]
            values = logprobs["token_logprobs"]
            offsets = logprobs.get("text_offset")
        except (KeyError, IndexError, TypeError):
            return None
        if not isinstance(values, list) or not values:
            return None
        if isinstance(offsets, list) and len(offsets) == len(values):
            values = [v for v, o in zip(values, offsets, strict=True) if o < len(text)]
        return [float(v) for v in values if v is not None]


def score_endpoint(
    endpoint: Endpoint,
    samples: Sequence[BleuSample],
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    bleu: bool = True,
    perplexity: bool = True,
) -> tuple[Comparison, list[str]]:
    """BLEU of the endpoint's continuations of ``samples`` and perplexity over ``texts``.

    Never raises for an endpoint failure: the comparison's note says what went wrong,
    so one unreachable endpoint does not fail the whole evaluation.
    """
    client = _Client(endpoint)
    comparison = Comparison(name=endpoint.name)
    continuations: list[str] = []
    notes = []
    with ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
        if bleu and samples:
            try:
                raw = list(
                    pool.map(lambda s: client.continuation(s.prompt, max_new_tokens), samples)
                )
                continuations = [r.split("\n", 1)[0].strip() for r in raw]
                comparison.bleu, _ = corpus_bleu(continuations, [s.reference for s in samples])
            except RemoteError as exc:
                notes.append(f"BLEU not computed: {exc}")
        if perplexity and texts:
            try:
                scored = list(pool.map(client.prompt_logprobs, texts))
                if any(s is None for s in scored):
                    notes.append(NO_LOGPROBS_NOTE)
                else:
                    values = [v for s in scored for v in (s or [])]
                    if values:
                        comparison.perplexity = math.exp(-math.fsum(values) / len(values))
                    else:
                        notes.append(NO_LOGPROBS_NOTE)
            except RemoteError as exc:
                notes.append(f"{NO_LOGPROBS_NOTE} ({exc})")
    comparison.note = "; ".join(notes) or None
    return comparison, continuations


def example_messages(example: ExampleRow) -> list[dict[str, str]]:
    """The chat messages an endpoint answers: chat turns before the answer, or the prompt."""
    if example.messages is not None:
        return [dict(m) for m in example.messages]
    return [{"role": "user", "content": example.prompt}]


def score_endpoint_answers(
    endpoint: Endpoint,
    examples: Sequence[ExampleRow],
    *,
    max_new_tokens: int,
    perplexity: bool = True,
) -> tuple[Comparison, list[str]]:
    """BLEU, chrF and exact match of the endpoint's chat answers to held-out ``examples``.

    ``perplexity``: whether the job asked for it; the note then says why an endpoint
    has none. Never raises for an endpoint failure: the note says what went wrong.
    """
    client = _Client(endpoint)
    comparison = Comparison(name=endpoint.name)
    answers: list[str] = []
    notes = []
    if examples:
        try:
            with ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
                raw = list(
                    pool.map(lambda e: client.answer(example_messages(e), max_new_tokens), examples)
                )
            answers = [r.strip() for r in raw]
            references = [e.answer for e in examples]
            comparison.bleu, _ = corpus_bleu(answers, references)
            comparison.chrf, _ = corpus_chrf(answers, references)
            comparison.exact_match = exact_match(answers, references)
        except RemoteError as exc:
            answers = []
            notes.append(f"answers not scored: {exc}")
    if perplexity:
        notes.append(NO_ANSWER_PERPLEXITY_NOTE)
    comparison.note = "; ".join(notes) or None
    return comparison, answers
