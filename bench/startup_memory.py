"""Benchmark: peak host memory per rank at FSDP2 start-up, before and after the sharded load of
``spear_lit/training/sharded_load.py`` (issue 22, item 7).

    OMP_NUM_THREADS=1 python bench/startup_memory.py           # ~3-5 minutes on 2 cores, ~8 GiB

Writes a random Qwen2 checkpoint (hidden 768, 12 layers, vocab 32000, tied embeddings: 136M parameters,
546 MB of fp32 safetensors) to a temporary folder, then starts ``--ranks`` CPU ranks of Lightning's
``ModelParallelStrategy`` (gloo) with a :class:`PolicyModule` on it, once per case:

* *before*: every rank reads the whole checkpoint (``from_pretrained``), deep-copies it for the reference,
  then shards (``build_policy(..., every_rank_reads=True)``, the old ``configure_model``);
* *after*: rank 0 reads, the others build on the meta device and receive their shards by broadcast;

each without and with a KL reference copy. Each rank reports its RSS high-water mark
(``ru_maxrss``) before ``configure_model`` (imports, Lightning) and right after it (model built and
sharded), its RSS at that moment, and the seconds ``configure_model`` took. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
ARCH = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def _write_checkpoint(path: Path) -> int:
    """A random fp32 Qwen2 of :data:`ARCH` saved with ``save_pretrained``; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**ARCH), dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _case(ckpt: str, case: str, reference: bool, ranks: int, out: Path) -> None:
    """One start-up on ``ranks`` processes (Lightning relaunches this script for ranks 1..n-1)."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from spear_lit.policy import PolicySource
    from spear_lit.training import module, sharded_load

    if case == "before":  # the old start-up: every rank reads the whole checkpoint
        module.build_policy = functools.partial(sharded_load.build_policy, every_rank_reads=True)

    class Probe(module.PolicyModule):
        def configure_model(self):
            self.record = {"peak_before": _peak()}
            start = time.perf_counter()
            super().configure_model()
            self.record |= {"seconds": time.perf_counter() - start, "peak": _peak(), "rss": _rss_now()}
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{self.global_rank}.json").write_text(json.dumps(self.record))

        def training_step(self, batch, batch_idx):
            return None

    probe = Probe(PolicySource(ckpt), lambda p: torch.optim.SGD(p, lr=0.0), reference=reference)
    probe.automatic_optimization = False
    trainer = L.Trainer(
        accelerator="cpu",
        devices=ranks,
        strategy=ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, train_dataloaders=torch.utils.data.DataLoader([0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--case", choices=["before", "after"], help=argparse.SUPPRESS)  # one case, internal
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return _case(args.ckpt, args.case, args.reference, args.ranks, Path(args.out))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        n = _write_checkpoint(ckpt)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        print(
            f"random Qwen2 {ARCH['hidden_size']}x{ARCH['num_hidden_layers']} vocab {ARCH['vocab_size']}: "
            f"{n / 1e6:.1f}M parameters, {size / MIB:.0f} MiB fp32 safetensors; {args.ranks} CPU ranks, "
            "FSDP2 (ModelParallelStrategy, gloo)\n"
        )
        print(
            "| case | reference | rank | peak RSS before configure_model (MiB) | peak RSS after (MiB) "
            "| RSS after (MiB) | configure_model (s) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for reference in (False, True):
            for case in ("before", "after"):
                out = Path(tmp) / f"{case}-{int(reference)}"
                cmd = [sys.executable, __file__, "--case", case, "--ckpt", str(ckpt), "--out", str(out)]
                cmd += ["--ranks", str(args.ranks), *(["--reference"] if reference else [])]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(proc.stderr[-3000:])
                for r in range(args.ranks):
                    rec = json.loads((out / f"rank{r}.json").read_text())
                    print(
                        f"| {case} | {'yes' if reference else 'no'} | {r} | {rec['peak_before'] / MIB:.0f} "
                        f"| {rec['peak'] / MIB:.0f} | {rec['rss'] / MIB:.0f} | {rec['seconds']:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
