"""The progress bar of a run, with each logged step as one readable line instead of the trainer's dict of
formatted strings."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback

from qlora_trainer.training.metrics import perplexity


class ProgressLines(ProgressCallback):
    """transformers' progress bar; its log lines come from `format_log`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = format_log(logs, state.global_step, state.max_steps)
            if line is not None:
                self.training_bar.write(line)


def format_log(logs: dict, step: int, max_steps: int) -> str | None:
    """`step 10/120  loss 6.602  lr 2.00e-03  grad-norm 1.141  token accuracy 0.0%`; None for the trainer's final
    summary, which the run prints itself."""
    where = f"step {step}/{max_steps}"
    if "eval_loss" in logs:
        return "  ".join([where, f"eval loss {logs['eval_loss']:.3f}", *_eval_measures(logs)])
    if "loss" not in logs:
        return None
    parts = [where, f"loss {logs['loss']:.3f}"]
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad-norm {logs['grad_norm']:.3f}")
    if logs.get("mean_token_accuracy") is not None:  # TRL's share of next tokens predicted right, on trained tokens
        parts.append(f"token accuracy {logs['mean_token_accuracy']:.1%}")
    return "  ".join(parts + _reward_measures(logs, ""))


def _eval_measures(logs: dict) -> list[str]:
    """A preference trainer's loss is no token likelihood, so its eval line shows its rewards, not a perplexity."""
    if any(key.startswith("eval_rewards/") for key in logs):
        return _reward_measures(logs, "eval_")
    return [f"perplexity {perplexity(logs['eval_loss']):.2f}"]


def _reward_measures(logs: dict, prefix: str) -> list[str]:
    """TRL's preference measures: the share of pairs whose chosen answer the policy prefers over the reference's
    preference, and the mean reward margin."""
    parts = []
    if logs.get(f"{prefix}rewards/accuracies") is not None:
        parts.append(f"reward accuracy {logs[f'{prefix}rewards/accuracies']:.1%}")
    if logs.get(f"{prefix}rewards/margins") is not None:
        parts.append(f"margin {logs[f'{prefix}rewards/margins']:+.3f}")
    return parts
