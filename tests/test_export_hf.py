"""ckptstore.export.export_hf and ``ckptstore export``: tiny real transformers models (GPT-2 with tied
embeddings, BERT), saved plain, compiled (``_orig_mod.``) and wrapped (``module.``), exported, and loaded
by ``from_pretrained`` with their config: weights and outputs equal bit for bit. No hub download."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.doc_examples import run_integrations_example

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

import ckptstore  # noqa: E402
from ckptstore.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    StructureMismatchError,
    UnsupportedTypeError,
)
from ckptstore.export import INDEX_NAME, WEIGHTS_NAME, export_hf, parse_size  # noqa: E402
from tests.test_progress import run_in_pty  # noqa: E402

PYTHON = sys.executable


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers() -> Any:
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def gpt2() -> tuple[GPT2Config, GPT2LMHeadModel]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return config, GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def bert() -> tuple[BertConfig, BertForMaskedLM]:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    return config, BertForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, gpt2: Any, bert: Any) -> Path:
    """Step 1: GPT-2's state dict; 2: the compiled model's (``_orig_mod.``); 3: the model wrapped in
    DataParallel, saved as the object (``module.``: DDP's prefix); 4: compiled over DataParallel
    (``_orig_mod.module.``); 5: BERT's state dict, with an optimizer."""
    root = tmp_path_factory.mktemp("export") / "run"
    _, model = gpt2
    store = ckptstore.CheckpointStore(root)
    store.save(1, {"model": model.state_dict(), "step": 1})
    store.save(2, {"model": torch.compile(model).state_dict(), "step": 2})
    store.save(3, {"model": torch.nn.DataParallel(model), "step": 3})
    store.save(4, {"model": torch.compile(torch.nn.DataParallel(model)), "step": 4})
    _, bert_model = bert
    opt = torch.optim.Adam(bert_model.parameters())
    store.save(5, {"model": bert_model.state_dict(), "opt": opt, "step": 5})
    return root


def _file_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _tensor_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names.update(f.keys())
    return names


def _assert_same_model(model: torch.nn.Module, loaded: torch.nn.Module, info: dict[str, Any]) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    x = torch.arange(12).reshape(2, 6) % 100
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def _load_causal(directory: Path, config: GPT2Config, **kw: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    config.save_pretrained(directory)  # after the export: the target had to be empty
    model, info = AutoModelForCausalLM.from_pretrained(directory, config=config, output_loading_info=True, **kw)
    return model.eval(), info


# --- the API --------------------------------------------------------------------------------------------


def test_gpt2_state_dict_exports_and_loads(store_dir: Path, tmp_path: Path, gpt2: Any) -> None:
    config, model = gpt2
    out = tmp_path / "hf"
    files = export_hf(store_dir, out, step=1)
    assert files == [out / WEIGHTS_NAME]
    # The model's own names, "model" left out; the tied lm_head.weight kept as a copy of its own.
    assert _tensor_names(out) == set(model.state_dict())
    loaded, info = _load_causal(out, config)
    _assert_same_model(model, loaded, info)


@pytest.mark.parametrize("step", [2, 3, 4], ids=["compiled", "dataparallel", "compiled-dataparallel"])
def test_wrapper_prefixes_are_removed(store_dir: Path, tmp_path: Path, gpt2: Any, step: int) -> None:
    config, model = gpt2
    saved = ckptstore.CheckpointStore(store_dir).restore(step, keys="model")["model"]
    prefix = {2: "_orig_mod.", 3: "module.", 4: "_orig_mod.module."}[step]
    assert all(k.startswith(prefix) for k in saved)  # the real wrappers' names went into the checkpoint
    out = tmp_path / "hf"
    export_hf(store_dir, out, step=step)
    assert _tensor_names(out) == set(model.state_dict())
    _assert_same_model(model, *_load_causal(out, config))


def test_sharded_export_loads(store_dir: Path, tmp_path: Path, gpt2: Any) -> None:
    config, model = gpt2
    out = tmp_path / "hf"
    limit = 20_000
    calls: list[tuple[int, int]] = []
    files = export_hf(store_dir, out, step=4, max_shard_size=limit, progress=lambda d, t: calls.append((d, t)))
    shards = [p for p in files if p.suffix == ".safetensors"]
    n = len(shards)
    assert n > 2
    assert [p.name for p in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [INDEX_NAME]
    assert _file_names(out) == sorted(p.name for p in files)  # no temporary file left behind
    index = json.loads((out / INDEX_NAME).read_text())
    sd = model.state_dict()
    assert index["weight_map"].keys() == sd.keys()
    assert index["metadata"] == {
        "total_size": sum(t.numel() * t.element_size() for t in sd.values()),
        "total_parameters": sum(t.numel() for t in sd.values()),
    }
    for p in shards:
        with safe_open(str(p), "pt") as f:
            names = list(f.keys())
            assert all(index["weight_map"][k] == p.name for k in names)
            tensor_bytes = sum(_nbytes(f, k) for k in names)
        assert tensor_bytes <= limit or len(names) == 1  # a tensor larger than the limit gets a file of its own
    # Progress: every byte of the safetensors files, reported in order, the total known from the start.
    total = sum(p.stat().st_size for p in shards)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and all(a[0] < b[0] for a, b in itertools.pairwise(calls))
    _assert_same_model(model, *_load_causal(out, config))


def _nbytes(f: Any, name: str) -> int:
    t = f.get_tensor(name)
    return t.numel() * t.element_size()


def test_exclude_the_tied_copy_as_save_pretrained_does(store_dir: Path, tmp_path: Path, gpt2: Any) -> None:
    config, model = gpt2
    theirs = tmp_path / "theirs"
    model.save_pretrained(theirs)
    out = tmp_path / "hf"
    export_hf(store_dir, out, step=1, exclude=["lm_head.weight"])
    assert _tensor_names(out) == _tensor_names(theirs) == set(model.state_dict()) - {"lm_head.weight"}
    loaded, info = _load_causal(out, config)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied again on load
    _assert_same_model(model, loaded, info)


def test_bf16_and_nested_dicts(tmp_path: Path, gpt2: Any) -> None:
    """bfloat16 tensors keep their bits; a subtree of nested dicts gets the names a parent module's state
    dict joins with '.'; a checkpoint directory (ckptstore.save) exports as a store's step does."""
    config, model = gpt2
    half = GPT2LMHeadModel(config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    sd = half.state_dict()
    nested = {"transformer": {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}}
    nested["lm_head"] = {"weight": sd["lm_head.weight"]}
    ckptstore.save(tmp_path / "ckpt", {"net": {"lm": nested}, "note": "a string elsewhere is fine"})
    out = tmp_path / "hf"
    export_hf(tmp_path / "ckpt", out, keys="net/lm")
    assert _tensor_names(out) == set(sd)
    loaded, info = _load_causal(out, config, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    _assert_same_model(half, loaded, info)


def test_export_from_an_fsspec_store(tmp_path: Path, gpt2: Any) -> None:
    import fsspec

    config, model = gpt2
    url = "memory://export-test/run"
    memory = fsspec.filesystem("memory")
    if memory.exists("/export-test"):
        memory.rm("/export-test", recursive=True)
    try:
        ckptstore.CheckpointStore(url).save(7, {"model": model.state_dict()})
        out = tmp_path / "hf"
        files = export_hf(url, out, max_shard_size="30KB")  # the latest step; "30KB" = 30,000 bytes
        assert len(files) > 2
        _assert_same_model(model, *_load_causal(out, config))
    finally:
        memory.rm("/export-test", recursive=True)


# --- errors ---------------------------------------------------------------------------------------------


def test_named_errors(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    with pytest.raises(CheckpointNotFoundError, match="step 99"):
        export_hf(store_dir, out, step=99)
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        export_hf(tmp_path / "nothing-here", out)
    with pytest.raises(StructureMismatchError, match="'encoder'"):
        export_hf(store_dir, out, step=1, keys="encoder")
    with pytest.raises(UnsupportedTypeError, match=r"state\['step'\] is not a tensor \(int: 1\)"):
        export_hf(store_dir, out, step=1, keys=None)  # the whole state: "step" is no tensor
    with pytest.raises(UnsupportedTypeError, match=r"state\['opt'\]\['param_groups'\] is not a tensor \(a list\)"):
        export_hf(store_dir, out, step=5, keys="opt")
    with pytest.raises(StructureMismatchError, match="exclude names \\['nope'\\]"):
        export_hf(store_dir, out, step=1, exclude=["nope"])
    for bad in (0, -5, "5 parsecs", "", 1.5):
        with pytest.raises(ConfigError, match="max_shard_size"):
            export_hf(store_dir, out, step=1, max_shard_size=bad)  # type: ignore[arg-type]
    assert not out.exists()  # nothing was created by any of them

    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointExistsError, match="not empty"):
        export_hf(store_dir, out, step=1)
    assert _file_names(out) == ["config.json"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointExistsError, match="not a directory"):
        export_hf(store_dir, tmp_path / "a-file", step=1)


def test_parse_size() -> None:
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("1.5 mb") == 1_500_000


def test_a_failed_export_removes_what_it_wrote(store_dir: Path, tmp_path: Path, gpt2: Any) -> None:
    """The last tensor of the checkpoint damaged: the first shards are written, then the read of the last
    one fails its checksum; what was written goes, and the directory the export created too."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(store_dir, copy)
    step_dir = copy / "step_00000001"
    last = max(step_dir.glob("*.safetensors"))
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    out = tmp_path / "hf"
    seen: list[int] = []
    with pytest.raises(CorruptCheckpointError):
        export_hf(copy, out, step=1, max_shard_size=20_000, progress=lambda d, t: seen.append(d))
    assert seen  # shards were written before the damage was met
    assert not out.exists()
    out.mkdir()  # an empty directory given: kept, and left empty
    with pytest.raises(CorruptCheckpointError):
        export_hf(copy, out, step=1, max_shard_size=20_000)
    assert out.is_dir() and _file_names(out) == []


# --- the CLI --------------------------------------------------------------------------------------------


def test_cli_export_bert(store_dir: Path, tmp_path: Path, bert: Any) -> None:
    config, model = bert
    out = tmp_path / "bert"
    done = subprocess.run(
        [PYTHON, "-m", "ckptstore", "export", str(store_dir), "--step", "5", "--keys", "model", "--to", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no bar
    assert done.stdout.splitlines()[0].startswith(str(out / WEIGHTS_NAME) + "  ")
    config.save_pretrained(out)
    loaded, info = AutoModelForMaskedLM.from_pretrained(out, config=config, output_loading_info=True)
    _assert_same_model(model, loaded.eval(), info)

    again = subprocess.run(
        [PYTHON, "-m", "ckptstore", "export", str(store_dir), "--step", "5", "--to", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "ckptstore export: export target" in again.stderr and "not empty" in again.stderr


def test_cli_export_shows_a_bar_on_a_terminal(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    argv = [PYTHON, "-m", "ckptstore", "export", str(store_dir), "--to", str(out), "--step", "1"]
    status, shown = run_in_pty([*argv, "--max-shard-size", "40000"])
    assert status == 0, shown
    assert "export: 100%|" in shown  # the finished bar stays
    assert "model-00001-of-" in shown and INDEX_NAME in shown
    status, plain = run_in_pty([*argv[:-3], str(tmp_path / "hf2"), "--step", "1", "--no-progress"])
    assert status == 0 and "%|" not in plain and WEIGHTS_NAME in plain


def test_cli_export_errors(store_dir: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "ckptstore", "export", str(store_dir), "--to", str(tmp_path / "x"), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    missing = run("--step", "42")
    assert missing.returncode == 1 and "no committed checkpoint of step 42" in missing.stderr
    leaves = run("--step", "1", "--keys", "")
    assert leaves.returncode == 1 and "state['step'] is not a tensor (int: 1)" in leaves.stderr
    assert not (tmp_path / "x").exists()


def test_numpy_arrays_export_too(tmp_path: Path) -> None:
    """Nothing in the export needs the arrays to have been torch tensors; an array saved as blocks
    (ckptstore.Shard: a distributed save's) is exported whole."""
    from safetensors.numpy import load_file

    arrays = {"a.weight": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array(True)}
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    ckptstore.save(tmp_path / "c", {"model": {**arrays, "w": ckptstore.Shard(w, (3, 4), (0, 0))}})
    export_hf(tmp_path / "c", tmp_path / "hf")
    back = load_file(str(tmp_path / "hf" / WEIGHTS_NAME))
    assert back.keys() == {*arrays, "w"}
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in {**arrays, "w": w}.items())


# --- the docs -------------------------------------------------------------------------------------------


def test_the_docs_export_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example under "## Export for the model hubs" in docs/integrations.md."""
    monkeypatch.chdir(tmp_path)
    run_integrations_example("Export for the model hubs")
    assert sorted(p.name for p in (tmp_path / "export" / "gpt2").iterdir()) == ["config.json", WEIGHTS_NAME]
