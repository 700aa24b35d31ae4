"""`finetune plan --apply`'s recipe editor: changed lines only, comments and layout kept, refusals named."""

from __future__ import annotations

import copy

import pytest
import yaml

from finetune.plan.amend import Change, amend_recipe

NOTE = "finetune plan --fit"

# The text of recipes/demo.yaml and recipes/lora.yaml, copied so the tests do not move when the recipes do.
DEMO = """\
# finetune train recipes/demo.yaml
# The demo: LoRA on the embedded SmolLM2-135M-Instruct, taught to normalise written dates to ISO 8601.
# Sized for a 2-core CPU (a few minutes). `make demo` trains it, compares base and tuned on the held-out
# rows, merges the adapter and says how to chat with the result.
model:
  name_or_path: smollm2-135m-instruct
  # 135M parameters and ~40-token rows: activations are tiny, so skip the ~30% recompute cost.
  gradient_checkpointing: false
data:
  train: data/demo/train.jsonl
  eval: data/demo/test.jsonl
  max_length: 128  # rows are ~70 tokens in SmolLM2's own template (its default system prompt included)
method:
  name: lora
  r: 16  # a little more capacity than the r=8 default: the task is a new skill, not a style
  alpha: 32
  dropout: 0.0  # 80 steps over 2000 distinct rows: nothing to overfit yet
train:
  learning_rate: 1.0e-3  # LoRA on a small model moves slowly at the usual 2e-4
  lr_scheduler: cosine
  warmup_ratio: 0.05
  max_steps: 80
  batch_size: 8
  logging_steps: 10
  save_steps: 80
  output_dir: runs/demo
"""

LORA = """\
# finetune train recipes/lora.yaml
# LoRA as in seeds 001/003: rank 8, alpha 32, adapters on every linear layer; on the embedded default.
model:
  name_or_path: smollm2-135m-instruct
data:
  train: data/demo/train.jsonl
  eval_fraction: 0.05  # 100 held-out rows, saved with the run
  max_length: 512
method:
  name: lora
  r: 8
  alpha: 32
  dropout: 0.05
  target_modules: all-linear
train:
  learning_rate: 2.0e-4  # the usual LoRA step; adapters start at zero so they tolerate 10x full-FT rates
  lr_scheduler: cosine
  warmup_ratio: 0.03
  epochs: 1
  batch_size: 4
  gradient_accumulation_steps: 2
  eval_steps: 100
  logging_steps: 10
  output_dir: runs/lora
"""

# The shapes the editor must walk past untouched: a document start, a list of mappings, a flow list, a block
# scalar holding a comment-like line, 4-space indentation, comment blocks between sections.
WIDE = """\
---
# a hand-written recipe
model:
    name_or_path: some/model  # the base

    gradient_checkpointing: true
data:
    sources:
      - path: a.jsonl
        weight: 2  # twice as often
      - path: b.jsonl
    template: |
        # not a comment: part of the template
        {{ prompt }}

# ---- training ----
train:
    report_to: [tensorboard]
    tags:
    - first
    - second
    batch_size: 16

# ---- method ----
method:
    name: qlora
"""


def with_changes(text: str, changes: list[Change]) -> dict:
    """What the amended recipe should load as: the original mapping with each change set."""
    expected = copy.deepcopy(yaml.safe_load(text))
    for change in changes:
        *parents, leaf = change.key.split(".")
        node = expected
        for name in parents:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[leaf] = change.value
    return expected


def is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(line == other for other in it) for line in needles)


def check_invariant(text: str, changes: list[Change], replaced: list[str]) -> str:
    """Loads as the original plus the changes; every line but the `replaced` ones is still there, in order."""
    out = amend_recipe(text, changes)
    assert yaml.safe_load(out) == with_changes(text, changes)
    old, new = text.splitlines(), out.splitlines()
    assert all(line in old for line in replaced)
    assert not any(line in new for line in replaced)
    assert is_subsequence([line for line in old if line not in replaced], new)
    return out


def test_existing_nested_value_is_replaced_with_its_comment():
    out = amend_recipe(DEMO, [Change("train.learning_rate", 0.0005, "a smaller batch wants a smaller step")])
    lines = out.splitlines()
    assert "  learning_rate: 0.0005  # finetune plan --fit: a smaller batch wants a smaller step (was 1.0e-3)" in lines
    assert "moves slowly at the usual 2e-4" not in out
    assert lines.index("train:") + 1 == lines.index(next(s for s in lines if s.startswith("  learning_rate:")))
    assert [s for s in lines if "learning_rate" not in s] == [s for s in DEMO.splitlines() if "learning_rate" not in s]


def test_note_and_multiline_reason_land_on_one_line():
    out = amend_recipe(LORA, [Change("train.epochs", 2, "more\nrows")], note="fit 8GiB")
    assert "  epochs: 2  # fit 8GiB: more rows (was 1)" in out.splitlines()


