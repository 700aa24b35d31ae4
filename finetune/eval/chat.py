"""`finetune chat`: a small REPL for checking a model by hand."""

from __future__ import annotations

from finetune.errors import UserError


def chat_loop(target: str, max_new_tokens: int, system: str | None, read=input, write=print) -> None:
    from transformers import TextStreamer

    from finetune.data.template import fit_messages, stop_token_ids
    from finetune.eval.targets import eval_template, load_for_eval, resolve_target

    where = resolve_target(target, None, "chat")
    model, tokenizer = load_for_eval(where.model_path, where.adapter, where.tokenizer_source)
    template = eval_template(tokenizer, where.fold_system)  # a run that folded its system text: chat folds it too
    if system and not (template.accepts_system or template.fold_system):
        raise UserError("--system: this model's chat template has no system role (it refuses or drops a system "
                        "turn); chat without --system. A run trained with data.fold_system folds it into the first "
                        "user turn by itself.")
    messages = [{"role": "system", "content": system}] if system else []
    stop = stop_token_ids(tokenizer, model)  # the template's end of turn, eos, and the model's configured ones
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            break
        if not text:
            break
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
