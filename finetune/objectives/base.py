"""What every objective provides: its recipe section and its answers about data, methods and memory."""

from __future__ import annotations

from typing import ClassVar, Literal

from finetune.recipe.section import Section


class ObjectiveOptions(Section):
    """An objective's recipe section. Defaults: rows are conversations, one sequence each, every method works."""

    #: The data it trains on: "conversations" (finetune.data.prepare) or "preference" (finetune.data.preference).
    data_kind: ClassVar[str] = "conversations"
    #: Sequences one row puts through the model per step (the plan's activations and loss scale with it).
    sequences_per_row: ClassVar[int] = 1
    #: What train.batch_size counts, for the start summary.
    batch_unit: ClassVar[str] = "rows"

    def method_problem(self, method) -> str | None:
        """Why this objective cannot train with the method (its options), with the alternative."""
        return None

    def recipe_problems(self, recipe) -> list[str]:
        """Settings elsewhere in the recipe this objective cannot honour, each with the alternative."""
        return []

    def reference_for(self, method) -> str | None:
        """How the reference policy is obtained for the method: None when the objective needs none."""
        return None

    def planned_rollout(self, recipe):
        """What generating completions adds to the memory plan (finetune.plan.memory.Rollout); None: nothing."""
        return None

    def input_problems(self, recipe) -> list[str]:
        """What `finetune validate` finds wrong with the objective's own inputs beyond the data (none by default)."""
        return []

    def build_data(self, recipe, tokenizer, template, log):
        """The prepared training and held-out data (finetune.data.prepare.PreparedData): conversations, every
        source of the recipe's mixture, streamed when asked."""
        from finetune.data.prepare import build_datasets

        d = recipe.data
        return build_datasets(
            tokenizer, train=d.train_sources(), train_split=d.train_split, eval=d.eval, eval_split=d.eval_split,
            eval_fraction=d.eval_fraction, format=d.format, max_length=d.max_length,
            max_bad_fraction=d.max_bad_fraction, seed=recipe.train.seed, log=log, template=template, cache=d.cache,
            num_proc=d.num_proc, streaming=d.streaming, text=d.text_options(),
        )

    def build_vision_data(self, recipe, processor, log):
        """The prepared data for a vision-language model (rows with images, through its processor); an objective
        that cannot train on images says so."""
        from finetune.errors import UserError

        raise UserError(f"objective {self.name} with a vision-language model: not supported yet; objectives sft and "
                        "dpo train on image rows")

    def start_lines(self, recipe, train_rows: int) -> list[str]:
        """What the start summary says about the objective, after the run's own lines (nothing for SFT)."""
        return []


class PairedOptions(ObjectiveOptions):
    """What the preference objectives share: (prompt, chosen, rejected) rows, both answers in one batch, and the
    recipe settings none of them can honour yet."""

    data_kind: ClassVar[str] = "preference"
    sequences_per_row: ClassVar[int] = 2  # chosen and rejected go through the model in one batch

    def summary(self, method) -> str:
        """The start summary's line for the objective."""
        return f"{self.name} (beta {self.beta})"

    def build_data(self, recipe, tokenizer, template, log):
        """Pairs (or, for kto, labelled answers) from the recipe's one source, prepared and cached like SFT data."""
        from finetune.data.preference.prepare import build_pairs

        d, [source] = recipe.data, recipe.data.train_sources()  # one source: recipe_problems refuses mixtures
        return build_pairs(tokenizer, template, source.path, source.split, d.eval, d.eval_split, d.eval_fraction,
                           d.max_length, d.max_bad_fraction, recipe.train.seed, log,
                           unpaired=self.data_kind == "unpaired", cache=d.cache, columns=source.columns)

    def start_lines(self, recipe, train_rows: int) -> list[str]:
        lines = [f"[bold]{'objective':>26}[/bold]  {self.summary(recipe.method)}"]
        if self.reference_for(recipe.method) == "precomputed":
            lines.append(f"reference: computing the log-probabilities of {train_rows} training rows (one no-grad "
                         "pass)")
        return lines

    def recipe_problems(self, recipe) -> list[str]:
        problems = []
        if recipe.train.packing:
            problems.append(f"train.packing with objective {self.name}: not supported (each pair is one chosen and one "
                            "rejected sequence); turn packing off")
        problems += beyond_sft_problems(recipe, self.name, "rewards, margins, accuracies")
        problem = self.method_problem(recipe.method)
        return problems + ([problem] if problem else [])


def beyond_sft_problems(recipe, name: str, metrics: str) -> list[str]:
    """What no objective but SFT can honour yet: streaming, mixtures, SFT's token metrics, sharded strategies, and a
    LoRA adapter on the LM head (TRL's preference and RL trainers compute log-probabilities from its weight)."""
    problems = []
    if recipe.data.streaming:
        problems.append(f"data.streaming with objective {name}: not supported yet; prepare the data up front")
    sources = recipe.data.sources or []
    if len(sources) > 1 or any(s.weight is not None or s.rows is not None for s in sources):
        problems.append(f"data.sources with objective {name}: mixtures are SFT-only for now; give one source "
                        "(with its `columns`, if any) and no weight or rows")
    if recipe.train.token_metrics:
        problems.append(f"train.token_metrics is an SFT metric; {name} logs its own ({metrics})")
    if recipe.train.chunked_loss is not None:
        problems.append(f"train.chunked_loss is SFT's loss path; objective {name} computes its own: leave it unset")
    if recipe.distributed.strategy in ("fsdp", "deepspeed"):
        problems.append(f"objective {name} with distributed.strategy {recipe.distributed.strategy}: not "
                        "supported yet; use `ddp`")
    targets = getattr(recipe.method, "target_modules", "all-linear")
    if recipe.method.name == "lora" and not isinstance(targets, str) and "lm_head" in targets:
        problems.append(f"objective {name} with a LoRA adapter on `lm_head`: TRL's trainer computes "
                        "log-probabilities from the head's weight directly, so that adapter would never train; "
                        "drop lm_head from method.target_modules")
    return problems


class ReferenceOptions(PairedOptions):
    """A preference objective measured against a reference policy, the model as training starts (dpo, kto)."""

    reference: Literal["auto", "adapters_off", "precomputed"] = "auto"
    """Where the reference log-probabilities come from. `adapters_off` (LoRA): the base with the adapters disabled,
    one more no-grad forward per step. `precomputed`: one no-grad pass over the data before training (any method).
    `auto`: adapters_off for LoRA, precomputed for the methods that change the base weights. Neither keeps a second
    copy of the model."""

    def reference_for(self, method) -> str:
        """How the reference is obtained with this method: adapters_off or precomputed."""
        if self.reference != "auto":
            return self.reference
        return "adapters_off" if method.name == "lora" else "precomputed"

    def method_problem(self, method) -> str | None:
        if self.reference == "adapters_off" and method.name != "lora":
            return (f"objective.reference adapters_off needs method lora: {method.name} changes the base weights, so "
                    "disabling adapters cannot recover the reference; use `precomputed` (what `auto` picks)")
        return None

    def reference_line(self, method) -> str:
        how = {"adapters_off": "the base, adapters disabled", "precomputed": "log-probs precomputed before step 1"}
        return f"reference: {how[self.reference_for(method)]}"
