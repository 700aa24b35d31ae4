"""`finetune data`: the report, the highlighted rows, and a --dump identical to what the trainer receives."""

import json

from helpers.template_families import family_model_dir
from typer.testing import CliRunner

from finetune.cli import app


def test_report_show_and_dump_equal_the_trainers_dataset(tmp_path, write_recipe, monkeypatch):
    import pytest

    import finetune.run.trainer

    base = family_model_dir("llama3", tmp_path / "llama3")
    rows = [{"messages": [{"role": "user", "content": f"Count from {i}"},
                          {"role": "assistant", "content": " ".join(str(i + k) for k in range(30))}]}
            for i in range(12)]
    rows[3] = {"messages": [{"role": "user", "content": "no answer"}]}
    rows[5]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(model={"name_or_path": str(base)},
                          data={"train": str(data), "max_length": 48, "max_bad_fraction": 0.2, "eval_fraction": 0.2})
    dump = tmp_path / "dump.jsonl"
    result = CliRunner().invoke(app, ["data", str(recipe), "--show", "1", "--dump", str(dump)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "chat template: the model's own, end of turn <|eot_id|>" in out
    assert "rows: 12 read, 11 kept, 1 refused; 9 training samples, 2 held out" in out
    assert f"refused 1x (first {data}:4): no assistant turn" in out
    assert "tokens per sample: mean " in out and "cut at max_length=48" in out and "tokens trained: " in out
    assert "sample 1 (" in out and "⟦" in out and "<|eot_id|>⟧" not in out  # cut at 48 tokens: no end of turn
    dumped = [json.loads(line) for line in dump.read_text().splitlines()]

    received = {}

    class Stop(Exception):
        pass

    def capture(self, *args, **kwargs):
        received["dataset"] = self.train_dataset
        raise Stop

    monkeypatch.setattr(finetune.run.trainer.Trainer, "train", capture)
    from finetune.recipe.load import load_recipe
    from finetune.run.flow import run_training

    with pytest.raises(Stop):
        run_training(load_recipe(recipe), recipe, log=lambda *a, **k: None)
    dataset = received["dataset"]
    assert [d["input_ids"] for d in dumped] == dataset["input_ids"]
    assert [d["labels"] for d in dumped] == dataset["labels"]
    assert all(len(d["input_ids"]) <= 48 for d in dumped) and {d["row"] for d in dumped}.isdisjoint({4})


def test_data_command_errors_are_one_message(tmp_path, write_recipe):
    recipe = write_recipe(data={"chat_template": "model"})  # the tiny tokenizer has no template of its own
    result = CliRunner().invoke(app, ["data", str(recipe)])
    assert result.exit_code == 2
    assert "data.chat_template is `model`, but this tokenizer has no chat template" in result.output
    assert "Traceback" not in result.output


def test_preference_recipes_get_their_pairs_reported(tmp_path, write_recipe):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(10)]
    rows.append({"prompt": "Say nothing", "chosen": "ok"})  # no rejected answer: refused, named
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(data={"train": str(pairs), "eval_fraction": 0.2, "max_bad_fraction": 0.5},
                          objective={"name": "dpo"}, method={"name": "lora"})
    dump = tmp_path / "pairs-dump.jsonl"
    result = CliRunner().invoke(app, ["data", str(recipe), "--show", "1", "--dump", str(dump)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "objective dpo: 11 rows read, 1 refused; 8 training pairs, 2 held out" in said
    assert f"refused: {pairs}:11:" in said and "supervised fine-tuning" not in said
    assert "chosen:" in said and "rejected:" in said
    dumped = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(dumped) == 8 and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dumped[0])
