"""The recipe schema (finetune.recipe.load reads, overrides and validates a file against it).

A recipe has the sections `model`, `data`, `method`, `objective`, `train`, `distributed` and `eval`; `method` (which
parameters train) and `objective` (what the loss optimises) are discriminated unions on their `name`, built from
their registries, so each validates its own options. `load_recipe` applies
`--set` overrides, validates, and raises one `UserError` that lists every problem (unknown keys with the
nearest valid key, wrong types, out-of-range values, missing paths, cross-field conflicts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from finetune.data.shards import is_glob
from finetune.data.sources import PATH_SUFFIXES, empty_file, folder_listing, unsupported_suffix
from finetune.deps import missing
from finetune.errors import UserError
from finetune.methods import METHODS
from finetune.models.registry import DEFAULT_ALIAS
from finetune.objectives import OBJECTIVES
from finetune.objectives.sft import Options as SftOptions
from finetune.recipe.distributed import DistributedSection, compatibility_problems
from finetune.recipe.evaluation import EvalSection
from finetune.recipe.section import Section
from finetune.recipe.text import text_problems

#: Joins the cross-section problems pydantic must carry as one error; `load_recipe` splits them again.
CROSS_CHECK_SEPARATOR = "\n\x1f"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(value: str) -> bool:
    """True when a string can only mean a local path (so it must exist), not a hub id or alias."""
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.lower().endswith(PATH_SUFFIXES + (".gguf",))
        or not _HUB_ID.match(value)
    )


def _check_local(value: str, what: str) -> str:
    if Path(value).expanduser().exists() or not _looks_like_path(value):
        return value
    raise ValueError(f"{what} `{value}` does not exist (relative paths are taken from the current directory)")


def _data_path(value: str) -> str:
    """A data source that names a local file, folder or glob must be readable as one (see finetune.data.shards)."""
    path = Path(value).expanduser()
    problem = unsupported_suffix(path) if path.exists() else None
    if problem:
        raise ValueError(f"data file `{value}`: {problem}")
    if path.is_dir() or is_glob(value):
        _folder_split(value, None)
        return value
    return _check_local(value, "data file")


def _folder_split(source: str | None, split: str | None) -> None:
    """A folder or glob source's files of `split` (all with None), or its refusal as a validation error."""
    try:
        folder_listing(source, split) if source else None
    except UserError as err:
        raise ValueError(str(err)) from None


