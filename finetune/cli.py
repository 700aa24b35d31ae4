"""The `finetune` command line. Each command parses its arguments and calls one function; a UserError becomes
a readable message and exit code 2 (pass --debug for the traceback)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from finetune.errors import RunStopped, UserError
from finetune.models.registry import DEFAULT_ALIAS

# bitsandbytes logs on import that an optional CPU kernel for 4-bit matmuls (from the `kernels` package) is
# missing, and peft imports bitsandbytes whenever it is installed: so every command printed it, even before a
# one-line error. finetune never runs 4-bit matmuls on a CPU (QLoRA needs CUDA), so exactly that message is
# dropped; every other bitsandbytes message still shows.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward"))

app = typer.Typer(
    help="Fine-tune causal language models from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
errors = Console(stderr=True)

Debug = Annotated[bool, typer.Option("--debug", help="Show the Python traceback of errors.")]
Fit = Annotated[str | None, typer.Option(
    help="Choose the settings that fit this memory (the GPU's; on a CPU the process's), e.g. 24GiB, and train "
         "fastest.")]
Allow = Annotated[str | None, typer.Option(
    help="With --fit: knobs it may turn besides batch and checkpointing (which leave the maths unchanged), "
         "comma-separated: packing, 8bit, layerwise, method, seq; or all.")]
Probe = Annotated[int, typer.Option(
    min=0, help="With --fit: run N steps of the choice in a child process; above the budget, try the next one.")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: dotted.key=value (YAML value). Repeatable."),
]


def user_errors(command):
    """Turn UserError into a message on stderr and exit 2 (130 for an interrupted run); --debug re-raises for the
    traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as err:
            if kwargs.get("debug"):
                raise
            if os.environ.get("LOCAL_RANK", "0") != "0":  # every process of a launch meets the same input error:
                raise typer.Exit(getattr(err, "exit_code", 2)) from None  # one message per machine is enough
            label = "stopped" if isinstance(err, RunStopped) else "error"
            errors.print(f"[bold red]{label}:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(err, "exit_code", 2)) from None
        except KeyboardInterrupt:
            if kwargs.get("debug"):
                raise
            errors.print("[bold red]interrupted[/bold red]", highlight=False)
            raise typer.Exit(130) from None  # the shell's convention for a process ended by Ctrl-C

    return wrapper


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Keep warnings for ours; library chatter hides the summary. Through the environment, which transformers reads
    # when imported, so that a command does not import it (most of a second) before it needs it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside the libraries themselves


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    set_: Sets = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run directory (overrides train.output_dir).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's last checkpoint.")] = False,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="Processes (GPUs) per machine: distributed.num_processes.")] = None,
    num_machines: Annotated[int | None, typer.Option(min=1, help="Machines: distributed.num_machines.")] = None,
    machine_rank: Annotated[
        int | None, typer.Option(min=0, help="This machine's index: distributed.machine_rank.")] = None,
    main_process_ip: Annotated[
        str | None, typer.Option(help="Address of machine 0: distributed.main_process_ip.")] = None,
    main_process_port: Annotated[
        int | None, typer.Option(help="Port on machine 0: distributed.main_process_port.")] = None,
    fit: Fit = None,
    allow: Allow = None,
    probe: Probe = 0,
    debug: Debug = False,
):
    """Train a model from a recipe; with a `distributed` strategy, launch its processes through accelerate. With
    --fit: first choose the settings that fit the memory budget and train fastest (as `finetune plan --fit`)."""
    from finetune.recipe.load import load_recipe

    if debug:  # the libraries' own progress bars too (finetune.run.console); launched processes inherit it
        os.environ["FINETUNE_DEBUG"] = "1"
    # Launch flags are recipe overrides, so the resolved recipe in the run dir records them.
    flags = {"num_processes": nproc, "num_machines": num_machines, "machine_rank": machine_rank,
             "main_process_ip": main_process_ip, "main_process_port": main_process_port}
    overrides = [*(set_ or []), *(f"distributed.{k}={v}" for k, v in flags.items() if v is not None)]
    if (allow or probe) and fit is None:
        raise UserError("--allow and --probe go with --fit BUDGET (e.g. --fit 24GiB)")
    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from finetune.run.flow import run_training

    record = None
    if fit is not None:
        loaded, overrides, record = _fit_training(loaded, recipe, overrides, fit, allow, probe, output, resume)
    if loaded.eval.benchmarks is not None:  # refused now, not after the training they would follow
        from finetune.eval.bench.run import checked_tasks

        checked_tasks(loaded.eval.benchmarks)
    run_dir = run_training(loaded, recipe, output=output, overwrite=overwrite, resume=resume, log=console.print,
                           overrides=overrides, fit=record)
    if record is not None and loaded.distributed.strategy == "none":
        _record_fit_peak(run_dir, record)
    if loaded.eval.benchmarks is not None and _writes_run_dir(loaded):
        _run_benchmarks(run_dir, loaded.eval.benchmarks)


