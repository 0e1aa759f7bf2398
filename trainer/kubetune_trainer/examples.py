"""Instruction examples: records -> cleaned, rendered, tokenized prompt/answer examples.

``dataset.kind: promptCompletion`` and ``chat`` read records (jsonl, csv, parquet), not
lines. Each good record becomes one :class:`Example`: the text the model sees, cut into
*segments* that are either context (prompt, system and user turns, template markup) or
answer. Prepare tokenizes each segment on its own and concatenates the ids, with a loss
mask of 1 on answer tokens (:mod:`kubetune.dataset_format`); training then counts the
loss on answers only, and evaluation generates an answer from everything before the last
answer segment. Usage::

    builder = ExampleBuilder(job.spec.dataset, template=tokenizer_chat_template)
    try:
        example = builder.build(record, record_id="data.jsonl:17")
    except BadRecord as bad:
        counts[bad.cause] += 1
    ids, mask = tokenize_examples(tokenizer, [example])[0]

**promptCompletion**: the segments are ``prompt + promptSeparator`` (context) and
``completion`` (answer).

**chat**: ``messages`` is a list of ``{"role", "content"}`` (a JSON string in csv):
optional ``system`` messages first, then ``user`` and ``assistant`` turns alternating,
starting with ``user`` and ending with ``assistant``. The conversation is rendered with a
Jinja chat template, the same language as a tokenizer's ``chat_template``: the spec's
``chatTemplate``, else the tokenizer's own, else :data:`DEFAULT_CHAT_TEMPLATE`::

    <|system|>
    You answer with one shell command line.
    <|user|>
    tar (linux): Create an archive from files
    <|assistant|>
    tar cf {{target.tar}} {{file1 file2}}

Answer segments are what rendering assistant turn ``i`` adds after rendering the turns
before it with the generation prompt (``add_generation_prompt``): the answer's text and
whatever the template puts after it (an end-of-turn marker), so the model learns to end
its turn. A template for which the conversation so far is not a prefix of its continuation
cannot be cut this way and is refused with a message naming ``dataset.chatTemplate``.

Cleaning: control characters, Unicode and whitespace rules apply to every text, line by
line; ``stripMarkup`` only to prompts and system/user turns (answers are often commands or
code, where ``*``, ``_`` and braces mean something); ``lowercase`` to everything;
``minChars``/``maxChars`` to the text of the prompt and answer (chat: of every message)
together. A record that cannot
become an example raises :class:`BadRecord` with one of :data:`CAUSES`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.contract import StageError
from kubetune.schema import DatasetKind, DatasetSpec, Reason
from kubetune_trainer.cleaning import Cleaner
from kubetune_trainer.tokenizer_build import encode_batch

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""kubetune's chat template: each message as ``<|role|>`` and its content on their own lines."""

ROLES = ("system", "user", "assistant")

CAUSES = (
    "missingField",  # the prompt, completion, messages or groupBy field is absent or null
    "notText",  # a field that should be text (or a message list) is something else
    "wrongRoleOrder",  # chat: unknown role, system after the start, turns not alternating...
    "emptyPrompt",  # the prompt or a user turn is empty after cleaning
    "emptyAnswer",  # the completion or an assistant turn is empty after cleaning
    "tooShort",  # prompt + answer shorter than clean.minChars
    "tooLong",  # prompt + answer longer than clean.maxChars
    "overLong",  # more tokens than training.maxSeqLength can hold (prepare checks this)
    "missingGroup",  # split.groupBy names a field the record does not have
)


class BadRecord(Exception):
    """A record that cannot be an example; ``cause`` is one of :data:`CAUSES`."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class Example:
    """One example: its segments (text, is_answer), in order, and what evaluation needs."""

    segments: tuple[tuple[str, bool], ...]
    prompt: str  # the last prompt / user turn, cleaned
    answer: str  # the last answer, cleaned: the reference at evaluation
    group: str  # what the split keeps together: the groupBy value, else the record id
    messages: tuple[dict[str, str], ...] | None = None  # chat: the turns before the answer

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    @property
    def answer_end(self) -> str:
        """What the template put after the last answer's text (an end-of-turn marker)."""
        last = self.segments[-1][0]
        return last[len(self.answer) :] if last.startswith(self.answer) else ""


