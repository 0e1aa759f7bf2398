"""Records -> instruction examples (kubetune_trainer.examples): rendering, masks, bad records."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.contract import StageError
from kubetune.dataset_format import answer_start
from kubetune.schema import DatasetSpec, Reason
from kubetune_trainer.examples import (
    CAUSES,
    DEFAULT_CHAT_TEMPLATE,
    BadRecord,
    ExampleBuilder,
    tokenize_examples,
)
from kubetune_trainer.tokenizer_build import train_bpe_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def spec(**fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": "file:///data.jsonl", **fields})


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns], "command": "tar"}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    lines = [
        "tar (linux): Create an archive from files",
        "tar cf target.tar file1 file2",
        "<|user|> <|assistant|> <|system|> You answer with one shell command line.",
    ] * 20
    return train_bpe_tokenizer(lines, 300, model_max_length=128)


def test_prompt_completion_is_a_prompt_segment_then_an_answer_segment() -> None:
    builder = ExampleBuilder(spec(kind="promptCompletion", promptSeparator=" =>"))
    example = builder.build({"prompt": "  list files ", "completion": "ls -la"}, "r:0")
    assert example.segments == (("list files =>", False), ("ls -la", True))
    assert (example.prompt, example.answer, example.group) == ("list files", "ls -la", "r:0")
    assert example.answer_end == ""


def test_field_names_are_configurable_and_numbers_are_text() -> None:
    builder = ExampleBuilder(
        spec(kind="promptCompletion", promptField="q", completionField="a", clean={"minChars": 1})
    )
    example = builder.build({"q": "2 + 2 is", "a": 4}, "r:0")
    assert example.answer == "4"


def test_chat_with_the_default_template_masks_everything_but_the_answer() -> None:
    builder = ExampleBuilder(spec(kind="chat"))
    example = builder.build(
        chat(("system", "Be brief."), ("user", "Create an archive"), ("assistant", "tar cf a b")),
        "r:0",
    )
    assert example.text == (
        "<|system|>\nBe brief.\n<|user|>\nCreate an archive\n<|assistant|>\ntar cf a b\n"
    )
    answers = [text for text, is_answer in example.segments if is_answer]
    assert answers == ["tar cf a b\n"]
    assert example.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Create an archive"},
    )
    assert example.prompt == "Create an archive"
    assert builder.template_source == DEFAULT_CHAT_TEMPLATE


def test_every_assistant_turn_is_an_answer_and_end_of_turn_markers_are_trained() -> None:
    builder = ExampleBuilder(spec(kind="chat", chatTemplate=CHATML))
    example = builder.build(
        chat(
            ("user", "hi there"),
            ("assistant", "hello"),
            ("user", "list files"),
            ("assistant", "ls"),
        ),
        "r:0",
    )
    assert [(t, a) for t, a in example.segments] == [
        ("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("hello<|im_end|>\n", True),
        ("<|im_start|>user\nlist files<|im_end|>\n<|im_start|>assistant\n", False),
        ("ls<|im_end|>\n", True),
    ]
    assert example.answer == "ls"
    assert example.answer_end == "<|im_end|>\n"


def test_the_tokenizers_own_template_is_used_unless_the_spec_sets_one() -> None:
    own = ExampleBuilder(spec(kind="chat"), template=CHATML)
    assert own.template_source == CHATML
    override = ExampleBuilder(
        spec(kind="chat", chatTemplate=DEFAULT_CHAT_TEMPLATE), template=CHATML
    )
    assert override.template_source == DEFAULT_CHAT_TEMPLATE


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_setting() -> None:
    # Renders the last message differently from the same message followed by others.
    bad = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    builder = ExampleBuilder(spec(kind="chat", chatTemplate=bad))
    with pytest.raises(StageError) as err:
        builder.build(chat(("user", "hi there"), ("assistant", "hello there")), "r:0")
    assert err.value.reason == Reason.INVALID_SPEC.value
    assert "dataset.chatTemplate" in str(err.value)


def test_a_template_that_does_not_compile_is_an_invalid_spec() -> None:
    builder = ExampleBuilder(spec(kind="chat", chatTemplate="{% for m in messages %}"))
    with pytest.raises(StageError, match="not a valid Jinja template"):
        builder.build(chat(("user", "hi there"), ("assistant", "hello there")), "r:0")


@pytest.mark.parametrize(
    ("kind", "record", "cause"),
    [
        ("promptCompletion", {"completion": "ls -la"}, "missingField"),
        ("promptCompletion", {"prompt": ["a"], "completion": "ls -la"}, "notText"),
        ("promptCompletion", {"prompt": "list all files", "completion": "   "}, "emptyAnswer"),
        ("promptCompletion", {"prompt": " ", "completion": "ls -la --all"}, "emptyPrompt"),
        ("promptCompletion", {"prompt": "ls", "completion": "ls"}, "tooShort"),
        ("chat", {"text": "hello"}, "missingField"),
        ("chat", {"messages": "not json"}, "notText"),
        ("chat", {"messages": [{"role": "user", "content": 3}]}, "notText"),
        ("chat", chat(("assistant", "ls -la"), ("user", "list files")), "wrongRoleOrder"),
        ("chat", chat(("user", "list files"), ("user", "list all files")), "wrongRoleOrder"),
        ("chat", chat(("user", "list files"), ("tool", "ls -la")), "wrongRoleOrder"),
        (
            "chat",
            chat(("user", "list files"), ("assistant", "ls"), ("system", "x")),
            "wrongRoleOrder",
        ),
        ("chat", chat(("user", "list all the files")), "wrongRoleOrder"),
        ("chat", chat(("user", "list all the files"), ("assistant", "")), "emptyAnswer"),
        ("chat", chat(("user", ""), ("assistant", "ls -la --all")), "emptyPrompt"),
    ],
)
def test_bad_records_name_their_cause(kind: str, record: dict[str, Any], cause: str) -> None:
    builder = ExampleBuilder(spec(kind=kind, clean={"minChars": 8}))
    with pytest.raises(BadRecord) as err:
        builder.build(record, "r:0")
    assert err.value.cause == cause
    assert cause in CAUSES


def test_a_missing_group_field_is_a_bad_record() -> None:
    builder = ExampleBuilder(spec(kind="promptCompletion", split={"groupBy": "command"}))
    with pytest.raises(BadRecord) as err:
        builder.build({"prompt": "list all files", "completion": "ls -la"}, "r:0")
    assert err.value.cause == "missingGroup"
    ok = builder.build({"prompt": "list all files", "completion": "ls -la", "command": "ls"}, "r:1")
    assert ok.group == "ls"


def test_max_chars_counts_prompt_and_answer() -> None:
    builder = ExampleBuilder(spec(kind="promptCompletion", clean={"minChars": 1, "maxChars": 10}))
    with pytest.raises(BadRecord) as err:
        builder.build({"prompt": "list files", "completion": "ls -la"}, "r:0")
    assert err.value.cause == "tooLong"


def test_markup_is_stripped_from_prompts_but_answers_stay_verbatim() -> None:
    builder = ExampleBuilder(spec(kind="promptCompletion", clean={"stripMarkup": True}))
    example = builder.build(
        {"prompt": "Show **all** files", "completion": "ls  *_{{dir}}_*\u200b"}, "r:0"
    )
    assert example.prompt == "Show all files"
    # Whitespace and control characters are cleaned in answers too, markup is not.
    assert example.answer == "ls *_{{dir}}_*"


def test_csv_messages_are_a_json_string() -> None:
    builder = ExampleBuilder(spec(kind="chat"))
    record = {
        "messages": '[{"role": "user", "content": "list files"}, '
        '{"role": "assistant", "content": "ls -la"}]'
    }
    assert builder.build(record, "r:0").answer == "ls -la"


def test_tokenized_mask_is_one_exactly_on_answer_tokens(tokenizer: Any) -> None:
    builder = ExampleBuilder(spec(kind="chat"))
    examples = [
        builder.build(chat(("user", "tar (linux): Create an archive"), ("assistant", a)), f"r:{i}")
        for i, a in enumerate(["tar cf target.tar file1", "tar xf target.tar"])
    ]
    for example, (ids, mask) in zip(examples, tokenize_examples(tokenizer, examples), strict=True):
        assert len(ids) == len(mask)
        start = answer_start(mask)
        assert set(mask[:start]) == {0} and set(mask[start:]) == {1}
        assert tokenizer.decode(ids[start:]) == example.answer + "\n"
        assert tokenizer.decode(ids[:start]) == example.text[: -len(example.answer) - 1]
