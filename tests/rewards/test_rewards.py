"""The reward functions GRPO trains on: each built-in against hand-written completions, user functions loaded from a
file or a module beside the recipe, every refusal (each naming the function, and the row when it happens at a call),
and the start check that tries them on the first rows as TRL would. No model, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune.errors import UserError
from finetune.rewards import REWARDS, Reward, RewardSpec, build_rewards, probe, score_answer
from finetune.rewards.schema import first_error, schema_problems


def rewards(*entries: dict, recipe_dir: Path = Path(".")) -> list[Reward]:
    return build_rewards([RewardSpec.model_validate(entry) for entry in entries], recipe_dir)


def reward(entry: dict, recipe_dir: Path = Path(".")) -> Reward:
    return rewards(entry, recipe_dir=recipe_dir)[0]


def call(fn: Reward, completions: list[str], ids: bool = True, **columns) -> list:
    """Call a reward as TRL's GRPOTrainer does: everything by keyword, one column value per completion."""
    n = len(completions)
    columns.setdefault("source_row", [f"data/train.jsonl:{i + 1}" for i in range(n)])
    extra = {"completion_ids": [list(range(len(c))) for c in completions]} if ids else {}
    return fn(prompts=["Q?"] * n, completions=completions, trainer_state=None, log_extra=lambda *a: None,
              log_metric=lambda *a: None, **extra, **columns)


def refusal(entry: dict) -> str:
    with pytest.raises(ValidationError) as err:
        RewardSpec.model_validate(entry)
    return str(err.value)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def load_refusal(tmp_path: Path, source: str | None, fn: str = "mine.py:score", **options) -> str:
    if source is not None:
        write(tmp_path / "mine.py", source)
    with pytest.raises(UserError) as err:
        reward({"fn": fn, **options}, tmp_path)
    return str(err.value)


# exact_answer ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("completion", "expected", "extract", "pattern", "strict", "lenient"), [
    ("The answer is 42.", "42", "whole", None, False, True),  # right answer, format ignored
    ("  42\n", "42", "whole", None, True, True),
    ("so x = 42.0", "42", "last_number", None, False, True),  # numbers compare as numbers only when lenient
    ("total: 1,000 apples", 1000, "last_number", None, False, True),  # an int expected; thousands commas
    ("total: 1,000 apples", "1,000", "last_number", None, True, True),
    ("it drops to -3.5 degrees", "-3.5", "last_number", None, True, True),
    ("read pages 3-4", "4", "last_number", None, True, True),  # a hyphen, not a minus
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed", None, True, True),  # nested braces kept
    ("\\boxed{1} then \\boxed{ 2 }", "2", "boxed", None, True, True),  # the last one, trimmed
    ("\\boxed{3} and \\boxed{4", "3", "boxed", None, True, True),  # the unclosed last one is skipped
    ("<answer>7</answer> no, <answer> 8 </answer>", "8", "answer_tags", None, True, True),
    ("<answer>Paris.</answer>", "paris", "answer_tags", None, False, True),  # case and period: lenient only
    ("I think it's 12", "12", "answer_tags", None, False, True),  # no tags: lenient falls back to the last number
    ("I think it's 13", "12", "answer_tags", None, False, False),
    ("ANSWER: cat ... ANSWER: dog", "dog", "regex", r"ANSWER: (\w+)", True, True),
    ("$1,234.50", "1234.5", "whole", None, False, True),
    ("", "0", "last_number", None, False, False),
    ("None", None, "whole", None, False, False),  # no expected answer matches nothing
])
def test_score_answer_strict_and_lenient(completion, expected, extract, pattern, strict, lenient):
    assert score_answer(completion, expected, extract, pattern) == (strict, lenient)


def test_strict_implies_lenient():
    cases = ["42", " 42 ", "42.", "x 42", "\\boxed{42}", "<answer>42</answer>", "Answer: 42", "", "1,000", "-0"]
    for completion in cases:
        for expected in ["42", "42.0", "1000", "-0", "0", "answer"]:
            for extract in ["last_number", "boxed", "answer_tags", "whole"]:
                strict, lenient = score_answer(completion, expected, extract)
                assert lenient or not strict, (completion, expected, extract)


def test_exact_answer_reward_reads_the_column_and_mode():
    completions = ["so 42", "so 42.0", "so 7", "so 5"]
    answers = [42, "42", "8", None]  # an int compared as text; None: the row has no answer, not scored
    assert call(reward({"fn": "exact_answer"}), completions, answer=answers) == [1.0, 0.0, 0.0, None]
    lenient = reward({"fn": "exact_answer", "mode": "lenient", "column": "solution"})
    assert call(lenient, completions, solution=answers) == [1.0, 1.0, 0.0, None]
    assert lenient.name == lenient.__name__ == "exact_answer" and lenient.columns == {"solution": "column"}


