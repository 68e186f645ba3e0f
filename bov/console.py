"""What a training run prints to the terminal: Lightning's own progress bar, labelled for how bov trains (steps
of one endless epoch, so Lightning's "Epoch 0/-2" and logger version number say nothing), and none of its
advertising tips."""

from __future__ import annotations

import importlib.util
import logging


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_tips() -> None:
    """Drop Lightning's "💡 Tip: ... litlogger" line where it is made (its rank-zero logger); warnings stay."""
    made_by = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in made_by.filters):
        made_by.addFilter(_NoTips())


def progress_bar():
    """The bar Lightning would pick (Rich where installed, else tqdm), reading `train` instead of an epoch count,
    counting to the budget (Lightning counted to the loader's length: "400/369"), without the logger's version."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    base = RichProgressBar if importlib.util.find_spec("rich") else TQDMProgressBar

    class StepBar(base):  # type: ignore[misc, valid-type]
        @property
        def total_train_batches(self) -> int:  # the budget in micro-batches, not the loader's length
            return self.trainer.max_steps * self.trainer.accumulate_grad_batches

        def _get_train_description(self, current_epoch: int) -> str:  # Rich
            return "train"

        def on_train_epoch_start(self, trainer, *args) -> None:  # tqdm sets its description here
            super().on_train_epoch_start(trainer, *args)
            if isinstance(self, TQDMProgressBar):
                self.train_progress_bar.set_description("train")

        def get_metrics(self, trainer, module):
            items = super().get_metrics(trainer, module)
            items.pop("v_num", None)
            return items

    return StepBar()
