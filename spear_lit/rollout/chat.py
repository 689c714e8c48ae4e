"""Chat-format glue between text messages and token ids, derived from the tokenizer's chat template."""

from __future__ import annotations


def prompt_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of ``[system?, user]`` rendered with the chat template, ending with the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def observation_text(tokenizer, outputs: list[str]) -> str:
    """Text to append after an assistant turn that ended with EOS: the tool messages carrying
    ``outputs``, then the next assistant generation prompt.

    Rendered by the chat template itself (a conversation with and without the tool messages), so the
    rollout's token stream is exactly what the template, and hence SFT data, would produce.
    """
    base_msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    base = tokenizer.apply_chat_template(base_msgs, tokenize=False)
    full = tokenizer.apply_chat_template(
        base_msgs + [{"role": "tool", "content": o} for o in outputs],
        tokenize=False,
        add_generation_prompt=True,
    )
    if not full.startswith(base):
        raise ValueError("chat template is not prefix-stable: cannot append tool messages token-in/token-out")
    eos = tokenizer.eos_token
    after_eos = base[base.rindex(eos) + len(eos) :]  # e.g. the "\n" ChatML puts after <|im_end|>
    return after_eos + full[len(base) :]


def observation_ids(tokenizer, outputs: list[str]) -> list[int]:
    """Token ids of :func:`observation_text`."""
    return tokenizer(observation_text(tokenizer, outputs), add_special_tokens=False)["input_ids"]
