"""A policy source: builds the tokenizer and the model, late, on whichever device/strategy asks.

The LightningModule calls :meth:`PolicySource.model` inside ``configure_model`` so FSDP can shard it;
the data module only needs :meth:`PolicySource.tokenizer`. Nothing is downloaded: a source is either a
local Hugging Face directory, the project's own shipped checkpoint (``builtin:<name>``), or a tiny
random Qwen2 built from a config for tests and smoke runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    Qwen2Config,
)

from spear_lit.atomic import fsync_tree, replace_dir, temp_sibling
from spear_lit.policy import attention
from spear_lit.policy.tokenizer import byte_chat_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def builtin_checkpoint(name: str) -> Path:
    """Path of a checkpoint shipped in ``spear_lit/assets`` (e.g. ``tiny-math-sft``)."""
    path = ASSETS / name
    if not (path / "config.json").exists():
        known = (
            sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists())
            if ASSETS.exists()
            else []
        )
        raise FileNotFoundError(f"model.path=builtin:{name}: no such shipped checkpoint; known: {known}")
    return path


class PolicySource:
    """Where the policy's weights and tokenizer come from.

    Args:
        path: a local Hugging Face model directory, ``builtin:<name>`` for a checkpoint shipped with the
            project, or ``None`` to build a tiny random Qwen2 from ``tiny`` (tests, smoke runs).
        tiny: Qwen2 config overrides for the random model (hidden_size, num_hidden_layers, ...).
        dtype: parameter dtype: ``float32`` (CPU) or ``bfloat16`` (GPU runs).
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``). ``sdpa`` runs
            as :mod:`spear_lit.policy.attention` (the same attention, with faster CPU paths).
        gradient_checkpointing: trade compute for memory in the training forward (large models).
        init_seed: seed of the random initialisation when ``path`` is None.
        meta: build without allocating weights (instantiation checks of 32B experiments).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        tiny: dict | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        init_seed: int = 0,
        meta: bool = False,
    ):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={dtype!r}: allowed values are float32, bfloat16, float16")
        self.path = self._resolve(path) if path is not None else None
        self.tiny = dict(tiny or {})
        self.dtype = getattr(torch, dtype)
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.init_seed = init_seed
        self.meta = meta

    @staticmethod
    def _resolve(path: str) -> Path:
        if str(path).startswith("builtin:"):
            return builtin_checkpoint(str(path).split(":", 1)[1])
        p = Path(path).expanduser()
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"model.path={path!r}: not a Hugging Face model directory (no config.json there). "
                "Give a local path; nothing is downloaded at run time."
            )
        return p

    def tokenizer(self):
        """The tokenizer (ChatML template, left padding for generation)."""
        tok = AutoTokenizer.from_pretrained(self.path) if self.path else byte_chat_tokenizer()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def config(self):
        """The model config (a tiny Qwen2 when no path is given)."""
        if self.path:
            return AutoConfig.from_pretrained(self.path)
        tok = byte_chat_tokenizer()
        defaults = dict(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return Qwen2Config(**{**defaults, **self.tiny})

    def model(self) -> PreTrainedModel:
        """Build the model (weights loaded from ``path``, random, or on the meta device)."""
        if self.meta:
            return self.meta_model()
        if self.path:
            model = AutoModelForCausalLM.from_pretrained(self.path, **self._build_kwargs())
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed)
                model = AutoModelForCausalLM.from_config(self.config(), **self._build_kwargs())
        return self._finish(model)

    def meta_model(self) -> PreTrainedModel:
        """The model :meth:`model` builds (architecture, dtype, attention implementation, gradient
        checkpointing, tied embeddings, generation config) with every parameter and buffer on the meta
        device: no weight is read or allocated. The FSDP2 ranks other than 0 start from it
        (:mod:`spear_lit.training.sharded_load`)."""
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config(), **self._build_kwargs())
        if self.path and (self.path / "generation_config.json").exists():  # what from_pretrained reads
            model.generation_config = GenerationConfig.from_pretrained(self.path)
        return self._finish(model)

    def _build_kwargs(self) -> dict:
        impl = attention.NAME if self.attn_implementation == "sdpa" else self.attn_implementation
        return dict(dtype=self.dtype, attn_implementation=impl)

    def _finish(self, model: PreTrainedModel) -> PreTrainedModel:
        # Our engines never read generation_config (they sample exactly softmax(z/T) with top-p); this only
        # keeps a shipped top-k/top-p out of the exported policy's config (its repetition penalty stays).
        model.generation_config.top_k = None
        model.generation_config.top_p = None
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model


def save_hf(model: PreTrainedModel, tokenizer, path: str | Path, meta: dict | None = None) -> Path:
    """Save a Hugging Face checkpoint (config, safetensors, tokenizer) that ``PolicySource`` loads.

    All or nothing: written to a hidden sibling folder, fsynced, then renamed to ``path`` (replacing an
    older export). A failed write (full disk ...) raises an ``OSError`` that names ``path`` and leaves
    whatever was there before untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "spear_lit.json").write_text(json.dumps(meta, indent=2))
        fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(
                e.errno, f"saving the policy to {path} failed ({e}); nothing was written there"
            ) from e
        raise
    return path


def is_sharded(model: torch.nn.Module) -> bool:
    """Parameters sharded across ranks (FSDP2 DTensors or ZeRO-3 partitions): every forward is a collective."""
    return any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in model.parameters())


def full_attention_only(model: torch.nn.Module) -> bool:
    """Every decoder layer is plain full attention (no sliding-window or linear-attention layers), so its KV
    cache is one keys/values pair per layer that may be preallocated, indexed and extended."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types)
