"""One model through lm-evaluation-harness: its HF backend on the model finetune loaded (adapters applied), the
batch sized by the memory plan, every seed fixed, and per-row scores kept so base and tuned can be paired."""

from __future__ import annotations

import logging
import math

#: lm-eval's bootstrap for stderrs of non-mean metrics; fewer than its default 100000 (minutes on a CPU), enough for
#: two significant digits.
BOOTSTRAP_ITERS = 1000


def planned_lm(model, tokenizer, batch_size: int | None, log):
    """lm-eval's HFLM on `model`; with no batch size given, its "auto" batch comes from the memory plan for the
    longest request (lm-eval sorts requests longest first) instead of trial forwards until one runs out of memory,
    which a CPU never reports."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notices about pre-built models drown the tables
    from finetune.plan.inference import eval_batch_size, free_memory

    class PlannedHFLM(HFLM):
        def _detect_batch_size(self, requests=None, pos: int = 0):
            if requests:
                _, context, continuation = requests[pos]
                tokens = len((context + continuation)[-(self.max_length + 1):][:-1])
            else:  # generation: the longest context it may hold
                tokens = self.max_length
            weight_bytes = next(self.model.parameters()).element_size()
            batch = eval_batch_size(self.model.config, tokens, weight_bytes, free_memory(str(self.device)),
                                    self.max_batch_size)
            log(f"benchmarks: batch {batch} (the plan's fit for {tokens} tokens in the free memory)")
            return batch

    return PlannedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or "auto", max_batch_size=64)


def evaluate_model(lm, tasks: list, manager, settings) -> dict:
    """lm-eval's results for one model: {"results", "samples", "higher_is_better", "n-samples", "configs", ...}."""
    from lm_eval import simple_evaluate

    seed = settings.seed
    return simple_evaluate(lm, tasks=[task.load for task in tasks], task_manager=manager,
                           num_fewshot=settings.num_fewshot, limit=settings.limit,
                           apply_chat_template=settings.apply_chat_template, bootstrap_iters=BOOTSTRAP_ITERS,
                           log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def scores(result: dict) -> dict[str, dict[str, dict]]:
    """task -> metric key (lm-eval's `metric,filter`) -> {value, stderr, n, higher_is_better, rows: {doc_id: score}
    when lm-eval kept a numeric score per row}."""
    found = {}
    for task, metrics in result["results"].items():
        better = result.get("higher_is_better", {}).get(task, {})
        n = (result.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not comma or metric.endswith("_stderr") or not numeric:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            found.setdefault(task, {})[key] = {
                "value": float(value), "n": n, "higher_is_better": better.get(metric, True),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
                "rows": _row_scores(result.get("samples", {}).get(task, []), metric, filter_name)}
    return found


def _row_scores(samples: list[dict], metric: str, filter_name: str) -> dict[int, float] | None:
    rows = {}
    for sample in samples:
        value = sample.get(metric)
        if sample.get("filter", filter_name) != filter_name:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None  # a corpus-level metric (BLEU, F1 over all rows): no per-row score to pair
        rows[sample["doc_id"]] = float(value)
    return rows or None
