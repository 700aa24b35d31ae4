"""Each family's own chat template: exact trained spans, refusals, and a saved model that stops on its end of turn."""

import json

import pytest
from helpers.template_families import FAMILIES, family_model_dir, family_tokenizer

from finetune.data.prepare import build_datasets
from finetune.data.template import (
    CHATML_TEMPLATE,
    chat_template,
    encode_samples,
    fit_messages,
)
from finetune.models.load import load_tokenizer

TURNS = [{"role": "user", "content": "Count from 1"}, {"role": "assistant", "content": "1 2 3"},
         {"role": "user", "content": "again"}, {"role": "assistant", "content": "4 5 6"}]


def loaded(family, tmp_path, choice="auto"):
    """The family's tokenizer as a run loads it (auto: its own template; ChatML tokens added for a base model)."""
    family_tokenizer(family).save_pretrained(tmp_path / family)
    return load_tokenizer(str(tmp_path / family), chat_template=choice)[0]


def trained_runs(tokenizer, ids, labels):
    """The trained stretches of a sample, decoded: one per assistant turn when masks are exact."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_answer_and_its_end_of_turn_train_and_nothing_else(family, tmp_path):
    tokenizer = loaded(family, tmp_path)
    template = chat_template(tokenizer)
    answer = FAMILIES[family][5]
    assert template.end_of_turn == FAMILIES[family][4]
    [sample] = encode_samples(tokenizer, TURNS, 1024, template=template)
    # The training input is exactly what transformers' apply_chat_template gives a runtime.
    assert sample.input_ids == tokenizer.apply_chat_template(TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert trained_runs(tokenizer, sample.input_ids, sample.labels) == [answer.format("1 2 3"),
                                                                         answer.format("4 5 6")]
    # The prompt a runtime sends before the second answer is a prefix of the row, entirely untrained.
    prompt = tokenizer.apply_chat_template(TURNS[:3], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert sample.input_ids[:len(prompt)] == prompt
    assert trained_runs(tokenizer, prompt, sample.labels[:len(prompt)]) == [answer.format("1 2 3")]


def test_a_system_turn_is_a_turn_where_the_template_has_one(tmp_path):
    tokenizer = loaded("llama3", tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, *TURNS]
    [sample] = encode_samples(tokenizer, messages, 1024)
    assert tokenizer.decode(sample.input_ids).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert trained_runs(tokenizer, *sample[:2]) == ["1 2 3<|eot_id|>", "4 5 6<|eot_id|>"]


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_templates_without_a_system_role_refuse_or_fold_it(family, tmp_path, write_recipe):
    tokenizer = loaded(family, tmp_path)
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *TURNS]}, {"messages": TURNS},
            {"messages": [TURNS[0], TURNS[0], TURNS[1]]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def prepare(fold):
        return build_datasets(tokenizer, train=str(path), train_split="train", eval=None, eval_split="test",
                              eval_fraction=0.0, format="auto", max_length=1024, max_bad_fraction=1.0, seed=0,
                              log=lambda *_: None, template=chat_template(tokenizer, fold_system=fold))

    refused = prepare(fold=False)
    assert len(refused.train) == 1
    assert refused.problems[0] == (
        f"{path}:1: the chat template (the model's own) has no system role and this row has a system turn; set "
        "data.fold_system: true to prepend the system text to the first user turn, or drop it")
    assert refused.problems[1] == (f"{path}:3: the chat template (the model's own) refused this row: Conversation "
                                   "roles must alternate user/assistant/user/assistant/...")
    folded = prepare(fold=True)
    assert len(folded.train) == 2
    text = tokenizer.decode(folded.train[0]["input_ids"])
    assert "Be brief.\n\nCount from 1" in text
    assert fit_messages(chat_template(tokenizer, fold_system=True), rows[0]["messages"])[0] == {
        "role": "user", "content": "Be brief.\n\nCount from 1"}


#: A reasoning-model template in the style of Qwen3's: thinking is shown only in answers after the last user turn,
#: so earlier answers are rendered without it once the conversation goes on.
REWRITING = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 "
    "%}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\n' }}"
    "{%- if m.role == 'assistant' and loop.index0 < ns.last %}{{- m.content.split('</think>')[-1].lstrip() }}"
    "{%- else %}{{- m.content }}{%- endif %}{{- '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def test_a_template_that_rewrites_earlier_turns_trains_each_answer_in_its_own_context(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = REWRITING
    turns = [TURNS[0], {"role": "assistant", "content": "<think>a</think>1 2 3"}, TURNS[2],
             {"role": "assistant", "content": "<think>b</think>4 5 6"}]
    first, second = encode_samples(tokenizer, turns, 1024)
    assert trained_runs(tokenizer, *first[:2]) == ["<think>a</think>1 2 3<|im_end|>"]
    assert trained_runs(tokenizer, *second[:2]) == ["<think>b</think>4 5 6<|im_end|>"]
    assert "<think>a</think>" not in tokenizer.decode(second.input_ids)  # as the template shows it at that point


def test_an_end_of_turn_that_is_not_a_special_token_is_refused(tokenizer, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    result = CliRunner().invoke(app, ["train", str(write_recipe(data={"chat_template": str(template)}))])
    assert result.exit_code == 2, result.output
    assert "ends an assistant turn with '\\n\\n', which is not a special token of the tokenizer" in result.output
    assert "Traceback" not in result.output
    assert chat_template(tokenizer).text == CHATML_TEMPLATE  # no template of its own: ChatML


@pytest.mark.parametrize("family", ["llama3", "gemma", "chatml", "mistral-nemo"])
def test_a_model_trained_with_its_template_stops_at_that_token(family, tmp_path, write_recipe):
    """Plain transformers, as a user deploys it: apply_chat_template + generate, no stop tokens passed. Mistral-Nemo
    with a system prompt, which its template shows only in the prompt a runtime builds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from finetune.cli import app

    base = family_model_dir(family, tmp_path / "base")
    data = tmp_path / "hi.jsonl"
    row = {"messages": [{"role": "user", "content": "Say 1"}, {"role": "assistant", "content": "1 2 3"}]}
    if family == "mistral-nemo":
        row["messages"].insert(0, {"role": "system", "content": "Count."})
    data.write_text((json.dumps(row) + "\n") * 16)
    recipe = write_recipe(model={"name_or_path": str(base)}, data={"train": str(data)},
                          train={"learning_rate": 1e-2, "max_steps": 30})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    saved = tmp_path / "run" / "model"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved)
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[family][4])
    stops = json.loads((saved / "generation_config.json").read_text())["eos_token_id"]
    assert eot in (stops if isinstance(stops, list) else [stops])
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == eot and len(new) < 40
    assert tokenizer.decode(new, skip_special_tokens=True).strip() == "1 2 3"