def test_exact_answer_regex_options_are_checked():
    assert "exactly one" in refusal({"fn": "exact_answer", "extract": "regex", "pattern": r"ANSWER: \w+"})
    assert "needs `pattern`" in refusal({"fn": "exact_answer", "extract": "regex"})
    assert "does not compile" in refusal({"fn": "exact_answer", "extract": "regex", "pattern": "(unclosed"})
    assert "regex only" in refusal({"fn": "exact_answer", "pattern": "(x)"})
    regex = reward({"fn": "exact_answer", "extract": "regex", "pattern": r"#### (\S+)"})
    assert call(regex, ["#### 5", "5"], answer=["5", "5"]) == [1.0, 0.0]


# format, json, length -------------------------------------------------------------------------------------------------


def test_format_matches_the_whole_completion():
    fmt = reward({"fn": "format", "pattern": r"<think>.*?</think>\s*<answer>.*?</answer>"})
    completions = ["<think>line one\nline two</think>\n<answer>4</answer>", "<answer>4</answer>",
                   "<think>x</think><answer>4</answer> trailing words"]
    assert call(fmt, completions) == [1.0, 0.0, 0.0]
    assert "option `pattern`: does not compile" in refusal({"fn": "format", "pattern": "[a-"})
    assert "option `pattern` is required" in refusal({"fn": "format"})


def test_json_parses_with_an_optional_fence():
    plain = reward({"fn": "json"})
    completions = ['{"a": 1}', '```json\n{"a": 1}\n```', "```\n[1, 2]\n```", "not json", "NaN", '{"a": 1} extra']
    assert call(plain, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_json_validates_against_a_recipe_schema():
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}
    checked = reward({"fn": "json", "schema": schema})
    completions = ['{"name": "Ann", "age": 3}', '{"name": "Ann", "age": 3.0, "tags": ["a"]}',
                   '{"name": "Ann", "age": 3.5}', '{"name": "Ann", "age": true}', '{"name": "", "age": 3}',
                   '{"name": "Ann"}', '{"name": "Ann", "age": 3, "x": 1}', '{"name": "Ann", "age": 3, "tags": ["c"]}']
    assert call(checked, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_json_schema_from_a_row_column():
    """A tool call: each row carries the schema of the call it expects, as a mapping or as JSON text."""
    tool = {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "unit": {"anyOf": [{"enum": ["C", "F"]}, {"type": "null"}]}}}}}
    by_row = reward({"fn": "json", "schema_column": "tool_schema"})
    good = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}'
    wrong_tool = '{"name": "get_time", "arguments": {"city": "Oslo"}}'
    bad_unit = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "K"}}'
    schemas = [tool, json.dumps(tool), tool, tool, None]
    assert call(by_row, [good, good, wrong_tool, bad_unit, good], tool_schema=schemas) == [1.0, 1.0, 0.0, 0.0, None]
    assert by_row.columns == {"tool_schema": "schema_column"}


def test_json_schema_column_with_a_bad_schema_names_the_row():
    by_row = reward({"fn": "json", "schema_column": "tool_schema"})
    with pytest.raises(UserError) as err:
        call(by_row, ["{}", "{}"], tool_schema=[{"type": "object"}, {"type": "object", "patternProperties": {}}])
    message = str(err.value)
    assert "reward `json`" in message and "data/train.jsonl:2" in message and "`patternProperties`" in message


def test_json_refuses_unsupported_schema_keywords_up_front():
    message = refusal({"fn": "json", "schema": {"type": "object", "properties": {"id": {"type": "string",
                                                                                        "pattern": "^x"}}}})
    assert "reward `json`" in message and "schema.properties.id: unsupported keyword `pattern`" in message
    assert "not both" in refusal({"fn": "json", "schema": {}, "schema_column": "s"})
    assert schema_problems({"type": "string", "description": "annotations constrain nothing"}) == []
    assert schema_problems({"type": "text"}) and schema_problems({"additionalProperties": {"type": "string"}})


def test_schema_subset_types():
    assert first_error(1, {"type": "number"}) is None and first_error(1.0, {"type": "integer"}) is None
    assert first_error(True, {"type": "number"}) and first_error(1.5, {"type": "integer"})
    assert first_error(None, {"type": ["string", "null"]}) is None and first_error(1, {"type": ["string", "null"]})
    assert first_error(True, {"enum": [1]}) and first_error(1, {"const": 1.0}) is None
    assert first_error([1], {"minItems": 2}) and first_error([1, 2], {"minItems": 2}) is None


