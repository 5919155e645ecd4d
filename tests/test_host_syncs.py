"""No host read of a device tensor in a training step that does not log, and the non-finite guard that this
needs (training.state.Rollback): checked at the end of a window, it trains exactly what a per-step check did."""
import sys

import pytest
import torch
from conftest import ROOT

from training.ema import EMA
from training.run import MetricWindow, RunError
from training.state import NonFiniteGuard, Rollback, TrainState

sys.path.insert(0, str(ROOT / "bench"))
import count_syncs  # noqa: E402  (bench/ is not a package)


def _toy_run(nan_steps, every, fast, policy="skip", patience=20, steps=12, strict_at=()):
    """A small training loop shaped like the scripts': AdamW, EMA, a random draw per step, a metric window
    logged ``every`` steps. ``fast``: the steps that do not end a window note non-finite losses on the device, ``settle`` replays;
    otherwise every step decides on the host (the old loop). NaN losses at ``nan_steps``; ``strict_at``: steps
    that decide on the host also on the fast path (the tokenizer's k-means step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    state = TrainState(model, EMA(model, 0.9), opt)
    guard, data = NonFiniteGuard(policy, patience), torch.randn(steps, 8, 4, generator=torch.Generator().manual_seed(1))
    window, skipped_at, logged = MetricWindow(), [], []

    def advance(strict):
        step = state.step
        noise = torch.randn(8, 1)  # the RNG must be restored for a replay to redo the same step
        loss = (model(data[step]) + 0.1 * noise).square().mean()
        if step in nan_steps:
            loss = loss * float("nan")
        if guard.checked(loss.detach(), strict):
            skipped_at.append(step)
            opt.zero_grad(set_to_none=True)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            window.add({"loss": loss.detach()}, items=8)
        state.ema.update(model)
        state.step += 1

    def load_loop(saved):
        nonlocal window
        window = saved

    rollback = Rollback(state, guard, torch.device("cpu"), lambda: window.copy(), load_loop)
    rollback.mark()
    while state.step < steps:
        advance(strict=not fast or state.step in strict_at)
        if state.step % every == 0 or state.step == steps:
            rollback.settle(lambda: advance(True))
            logged.append({k: v for k, v in window.averages("rate").items() if k != "rate"})
            rollback.mark()
    weights = [t.clone() for t in (*model.parameters(), *state.ema.model.parameters())]
    return weights, guard.skipped, skipped_at, logged


@pytest.mark.parametrize("nan_steps", [(), (5,), (0, 1), (3, 4, 5, 6, 7, 11), (2, 9)])
def test_a_window_checked_at_its_end_trains_what_a_check_per_step_did(nan_steps):
    """Windows of 4 steps on the fast path (NaN noted on the device, the window replayed when the note is
    found) end with the same weights, EMA, skipped steps and logged averages as checking every step."""
    old = _toy_run(nan_steps, every=4, fast=False)
    new = _toy_run(nan_steps, every=4, fast=True)
    for a, b in zip(old[0], new[0]):
        assert torch.equal(a, b)
    assert old[1:] == new[1:]
    assert new[1] == len(nan_steps) and all(torch.isfinite(t).all() for t in new[0])


@pytest.mark.parametrize("nan_steps,policy,patience,every", [((6,), "stop", 20, 4), ((5, 6, 7), "skip", 3, 4),
                                                             ((2, 3, 7, 8, 9), "skip", 3, 4), ((0, 1, 2), "skip", 3, 1)])
def test_a_window_checked_at_its_end_stops_at_the_same_step_with_the_same_message(nan_steps, policy, patience, every):
    """The stop policy and the limit of non-finite steps in a row raise the same one-line error, at the
    same step (a clean window in between ends a run of non-finite steps, as its steps did; a window whose
    only step decided on the host does not)."""
    errors = []
    for fast in (False, True):
        with pytest.raises(RunError) as e:
            _toy_run(nan_steps, every=every, fast=fast, policy=policy, patience=patience, strict_at=(0,))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "non-finite step(s) in a row" in errors[0]
    if nan_steps == (2, 3, 7, 8, 9):
        assert "3 non-finite" in errors[0]  # 2, 3 then a clean step: the count starts again at 7


def test_no_host_read_in_a_training_step_that_does_not_log(tmp_path, one_thread):
    """Both stages, tiny models on CPU, the counter of bench/count_syncs.py: every read of a tensor's value
    on the host (item, bool, tolist, nonzero, boolean indexing, ...) in the steps that do not log fails."""
    tokenizer, codes = count_syncs.first_stage(tmp_path)
    for stage, (script, args) in count_syncs.stages(tokenizer, codes).items():
        per_step, sites = count_syncs.per_step(script, args, 2, 4)
        assert per_step == 0, (stage, {k: v for k, v in sites.items() if k[1] != count_syncs.HOST_ONLY})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_steps_that_do_not_log_never_synchronize(tmp_path, monkeypatch):
    """On a GPU, torch's sync debug mode raises at any synchronizing call (also those the CPU counter cannot
    see: bincount, blocking copies). It is on from the end of each window's ``mark`` (after the first step,
    whose k-means init reads the device once) to the start of the window's ``settle``: the steps between."""
    mark, settle = Rollback.mark, Rollback.settle

    def marked(self):
        mark(self)
        if self.state.step >= 1:
            torch.cuda.set_sync_debug_mode("error")

    def settled(self, advance):
        torch.cuda.set_sync_debug_mode("default")
        return settle(self, advance)

    tokenizer, codes = count_syncs.first_stage(tmp_path)
    monkeypatch.setattr(Rollback, "mark", marked)
    monkeypatch.setattr(Rollback, "settle", settled)
    try:
        for stage, (script, args) in count_syncs.stages(tokenizer, codes).items():
            count_syncs.run_script(script, ["--run-dir", str(tmp_path / stage), *args(tmp_path), "optim.steps=4",
                                            "log.log_every=2", "log.image_every=2", "log.ckpt_every=2"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
