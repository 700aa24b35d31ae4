"""Online reinforcement learning from rewards: GRPO (arXiv:2402.03300) and its loss variants, through TRL's
GRPOTrainer.

Each step samples `num_generations` completions of every prompt from the policy itself, scores them with the
recipe's reward functions (finetune.rewards), and pushes up the completions that beat their group's mean reward and
down the ones below it (the group is the baseline: no value model). `train.batch_size` counts completions, as in
TRL: one micro-batch of 8 with num_generations 8 is one prompt's group.

The reference policy the KL term needs (`beta` > 0) costs nothing with LoRA (the base with adapters disabled); the
methods that change the base weights keep a frozen copy, since completions are sampled online and no pass before
training can precompute them. `beta` 0 (the default) keeps no reference at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from finetune.objectives.base import ObjectiveOptions, beyond_sft_problems
from finetune.rewards import RewardSpec


class Options(ObjectiveOptions):
    """Learn from rewards on prompts: sample a group of completions per prompt, score them, reinforce the better."""

    name: Literal["grpo"] = "grpo"
    rewards: list[RewardSpec] = Field(min_length=1)
    """The reward functions, each `{fn: NAME, weight: w, ...its options}`: a built-in (`exact_answer`, `format`,
    `json`, `length`), `path/to/file.py:function` (relative to the recipe) or `package.module:function`, called as
    TRL calls them: `fn(prompts, completions, **row_columns)`, one float (or None: not scored) per completion. A
    completion's reward is the weighted sum."""
    num_generations: int = Field(8, ge=2)
    """Completions sampled per prompt (the group whose mean is each one's baseline). 8 is TRL's default; the GRPO
    paper (arXiv:2402.03300) samples 64, which costs 8x the generation and memory."""
    max_completion_length: int = Field(256, ge=1)
    """Tokens a completion may run to; longer ones are cut (see mask_truncated_completions). Generation time and the
    step's activations grow with it: `finetune plan` shows by how much."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. 1.0 (TRL's default) samples the policy as it is, which the importance ratios assume."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling; 1.0 (TRL's default) samples from the whole distribution."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference policy. 0 (TRL's default, after DAPO arXiv:2503.14476 and Dr. GRPO
    arXiv:2503.20783, which found it unneeded for verifiable rewards) keeps no reference; the GRPO paper used 0.04."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How token losses are averaged. `grpo`: per sequence, then over sequences (the paper's; biased toward short
    right answers and long wrong ones). `dr_grpo`: summed and divided by a constant (Dr. GRPO, arXiv:2503.20783).
    `dapo` (TRL's default): over every completion token of the accumulated batch (DAPO, arXiv:2503.14476). `bnpo`:
    over the tokens of the local micro-batch."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`token`: one importance ratio per token (GRPO). `sequence`: one per completion, the mean of its tokens'
    (GSPO, arXiv:2507.18071; pair it with loss_type grpo to reproduce the paper)."""
    epsilon: float = Field(0.2, gt=0)
    """Clipping range of the importance ratio: PPO's 0.2 (arXiv:1707.06347), TRL's default."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clipping bound when it should differ from epsilon; DAPO's clip-higher (arXiv:2503.14476) uses 0.28."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide each advantage by its group's reward std (`group`, GRPO's and TRL's default), the batch's (`batch`), or
    not at all (`none`: Dr. GRPO's advice, since the std weights easy and hard prompts unequally)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (DAPO's overlong filtering): off by default,
    as in TRL, so a policy that rambles is still penalised through its rewards."""
    steps_per_generation: int | None = Field(None, ge=1)
    """Micro-batches one generation round serves. Unset: train.gradient_accumulation_steps (TRL's default: one
    round per optimizer step). More generates for several steps at once (faster on a GPU, more memory for the
    buffered completions; the later steps train on slightly stale samples)."""
    use_vllm: bool = False
    """Generate with vLLM in the training process (TRL's colocate mode; the optional `vllm` extra, CUDA only) instead
    of transformers' `generate()`."""

    data_kind: ClassVar[str] = "prompts"
    batch_unit: ClassVar[str] = "completions"

    def reference_for(self, method) -> str | None:
        if self.beta == 0:
            return None
        return "adapters_off" if method.name == "lora" else "copy"

    def planned_rollout(self, recipe):
        from finetune.plan.memory import Rollout

        per_round = self.steps_per_generation or recipe.train.gradient_accumulation_steps
        return Rollout(sequences=recipe.train.batch_size * per_round, generations=self.num_generations,
                       prompt_len=recipe.data.max_length - self.max_completion_length,
                       completion_len=self.max_completion_length, reference=self.reference_for(recipe.method))

    def completions_per_round(self, recipe) -> int:
        """Completions one generation round samples over every process (TRL's generation batch)."""
        t = recipe.train
        return t.batch_size * recipe.distributed.world_size * (self.steps_per_generation or
                                                               t.gradient_accumulation_steps)

    def recipe_problems(self, recipe) -> list[str]:
        t, d, problems = recipe.train, recipe.data, []
        if t.packing:
            problems.append("train.packing with objective grpo: completions are generated, not packed; turn it off")
        problems += beyond_sft_problems(recipe, self.name, "rewards, KL, completion lengths")
        if t.eval_steps is not None or t.early_stopping_patience is not None or t.eval_on_start:
            problems.append("train.eval_steps, early_stopping_patience and eval_on_start with objective grpo: held-out "
                            "prompts are scored after training by `finetune eval` (rewards and answer accuracy, base "
                            "vs tuned); unset them")
        if self.max_completion_length >= d.max_length:
            problems.append(f"objective.max_completion_length ({self.max_completion_length}) must be below "
                            f"data.max_length ({d.max_length}), which bounds prompt and completion together")
        per_round = self.completions_per_round(recipe)
        if per_round % self.num_generations:
            problems.append(f"objective grpo: each generation round holds train.batch_size x processes x "
                            f"steps_per_generation = {per_round} completions, not a multiple of num_generations "
                            f"({self.num_generations}): a prompt's group must be whole. train.batch_size counts "
                            f"completions; make it {self.num_generations} (one prompt per micro-batch) or a multiple")
        return problems

    def summary(self, recipe) -> str:
        prompts = self.completions_per_round(recipe) / self.num_generations
        reference = {None: "no reference (beta 0)", "adapters_off": f"beta {self.beta}, reference: the base with "
                     "adapters disabled", "copy": f"beta {self.beta}, reference: a frozen copy of the model"}
        return (f"grpo ({self.num_generations} completions of <= {self.max_completion_length} tokens per prompt, "
                f"{prompts:g} prompts per generation round; loss {self.loss_type}, {self.importance_sampling_level} "
                f"ratios; {reference[self.reference_for(recipe.method)]})")

    def build_data(self, recipe, tokenizer, template, log):
        """The prompts of the recipe's one source, rendered, with their reward columns; the rewards are loaded and
        called on the first rows before any model loads."""
        from finetune.data.prompts import build_prompts
        from finetune.rewards import build_rewards, probe

        d, [source] = recipe.data, recipe.data.train_sources()
        data = build_prompts(tokenizer, template, source.path, source.split, d.eval, d.eval_split, d.eval_fraction,
                             d.max_length - self.max_completion_length, d.max_bad_fraction, recipe.train.seed, log,
                             columns=source.columns, completion_limit=self.max_completion_length)
        probe(build_rewards(self.rewards, Path.cwd()), data.first_rows)  # reward files: absolute (recipe.load)
        log(f"rewards receive: prompts, completions, {', '.join(data.columns) or 'no row columns'}")
        return data

    def input_problems(self, recipe) -> list[str]:
        """The reward functions imported and called on the first rows of a local source, as training will call
        them (the prompt as its text: validate loads no tokenizer to render it)."""
        from finetune.data.prompts import ORIGIN, read_prompts
        from finetune.data.sources import row_name
        from finetune.errors import UserError
        from finetune.rewards import build_rewards, probe

        try:
            rewards = build_rewards(self.rewards, Path.cwd())
            source = recipe.data.train_sources()[0]
            if not Path(source.path).expanduser().exists():
                return []  # a hub dataset: validate downloads nothing; train calls the rewards before step 1
            rows = read_prompts(source.path, source.split, source.columns)[0][:4]
            probe(rewards, [{"prompt": r.prompt[-1]["content"], ORIGIN: row_name(r.source, r.row), **r.columns}
                            for r in rows])
        except UserError as err:
            return [f"objective.rewards: {err}"]
        return []

    def start_lines(self, recipe, train_rows: int) -> list[str]:
        rewards = ", ".join(f"{spec.fn} x{spec.weight:g}" for spec in self.rewards)
        return [f"[bold]{'objective':>26}[/bold]  {self.summary(recipe)}",
                f"[bold]{'rewards':>26}[/bold]  {rewards}"]


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    """TRL's GRPOConfig: the run's common trainer arguments and this objective's."""
    from trl import GRPOConfig

    from finetune.deps import INSTALL, installed
    from finetune.errors import UserError

    if options.use_vllm and not installed("vllm"):
        raise UserError(f"objective.use_vllm: vLLM is not installed; {INSTALL['vllm']}, or unset use_vllm to generate "
                        "with transformers")
    try:
        return GRPOConfig(
            **{**common, "include_num_input_tokens_seen": "no"},  # counted by the trainer (finetune.run.rl)
            num_generations=options.num_generations, max_completion_length=options.max_completion_length,
            temperature=options.temperature, top_p=options.top_p, beta=options.beta, loss_type=options.loss_type,
            importance_sampling_level=options.importance_sampling_level, epsilon=options.epsilon,
            epsilon_high=options.epsilon_high, scale_rewards=options.scale_rewards,
            mask_truncated_completions=options.mask_truncated_completions,
            steps_per_generation=options.steps_per_generation,
            reward_weights=[spec.weight for spec in options.rewards],
            use_vllm=options.use_vllm, vllm_mode="colocate",
            log_completions=False,  # finetune keeps its own sample (completions.jsonl) and console line
        )
    except ValueError as err:  # a batch TRL cannot group (checked in the recipe for one process; here for any)
        raise UserError(f"objective grpo: {err}") from None


def build_trainer(options: Options, model, args, train, eval, tokenizer, optimizers, callbacks, template=None, **_):
    from finetune.rewards import build_rewards
    from finetune.run.rl import RewardTrainer

    rewards = build_rewards(options.rewards, Path.cwd())  # reward files are absolute (finetune.recipe.load)
    return RewardTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=train, processing_class=tokenizer,
                         optimizers=optimizers, callbacks=callbacks,
                         end_of_turn_id=template.end_of_turn_id if template is not None else None)
