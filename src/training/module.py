"""The LightningModule shared by every recipe: a formulation around one backbone (docs/training.md).

Randomness in a training step (timesteps, noise, conditioning dropout) is drawn for the global batch from
generators seeded by (seed, stream, global step) and sliced per rank, and the embedded datasets draw their batches
the same way: a run resumed from a checkpoint ends with exactly the weights of an uninterrupted one on the CPU, and
DDP over any number of ranks sees the draws of one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from src.formulations import validation_times
from src.formulations.base import Formulation, expand_like
from src.models.perf import (
    AUTO_BOOL, COMPILE_BACKENDS, check_choice, compile_backbone, compile_setting, is_sharded, resolve_auto,
)
from src.training.conditioning import draw_drops, drop_conditioning
from src.training.ema import ema_update, make_ema_copy
from src.training.streams import NOISE, STREAMS, TIMES, VALIDATION, step_generator

#: How often a GPU run reads back the training loss to check it is finite (train.loss_check_every=auto). Reading a
#: device value waits for the GPU: every step, the host stalls mid-step and the GPU idles while the next kernels are
#: queued. In between, the first non-finite loss is kept on the device, so the error still names its step, and a
#: checkpoint is never written after it (the check also runs before every save). The CPU checks every step.
LOSS_CHECK_EVERY = 50


class FormulationModule(L.LightningModule):
    """One recipe: formulation + backbone + EMA copy, AdamW with linear warm-up, stratified validation loss."""

    def __init__(
        self,
        formulation: Formulation,
        backbone: nn.Module,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        ema_every: int = 100,
        ema_decay: float = 0.99,
        cond_dropout: float = 0.1,
        cond_groups: Sequence[dict] | None = None,
        val_levels: int = 8,
        shift: float = 1.0,
        seed: int = 0,
        compile: bool | str = False,
        compile_backend: str | None = None,
        fused: bool | str = "auto",
        streams: int = STREAMS,
        loss_check_every: int | str = "auto",
        val_chunk: int | None = None,
    ):
        super().__init__()
        self.formulation = formulation
        self.backbone = backbone
        self.ema_backbone = make_ema_copy(backbone)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.warmup_steps = warmup_steps
        self.ema_every, self.ema_decay = ema_every, ema_decay
        self.cond_dropout, self.cond_groups = cond_dropout, cond_groups
        self.seed, self.streams = seed, streams
        self.shift = shift  # the resolution-dependent shift of the training times (1.0: none)
        self.register_buffer("val_t", validation_times(formulation, val_levels), persistent=False)
        self.compile_backbone = compile_setting(compile)
        if compile_backend is not None:
            check_choice("compile_backend", compile_backend, COMPILE_BACKENDS)
        self.compile_mode = compile_backend  # torch.compile's mode; None: the backbone's own compile_backend
        check_choice("optim.fused", fused, AUTO_BOOL)
        self.fused_adamw = fused
        if not (loss_check_every == "auto" or (type(loss_check_every) is int and loss_check_every >= 1)):
            raise ValueError(f"train.loss_check_every={loss_check_every}: must be auto or an integer >= 1")
        self.loss_check_every, self._loss_check_every = loss_check_every, 1  # the latter: resolved at fit start
        self._bad_step: Tensor | None = None  # the first step with a non-finite loss since the last check (-1: none)
        self._bad_loss: Tensor | None = None
        # Validation's fixed batch (data.val_samples, 1024 under experiment=paper) runs in chunks of the per-rank
        # training batch (val_chunk: the global training batch), which fits where training does; in one forward it
        # was a memory peak of its own. None: the whole batch at once.
        self.val_chunk = val_chunk
        object.__setattr__(self, "_train_forward", backbone)

    def on_fit_start(self) -> None:
        # After the strategy's setup: under FSDP, `self.backbone` is now the sharded wrapper, and the training
        # forward must go through it (it gathers the weights). torch.compile wraps that handle for the training
        # forward only; `self.backbone` stays the one that is saved and averaged (compiled modules prefix
        # state-dict keys with `_orig_mod.`). Regional compilation ("blocks") compiles the blocks in place and
        # keeps the keys. "auto" resolves by device (src/models/perf.py): blocks on a GPU, eager on the CPU.
        backend = self.compile_mode or getattr(self.backbone, "compile_backend", "default")
        forward = compile_backbone(self.backbone, self.compile_backbone, self.device.type, backend)
        object.__setattr__(self, "_train_forward", forward)
        every = self.loss_check_every
        self._loss_check_every = (1 if self.device.type == "cpu" else LOSS_CHECK_EVERY) if every == "auto" else every

    # ---- the model as the formulation sees it -----------------------------------------------------
    def denoiser_output(self, backbone: nn.Module, z_t: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        """Raw backbone output at (z_t, t): backbone(c_in(t) z_t, c_noise(t), context, pooled)."""
        f = self.formulation
        return backbone(expand_like(f.c_in(t), z_t) * z_t, f.c_noise(t), context, pooled)

    def _loss(self, backbone, x0, eps, t, context, pooled) -> Tensor:
        z_t = self.formulation.add_noise(x0, eps, t)
        out = self.denoiser_output(backbone, z_t, t, context, pooled)
        return self.formulation.loss(out.float(), x0.float(), eps.float(), t)

    # ---- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, context, pooled = batch["x0"], batch["context"], batch["pooled"]
        # Drawn for the global batch and sliced per rank (see the module docstring). The noise, the large draw,
        # comes from a generator on the data's device so a GPU step does not wait for the CPU.
        n, rank, world = x0.shape[0], self.global_rank, self._world_size()
        rows = slice(rank * n, (rank + 1) * n)
        g = step_generator(self.seed, self.global_step, TIMES, streams=self.streams)
        t = self.formulation.shift_t(self.formulation.sample_t(n * world, generator=g), self.shift)[rows].to(x0.device)
        n_groups = len(self.cond_groups) if self.cond_groups else 1
        drop = draw_drops(n * world, n_groups, self.cond_dropout, g)[rows]
        g_noise = step_generator(self.seed, self.global_step, NOISE, device=x0.device, streams=self.streams)
        eps = torch.randn((n * world, *x0.shape[1:]), generator=g_noise, device=x0.device)[rows]
        context, pooled = drop_conditioning(context, pooled, drop, self.cond_groups)
        loss = self._loss(self._train_forward, x0, eps, t, context, pooled).mean()
        self._watch_loss(loss.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer else 1  # 1 outside a Trainer (tests, the benchmark)

    def _watch_loss(self, loss: Tensor) -> None:
        """Keep the first non-finite loss on the device, no sync (LOSS_CHECK_EVERY); checked every step on the CPU."""
        if self._loss_check_every == 1:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}")
            return
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, self.global_step, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)

    def check_loss(self) -> None:
        """FloatingPointError naming the first step whose training loss was not finite, if any since the last check.
        Under DDP every rank stops at the same check (a rank that went on alone would wait in the next collective):
        the earliest bad step over the ranks is taken."""
        if self._bad_step is None:
            return
        none = torch.iinfo(torch.long).max
        step = torch.where(self._bad_step < 0, none, self._bad_step)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        first, own = int(step), int(self._bad_step)  # the sync
        if first == none:
            return
        value = float(self._bad_loss) if own == first else "not finite (on another rank)"
        raise FloatingPointError(f"training loss is {value} at step {first}")

    def check_weights(self) -> None:
        """FloatingPointError when the weights or their EMA are not finite: the update of the last step diverged,
        though every loss so far was finite (its loss was computed before it). One sync; under FSDP each rank checks
        its shards and all stop together."""
        params = [p.detach() for m in (self.backbone, self.ema_backbone) for p in m.parameters() if p.numel()]
        if not params:
            return
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).any().to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if int(bad):
            raise FloatingPointError(f"the weights are not finite after {self.global_step} training steps (the last "
                                     "update diverged; every training loss was finite)")

    def check_finite(self) -> None:
        """check_loss, then check_weights: the first non-finite loss is named before the weights it spoiled."""
        self.check_loss()
        self.check_weights()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._loss_check_every > 1 and self.global_step % self._loss_check_every == 0:
            self.check_loss()

    def on_validation_start(self) -> None:
        self.check_finite()  # validating diverged weights would only log NaN (and best.ckpt could take them)

    def on_train_end(self) -> None:
        self.check_finite()  # the last steps since the last check, before the evaluation of the trained model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Before the file is written: a checkpoint is never taken of weights trained past a non-finite loss, nor of
        # weights a step's update made non-finite.
        self.check_finite()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks run before the module's batch-end hook, and a
        # checkpoint must hold the EMA of the weights it holds. Lightning counts this step in global_step only once
        # this hook returns: this is step global_step + 1 (read as is, the EMA averaged steps 1, 1 + every, ...).
        # Under FSDP both backbones are sharded alike (src/launch/strategies.py), so each rank averages its shard.
        if (self.global_step + 1) % self.ema_every == 0:
            ema_update(self.ema_backbone, self.backbone, self.ema_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Under FSDP Lightning refuses norm clipping at the first step (its precision plugin has no handle on the
        # root module); the root's own clip_grad_norm_ takes the norm over every rank's shards (a collective).
        root = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and is_sharded(root):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        # Fused AdamW (one kernel for all parameters) where optim.fused asks; "auto" = on CUDA only, so the CPU
        # keeps the default (foreach) update and its exact numerics. Same update rule either way.
        params = list(self.backbone.parameters())
        fused = self._fused_kernel(params[0].device.type if params else "cpu")
        opt = torch.optim.AdamW(
            params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, fused=fused
        )
        warmup = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _fused_kernel(self, device_type: str) -> bool | None:
        return resolve_auto(self.fused_adamw, device_type) or None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # torch's Optimizer.load_state_dict takes each parameter group's settings from the checkpoint, the AdamW kernel
        # (`fused`) included: a run resumed under another optim.fused (or, under "auto", on another device) kept the
        # one it was saved with. Set to the configured kernel here, before Lightning loads the optimizer state.
        fused = self._fused_kernel(self.trainer.strategy.root_device.type)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["fused"] = fused

    # ---- stratified validation loss (docs/evaluation.md#validation-loss) --------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0, context, pooled = batch["x0"], batch["context"], batch["pooled"]
        # Fixed noise from an evaluation generator, separate from training's.
        g = step_generator(self.seed, batch_idx, VALIDATION, streams=self.streams)
        eps = torch.randn(x0.shape, generator=g)
        n, world = x0.shape[0], self._world_size()
        # Every rank holds the whole fixed batch and validates its own ceil(n / world) rows of it; the per-level
        # sums are added over the ranks. A rank short of rows repeats its last one with weight 0, so every rank
        # runs the same number of forwards (FSDP gathers weights in each, with every rank).
        per_rank = -(-n // world)
        rows = torch.arange(self.global_rank * per_rank, (self.global_rank + 1) * per_rank)
        weight = (rows < n).to(x0.device, torch.float32)
        rows = rows.clamp(max=n - 1)
        x0, eps, context, pooled = x0[rows], eps[rows].to(x0.device), context[rows], pooled[rows]
        size = per_rank if self.val_chunk is None else max(1, self.val_chunk // world)
        for tag, backbone in (("val", self.backbone), ("val_ema", self.ema_backbone)):
            sums = []
            for tk in self.val_t.tolist():
                t = torch.full((per_rank,), tk, device=x0.device)
                losses = torch.cat([self._loss(backbone, x0[i:i + size], eps[i:i + size], t[i:i + size],
                                               context[i:i + size], pooled[i:i + size])
                                    for i in range(0, per_rank, size)])
                sums.append((losses * weight).sum())
            levels = torch.stack(sums)
            if self._trainer:  # one collective per backbone; the levels are then equal on every rank
                levels = self.trainer.strategy.reduce(levels, reduce_op="sum")
            levels = levels / n
            if not bool(torch.isfinite(levels[:-1]).all()):  # equal on every rank: all stop together
                # Weights finite but so large that the forward overflows: best.ckpt would take them (a NaN score
                # counts as inf, and the first validation always saves), and the evaluation would sample them.
                raise FloatingPointError(f"{tag}/loss_mean is {float(levels[:-1].mean())} after {self.global_step} "
                                         "training steps (the weights diverged; every training loss was finite)")
            for k, loss_k in enumerate(levels):
                self.log(f"{tag}/loss_t{k}", loss_k, on_epoch=True, batch_size=n, sync_dist=True)
            # Mean over all levels but the last (t = 1), as the paper reports it.
            self.log(f"{tag}/loss_mean", levels[:-1].mean(), on_epoch=True, prog_bar=tag == "val_ema",
                     batch_size=n, sync_dist=True)