class ExampleBuilder:
    """Builds :class:`Example` objects from records for one ``spec.dataset``."""

    def __init__(self, spec: DatasetSpec, *, template: str | None = None, **template_vars: str):
        if spec.kind == DatasetKind.TEXT:
            raise ValueError("ExampleBuilder is for dataset.kind promptCompletion and chat")
        self.spec = spec
        self.prompt_cleaner = Cleaner(spec.clean)
        self.answer_cleaner = Cleaner(spec.clean.model_copy(update={"strip_markup": False}))
        self.template_source = spec.chat_template or template or DEFAULT_CHAT_TEMPLATE
        self.template_origin = (
            "dataset.chatTemplate"
            if spec.chat_template
            else "the tokenizer's chat template"
            if template
            else "kubetune's default chat template"
        )
        self._template: Any = None
        self._template_vars = template_vars

    # ----------------------------------------------------------------- records

    def build(self, record: Mapping[str, Any], record_id: str) -> Example:
        """The example of one record; :class:`BadRecord` when it cannot be one."""
        group = self._group(record, record_id)
        if self.spec.kind == DatasetKind.PROMPT_COMPLETION:
            example = self._prompt_completion(record, group)
            self._check_length(len(example.prompt) + len(example.answer))
        else:
            example = self._chat(record, group)
            self._check_length(
                sum(len(m["content"]) for m in example.messages or ()) + len(example.answer)
            )
        return example

    def _group(self, record: Mapping[str, Any], record_id: str) -> str:
        field = self.spec.split.group_by
        if field is None:
            return record_id
        value = record.get(field)
        if value is None or value == "":
            raise BadRecord("missingGroup", f"no value in split.groupBy field {field!r}")
        return value if isinstance(value, str) else json.dumps(value, sort_keys=True)

    def _text_field(self, record: Mapping[str, Any], field: str, setting: str) -> str:
        if field not in record or record[field] is None:
            raise BadRecord("missingField", f"no field {field!r} (dataset.{setting})")
        value = record[field]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise BadRecord("notText", f"field {field!r} holds {type(value).__name__}, not text")
        return value

    def _clean(self, text: str, *, answer: bool) -> str:
        cleaner = self.answer_cleaner if answer else self.prompt_cleaner
        lines = [cleaner.clean_text(line) for line in text.splitlines()]
        return "\n".join(lines).strip()

    def _prompt_completion(self, record: Mapping[str, Any], group: str) -> Example:
        spec = self.spec
        prompt = self._clean(
            self._text_field(record, spec.prompt_field, "promptField"), answer=False
        )
        answer = self._clean(
            self._text_field(record, spec.completion_field, "completionField"), answer=True
        )
        if not prompt:
            raise BadRecord("emptyPrompt", f"field {spec.prompt_field!r} is empty")
        if not answer:
            raise BadRecord("emptyAnswer", f"field {spec.completion_field!r} is empty")
        segments = ((prompt + spec.prompt_separator, False), (answer, True))
        return Example(segments, prompt, answer, group)

    def _messages(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
        field = self.spec.messages_field
        if field not in record or record[field] is None:
            raise BadRecord("missingField", f"no field {field!r} (dataset.messagesField)")
        value = record[field]
        if isinstance(value, str):  # csv, or a JSON column
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise BadRecord(
                    "notText", f"field {field!r} is not a JSON list of messages"
                ) from None
        if not isinstance(value, list) or not value:
            raise BadRecord("notText", f"field {field!r} is not a non-empty list of messages")
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, Mapping):
                raise BadRecord("notText", f"message {i} is not an object with role and content")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise BadRecord(
                    "wrongRoleOrder", f"message {i} has role {role!r}; expected one of {ROLES}"
                )
            if not isinstance(content, str):
                raise BadRecord("notText", f"message {i} ({role}) has no text content")
            messages.append({"role": str(role), "content": content})
        return messages

    @staticmethod
    def _check_order(messages: Sequence[Mapping[str, str]]) -> None:
        roles = [m["role"] for m in messages]
        first = 0
        while first < len(roles) and roles[first] == "system":
            first += 1
        turns = roles[first:]
        expected = ["user", "assistant"] * (len(turns) // 2)
        if not turns or turns != expected:
            raise BadRecord(
                "wrongRoleOrder",
                f"roles {roles}: expected system messages first, then user and assistant turns "
                "alternating, starting with user and ending with assistant",
            )

    def _chat(self, record: Mapping[str, Any], group: str) -> Example:
        messages = self._messages(record)
        self._check_order(messages)
        for message in messages:
            answer = message["role"] == "assistant"
            message["content"] = self._clean(message["content"], answer=answer)
            if not message["content"]:
                if answer:
                    raise BadRecord("emptyAnswer", "an assistant turn is empty")
                if message["role"] == "user":
                    raise BadRecord("emptyPrompt", "a user turn is empty")
        segments: list[tuple[str, bool]] = []
        rendered = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], generation_prompt=True)
            full = self.render(messages[: i + 1], generation_prompt=False)
            if not (prefix.startswith(rendered) and full.startswith(prefix)):
                raise StageError(
                    f"{self.template_origin} does not render a conversation as the start of "
                    "its continuation (messages before an answer, with the generation prompt, "
                    "must be a prefix of the conversation with that answer), so answers cannot "
                    "be told from prompts; set dataset.chatTemplate to a template that does",
                    Reason.INVALID_SPEC,
                )
            if len(prefix) > len(rendered):
                segments.append((prefix[len(rendered) :], False))
            segments.append((full[len(prefix) :], True))
            rendered = full
        last = len(messages) - 1
        prompt = messages[last - 1]["content"]
        return Example(
            tuple(segments),
            prompt,
            messages[last]["content"],
            group,
            tuple(dict(m) for m in messages[:last]),
        )

    def _check_length(self, n: int) -> None:
        clean = self.spec.clean
        if n < clean.min_chars:
            raise BadRecord(
                "tooShort", f"{n} characters < dataset.clean.minChars {clean.min_chars}"
            )
        if clean.max_chars is not None and n > clean.max_chars:
            raise BadRecord("tooLong", f"{n} characters > dataset.clean.maxChars {clean.max_chars}")

    # ----------------------------------------------------------------- template

    def render(self, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
        """``messages`` through the chat template, as ``apply_chat_template(tokenize=False)``."""
        if self._template is None:
            self._template = self._compile()
        try:
            return str(
                self._template.render(
                    messages=list(messages),
                    add_generation_prompt=generation_prompt,
                    **self._template_vars,
                )
            )
        except Exception as exc:  # a template's own raise_exception, or a Jinja error
            raise StageError(
                f"{self.template_origin} failed to render a conversation: {exc}; fix "
                "dataset.chatTemplate",
                Reason.INVALID_SPEC,
            ) from None

    def _compile(self) -> Any:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template_source)
        except TemplateError as exc:
            raise StageError(
                f"{self.template_origin} is not a valid Jinja template: {exc}",
                Reason.INVALID_SPEC,
            ) from None


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example]
) -> list[tuple[list[int], list[int]]]:
    """``(ids, loss mask)`` of each example: its segments tokenized one by one, concatenated.

    Tokenizing segments apart keeps the answer's first token from merging with the
    prompt's last, so the prompt ids are exactly what generation starts from.
    """
    texts = [text for example in examples for text, _ in example.segments]
    encoded = encode_batch(tokenizer, texts) if texts else []
    out = []
    at = 0
    for example in examples:
        ids: list[int] = []
        mask: list[int] = []
        for _, is_answer in example.segments:
            seg = encoded[at]
            at += 1
            ids.extend(seg)
            mask.extend([int(is_answer)] * len(seg))
        out.append((ids, mask))
    return out
