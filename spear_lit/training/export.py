"""Export the policy as a Hugging Face checkpoint: from a live learner, or from any Lightning checkpoint.

python -m spear_lit.training.export outputs/.../checkpoints/last.ckpt out_dir
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from spear_lit.policy import PolicySource
from spear_lit.policy.source import save_hf
from spear_lit.training.dist import world


def export_hf(learner, tokenizer, path: str | Path) -> Path:
    """Save ``learner.model`` (gathered if sharded) with ``tokenizer`` to ``path`` on rank 0; a failed
    write raises (``path`` keeps what it held before, never a half export)."""
    model = learner.model
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world()[0] == 0:
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(model.config)
            plain.load_state_dict(state, assign=True)
            model = plain
    if world()[0] == 0:
        try:
            save_hf(model, tokenizer, path)  # all or nothing (see save_hf)
        except OSError as e:
            raise RuntimeError(
                f"exporting the final policy failed: {e}. The trained weights are in the run's "
                "last checkpoint: `python -m spear_lit.training.export <run_dir>/checkpoints/"
                "last.ckpt <out dir>`"
            ) from e
    return Path(path)


def export_from_lightning(ckpt_path: str | Path, out: str | Path) -> Path:
    """Rebuild the policy from a single-file Lightning checkpoint written by ``PolicyLearner``."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "hf_config" not in ckpt:
        raise ValueError(
            f"{ckpt_path}: not a spear_lit checkpoint (no 'hf_config'); for a distributed "
            "checkpoint folder run `python -m lightning.fabric.utilities.consolidate_checkpoint` first"
        )
    config = AutoConfig.for_model(**ckpt["hf_config"])
    model = AutoModelForCausalLM.from_config(config)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=False)
    tokenizer = PolicySource(ckpt.get("policy_path")).tokenizer()
    return save_hf(model, tokenizer, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    args = ap.parse_args()
    print(export_from_lightning(args.ckpt, args.out))


if __name__ == "__main__":
    main()
