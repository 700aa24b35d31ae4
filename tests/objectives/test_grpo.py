"""The grpo objective on the tiny model: the loss variants against their papers' formulas, every method, exact
resume, prompt rows and their refusals, reward failures named with the row, the plan's generation round, and eval."""

import json

import pytest
import torch
import yaml
from helpers.runs import EVERY_METHOD, built_trainer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.prompts import normalise_prompt, read_prompts
from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.run.flow import run_training
from finetune.run.report import read_metrics

runner = CliRunner()

#: A user reward file, named relative to the recipe: random tiny-model completions differ in how many distinct
#: characters they hold, so every group has a spread of rewards to learn from.
REWARD_FILE = '''
def variety(prompts, completions, answer, **kwargs):
    return [len(set(c)) / 10 + (a in c) for c, a in zip(completions, answer)]


def rendered(prompts, completions, **kwargs):
    return [float(p.endswith("<|im_start|>assistant\\n")) for p in prompts]
'''


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def grpo_recipe(write_recipe, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"Count from {n}", "answer": str(n + 1)} for n in range(20)])
    (tmp_path / "rewards.py").write_text(REWARD_FILE)

    def write(method=None, objective=None, **sections):
        return write_recipe(data={"train": str(prompts), "eval_fraction": 0.2, "max_length": 48},
                            method=method or {"name": "full"},
                            objective={"name": "grpo", "num_generations": 4, "max_completion_length": 8,
                                       "rewards": [{"fn": "rewards.py:variety"}], **(objective or {})},
                            **{"train": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3,
                                         **sections.pop("train", {})}, **sections})

    return write



def by_hand(loss_type, level, logps, old, ref, advantages, mask, beta, epsilon, max_completion_length):
    """The clipped surrogate of GRPO (arXiv:2402.03300, eq. 3) with its aggregation variants: per-sequence means
    (grpo), a constant (Dr. GRPO, arXiv:2503.20783), every token of the batch (dapo, bnpo); sequence-level ratios
    (GSPO, arXiv:2507.18071); the k3 KL estimator to the reference (Schulman, "Approximating KL divergence")."""
    log_ratio = logps - old
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    a = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    if beta:  # times the ratio: the unbiased reverse-KL gradient (DeepSeek-V3.2, arXiv:2512.02556; TRL's default)
        per_token = per_token + beta * (torch.exp(ref - logps) - (ref - logps) - 1) * ratio
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum()  # dapo and bnpo: one process, one micro-batch


@pytest.mark.parametrize("loss_type,level,beta", [("grpo", "token", 0.0), ("dr_grpo", "token", 0.0),
                                                  ("dapo", "token", 0.0), ("bnpo", "token", 0.0),
                                                  ("dapo", "token", 0.04), ("grpo", "sequence", 0.0)])
