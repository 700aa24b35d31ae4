"""`finetune eval` numbers against hand computation; `finetune merge` equivalence and refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.rows import Conversation, save_conversations
from finetune.data.template import encode
from finetune.eval.sft import assistant_loss, generate, match_scores
from finetune.eval.targets import load_for_eval
from finetune.paths import PARTIAL_MARKER

runner = CliRunner()
ROWS = [
    Conversation([{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}], "t", 1),
    Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 10 please"},
                  {"role": "assistant", "content": "10 11 12 13"}], "t", 2),
]


def test_assistant_loss_matches_a_hand_computation(tiny_model_dir):
    model, tokenizer = load_for_eval(str(tiny_model_dir), None, str(tiny_model_dir))
    total, count = 0.0, 0
    for row in ROWS:  # one row at a time, no padding: the plain definition
        ids, labels = encode(tokenizer, row.messages, 512)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        for position in range(1, len(ids)):
            if labels[position] != -100:
                total -= logp[position - 1, ids[position]].item()
                count += 1
    got = assistant_loss(model, tokenizer, ROWS, batch_size=2)  # batched, padded
    assert got["assistant_tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_match_scores_count_planted_answers():
    scores = match_scores(["2021-03-05", "2021-03-07", " 2021-03-09."], ["2021-03-05", "2021-03-06", "2021-03-09"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["normalised_match"] == pytest.approx(2 / 3)


def test_eval_cli_scores_a_planted_right_and_wrong_answer(tiny_model_dir, tmp_path):
    model, tokenizer = load_for_eval(str(tiny_model_dir), None, str(tiny_model_dir))
    actual = generate(model, tokenizer, ROWS, batch_size=2, max_new_tokens=6)
    planted = [Conversation(ROWS[0].messages[:-1] + [{"role": "assistant", "content": actual[0] or "x"}], "p", 1),
               Conversation(ROWS[1].messages[:-1] + [{"role": "assistant", "content": actual[1] + " not this"}],
                            "p", 2)]
    data = tmp_path / "planted.jsonl"
    save_conversations(planted, data)
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "6",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["results"]["model"]["exact_match"] == (0.5 if actual[0] else 0.0)
    assert report["results"]["model"]["rows"] == 2
    assert "| model |" in (tmp_path / "out" / "eval.md").read_text()


@pytest.fixture
def lora_run(write_recipe, tmp_path, tiny_model_dir):
    """A real LoRA run whose adapter is then replaced by a non-zero one (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(method={"name": "lora", "r": 4, "dropout": 0.0}, data={"eval_fraction": 0.125},
                          train={"max_steps": 1})
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run = tmp_path / "run"
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(run / "adapter")
    return run


def test_merged_logits_equal_adapter_logits_and_load_in_plain_transformers(lora_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(lora_run), "--output", str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "merge.json").read_text())
    assert record["max_logit_diff"] < 1e-4 and record["check_rows"] == 4
    assert record["base_weights_sha256"] == json.loads((lora_run / "run.json").read_text())["base_weights_sha256"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        expected, got, plain = adapter(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the adapter really changed the model
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_merge_refusals_exit_2(lora_run, tmp_path, write_recipe):
    def merge(run, name):
        return runner.invoke(app, ["merge", str(run), "--output", str(tmp_path / name)])

    info_path = lora_run / "run.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "base_weights_sha256": "0" * 64}))
    result = merge(lora_run, "a")
    assert result.exit_code == 2 and "the run was trained on 000000000000" in result.output
    info_path.write_text(json.dumps({**info, "base_model": str(tmp_path / "gone"),
                                     "base_model_path": str(tmp_path / "gone")}))
    result = merge(lora_run, "b")
    assert result.exit_code == 2 and "not found" in result.output
    info_path.write_text(json.dumps(info))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = merge(lora_run, "busy")
    assert result.exit_code == 2 and "is not empty" in result.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    full = write_recipe(name="full.yaml", train={"max_steps": 1, "output_dir": str(tmp_path / "full")})
    assert runner.invoke(app, ["train", str(full)]).exit_code == 0
    result = merge(tmp_path / "full", "c")
    assert result.exit_code == 2 and "only LoRA runs have an adapter to merge" in result.output
    assert not any((tmp_path / n).exists() for n in "abc")


def test_merge_names_an_output_left_partial_and_the_command_that_replaces_it(lora_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()  # as a merge killed while saving leaves it, written by a finetune that wrote in place
    (out / PARTIAL_MARKER).write_text(json.dumps({"started": 1.7e9, "pid": 4242}))
    (out / "model.safetensors").write_bytes(b"half")
    result = runner.invoke(app, ["merge", str(lora_run), "--output", str(out), "--dtype", "fp32"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert f"{out} is a partial output of `finetune merge`" in said and "pid 4242" in said
    assert f"rm -r {out} && finetune merge {lora_run} --output {out} --dtype fp32" in said
    assert (out / "model.safetensors").read_bytes() == b"half"  # refused, not replaced


def test_import_gguf_refuses_what_it_cannot_read(tmp_path):
    result = runner.invoke(app, ["import-gguf", str(tmp_path / "none.gguf"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "none.gguf: not found" in result.output
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    result = runner.invoke(app, ["import-gguf", str(fake), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "a file finetune does not read" in result.output  # a name is not content
    fake.write_bytes(b"GGUF\x03\x00\x00\x00 cut short")
    result = runner.invoke(app, ["import-gguf", str(fake), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "before the header and tensors it declares: it is cut short" in \
        " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_eval_scores_every_row_shape_train_accepts(write_recipe, tmp_path):
    """Rows that open with the answer (no user or system turn) get the bare generation prompt; rows with several
    assistant turns are scored on the last trained one, with everything before it as the prompt."""
    from finetune.eval.sft import prompt_text, reference
    from finetune.models.load import load_tokenizer

    shapes = [
        [{"role": "assistant", "content": "3 4 5"}],
        [{"role": "assistant", "content": "3"}, {"role": "assistant", "content": "4 5"}],
        [{"role": "system", "content": "Count."}, {"role": "assistant", "content": "7 8"}],
        [{"role": "user", "content": "Count from 2"}, {"role": "assistant", "content": "2 3"},
         {"role": "user", "content": "thanks"}],
    ]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"messages": m}) + "\n" for m in shapes))
    recipe = write_recipe(data={"eval": str(held)}, method={"name": "lora", "r": 4}, train={"max_steps": 1})
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run = tmp_path / "run"
    result = runner.invoke(app, ["eval", str(run), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert report["rows"] == len(shapes) and report["results"]["tuned"]["rows"] == len(shapes)
    assert report["results"]["tuned"]["assistant_tokens"] > 0
    assert [(s["prompt"], s["reference"]) for s in report["samples"]] == [
        ("", "3 4 5"), ("3", "4 5"), ("Count.", "7 8"), ("Count from 2", "2 3")]
    tokenizer, _ = load_tokenizer(str(run / "adapter"))
    assert prompt_text(tokenizer, []) == "<|im_start|>assistant\n"  # what training put before such an answer
    context_only = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "trained"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "context", "weight": 0}]
    assert reference(context_only) == "trained"