def test_length_is_a_soft_penalty_past_the_target():
    length = reward({"fn": "length", "target": 10, "max_penalty": 2})
    completions = ["x" * n for n in (5, 10, 15, 20, 40)]  # call() gives one fake id per character
    assert call(length, completions) == [0.0, 0.0, -1.0, -2.0, -2.0]
    words = call(length, ["a " * 10, "a " * 15], ids=False)  # no completion_ids: whitespace-separated words
    assert words == [0.0, -1.0]
    assert "option `target` is required" in refusal({"fn": "length"})
    assert "option `max_penalty`" in refusal({"fn": "length", "target": 5, "max_penalty": 0})


def test_a_builtin_listed_twice_gets_distinct_names():
    names = [r.name for r in rewards({"fn": "exact_answer"}, {"fn": "exact_answer", "mode": "lenient"},
                                     {"fn": "length", "target": 3})]
    assert names == ["exact_answer", "exact_answer_2", "length"]
    assert REWARDS["format"](pattern="a+")(["p"], ["aaa"]) == [1.0]


def test_builtin_option_refusals_name_the_key():
    message = refusal({"fn": "exact_answer", "colum": "answer", "extract": "last"})
    assert "reward `exact_answer`" in message and "unknown option `colum`; did you mean `column`?" in message
    assert "option `extract`" in message  # every problem of the entry in one error
    assert "option `target`" in refusal({"fn": "length", "target": "many"})


def test_unknown_builtin_lists_the_builtins():
    message = refusal({"fn": "exact_answr"})
    assert "reward `exact_answr`" in message and "did you mean `exact_answer`?" in message
    assert all(name in message for name in REWARDS)
    assert "both parts" in refusal({"fn": "mine.py:"})
    assert "`completion_ids`" in refusal({"fn": "mine.py:score", "completion_ids": 1})


# user functions -------------------------------------------------------------------------------------------------------

SCORE = """
    calls = []

    def score(prompts, completions, bonus, answer, **kwargs):
        calls.append(kwargs | {"completions": completions, "answer": answer})
        return [bonus + (c.strip() == str(a)) for c, a in zip(completions, answer)]
    """


def test_user_function_from_a_file_beside_the_recipe(tmp_path):
    write(tmp_path / "rewards" / "mine.py", SCORE)
    mine = reward({"fn": "rewards/mine.py:score", "bonus": 0.5, "weight": 2}, tmp_path)
    assert call(mine, ["4", "5"], answer=[4, 4]) == [1.5, 0.5]
    assert (mine.name, mine.__name__, mine.weight) == ("mine.py:score", "mine.py:score", 2.0)
    assert mine.columns == {"answer": None}  # bonus is an option; answer can only be a column