class ModelSection(Section):
    """The base model and how it is loaded."""

    name_or_path: str = DEFAULT_ALIAS
    """A local model directory, a `.gguf` file, a hub id, or the alias `smollm2-135m-instruct` (the embedded
    default, which needs no hub access)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weight precision. `auto`: bf16 on GPUs that support it, else fp32 (CPUs train fastest and safest in fp32).
    `fp16` keeps fp32 weights and runs fp16 autocast, since pure fp16 weights cannot be trained stably."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """`auto`: flash-attention 2 when installed and on CUDA, else PyTorch SDPA."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: ~30% more compute for a fraction of activation memory."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off: it executes arbitrary Python."""
    train_vision_tower: bool = False
    """Vision-language models, methods full, GaLore and LISA: train the vision encoder too. Off: it stays frozen
    and the projector into the language model trains with it, LLaMA-Factory's default (a pretrained encoder sees
    images well; its gradients and optimizer states would cost memory for little gain). LoRA adapts what
    `method.target_modules` names."""

    @field_validator("name_or_path")
    @classmethod
    def _exists(cls, value: str) -> str:
        return _check_local(value, "model path")


class SourceSection(Section):
    """One training source of a mixture."""

    path: str
    """A local .jsonl/.json/.parquet/.csv/.tsv file, a .txt/.md file of raw text, a folder or glob of them, a
    dataset directory, or a hub dataset id."""
    split: str = "train"
    """Split to read when `path` is a hub dataset id or a dataset directory."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """This source's row format (see data.format); each source keeps its own, so raw text mixes with chat rows."""
    columns: dict[str, str] = {}
    """The format's field names for this file's own: `{prompt: question, completion: answer}` reads `question` as
    `prompt` and `answer` as `completion`."""
    weight: float | None = Field(None, gt=0)
    """This source's share of the training rows, relative to the other weighted sources; together they give as many
    rows as they hold, each up- or down-sampled to its share (seeded by train.seed)."""
    rows: int | None = Field(None, ge=1)
    """Exactly this many training rows from this source (repeating its rows when it has fewer)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str) -> str:
        return _data_path(value)

    @model_validator(mode="after")
    def _one_share(self):
        if self.weight is not None and self.rows is not None:
            raise ValueError("set either `weight` or `rows` for a source, not both")
        _folder_split(self.path, self.split)
        return self


class DataSection(Section):
    """Training and held-out data: local JSON/JSONL/Parquet/CSV/TSV files, raw text (.txt/.md), dataset directories
    or hub dataset ids."""

    train: str | None = None
    """A local .jsonl/.json/.parquet/.csv/.tsv file (or .txt/.md of raw text, data.format text), a folder (every
    data file in it, any of those types), a glob (`data/*.jsonl`), a `save_to_disk` directory, or a hub dataset id.
    A path that exists is always read locally. CSV/TSV files need a header naming Alpaca (instruction, output,
    optional input, system), prompt/completion or text columns."""
    sources: list[SourceSection] | None = None
    """Several training sources mixed into one run (instead of `train`), each with its own path, split, format,
    column names and share (`weight` or `rows`); the mix in rows and tokens is printed at the start."""
    train_split: str = "train"
    """Split to read when `train` is a hub dataset id, a saved DatasetDict, or a folder whose every file is named
    for a split (`train.jsonl`, `test-00000.parquet`)."""
    eval: str | None = None
    """Held-out data (same kinds of source as `train`); leave unset to split off `eval_fraction` instead."""
    eval_split: str = "test"
    """Split to read when `eval` is a hub dataset id, a saved DatasetDict or a folder of split-named files."""
    eval_fraction: float = Field(0.0, ge=0, le=0.5)
    """Fraction of training rows held out (seeded by `train.seed`; the rows are saved in the run dir)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """Row format. `auto` detects it from the keys of the first row (.txt/.md files and a lone `text` field are
    `text`: raw documents for continued pretraining, every token trained, no chat template); set it when detection
    is ambiguous (a `text` field beside `messages` is refused until it is set). Every
    field a format defines is honoured: a row-level `system`, Alpaca `input` and `history` (earlier rounds), a chat
    turn's `weight` (0: context only, 1: trained), `content` as a list of text parts, and tool calling (OpenAI
    `tools`/`tool_calls`/`role: tool`, ShareGPT `function_call`/`observation` with `tools`). Rows with images
    (content parts, `<image>` placeholders with `images`) train on a vision-language model and are refused, with
    the reason, on a text-only one, as are a speaker `name` or a `label`;
    preference data (`chosen`/`rejected`, KTO) is refused for the whole file under objective sft (the preference
    objectives read it: finetune.data.preference.pairs, finetune.data.preference.labelled). Other
    fields are listed once as ignored."""
    chat_template: str = "auto"
    """How conversations become text. `auto`: the model's own template when its tokenizer has one, else ChatML
    (base models; its `<|im_start|>`/`<|im_end|>` tokens are added). `chatml`, `model`, or a path to a `.jinja`
    file. Only what the assistant generates trains (its content or tool calls and the token ending its turn), for
    any template; the run's outputs carry the template and stop on that token."""
    fold_system: bool = False
    """For templates without a system role (Gemma, Mistral v0.2): prepend a row's system text to its first user
    turn. Off: such rows are refused, naming the template."""
    max_length: int = Field(1024, ge=16)
    """Tokens per row after the chat template; longer rows are cut at the end."""
    streaming: bool = False
    """Read, normalise and tokenise training rows as training consumes them (hub datasets and files too large to
    prepare up front): needs `train.max_steps`; held-out data comes from `data.eval`; rows are shuffled in a
    seeded 10k-row buffer and a resumed run continues where it stopped."""
    cache: bool = True
    """Keep the prepared (tokenised, masked) data on disk under a key of the data files' content, the tokenizer,
    the template and these options (in $FINETUNE_CACHE/data, default ~/.cache/finetune/data), so the next run with
    the same inputs starts in seconds and DDP ranks prepare once. Hub datasets are prepared every time."""
    num_proc: int | None = Field(None, ge=1)
    """Processes that prepare the data; unset: the cores available (small sets use one)."""
    text_column: str = "text"
    """The field holding a text row's document, for files that name it otherwise (`content`, `body`)."""
    split_on: Literal["document", "blank_line", "line"] = "document"
    """How a .txt/.md file divides into documents. `document` (a file is what a document is for most sources): each
    file is one (a folder of files, one per file). `blank_line`: each block of lines between blank lines is one (a
    dump of paragraphs or articles), named by its first line in reports. `line`: each non-blank line is one (one
    article per line, as LLaMA-Factory's wiki_demo.txt and `datasets`' text loader read it)."""
    overlap: int = Field(0, ge=0)
    """Tokens a document longer than max_length repeats from the end of one block at the start of the next, as
    context (not trained twice). 0: blocks follow each other; a block then starts without context."""
    document_bos: bool | None = None
    """Put the tokenizer's BOS token before each document. Unset: when the tokenizer adds BOS to what it encodes
    (Llama's, Mistral's), as the model saw documents in pretraining."""
    document_eos: bool = True
    """End each document with the tokenizer's EOS token, so packed documents are separated and the model learns where
    one ends (LLaMA-Factory's pt stage and TRL's text datasets do the same)."""
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    """Refuse to train when more than this fraction of rows is malformed or loses all assistant tokens to
    truncation. 1% tolerates a few broken rows in a scraped set but stops a wrong format or field name."""

    image_max_pixels: int | None = Field(None, ge=28 * 28)
    """Vision-language models: images larger than this many pixels are scaled down (aspect kept) before the
    processor sees them. Unset: the processor's own bound (Qwen2-VL's 12.8M pixels). Where a processor's image tokens
    grow with the image (Qwen2-VL: one per 28x28 pixels) this bounds memory per image; processors that resize every
    image to their own size (SmolVLM's longest edge, LLaVA's and Gemma-3's square) make their own token count."""
    image_min_pixels: int | None = Field(None, ge=1)
    """Vision-language models: images smaller than this many pixels are scaled up (aspect kept). Unset: the
    processor's own."""

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        return None if value is None else _data_path(value)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value in ("auto", "chatml", "model") or Path(value).expanduser().is_file():
            return value
        raise ValueError(f"`{value}` is not auto, chatml, model or an existing .jinja file")

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("set either `data.eval` or `data.eval_fraction`, not both")
        if (self.train is None) == (self.sources is None):
            raise ValueError("set either `data.train` (one source) or `data.sources` (a mixture), not both"
                             if self.train is not None else "set `data.train` (one source) or `data.sources`")
        if self.sources is not None and not self.sources:
            raise ValueError("`data.sources` is empty")
        if self.overlap * 2 > self.max_length:
            raise ValueError(f"`data.overlap` ({self.overlap}) must be at most half of data.max_length "
                             f"({self.max_length}), so that each block brings as many new tokens as it repeats")
        _folder_split(self.train, self.train_split)
        _folder_split(self.eval, self.eval_split)
        if self.image_max_pixels and self.image_min_pixels and self.image_min_pixels > self.image_max_pixels:
            raise ValueError(f"data.image_min_pixels {self.image_min_pixels} is above data.image_max_pixels "
                             f"{self.image_max_pixels}")
        return self

    def train_sources(self) -> list:
        """Every training source as a `finetune.data.mixture.Source` (a plain `train` is one)."""
        from finetune.data.mixture import Source

        if self.sources is None:
            return [Source(self.train, self.train_split, self.format)]
        return [Source(s.path, s.split, s.format, dict(s.columns), s.weight, s.rows) for s in self.sources]

    def text_options(self):
        """How text sources are read and cut into blocks (finetune.data.text.TextOptions)."""
        from finetune.data.text import TextOptions

        return TextOptions(self.text_column, self.split_on, self.overlap, self.document_bos, self.document_eos)

    def empty_files(self) -> list[str]:
        """`data.train`/`data.sources`/`data.eval` files that hold no row (empty or blank), each with its field."""
        named = [("data.train" if self.sources is None else "data.sources", s.path) for s in self.train_sources()]
        named += [("data.eval", self.eval)] if self.eval else []
        return [f"{field}: {why}" for field, path in named if (why := empty_file(path))]

    def require_rows(self, command: str) -> None:
        """Refuse an empty or blank data file before `command` prepares anything or claims a run dir."""
        empty = self.empty_files()
        if empty:
            raise UserError(f"{'; '.join(empty)}. `{command}` needs rows to work on: fill the file or point the recipe "
                            "at another one (nothing was written)")


