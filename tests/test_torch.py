"""PyTorch stateful objects: Module, Optimizer, LRScheduler, GradScaler, restored in place through like=."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import ckptstore


@pytest.fixture
def store(tmp_path: pathlib.Path) -> ckptstore.CheckpointStore:
    return ckptstore.CheckpointStore(tmp_path / "run")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95)),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
}

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "steplr": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "lambdalr": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
}


def build(opt: str, sched: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = Net()
    # two parameter groups, so param_groups and per-group state are exercised
    groups = [
        {"params": list(model.fc1.parameters()) + list(model.bn.parameters())},
        {"params": list(model.fc2.parameters()), "lr": 3e-3},
    ]
    optimizer = OPTIMIZERS[opt](groups)
    return model, optimizer, SCHEDULERS[sched](optimizer)


def train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        y = torch.randn(16, 2, generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """Equal trees; tensors by torch.equal and dtype; tuples stay tuples."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_model_optimizer_scheduler_restored_in_place(store: ckptstore.CheckpointStore, opt: str, sched: str) -> None:
    model, optimizer, scheduler = build(opt, sched, seed=0)
    train(model, optimizer, scheduler, steps=5, seed=1)
    store.save(5, {"model": model, "opt": optimizer, "sched": scheduler, "step": 5})

    model2, optimizer2, scheduler2 = build(opt, sched, seed=99)  # different weights, no optimizer state
    params_before = [id(p) for p in model2.parameters()]
    back = store.restore(like={"model": model2, "opt": optimizer2, "sched": scheduler2, "step": 0})
    assert back["model"] is model2 and back["opt"] is optimizer2 and back["sched"] is scheduler2
    assert back["step"] == 5
    assert [id(p) for p in model2.parameters()] == params_before  # in place: the optimizer still points at them

    assert_tree_equal(model2.state_dict(), model.state_dict())
    sd, sd2 = optimizer.state_dict(), optimizer2.state_dict()
    assert_tree_equal(sd2, sd)  # per-parameter state (step counts, moments) and param_groups
    assert all(type(k) is int for k in sd2["state"])
    if "betas" in sd["param_groups"][0]:
        assert type(optimizer2.param_groups[0]["betas"]) is tuple
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert scheduler2.last_epoch == scheduler.last_epoch == 5
    assert scheduler2._step_count == scheduler._step_count
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert_tree_equal(scheduler2.state_dict(), scheduler.state_dict())

    # both continue identically
    assert train(model2, optimizer2, scheduler2, 3, seed=7) == train(model, optimizer, scheduler, 3, seed=7)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_adam_step_counts_and_moments(store: ckptstore.CheckpointStore) -> None:
    model, optimizer, scheduler = build("adam", "steplr", seed=0)
    train(model, optimizer, scheduler, steps=4, seed=1)
    store.save(4, {"opt": optimizer})
    _, optimizer2, _ = build("adam", "steplr", seed=0)
    store.restore(like={"opt": optimizer2})
    for p, q in zip(optimizer.param_groups[0]["params"], optimizer2.param_groups[0]["params"]):
        s1, s2 = optimizer.state[p], optimizer2.state[q]
        assert isinstance(s2["step"], torch.Tensor) and s2["step"].item() == 4.0
        assert s2["step"].dtype == s1["step"].dtype
        assert torch.equal(s2["exp_avg"], s1["exp_avg"]) and torch.equal(s2["exp_avg_sq"], s1["exp_avg_sq"])
    assert optimizer2.param_groups[0]["betas"] == (0.8, 0.95)
    assert optimizer2.param_groups[1]["lr"] == optimizer.param_groups[1]["lr"]


def test_optimizer_without_like_is_a_state_dict(store: ckptstore.CheckpointStore) -> None:
    model, optimizer, scheduler = build("sgd_momentum", "steplr", seed=0)
    train(model, optimizer, scheduler, steps=3, seed=1)
    store.save(3, {"opt": optimizer, "sched": scheduler})
    raw = store.restore(framework="torch")
    assert set(raw["opt"]) == {"state", "param_groups"}
    assert sorted(raw["opt"]["state"]) == list(range(6)) and all(type(k) is int for k in raw["opt"]["state"])
    assert isinstance(raw["opt"]["state"][0]["momentum_buffer"], torch.Tensor)
    assert raw["sched"]["last_epoch"] == 3
    # a plain dict that load_state_dict takes as it is
    _, optimizer2, scheduler2 = build("sgd_momentum", "steplr", seed=0)
    optimizer2.load_state_dict(raw["opt"])
    scheduler2.load_state_dict(raw["sched"])
    assert_tree_equal(optimizer2.state_dict(), optimizer.state_dict())


