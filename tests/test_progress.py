"""The one line each logged step prints."""

from __future__ import annotations

import math

from qlora_trainer.training.progress import format_log


def test_a_training_step_is_one_readable_line():
    logs = {"loss": 6.6021, "learning_rate": 0.002, "grad_norm": 1.1414, "mean_token_accuracy": 0.25}
    assert format_log(logs, 10, 120) == "step 10/120  loss 6.602  lr 2.00e-03  grad-norm 1.141  token accuracy 25.0%"


def test_an_sft_eval_line_shows_the_perplexity_of_its_token_loss():
    line = format_log({"eval_loss": 2.0}, 20, 120)
    assert line == f"step 20/120  eval loss 2.000  perplexity {math.exp(2.0):.2f}"


def test_a_preference_eval_line_shows_rewards_not_a_perplexity():
    logs = {"eval_loss": 0.4, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 1.25, "eval_rewards/chosen": 0.1}
    assert format_log(logs, 30, 200) == "step 30/200  eval loss 0.400  reward accuracy 90.0%  margin +1.250"
    kto = {"eval_loss": 0.5, "eval_rewards/chosen_sum": 3.0}  # KTO reports sums, no accuracy: still no perplexity
    assert format_log(kto, 30, 200) == "step 30/200  eval loss 0.500"


def test_a_preference_step_shows_its_rewards():
    logs = {"loss": 0.6931, "learning_rate": 1e-4, "rewards/accuracies": 0.5, "rewards/margins": -0.02}
    assert format_log(logs, 1, 200) == "step 1/200  loss 0.693  lr 1.00e-04  reward accuracy 50.0%  margin -0.020"


def test_the_trainers_final_summary_prints_nothing():
    assert format_log({"train_runtime": 12.0, "train_loss": 1.0}, 120, 120) is None
