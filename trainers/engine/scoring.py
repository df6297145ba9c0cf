"""Dev scores during training: after every epoch and, with `trainer.eval_every_n_steps`, every n
optimizer steps of a phase; the best state by dev/overall is kept, every evaluation is appended to
`history.jsonl` and logged, and with `trainer.patience` a phase whose dev/overall has not improved
for that many evaluations in a row stops early (Prechelt, 1998, "Early Stopping - But When?"; the
`patience` of HF Trainer's EarlyStoppingCallback and Lightning's EarlyStopping).

A history record is `{epoch, step, <task>/dev/<metric>..., dev/overall, <task>/train/loss...}`
(the train losses are the epoch's running means); an evaluation inside an epoch adds
`"epoch_step"`, an expert's adds `"expert"`, and an early stop appends
`{"event": "early_stop", ...}` with the best score and where it was reached. Nothing here draws
from a random generator, so a run that evaluates mid-epoch still resumes bit-identically.

A NaN dev/overall (a task's primary metric undefined, say Pearson's r of constant predictions:
`tasks.metrics`) is never better than anything (`better`): it is never kept as the best state and
counts as an evaluation without improvement for `patience`. While no evaluation of a phase has had
a defined dev/overall, each one's state is saved in the best state's place (with no best epoch), so
a phase that never has one ends on its last state, with a warning.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from common.durable import atomic_write, fault_point
from tasks.base import Task
from trainers.engine.context import RunContext
from trainers.engine.evaluate import evaluate
from trainers.engine.state import TrainState

log = logging.getLogger(__name__)
HISTORY_FILE = "history.jsonl"


def evaluates_now(options, state: TrainState, per_epoch: int) -> bool:
    """Whether the step just taken ends an `eval_every_n_steps` interval inside the epoch (the
    epoch's last step is scored by its end anyway); `options`: the strategy's TrainOptions."""
    every = options.eval_every_n_steps
    return bool(every) and state.phase_step % every == 0 and state.epoch_step < per_epoch


def better(score: float, best: float) -> bool:
    """Whether a dev/overall `score` beats the best so far: a NaN (undefined) one never does."""
    return not math.isnan(score) and score > best


def score_dev(ctx: RunContext, state: TrainState, strategy, tasks: list[Task], label: dict,
              mid_epoch: bool = False) -> None:
    """Scores the phase's tasks on dev, keeps the best state, counts evaluations without
    improvement, appends the history (rewritten whole, atomically) and logs."""
    metrics, _ = evaluate(ctx, "dev", tasks)
    improved = better(metrics["dev/overall"], state.best_score)
    if improved:
        state.best_score, state.best_epoch, state.best_step = (metrics["dev/overall"],
                                                               state.epoch, state.step)
        state.evals_since_best = 0
        strategy.save_best(ctx, state, tasks)
        fault_point("adapter-written")
    else:
        state.evals_since_best += 1
        if math.isnan(metrics["dev/overall"]):
            undefined_overall(ctx, state, strategy, tasks, metrics, label)
    losses = {f"{t}/train/loss": s / max(1, n) for t, (s, n) in state.epoch_losses.items()}
    where = {"epoch_step": state.epoch_step} if mid_epoch else {}
    state.history.append({**label, "epoch": state.epoch, **where, "step": state.step, **metrics,
                          **losses})
    write_history(ctx.run_dir, state.history)
    fault_point("history-appended")
    prefix = "expert/" if "expert" in label else ""
    ctx.logger.log({**{prefix + k: v for k, v in metrics.items()}, "epoch": state.epoch},
                   step=state.step)
    name = f"expert {label['expert']}, epoch" if label else "epoch"
    at = f", step {state.epoch_step}" if mid_epoch else ""
    log.info("%s %d/%d%s: %s%s", name, state.epoch, strategy.options.epochs, at,
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
             " (best so far)" if improved else "")


def undefined_overall(ctx: RunContext, state: TrainState, strategy, tasks: list[Task],
                      metrics: dict, label: dict) -> None:
    """A NaN dev/overall: says which primary metrics are undefined and, while the phase has no
    best state, saves this one in its place (the latest state is what the phase then ends on)."""
    nan = [k for k in (t.metric_key("dev") for t in tasks) if math.isnan(metrics.get(k, 0.0))]
    what = f"expert {label['expert']}, " if label else ""
    where = f"{what}epoch {state.epoch}, step {state.step}"
    if state.best_epoch is not None:
        log.warning("%s: dev/overall is undefined (NaN: %s undefined, see the warning above); "
                    "not better than the best, %.4f at epoch %d, step %d", where,
                    ", ".join(nan), state.best_score, state.best_epoch, state.best_step)
        return
    strategy.save_best(ctx, state, tasks)
    log.warning("%s: dev/overall is undefined (NaN: %s undefined, see the warning above) and no "
                "evaluation so far has had a defined one, so there is no best state: this latest "
                "state is kept in its place", where, ", ".join(nan))


def out_of_patience(ctx: RunContext, state: TrainState, options, label: dict) -> bool:
    """True (once the stop is logged and in the history) when the phase has gone
    `trainer.patience` evaluations without improving dev/overall (`options`: TrainOptions)."""
    patience = options.patience
    if not patience or state.evals_since_best < patience:
        return False
    state.history.append({**label, "event": "early_stop", "epoch": state.epoch,
                          "step": state.step, "patience": patience,
                          "best_score": state.best_score, "best_epoch": state.best_epoch,
                          "best_step": state.best_step})
    write_history(ctx.run_dir, state.history)
    what = f"expert {label['expert']}" if label else "the run"
    best = (f"the best, {state.best_score:.4f}, was at epoch {state.best_epoch}, step "
            f"{state.best_step}" if state.best_epoch is not None else
            "no evaluation had a defined (not NaN) dev/overall")
    log.info("early stopping %s at epoch %d, step %d: dev/overall has not improved for %d "
             "evaluations (trainer.patience=%d); %s", what, state.epoch, state.step,
             state.evals_since_best, patience, best)
    return True


def write_history(run_dir: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(Path(run_dir) / HISTORY_FILE, lambda f: f.write(text.encode("utf-8")))
