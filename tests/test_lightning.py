"""MemfitCallback: Lightning's fit under a memfit plan, against memfit.Trainer, full-batch runs and Lightning's own."""

from __future__ import annotations

import copy
import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning", reason="memfit.integrations.lightning needs Lightning (pip install lightning)")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import memfit  # noqa: E402
from memfit.integrations.lightning import MemfitCallback, module_workload, plan_module, trainer_kwargs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")  # its hints about workers and logging

SEQ = 32  # tokens per sample: activations, not the weights, set the micro-batch that fits


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * torch.sigmoid(x) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x).mean(1)


def net_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class Module(L.LightningModule):
    """A classifier over sequences: its network, Adam, and a scheduler Lightning steps."""

    def __init__(self, lr: float = 0.01, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = Net()
        self.lr = lr
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        loss = net_loss(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def dataset(n: int = 30, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, SEQ, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def loader(batch_size: int = 10, n: int = 30) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(n), batch_size=batch_size)


def lightning(*callbacks, **kwargs) -> L.Trainer:
    options = dict(max_epochs=1, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def full_batch_run(model: nn.Module, batches, lr: float = 0.01) -> nn.Module:
    """The reference: each batch in one piece, plain Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for batch in batches:
        net_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_close(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert rel(p.detach(), q.detach()) <= tol, f"{name}: {rel(p.detach(), q.detach()):.2e}"


def sizes_seen(module: nn.Module) -> list[int]:
    """Records the batch of each real forward of ``module`` (its recomputations under checkpointing too).

    Planning runs copies of the module, hooks included, on fake tensors (a subclass): those are left out.
    """
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]) if type(args[0]) is torch.Tensor
                                 else None)
    return seen


@pytest.fixture(scope="module")
def tight_budget() -> int:
    """Bytes between what micro-batches 4 and 5 of the module need: a batch of 10 is split 4 + 4 + 2."""
    sample = next(iter(loader()))
    workload = module_workload(Module(), sample)
    need = [memfit.estimate(workload, memfit.Config(micro_batch=m), device="cpu").required for m in (4, 5)]
    assert need[0] < need[1]
    return (need[0] + need[1]) // 2


@pytest.fixture(scope="module")
def plans(tight_budget) -> dict[str, memfit.Plan]:
    """Plans made once for the tests that apply a given plan (planning runs many estimates)."""
    def make(budget, **options):
        return plan_module(Module(), loader(), budget, device="cpu", allow_checkpoint=False, **options)

    return {"tight": make(tight_budget), "roomy": make("1GiB"), "bf16": make("1GiB", precisions=("bf16-mixed",))}


# ---------------------------------------------------------------------- the plan applied exactly


def test_fit_equals_memfit_trainer_and_the_full_batch_under_an_uneven_split(tight_budget):
    module = Module()
    start = copy.deepcopy(module)
    seen = sizes_seen(module.net.inp)
    cb = MemfitCallback(tight_budget, 10, simulate=True, allow_checkpoint=False)
    trainer = lightning(cb)
    trainer.fit(module, loader())

    assert cb.plan.accumulation == (4, 4, 2) and trainer.global_step == 3
    assert seen == [4, 4, 2] * 3  # the plan's micro-batches really ran, one optimizer step per batch
    # memfit's own Trainer under the same plan and the same simulated device: the same engine, bit for bit.
    ref = copy.deepcopy(start)
    engine = memfit.Trainer.from_parts(ref, torch.optim.Adam(ref.parameters(), lr=0.01),
                                       lambda m, b: net_loss(m.net, b), cb.plan, budget=tight_budget)
    for batch in loader():
        assert engine.step(batch).micro_batches == (4, 4, 2)
    for p, q in zip(module.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # And the math is the whole batch's: each micro-batch's mean weighted by n_i / 10, not 1 / 3.
    assert_close(module.net, full_batch_run(copy.deepcopy(start.net), loader()))
    # The module is as it was: its own training_step, automatic optimization, no wrapper left.
    assert "training_step" not in vars(module) and module.automatic_optimization


class BeforeStep(L.Callback):
    """Counts ``on_before_optimizer_step`` calls and the gradient norm each one sees."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm()))


def test_global_step_schedulers_clipping_and_hooks_follow_lightnings_own_run(plans):
    plain, ours = Module(scheduler=True), Module(scheduler=True)
    plain_hooks, our_hooks = BeforeStep(), BeforeStep()
    lightning(plain_hooks, max_steps=2, gradient_clip_val=0.05).fit(plain, loader())
    trainer = lightning(MemfitCallback(plan=plans["tight"]), our_hooks, max_steps=2, gradient_clip_val=0.05)
    trainer.fit(ours, loader())
    assert trainer.global_step == 2  # max_steps counted the engine's steps: the third batch never ran
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)  # stepped per step
    # Once per step, with the whole batch's gradients (before clipping, as Lightning calls it).
    assert our_hooks.norms == pytest.approx(plain_hooks.norms, rel=1e-5) and min(our_hooks.norms) > 0.05
    assert_close(ours, plain)  # clipped by norm to 0.05 like Lightning's own step


def test_a_bf16_mixed_plan_trains_as_memfit_trainer_does_inside_lightnings_autocast(plans):
    module = Module()
    start = copy.deepcopy(module)
    p = plans["bf16"]
    assert trainer_kwargs(p) == {"precision": "bf16-mixed", "accumulate_grad_batches": 1}
    trainer = lightning(MemfitCallback(plan=p), **trainer_kwargs(p))
    trainer.fit(module, loader())
    ref = copy.deepcopy(start)
    engine = memfit.Trainer.from_parts(ref, torch.optim.Adam(ref.parameters(), lr=0.01),
                                       lambda m, b: net_loss(m.net, b), p)
    for batch in loader():
        engine.step(batch)
    for q, r in zip(module.parameters(), ref.parameters()):
        assert torch.equal(q, r)
    assert not torch.equal(next(module.parameters()), next(start.parameters()))


class Augmented(torch.utils.data.Dataset):
    """Each sample with fresh noise: reading one draws from torch's global generator."""

    def __init__(self) -> None:
        self.data = dataset()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x + 0.01 * torch.randn(x.shape), y


@pytest.mark.parametrize("shuffle", [False, True])
def test_planning_reads_a_sample_without_moving_any_random_generator(shuffle):
    data = torch.utils.data.DataLoader(Augmented(), batch_size=10, shuffle=shuffle)
    module = Module()  # (it seeds torch's generator itself)
    torch.manual_seed(7)
    expected = [b[0] for b in data]  # the batches a run that never planned would train on
    torch.manual_seed(7)
    plan_module(module, data, "1GiB", device="cpu", allow_checkpoint=False)
    assert all(torch.equal(a, b[0]) for a, b in zip(expected, data))


# ---------------------------------------------------------------------- the out-of-memory guard


class FailOnce:
    """A forward pre-hook that raises CUDA's out-of-memory error at the ``at``-th call (1-based), once."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_an_oom_in_a_micro_step_redoes_the_same_samples_smaller(plans):
    clean, failing = Module(), Module()
    seen = sizes_seen(failing.net.out)
    lightning(MemfitCallback(plan=plans["tight"], track_steps=0)).fit(clean, loader())
    # The second batch's second micro-step: its first micro-batch's gradients exist, Adam's state too.
    failing.net.inp.register_forward_pre_hook(FailOnce(at=5))
    cb = MemfitCallback(plan=plans["tight"], track_steps=0)
    lightning(cb).fit(failing, loader())

    assert [(e.step, e.phase, e.micro_batch, e.action) for e in cb.oom_events] == [(2, "forward", 4, "re-planned")]
    assert cb.config.micro_batch == 2 and cb.engine.retries == 1
    # Batch 2's first micro-batch ran, the second failed; the whole batch was redone with the new split.
    assert seen == [4, 4, 2] + [4] + [2] * 5 + [2] * 5
    assert_close(failing, clean)  # every sample counted once, the model and Adam as before the failure


def test_a_simulated_device_smaller_than_the_plan_re_plans_and_keeps_the_math(plans, tight_budget):
    module = Module()
    start = copy.deepcopy(module)
    assert plans["roomy"].accumulation == (10,)
    cb = MemfitCallback(plan=plans["roomy"], budget=tight_budget, simulate=True)
    lightning(cb).fit(module, loader())
    assert cb.oom_events and cb.oom_events[0].step == 1 and cb.config.micro_batch <= 4
    assert cb.peak <= tight_budget
    assert_close(module.net, full_batch_run(copy.deepcopy(start.net), loader()))


def test_an_oom_it_cannot_recover_from_raises_out_of_memory_with_fixes(plans):
    module = Module()
    before = copy.deepcopy(module.state_dict())
    cb = MemfitCallback(plan=plans["roomy"], budget="3KiB", simulate=True)
    with pytest.raises(memfit.OutOfMemory, match="micro-batch 1 does not fit") as info:
        lightning(cb).fit(module, loader())
    assert info.value.fixes and any("bf16-mixed" in f.describe() for f in info.value.fixes)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the failed step undone
    assert "training_step" not in vars(module) and module.automatic_optimization


# ---------------------------------------------------------------------- checkpointing and memory


def test_a_plan_for_the_bare_network_checkpoints_its_blocks_inside_the_module():
    # memfit.plan of the network alone names "blocks.0"; in the LightningModule it is "net.blocks.0".
    workload = memfit.Workload(model=Net, batch=lambda n: (torch.randn(n, SEQ, 8), torch.randint(0, 4, (n,))),
                               loss=net_loss, optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    p = memfit.plan(workload, 84_000, 8, device="cpu")
    assert p.config.checkpoint == ("blocks.0",) and p.accumulation == (4, 4)
    module, plain = Module(), Module()
    first, second = sizes_seen(module.net.blocks[0].lin), sizes_seen(module.net.blocks[1].lin)
    cb = MemfitCallback(plan=p)
    lightning(cb).fit(module, loader(8, n=16))
    assert cb.plan.config.checkpoint == ("net.blocks.0",)
    assert first == [4, 4, 4, 4] * 2 and second == [4, 4] * 2  # block 0 recomputed in each backward
    assert "forward" not in vars(module.net.blocks[0])  # the wrapper removed after fit
    lightning().fit(plain, loader(8, n=16))  # Lightning's own full-batch steps: the same math
    assert_close(module, plain)


def test_a_checkpoint_glob_that_names_no_module_is_refused(plans):
    p = plans["roomy"]
    p = dataclasses.replace(p, config=dataclasses.replace(p.config, checkpoint=("decoder.*",)))
    with pytest.raises(memfit.UsageError, match=r"'decoder\.\*'.*no module"):
        lightning(MemfitCallback(plan=p)).fit(Module(), loader())


@pytest.mark.parametrize("simulate", [False, True])
def test_adams_state_is_tracked_and_the_peak_logged(tmp_path, simulate, plans):
    module = Module()
    cb = MemfitCallback(plan=plans["roomy"], simulate=simulate)
    lightning(cb, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1).fit(module, loader())
    params = list(module.parameters())
    adam = 2 * 4 * sum(p.numel() for p in params) + 4 * len(params)  # exp_avg, exp_avg_sq; a float32 step each
    report = cb.report
    assert report.peak_by_category["optimizer_state"] == adam and report.at_peak["optimizer_state"] == adam
    assert report.at_peak["parameters"] == 4 * sum(p.numel() for p in params)
    assert report.peak == cb.peak and report.peak > 2 * adam

    (path,) = tmp_path.glob("run/*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    logged = {key: row[key] for row in rows for key in row if key.startswith("memfit/") and row[key]}
    assert int(logged["memfit/peak_bytes"]) == cb.peak
    assert int(logged["memfit/planned_bytes"]) == cb.plan.required
    assert int(logged["memfit/at_peak/optimizer_state"]) == adam
    assert sum(1 for row in rows if row.get("memfit/micro_steps")) == 3  # one row per step


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, kwargs, match", [
    (("1GiB", 0), {}, "batch_size must be a positive"),
    (("1GiB", 2.5), {}, "batch_size must be a positive"),
    (("plenty", 10), {}, "bad byte quantity 'plenty'"),
    ((None, 10), {}, "needs the device's budget"),
    (("1GiB", 10), {"world_size": 2}, "world_size=: MemfitCallback trains on one device"),
    (("1GiB", 10), {"precisoins": ("bf16-mixed",)}, "unknown option precisoins="),
    (("1GiB", 10), {"track_steps": -1}, r"track_steps=\.\.\.\) must be a whole number"),
    (("1GiB", 10), {"on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
    (("auto", 10), {"simulate": True}, "not 'auto'"),
])
def test_bad_arguments_say_what_to_pass(args, kwargs, match):
    with pytest.raises(memfit.UsageError, match=match):
        MemfitCallback(*args, **kwargs)


class ManualModule(Module):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class NoneModule(Module):
    def training_step(self, batch, batch_idx):
        return None


class Batches:
    """An iterable of batches that does not say its batch size (Lightning takes any iterable)."""

    def __init__(self, batches) -> None:
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize("case, match", [
    ("loader", r"batches of 5 samples.*effective batch is 10.*DataLoader\(batch_size=10\)"),
    ("larger", r"a batch of 12 samples, more than the effective batch .* \(10\)"),
    ("accumulate", r"accumulate_grad_batches=1"),
    ("precision", r"precision 'bf16-mixed'.*L\.Trainer\(precision='bf16-mixed'\)"),
    ("manual", "uses manual optimization"),
    ("none", "returned None"),
])
def test_a_run_the_plan_cannot_apply_exactly_is_refused(case, match, plans):
    module = {"manual": ManualModule, "none": NoneModule}.get(case, Module)()
    cb = MemfitCallback(plan=plans["bf16"]) if case == "precision" else MemfitCallback("1GiB", 10)
    trainer = lightning(cb, **({"accumulate_grad_batches": 2} if case == "accumulate" else {}))
    data = Batches(loader(12)) if case == "larger" else loader(5 if case == "loader" else 10)
    with pytest.raises(memfit.UsageError, match=match):
        trainer.fit(module, data)
    assert "training_step" not in vars(module) and module.automatic_optimization == (case != "manual")


def test_a_plan_with_conflicting_arguments_is_refused(plans):
    with pytest.raises(memfit.UsageError, match="batch_size=8.*differs from the plan's effective batch of 10"):
        MemfitCallback(plan=plans["roomy"], batch_size=8)
    with pytest.raises(memfit.UsageError, match="plan= and planning options"):
        MemfitCallback(plan=plans["roomy"], precisions=("bf16-mixed",))


class HookedModule(Module):
    def on_after_backward(self):
        raise AssertionError("the engine runs backward: this hook is not called")


def test_hooks_the_engine_does_not_call_are_named_in_a_warning(plans):
    module = HookedModule()
    with pytest.warns(UserWarning, match="HookedModule's on_after_backward will not be called"):
        lightning(MemfitCallback(plan=plans["roomy"], track_steps=0), max_steps=1).fit(module, loader())
    assert module.global_step == 1
