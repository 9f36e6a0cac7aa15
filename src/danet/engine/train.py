"""The training loop: one code path for one process and many (torchrun), AMP, channels_last, compile, CUDA graphs
(engine/graphed.py), exact resume.

Per iteration i (global, 0-based): lr = poly(i); forward under autocast; CE on main/pam/cam (1) + aux (0.4);
SGD step (through a GradScaler for fp16). Each epoch ends with last.pth (and epoch_N.pth every save interval),
validation every eval interval (best.pth by mIoU). Everything lands in the work dir:

    config.yaml  log.jsonl  last.pth  best.pth  epoch_N.pth  metrics.json  curves.png  per_class_iou.png  confusion.png

Exact resume: data order and augmentation are functions of (seed, epoch, index) (`sampling.py`), the torch RNG is
re-seeded from (seed, iteration, rank) before every step, and checkpoints hold the model, optimizer, scheduler,
grad scaler, RNG states and the iteration; so stopping at any iteration (`stop_iter`) and resuming gives the same
weights as an uninterrupted run (bit for bit in deterministic mode).
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import checkpoints
from ..config import RunConfig, to_dict
from ..errors import DanetError, note, short
from ..files import make_dir
from ..models.danet import DANet
from ..models.fused_norm import use_fused_norm, why_unused
from ..models.norm_kernels import interpreted
from ..models.winograd import use_winograd
from . import distributed
from .evaluate import evaluate
from .fused_loss import fused_danet_loss
from .graphed import CudaGraphs, GraphedStep
from .inference import autocast
from .logging import LossWindow, RunLogger
from .losses import danet_loss, groups
from .run_files import (
    STAGED,
    FilesAround,
    WorkDirLock,
    after_divergence,
    draw_missing_pictures,
    draw_pictures,
    missing_pictures,
    resume_outputs,
    run_outputs,
    write_metrics,
)
from .sampling import EpochBatchSampler, mix, reference_replicas
from .schedule import PolyLR, build_optimizer, final_lr
from .start import (
    backbone_source,
    build_datasets,
    build_model,
    capture_state,
    check_resume_point,
    loader_workers,
    read_resume,
    restart_source,
    restore_state,
    set_deterministic,
)
from .transfer import labels_fit_uint8, loader_items, narrow_labels_collate, to_device

MAX_SKIPS_IN_A_ROW = 10  # nonfinite=skip: more non-finite losses in a row than this stop the run


def train(cfg: RunConfig, resume: str | Path | None = None) -> dict:
    """Run (or resume) a training run; returns the summary (final metrics, best mIoU, iterations, seconds)."""
    info = distributed.setup(cfg.device)
    threads = torch.get_num_threads()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # NOTE: cuDNN's default is on
    lock = WorkDirLock()
    try:
        return _train(cfg.resolve().validate(), restart_source(cfg, resume, info), info, lock)
    except BaseException:
        if info.is_main and lock.held:  # a staged run (overwrite, resume of an earlier checkpoint, fork) failing
            for name in STAGED:  # before it landed (not another run's files: this one holds the work dir)
                (Path(cfg.work_dir) / name).unlink(missing_ok=True)
        raise
    finally:
        lock.release()
        torch.set_num_threads(threads)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        distributed.cleanup()


def _train(cfg: RunConfig, resume, info: distributed.DistInfo, lock: WorkDirLock) -> dict:  # noqa: C901 - the loop, in one place
    preset = cfg.effective_preset()
    sch = cfg.schedule
    work = Path(cfg.work_dir)
    dev = info.device
    set_deterministic(cfg.deterministic, cfg.compile)
    if dev.type == "cpu":
        torch.set_num_threads(distributed.cpu_threads(cfg.threads))
    if sch.batch_size % info.world:
        raise DanetError(
            f"global batch {sch.batch_size} does not split over {info.world} processes; set schedule.batch_size to a "
            f"multiple of {info.world}"
        )
    groups(sch.batch_size // info.world, sch.loss_images)  # NOTE: refused here, not at the first step
    if info.distributed and dev.type == "cuda":  # NOTE: SyncBatchNorm: the statistics of every process's images
        preset.model.check_norm_values(
            sch.batch_size, preset.crop_size, "", "raise schedule.batch_size or data.crop_size"
        )
    else:
        remedy = f"raise schedule.batch_size to 2 per process or data.crop_size above {preset.model.output_stride}"
        preset.model.check_norm_values(sch.batch_size // info.world, preset.crop_size, " per process", remedy)
    if sch.loss_images > sch.batch_size // info.world and info.is_main:
        note(
            f"schedule.loss_images={sch.loss_images} but each of the {info.world} processes has "
            f"{sch.batch_size // info.world} image(s): the loss is reduced over each process's batch"
        )
    ckpt = read_resume(resume, cfg, preset, info.is_main) if resume else None

    earlier = run_outputs(work, keep=(cfg.init_checkpoint, cfg.backbone_weights)) if ckpt is None else []
    if earlier and not cfg.overwrite:  # never replace a run by accident (a kept best.pth without last.pth too)
        raise DanetError(
            f"{work} already holds a run ({short([p.name for p in earlier])}); continue it with --resume, start over "
            "there with --set overwrite=true, or pick another --work-dir"
        )
    train_ds, val_ds = build_datasets(cfg, preset, cfg.seed)  # first: a wrong data root fails at once
    if info.is_main:
        if work.exists() and not work.is_dir():
            raise DanetError(f"the work dir {work} is a file, not a folder; pick another --work-dir")
        try:
            make_dir(work)
        except OSError as e:
            raise DanetError(f"cannot create the work dir {work}: {e.strerror or e}; pick another --work-dir") from None
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    backbone = backbone_source(cfg, preset, info) if ckpt is None else None  # NOTE: a resume has its weights
    model = build_model(cfg, preset, backbone, info.is_main, resuming=ckpt is not None).to(dev)
    if model.cfg.align_corners and cfg.fused_loss:  # NOTE: its upsampling is align_corners=False's
        raise DanetError(
            "this model resizes its logits with align_corners=True (an mmseg 769x769 model), which fused_loss does "
            "not; train it without fused_loss"
        )
    use_winograd(model, cfg.conv == "winograd")  # same parameters and state-dict keys, another algorithm
    why = why_unused(dev, cfg.compile) if cfg.norm == "triton" else None
    use_fused_norm(model, cfg.norm == "triton" and why is None)  # the same again; under torchrun synchronised itself
    if why and info.is_main:  # NOTE: then plain BatchNorm2d, so torchrun on GPUs converts it to SyncBatchNorm
        note(f"norm=triton {why}; PyTorch's batch norm runs")
    loss_impl = cfg.fused_loss_impl
    if cfg.fused_loss and loss_impl == "triton" and dev.type != "cuda" and not interpreted():
        loss_impl = "chunked"  # the same values (to rounding) without Triton
        if info.is_main:
            note("fused_loss_impl=triton runs on CUDA only; the chunked fused loss runs")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt.state_dict)
        except RuntimeError as e:  # NOTE: another width, depth or class count: torch lists every tensor
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise DanetError(
                f"{resume} holds a model of another structure than this run's settings ({first.rstrip('.')}); resume "
                f"with the run's own settings: danet train {work / 'config.yaml'} --resume"
            ) from None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_train = min(len(train_ds), cfg.data.train_limit or len(train_ds))  # train_limit: the first N images
    # NOTE: each epoch padded over the reference's GPUs as its DistributedSampler pads it (Cityscapes: 372 batches)
    replicas = reference_replicas(sch.batch_size, sch.loss_images)
    sampler = EpochBatchSampler(
        n_train, sch.batch_size, info.world, info.rank, cfg.seed, sch.iters_per_epoch, pad_to=replicas
    )
    ipe = sampler.iters_per_epoch
    if ipe == 0:
        raise DanetError(f"{n_train} train images make no batch of {sch.batch_size}; lower schedule.batch_size")
    total = sch.epochs * ipe
    from ..data import worker_init_fn

    narrow = labels_fit_uint8(preset.num_classes, preset.dataset.ignore_index)
    cfg.data.num_workers = loader_workers(cfg.data.num_workers, dev)  # before config.yaml is written: it says so

    loader = DataLoader(
        train_ds,  # NOTE: indexed with (index, item_seed) pairs: the sampler decides every item's augmentation
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        worker_init_fn=worker_init_fn,
        collate_fn=narrow_labels_collate if narrow else None,  # uint8 labels when they fit: 8x less to copy
        pin_memory=dev.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),  # NOTE: keeps the loader off the global torch RNG
    )

    net = distributed.wrap_model(model, info)
    raw = net.module if info.distributed else net
    optimizer = build_optimizer(raw, sch.lr, sch.momentum, sch.weight_decay)
    scheduler = PolyLR(optimizer, sch.lr, total, sch.power, final_lr(sch.lr, sch.min_lr))
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "fp16")
    step_net = torch.compile(net) if cfg.compile else net

    it, best, best_iter, pending = 0, -math.inf, None, False
    resumed = None
    if ckpt is not None:
        ts = ckpt.train_state
        # NOTE: before config.yaml is rewritten
        check_resume_point(ts, resume, sch, ipe, n_train // sch.batch_size, replicas, cfg.stop_iter)
        # pending: stopped while validating, that epoch's validation first
        it, best, best_iter, pending = restore_state(ts, optimizer, scheduler, scaler)
        resumed = resume_outputs(work, Path(resume), it, ipe)  # NOTE: also refuses a fork into another run
        if it == total and not pending:
            if info.is_main:
                print(f"{resume} has finished its {total} iterations: nothing left to train (raise schedule.epochs)")
                if not resumed.fork and missing_pictures(work):  # NOTE: else it writes nothing (a read-only dir)
                    lock.acquire(work)
                    draw_missing_pictures(work, preset, it)
            return {"metrics": {}, "best_miou": best, "best_iter": best_iter, "iter": it, "seconds": 0.0,
                    "stopped": False, "skipped": 0, "finished": True, "rank": info.rank}  # fmt: skip
        if resumed.best_lost and best_iter is not None:  # NOTE: so that best.pth and the best mIoU stay one file
            best, best_iter = -math.inf, None
        if info.is_main and resumed.later:
            note(
                f"{resume} is at iteration {it}; the files of this work dir from after it ("
                f"{', '.join(p.name for p in resumed.later)}) go with this run's first checkpoint"
            )

    # NOTE: overwrite=true, a resume from an earlier checkpoint, a fork: this run's config.yaml and log.jsonl are
    # staged until its first checkpoint, so that a run failing before it leaves the folder as it was
    staged, resume_iter = bool(earlier) or bool(resumed and resumed.staged), it if ckpt is not None else None
    if info.is_main:  # NOTE: before this run's first write; released by train() when the run ends, however it ends
        lock.acquire(work)
    history = Path(resume).parent / "log.jsonl" if resumed and resumed.fork else None  # a fork's log so far
    logger = RunLogger(work, info.is_main, resume_iter, revalidate=pending, staged=staged, history=history)
    recorded = dataclasses.replace(cfg, overwrite=False)  # NOTE: rerunning config.yaml must not wipe this run
    config_file = work / (STAGED[0] if staged else "config.yaml")
    if info.is_main:
        recorded.save(config_file)
        logger.log("start", iter=it, total_iters=total, iters_per_epoch=ipe, world=info.world, device=str(dev))
    around = FilesAround(work, earlier, resumed, staged, config_file, logger, info.is_main)  # settled at 1st checkpoint

    def save(name: str, epoch: int, with_state: bool = True, validation_pending: bool = False) -> None:
        losses = window.state() if with_state else None  # NOTE: a collective: every rank saves at the same steps
        if not info.is_main:
            return
        bad = [k for k, v in raw.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # never overwrite a good checkpoint with a diverged model
            raise DanetError(
                f"weights became non-finite by iteration {it} (e.g. {bad[0]}); lower schedule.lr (now {sch.lr:g}) and "
                + after_divergence(work, ours=around.settled)
            )
        state = None
        if with_state:
            state = capture_state(optimizer, scheduler, scaler, it, epoch, ipe, best, best_iter, validation_pending)
            state["run"] = info.run  # which torchrun invocation wrote it (restart_source)
            state["loss_window"] = losses  # the steps since the last log line
        meta = {"config": to_dict(recorded), "epoch": epoch, "iter": it, "best_miou": best}
        checkpoints.save_checkpoint(work / name, raw, preset, train_state=state, extra_meta=meta)
        around.landed(work / name)

    metrics: dict = {}
    start_iter = it
    t_start = time.time()
    bar = tqdm(
        total=total,
        initial=it,
        desc="train",
        unit="it",
        dynamic_ncols=True,
        disable=not (cfg.progress and info.is_main),
    )
    window = LossWindow(sch.batch_size, dev)
    if ckpt is not None:
        window.restore(ckpt.train_state.get("loss_window"))
    stopped = False
    loss_args = dict(variant=cfg.loss, aux_weight=cfg.aux_weight, ignore_index=preset.dataset.ignore_index,
                     images=sch.loss_images)  # fmt: skip
    loss_fn = (
        partial(fused_danet_loss, impl=loss_impl, **loss_args) if cfg.fused_loss else partial(danet_loss, **loss_args)
    )
    skipped = in_a_row = 0  # steps skipped for a non-finite loss (nonfinite=skip): in all, and in a row now
    # nonfinite=skip: the batch norms' statistics before each step, put back when it is skipped (a NaN input poisons
    # them in the forward, before the loss shows it)
    buffers = [b for b in raw.buffers() if b.numel()] if cfg.nonfinite == "skip" else []
    saved = [b.clone() for b in buffers]
    graphed = None
    no_graphs = GRAPH_BACKEND.why_unused(dev, info.world) if cfg.cuda_graphs else None
    if no_graphs and info.is_main:
        note(f"cuda_graphs {no_graphs}; eager steps run")
    if cfg.cuda_graphs and not no_graphs:

        def forward_backward(images: torch.Tensor, labels: torch.Tensor) -> dict:
            with autocast(dev, cfg.amp):
                outputs = step_net(images, resize=not cfg.fused_loss)
            losses = loss_fn(outputs, labels)
            losses["loss"].backward()  # NOTE: no GradScaler here: the config check refuses fp16 with cuda_graphs
            return {k: v.detach() for k, v in losses.items()}

        graphed = GraphedStep(forward_backward, raw.parameters(), GRAPH_BACKEND(dev))
    if cfg.norm == "triton" and why is None and graphed is None and info.is_main:
        note(
            "without cuda_graphs=true the fused batch norm's extra kernel launches can make a step slower (on "
            "an H200, R50-D8 512x512 batch 8: 124.6 img/s eager vs 161.5 with PyTorch's, 196.2 replayed)"
        )

    def validate_epoch(done: int) -> None:
        """Validate after epoch `done`: log it, keep best.pth, write metrics.json. NOTE: after last.pth of the epoch
        marked pending (metrics.json never runs ahead of the checkpoints), before the one that says it is done (a
        stop in between validates again)."""
        nonlocal metrics, best, best_iter
        try:
            metrics = validate(raw, val_ds, preset, cfg, info)
        except DanetError as e:
            raise DanetError(f"{e} (validating epoch {done}; its training is in last.pth: --resume)") from None
        logger.log("val", iter=it, epoch=done, **_scalars(metrics), IoU=metrics["IoU"])
        if info.is_main:
            bar.write(f"epoch {done}/{sch.epochs} iter {it}: mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f}")
        if metrics["mIoU"] > best:
            best, best_iter = metrics["mIoU"], it
            save("best.pth", done, with_state=False)
        if info.is_main:
            write_metrics(work, metrics, best, best_iter, it, done, time.time() - t_start)

    def save_epoch(done: int) -> None:
        save("last.pth", done)
        if done % sch.save_interval == 0:
            save(f"epoch_{done}.pth", done)

    if pending:  # the run stopped while validating epoch it // ipe: that validation, before the next epoch
        validate_epoch(it // ipe)
        save_epoch(it // ipe)
        stopped = cfg.stop_iter is not None and cfg.stop_iter <= it < total  # it was stopped there
    net.train()
    for epoch in range(it // ipe, sch.epochs if not stopped else 0):
        sampler.set_epoch(epoch, start=it % ipe)
        for images, labels in to_device(_batches(loader), dev, cfg.channels_last, cfg.data.prefetch):
            torch.manual_seed(mix(cfg.seed, "step", it, info.rank))  # dropout: a function of the iteration
            lr = scheduler.step()
            _copy_all(saved, buffers)
            if graphed is not None:  # forward, loss and backward (replayed from the fourth step on)
                losses = graphed(images, labels)
            else:
                with autocast(dev, cfg.amp):
                    outputs = step_net(images, resize=not cfg.fused_loss)
                losses = loss_fn(outputs, labels)
            values = {k: v.item() for k, v in losses.items()}
            # NOTE: checked before the step, so the weights stay good; on every rank at once (DDP: no rank may step
            # alone, or the others wait in its all-reduce)
            if distributed.any_rank(not math.isfinite(values["loss"]), dev):
                in_a_row += 1
                if cfg.nonfinite == "stop" or in_a_row > MAX_SKIPS_IN_A_ROW:
                    hint = " or try amp=bf16" if cfg.amp == "fp16" else ""
                    loss = values["loss"] if not math.isfinite(values["loss"]) else "non-finite on another rank"
                    when = f"at iteration {it + 1}" + (f", {in_a_row} times in a row" if in_a_row > 1 else "")
                    then = after_divergence(work, ours=around.settled)
                    raise DanetError(f"loss became {loss} {when}; lower schedule.lr (now {sch.lr:g}){hint} and {then}")
                _copy_all(buffers, saved)  # the skipped step's forward changed no statistics either
                skipped += 1
                logger.log("skip", iter=it + 1, epoch=epoch + 1, loss=values["loss"])
                if info.is_main:
                    bar.write(f"iteration {it + 1}: non-finite loss (here {values['loss']:g}); step skipped")
            else:
                in_a_row = 0
                if graphed is None:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(losses["loss"]).backward()
                scaler.step(optimizer)
                scaler.update()
                window.add(values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            it += 1
            bar.update(1)
            if window.steps and (it % cfg.log_interval == 0 or it == total):
                rec, img_s, steps_s = window.record()
                rate = bar.format_dict.get("rate") or steps_s
                elapsed, eta = round(time.time() - t_start, 2), round((total - it) / max(rate, 1e-9), 1)
                logger.log(
                    "train", iter=it, epoch=epoch + 1, lr=lr, img_s=round(img_s, 2), elapsed_s=elapsed, eta_s=eta, **rec
                )
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}")
            if cfg.stop_iter is not None and it >= cfg.stop_iter and it % ipe:
                save("last.pth", epoch)  # mid-epoch stop: resume continues from this batch
                stopped = True
                break
        if stopped:
            break
        done = epoch + 1
        validated = done % sch.eval_interval == 0 or done == sch.epochs
        if validated:
            # NOTE: saved first, so that a failure or a stop while validating (a corrupt val image, met by any
            # process; Ctrl-C) keeps the epoch's training, and a resume validates it; saved again below
            save("last.pth", done, validation_pending=True)
            validate_epoch(done)
        save_epoch(done)
        if cfg.stop_iter is not None and it >= cfg.stop_iter and it < total:  # NOTE: at the end it has finished
            stopped = True
            break
    bar.close()
    seconds = time.time() - t_start
    logger.log("end", iter=it, seconds=round(seconds, 2), stopped=stopped, best_miou=best, skipped=skipped)
    logger.close()
    if info.is_main:  # NOTE: also at a stop_iter: the curves so far (a resumed run draws them again at its end)
        draw_pictures(work, preset, metrics, stopped)
    distributed.barrier()
    return {
        "metrics": metrics,
        "best_miou": best,
        "best_iter": best_iter,
        "iter": it,
        "start_iter": start_iter,  # where this call began (a resume: the checkpoint's iteration)
        "seconds": seconds,  # of this call
        "stopped": stopped,
        "skipped": skipped,
        "rank": info.rank,
    }


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


GRAPH_BACKEND = CudaGraphs  # NOTE: a module-level name: tests put a CPU stand-in here
_batches = loader_items  # NOTE: a module-level name: tests and the GPU suite wrap it to watch the batches


def validate(model: DANet, val_ds, preset, cfg: RunConfig, info: distributed.DistInfo) -> dict:
    """Metrics of `model` on the val split (sharded over the ranks, confusion matrix all-reduced)."""
    distributed.broadcast_buffers(model)
    cm = evaluate(
        model,
        val_ds,
        preset.num_classes,
        device=info.device,
        mode=cfg.eval_mode,
        crop=preset.crop_size,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        ignore_index=preset.dataset.ignore_index,
        limit=cfg.data.val_limit,
        progress=cfg.progress,
    )
    n = min(len(val_ds), cfg.data.val_limit or len(val_ds))
    cm.check_labelled(n, preset.dataset.val_split, preset.dataset)  # NOTE: else mIoU NaN and no best.pth
    return {**cm.compute(), "confusion": cm.mat.cpu().tolist()}  # (K, K): rows label, columns prediction


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
