"""The trainer of objective grpo: TRL's GRPOTrainer with finetune's fixes (finetune.run.trainer.TrainerFixes), the
run's chat template for prompts and stopping, a sample of completions kept in the run dir, and each step's time split
into generation, rewards and the rest.

Written against TRL 1.16 (constraints.txt pins it); the private methods overridden are listed in OVERRIDDEN_GRPO
and tests/run/test_trainer.py checks that each still exists.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from trl import GRPOTrainer

from finetune.run.sampling import row_seeds
from finetune.run.trainer import TrainerFixes, drop_reference_adapter

#: TRL's GRPOTrainer methods overridden below.
OVERRIDDEN_GRPO = ("_tokenize_prompts", "_generate_single_turn", "_calculate_rewards", "training_step", "compute_loss",
                   "log")
#: Completions kept per logging step: one prompt's whole group shows what the advantages compared.
SAMPLE = 8
COMPLETIONS = "completions.jsonl"


class RewardTrainer(TrainerFixes, GRPOTrainer):
    """GRPOTrainer on prompts rendered by finetune (finetune.data.prompts)."""

    def __init__(self, *args, end_of_turn_id: int | None = None, **kwargs):
        model = kwargs["model"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        stops = base.generation_config.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        if end_of_turn_id is not None and end_of_turn_id not in stops:
            # TRL ends a completion at the model's eos ids; the run's template ends a turn with its own token
            # (ChatML's <|im_end|> on a base model whose eos is </s>), which the tuned model will stop on.
            base.generation_config.eos_token_id = [end_of_turn_id, *stops]
        self._seconds = {"generation": 0.0, "reward": 0.0}
        self._step_started = None
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self)
        if self.ref_model is not None:  # the KL term's frozen copy (full, GaLore, LISA with beta > 0): never trained
            self.ref_model.requires_grad_(False)
        self.completions_path = Path(self.args.output_dir).parent / COMPLETIONS

    def _tokenize_prompts(self, prompts: list):
        # The prompts arrive rendered with the run's template and its generation prompt (finetune.data.prompts):
        # tokenised as text, with no second BOS (TRL's own call adds the tokenizer's special tokens).
        ids = self.processing_class(text=prompts, add_special_tokens=False)["input_ids"]
        return ids, None, {}

    @contextmanager
    def _timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[part] += time.perf_counter() - started

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        with self._timed("generation"):
            if self.use_vllm or self.use_transformers_continuous_batching:  # their own samplers
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)
            first = self.accelerator.process_index * len(prompt_ids)  # the round's rows, every process's in order
            seeds = row_seeds(self.args.seed, self.state.global_step, first, len(prompt_ids), self.accelerator.device)
            with self._seeded_sampling(seeds):
                return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    @contextmanager
    def _seeded_sampling(self, seeds):
        """TRL's generate call, greedy over finetune.run.sampling's seeded Gumbel noise: each completion a sample
        that depends only on its seed (so DDP ranks and a resumed run draw what one process would have)."""
        from functools import partial

        from transformers import GenerationConfig, LogitsProcessorList

        from finetune.run.sampling import SeededSampler

        # The KV cache on (the model's config turns it off for training, finetune.models.load): each new token
        # attends to the cached keys and values instead of running the whole sequence again.
        greedy = {**self.generation_kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
                  "min_p": None, "use_cache": True}
        saved = self.generation_config, self.generation_kwargs
        self.generation_config, self.generation_kwargs = GenerationConfig(**greedy, disable_compile=True), greedy
        model = self.accelerator.unwrap_model(self.model_wrapped)  # what TRL's generation context yields
        sampler = SeededSampler(seeds, self.temperature, self.top_p)
        model.generate = partial(model.generate, logits_processor=LogitsProcessorList([sampler]))
        try:
            yield
        finally:
            del model.generate  # the instance attribute: the class's generate again
            self.generation_config, self.generation_kwargs = saved

    def _calculate_rewards(self, *args, **kwargs):
        with self._timed("reward"):
            return super()._calculate_rewards(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch):
        # Each optimizer step's seconds, split: generation, rewards, and the rest (the old and reference policies'
        # forwards, the loss's forward and backward), logged as time/* beside TRL's metrics.
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:
            total = time.perf_counter() - self._step_started
            metrics = self._metrics["train"]
            metrics["time/generation"].append(self._seconds["generation"])
            metrics["time/reward"].append(self._seconds["reward"])
            metrics["time/backward"].append(total - self._seconds["generation"] - self._seconds["reward"])
            self._seconds = {"generation": 0.0, "reward": 0.0}
            self._step_started = None
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:  # the tokens trained on, for tokens/s (transformers counts `input_ids`, absent here)
            self.state.num_input_tokens_seen += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self.accelerator.is_main_process and self._logs["prompt"]:
            self._keep_sample()
        super().log(logs, start_time)

    def _keep_sample(self) -> None:
        """The last generation round's first group (one prompt's completions) with their rewards and advantages,
        appended to completions.jsonl; what a user reads to see what the rewards reward."""
        prompts, completions = list(self._logs["prompt"]), list(self._logs["completion"])
        rewards = {name: list(values) for name, values in self._logs["rewards"].items()}
        advantages = list(self._logs["advantages"])
        lines = []
        for i in range(min(SAMPLE, len(completions))):
            lines.append(json.dumps({
                "step": self.state.global_step, "prompt": prompts[i], "completion": completions[i],
                "rewards": {name: None if math.isnan(values[i]) else values[i] for name, values in rewards.items()},
                "advantage": advantages[i],
            }, default=str) + "\n")
        with self.completions_path.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
        self._logs["prompt"].clear()  # each round is sampled once, however often the trainer logs
