"""LoRA variants through peft: each option reaches the built peft model or optimizer, trains 2 steps on the tiny
model, and the plan counts what it adds; PiSSA/OLoRA adapters are saved as plain LoRA of the original base."""

import pytest
import torch

from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training


def train(write_recipe, method, inspect=None, **train_section):
    path = write_recipe(method={"name": "lora", "r": 4, "dropout": 0.0, **method},
                        train={"max_steps": 2, "learning_rate": 1e-2, **train_section})
    hooks = Hooks(on_trainer=(lambda trainer, m: inspect(trainer))) if inspect else None
    return run_training(load_recipe(path), path, log=lambda *_: None, hooks=hooks)


def test_dora_and_rslora_reach_the_peft_model(write_recipe):
    seen = {}

    def inspect(trainer):
        model = trainer.model
        config = model.peft_config["default"]
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        seen.update(dora=config.use_dora, rslora=config.use_rslora, scaling=layer.scaling["default"],
                    magnitudes=sum("lora_magnitude_vector" in n for n, p in model.named_parameters()
                                   if p.requires_grad))

    train(write_recipe, {"use_dora": True, "use_rslora": True, "alpha": 8}, inspect)
    assert seen["dora"] and seen["rslora"] and seen["magnitudes"] > 0
    assert seen["scaling"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r), not alpha / r


def test_loraplus_gives_b_its_own_learning_rate(write_recipe):
    seen = {}

    def inspect(trainer):
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        seen.update({names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]})

    train(write_recipe, {"loraplus_lr_ratio": 16}, inspect)
    a = {lr for name, lr in seen.items() if "lora_A" in name}
    b = {lr for name, lr in seen.items() if "lora_B" in name}
    assert a == {1e-2} and len(b) == 1 and b.pop() == pytest.approx(16e-2)


def test_modules_to_save_train_in_full_and_are_saved_with_the_adapter(write_recipe, tiny_model_dir):
    from safetensors.torch import load_file

    run_dir = train(write_recipe, {"modules_to_save": ["lm_head"]})
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    head = [k for k in saved if "lm_head" in k]
    assert head and not any("lora" in k for k in head)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_plain_lora_of_the_original_base(write_recipe, tiny_model_dir, init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = {}

    def inspect(trainer):
        from transformers import TrainerCallback

        class Keep(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                ids = torch.tensor([[1, 5, 9, 12, 3]])
                model.eval()
                with torch.no_grad():
                    seen["logits"] = model(input_ids=ids).logits

        trainer.add_callback(Keep())

    run_dir = train(write_recipe, {"init": init}, inspect)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the original base, untouched
    loaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    assert loaded.peft_config["default"].r == 8  # the conversion's twice-the-rank plain LoRA
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([[1, 5, 9, 12, 3]])).logits
    torch.testing.assert_close(logits, seen["logits"], rtol=1e-4, atol=1e-4)


def test_inits_a_base_cannot_take_are_refused_with_the_reason(write_recipe):
    with pytest.raises(UserError,
                       match="method.init loftq corrects 4-bit quantization error: it needs `quantize: 4bit`"):
        load_recipe(write_recipe(method={"name": "lora", "init": "loftq"}))
    assert (load_recipe(write_recipe(method={"name": "lora", "init": "loftq", "quantize": "4bit"})).method.init
            == "loftq")
    with pytest.raises(UserError, match="method.init pissa changes the base weights"):
        load_recipe(write_recipe(method={"name": "lora", "init": "pissa", "quantize": "4bit"}))


def test_plan_counts_dora_magnitudes_and_saved_modules(write_recipe):
    from benchmarks.tiny import build_tiny_llama
    from finetune.methods.lora import Options

    model = build_tiny_llama(300)
    plain = sum(Options(r=4).planned_trainable(model).values())
    dora = sum(Options(r=4, use_dora=True).planned_trainable(model).values())
    saved = sum(Options(r=4, modules_to_save=["lm_head"]).planned_trainable(model).values())
    outputs = sum(m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and "lm_head" not in n)
    assert dora - plain == outputs
    assert saved - plain == model.lm_head.weight.numel()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="LoftQ initialises adapters of a 4-bit (bitsandbytes, CUDA) base")
def test_loftq_adapters_start_nonzero_and_bring_the_quantized_model_closer(write_recipe, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    seen = {}

    def inspect(trainer):
        model = trainer.model
        ids = torch.tensor([[1, 5, 9, 12, 3]], device=model.device)
        seen["b"] = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B.default" in n)
        with torch.no_grad():
            with_adapter = model(input_ids=ids).logits.float().cpu()
            with model.disable_adapter():
                quantized = model(input_ids=ids).logits.float().cpu()
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids.cpu()).logits.float()
        seen["errors"] = ((with_adapter - full).abs().mean().item(), (quantized - full).abs().mean().item())

    train(write_recipe, {"init": "loftq", "quantize": "4bit"}, inspect)
    assert seen["b"] > 0 and seen["errors"][0] < seen["errors"][1]