def test_grad_scaler_on_cpu(store: ckptstore.CheckpointStore) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 4)).float().pow(2).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**13  # grew: there is state to lose
    store.save(3, {"scaler": scaler})
    fresh = torch.amp.GradScaler("cpu")
    back = store.restore(like={"scaler": fresh})
    assert back["scaler"] is fresh
    assert fresh.state_dict() == scaler.state_dict()
    assert fresh.get_scale() == 2.0**13


def test_module_buffers_and_dtypes(store: ckptstore.CheckpointStore) -> None:
    torch.manual_seed(0)
    model = Net()
    model.train()
    model(torch.randn(32, 4))  # BatchNorm running stats and num_batches_tracked (int64) move
    model.fc2.to(torch.bfloat16)
    store.save(0, {"model": model})
    torch.manual_seed(1)
    fresh = Net()
    fresh.fc2.to(torch.bfloat16)
    store.restore(like={"model": fresh})
    assert_tree_equal(fresh.state_dict(), model.state_dict())
    assert fresh.bn.num_batches_tracked.dtype == torch.int64 and fresh.bn.num_batches_tracked.item() == 1
    assert fresh.fc2.weight.dtype == torch.bfloat16
    assert fresh.fc1.weight.requires_grad


def test_module_extra_state(store: ckptstore.CheckpointStore) -> None:
    class WithExtra(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.counter = 0

        def get_extra_state(self) -> Any:
            return {"counter": self.counter, "history": (1, 2)}

        def set_extra_state(self, state: Any) -> None:
            self.counter = state["counter"]
            assert state["history"] == (1, 2)

    m = WithExtra()
    m.counter = 17
    store.save(0, {"m": m})
    fresh = WithExtra()
    store.restore(like={"m": fresh})
    assert fresh.counter == 17
    assert torch.equal(fresh.lin.weight, m.lin.weight)


def test_saving_does_not_change_training(store: ckptstore.CheckpointStore) -> None:
    a = build("adam", "onecycle", seed=0)
    b = build("adam", "onecycle", seed=0)
    for step in range(4):
        la = train(*a, steps=1, seed=step)
        store.save(step, {"model": a[0], "opt": a[1], "sched": a[2]})
        lb = train(*b, steps=1, seed=step)
        assert la == lb
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)


def test_state_dict_saved_directly_and_module_in_list(store: ckptstore.CheckpointStore) -> None:
    models = [nn.Linear(2, 3), nn.Linear(3, 1)]
    store.save(0, {"models": models, "sd": models[0].state_dict()})
    fresh = [nn.Linear(2, 3), nn.Linear(3, 1)]
    back = store.restore(like={"models": fresh, "sd": None})
    assert back["models"][0] is fresh[0] and back["models"][1] is fresh[1]
    for m, f in zip(models, fresh):
        assert_tree_equal(f.state_dict(), m.state_dict())
    assert set(back["sd"]) == {"weight", "bias"}


MORE_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "cosine_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
    "chained": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)]
    ),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2),
}


@pytest.mark.parametrize("name", list(MORE_SCHEDULERS))
def test_more_schedulers(store: ckptstore.CheckpointStore, name: str) -> None:
    def make() -> tuple[torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
        return opt, MORE_SCHEDULERS[name](opt)

    def step(opt: torch.optim.Optimizer, sched: Any, k: int) -> None:
        opt.step()
        sched.step(float(k % 2)) if name == "plateau" else sched.step()

    opt, sched = make()
    for k in range(5):
        step(opt, sched, k)
    store.save(5, {"opt": opt, "sched": sched})
    opt2, sched2 = make()
    store.restore(like={"opt": opt2, "sched": sched2})
    assert repr(sched2.state_dict()) == repr(sched.state_dict())
    for k in range(5, 9):
        step(opt, sched, k)
        step(opt2, sched2, k)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
