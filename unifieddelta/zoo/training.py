"""What the zoo's training stages share: the ``Trainer`` settings (CPU, seeded, no checkpoints or reports, a cosine
schedule), a quiet Trainer (library code does not print), and the last logged loss."""

from __future__ import annotations

import math


def trainer_args(seed: int, out: str, steps: int, batch: int, lr: float, progress: bool, **extra) -> dict:
    """Keyword arguments of ``TrainingArguments`` (or TRL's configs) for one seeded CPU training run."""
    args = dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    return {**args, **extra}


def quiet(trainer, progress: bool):
    """Keep the Trainer's progress bar (when asked) but not its per-log printing."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _Bar(ProgressCallback):
        def on_log(self, *args, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(_Bar)
    return trainer


def final_loss(trainer) -> float:
    """The last training loss the Trainer logged (NaN if none)."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return float(losses[-1]) if losses else math.nan
