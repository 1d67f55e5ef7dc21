"""The run's safeguards (training/safeguards.py) driven as the Trainer drives them: a real TrainerState and
TrainerControl, the hooks called in the Trainer's order, and the flags and steps they leave."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from qlora_trainer.training.safeguards import StopOnNonFinite, StopOnSignal


@pytest.fixture
def args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])


@pytest.fixture
def stop_on_signal(args):
    """StopOnSignal with its handlers installed, and the test's own SIGINT/SIGTERM handlers back afterwards."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    callback = StopOnSignal()
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    yield callback
    callback.restore()
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_without_a_signal_the_step_ends_as_usual(stop_on_signal, args):
    control = stop_on_signal.on_step_end(args, TrainerState(global_step=3), TrainerControl())
    assert not control.should_save and not control.should_training_stop
    assert stop_on_signal.received is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_and_stops_at_the_step_end(stop_on_signal, args, sig, capsys):
    signal.raise_signal(sig)  # handled: training goes on to the end of the step
    assert stop_on_signal.received == sig
    assert f"{signal.Signals(sig).name} received" in capsys.readouterr().out
    control = stop_on_signal.on_step_end(args, TrainerState(global_step=3), TrainerControl())
    assert control.should_save and control.should_training_stop


def test_a_repeat_within_the_grace_is_the_same_request_and_a_later_one_stops_at_once(stop_on_signal):
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)  # the launcher passing Ctrl-C on again: no exception
    assert stop_on_signal.received == signal.SIGINT
    stop_on_signal.REPEAT_GRACE_S = 0.0
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_train_end_puts_the_previous_handlers_back(args):
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        callback = StopOnSignal()
        callback.on_train_begin(args, TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) == callback._handle
        callback.on_train_end(args, TrainerState(), TrainerControl())
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def _model_with_grads(*values: float) -> torch.nn.Module:
    model = torch.nn.Linear(len(values), 1, bias=False)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    model.weight.grad = torch.tensor([values])
    return model


def test_finite_gradients_pass_and_nothing_stops(args):
    callback, model = StopOnNonFinite(), _model_with_grads(1.0, -2.0)
    state, control = TrainerState(global_step=4), TrainerControl(should_save=True)
    callback.on_pre_optimizer_step(args, state, control, model=model)
    callback.on_step_end(args, state, control)
    assert callback.bad_step is None
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, -2.0]]))
    assert control.should_save and not control.should_training_stop


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_is_dropped_and_stops_without_saving(args, bad):
    callback, model = StopOnNonFinite(), _model_with_grads(1.0, bad)
    state, control = TrainerState(global_step=4), TrainerControl(should_save=True)
    callback.on_pre_optimizer_step(args, state, control, model=model)
    assert callback.bad_step == 5  # the step being taken: global_step counts the ones already done
    assert model.weight.grad is None  # the optimizer skips it: the weights stay as they were
    control = callback.on_step_end(args, state, control)
    assert not control.should_save and control.should_training_stop


def test_a_non_finite_logged_loss_stops_at_the_step_it_was_logged(args):
    callback = StopOnNonFinite()
    control = callback.on_log(args, TrainerState(global_step=7), TrainerControl(should_save=True), logs={"loss": 1.5})
    assert callback.bad_step is None and not control.should_training_stop and control.should_save
    control = callback.on_log(args, TrainerState(global_step=8), control, logs={"loss": float("nan")})
    assert callback.bad_step == 8
    assert not control.should_save and control.should_training_stop


def test_the_first_bad_step_is_the_one_recorded(args):
    callback, model = StopOnNonFinite(), _model_with_grads(float("nan"), 0.0)
    callback.on_pre_optimizer_step(args, TrainerState(global_step=2), TrainerControl(), model=model)
    callback.on_log(args, TrainerState(global_step=9), TrainerControl(), logs={"loss": float("inf")})
    assert callback.bad_step == 3  # the dropped update, not a later log of its loss
