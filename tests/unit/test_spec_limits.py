"""Specs that would exhaust the job are refused quickly and briefly: alias bombs, deep nesting, oversized
input; what is echoed back is cut short and redacted."""

from __future__ import annotations

import pytest
from helpers import Ran, ftjob

from job.errors import UserError
from job.spec import MAX_SPEC_BYTES, MAX_SPEC_VALUES, validate_spec

ALIAS_BOMB = "\n".join(
    ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(8)]
    + ["name: *i"]
)  # about 500 bytes, a billion strings once expanded


def validate_file(path, isolated) -> Ran:
    """`ftjob validate` on path; a validation that hangs fails the test instead of the suite."""
    return ftjob("validate", str(path), cwd=isolated, timeout=60)


def assert_user_error(result: Ran, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr


def test_a_yaml_alias_bomb_is_refused_quickly_and_briefly(isolated):
    path = isolated / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    result = validate_file(path, isolated)
    assert_user_error(result, f"more than {MAX_SPEC_VALUES} values once YAML aliases")
    assert len(result.stderr) < 300


@pytest.mark.parametrize("suffix,text", [("yaml", "[" * 50_000 + "]" * 50_000), ("json", "[" * 50_000)])
def test_deeply_nested_input_is_refused(isolated, suffix, text):
    path = isolated / f"deep.{suffix}"
    path.write_text(f'{{"name": {text}}}' if suffix == "json" else f"name: {text}")
    assert_user_error(validate_file(path, isolated), "nested too deeply")


def test_nesting_past_the_depth_limit_is_refused_before_validation():
    nested: dict = {"x": 1}
    for _ in range(100):
        nested = {"x": nested}
    with pytest.raises(UserError, match="nested more than 64 levels deep"):
        validate_spec({"name": "t", "tracking": {"tags": nested}})


@pytest.mark.parametrize("text", ["[" * 50_000, "[" * 50_000 + "]" * 50_000])
def test_deeply_nested_overrides_are_refused(isolated, text):
    path = isolated / "s.yaml"
    path.write_text("name: t\n")
    from_set = ftjob("validate", str(path), "--set", f"tracking.tags={text}", cwd=isolated)
    assert_user_error(from_set, "--set tracking.tags: nested too deeply")
    from_env = ftjob("validate", str(path), cwd=isolated, env={"FTJOB__TRACKING__TAGS": text})
    assert_user_error(from_env, "FTJOB__TRACKING__TAGS: nested too deeply")


def test_an_oversized_spec_is_refused(isolated):
    path = isolated / "big.yaml"
    path.write_text("name: t\n" + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))
    assert_user_error(validate_file(path, isolated), "larger than 1024 KiB")


def test_echoed_input_is_cut_short_and_redacted():
    with pytest.raises(UserError) as long_value:
        validate_spec({"name": "t", "train": {"learning_rate": "x" * 5000}})
    assert "x" * 70 in str(long_value.value) and "x" * 81 not in str(long_value.value)
    with pytest.raises(UserError) as key:
        validate_spec({"name": "t", "train": {"learning_rate": "AKIAABCDEFGHIJKLMNOP"}})
    assert "AKIA" not in str(key.value) and "train.learning_rate" in str(key.value)
