"""`finetune chat`: a small REPL for checking a model by hand."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError


def chat_loop(target: str, max_new_tokens: int, system: str | None, read=input, write=print,
              image: Path | None = None) -> None:
    from transformers import TextStreamer

    from finetune.data.template import fit_messages, stop_token_ids
    from finetune.eval.targets import eval_template, load_for_eval, resolve_target
    from finetune.models.vision import is_vision_language

    where = resolve_target(target, None, "chat")
    if is_vision_language(where.model_path):
        return _vision_chat(where, max_new_tokens, system, image, read)
    if image is not None:
        raise UserError(f"--image: {target} is a text-only model; images need a vision-language model (a config "
                        "with a vision tower: Qwen2-VL, SmolVLM/Idefics3, Gemma-3, LLaVA)")
    model, tokenizer = load_for_eval(where.model_path, where.adapter, where.tokenizer_source)
    template = eval_template(tokenizer, where.fold_system)  # a run that folded its system text: chat folds it too
    if system and not (template.accepts_system or template.fold_system):
        raise UserError("--system: this model's chat template has no system role (it refuses or drops a system "
                        "turn); chat without --system. A run trained with data.fold_system folds it into the first "
                        "user turn by itself.")
    messages = [{"role": "system", "content": system}] if system else []
    stop = stop_token_ids(tokenizer, model)  # the template's end of turn, eos, and the model's configured ones
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    for text in _user_turns(read):
        messages.append({"role": "user", "content": text})
        try:
            batch = tokenizer.apply_chat_template(fit_messages(template, messages), add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)
        except Exception as err:  # jinja's raise_exception: e.g. a template with no system role and --system
            raise UserError(f"the model's chat template refused the conversation: {str(err).strip()}. Without "
                            "--system if it names the system role; the template decides what it accepts") from None
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer)
        answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})


def _user_turns(read):
    """What the user types, turn by turn, until an empty line or end of input."""
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            return
        if not text:
            return
        yield text


def _vision_chat(where, max_new_tokens: int, system: str | None, image: Path | None, read) -> None:
    """The chat on a vision-language model; `image` is shown with the first user turn."""
    from transformers import TextStreamer

    from finetune.data.images import check_image, image_ref
    from finetune.data.vision import open_image
    from finetune.eval.vision import generate_answer, load_vision_for_eval

    images = []
    if image is not None:
        try:
            images = [open_image(check_image(image_ref(str(Path(image).expanduser().resolve()), None), where=""))]
        except ValueError as err:
            raise UserError(f"--image: {err}") from None
    model, processor = load_vision_for_eval(where.model_path, where.adapter, where.tokenizer_source)
    messages = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    for text in _user_turns(read):
        shown = "<image>" * len(images) if not any(m["role"] == "user" for m in messages) else ""
        messages.append({"role": "user", "content": shown + text})
        messages.append({"role": "assistant",
                         "content": generate_answer(model, processor, messages, images, max_new_tokens, streamer)})
