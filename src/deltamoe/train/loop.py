"""The training loop of every stage, on accelerate: setup, steps, evaluation, checkpoints, output.

:func:`train` composes the pieces, each in its own module: deltamoe.train.setup checks and
prepares the run (:class:`deltamoe.train.setup.RunState`), deltamoe.train.step runs one optimizer
step, deltamoe.train.heldout evaluates, deltamoe.train.checkpointing saves and resumes,
deltamoe.train.logs writes the logs and deltamoe.train.output the trained model. Every process
reads the same global stream of packed sequences and takes its slice of each global batch, so a
run on N processes sees the same data per optimizer step as a run on one process with N times the
accumulation. Resuming a checkpoint continues bit-for-bit where the interrupted run would have
been.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltamoe.errors import DataError, UsageError
from deltamoe.train import distributed as dist_engine
from deltamoe.train.config import AnyStageConfig, load_config
from deltamoe.train.heldout import evaluate
from deltamoe.train.logs import RunLogger
from deltamoe.train.output import write_trained_model
from deltamoe.train.sections import LoggingConfig
from deltamoe.train.setup import RunState, setup
from deltamoe.train.step import Stepper, process_rows


def _params_json(run: RunState) -> dict[str, dict[str, Any]]:
    return {g: {"count": n, "trains": on} for g, (n, on) in run.policy.params_by_group.items()}


def _setup_record(run: RunState, stage: str, engine: str, precision: str) -> dict[str, Any]:
    return {
        "kind": "setup",
        "step": run.progress.step,
        "stage": stage,
        "processes": run.acc.num_processes,
        "distributed": run.acc.distributed_type.name,
        "engine": engine,
        "precision": precision,
        "global_batch": run.global_batch,
        "total_steps": run.total_steps,
        "resumed_from": str(run.resume.path) if run.resume else None,
        "heldout_sequences": len(run.heldout),
        "heldout_tokens": run.heldout.tokens,
        "params": _params_json(run),
    }


def _summary(run: RunState, final_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The result of the stage, recorded in the output's deltamoe.json."""
    summary = {
        "steps": run.progress.step,
        "tokens": run.progress.tokens,
        "processes": run.acc.num_processes,
        "global_batch": run.global_batch,
        "params": _params_json(run),
        "heldout_loss_before": run.progress.heldout_before,
        "heldout_loss_after": final_eval["heldout_loss"] if final_eval else None,
    }
    if run.train_layers is not None:
        summary["trained_layers"] = run.train_layers
    return summary


def _steps(run: RunState, stepper: Stepper, logger: RunLogger, bar: Any, evaluate_at: Callable[[int], Any], *,
           logging: LoggingConfig, checkpoint_every: int | None, seq_len: int, stop_after: int | None) -> bool:
    """Train up to the planned step, logging, evaluating and checkpointing on the way; False when
    stopped after ``stop_after`` steps (a checkpoint saved)."""
    acc, progress, stream = run.acc, run.progress, run.stream
    t_last, tok_last = time.perf_counter(), progress.tokens
    start_step = progress.step
    mine = process_rows(acc.num_processes, acc.process_index, stepper.micro_batch, stepper.accum)
    run.model.train()
    while progress.step < run.total_steps:
        try:  # this process's rows of the global batch: micro-batch j is rows (j * world + rank) * mb ...
            ids_mine, lang_mine = stream.take(run.global_batch, keep=mine)
        except StopIteration:
            raise DataError("the data stream ended before the planned number of steps") from None
        stepper.step(ids_mine, lang_mine)
        run.scheduler.step()
        progress.step += 1
        progress.tokens += run.global_batch * seq_len
        bar.update(1)
        last = progress.step == run.total_steps
        if progress.step % logging.every == 0 or last:
            losses, routing = stepper.report()
            now = time.perf_counter()
            rec = {
                "kind": "train",
                "step": progress.step,
                "lr": run.scheduler.get_last_lr()[0],
                **losses,
                "tokens": progress.tokens,
                "tokens_per_s": (progress.tokens - tok_last) / max(now - t_last, 1e-9),
                "routing": routing,
            }
            if acc.is_main_process:
                logger.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_last, tok_last = now, progress.tokens
        if logging.eval_every and progress.step % logging.eval_every == 0 and not last and len(run.heldout):
            evaluate_at(progress.step)
        stopping = stop_after is not None and progress.step - start_step >= stop_after and not last
        if stopping or (checkpoint_every and progress.step % checkpoint_every == 0 and not last):
            run.checkpoints.save(acc, run.model, run.optimizer, run.names, progress, stream)
        if stopping:
            return False
    return True


