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
"""
from __future__ import annotations

import json
import logging
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


def score_dev(ctx: RunContext, state: TrainState, strategy, tasks: list[Task], label: dict,
              mid_epoch: bool = False) -> None:
    """Scores the phase's tasks on dev, keeps the best state, counts evaluations without
    improvement, appends the history (rewritten whole, atomically) and logs."""
    metrics, _ = evaluate(ctx, "dev", tasks)
    improved = metrics["dev/overall"] > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.best_step = (metrics["dev/overall"],
                                                               state.epoch, state.step)
        state.evals_since_best = 0
        strategy.save_best(ctx, state, tasks)
        fault_point("adapter-written")
    else:
        state.evals_since_best += 1
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
    log.info("early stopping %s at epoch %d, step %d: dev/overall has not improved for %d "
             "evaluations (trainer.patience=%d); the best, %.4f, was at epoch %s, step %s", what,
             state.epoch, state.step, state.evals_since_best, patience, state.best_score,
             state.best_epoch, state.best_step)
    return True


def write_history(run_dir: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(Path(run_dir) / HISTORY_FILE, lambda f: f.write(text.encode("utf-8")))