def test_missing_key_goes_at_the_end_of_its_section():
    out = check_invariant(LORA, [Change("model.gradient_checkpointing", True, "activations")], replaced=[])
    lines = out.splitlines()
    at = lines.index("  gradient_checkpointing: true  # finetune plan --fit: activations (was unset)")
    assert lines[at - 1] == "  name_or_path: smollm2-135m-instruct"
    assert lines[at + 1] == "data:"


def test_missing_key_goes_before_the_comment_block_of_the_next_section():
    out = check_invariant(WIDE, [Change("data.shuffle", False, "x")], replaced=[])
    lines = out.splitlines()
    at = lines.index("    shuffle: false  # finetune plan --fit: x (was unset)")
    assert lines[at - 1] == "        {{ prompt }}"  # after the block scalar, which belongs to data
    assert lines[at + 1 : at + 4] == ["", "# ---- training ----", "train:"]


def test_missing_key_in_a_section_without_children():
    text = "model:\n  name_or_path: m\ntrain:\n# the rest is defaults\nmethod:\n  name: lora\n"
    out = check_invariant(text, [Change("train.batch_size", 2, "fits")], replaced=[])
    assert out == (
        "model:\n  name_or_path: m\ntrain:\n  batch_size: 2  # finetune plan --fit: fits (was unset)\n"
        "# the rest is defaults\nmethod:\n  name: lora\n"
    )


def test_missing_key_copies_the_files_indentation_for_an_empty_section():
    text = "model:\n    name_or_path: m\ntrain:\n"
    out = check_invariant(text, [Change("train.batch_size", 2, "fits")], replaced=[])
    assert out.endswith("train:\n    batch_size: 2  # finetune plan --fit: fits (was unset)\n")


def test_missing_sections_are_appended_at_the_end():
    out = check_invariant(LORA, [Change("quant.bnb.bits", 4, "weights")], replaced=[])
    assert out == LORA + "quant:\n  bnb:\n    bits: 4  # finetune plan --fit: weights (was unset)\n"


def test_missing_level_inside_an_existing_section():
    out = check_invariant(WIDE, [Change("method.quant.bits", 4, "w")], replaced=[])
    assert out.endswith("    name: qlora\n    quant:\n        bits: 4  # finetune plan --fit: w (was unset)\n")


def test_last_line_without_a_newline_and_crlf_files():
    out = amend_recipe("train:\n  epochs: 1", [Change("train.batch_size", 2, "r")])
    assert out == "train:\n  epochs: 1\n  batch_size: 2  # finetune plan --fit: r (was unset)\n"
    changes = [Change("train.epochs", 2, "r"), Change("train.batch_size", 2, "r")]
    out = amend_recipe("train:\r\n  epochs: 1\r\n", changes)
    assert out == (
        "train:\r\n  epochs: 2  # finetune plan --fit: r (was 1)\r\n"
        "  batch_size: 2  # finetune plan --fit: r (was unset)\r\n"
    )


def test_multiline_block_list_is_replaced_inline():
    changes = [Change("train.tags", ["only"], "one tag")]
    out = check_invariant(WIDE, changes, replaced=["    tags:", "    - first", "    - second"])
    lines = out.splitlines()
    at = lines.index("    tags: [only]  # finetune plan --fit: one tag (was [first, second])")
    assert lines[at + 1] == "    batch_size: 16"


def test_list_of_mappings_and_block_scalar_are_replaced_whole():
    changes = [Change("data.sources", ["c.jsonl"], "one file"), Change("data.template", "{{ p }}", "short")]
    replaced = WIDE.splitlines()[7:14]
    assert replaced[0] == "    sources:" and replaced[-1] == "        {{ prompt }}"
    out = check_invariant(WIDE, changes, replaced=replaced)
    lines = out.splitlines()
    assert lines[7] == (
        "    sources: [c.jsonl]  # finetune plan --fit: one file (was [{path: a.jsonl, weight: 2}, {path: b.jsonl}])"
    )
    assert lines[8] == (
        "    template: '{{ p }}'  # finetune plan --fit: short"
        ' (was "# not a comment: part of the template\\n{{ prompt }}\\n")'
    )
    assert lines[9:11] == ["", "# ---- training ----"]


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (0, "0"),
        (32, "32"),
        (1e-05, "1.0e-05"),
        (0.0002, "0.0002"),
        (2.5, "2.5"),
        ("cosine", "cosine"),
        ("yes", "'yes'"),
        ("123", "'123'"),
        ("a: b", "'a: b'"),
        ("#x", "'#x'"),
        ("", "''"),
        ("two\nlines", '"two\\nlines"'),
        (["tensorboard", "wandb"], "[tensorboard, wandb]"),
        (["a,b", "on", 3, None], "['a,b', 'on', 3, null]"),
        ([], "[]"),
    ],
)
def test_values_are_written_as_a_person_would(value, written):
    out = check_invariant(LORA, [Change("train.lr_scheduler", value, "r")], replaced=["  lr_scheduler: cosine"])
    assert f"  lr_scheduler: {written}  # finetune plan --fit: r (was cosine)" in out.splitlines()


