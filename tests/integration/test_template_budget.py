"""The chat template's budget, checked in a child process of its own: a template that blows up is a spec error."""

from __future__ import annotations

import pytest

from job.errors import UserError

LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "template,problem",
    [("{{ 'a' * 10**10 }}", "needed more than 4 GiB"), (LOOPS, "took more than 3 s")],
)
def test_a_template_that_blows_up_on_any_conversation_is_a_spec_error(
    tokenizer, monkeypatch, template, problem
):
    from job.data import template_budget
    from job.data.formats import Formatter

    monkeypatch.setattr(template_budget, "CHECK_SECONDS", 3.0)
    with pytest.raises(UserError, match=f"data.chat_template.*{problem}"):
        Formatter("chat", {}, "completion", tokenizer, template)


def test_a_named_template_of_the_tokenizer_is_checked_too(tokenizer, monkeypatch):
    from job.data.formats import Formatter

    monkeypatch.setattr(tokenizer, "chat_template", {"default": "{{ 'a' * 10**10 }}", "tool_use": "x"})
    with pytest.raises(UserError, match="needed more than 4 GiB"):
        Formatter("chat", {}, "completion", tokenizer, None)
