"""`finetune export`: GGUF files of the tiny model read back (gguf-py's reader for the metadata, transformers' GGUF
loader for the weights), the trained template and end-of-turn token in them, f16 logits against the source, q8_0,
the Ollama Modelfile, and the refusals. Every conversion spawns llama.cpp's converter, so those tests are slow;
the refusals and the template translation are not."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from benchmarks.tiny import build_tokenizer
from finetune.cli import app
from finetune.export import llama_runtime
from finetune.export.gguf import converter_dir
from finetune.models.load import template_for
from finetune.paths import cache_dir

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
needs_converter = pytest.mark.skipif(
    not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
    reason=f"llama.cpp's converter not installed at {converter_dir()}; run `make install`")


def train_run(tmp_path_factory, tiny_model_dir, train_file, method: dict, name: str) -> Path:
    root = tmp_path_factory.mktemp(name)
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir), "gradient_checkpointing": False},
        "data": {"train": str(train_file), "max_length": 64, "eval_fraction": 0.25},
        "method": method,
        "train": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 4, "warmup_ratio": 0.0,
                  "output_dir": str(root / "run")},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(root / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, train_file) -> Path:
    return train_run(tmp_path_factory, tiny_model_dir, train_file, {"name": "full"}, "full")


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")
            or key.endswith("_id") or key in ("tokenizer.ggml.model", "tokenizer.ggml.pre")} | {
        "tensor_types": {t.tensor_type.name for t in reader.tensors}}


@pytest.mark.slow
@needs_converter
def test_f16_export_of_a_full_run_carries_template_and_eos_and_matches_logits(full_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny-f16.gguf"
    result = runner.invoke(app, ["export", str(full_run), "--quant", "f16", "--output", str(out), "--ollama"])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(full_run / "model")
    template = template_for(tokenizer)
    fields = gguf_fields(out)
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == (full_run / "model" / "chat_template.jinja").read_text()
    assert (fields["tokenizer.ggml.eos_token_id"] == template.end_of_turn_id
            == tokenizer.convert_tokens_to_ids("<|im_end|>"))
    generation = json.loads((full_run / "model" / "generation_config.json").read_text())
    assert template.end_of_turn_id in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                                       else [generation["eos_token_id"]])
    assert fields["tokenizer.ggml.model"] == "gpt2" and "F16" in fields["tensor_types"]
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer is plain GPT-2 byte-level BPE

    source = AutoModelForCausalLM.from_pretrained(full_run / "model", dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Count from 3"}],
                                                      add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]])
    with torch.no_grad():
        assert (source(ids).logits - exported(ids).logits).abs().max().item() < 1e-2

    report = json.loads((tmp_path / "export.json").read_text())
    check = report["check"]
    assert check["prompts"] == "held_out" and check["rows"] == 8
    assert check["agreement"] == 1.0 and check["prompt_tokens_identical"] == 8
    assert check["max_logit_diff"] < check["f16_logit_tolerance"] and not check["warnings"]
    assert report["quant"] == "f16" and not report["merged_from_adapter"]
    modelfile = (tmp_path / "Modelfile").read_text()
    assert f"FROM ./{out.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n' in modelfile


@pytest.mark.slow
@needs_converter
def test_q8_0_export_of_a_lora_run_merges_first(tmp_path_factory, tiny_model_dir, train_file):
    run = train_run(tmp_path_factory, tiny_model_dir, train_file, {"name": "lora", "r": 4}, "lora")
    result = runner.invoke(app, ["export", str(run), "--quant", "q8_0", "--max-samples", "4"])
    assert result.exit_code == 0, result.output
    out = run / "gguf-q8_0" / "run-q8_0.gguf"
    fields = gguf_fields(out)
    assert "Q8_0" in fields["tensor_types"]
    assert fields["tokenizer.ggml.eos_token_id"] == build_tokenizer().convert_tokens_to_ids("<|im_end|>")
    report = json.loads((out.parent / "export.json").read_text())
    assert report["merged_from_adapter"] and report["check"]["rows"] == 4
    assert report["check"]["agreement"] >= 0.75  # Q8_0 may part a near-tie on an untrained tiny model
    hidden = [p.name for p in (*run.iterdir(), *out.parent.iterdir()) if p.name.startswith(".")]
    assert hidden == [".finetune.lock"]  # the temporary merge and conversion are gone
    again = runner.invoke(app, ["export", str(run), "--quant", "q8_0"])
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output


@pytest.mark.slow
@needs_converter
@pytest.mark.skipif(not llama_runtime.available(),
                    reason="llama-cpp-python not installed (scripts/install.sh builds it)")
def test_q4_k_m_is_quantised_by_llama_cpp_and_run_by_it(full_run, tmp_path):
    out = tmp_path / "tiny-q4_k_m.gguf"
    result = runner.invoke(app, ["export", str(full_run), "--quant", "q4_k_m", "--output", str(out),
                                 "--max-samples", "4"])
    assert result.exit_code == 0, result.output
    fields = gguf_fields(out)
    assert fields["general.file_type"] == 15  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert fields["tokenizer.ggml.eos_token_id"] == build_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.chat_template"] == (full_run / "model" / "chat_template.jinja").read_text()
    check = json.loads((tmp_path / "export.json").read_text())["check"]
    assert check["llama_cpp"]["agreeing_rows"] <= check["rows"] == 4  # llama.cpp loaded and answered every row
    assert not list(tmp_path.glob(".*partial"))  # the intermediate f16 file is gone


def test_refusals_exit_2_with_one_message(tmp_path, monkeypatch):
    from finetune.export import llama_runtime

    monkeypatch.setattr(llama_runtime, "available", lambda: False)
    result = runner.invoke(app, ["export", str(tmp_path), "--quant", "q4_k_m"])
    assert result.exit_code == 2 and "llama-quantize" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "--quant", "q2_k"])
    assert result.exit_code == 2 and "choose one of f16, bf16, q8_0, q4_k_m" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "--format", "onnx"])
    assert result.exit_code == 2 and "GGUF only" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and f"{tmp_path / 'nothing'}: not found" in result.output


def test_unsupported_architecture_is_refused_before_converting(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from finetune.data.template import CHATML_TEMPLATE

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    result = runner.invoke(app, ["export", str(tmp_path / "gpt2")])
    assert result.exit_code == 2 and "architecture GPT2LMHeadModel is not exported" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "gpt2-gguf-q8_0").exists()


@pytest.mark.slow
@needs_converter
def test_a_tokenizer_llama_cpp_cannot_identify_is_refused(tmp_path, tiny_model_dir):
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM

    from finetune.data.template import CHATML_TEMPLATE

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()  # neither published nor plain GPT-2
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "odd")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "odd")
    result = runner.invoke(app, ["export", str(tmp_path / "odd"), "--quant", "f16"])
    assert result.exit_code == 2 and "pre-tokenizer" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "odd-gguf-f16").exists()  # made for the export, removed with its scratch directory


@pytest.mark.parametrize("family", ["qwen2.5", "llama3", "phi3"])
def test_templates_translate_to_ollama_and_render_like_jinja(family):
    from helpers.template_families import family_tokenizer

    from finetune.export.ollama import _render, modelfile, simulate, translate

    tokenizer = family_tokenizer(family)
    template = template_for(tokenizer)
    text = modelfile(tokenizer, template, []).text
    assert f'PARAMETER stop "{template.end_of_turn}"' in text
    p = translate(tokenizer, template.end_of_turn)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    assert simulate(p, conversation, None) == p.preamble + _render(tokenizer, conversation, preamble=p.preamble)
    if family == "qwen2.5":  # its default system prompt becomes SYSTEM, as a conversation without one renders it
        assert 'SYSTEM """You are Qwen, created by Alibaba Cloud. You are a helpful assistant."""' in text


@pytest.mark.parametrize("family", ["gemma", "mistral", "llama2"])
def test_templates_without_a_faithful_translation_refuse_ollama(family):
    from helpers.template_families import family_tokenizer

    from finetune.errors import UserError
    from finetune.export.ollama import modelfile

    tokenizer = family_tokenizer(family)
    with pytest.raises(UserError, match="cannot be translated into Ollama's template syntax"):
        modelfile(tokenizer, template_for(tokenizer), [])


def test_constant_system_prompt_of_the_data_becomes_ollama_system():
    from finetune.data.rows import Conversation
    from finetune.data.template import CHATML_TEMPLATE
    from finetune.export.ollama import modelfile

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    rows = [Conversation([{"role": "system", "content": "Answer in ISO 8601."}, {"role": "user", "content": str(i)},
                          {"role": "assistant", "content": "x"}], "t", i) for i in range(3)]
    made = modelfile(tokenizer, template_for(tokenizer), rows)
    assert ('SYSTEM """Answer in ISO 8601."""' in made.text
            and made.system_source.startswith("the system prompt every held-out row"))
    rows[1].messages[0]["content"] = "Something else."
    assert "SYSTEM" not in modelfile(tokenizer, template_for(tokenizer), rows).text


EMBEDDED = cache_dir() / "models" / "smollm2-135m-instruct"


@pytest.mark.slow
@needs_converter
@pytest.mark.skipif(not (EMBEDDED / "config.json").exists(),
                    reason=f"embedded SmolLM2 not cached at {EMBEDDED}; run `make model` (or `finetune pull`)")
def test_embedded_demo_run_exports_q8_0_that_answers_like_the_trained_model(demo_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = demo_run  # recipes/demo.yaml, 4 steps (conftest.embedded_demo_run)
    result = runner.invoke(app, ["export", str(run), "--quant", "q8_0", "--ollama", "--max-samples", "4",
                                 "--max-new-tokens", "16"])
    assert result.exit_code == 0, result.output
    out = run / "gguf-q8_0" / "demo-q8_0.gguf"
    fields = gguf_fields(out)
    assert fields["tokenizer.ggml.pre"] == "smollm"  # recognised by llama.cpp's own table, no fallback
    assert fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_end|>
    check = json.loads((out.parent / "export.json").read_text())["check"]
    assert check["agreement"] >= 0.75 and check["prompt_tokens_identical"] == 4
    modelfile = (out.parent / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