def test_quoted_hash_is_not_taken_for_a_comment():
    text = "train:\n  output_dir: 'runs/#1'  # where\n"
    out = amend_recipe(text, [Change("train.output_dir", "runs/2", "r")])
    assert out == "train:\n  output_dir: runs/2  # finetune plan --fit: r (was 'runs/#1')\n"


def test_flow_mapping_parent_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train\.batch_size.*flow mapping"):
        amend_recipe("train: {batch_size: 2}\n", [Change("train.batch_size", 1, "r")])
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        amend_recipe("train: {}\n", [Change("train.batch_size", 1, "r")])


def test_non_mapping_values_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"train\.batch_size.*flow mapping"):
        amend_recipe("train:\n  batch_size: {a: 1}\n", [Change("train.batch_size", 1, "r")])
    with pytest.raises(ValueError, match=r"data\.sources\.path.*list item"):
        amend_recipe(WIDE, [Change("data.sources.path", "x", "r")])
    with pytest.raises(ValueError, match=r"train\.report_to\.x"):
        amend_recipe(WIDE, [Change("train.report_to.x", 1, "r")])
    with pytest.raises(ValueError, match=r"train.*section"):
        amend_recipe(WIDE, [Change("train", 1, "r")])
    with pytest.raises(ValueError, match=r"'train\.\.x'.*not a dotted recipe key"):
        amend_recipe(WIDE, [Change("train..x", 1, "r")])


def test_several_changes_to_the_shipped_recipes_keep_everything_else():
    changes = [
        Change("train.batch_size", 2, "activations at 128 tokens"),
        Change("train.gradient_accumulation_steps", 4, "keep the effective batch at 8"),
        Change("model.gradient_checkpointing", True, "activations"),
        Change("method.optim_bits", 8, "8-bit AdamW states"),
        Change("data.max_length", 96, "rows are ~70 tokens"),
        Change("train.learning_rate", 5.0e-4, "smaller batch"),
        Change("quant.load_in_4bit", True, "weights"),
    ]
    demo = check_invariant(DEMO, changes, replaced=[
        "  batch_size: 8",
        "  gradient_checkpointing: false",
        "  max_length: 128  # rows are ~70 tokens in SmolLM2's own template (its default system prompt included)",
        "  learning_rate: 1.0e-3  # LoRA on a small model moves slowly at the usual 2e-4",
    ])
    assert demo.count(f"# {NOTE}:") == len(changes)
    assert "  # 135M parameters and ~40-token rows: activations are tiny, so skip the ~30% recompute cost." in demo
    lora = check_invariant(LORA, changes, replaced=[
        "  batch_size: 4",
        "  gradient_accumulation_steps: 2",
        "  max_length: 512",
        "  learning_rate: 2.0e-4  # the usual LoRA step; adapters start at zero so they tolerate 10x full-FT rates",
    ])
    assert "  gradient_accumulation_steps: 4  # finetune plan --fit: keep the effective batch at 8 (was 2)" in lora


def test_changes_to_the_wide_recipe_keep_its_layout():
    changes = [
        Change("train.batch_size", 4, "fits"),
        Change("train.report_to", ["tensorboard", "wandb"], "both"),
        Change("model.gradient_checkpointing", False, "room"),
        Change("method.lora.r", 8, "smaller"),
        Change("data.seed", 7, "pinned"),
    ]
    out = check_invariant(WIDE, changes, replaced=[
        "    batch_size: 16", "    report_to: [tensorboard]", "    gradient_checkpointing: true",
    ])
    assert out.startswith("---\n# a hand-written recipe\n")
    assert "    report_to: [tensorboard, wandb]  # finetune plan --fit: both (was [tensorboard])" in out


def test_block_scalar_ending_in_a_hash_line_is_replaced_whole():
    text = "data:\n  template: |\n    {{ prompt }}\n    # still the template\n\n  max_length: 64\n"
    replaced = ["  template: |", "    {{ prompt }}", "    # still the template"]
    out = check_invariant(text, [Change("data.template", "x", "r")], replaced=replaced)
    was = '"{{ prompt }}\\n# still the template\\n"'
    assert out == f"data:\n  template: x  # finetune plan --fit: r (was {was})\n\n  max_length: 64\n"
    out = check_invariant(text.replace("  max_length: 64\n", ""), [Change("data.seed", 1, "r")], replaced=[])
    assert out.endswith("    # still the template\n  seed: 1  # finetune plan --fit: r (was unset)\n\n")


def test_duplicate_keys_change_the_one_a_loader_keeps():
    text = "train:\n  epochs: 1\n  epochs: 2\n"
    out = amend_recipe(text, [Change("train.epochs", 3, "r")])
    assert out == "train:\n  epochs: 1\n  epochs: 3  # finetune plan --fit: r (was 2)\n"
    assert yaml.safe_load(out) == {"train": {"epochs": 3}}
