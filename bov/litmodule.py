"""What happens in one training run per step: `LitBoV`, the LightningModule (the loss, accumulation, the
learning-rate schedule, the logging cadence of every metric, validation in exact bits per byte, what a
checkpoint carries), with the pieces it needs: the schedule (`lr_factor`), divergence (`check_loss`,
`Diverged`), the device's peak for MFU, and metric writes that a Ctrl-C waits for. bov.train runs it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time

import lightning.pytorch as pl
import torch

from bov import tracking
from bov.budget import Budget
from bov.config import ExperimentConfig
from bov.infer import checkpoint_extras
from bov.model import build_model
from bov.optim import build_optimizer


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# Dense bf16 peaks (vendor datasheets, FLOP/s) for MFU; `train.peak_flops` overrides. Matched in order
# against the CUDA device name.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12))


def device_peak_flops(name: str | None = None) -> float | None:
    """The bf16 peak of this process's GPU (or of a device name); None where unknown (a CPU: no MFU)."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def lr_factor(step: int, total: int, cfg) -> float:
    """Multiplier on every group's LR: linear warmup, then constant / cosine / warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        p = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    start = cfg.decay_start * total  # wsd: flat, then linear decay to final_lr_frac
    if step < start:
        return 1.0
    p = (step - start) / max(1.0, total - start)
    return 1.0 - (1.0 - cfg.final_lr_frac) * min(1.0, p)


# ----------------------------------------------------------------------------- module


def check_loss(loss: float, step: int, vocab_size: int) -> None:
    """Diverged when the loss is NaN or infinite, or has exploded: above 4 x ln |V|, four times what guessing
    uniformly over the vocabulary costs, which no training run passes through on its way down."""
    if not math.isfinite(loss):
        raise Diverged(f"train loss is {loss} at step {step}; stopping (lower the LR?)")
    if loss > 4 * math.log(vocab_size):
        raise Diverged(f"train loss exploded to {loss:.4g} at step {step} (uniform guessing costs "
                       f"{math.log(vocab_size):.2f}); stopping (lower the LR?)")


@contextlib.contextmanager
def ctrl_c_after():
    """Ctrl-C waits for the write in flight: a KeyboardInterrupt inside a SQLite transaction leaves the embedded
    MLflow store locked, and the run's end could then not be recorded (CI saw "database is locked" once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if held and callable(before):
            before(signal.SIGINT, None)  # e.g. Python's default handler: KeyboardInterrupt, now
        elif held and before == signal.SIG_DFL:
            raise KeyboardInterrupt




class LitBoV(pl.LightningModule):
    """Any variant. The step is nanoGPT's loop body; Lightning accumulates, clips, steps and schedules."""

    def __init__(self, cfg: ExperimentConfig, budget: Budget, token_bytes: torch.Tensor, tokenizer_json: str | None = None,
                 peak_flops: float | None = None, data_identity: dict | None = None):
        super().__init__()
        self.cfg, self.budget = cfg, budget
        self.tokenizer_json, self.data_identity = tokenizer_json, data_identity
        self.peak_flops = peak_flops  # the device's bf16 peak, for MFU (None: unknown device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model)
        self.register_buffer("token_bytes", token_bytes, persistent=False)
        self._t_last: float | None = None
        self._tokens_timed = 0
        self._time_timed = 0.0
        self._accum_loss: torch.Tensor | float = 0.0
        self._last_loss: torch.Tensor | None = None
        self.val_metrics: dict[str, float] | None = None  # the last validation's val/loss and val/bpb

    @property
    def tokens_per_s(self) -> float | None:
        """Training tokens/s over the steps after the first (compilation excluded), validation excluded."""
        return self._tokens_timed / self._time_timed if self._time_timed > 0 else None

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilization against the device's bf16 peak, over all ranks (None: unknown device)."""
        if not tokens_per_s or not self.peak_flops:
            return None
        world = self.trainer.world_size if self._trainer is not None else 1
        return tokens_per_s * self.budget.flops_per_token / (self.peak_flops * world)

    def forward(self, ids, targets=None):
        return self.model(ids, targets=targets)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `bov generate` reads the config and tokenizer; `--resume` refuses other data than `data`
        checkpoint["bov"] = {**checkpoint_extras(self.cfg, self.tokenizer_json), "data": self.data_identity}

    # -- optimizers
    def configure_optimizers(self):
        t = self.cfg.train
        opt = build_optimizer(self.model.param_groups(), t, self.budget.steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, self.budget.steps, t))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- training
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, targets=y).mean()
        self._accum_loss = self._accum_loss + loss.detach() / self.cfg.train.grad_accum  # on device: no sync
        return loss  # Lightning divides by grad_accum, backpropagates, clips and steps at the boundary

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.cfg.train.grad_accum:
            return  # mid-accumulation: no optimizer step happened
        self._last_loss, self._accum_loss = self._accum_loss, 0.0
        self._log_step()

    @property
    def last_train_loss(self) -> float:
        return float(self._last_loss) if self._last_loss is not None else float("nan")

    def _log_step(self) -> None:
        step = self.global_step  # already advanced by the optimizer step
        now = time.perf_counter()
        if self._t_last is not None:
            self._time_timed += now - self._t_last
            self._tokens_timed += self.budget.tokens_per_step
        self._t_last = now
        if step % self.cfg.tracking.log_every and step != self.budget.steps:
            return
        check_loss(self.last_train_loss, step, self.cfg.model.vocab_size)  # at the logging cadence (a sync on GPU)
        tokens = step * self.budget.tokens_per_step
        m: dict[str, float] = {tracking.TRAIN_LOSS: self.last_train_loss, tracking.TOKENS: float(tokens),
                               tracking.FLOPS: float(tokens) * self.budget.flops_per_token}
        for g in self.optimizers().optimizer.param_groups:
            m[tracking.LR_PREFIX + g["name"]] = g["lr"]
        if (tps := self.tokens_per_s) is not None:
            m[tracking.TOKENS_PER_S] = tps
            if self.peak_flops:
                m[tracking.MFU] = self.mfu(tps)
        if torch.cuda.is_available():
            m[tracking.PEAK_MEMORY] = torch.cuda.max_memory_allocated() / 2**30
        m.update({tracking.coeff_metric(*k): v for k, v in self.model.value_coefficients().items()})
        self._log(m)

    def _log(self, metrics: dict[str, float]) -> None:
        # straight to the logger: Lightning's self.log steps by batches, MLflow should step by optimizer steps
        if self.logger is not None and self.trainer.is_global_zero:
            with ctrl_c_after():
                self.logger.log_metrics(metrics, step=self.global_step)

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self._t_last = None  # do not count validation time as training throughput

    # -- validation: exact sums of nats and bytes, reduced across ranks
    def on_validation_epoch_start(self):
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, bytes, tokens

    def validation_step(self, batch, batch_idx):
        x, y = batch
        nats = self.model(x, targets=y).sum()
        self._val += torch.stack([nats.double(), self.token_bytes[y].sum().double(),
                                  torch.tensor(float(y.numel()), dtype=torch.float64, device=self.device)])

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        nats, nbytes, ntok = total.tolist()
        self.val_metrics = {tracking.VAL_LOSS: nats / ntok, tracking.VAL_BPB: nats / (math.log(2) * nbytes)}
        self._log(self.val_metrics)


# ----------------------------------------------------------------------------- run