def test_loss_variants_equal_their_papers_formulas_on_a_fixed_batch(grpo_recipe, loss_type, level, beta):
    path = grpo_recipe(method={"name": "lora", "r": 4, "dropout": 0.0},
                       objective={"loss_type": loss_type, "importance_sampling_level": level, "beta": beta})
    seen = {}

    def inspect(trainer):
        model = trainer.model
        assert trainer.ref_model is None and list(model.peft_config) == ["default"]  # the reference: adapters off
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)  # a policy that differs from the reference
        prompt = torch.randint(5, 100, (4, 6))
        completion = torch.randint(5, 100, (4, 5))
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
        ids = torch.cat([prompt, completion], dim=1)
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[:, -6:-1].float(), -1).gather(
                -1, completion.unsqueeze(-1)).squeeze(-1)
            with model.disable_adapter():
                ref = torch.log_softmax(model(input_ids=ids).logits[:, -6:-1].float(), -1).gather(
                    -1, completion.unsqueeze(-1)).squeeze(-1)
        old = logps + torch.linspace(-0.5, 0.5, 20).reshape(4, 5)  # ratios inside and outside the clip range
        advantages = torch.tensor([1.0, -0.5, 0.8, -1.3])
        inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
                  "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
                  "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not running
        with torch.no_grad():
            seen["loss"] = trainer._compute_loss(model, inputs)
        seen["expected"] = by_hand(loss_type, level, logps, old, ref, advantages, mask.float(), beta, 0.2, 8)

    built_trainer(path, inspect)
    torch.testing.assert_close(seen["loss"], seen["expected"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", EVERY_METHOD, ids=lambda m: m["name"])
def test_each_method_learns_from_rewards_and_keeps_a_sample_of_completions(grpo_recipe, method, tiny4_model_dir):
    model = {"name_or_path": str(tiny4_model_dir)} if method["name"] == "lisa" else {}
    path = grpo_recipe(method=method, model=model)
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2]
    for record in logs:  # TRL's metrics and finetune's time split, per step
        assert {"reward", "reward_std", "rewards/rewards.py:variety/mean", "completions/mean_length", "time/generation",
                "time/reward", "time/backward"} <= record.keys()
        assert record["time/generation"] > 0 and record["reward_std"] > 0
    sample = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in sample} == {1, 2} and len(sample) == 8  # one group of 4 per logged step
    assert {"prompt", "completion", "rewards", "advantage"} <= sample[0].keys()
    assert sample[0]["prompt"].endswith("<|im_start|>assistant\n")  # rendered with the generation prompt
    assert set(sample[0]["rewards"]) == {"rewards.py:variety"}
    info = json.loads((run_dir / "run.json").read_text())
    assert info["objective"] == "grpo" and info["status"] == "complete"
    held = [json.loads(line) for line in (run_dir / "held_out.jsonl").read_text().splitlines()]
    assert len(held) == 4 and held[0]["kind"] == "prompt" and "answer" in held[0]["columns"]
    assert (run_dir / "loss.png").stat().st_size > 0


@pytest.mark.slow  # a resumed run: seconds the edit loop's tier cannot spare
def test_resume_mid_run_samples_the_same_completions(grpo_recipe, tmp_path):
    from helpers.runs import assert_same_weights, straight_and_resumed

    straight, resumed = straight_and_resumed(grpo_recipe, tmp_path)
    one, two = ((run / "completions.jsonl").read_text().splitlines() for run in (straight, resumed))
    assert one == two and len(one) == 16
    assert_same_weights(straight / "model", resumed / "model")


@pytest.mark.parametrize("row,prompt,columns", [
    ({"prompt": "2+2?", "answer": "4"}, [{"role": "user", "content": "2+2?"}], {"answer": "4"}),
    ({"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}], "tests": [1]},
     [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}], {"tests": [1]}),
    ({"messages": [{"role": "user", "content": "2+2?"}], "solution": "4", "system": "Be exact."},
     [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}], {"solution": "4"}),
    ({"conversations": [{"from": "human", "value": "2+2?"}], "answer": 4}, [{"role": "user", "content": "2+2?"}],
     {"answer": 4}),
    ({"instruction": "Add.", "input": "2+2", "output": "4"}, [{"role": "user", "content": "Add.\n\n2+2"}],
     {"output": "4"}),
], ids=["string", "message-list", "messages", "sharegpt", "alpaca"])
def test_prompt_rows_in_each_shape_keep_their_other_columns_for_the_rewards(row, prompt, columns):
    messages, rest = normalise_prompt(row)
    assert messages == prompt and rest == columns


def test_rows_grpo_cannot_use_are_refused_with_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "ok", "answer": "1"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "look", "images": ["a.png"]},
        {"prompt": ""},
    ])
    rows, problems, total, _ = read_prompts(str(path), "train")
    assert len(rows) == 1 and total == 4
    assert problems[0].startswith(f"{path}:2: `messages` ends with an assistant turn, and GRPO generates the answer")
    assert problems[1].startswith(f"{path}:3: `images`") and "multimodal" in problems[1]
    assert problems[2].startswith(f"{path}:4: no prompt")
    with pytest.raises(UserError, match="objective grpo trains on prompts"):
        read_prompts(str(write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "a", "rejected": "b"}])), "train")


def test_recipe_refuses_what_grpo_cannot_honour_and_a_group_split_over_batches(grpo_recipe):
    path = grpo_recipe(train={"batch_size": 6, "packing": True, "eval_steps": 2},
                       objective={"max_completion_length": 64})
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.packing with objective grpo" in message
    assert "train.eval_steps, early_stopping_patience and eval_on_start with objective grpo" in message
    assert "max_completion_length (64) must be below data.max_length (48)" in message
    assert "6 completions, not a multiple of num_generations (4)" in message