def _writes_run_dir(recipe) -> bool:
    """This process is the one that writes the run dir: machine 0's, and rank 0 under a user's own launcher."""
    from finetune.run.distributed import world_rank

    return world_rank()[0] == 0 and recipe.distributed.machine_rank == 0


def _record_fit_peak(run_dir: Path, record: dict) -> None:
    """The proof: this process's peak against the budget, in run.json beside the choice."""
    from finetune.plan.memory import GIB
    from finetune.plan.probe import process_peak_bytes
    from finetune.run.rundir import write_run_info

    peak = process_peak_bytes()
    if peak is None:
        return
    write_run_info(run_dir, fit={**record, "measured_peak_gib": peak / GIB})
    within = "within" if peak <= record["budget_gib"] * GIB else "[red]above[/red]"
    console.print(f"fit: this run's peak {peak / GIB:.2f} GiB, {within} the --fit budget of "
                  f"{record['budget_gib']:.2f} GiB")


def _fit_training(loaded, recipe: Path, overrides: list[str], budget: str, allow, probe: int, output, resume: bool):
    """`train --fit`: the fit's choice as recipe overrides (so the resolved recipe and the resume command carry it);
    a resumed run takes the choice recorded in its run.json instead of choosing again."""
    from finetune.plan.choose import device_kind, fit_for_run
    from finetune.plan.estimate import parse_memory
    from finetune.plan.fit import Candidate
    from finetune.plan.probe import keep_heap_small
    from finetune.plan.view import fit_table
    from finetune.recipe.load import load_recipe
    from finetune.run.flow import run_dir_for
    from finetune.run.rundir import is_run_dir, read_run_info

    run_dir = run_dir_for(loaded, recipe, output)
    if resume and is_run_dir(run_dir) and read_run_info(run_dir).get("fit"):
        record = read_run_info(run_dir)["fit"]
        chosen = Candidate(record["chosen"]["changes"])
        console.print(f"fit: resuming with the settings --fit chose when the run started: {chosen.label()}")
    else:
        fitted = fit_for_run(loaded, recipe, overrides, parse_memory(budget, "--fit"), allow, probe, console.print)
        console.print(fit_table(fitted, limit=6))
        chosen, record = fitted.chosen, fitted.record()
    console.print(f"[bold]fit:[/bold] training with {chosen.label()}")
    if device_kind() == "cpu":
        keep_heap_small()  # on a CPU the budget is the process's memory: freed tensors go back to the system
    overrides = [*overrides, *chosen.overrides()]
    return load_recipe(recipe, overrides), overrides, record


@app.command()
@user_errors
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.")],
    set_: Sets = None,
    debug: Debug = False,
):
    """Check recipes and read their local data files, loading no model or tokenizer (hub datasets are not
    downloaded): every problem of every file, exit 2 if any."""
    from finetune.data.check import check_data
    from finetune.models.vision import is_vision_language, vision_recipe_problems
    from finetune.recipe.load import load_recipe

    problems = []
    for path in recipes:
        try:
            loaded = load_recipe(path, set_ or [])
        except UserError as err:
            problems.append(str(err))
            continue
        report = []  # format, row count, ignored and refused fields of each data file, under the recipe's line
        model = Path(loaded.model.name_or_path).expanduser()
        media = model.is_dir() and is_vision_language(str(model))  # a local VLM's config says so, nothing loads
        data_problems = vision_recipe_problems(loaded) if media else []
        data_problems += check_data(loaded.data, report.append, loaded.objective.data_kind, media)
        data_problems += loaded.objective.input_problems(loaded)
        console.print(f"[red]data problems[/red] {path}" if data_problems else f"[green]ok[/green] {path}")
        for line in report:
            console.print(line, highlight=False, soft_wrap=True, emoji=False)
        problems += [f"{path}: {problem}" for problem in data_problems]
    if problems:
        raise UserError("\n".join(problems))