class TrainSection(Section):
    """Optimisation and bookkeeping."""

    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate. 2e-5 suits full fine-tuning of a chat model; LoRA usually wants ~1e-4 to 2e-4."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of steps spent warming up; 3% (Stanford Alpaca's warmup_ratio 0.03) keeps the first updates small."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay. 0: short fine-tunes gain nothing from it."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(2, ge=1)
    """Rows per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step: effective batch = batch_size x this x devices."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 disables). 1.0 is the transformers default."""
    packing: bool = False
    """Padding-free packing: rows go best-fit into packs of up to `data.max_length` tokens (TRL's BFD), each row
    keeping its own positions and attending only to itself (flash-attention's varlen kernels; SDPA and eager get a
    block-diagonal mask per pack), so the loss is the unpacked one and no padding is computed. `batch_size` then
    counts packs. Off by default: a step's row count then varies with the rows' lengths. On by default when every
    training source is raw text (data.format text, .txt/.md files) and nothing is streamed: documents are packed
    into max_length blocks, none attending to another."""
    chunked_loss: bool | None = None
    """Compute the loss through TRL's fused LM head, in tiles of up to 4096 tokens x 32768 vocabulary entries, never
    holding the whole (tokens, vocabulary) logits; each tile is computed again in backward. Unset: on where TRL runs
    it as a Triton kernel (CUDA, XPU), off elsewhere: on a CPU its torch fallback holds several fp32 copies of a tile,
    more than the whole logits below a few thousand tokens a micro-batch. SFT only (the other objectives choose
    their own loss path); `finetune plan --fit` turns it on where it saves memory."""
    token_metrics: bool = False
    """Log TRL's per-step token metrics, `mean_token_accuracy` and `entropy` (of the next-token distribution), to
    metrics.jsonl. Off by default: they take TRL's own loss path, which computes both over the whole vocabulary for
    every token and reads them back every micro-batch, a cost plain transformers.Trainer does not have."""
    seed: int = 42
    """Seeds model init of new parameters, shuffling and the held-out split."""
    logging_steps: int = Field(5, ge=1)
    """Log loss, lr, grad_norm, tokens/s and memory every this many optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate on the held-out rows every this many steps (and always at the end when there are any)."""
    save_steps: int = Field(200, ge=1)
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int = Field(2, ge=1)
    """Keep only the newest this many checkpoints."""
    output_dir: str | None = None
    """Run directory. Default: `runs/<recipe file name>`."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = []
    """Experiment trackers that get the metrics, the run's name (its directory's) and the resolved recipe. None by
    default. Each writes into the run dir and works offline: TensorBoard events in `tensorboard/`, W&B offline
    (`wandb sync` uploads later) unless WANDB_API_KEY or WANDB_MODE says otherwise, MLflow in `mlruns/` unless
    MLFLOW_TRACKING_URI is set, trackio in `trackio/`. The tracker's package must be installed."""
    neftune_noise_alpha: float | None = Field(None, gt=0)
    """NEFTune (arXiv:2310.05914): uniform noise of scale alpha / sqrt(tokens x hidden size) on the input embeddings
    while training, which the paper finds improves instruction tuning; 5 is its usual setting. Off by default."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop once the held-out loss has not improved for this many evaluations; the final weights are then the best
    evaluation's checkpoint. Needs held-out data and `eval_steps`, with `save_steps` a multiple of it (the best
    step must have a checkpoint)."""
    eval_on_start: bool = False
    """Evaluate once before the first step: the held-out curve starts at the base model's loss."""


