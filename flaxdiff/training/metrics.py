"""The training log: images per second of training time, one metrics.jsonl line per
--logging_steps, and the loss curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class Throughput:
    """Images per second of training time only (pauses for sampling and saving excluded)."""

    def __init__(self):
        self.images, self.seconds, self.since = 0, 0.0, None

    def start(self) -> None:
        self.since = time.perf_counter()

    def pause(self) -> None:
        if self.since is not None:
            self.seconds += time.perf_counter() - self.since
            self.since = None

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float | None:
        """The rate since the last call (call it after a device sync), then start a new window."""
        running = self.since is not None
        self.pause()
        rate = self.images / self.seconds if self.images and self.seconds > 0 else None
        self.images, self.seconds = 0, 0.0
        if running:
            self.start()
        return rate


class MetricsLog:
    """metrics.jsonl: one JSON line per logging step (process 0 writes)."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write

    def trim(self, last_step: int) -> None:
        """On resume, drop lines past the checkpoint: the resumed run writes them again."""
        if self.write and self.path.exists():
            lines = [line for line in self.path.read_text().splitlines()
                     if line.strip() and json.loads(line).get("step", 0) <= last_step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def append(self, row: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def log_row(step: int, epoch: int, fetched: list, rate: float | None, images_per_step: int,
            flops_per_step: float | None, peak_flops: float | None) -> dict:
    """One metrics.jsonl line: the window's mean loss, the last step's lr / grad norm / EMA decay,
    images/s, and the model FLOP/s (with MFU where the devices' peak is known)."""
    losses = np.concatenate([np.asarray(m["loss"]) for m in fetched])
    last = fetched[-1]
    row = {"step": step, "epoch": epoch, "loss": float(losses.mean()),
           "lr": float(last["lr"][-1]), "grad_norm": float(last["grad_norm"][-1]), "images_per_sec": rate}
    if "ema_decay" in last:
        row["ema_decay"] = float(last["ema_decay"][-1])
    if rate and flops_per_step:
        row["flops_per_sec"] = flops_per_step * rate / images_per_step
        if peak_flops:
            row["mfu"] = row["flops_per_sec"] / peak_flops
    return row


def plot_loss_curve(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [r for r in rows if "loss" in r]
    validations = [r for r in rows if "val_bpd" in r]
    if not losses:
        return
    fig, axes = plt.subplots(1, 2 if validations else 1, figsize=(11 if validations else 6, 3.5), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if validations:  # held-out bits/dim beside it (the same draws each time, so the points compare)
        ax = axes[0][1]
        ax.plot([r["step"] for r in validations], [r["val_bpd"] for r in validations], "o-", lw=1,
                label="training weights")
        if "val_bpd_ema" in validations[0]:
            ax.plot([r["step"] for r in validations], [r["val_bpd_ema"] for r in validations], "o-", lw=1,
                    label="EMA")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out bits/dim")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


class Progress:
    """The progress bar, the throughput meter and metrics.jsonl of a run. The loop's only host
    syncs are here, at --logging_steps (and the last step)."""

    def __init__(self, start_step: int, total_steps: int, logging_steps: int, steps_per_epoch: int,
                 images_per_step: int, log: MetricsLog, show: bool, logger=None):
        from tqdm.auto import tqdm

        self.total_steps, self.logging_steps, self.steps_per_epoch = total_steps, logging_steps, steps_per_epoch
        self.images_per_step, self.log, self.show, self.logger = images_per_step, log, show, logger
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not show, desc="training", unit="step",
                        dynamic_ncols=True)
        self.meter = Throughput()
        self.pending: list = []
        self.last_loss = float("nan")
        self.last_validation: dict = {}
        self.flops_per_step: float | None = None  # the model's FLOPs per optimizer step
        self.peak_flops: float | None = None  # of all devices together, where known

    def write(self, text: str) -> None:
        if self.show:
            self.bar.write(text)

    def dispatched(self, step: int, count: int, metrics, first: bool) -> None:
        """After a dispatch of `count` steps ending at `step`; `first`: it included the compile."""
        from .. import parallel

        self.pending.append(metrics)
        if first:  # time training only: the meter starts after the first (compiling) dispatch
            self.meter.start()
        else:
            self.meter.add(count * self.images_per_step)
        self.bar.update(count)
        if step % self.logging_steps and step != self.total_steps:
            return
        fetched = [{k: parallel.to_host(v) for k, v in m.items()} for m in self.pending]  # the host sync
        row = log_row(step, (step - 1) // self.steps_per_epoch, fetched, self.meter.rate(), self.images_per_step,
                      self.flops_per_step, self.peak_flops)
        self.log.append(row)
        if self.logger is not None:
            self.logger.log(step, row)
        self.last_loss, self.pending = row["loss"], []
        self.show_postfix(row)

    def validated(self, row: dict) -> None:
        self.last_validation = {k: v for k, v in row.items() if k.startswith("val_bpd") and not k.endswith("_se")}

    def show_postfix(self, row: dict) -> None:
        rate = row["images_per_sec"]
        shown = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "img_s": f"{rate:.1f}" if rate else "-"}
        shown.update({k.replace("val_bpd", "val"): f"{v:.3f}" for k, v in self.last_validation.items()})
        self.bar.set_postfix(shown)

    def close(self) -> None:
        self.bar.close()
