"""The logger group (conf/logger/): a 2-iteration tiny run per logger; what reached the logger is read back
from its own files (TensorBoard event file, W&B offline run file) and compared with ``metrics.csv``.

TensorBoard stores float32 (hence rel 1e-6); W&B stores the JSON of the Python float (exact).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
from helpers import TINY_RUN, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))
# two iterations, the chosen logger instead of TINY_RUN's trainer.logger=null, no HF export
RUN = [o for o in TINY_RUN if o != "trainer.logger=null" and not o.startswith("iterations=")]
RUN += ["iterations=2", "export_hf=false"]
# keys the logger adds itself: Lightning's epoch counter, W&B's bookkeeping
OWN_KEYS = {"epoch", "trainer/global_step", "_step", "_runtime", "_timestamp"}


def _csv_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv as floats, without empty cells; the row's `iteration` is the logger's step."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-30)


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[:2]  # (H, W)


def _tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # no purge: keep every event as written (a step going backwards is not a restart here)
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0}, purge_orphaned_data=False)
    acc.Reload()
    return acc


def _wandb_history(run_file: Path) -> list[dict]:
    """The history records of a W&B offline ``run-*.wandb`` file: one dict per ``log`` call.

    The file is W&B's LevelDB-style record log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of records, each ``crc32 (4) | length (2, LE) | type (1)`` + payload; type 1 = a whole record,
    2/3/4 = first/middle/last piece. A payload is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    pos, piece, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                out.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return out


@pytest.mark.sandbox
def test_tensorboard_gets_every_metrics_csv_value_at_its_iteration_and_the_plot(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e '.[tensorboard]'")
    train(compose_cfg(tmp_path, [*RUN, "logger=tensorboard"]))
    rows = _csv_rows(tmp_path)
    acc = _tensorboard(tmp_path / "tensorboard" / "version_0")
    tags = set(acc.Tags()["scalars"])
    assert tags - OWN_KEYS == {k for r in rows for k in r} - {"iteration"}
    for r in rows:
        for key, value in r.items():
            if key == "iteration":
                continue
            at_step = [e.value for e in acc.Scalars(key) if e.step == r["iteration"]]
            # the learner's per-step points share some names (see the xfail test below): one of them
            assert any(_same(v, value, 1e-6) for v in at_step), (key, r["iteration"], at_step, value)
    assert acc.Tags()["images"] == ["training_curves"]
    image = acc.Images("training_curves")[0]
    assert (image.height, image.width) == _png_size(tmp_path / "training_curves.png")


@pytest.mark.sandbox
def test_wandb_offline_run_holds_the_metrics_csv_rows_and_the_plot(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install -e '.[wandb]'")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))  # nothing written to $HOME
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, objs = train(compose_cfg(tmp_path, [*RUN, "logger=wandb", "trainer.logger.offline=true"]))
    import wandb

    objs["trainer"].logger.experiment.finish()  # close the run (atexit would, in a CLI run)
    wandb.teardown()  # and stop W&B's writer process: the run file is complete only then
    rows = _csv_rows(tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = _wandb_history(next(run_dir.glob("run-*.wandb")))
    # IterationReport logs each row in one call; the learner's per-step logs lack rollout/ keys
    logged = [h for h in history if "rollout/reward_mean" in h]
    assert [h["trainer/global_step"] for h in logged] == [r["iteration"] for r in rows]
    for h, r in zip(logged, rows):
        got = {k: float("nan") if v in ("NaN", None) else float(v) for k, v in h.items() if k not in OWN_KEYS}
        assert set(got) == set(r) - {"iteration"}
        for key, value in got.items():
            assert _same(value, r[key], 0.0), (key, value, r[key])
    images = [h for h in history if "training_curves/filenames" in h]
    assert len(images) == 1
    assert (images[0]["training_curves/height"], images[0]["training_curves/width"]) == _png_size(
        tmp_path / "training_curves.png"
    )
    assert (run_dir / "files" / images[0]["training_curves/filenames"][0]).stat().st_size > 0


@pytest.mark.sandbox
def test_every_logged_series_has_one_point_per_iteration(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install -e '.[tensorboard]'")
    train(compose_cfg(tmp_path, [*RUN, "logger=tensorboard"]))
    acc = _tensorboard(tmp_path / "tensorboard" / "version_0")
    for tag in set(acc.Tags()["scalars"]) - OWN_KEYS:
        assert [e.step for e in acc.Scalars(tag)] in ([1, 2], [2]), tag  # replay columns may start at 2


@pytest.mark.parametrize("name", LOGGERS)
def test_each_logger_builds_or_names_its_install_command(name, tmp_path):
    """Installed: the Trainer gets Lightning's own logger class. Missing: ImportError with the command."""
    cfg = compose_cfg(tmp_path, [f"logger={name}", "tool=unsafe"])
    spec = OmegaConf.to_container(cfg.trainer.logger, resolve=True)
    assert spec["cls"].startswith("lightning.pytorch.loggers.")
    package = spec.get("requires")
    if package is None or importlib.util.find_spec(package) is not None:
        module, cls = spec["cls"].rsplit(".", 1)
        assert type(instantiate(cfg.trainer.logger, _convert_="all")) is getattr(
            importlib.import_module(module), cls
        )
        return
    with pytest.raises(Exception, match=rf"pip install -e '\.\[{spec['extra']}\]'") as err:
        instantiate(cfg.trainer.logger, _convert_="all")
    assert isinstance(err.value.__cause__, ImportError)  # Hydra's InstantiationException wraps it


def test_a_missing_logger_package_stops_the_run_before_any_rollout(tmp_path):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed: nothing is missing")
    cfg = compose_cfg(tmp_path, [*RUN, "logger=mlflow", "tool=unsafe"])
    with pytest.raises(
        Exception, match=r"MLFlowLogger needs the `mlflow` package.*pip install -e '\.\[mlflow\]'"
    ):
        train(cfg)
    assert not (tmp_path / "metrics.csv").exists()