@app.command("data")
@user_errors
def data_(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    show: Annotated[int, typer.Option(min=0, help="Print this many training samples, trained tokens highlighted.")] = 0,
    dump: Annotated[Path | None, typer.Option(help="Write each training sample (input_ids, labels) as JSONL.")] = None,
    set_: Sets = None,
    debug: Debug = False,
):
    """Prepare the recipe's data exactly as `train` does (tokenizer only, no model weights) and report rows read,
    kept and refused (with reasons), tokens per sample, truncation, the share of tokens trained and the chat
    template with its end-of-turn token."""
    from finetune.recipe.load import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    from finetune.models.load import check_sources

    _quiet_libraries()
    check_sources(loaded)
    from finetune.data.inspect import inspect_data

    if dump is not None and (dump.is_dir() or not dump.parent.is_dir()):
        raise UserError(f"--dump {dump}: " + ("is a directory; name a .jsonl file" if dump.is_dir() else
                                              f"its directory {dump.parent} does not exist"))
    inspect_data(loaded, show=show, dump=dump, console=console)


@app.command()
@user_errors
def plan(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    gpu_memory: Annotated[str, typer.Option(help="Memory of one GPU, e.g. 24GiB or 80GB.")] = "24GiB",
    seq_len: Annotated[int | None, typer.Option(min=1, help="Tokens per row (default: data.max_length).")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Rows per micro-batch (default: train.batch_size).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every component of every method as JSON.")] = False,
    fit: Fit = None,
    allow: Allow = None,
    probe: Probe = 0,
    apply: Annotated[Path | None, typer.Option(
        help="With --fit: write the recipe with the chosen settings here, each changed line commented.")] = None,
    set_: Sets = None,
    debug: Debug = False,
):
    """Predict peak GPU memory per component for the recipe and the other methods; say if it fits. With --fit:
    choose the settings that fit the budget and train fastest."""
    import json

    from finetune.plan.estimate import parse_memory, plan_recipe
    from finetune.plan.memory import GIB
    from finetune.plan.view import LEGEND, plan_json, plan_table
    from finetune.recipe.load import load_recipe

    if (allow or probe or apply) and fit is None:
        raise UserError("--allow, --probe and --apply go with --fit BUDGET (e.g. --fit 24GiB)")
    loaded = load_recipe(recipe, set_ or [])
    _quiet_libraries()
    if fit is not None:
        _plan_fit(loaded, recipe, set_ or [], parse_memory(fit, "--fit"), allow, probe, apply, as_json)
        return
    result = plan_recipe(loaded, parse_memory(gpu_memory), seq_len, batch)
    if as_json:
        print(json.dumps(plan_json(result, loaded.method.name), indent=2))
        return
    setup = result["setup"]
    pairs = f" pairs (x{setup.sequences} sequences: {loaded.objective.name})" if setup.sequences > 1 else ""
    if setup.rollout is not None:
        r = setup.rollout
        pairs = (f" completions; grpo generates {r.sequences} at once, each <= {r.prompt_len} prompt + "
                 f"{r.completion_len} completion tokens")
    title = (f"peak memory per GPU, {result['parameters'] / 1e9:.2f}B parameters, seq {setup.seq_len} x batch "
             f"{setup.batch}{pairs}, {setup.weight_bytes * 8}-bit weights, checkpointing "
             f"{'on' if setup.checkpointing else 'off'}" + (
                 f", {setup.processes} GPUs ({loaded.distributed.strategy}; methods it refuses are planned as DDP)"
                 if setup.processes > 1 else ""))
    console.print(plan_table(result, loaded.method.name, title))
    console.print(f"[dim]{LEGEND} `--json`: every component.[/dim]")
    total = result["estimates"]["recipe"]["total"] / GIB
    if result["fits"]:
        console.print(f"[green]fits:[/green] {total:.1f} GiB of {result['budget'] / GIB:.1f} GiB")
    else:
        advice = result["fix"] or "nothing short of more GPUs (see the distributed section) makes it fit"
        console.print(f"[red]does not fit:[/red] {total:.1f} GiB > {result['budget'] / GIB:.1f} GiB; cheapest change: "
                      f"{advice}")


def _plan_fit(loaded, recipe: Path, sets: list[str], budget: float, allow, probe: int, apply: Path | None,
              as_json: bool) -> None:
    import json

    from finetune.plan.choose import fit_for_run, write_applied
    from finetune.plan.view import fit_table

    fitted = fit_for_run(loaded, recipe, sets, budget, allow, probe, log=console.print if not as_json else _silent)
    if apply is not None:
        write_applied(fitted, recipe, apply)
    if as_json:
        print(json.dumps(fitted.record(), indent=2))
        return
    console.print(fit_table(fitted))
    console.print(f"[dim]{fitted.throughput.describe()}; {len(fitted.candidates)} candidates, `--json`: all[/dim]")
    chosen = fitted.chosen
    console.print(f"[green]chosen:[/green] {chosen.label()}" + (
        f"; as --set: {' '.join(chosen.overrides())}" if chosen.changes else ""))
    if apply is not None:
        console.print(f"wrote {apply}: train it with `finetune train {apply}`")


def _silent(*args, **kwargs) -> None:
    pass


@app.command("eval")
@user_errors
def eval_(
    target: Annotated[str, typer.Argument(help="A run directory, a model directory, or a model alias.")],
    recipe: Annotated[Path | None, typer.Option(
        help="Take the held-out rows (or, with --benchmarks, eval.benchmarks) from this recipe.")] = None,
    data: Annotated[Path | None, typer.Option(help="Evaluate on this data file.")] = None,
    compare_base: Annotated[bool, typer.Option(help="Also evaluate the run's base model on the same rows.")] = False,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Use at most this many rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit.")] = 64,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Rows per forward pass (default 8; benchmarks: the largest the memory plan fits).")] = None,
    output: Annotated[Path | None, typer.Option(help="Where eval.json/eval.md go (default: the run dir).")] = None,
    benchmarks: Annotated[bool, typer.Option(
        "--benchmarks", help="Score general benchmarks base vs tuned instead: the recipe's eval.benchmarks.")] = False,
    tasks: Annotated[str | None, typer.Option(
        help="Benchmark tasks, comma-separated: lm-eval task names, .jsonl files of rows, task .yaml files "
             "(implies --benchmarks).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Benchmarks: the first N rows of each task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="Benchmarks: solved examples per prompt.")] = None,
    max_regression: Annotated[float | None, typer.Option(
        min=0, max=1, help="Benchmarks: exit 1 when a 0-1 score drops from base to tuned by more than this.")] = None,
    debug: Debug = False,
):
    """Held-out loss, perplexity and generation match scores for a run or a model; with --benchmarks or --tasks,
    general benchmarks (lm-evaluation-harness) on the run's base and tuned model, and the regression gate."""
    task_flags = {"--data": data, "--compare-base": compare_base, "--max-samples": max_samples}
    bench_flags = {"--limit": limit, "--num-fewshot": num_fewshot, "--max-regression": max_regression}
    if benchmarks or tasks:  # benchmarks always compare base and tuned on their own rows
        mixed = [flag for flag, value in task_flags.items() if value not in (None, False)]
    else:
        mixed = [flag for flag, value in bench_flags.items() if value is not None]
    if mixed:
        raise UserError(f"{', '.join(mixed)}: " + ("these score the run's task; --benchmarks/--tasks score general "
                                                   "benchmarks: run them as two commands" if benchmarks or tasks
                                                   else "benchmark options: they go with --tasks or --benchmarks"))
    _quiet_libraries()
    if benchmarks or tasks:
        _eval_benchmarks(target, recipe, tasks, output, limit=limit, num_fewshot=num_fewshot,
                         max_regression=max_regression, batch_size=batch_size)
        return
    from finetune.eval.run import run_eval

    run_eval(target, recipe=recipe, data=data, compare_base=compare_base, max_samples=max_samples,
             max_new_tokens=max_new_tokens, batch_size=batch_size or 8, output=output, log=console.print)


def _eval_benchmarks(target: str, recipe: Path | None, tasks: str | None, output: Path | None, **flags) -> None:
    from finetune.eval.bench.run import benchmark_settings

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    _run_benchmarks(target, benchmark_settings(target, recipe, names, **flags), output)


def _run_benchmarks(target: str, settings, output: Path | None = None) -> None:
    """Benchmarks base vs tuned; a failed gate is a finding about the model: its message and exit 1."""
    from finetune.eval.bench.run import Regression, run_benchmarks

    try:
        run_benchmarks(str(target), settings, output, log=console.print)
    except Regression as found:
        errors.print(f"[bold red]regression:[/bold red] {escape(str(found))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
@user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A LoRA run directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged checkpoint.")],
    dtype: Annotated[str, typer.Option(help="Saved precision: bf16, fp16 or fp32 (merging is always fp32).")] = "bf16",
    debug: Debug = False,
):
    """Merge a LoRA run's adapter into its base model and save a standalone checkpoint."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    from finetune.models.inputs import RUN_DIR, expect

    expect(run_dir, (RUN_DIR,), "`finetune merge`", "a LoRA run directory (run.json)")
    _quiet_libraries()
    from finetune.export.merge import merge_run

    merge_run(run_dir, output, dtype, log=console.print)


@app.command()
@user_errors
def export(
    target: Annotated[
        str, typer.Argument(help="A finished run directory (LoRA runs are merged first) or a model directory.")],
    format_: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    quant: Annotated[str, typer.Option(help="f16, bf16, q8_0 (q4_k_m needs llama.cpp's quantiser: refused).")] = "q8_0",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="The .gguf file (default: RUN/gguf-QUANT/NAME-QUANT.gguf).")] = None,
    ollama: Annotated[bool, typer.Option("--ollama", help="Also write an Ollama Modelfile next to the file.")] = False,
    max_samples: Annotated[int, typer.Option(min=1, help="Held-out rows the check answers.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length limit of the check.")] = 32,
    debug: Debug = False,
):
    """Export a run or model to GGUF (llama.cpp, Ollama, LM Studio) with the trained chat template and stop token,
    then check the file's greedy answers against the trained model's (written to export.json)."""
    from finetune.export.gguf import check_request

    check_request(format_, quant)  # before any library loads: a refused type answers at once
    _quiet_libraries()
    from finetune.export.gguf import export as run_export

    run_export(target, format_, quant, output, ollama, max_samples, max_new_tokens, log=console.print)


@app.command()
@user_errors
def pull(
    alias: Annotated[str, typer.Argument(help="An embedded model alias.")] = DEFAULT_ALIAS,
    debug: Debug = False,
):
    """Fetch and convert an embedded model into the cache now (training does this on first use)."""
    from finetune.models.gguf import ensure_embedded
    from finetune.models.registry import EMBEDDED

    if alias not in EMBEDDED:
        raise UserError(f"unknown alias `{alias}`; embedded models: {', '.join(EMBEDDED)}")
    _quiet_libraries()
    console.print(f"{alias}: {ensure_embedded(alias, log=console.print)}")


@app.command("import-gguf")
@user_errors
def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf file transformers can read.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the trainable checkpoint.")],
    debug: Debug = False,
):
    """Convert a GGUF file into a trainable safetensors checkpoint with its tokenizer and chat template."""
    from finetune.models import inputs

    wanted = ("`finetune import-gguf`", "a GGUF file (recognised by its content, whatever its name)")
    gguf_file = inputs.gguf_file(inputs.expect(gguf_file, (inputs.GGUF, inputs.GGUF_DIR), *wanted), *wanted)
    _quiet_libraries()
    from finetune.models.gguf import import_gguf as convert

    convert(gguf_file, output, log=console.print)


@app.command()
@user_errors
def chat(
    target: Annotated[str, typer.Argument(help="A run directory, model directory or alias.")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    image: Annotated[Path | None, typer.Option(help="An image shown with your first message (vision-language "
                                                    "models).")] = None,
    debug: Debug = False,
):
    """Talk to a model or run in the terminal (its chat template, streaming, greedy). Empty line or Ctrl-D quits."""
    _quiet_libraries()
    from finetune.eval.chat import chat_loop

    chat_loop(target, max_new_tokens, system, image=image)


if __name__ == "__main__":
    app()
