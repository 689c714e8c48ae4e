"""An offline byte-level tokenizer with a ChatML chat template (no download, no training).

Every UTF-8 byte is one token (256 ids), plus the ChatML control tokens and the Hermes tool-call tags
as single tokens, so a tiny policy pays one id for ``<tool_call>`` instead of eleven. The result is a
normal ``PreTrainedTokenizerFast``: it survives ``save_pretrained``/``from_pretrained``,
``apply_chat_template`` and padding, so checkpoints built on it load like any Hugging Face model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS_CHAT, EOT = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Added (non-special) tokens: they survive ``decode(skip_special_tokens=True)`` like Qwen2.5's.
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# ChatML, with tool results rendered as Qwen2.5 does: a user turn wrapping <tool_response> blocks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_chat_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level ChatML tokenizer: 256 byte ids, then the specials and tool tags."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # GPT-2's printable stand-ins for the 256 bytes
    vocab = {ch: _BYTE_OF[ch] for ch in alphabet}  # id b <-> byte b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOT,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[BOS_CHAT],
    )
    fast.add_tokens(TOOL_TAGS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left; training code builds its own padding
    return fast


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character map (the alphabet of the ByteLevel pre-tokenizer)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_OF = {ch: b for b, ch in _gpt2_bytes_to_unicode().items()}
