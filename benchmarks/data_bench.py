"""Data preparation at scale: wall time and peak memory of `finetune`'s preparation (first run, then the cached
second run) against a plain single-process `datasets.load_dataset("json")` + `.map(apply_chat_template)`, on
generated chat rows of about 200 tokens, with the embedded model's tokenizer.

    python -m benchmarks.data_bench --rows 100000 1000000 --out benchmarks/results/data-prep.md

Each case runs in its own process; memory is the peak proportional set size (PSS) of that process and its
workers together, sampled every 0.25 s (PSS counts pages shared by forked workers once, where RSS would count them
in every worker). Ratios compare cases of one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask work seem feel try leave call good new first last long great little own "
         "other old right big high different small large next early young important few public bad same able "
         "to of in for on with at by from up about into over after beneath under above the and a that I it not "
         "he as you this but his they her she or an will my one all would there their").split()


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            user = " ".join(rng.choices(WORDS, k=rng.randint(50, 90)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(80, 120)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def child(case: str, data: str, model: str, work: str) -> dict:
    """One case, timed from after the imports and the tokenizer load (the same for both) to prepared samples."""
    os.environ["FINETUNE_CACHE"] = work
    import datasets
    from transformers import AutoTokenizer

    from finetune.data.prepare import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    if case == "baseline":
        rows = datasets.load_dataset("json", data_files=data, split="train", cache_dir=work)

        def render(row):
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            return {"input_ids": ids}

        samples = len(rows.map(render, remove_columns=rows.column_names))
    else:
        prepared = build_datasets(tokenizer, train=data, train_split="train", eval=None, eval_split="test",
                                  eval_fraction=0.0, format="auto", max_length=1024, max_bad_fraction=0.0, seed=0,
                                  log=lambda *_: None)
        samples = len(prepared.train)
    return {"seconds": time.perf_counter() - start, "samples": samples}


def measure(case: str, data: Path, model: str, work: Path) -> dict:
    import psutil

    process = subprocess.Popen([sys.executable, __file__, "--child", case, str(data), model, str(work)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(0.25)
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{case} failed (exit {process.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_gb": peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--child", nargs=4, default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from finetune.models.gguf import ensure_embedded

    model = args.model or str(ensure_embedded("smollm2-135m-instruct"))
    lines = ["| rows | case | wall s | samples | peak PSS GB | speed vs baseline |", "|---|---|---|---|---|---|"]
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="finetune-data-bench-") as tmp:
            data = Path(tmp) / f"rows-{rows}.jsonl"
            write_rows(data, rows)
            results = {"baseline: load_dataset + map, 1 process": measure("baseline", data, model, Path(tmp) / "b")}
            results["finetune, first run"] = measure("finetune", data, model, Path(tmp) / "f")
            results["finetune, second run (cached)"] = measure("finetune", data, model, Path(tmp) / "f")
            shutil.rmtree(Path(tmp) / "b", ignore_errors=True)
            base = results["baseline: load_dataset + map, 1 process"]["seconds"]
            for case, result in results.items():
                lines.append(f"| {rows:,} | {case} | {result['seconds']:.1f} | {result['samples']:,} | "
                             f"{result['peak_gb']:.2f} | {base / result['seconds']:.2f}x |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        import datetime
        from importlib.metadata import version

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"`python -m benchmarks.data_bench --rows {' '.join(map(str, args.rows))} --out {args.out}` — "
            f"{datetime.date.today()} — CPU, {os.cpu_count()} cores; datasets {version('datasets')}, transformers "
            f"{version('transformers')}, tokenizers {version('tokenizers')}\n"
            "rows of ~200 tokens (SmolLM2's tokenizer and template); time from tokenizer loaded to samples ready\n\n"
            f"{table}\n")


if __name__ == "__main__":
    main()