def test_validate_calls_each_reward_on_the_first_rows_and_names_the_function_and_row(grpo_recipe, tmp_path):
    (tmp_path / "bad.py").write_text("def short(prompts, completions, **kwargs):\n    return [1.0]\n"
                                     "def broken(prompts, completions, **kwargs):\n    return 1 / 0\n")
    path = grpo_recipe(objective={"rewards": [{"fn": "bad.py:short"}]})
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "bad.py:short" in result.output and "prompts.jsonl:1" in result.output
    recipe = yaml.safe_load(path.read_text())
    recipe["objective"]["rewards"] = [{"fn": "missing.py:f"}, {"fn": "bad.py:broken"}]
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "missing.py" in result.output
    assert yaml.safe_load(path.read_text())["objective"]["rewards"][0]["fn"] == "missing.py:f"  # file untouched


def test_a_reward_failing_mid_run_stops_with_its_name_and_row_exit_2(grpo_recipe, tmp_path):
    (tmp_path / "late.py").write_text(
        "def late(prompts, completions, trainer_state=None, **kwargs):\n"
        "    step = trainer_state.global_step if trainer_state is not None else 0\n"
        "    return [float('nan') if step >= 1 else 0.0 for _ in completions]\n")
    path = grpo_recipe(objective={"rewards": [{"fn": "late.py:late"}]})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "late.py:late" in result.output and "prompts.jsonl:" in result.output


def test_plan_counts_the_generation_round_and_names_the_knob_that_fits(grpo_recipe):
    from finetune.plan.estimate import plan_recipe
    from finetune.plan.memory import GIB

    small = plan_recipe(load_recipe(grpo_recipe(objective={"num_generations": 4})), 80 * GIB)
    big = plan_recipe(load_recipe(grpo_recipe(objective={"num_generations": 8}, train={"batch_size": 8})), 80 * GIB)
    gen_small, gen_big = (r["estimates"]["recipe"]["generation"] for r in (small, big))
    assert gen_big == pytest.approx(2 * gen_small)  # twice the sequences in one round, twice the KV cache
    assert "reference copy" not in small["estimates"]["recipe"]
    copy = plan_recipe(load_recipe(grpo_recipe(objective={"beta": 0.04})), 80 * GIB)["estimates"]["recipe"]
    assert copy["reference copy"] == copy["weights"]  # full fine-tuning keeps a frozen copy for the KL term
    lora = plan_recipe(load_recipe(grpo_recipe(method={"name": "lora"}, objective={"beta": 0.04})), 80 * GIB)
    assert "reference copy" not in lora["estimates"]["recipe"]  # adapters off
    need = big["estimates"]["recipe"]["total"]
    tight = plan_recipe(load_recipe(grpo_recipe(objective={"num_generations": 8}, train={"batch_size": 8})),
                        need * 0.999)
    assert not tight["fits"] and tight["fix"] is not None


