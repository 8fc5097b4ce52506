"""Greedy answers of a loaded model to examples' prompts: the one place a site generates text.

`generate_answers` cuts each prompt to its last max_length tokens, runs the model's
`generate` without sampling on left-padded batches, and decodes only the new tokens (special
tokens removed). evaluation.py uses it for exact match and the answers it shows, task_eval.py
for GSM8K and MBPP answers; it imports neither of them.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsrd_cli.site import data as data_mod
from fedsrd_cli.site.model import BaseModel


def generate_answers(
    base: BaseModel,
    examples: Sequence[data_mod.Example],
    batch_size: int,
    max_length: int,
    max_new_tokens: int,
    pad: int,
) -> list[str]:
    """Greedy answers of the model to the examples' prompts (special tokens removed)."""
    tokenizer, model = base.tokenizer, base.model
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [data_mod.prompt_ids(tokenizer, ex)[-max_length:] for ex in chunk]
        batch = data_mod.collate([(p, p) for p in prompts], pad, left=True)
        input_ids = batch["input_ids"].to(base.device)
        attention = batch["attention_mask"].to(base.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in output[:, input_ids.shape[1] :]:
            answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return answers
