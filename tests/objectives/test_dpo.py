"""The dpo objective on the tiny model: the loss against the formula, the reference without a second model, every
method, exact resume, preference rows in every shape (and refused ones), the plan and the preference eval."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.runs import EVERY_METHOD, built_trainer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.preference.pairs import normalise_pair, read_pairs
from finetune.data.preference.prepare import build_pairs
from finetune.data.template import chat_template
from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.run.flow import run_training
from finetune.run.report import read_metrics

runner = CliRunner()


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Count up (chosen) or down (rejected): a preference the tiny model can learn in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(3, 15)
        rows.append({"prompt": f"Count from {start}", "chosen": " ".join(str(start + i) for i in range(4)),
                     "rejected": " ".join(str(start - i) for i in range(4))})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def dpo_recipe(write_recipe, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))  # 4 held out: two whole batches of 2

    def write(method=None, objective=None, **sections):
        return write_recipe(data={"train": str(pairs), "eval_fraction": 0.125},
                            method=method or {"name": "full"},
                            objective={"name": "dpo", **(objective or {})},
                            **{"train": {"max_steps": 3, "batch_size": 2, **sections.pop("train", {})}, **sections})

    return write



def answer_logp(model, prompt_ids, answer_ids):
    """Summed log-probability of the answer tokens given the prompt, by hand."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum()


