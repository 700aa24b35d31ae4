"""`finetune merge`: fold a LoRA adapter into its base and save a standalone checkpoint.

Merging happens in fp32 (adding a low-rank product to bf16 weights loses the small updates) and the result is
cast at the end. Before saving, the merged model's logits are checked against adapter-on-base on held-out rows.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from finetune.errors import UserError
from finetune.paths import check_output_dir, partial_output

#: Largest logit difference accepted between merged and adapter-on-base, both in fp32. Merging reorders the
#: same additions, so differences are rounding: ~1e-5 on small models; 1e-3 leaves room for 7B-sized sums.
LOGIT_TOLERANCE = 1e-3
CHECK_ROWS = 4


def merge_command(run_dir: Path, output: Path, dtype: str) -> str:
    return shlex.join(["finetune", "merge", str(run_dir), "--output", str(output), "--dtype", dtype])


def merge_run(run_dir: Path, output: Path, dtype: str = "fp32", log=print, command: str | None = None) -> dict:
    """Merge into `output`, written as `.OUTPUT.partial-PID` and renamed into place once complete (see
    finetune.paths.partial_output); `command` is what a partial copy left by a kill names as its replacement."""
    from finetune.eval.targets import run_base_model
    from finetune.models.weights import check_adapter_dir, check_model_dir
    from finetune.run.rundir import finished_run, weights_hash

    info = finished_run(run_dir)
    if info is None:
        raise UserError(f"{run_dir}: not a run directory (no run.json)")
    if info["artifact"] != "adapter":
        raise UserError(f"{run_dir}: a `{info['method']}` run saves a full model in {run_dir / 'model'}; only LoRA "
                        "runs have an adapter to merge. Use that directory directly.")
    command = command or merge_command(run_dir, output, dtype)
    check_output_dir(output, command)
    base_path = run_base_model(info)
    if not Path(base_path).is_dir():  # the hash below needs the weights on disk
        raise UserError(f"base model `{info.get('base_model')}` not found at {info.get('base_model_path')}; the "
                        "adapter can only be merged into the exact base it was trained on")
    adapter = run_dir / "adapter"
    check_model_dir(base_path)  # a damaged file gets its own message, not a hash mismatch
    check_adapter_dir(adapter)
    found = weights_hash(base_path)
    if info.get("base_weights_sha256") and found != info["base_weights_sha256"]:
        raise UserError(f"base model at {base_path} has weights sha256 {found[:12]}..., but the run was trained on "
                        f"{info['base_weights_sha256'][:12]}...; merging into different weights gives a broken model")

    with partial_output(output, command, log) as temporary:
        record = _merge(run_dir, temporary, info, base_path, found, dtype, log)
    log(f"saved {output}")
    return record


def _merge(run_dir: Path, output: Path, info: dict, base_path: str, found: str | None, dtype: str, log) -> dict:
    import torch

    from finetune.data.rows import read_saved_conversations
    from finetune.export.logits import max_logit_diff, probe_ids, probe_logits, vision_probes
    from finetune.models.load import load_adapter, load_model, load_tokenizer, write_generation_config
    from finetune.models.vision import is_vision_language, load_processor, load_vision_model
    from finetune.run.console import quiet_weight_bars

    quiet_weight_bars()  # loading and writing bars would bury the check's lines

    adapter, processor = run_dir / "adapter", None
    held_out = run_dir / "held_out.jsonl"
    rows = read_saved_conversations(held_out, documents=False)[:CHECK_ROWS] if held_out.exists() else []
    log(f"merging {adapter} into {base_path} (fp32)")
    if is_vision_language(base_path):  # the adapter dir holds the processor the run trained with
        processor = load_processor(str(adapter))
        tokenizer, base = processor.tokenizer, load_vision_model(base_path, torch.float32, "eager")
        probes = vision_probes(processor, rows)
    else:
        tokenizer, _ = load_tokenizer(str(adapter))
        base = load_model(base_path, torch.float32, "eager", vocab_size=len(tokenizer))
        probes = probe_ids(tokenizer, rows, tokenizer("Hello, world")["input_ids"])
    model = load_adapter(base, adapter).eval()
    before = list(probe_logits(model, probes))  # the adapter on its base, before merging changes the model
    with torch.no_grad():
        merged = model.merge_and_unload()
    max_diff = max_logit_diff(before, probe_logits(merged, probes))
    log(f"max |logit difference| merged vs adapter-on-base on {len(probes)} row(s): {max_diff:.2e}")
    if max_diff > LOGIT_TOLERANCE:
        raise UserError(f"merged logits differ from adapter-on-base by {max_diff:.2e} (> {LOGIT_TOLERANCE}); "
                        "not saving a model that behaves differently from the adapter")

    target_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    merged = merged.to(target_dtype)
    merged.config.use_cache = True
    merged.save_pretrained(output)
    (processor or tokenizer).save_pretrained(output)  # with the template the adapter was trained with
    from finetune.run.card import write_model_card

    write_model_card(run_dir, output, merged=True)
    write_generation_config(output, tokenizer, base_path)  # stops on the trained end-of-turn token
    record = {
        "base_model": info["base_model"],
        "base_model_path": base_path,
        "base_weights_sha256": found,
        "adapter": str(adapter.resolve()),
        "adapter_sha256": hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest(),
        "dtype": dtype,
        "max_logit_diff": max_diff,
        "check_rows": len(probes),
    }
    (output / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