def _streaming_problems(data, train) -> list[str]:
    problems = []
    if train.max_steps is None:
        problems.append("`data.streaming` needs `train.max_steps`: a stream has no length to count epochs in")
    if data.eval_fraction > 0:
        problems.append("`data.streaming` takes held-out rows from `data.eval`, not `data.eval_fraction` (a fraction "
                        "of a stream is no fixed split)")
    if any(s.rows is not None for s in data.sources or []):
        problems.append("`data.streaming` mixes sources by `weight`; a fixed number of `rows` needs the whole source")
    if train.packing:
        problems.append("`data.streaming` with `train.packing` is not supported yet; turn one off")
    return problems


MethodOptions = Annotated[
    Union[tuple(module.Options for module in METHODS.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="name"),
]


ObjectiveOptions = Annotated[
    Union[tuple(module.Options for module in OBJECTIVES.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="name"),
]
#: The discriminated sections: their registries name the valid values of `<section>.name`.
REGISTRIES = {"method": METHODS, "objective": OBJECTIVES}


class Recipe(Section):
    """A fine-tuning recipe."""

    model: ModelSection = ModelSection()
    data: DataSection
    method: MethodOptions
    objective: ObjectiveOptions = SftOptions()
    train: TrainSection = TrainSection()
    distributed: DistributedSection = DistributedSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _cross_checks(self):
        # Decided here, from the recipe alone, so that `validate` reports them and `train` stops before loading.
        problems = compatibility_problems(self.method, self.distributed)
        has_eval = self.data.eval is not None or self.data.eval_fraction > 0
        if self.data.streaming:
            problems += _streaming_problems(self.data, self.train)
        problems += self.objective.recipe_problems(self)
        problems += text_problems(self)
        t = self.train
        if (t.early_stopping_patience is not None or t.eval_on_start) and not has_eval:
            problems.append("`train.early_stopping_patience` and `train.eval_on_start` need held-out data: set "
                            "`data.eval` or `data.eval_fraction`")
        if t.early_stopping_patience is not None and t.eval_steps is None:
            problems.append("`train.early_stopping_patience` needs `train.eval_steps` (how often the held-out loss "
                            "is checked)")
        elif t.early_stopping_patience is not None and t.save_steps % t.eval_steps:
            problems.append(f"`train.early_stopping_patience`: train.save_steps ({t.save_steps}) must be a multiple "
                            f"of train.eval_steps ({t.eval_steps}), so that the best evaluation has a checkpoint to "
                            "end on")
        absent = missing(t.report_to)
        if absent:
            problems.append(f"train.report_to: {', '.join(absent)} not installed; pip install {' '.join(absent)}")
        if self.eval.benchmarks is not None and missing(["lm_eval"]):
            problems.append("eval.benchmarks: lm-eval (EleutherAI's lm-evaluation-harness) is not installed; pip "
                            "install 'finetune[bench]'")
        if self.train.eval_steps is not None and not has_eval:
            problems.append("`train.eval_steps` is set but there is no held-out data: set `data.eval` or "
                            "`data.eval_fraction`")
        if problems:
            raise ValueError(CROSS_CHECK_SEPARATOR.join(problems))  # load_recipe lists each on its own
        return self

    def local_inputs(self) -> tuple[str, ...]:
        """The local paths a run reads (its base model and data), which `--overwrite` must never delete."""
        paths = (self.model.name_or_path, self.data.eval, *(s.path for s in self.data.train_sources()))
        return tuple(p for p in paths if p and Path(p).expanduser().exists())
