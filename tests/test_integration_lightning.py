"""CkptStoreCheckpointIO (ckptstore.integrations.lightning) in real Lightning 2.x training runs.

The exact-resume tests run tests/lightning_worker.py in subprocesses: a fit killed with SIGKILL between two
checkpoints (inside an epoch), then the same script rerun with ``ckpt_path="last"``, which resumes and
finishes; every tensor of the final model and optimizer state must be bit-identical to an uninterrupted run
of the same script. With the plugin as it is, under Lightning's AsyncCheckpointIO, and under the DDP
strategy (2 CPU processes on gloo, the whole job killed). The rest runs small fits in this process: the
checkpoints hold what Lightning's own hold, ModelCheckpoint's naming, top-k, ``save_last`` and removals,
pins, hyper-parameters that need pickle, ``load_from_checkpoint``, remote URLs, ``pytorch_lightning``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

pytest.importorskip("lightning")
pytest.importorskip("torchdata")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

import ckptstore
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    UnsupportedTypeError,
)
from ckptstore.integrations.lightning import (
    CkptStoreCheckpointIO,
    latest_checkpoint,
    load_from_checkpoint,
)
from tests import lightning_worker as worker
from tests.conftest import Location
from tests.doc_examples import run_integrations_example
from tests.fw_helpers import REPO, run_python

WORKER = REPO / "tests" / "lightning_worker.py"


def run_worker(*args: Any, expect_rc: int = 0) -> str:
    """Run the worker script in a session of its own (a DDP run kills its whole process group)."""
    proc = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        start_new_session=True,
    )
    if proc.returncode != expect_rc:
        raise AssertionError(
            f"worker exited with {proc.returncode}, expected {expect_rc}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc.stdout


def checkpoint_names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.endswith(".ckpt")} if root.exists() else set()


def assert_bit_identical(resumed: Any, reference: Any) -> None:
    keys = sorted(k for k in reference.files if k != "start_step")
    assert keys == sorted(k for k in resumed.files if k != "start_step")
    assert any(k.startswith("opt.") for k in keys) and any(k.endswith("running_mean") for k in keys)
    for k in keys:  # the model's weights and buffers, Adam's moments and step, the lr, the global step
        assert resumed[k].dtype == reference[k].dtype and resumed[k].shape == reference[k].shape, k
        assert resumed[k].tobytes() == reference[k].tobytes(), k
    assert int(resumed["global_step"]) == worker.STEPS


def step_of(path: Path | str) -> int:
    return int(ckptstore.restore(path, keys=["global_step"])["global_step"])


# --- killed and rerun -----------------------------------------------------------------------------------


@pytest.mark.parametrize("io", ["ckptstore", "async"])
def test_fit_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_fit(io: str, tmp_path: Path) -> None:
    root, ref, out = tmp_path / "ckpts", tmp_path / "reference.npz", tmp_path / "resumed.npz"
    run_worker(root, tmp_path / "killed.npz", "--io", io, "--kill-at", 10, "--reference", ref, expect_rc=-9)
    # Killed at step 10 (inside epoch 1, 6 batches an epoch): checkpoints at steps 4 and 8 and last.ckpt (8). Under
    # AsyncCheckpointIO the saves of step 8 may not have committed before the kill: whatever last.ckpt then
    # holds is whole, and the rerun resumes from it.
    names = checkpoint_names(root)
    if io == "ckptstore":
        assert names == {"epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"}
    resumed_from = step_of(root / "last.ckpt") if "last.ckpt" in names else 0
    assert resumed_from in (0, 4, 8) and (io == "async" or resumed_from == 8)

    run_worker(root, out, "--io", io)  # the same script, rerun
    resumed = np.load(out)
    assert int(resumed["start_step"]) == resumed_from
    assert_bit_identical(resumed, np.load(ref))
    # ModelCheckpoint's bookkeeping, carried through the resume, is what lies on disk: its top 2 and
    # last.ckpt, each a committed checkpoint; nothing left of the killed run (temp or trash directories).
    # Except, under AsyncCheckpointIO, a checkpoint the killed run committed after the one last.ckpt held: the
    # rerun does not know it, and saves that step again as "-v1" (as with Lightning's own TorchCheckpointIO).
    state = CkptStoreCheckpointIO().load_checkpoint(root / "last.ckpt")
    (mc_state,) = (v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    expected = {Path(p).name for p in mc_state["best_k_models"]} | {"last.ckpt"}
    assert len(expected) == 3 and expected <= checkpoint_names(root)
    for name in checkpoint_names(root) - expected:
        assert step_of(root / name) > resumed_from, name
    assert io == "async" or checkpoint_names(root) == expected
    assert step_of(root / "last.ckpt") == 12  # the last save of 15 steps at every 4
    assert {p.name for p in root.iterdir() if p.name.startswith(".")} <= {".ckptstore.lock", ".leases"}


def test_ddp_job_killed_and_rerun_ends_bit_identical_to_an_uninterrupted_job(tmp_path: Path) -> None:
    # strategy="ddp", 2 CPU processes on gloo (Lightning's launcher runs the script again as rank 1). Lightning
    # calls the plugin on global rank 0 alone: each checkpoint is written by one process, read by both.
    root, ref, out = tmp_path / "ckpts", tmp_path / "reference.npz", tmp_path / "resumed.npz"
    run_worker(root, tmp_path / "killed.npz", "--ddp", "--kill-at", 10, "--reference", ref, expect_rc=-9)
    assert checkpoint_names(root) == {"epoch=1-step=4.ckpt", "epoch=2-step=8.ckpt", "last.ckpt"}  # 3 batches an epoch
    for name in checkpoint_names(root):
        files = [p.name for p in (root / name).iterdir()]
        assert sorted(files)[0] == "manifest.msgpack" and len(files) == 2, files  # one tensor file: one writer
        assert re.fullmatch(r"tensors-\w+-r00000-\d+\.safetensors", sorted(files)[1]), files

    run_worker(root, out, "--ddp")
    # Rank 0's final state (the gradients averaged over both ranks at every step) is the uninterrupted job's
    # only if rank 1 resumed its optimizer state and its data position too (DDP broadcasts the parameters).
    resumed = np.load(out)
    assert int(resumed["start_step"]) == 8
    assert_bit_identical(resumed, np.load(ref))


# --- in this process ------------------------------------------------------------------------------------


def fit(
    root: Path | str | None,
    max_steps: int,
    *,
    io: Any = None,
    ckpt_path: str | None = None,
    model: pl.LightningModule | None = None,
    **checkpoint_kw: Any,
) -> tuple[pl.Trainer, pl.LightningModule]:
    """The worker's model trained in this process, checkpointed into ``root`` by ModelCheckpoint."""
    pl.seed_everything(0, verbose=False)
    model = model or worker.Regressor()
    plugins = [CkptStoreCheckpointIO() if io is None else io] if io != "native" else []
    callbacks = [ModelCheckpoint(dirpath=root, **checkpoint_kw)] if root is not None else []
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        plugins=plugins,
        callbacks=callbacks,
        enable_checkpointing=root is not None,
        use_distributed_sampler=False,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def assert_same(ours: Any, native: Any, path: str = "checkpoint") -> None:
    """Equal trees: the same container types (an OrderedDict, with its ``_metadata``, where torch.load gives
    one for the model's state dict; dicts elsewhere), keys, Python types, and tensors bit for bit."""
    if isinstance(native, torch.Tensor):
        assert isinstance(ours, torch.Tensor), path
        assert (ours.dtype, ours.shape) == (native.dtype, native.shape), path
        assert ours.numpy().tobytes() == native.numpy().tobytes(), path
    elif isinstance(native, dict):
        assert isinstance(ours, dict) and list(ours) == list(native), path
        for k in native:
            assert_same(ours[k], native[k], f"{path}[{k!r}]")
    elif isinstance(native, list | tuple):
        assert type(ours) is type(native) and len(ours) == len(native), path
        for i, (a, b) in enumerate(zip(ours, native)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert type(ours) is type(native) and ours == native, path


def test_checkpoints_hold_what_lightnings_own_checkpoints_hold(tmp_path: Path) -> None:
    # The same run twice, through the plugin and through Lightning's TorchCheckpointIO: ModelCheckpoint names,
    # keeps (top 2 by loss) and removes the same checkpoints, and each loads as the same dict, bit for bit.
    kw = {"every_n_train_steps": 2, "save_top_k": 2, "monitor": "train_loss", "save_last": True}
    fit(tmp_path / "ours", 12, **kw)
    fit(tmp_path / "native", 12, io="native", **kw)
    names = checkpoint_names(tmp_path / "native")
    assert checkpoint_names(tmp_path / "ours") == names and len(names) == 3
    for name in names:
        ours = CkptStoreCheckpointIO().load_checkpoint(tmp_path / "ours" / name)
        native = torch.load(tmp_path / "native" / name, weights_only=False)
        # The ModelCheckpoint state names its own directory: the same once the directories are swapped.
        text = repr(ours["callbacks"]).replace(str(tmp_path / "ours"), str(tmp_path / "native"))
        assert text == repr(native["callbacks"])
        ours["callbacks"] = native["callbacks"]
        assert type(ours["state_dict"]) is OrderedDict
        assert ours["state_dict"]._metadata == native["state_dict"]._metadata  # module versions
        assert_same(ours, native)
    saved = ckptstore.restore(tmp_path / "ours" / "last.ckpt", keys=["epoch"])
    assert saved == {"epoch": 1}  # readable without Lightning


def test_save_last_link_resumes_through_the_link_and_removes_what_top_k_drops(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    kw = {"every_n_train_steps": 3, "save_top_k": 1, "save_last": "link"}
    fit(root, 6, **kw)
    assert os.readlink(root / "last.ckpt") == "epoch=0-step=6.ckpt"
    assert checkpoint_names(root) == {"epoch=0-step=6.ckpt", "last.ckpt"}  # step 3 removed
    trainer, _ = fit(root, 9, ckpt_path="last", **kw)
    assert trainer.global_step == 9
    # (Resumed from the end of epoch 0's last batch, Lightning 2.6.6 counts the epoch twice: "epoch=2", the
    # same with its own TorchCheckpointIO.)
    assert os.readlink(root / "last.ckpt") == "epoch=2-step=9.ckpt" and step_of(root / "last.ckpt") == 9
    assert checkpoint_names(root) == {"epoch=2-step=9.ckpt", "last.ckpt"}
    assert latest_checkpoint(root) in (str(root / "epoch=2-step=9.ckpt"), str(root / "last.ckpt"))
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_a_readers_pin_holds_back_remove_checkpoint(tmp_path: Path) -> None:
    io = CkptStoreCheckpointIO()
    paths = [tmp_path / f"epoch=0-step={s}.ckpt" for s in range(4)]
    for s, path in enumerate(paths[:2]):
        io.save_checkpoint({"global_step": s, "state_dict": {"w": torch.full((3,), float(s))}}, path)
    with ckptstore.pin(paths[0]):  # an evaluator reading it
        io.remove_checkpoint(paths[0])
        io.save_checkpoint({"global_step": 2, "state_dict": {}}, paths[2])  # retried, still pinned
        assert torch.equal(io.load_checkpoint(paths[0])["state_dict"]["w"], torch.zeros(3))
    io.save_checkpoint({"global_step": 3, "state_dict": {}}, paths[3])  # retried after this save: unpinned now
    assert not paths[0].exists()
    io.remove_checkpoint(paths[2])  # unpinned: at once
    assert not paths[2].exists()

    lease = ckptstore.pin(paths[1])
    io.remove_checkpoint(paths[1])
    with pytest.warns(UserWarning, match=r"still pinned by readers and were left in place: .*step=1\.ckpt"):
        io.teardown()
    lease.release()
    assert paths[1].exists()


class WithDataDir(worker.Regressor):
    """A module with a hyper-parameter that only pickle could store as it is."""

    def __init__(self, data_dir: Path = Path("/data/set"), lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()


def test_a_hyper_parameter_that_needs_pickle_raises_naming_its_key_path(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    key_path = r"checkpoint\['hyper_parameters'\]\['data_dir'\] is a pathlib\.\w*Path"
    with pytest.raises(UnsupportedTypeError, match=key_path) as e:
        fit(root, 2, model=WithDataDir(), every_n_train_steps=2)
    assert "save_hyperparameters(ignore=[...])" in str(e.value) and "hparams='str'" in str(e.value)
    assert checkpoint_names(root) == set()  # nothing written

    # The documented conversion: stored as its str, with a warning.
    with pytest.warns(UserWarning, match=r"entries as strings: data_dir \(\w*Path\)"):
        fit(root, 2, io=CkptStoreCheckpointIO(hparams="str"), model=WithDataDir(), every_n_train_steps=2)
    model = load_from_checkpoint(WithDataDir, root / "epoch=0-step=2.ckpt")
    assert model.hparams.data_dir == "/data/set" and model.hparams.lr == 0.05


def test_load_from_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    _, trained = fit(root, 4, every_n_train_steps=4, save_last=True)
    with pytest.raises(IsADirectoryError):  # Lightning's own reads the path with torch.load
        worker.Regressor.load_from_checkpoint(root / "last.ckpt")
    model = load_from_checkpoint(worker.Regressor, root / "last.ckpt")
    assert type(model) is worker.Regressor and model.hparams.lr == 0.05
    expected = trained.state_dict()
    assert list(model.state_dict()) == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert load_from_checkpoint(worker.Regressor, root / "last.ckpt", lr=0.2, map_location="cpu").hparams.lr == 0.2
    (tmp_path / "hparams.yaml").write_text("lr: 0.3\nhidden: 16\n")
    assert (
        load_from_checkpoint(worker.Regressor, root / "last.ckpt", hparams_file=tmp_path / "hparams.yaml").hparams.lr
        == 0.3
    )
    with pytest.raises(ConfigError, match="map_location"):
        load_from_checkpoint(worker.Regressor, root / "last.ckpt", map_location={"cuda:0": "cpu"})
    with pytest.raises(ConfigError, match="LightningModule or LightningDataModule"):
        load_from_checkpoint(torch.nn.Linear, root / "last.ckpt")
    with pytest.raises(CheckpointNotFoundError):
        load_from_checkpoint(worker.Regressor, root / "missing.ckpt")


def test_a_torch_checkpoint_file_is_named_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointNotFoundError, match="TorchCheckpointIO"):
        CkptStoreCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointExistsError, match="not a checkpoint; not replacing it"):
        CkptStoreCheckpointIO().save_checkpoint({"global_step": 2, "state_dict": {}}, path)
    assert torch.load(path)["global_step"] == 1


@pytest.mark.parametrize("bad", [{"storage_options": "anon"}, {"hparams": "pickle"}, {"verify": "yes"}])
def test_bad_arguments_raise(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        CkptStoreCheckpointIO(**bad)


def test_model_checkpoint_on_an_fsspec_url_keeps_what_lightnings_own_keeps(memory_url: Location) -> None:
    # ModelCheckpoint(dirpath="memory://...") hands the plugin URLs; a run and its resume leave the same
    # checkpoints as with Lightning's TorchCheckpointIO (Lightning 2.6.6 on a URL: the resumed run saves
    # "last-v1.ckpt" and keeps step 6, whichever plugin).
    kw = {"every_n_train_steps": 2, "save_top_k": 1, "save_last": True}
    listings = []
    for io in (None, "native"):
        root = f"{memory_url.url}/{io or 'ours'}"
        fit(root, 6, io=io, **kw)
        trainer, _ = fit(root, 8, io=io, ckpt_path="last", **kw)
        assert trainer.global_step == 8
        fs = fsspec.filesystem("memory")
        listings.append(sorted(p.rsplit("/", 1)[1] for p in fs.ls(root.removeprefix("memory://"), detail=False)))
    ours, native = listings
    assert [n for n in ours if n.endswith(".ckpt")] == native and "last-v1.ckpt" in native
    assert step_of(f"{memory_url.url}/ours/last-v1.ckpt") == 8
    assert latest_checkpoint(f"{memory_url.url}/ours") == f"{memory_url.url}/ours/last-v1.ckpt"


@pytest.mark.parametrize("location", ["memory", "s3"], indirect=True)
def test_a_remote_url_saves_resumes_and_removes(location: Location) -> None:
    # Lightning hands the plugin fsspec URLs as they are; storage_options (an S3 endpoint and credentials
    # here) go to the plugin. Trainer.save_checkpoint and fit(ckpt_path=URL) touch no filesystem themselves.
    url, options = location
    io = CkptStoreCheckpointIO(storage_options=options or None)
    trainer, model = fit(None, 4, io=io)
    trainer.save_checkpoint(f"{url}/ckpts/step=4.ckpt")
    with pytest.raises(ConfigError, match="storage_options must be a dict"):
        trainer.save_checkpoint(f"{url}/ckpts/other.ckpt", storage_options="anon")  # passed on by Lightning
    assert latest_checkpoint(f"{url}/ckpts", storage_options=options or None) == f"{url}/ckpts/step=4.ckpt"

    resumed, _ = fit(None, 6, io=io, ckpt_path=f"{url}/ckpts/step=4.ckpt")
    assert resumed.global_step == 6
    checkpoint = io.load_checkpoint(f"{url}/ckpts/step=4.ckpt")
    assert checkpoint["global_step"] == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in checkpoint["state_dict"].items())
    io.remove_checkpoint(f"{url}/ckpts/step=4.ckpt")
    assert latest_checkpoint(f"{url}/ckpts", storage_options=options or None) is None
    with pytest.raises(CheckpointNotFoundError):
        io.load_checkpoint(f"{url}/ckpts/step=4.ckpt")


def test_pytorch_lightning_trainer_takes_the_plugin(tmp_path: Path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")

    class Tiny(ptl.LightningModule):
        def __init__(self, width: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(width, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)

    def trainer(steps: int) -> Any:
        return ptl.Trainer(
            max_steps=steps,
            plugins=[ptl.plugins.io.AsyncCheckpointIO(CkptStoreCheckpointIO())],
            callbacks=[ptl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    trainer(4).fit(Tiny())
    again = trainer(6)
    again.fit(Tiny(), ckpt_path="last")
    assert again.global_step == 6 and step_of(tmp_path / "last.ckpt") == 6
    model = load_from_checkpoint(Tiny, tmp_path / "last.ckpt")
    assert type(model) is Tiny and model.hparams.width == 3


def test_fabric_saves_and_loads_through_the_plugin(tmp_path: Path) -> None:
    import lightning

    fabric = lightning.Fabric(accelerator="cpu", devices=1, plugins=[CkptStoreCheckpointIO()])

    def setup() -> tuple[Any, Any]:
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 1)
        return fabric.setup(module, torch.optim.Adam(module.parameters()))

    model, optimizer = setup()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    fabric.save(tmp_path / "fabric.ckpt", {"model": model, "optimizer": optimizer, "step": 1})
    model2, optimizer2 = setup()
    state = {"model": model2, "optimizer": optimizer2, "step": 0}
    assert fabric.load(tmp_path / "fabric.ckpt", state) == {}
    assert state["step"] == 1 and torch.equal(model2.weight, model.weight)
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_import_ckptstore_imports_neither_the_integration_nor_lightning() -> None:
    out = run_python(
        "import sys, ckptstore, ckptstore.integrations; "
        "print(sorted(m for m in sys.modules if 'lightning' in m or 'integrations.' in m))"
    )
    assert out.strip() == "[]"


def test_the_docs_lightning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Lightning")
    root = tmp_path / "ckpts" / "lightning-run"
    assert step_of(root / "last.ckpt") == 12
    assert latest_checkpoint(root) == str(root / "last.ckpt")