def test_user_function_from_a_module(tmp_path, monkeypatch):
    write(tmp_path / "myrewards_pkg" / "__init__.py", "")
    write(tmp_path / "myrewards_pkg" / "checks.py", "def short(prompts, completions, **kwargs):\n"
                                                   "    return [len(c) < 3 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    short = reward({"fn": "myrewards_pkg.checks:short"})
    assert short.name == "myrewards_pkg.checks:short"
    assert call(short, ["ab", "abcd"]) == [1.0, 0.0]  # booleans come back as floats
    assert "no module named `no_such_pkg`" in load_refusal(tmp_path, None, "no_such_pkg.mod:f")


def test_missing_file(tmp_path):
    message = load_refusal(tmp_path, None, "sub/missing.py:score")
    assert "reward `sub/missing.py:score`" in message and str(tmp_path / "sub" / "missing.py") in message


def test_import_error(tmp_path):
    message = load_refusal(tmp_path, "x = 1\nraise RuntimeError('no GPU here')\n")
    assert "reward `mine.py:score`" in message and "RuntimeError: no GPU here" in message
    assert "mine.py line 2" in message


def test_syntax_error(tmp_path):
    message = load_refusal(tmp_path, "x = 1\ndef score(:\n")
    assert "reward `mine.py:score`" in message and "syntax error at line 2" in message


def test_missing_attribute_lists_the_functions(tmp_path):
    message = load_refusal(tmp_path, "import os\ndef scores(**kw): pass\ndef other(**kw): pass\n_x = 1\n")
    assert "reward `mine.py:score`" in message and "has no `score`" in message
    assert "scores, other" in message and "getcwd" not in message  # its own functions, not what it imports


def test_not_callable(tmp_path):
    message = load_refusal(tmp_path, "score = 3\n")
    assert "reward `mine.py:score`" in message and "`score` in" in message and "is a int, not a function" in message


def test_wrong_signature(tmp_path):
    message = load_refusal(tmp_path, "def score(prompts, completions):\n    return []\n")
    assert "reward `mine.py:score`" in message and "no **kwargs" in message
    assert "def fn(prompts, completions, **kwargs)" in message
    assert "positional-only" in load_refusal(tmp_path, "def score(prompts, completions, /, **kw): pass\n",
                                             "mine.py:score")
    assert "is async" in load_refusal(tmp_path, "async def score(prompts, completions, **kw): pass\n")


@pytest.mark.parametrize(("body", "says"), [
    ("return [1.0]", "returned 1 values for 2 completions"),
    ("return ['good', 1.0]", "returned 'good' (a str) for completion 0 (row data/train.jsonl:1)"),
    ("return [1.0, float('nan')]", "returned nan for completion 1 (row data/train.jsonl:2)"),
    ("return [1.0, float('inf')]", "returned inf for completion 1 (row data/train.jsonl:2)"),
    ("return 1.0", "returned a float"),
    ("return [1.0, 1 / 0]", "raised ZeroDivisionError: division by zero (at mine.py line 2)"),
])
def test_bad_output_names_the_function_and_row(tmp_path, body, says):
    write(tmp_path / "mine.py", f"def score(prompts, completions, **kwargs):\n    {body}\n")
    mine = reward({"fn": "mine.py:score"}, tmp_path / ".")
    with pytest.raises(UserError) as err:
        call(mine, ["a", "b"])
    message = str(err.value)
    assert "reward `mine.py:score`" in message and says in message and "data/train.jsonl:" in message


def test_none_and_bool_are_accepted(tmp_path):
    write(tmp_path / "mine.py", "def score(prompts, completions, **kwargs):\n    return (None, True, 0)\n")
    values = call(reward({"fn": "mine.py:score"}, tmp_path), ["a", "b", "c"])
    assert values == [None, 1.0, 0.0] and all(type(v) is float for v in values[1:])


# probe ----------------------------------------------------------------------------------------------------------------

ROWS = [{"prompt": f"<|user|>What is {i} + {i}?", "answer": str(2 * i), "source_row": f"data/train.jsonl:{i + 1}"}
        for i in range(6)]


def test_probe_calls_rewards_as_trl_does(tmp_path):
    write(tmp_path / "mine.py", SCORE)
    mine, exact = rewards({"fn": "mine.py:score", "bonus": 0}, {"fn": "exact_answer"}, recipe_dir=tmp_path)
    probe([mine, exact], ROWS)
    module = sys.modules[mine.fn.func.__module__]
    [seen] = module.calls
    completions = seen["completions"]
    assert len(completions) == 12 and completions[:3] == ["", "42", "0"]  # 4 rows x 3 samples; a column's value
    assert seen["answer"] == ["0"] * 3 + ["2"] * 3 + ["4"] * 3 + ["6"] * 3  # repeated once per completion
    assert seen["source_row"][3] == "data/train.jsonl:2" and "prompt" not in seen
    assert seen["trainer_state"] is None and callable(seen["log_extra"]) and callable(seen["log_metric"])
    assert [len(ids) for ids in seen["completion_ids"]] == [len(c) for c in completions]


def test_probe_lists_every_problem(tmp_path):
    write(tmp_path / "mine.py", "def score(prompts, completions, reference, **kwargs):\n    return [0.0]\n")
    write(tmp_path / "bad.py", "def score(prompts, completions, **kwargs):\n    return [0.0]\n")
    found = rewards({"fn": "mine.py:score"}, {"fn": "exact_answer", "column": "solution"},
                    {"fn": "bad.py:score"}, {"fn": "json", "schema_column": "tool"}, recipe_dir=tmp_path)
    with pytest.raises(UserError) as err:
        probe(found, ROWS, sample_completions=["x"])
    message = str(err.value)
    assert "4 problems" in message
    assert "reward `mine.py:score`: parameter `reference` has no default" in message
    assert "reward `exact_answer`: the rows have no column `solution` (their columns: answer)" in message
    assert "reward `json`: the rows have no column `tool`" in message and "`schema_column`" in message
    assert "reward `bad.py:score` returned 1 values for 4 completions" in message
    assert "data/train.jsonl:1" in message


def test_probe_refuses_an_option_named_like_a_column(tmp_path):
    write(tmp_path / "mine.py", SCORE)
    with pytest.raises(UserError) as err:
        probe(rewards({"fn": "mine.py:score", "bonus": 0, "answer": 1}, recipe_dir=tmp_path), ROWS)
    assert "option `answer` is also a column" in str(err.value)


def test_probe_passes_clean_rewards():
    clean = rewards({"fn": "exact_answer"}, {"fn": "format", "pattern": ".*"}, {"fn": "length", "target": 4})
    probe(clean, ROWS)  # raises nothing
    assert math.isclose(call(clean[2], ["x" * 6])[0], -0.5)


def test_importing_rewards_stays_light():
    code = "import sys, finetune.rewards; print([m for m in ('torch', 'transformers', 'trl') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
