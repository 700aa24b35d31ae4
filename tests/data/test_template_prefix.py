"""A template that renders the prompt differently once the answer follows (Mistral-Nemo-2407 shows the system
prompt only in the last user turn) must not get a mask that trains user text: each answer trains after the prompt a
runtime gives it."""

import pytest

from benchmarks.tiny import build_tokenizer
from finetune.data.template import encode_samples

NEMO_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "<s>{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}[INST]{{ system }}\n\n{{ m['content'] }}[/INST]"
    "{%- else %}[INST]{{ m['content'] }}[/INST]{%- endif %}"
    "{%- else %}{{ m['content'] }}</s>{%- endif %}{%- endfor %}"
)


def test_a_prompt_that_changes_once_the_answer_follows_trains_in_the_runtime_prompt():
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>")
    tokenizer.chat_template = NEMO_LIKE
    plain = [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}]
    (sample,) = encode_samples(tokenizer, plain, 128)
    trained = tokenizer.decode([t for t in sample.labels if t != -100])
    assert trained == "3 4 5</s>"
    system = {"role": "system", "content": "Be brief."}
    later = [{"role": "user", "content": "Go on"}, {"role": "assistant", "content": "6 7"}]
    first, second = encode_samples(tokenizer, [system, *plain, *later], 128)
    for sample, answer in ((first, "3 4 5</s>"), (second, "6 7</s>")):
        prompt = [i for i, label in zip(sample.input_ids, sample.labels) if label == -100]
        assert tokenizer.decode([t for t in sample.labels if t != -100]) == answer
        assert tokenizer.decode(prompt).endswith("[INST]Be brief.\n\n" + ("Go on" if answer == "6 7</s>" else
                                                                           "Count from 3") + "[/INST]")
    # exactly what apply_chat_template gives a runtime before the second answer
    runtime = tokenizer.apply_chat_template([system, *plain, later[0]], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(second.input_ids) == runtime + "6 7</s>"


def test_chat_with_a_system_message_the_template_refuses_is_one_clear_error(tmp_path):
    from benchmarks.tiny import build_tiny_llama
    from finetune.errors import UserError
    from finetune.eval.chat import chat_loop

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{%- endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    tokenizer.save_pretrained(tmp_path)
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="--system: this model's chat template has no system role"):
        chat_loop(str(tmp_path), 4, "Be brief.", read=lambda prompt: "hi", write=lambda *_: None)


def test_dump_to_a_directory_is_refused_before_any_work(tmp_path, write_recipe):
    from typer.testing import CliRunner

    from finetune.cli import app

    result = CliRunner().invoke(app, ["data", str(write_recipe()), "--dump", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_a_user_word_inside_the_end_of_turn_markup_is_no_leak():
    """Only what precedes the answer counts: Phi-3's `<|end|>` after the answer holds the user's word "end"."""
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"), eos="<|end|>")
    tokenizer.chat_template = ("{%- for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{%- endfor %}"
                               "{%- if add_generation_prompt %}<|assistant|>\n{%- endif %}")
    rows = [{"role": "user", "content": "end"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "3 4"}]
    (sample,) = encode_samples(tokenizer, rows, 128)
    trained = tokenizer.decode([t for t in sample.labels if t != -100])
    assert "ok<|end|>" in trained and "3 4<|end|>" in trained and "again" not in trained and "<|user|>" not in trained
