"""Where the policy comes from: an offline tiny model, the project's shipped checkpoint, or a local path."""

from spear_lit.policy.source import PolicySource, builtin_checkpoint, full_attention_only, is_sharded
from spear_lit.policy.tokenizer import byte_chat_tokenizer

__all__ = [
    "PolicySource",
    "builtin_checkpoint",
    "byte_chat_tokenizer",
    "full_attention_only",
    "is_sharded",
]
