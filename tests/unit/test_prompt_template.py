"""data.prompt_template: fields placed in the user's text, optional parts only with their fields."""

from __future__ import annotations

import pytest

from job.prompt_template import PromptTemplate, TemplateError, unknown_fields

SEED = "Instruction: {instruction}\n[[Input: {input}\n]]Response: "


def test_the_seed_recipes_template_with_and_without_its_optional_input():
    template = PromptTemplate.parse(SEED)
    assert template.fields == ["instruction", "input"] and template.required == {"instruction"}
    assert (
        template.render({"instruction": "Add one", "input": "41"})
        == "Instruction: Add one\nInput: 41\nResponse: "
    )
    assert template.render({"instruction": "Say hi", "input": ""}) == "Instruction: Say hi\nResponse: "
    assert template.render({"instruction": "Say hi"}) == "Instruction: Say hi\nResponse: "


def test_braces_are_escaped_and_values_are_placed_as_text():
    template = PromptTemplate.parse("{{json}} {question} [[ctx={context}]]")
    assert (
        template.render({"question": "{instruction}", "context": "{{x}}"}) == "{json} {instruction} ctx={{x}}"
    )


@pytest.mark.parametrize(
    "text,problem",
    [
        ("Q: {question", "expected '}'"),
        ("Q: question}", "Single '}'"),
        ("{instruction.__class__}", "is not a field"),
        ("{instruction[0]}", "is not a field"),
        ("{instruction!r}", "is not a field"),
        ("{instruction:>10}", "is not a field"),
        ("{}", "is not a field"),
        ("[[a [[b]] c]]", "must pair up"),
        ("a ]] b", "must pair up"),
        ("[[no field here]]", "never left out"),
    ],
)
def test_templates_that_cannot_be_read_say_why(text, problem):
    with pytest.raises(TemplateError, match=problem.replace("[", r"\[")):
        PromptTemplate.parse(text)


def test_unknown_fields_are_named_in_order():
    template = PromptTemplate.parse("{instruction} {context} [[{source}]] {context}")
    assert unknown_fields(template, ["instruction", "input", "output"]) == ["context", "source"]


def spec_with(data: dict) -> dict:
    return {"model": {"source": "m"}, "data": {"train": ["d.jsonl"], **data}, "train": {"max_steps": 1}}


def test_a_template_naming_fields_the_row_cannot_have_is_a_spec_error_naming_them():
    from job.errors import UserError
    from job.spec import validate_spec

    with pytest.raises(
        UserError, match=r"data.prompt_template: context, source not a field of format 'alpaca'"
    ):
        validate_spec(spec_with({"prompt_template": "{instruction} {context} {source}"}))
    with pytest.raises(UserError, match="for the alpaca and completion formats, not 'chat'"):
        validate_spec(spec_with({"format": "chat", "prompt_template": "{messages}"}))
    with pytest.raises(UserError, match="data.prompt_template: .*expected '}'"):
        validate_spec(spec_with({"prompt_template": "{instruction"}))
    spec = validate_spec(
        spec_with({"prompt_template": "{instruction} [[{context}]]", "fields": {"context": "ctx"}})
    )
    assert spec.data.prompt_template == "{instruction} [[{context}]]"


def test_rows_become_the_templates_prompt_and_generate_renders_it_the_same_way():
    from job.data.formats import BadRow, Formatter

    seed = Formatter("alpaca", {}, "completion", prompt_template=SEED)
    example = seed({"instruction": "Add one", "input": "41", "output": "42"})
    assert example.segments == (("Instruction: Add one\nInput: 41\nResponse: ", False), ("42", True))
    assert seed({"instruction": "Say hi", "output": "hi"}).segments[0][0] == "Instruction: Say hi\nResponse: "
    assert seed.render_prompt("Say hi") == "Instruction: Say hi\nResponse: "

    extra = Formatter("completion", {"context": "ctx"}, "all", prompt_template="[{context}] {prompt} =")
    assert extra({"prompt": "2+2", "ctx": "math", "completion": "4"}).segments == (
        ("[math] 2+2 =", True),
        ("4", True),
    )
    with pytest.raises(BadRow, match="missing field 'ctx'"):
        extra({"prompt": "2+2", "completion": "4"})