def test_eval_on_a_grpo_run_scores_rewards_and_answer_accuracy_base_vs_tuned(grpo_recipe, tmp_path):
    path = grpo_recipe(objective={"rewards": [{"fn": "exact_answer", "extract": "whole"},
                                              {"fn": "rewards.py:variety", "weight": 0.5},
                                              {"fn": "rewards.py:rendered", "weight": 0.0}]}, train={"max_steps": 1})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    result = runner.invoke(app, ["eval", str(run_dir), "--compare-base"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["objective"] == "grpo" and set(report["results"]) == {"base", "tuned"}
    for metrics in report["results"].values():
        assert {"reward", "reward/exact_answer", "reward/rewards.py:variety", "strict_accuracy",
                "lenient_accuracy"} <= metrics.keys()
        assert metrics["rows"] == 4 and metrics["strict_accuracy"] <= metrics["lenient_accuracy"]
        assert metrics["reward/rewards.py:rendered"] == 1.0  # the prompt as training rendered it
    assert "strict_accuracy" in (run_dir / "eval.md").read_text()
    assert "strict_accuracy" in (run_dir / "model" / "README.md").read_text()  # the model card's evaluation


@pytest.mark.slow
def test_grpo_under_ddp_equals_one_process_with_the_same_global_batch(grpo_recipe, tiny4_model_dir, tmp_path):
    """Each completion is drawn from its own seed (finetune.run.sampling), so two processes, each generating half
    of a round, sample what one process generating all of it samples, and train to the same weights."""
    from helpers.launch import launch, max_diff, single

    recipe = grpo_recipe(model={"name_or_path": str(tiny4_model_dir)}, distributed={"strategy": "ddp"},
                         objective={"num_generations": 2}, train={"batch_size": 2, "max_steps": 3})
    result = launch(recipe, tmp_path / "ddp")
    assert result.exit_code == 0, result.output
    assert single(recipe, tmp_path / "one").exit_code == 0
    ddp = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert [r["reward"] for r in ddp] == pytest.approx([r["reward"] for r in one], abs=1e-6)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert max_diff(tmp_path / "ddp" / "model", tmp_path / "one" / "model") < 1e-4


def test_steps_whose_groups_earned_equal_rewards_are_not_reported_as_a_collapse():
    """Every completion right (or every one wrong) leaves no advantage and so no gradient: not the collapse the
    divergence guard reports for a language-model loss."""
    from types import SimpleNamespace

    from finetune.run.guards import FLAT_LOGS, DivergenceGuard

    guard, args, control = DivergenceGuard(log=lambda *_: None), SimpleNamespace(learning_rate=1e-5), SimpleNamespace()
    for step in range(1, FLAT_LOGS + 1):
        guard.on_log(args, SimpleNamespace(global_step=step), control,
                     logs={"loss": 0.0, "grad_norm": 0.0, "reward": 1.0, "frac_reward_zero_std": 1.0})
    assert guard.warnings == []
    for step in range(FLAT_LOGS + 1, 2 * FLAT_LOGS + 1):
        guard.on_log(args, SimpleNamespace(global_step=step), control, logs={"loss": 2.0, "grad_norm": 0.0})
    assert len(guard.warnings) == 1 and "collapsed" in guard.warnings[0]


def test_generation_decodes_with_the_kv_cache_and_stops_at_the_end_of_turn(grpo_recipe):
    """After the prompt, each forward of generate() sees one new token (the rest is cached), and the template's end
    of turn ends a completion."""
    path = grpo_recipe(method={"name": "lora", "r": 4})
    seen = {}

    def inspect(trainer):
        widths = []
        base = trainer.model.get_base_model()
        hook = base.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
        prompt = trainer.processing_class("<|im_start|>user\nCount from 3<|im_end|>\n<|im_start|>assistant\n",
                                          add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            trainer._generate_single_turn([prompt, prompt], None, {}, 2)
        hook.remove()
        seen["widths"], seen["stops"] = widths, trainer.eos_token_ids  # where TRL cuts each completion

    built_trainer(path, inspect)
    assert seen["widths"][0] > 1 and set(seen["widths"][1:]) == {1}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(load_recipe(path).model.name_or_path)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in seen["stops"]


def test_full_fine_tuning_with_a_kl_term_keeps_a_frozen_copy_and_logs_the_kl(grpo_recipe, tmp_path):
    path = grpo_recipe(objective={"beta": 0.04}, train={"max_steps": 1})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    logged = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    seen = {}
    probe = grpo_recipe(name="probe.yaml", objective={"beta": 0.04}, train={"output_dir": str(tmp_path / "probe")})
    built_trainer(probe, lambda trainer: seen.update(reference=trainer.ref_model))
    assert seen["reference"] is not None and not any(p.requires_grad for p in seen["reference"].parameters())


def test_the_progress_line_shows_the_reward_spread_each_function_the_length_and_the_kl():
    from finetune.run.console import rl_fields

    line = rl_fields({"loss": 0.01, "reward": 0.5, "reward_std": 0.25, "rewards/exact_answer/mean": 0.4,
                      "rewards/length/mean": -0.1, "rewards/length/std": 0.3, "completions/mean_length": 12.0,
                      "kl": 0.0012})
    assert line == "  reward 0.500 ± 0.250 (exact_answer 0.40, length -0.10)  length 12  kl 0.0012"
    assert rl_fields({"loss": 1.0}) == ""  # SFT and preference runs: nothing added