def test_dpo_loss_equals_the_formula_by_hand_and_lora_reference_is_the_base_with_adapters_off(dpo_recipe):
    path = dpo_recipe(method={"name": "lora", "r": 4, "dropout": 0.0}, objective={"beta": 0.5})
    seen = {}

    def inspect(trainer):
        from peft import PeftModel

        model = trainer.model
        assert isinstance(model, PeftModel) and trainer.ref_model is None  # no second model: the adapters go off
        assert list(model.peft_config) == ["default"]  # nor a second adapter: the fresh adapter's policy is the base
        assert not trainer.precompute_ref_logps
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a policy that differs from the reference (B starts at zero)
                assert param.requires_grad
                param.data.normal_(0, 0.3)
        rows = [trainer.train_dataset[i] for i in range(2)]
        batch = trainer.data_collator(rows)
        model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(model, batch)
            terms = []
            for row in rows:
                policy = [answer_logp(model, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
                with model.disable_adapter():
                    ref = [answer_logp(model, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
                margin = (policy[0] - ref[0]) - (policy[1] - ref[1])
                terms.append(-F.logsigmoid(0.5 * margin))
        seen.update(loss=loss.item(), hand=torch.stack(terms).mean().item(), margin=margin.item())

    built_trainer(path, inspect)
    assert abs(seen["margin"]) > 0.01  # the reference really differs from the policy
    assert seen["loss"] == pytest.approx(seen["hand"], rel=1e-5)


def test_full_fine_tuning_precomputes_the_reference_from_the_base(dpo_recipe, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = dpo_recipe()
    seen = {}

    def inspect(trainer):
        assert trainer.ref_model is None and trainer.precompute_ref_logps  # one model in memory
        row = trainer.train_dataset[0]
        seen.update(row=row)

    built_trainer(path, inspect)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    row = seen["row"]
    with torch.no_grad():
        for key in ("chosen", "rejected"):
            expected = answer_logp(base, row["prompt_ids"], row[f"{key}_ids"]).item()
            assert row[f"ref_{key}_logps"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", EVERY_METHOD, ids=lambda m: m["name"])
def test_each_method_trains_dpo_and_raises_the_chosen_reward(dpo_recipe, tmp_path, method):
    path = dpo_recipe(method=method, train={"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    logs = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 9))
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1: log 2
    assert sum(r["rewards/margins"] for r in logs[-3:]) > 0
    assert [r for r in metrics if "eval_rewards/margins" in r][-1]["eval_rewards/margins"] > 0  # held-out pairs
    info = json.loads((run_dir / "run.json").read_text())
    assert info["objective"] == "dpo" and info["status"] == "complete"
    held = [json.loads(line) for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
    assert len(held) == 4 and {"prompt", "chosen", "rejected", "source", "row"} <= held[0].keys()
    if method["name"] == "lora":  # merge checks the merged logits on the held-out pairs' prompts and chosen answers
        result = runner.invoke(app, ["merge", str(run_dir), "--output", str(tmp_path / "merged")])
        assert result.exit_code == 0, result.output
        assert json.loads((tmp_path / "merged" / "merge.json").read_text())["check_rows"] == 4


def test_resume_mid_run_is_exact(dpo_recipe, tmp_path):
    from helpers.runs import assert_same_weights, straight_and_resumed

    straight, resumed = straight_and_resumed(dpo_recipe, tmp_path)
    assert_same_weights(straight / "model", resumed / "model")
    one = [r["loss"] for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    two = [r["loss"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert one == two


ANSWER_SHAPES = [
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, [{"role": "user", "content": "2+2?"}]),
    ({"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}],
      "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]},
     [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}]),
    ({"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
     [{"role": "user", "content": "2+2?"}]),
    ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
      "rejected": {"from": "gpt", "value": "5"}, "system": "Be exact."},
     [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}]),
    ({"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                   {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
     [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "weight": 0},
      {"role": "user", "content": "2+2?"}]),
    ({"instruction": "Add.", "input": "2+2", "chosen": "4", "rejected": "5"},
     [{"role": "user", "content": "Add.\n\n2+2"}]),
]


@pytest.mark.parametrize("row,prompt", ANSWER_SHAPES, ids=["strings", "message-lists", "implicit-prompt",
                                                           "sharegpt", "messages-history", "alpaca"])
def test_preference_rows_in_each_common_shape(row, prompt):
    got_prompt, chosen, rejected, ignored = normalise_pair(row)
    assert got_prompt == prompt
    assert chosen == {"role": "assistant", "content": "4"} and rejected == {"role": "assistant", "content": "5"}
    assert not ignored


def test_earlier_answers_are_context_and_only_the_final_answer_is_the_completion(tokenizer):
    row = ANSWER_SHAPES[4][0]
    from finetune.data.preference.pairs import Pair, encode_pair

    prompt, chosen, rejected, _ = normalise_pair(row)
    ids, cut = encode_pair(tokenizer, Pair(prompt, chosen, rejected, "f", 1), 128, chat_template(tokenizer))
    assert not cut
    assert tokenizer.decode(ids["chosen_ids"]) == "4<|im_end|>"
    assert tokenizer.decode(ids["rejected_ids"]) == "5<|im_end|>"
    text = tokenizer.decode(ids["prompt_ids"])
    assert "1+1?" in text and ">assistant\n2<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_bad_preference_rows_are_refused_with_file_and_row(tmp_path, tokenizer):
    rows = pair_rows(6) + [
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "a", "chosen": "only one"},
        {"chosen": "x", "rejected": "y"},
        {"prompt": "a", "chosen": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}],
         "rejected": "y"},
        {"prompt": "a", "chosen": "x", "rejected": "y", "images": ["cat.png"]},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{not json\n")
    pairs, problems, total, _ = read_pairs(str(path), "train")
    assert total == 12 and len(pairs) == 6
    reasons = dict(p.split(": ", 1) for p in problems)
    assert set(reasons) == {f"{path}:{n}" for n in range(7, 13)}
    assert "same answer" in reasons[f"{path}:7"] and "no `rejected` answer" in reasons[f"{path}:8"]
    assert "there is no `prompt`" in reasons[f"{path}:9"] and "one assistant answer" in reasons[f"{path}:10"]
    assert reasons[f"{path}:11"].startswith("`images`: multimodal") and "not valid JSON" in reasons[f"{path}:12"]
    with pytest.raises(UserError,
                       match=r"(?s)6 of 12 rows unusable .*bad\.jsonl:7: `chosen` and `rejected` are the same"):
        build_pairs(tokenizer, chat_template(tokenizer), str(path), "train", None, "test", 0.0, 64, 0.01, 0,
                    cache=False)
    # A prompt that fills max_length leaves no answer token: refused, counted, never trained silently.
    long = write_jsonl(tmp_path / "long.jsonl", pair_rows(3) + [{"prompt": "word " * 200, "chosen": "a",
                                                                   "rejected": "b"}])
    data = build_pairs(tokenizer, chat_template(tokenizer), str(long), "train", None, "test", 0.0, 64, 0.5, 0,
                       log=lambda *_: None, cache=False)
    assert len(data.train) == 3 and "long.jsonl:4: the prompt fills data.max_length=64" in data.problems[0]


def test_conversations_under_dpo_and_pairs_under_sft_are_refused_naming_the_objective(write_recipe, tmp_path,
                                                                                       train_file):
    dpo_on_chats = write_recipe(objective={"name": "dpo"})
    result = runner.invoke(app, ["train", str(dpo_on_chats)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{train_file}:1: the preference objectives (dpo, simpo, orpo) train on" in said
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    sft_on_pairs = write_recipe(name="sft.yaml", data={"train": str(pairs)},
                                train={"output_dir": str(tmp_path / "sft-run")})
    result = runner.invoke(app, ["train", str(sft_on_pairs)])
    assert result.exit_code == 2 and "Set `objective: {name: dpo}`" in " ".join(result.output.split())


def test_recipe_refuses_what_dpo_cannot_honour_with_the_alternative(dpo_recipe):
    path = dpo_recipe(objective={"reference": "adapters_off", "label_smoothing": 0.1},
                      train={"packing": True, "token_metrics": True})
    with pytest.raises(UserError) as err:
        load_recipe(path)
    text = " ".join(str(err.value).split())
    assert "`label_smoothing` is used by loss_type robust only" in text
    with pytest.raises(UserError) as err:
        load_recipe(path, ["objective.label_smoothing=0"])
    text = " ".join(str(err.value).split())
    assert "3 problems" in text and "train.packing with objective dpo" in text
    assert "adapters_off needs method lora" in text and "use `precomputed`" in text
    assert "train.token_metrics is an SFT metric" in text
    with pytest.raises(UserError, match="unknown objective `dop`; did you mean `dpo`"):
        load_recipe(path, ["objective.name=dop"])
    with pytest.raises(UserError, match=r"objective.betta: unknown key; did you mean `beta`"):
        load_recipe(path, ["objective.betta=0.2", "objective.label_smoothing=0", "train.packing=false",
                           "train.token_metrics=false", "objective.reference=auto"])


def test_plan_counts_two_sequences_per_pair(dpo_recipe):
    from finetune.plan.estimate import plan_recipe

    path = dpo_recipe()
    sft = plan_recipe(load_recipe(path, ["objective.name=sft"]), 24 * 2**30)
    dpo = plan_recipe(load_recipe(path), 24 * 2**30)
    assert dpo["setup"].sequences == 2 and sft["setup"].sequences == 1
    assert dpo["estimates"]["recipe"]["activations"] == pytest.approx(2 * sft["estimates"]["recipe"]["activations"])
    assert dpo["estimates"]["recipe"]["weights"] == sft["estimates"]["recipe"]["weights"]  # no reference copy


def test_eval_on_a_dpo_run_reports_preference_accuracy_and_the_reward_trl_logged(dpo_recipe, tmp_path):
    path = dpo_recipe(train={"max_steps": 6, "learning_rate": 5e-3})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval.json").read_text())
    base, tuned = report["results"]["base"], report["results"]["tuned"]
    assert report["objective"] == "dpo" and base["rows"] == tuned["rows"] == 4
    assert "reward_margin" not in base and 0 <= base["preference_accuracy"] <= 1
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_rewards/margins" in r][-1]
    # The same held-out pairs, the same base as reference: the margin TRL logged at the end is eval's (TRL averages
    # per-batch means, so whole batches make the two means the same).
    assert tuned["reward_margin"] == pytest.approx(final["eval_rewards/margins"], rel=1e-3)
    assert tuned["reward_accuracy"] == pytest.approx(final["eval_rewards/accuracies"])
    assert "| tuned |" in (run_dir / "eval.md").read_text()


def simpo_by_hand(c, r, beta, gamma):
    """SimPO's loss for one pair (arXiv:2405.14734, eq. 6), from each answer's per-token log-probabilities."""
    return -F.logsigmoid(beta * c.mean() - beta * r.mean() - gamma)


def orpo_odds_term(c, r):
    """ORPO's log sigmoid of the log odds ratio for one pair (arXiv:2403.07691, eqs. 4-7)."""
    def log_odds(tokens):
        p = tokens.mean().exp()
        return torch.log(p / (1 - p))

    return F.logsigmoid(log_odds(c) - log_odds(r))


@pytest.mark.parametrize("objective", [{"name": "simpo", "beta": 2.0, "gamma": 0.5}, {"name": "orpo", "beta": 0.2}],
                         ids=lambda o: o["name"])
def test_reference_free_losses_equal_their_papers_formulas_by_hand(dpo_recipe, objective):
    path = dpo_recipe(objective=objective)
    seen = {}

    def inspect(trainer):
        assert trainer.ref_model is None and "ref_chosen_logps" not in trainer.train_dataset.column_names  # no pass
        model = trainer.model.eval()
        rows = [trainer.train_dataset[i] for i in range(2)]
        with torch.no_grad():
            loss = trainer.compute_loss(model, trainer.data_collator(rows))
            per_token = []
            for row in rows:
                pair = []
                for key in ("chosen_ids", "rejected_ids"):
                    ids = torch.tensor([row["prompt_ids"] + row[key]])
                    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
                    pair.append(logps[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(row["prompt_ids"]) - 1:])
                per_token.append(pair)
        if objective["name"] == "simpo":
            hand = torch.stack([simpo_by_hand(c, r, 2.0, 0.5) for c, r in per_token]).mean()
        else:
            nll = -torch.cat([c for c, _ in per_token]).mean()  # the SFT term over every chosen token
            hand = nll - 0.2 * torch.stack([orpo_odds_term(c, r) for c, r in per_token]).mean()
        seen.update(loss=loss.item(), hand=hand.item())

    built_trainer(path, inspect)
    assert seen["loss"] == pytest.approx(seen["hand"], rel=1e-5)


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4},
                                    {"name": "galore", "rank": 8, "update_proj_gap": 2}], ids=lambda m: m["name"])
def test_reference_free_objectives_train_with_each_method(dpo_recipe, objective, method):
    path = dpo_recipe(method=method, objective={"name": objective},
                      train={"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 9))
    assert sum(r["rewards/margins"] for r in logs[-3:]) > sum(r["rewards/margins"] for r in logs[:3])
    assert json.loads((run_dir / "run.json").read_text())["objective"] == objective


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    """KTO's rows: counting up is desirable, counting down is not; half of each."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        start, good = rng.randint(3, 15), i % 2 == 0
        rows.append({"prompt": f"Count from {start}", "label": good,
                     "completion": " ".join(str(start + j if good else start - j) for j in range(4))})
    return rows


@pytest.fixture
def kto_recipe(dpo_recipe, tmp_path):
    rows = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows(32))

    def write(**kwargs):
        path = dpo_recipe(**kwargs)
        raw = yaml.safe_load(path.read_text())
        raw["data"]["train"], raw["objective"]["name"] = str(rows), "kto"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def test_kto_loss_equals_the_formula_by_hand_against_the_adapters_off_base(kto_recipe):
    path = kto_recipe(method={"name": "lora", "r": 4, "dropout": 0.0}, objective={"beta": 0.5},
                      train={"batch_size": 4})
    seen = {}

    def inspect(trainer):
        model = trainer.model
        assert trainer.ref_model is None and list(model.peft_config) == ["default"]
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)
        rows = [trainer.train_dataset[i] for i in range(4)]
        assert [r["KL_completion_ids"] for r in rows] == [rows[i - 1]["completion_ids"] for i in range(4)]
        model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(model, trainer.data_collator(rows))

            def ratio(row, key):
                policy = answer_logp(model, row["prompt_ids"], row[key])
                with model.disable_adapter():
                    return policy - answer_logp(model, row["prompt_ids"], row[key])

            kl = torch.stack([ratio(r, "KL_completion_ids") for r in rows]).mean().clamp(min=0)
            terms = [1 - torch.sigmoid(0.5 * ((ratio(r, "completion_ids") - kl) if r["label"]
                                              else (kl - ratio(r, "completion_ids")))) for r in rows]
        seen.update(loss=loss.item(), hand=torch.stack(terms).mean().item(),
                    labels={r["label"] for r in rows})

    built_trainer(path, inspect)
    assert seen["labels"] == {True, False}  # the batch holds both kinds (the rows are shuffled with the seed)
    assert seen["loss"] == pytest.approx(seen["hand"], rel=1e-5)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4},
                                    {"name": "lisa", "activated_layers": 1, "interval_steps": 2}],
                         ids=lambda m: m["name"])
def test_kto_trains_with_each_method_and_eval_scores_the_labelled_answers(kto_recipe, method):
    path = kto_recipe(method=method, objective={"beta": 0.5},
                      train={"max_steps": 12, "batch_size": 4, "learning_rate": 2e-3})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 13)) and "kl" in logs[0]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy == reference: 1 - sigmoid(0) for every answer
    assert min(r["loss"] for r in logs[-3:]) < 0.5
    if method["name"] == "full":
        result = runner.invoke(app, ["eval", str(run_dir)])
        assert result.exit_code == 0, result.output
        report = json.loads((run_dir / "eval.json").read_text())
        tuned = report["results"]["tuned"]
        assert report["objective"] == "kto" and tuned["rows"] == 4 and "label_accuracy" not in report["results"]["base"]
        assert tuned["desirable_reward"] > tuned["undesirable_reward"]


def test_kto_rows_in_each_shape_and_refused_ones(tmp_path):
    from finetune.data.preference.labelled import read_labelled

    rows = [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}], "label": False},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "kto_tag": True},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},  # a pair: its two answers, desirable and not
        {"prompt": "2+2?", "completion": "4", "label": "yes"},
        {"messages": [{"role": "user", "content": "2+2?"}], "label": True},
        {"instruction": "2+2?", "output": "4", "label": True},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    read, problems, total, _ = read_labelled(str(path), "train")
    assert total == 7
    assert [[(a.completion["content"], a.label) for a in row] for row in read] == [
        [("4", True)], [("5", False)], [("4", True)], [("4", True), ("5", False)]]
    assert problems[0] == f"{path}:5: `label` must be true or false (got 'yes')"
    assert problems[1].startswith(f"{path}:6: ")
    assert problems[2].startswith(f"{path}:7: a KTO row needs `prompt` and `completion`")
    with pytest.raises(UserError, match="objective kto trains on labelled answers"):
        read_labelled(str(write_jsonl(tmp_path / "chats.jsonl", [{"messages": rows[1]["messages"]}])), "train")


@pytest.mark.slow
def test_dpo_under_ddp_equals_one_process_with_the_same_global_batch(write_recipe, tiny4_model_dir, tmp_path):
    from helpers.launch import launch, max_diff, single

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    recipe = write_recipe(model={"name_or_path": str(tiny4_model_dir)}, data={"train": str(pairs)},
                          objective={"name": "dpo"}, distributed={"strategy": "ddp"},
                          train={"batch_size": 2, "max_steps": 4})
    result = launch(recipe, tmp_path / "ddp")
    assert result.exit_code == 0, result.output
    assert single(recipe, tmp_path / "one").exit_code == 0
    ddp = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    assert [r["rewards/margins"] for r in ddp] == pytest.approx([r["rewards/margins"] for r in one], abs=1e-4)
    assert max_diff(tmp_path / "ddp" / "model", tmp_path / "one" / "model") < 1e-4


def test_public_preference_shapes_ultrafeedback_hh_and_a_renamed_prompt(write_recipe, tmp_path):
    """Rows as HuggingFaceH4/ultrafeedback_binarized, Anthropic HH-RLHF and Intel/orca_dpo_pairs publish them."""
    user, good, bad = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, \
        {"role": "assistant", "content": "5"}
    ultra = {"prompt": "2+2?", "prompt_id": "x1", "chosen": [user, good], "rejected": [user, bad],
             "messages": [user, good], "score_chosen": 8.0, "score_rejected": 5.0}
    prompt, chosen, rejected, ignored = normalise_pair(ultra)
    assert (prompt, chosen, rejected) == ([user], good, bad)
    assert ignored == {"prompt_id", "score_chosen", "score_rejected"}  # listed once per file as ignored
    with pytest.raises(ValueError, match="`messages` differs from `chosen`"):
        normalise_pair({**ultra, "messages": [user, bad]})
    with pytest.raises(ValueError, match="`prompt` is not a turn of the `chosen` conversation"):
        normalise_pair({**ultra, "prompt": "3+3?"})
    with pytest.raises(ValueError, match="Anthropic HH's raw transcripts"):
        normalise_pair({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"})
    orca = write_jsonl(tmp_path / "orca.jsonl", [{"system": "", "question": r["prompt"], "chosen": r["chosen"],
                                                  "rejected": r["rejected"]} for r in pair_rows(16)])
    path = write_recipe(data={"train": None, "sources": [{"path": str(orca), "columns": {"prompt": "question"}}]},
                        objective={"name": "dpo"}, train={"max_steps": 2, "batch_size": 2})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    assert json.loads((run_dir / "run.json").read_text())["data"] == [{"source": str(orca), "rows": 16}]
    with pytest.raises(UserError, match="mixtures are SFT-only for now; give one source"):
        load_recipe(path, [f"data.sources=[{{path: {orca}}}, {{path: {orca}}}]"])