def train(
    config: str | os.PathLike[str] | dict[str, Any] | AnyStageConfig,
    *,
    overrides: list[str] | None = None,
    force: bool = False,
    progress: bool | None = None,
    stop_after: int | None = None,
    command: list[str] | None = None,
) -> Path | None:
    """Run one training stage (post_pretrain or router_review) as configured; return the output.

    Args:
        config: a YAML path, a dict or a validated config (see deltamoe.train.config).
        overrides: ``dotted.key=value`` settings applied on top of the config.
        force: replace an existing output directory.
        progress: show a progress bar (default: the config's ``logging.progress``).
        stop_after: stop after this many optimizer steps in this invocation, leaving a
            resumable checkpoint and no output (returns None), e.g. to fit a job time limit.
        command: the command line, recorded in ``deltamoe.json``.
    """
    from tqdm.auto import tqdm

    cfg = load_config(config, overrides)
    if stop_after is not None and stop_after <= 0:
        raise UsageError(f"stop_after must be positive, got {stop_after}")
    run = setup(cfg, force=force, progress=progress, stop_after=stop_after)
    acc, engine = run.acc, cfg.distributed.engine
    logger = RunLogger(cfg.resolved_run_dir / "logs", cfg.logging, acc.is_main_process, fresh=run.resume is None)
    bar = tqdm(total=run.total_steps, initial=run.progress.step, desc=cfg.stage, unit="step", file=sys.stderr,
               disable=not (run.show and acc.is_main_process))
    stepper = Stepper(
        acc, run.model, run.optimizer, run.layout, run.capture, run.mask,
        coefficients=(cfg.losses.lm, getattr(cfg.losses, "balance", 0.0), getattr(cfg.losses, "lpr", 0.0)),
        allowed=run.allowed, lpr_keep=run.lpr_keep, max_grad_norm=cfg.train.max_grad_norm, engine=engine,
        micro_batch=cfg.train.micro_batch_size, accum=run.accum, lang_names=run.lang_names,
    )
    if acc.is_main_process:
        logger.log(_setup_record(run, cfg.stage, engine, cfg.train.precision))

    def evaluate_at(step: int) -> dict[str, Any]:
        res = evaluate(acc, run.model, run.heldout, run.capture, run.layout, run.lang_names, cfg.train.micro_batch_size)
        rec = {"kind": "eval", "step": step, **res}
        if acc.is_main_process:
            logger.log(rec)
        return rec

    try:
        if run.progress.step == 0 and len(run.heldout):
            run.progress.heldout_before = evaluate_at(0)["heldout_loss"]
        if not _steps(run, stepper, logger, bar, evaluate_at, logging=cfg.logging, checkpoint_every=cfg.checkpoint.every,
                      seq_len=cfg.data.seq_len, stop_after=stop_after):
            return None
        final_eval = evaluate_at(run.progress.step) if len(run.heldout) else None
        state = dist_engine.full_state_dict(run.model) if engine == "fsdp2" else acc.get_state_dict(run.model)
        if acc.is_main_process:
            assert run.hashes is not None  # started on the main process
            write_trained_model(run.out, run.ckpt, run.layout, state, set(run.policy.trainable_names),
                                hashes=run.hashes, stage=cfg.stage, config=cfg.model_dump(mode="json"),
                                result=_summary(run, final_eval), command=command, force=force)
        acc.wait_for_everyone()
    finally:
        bar.close()
        logger.close()
        run.capture.remove()
        if run.mask is not None:
            run.mask.remove()
    return run.out
