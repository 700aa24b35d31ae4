"""A template that renders the prompt differently once the answer follows (Mistral-Nemo-2407 shows the system
prompt only in the last user turn) must not get a mask that trains user text: the row is refused."""

import pytest

from finetune.data.template import encode_samples
from finetune.testing import build_tokenizer

NEMO_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "<s>{%- for m in loop_messages %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system is defined %}[INST]{{ system }}\n\n{{ m['content'] }}[/INST]"
    "{%- else %}[INST]{{ m['content'] }}[/INST]{%- endif %}"
    "{%- else %}{{ m['content'] }}</s>{%- endif %}{%- endfor %}"
)


def test_a_prompt_that_changes_once_the_answer_follows_is_refused_not_mis_masked():
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>")
    tokenizer.chat_template = NEMO_LIKE
    plain = [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}]
    (sample,) = encode_samples(tokenizer, plain, 128)
    trained = tokenizer.decode([t for t in sample.labels if t != -100])
    assert trained == "3 4 5</s>"
    with pytest.raises(ValueError, match="renders the turns before assistant turn 3 differently"):
        encode_samples(tokenizer, [{"role": "system", "content": "Be brief."}, *plain], 128)
