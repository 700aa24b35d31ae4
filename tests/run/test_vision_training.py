"""Vision-language training end to end on tiny random Qwen2-VL, Qwen2.5-VL, Idefics3 (SmolVLM), LLaVA, LLaVA-NeXT
and Gemma-3 models with their real processors: LoRA, full, GaLore and LISA steps (the language model trains, the
vision tower stays as it was), DPO steps, and the run's outputs (adapter with the processor, merge with equal
logits, eval with exact match, chat with an image)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from benchmarks.tiny_vlm import (
    tiny_gemma3,
    tiny_idefics3,
    tiny_llava,
    tiny_llava_next,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)
from finetune.cli import app
from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training

#: Loading a model family's modules and training takes seconds that the edit loop's tier cannot spare.
pytestmark = pytest.mark.slow

COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
#: Sizes that differ in shape, so a batch holds images of different tile counts and patch grids.
SIZES = {"red": (56, 56), "green": (84, 42), "blue": (42, 98)}
FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "idefics3": tiny_idefics3, "llava": tiny_llava,
            "llava_next": tiny_llava_next, "gemma3": tiny_gemma3}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name, rgb in COLORS.items():
        Image.new("RGB", SIZES[name], rgb).save(folder / f"{name}.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"{name}.png"},
                                                       {"type": "text", "text": "What color?"}]},
                          {"role": "assistant", "content": name}]} for name in COLORS for _ in range(4)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]})
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # a text row among image rows
    pairs = [{"prompt": [{"role": "user", "content": "<image>What color?"}], "images": [f"{name}.png"],
              "chosen": name, "rejected": "purple"} for name in COLORS for _ in range(2)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """family -> (model dir, processor). All but Idefics3's processor are handed to the run in memory: transformers'
    loader insists on their fast image (or video) processors, which need torchvision (no CPU build for this torch)."""
    built = {}
    for family, build in FAMILIES.items():
        model, processor = build()
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        if family == "idefics3":
            processor.save_pretrained(path)
        built[family] = (path, processor)
    return built


def train(tmp_path, models, images, family, method, rows="sft.jsonl", steps=3, **sections):
    path, processor = models[family]
    recipe = {"model": {"name_or_path": str(path), "gradient_checkpointing": False},
              "data": {"train": str(images / rows), "max_length": 512, "eval_fraction": 0.1},
              "method": method,
              "train": {"learning_rate": 1e-2, "max_steps": steps, "batch_size": 2, "logging_steps": 1,
                        "warmup_ratio": 0.0, "lr_scheduler": "constant", "output_dir": str(tmp_path / "run")}}
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    hooks = Hooks(load_processor=(lambda *_a, **_k: processor) if family != "idefics3" else None)
    return run_training(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "recipe.yaml", log=lambda *_: None,
                        hooks=hooks)


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {name for name, value in after.items() if name.startswith(prefix) and not torch.equal(before[name], value)}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapts_the_language_model_alone_and_saves_the_processor(tmp_path, models, images, family):
    run = train(tmp_path, models, images, family, {"name": "lora", "r": 4})
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    language = "text_model" if family == "idefics3" else "language_model"
    assert weights and all(f".{language}.layers." in name for name in weights), sorted(weights)[:4]
    assert len(weights) == 2 * 2 * 7  # A and B of 7 linears in each of the 2 language layers; none in the tower
    assert isinstance(config["target_modules"], str) and "vision" not in config["target_modules"]
    first, *_, last = losses(run)
    assert last < first
    if family == "idefics3":  # a processor the run's outputs carry, loaded by plain transformers
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(run / "adapter")).__name__ == "Idefics3Processor"


def test_lora_targets_may_name_the_vision_tower_and_projector(tmp_path, models, images):
    run = train(tmp_path, models, images, "idefics3",
                {"name": "lora", "r": 4, "target_modules": ["q_proj", "connector"]})
    names = set(load_file(run / "adapter" / "adapter_model.safetensors"))
    assert any(".connector." in n for n in names) and any(".text_model." in n and "q_proj" in n for n in names)
    assert not any(".vision_model." in n for n in names)  # a bare name means the language model's layers


@pytest.mark.parametrize("family, method", [("qwen2_vl", "full"), ("idefics3", "galore"), ("qwen2_vl", "lisa")])
def test_full_galore_and_lisa_train_the_language_model_with_the_tower_frozen(tmp_path, models, images, family,
                                                                            method):
    path = models[family][0]
    before = load_file(path / "model.safetensors")
    options = {"name": method, **({"activated_layers": 1, "interval_steps": 1} if method == "lisa" else {}),
               **({"rank": 8} if method == "galore" else {})}
    run = train(tmp_path, models, images, family, options)
    after = load_file(run / "model" / "model.safetensors")
    # Qwen2-VL's checkpoints keep their original key layout (transformers maps it on load)
    tower, language = ("visual.", "model.layers.") if family == "qwen2_vl" else \
        ("model.vision_model.", "model.text_model.")
    assert changed(before, after, language)
    frozen = changed(before, after, tower)
    assert frozen <= {n for n in after if ".merger." in n}, sorted(frozen)[:3]  # only the projector may move


def test_train_vision_tower_trains_it(tmp_path, models, images):
    before = load_file(models["idefics3"][0] / "model.safetensors")
    run = train(tmp_path, models, images, "idefics3", {"name": "full"}, model={"train_vision_tower": True})
    assert changed(before, load_file(run / "model" / "model.safetensors"), "model.vision_model.")


@pytest.mark.parametrize("family, method", [("idefics3", {"name": "lora", "r": 4}), ("qwen2_vl", {"name": "full"})])
def test_dpo_on_image_pairs_raises_the_margin(tmp_path, models, images, family, method):
    run = train(tmp_path, models, images, family, method, rows="pairs.jsonl", steps=4, objective={"name": "dpo"},
                data={"eval_fraction": 0.0})
    margins = [row["rewards/margins"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "rewards/margins" in row]
    assert len(margins) == 4 and margins[-1] > margins[0]


def test_merge_eval_and_chat_on_an_image_run(tmp_path, models, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = train(tmp_path, models, images, "idefics3", {"name": "lora", "r": 4}, steps=12)
    runner = CliRunner()
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run), "--output", str(merged), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    # the merged checkpoint, loaded by plain transformers, gives the adapter-on-base logits with an image
    from peft import PeftModel

    processor = AutoProcessor.from_pretrained(merged)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What color?"}]}],
                                         add_generation_prompt=True)
    batch = processor(text=[text], images=[[Image.open(images / "red.png")]], return_tensors="pt")
    base = AutoModelForImageTextToText.from_pretrained(models["idefics3"][0])
    adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    plain = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(adapted(**batch).logits, plain(**batch).logits, atol=1e-4)
    result = runner.invoke(app, ["eval", str(run), "--compare-base", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"base", "tuned"} and report["samples"][0]["images"]
    assert report["results"]["tuned"]["loss"] < report["results"]["base"]["loss"]
    assert {"exact_match", "normalised_match"} <= report["results"]["tuned"].keys()
    chat = runner.invoke(app, ["chat", str(run), "--image", str(images / "red.png"), "--max-new-tokens", "3"],
                         input="What color?\n\n")
    assert chat.exit_code == 0, chat.output
    refused = runner.invoke(app, ["chat", str(run), "--image", str(tmp_path / "missing.png")], input="hi\n\n")
    assert refused.exit_code == 2 and "--image" in refused.output and "no such file" in refused.output


def test_refusals_before_training(tmp_path, models, images):
    for sections, expected in [
        ({"objective": {"name": "orpo"}, "data": {"train": str(images / "pairs.jsonl")}}, "objective orpo with a "
                                                                                          "vision-language model"),
        ({"train": {"packing": True}}, "train.packing with a vision-language model"),
        ({"data": {"chat_template": "chatml"}}, "data.chat_template chatml with a vision-language model"),
    ]:
        with pytest.raises(Exception) as err:
            train(tmp_path, models, images, "idefics3", {"name": "lora"}, **sections)
        assert expected in str(err.value)


def test_prepared_image_rows_and_pairs_are_cached_until_an_image_changes(tmp_path, models, images, monkeypatch):
    import os
    import shutil

    from finetune.data.vision_data import build_vision_data

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    folder = Path(shutil.copytree(images, tmp_path / "images"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(models["idefics3"][0])},
        "data": {"train": str(folder / "sft.jsonl"), "max_length": 512, "eval_fraction": 0.1},
        "method": {"name": "lora"}}))
    recipe, processor = load_recipe(tmp_path / "recipe.yaml"), models["idefics3"][1]
    first = build_vision_data(processor, recipe, print)
    again = build_vision_data(processor, recipe, print)
    assert "prepared into the cache" in first.cache_line and "read from the cache" in again.cache_line
    assert again.train["input_ids"] == first.train["input_ids"] and again.train["labels"] == first.train["labels"]
    assert [c.images for c in again.eval_conversations] == [c.images for c in first.eval_conversations]
    from finetune.data.vision_pairs import build_vision_pairs

    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(models["idefics3"][0])}, "objective": {"name": "dpo"},
        "data": {"train": str(folder / "pairs.jsonl"), "max_length": 512, "eval_fraction": 0.2},
        "method": {"name": "lora"}}))
    pairs_recipe = load_recipe(tmp_path / "dpo.yaml")
    pairs = build_vision_pairs(processor, pairs_recipe, print)
    pairs_again = build_vision_pairs(processor, pairs_recipe, print)
    assert "prepared into the cache" in pairs.cache_line and "read from the cache" in pairs_again.cache_line
    assert pairs_again.train["chosen_labels"] == pairs.train["chosen_labels"]
    assert [p.to_json() for p in pairs_again.held_out] == [p.to_json() for p in pairs.held_out]
    os.utime(folder / "red.png", ns=(1, 1))  # the same file name, other bytes as far as the cache can tell
    lines = []
    build_vision_data(processor, recipe, lines.append)
    build_vision_pairs(processor, pairs_recipe, lines.append)
    assert sum("red.png changed" in line and "preparing it again" in line for line in lines) == 2, lines


def test_validate_reads_image_rows_for_a_vision_language_model(tmp_path, models, images):
    rows = images / "with_missing.jsonl"  # beside the images its rows name
    rows.write_text((images / "sft.jsonl").read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "x"}],
         "images": [str(tmp_path / "missing.png")]}) + "\n")
    for model, expected in ((models["idefics3"][0], "with_missing.jsonl:14: image"), (None, "text-only model")):
        recipe = {"data": {"train": str(rows)}, "method": {"name": "lora"}}
        if model is not None:
            recipe["model"] = {"name_or_path": str(model)}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(app, ["validate", str(tmp_path / "recipe.yaml")])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_raw_text_and_unsupported_settings_are_refused_by_validate_and_train(tmp_path, models, images):
    (tmp_path / "wiki.txt").write_text("An article about rivers.\n\nAnother about stones.\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "A document."}) + "\n")
    text = "raw text (data.format text, .txt/.md files) with a vision-language model: not supported yet"
    lone = "with a vision-language model: not supported yet; train raw text on a text-only model"
    cases = [({"train": str(tmp_path / "wiki.txt")}, {}, text, text),
             ({}, {"train": {"packing": True}}, "train.packing with a vision-language model: not supported yet",
              None),
             ({"train": str(images / "pairs.jsonl")}, {"objective": {"name": "orpo"}},
              "objective orpo with a vision-language model: not supported yet", None),
             ({"train": str(tmp_path / "docs.jsonl")}, {}, lone, lone)]
    runner = CliRunner()
    for data, sections, from_validate, from_train in cases:
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
            "model": {"name_or_path": str(models["idefics3"][0])}, "method": {"name": "lora"},
            "data": {"train": str(images / "sft.jsonl"), **data}, **sections}))
        for command, expected in (("validate", from_validate), ("train", from_train or from_validate)):
            result = runner.invoke(app, [command, str(tmp_path / "recipe.yaml")])
            said = " ".join(result.output.split())
            assert result.exit_code == 2 and expected in said and "Traceback" not in said, (command, said)


def test_finetune_data_on_image_preference_rows(tmp_path, models, images):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(models["idefics3"][0])}, "objective": {"name": "dpo"},
        "data": {"train": str(images / "pairs.jsonl"), "max_length": 512}, "method": {"name": "lora"}}))
    result = CliRunner().invoke(app, ["data", str(tmp_path / "recipe.yaml"), "--show", "1"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "pairs: 6 read, 6 kept, 0 refused; 6 images" in said
    assert "pair 1 chosen" in said and "pair 1 rejected" in said and "⟨image: " in said
    assert "Assistant:⟦ red<end_of_utterance>⟧" in said and "Assistant:⟦ purple<end_of_utterance>⟧" in said


def test_inline_images_and_images_in_answers(tmp_path):
    import base64
    import io

    from finetune.data.images import check_image, image_ref

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    bare = base64.b64encode(buffer.getvalue()).decode()
    assert len(bare) < 255 and image_ref(bare, tmp_path).kind == "bytes"  # a small PNG, not a file name
    with pytest.raises(ValueError, match="not a readable image \\(no image format recognises it\\)"):
        check_image(image_ref("data:image/png;base64," + base64.b64encode(b"not an image").decode(), tmp_path))
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ValueError, match="a folder, not an image file"):
        check_image(image_ref("imgs", tmp_path))
    _, processor = tiny_idefics3()
    from finetune.data.vision import encode_vision

    with pytest.raises(ValueError, match="an image in an assistant turn"):
        encode_vision(processor, [{"role": "user", "content": "Draw"}, {"role": "assistant", "content": "<image>"}],
                      [Image.new("RGB", (8, 8))], 512)
