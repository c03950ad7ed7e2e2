"""`fit`: a training loop that knows nothing about PEFT.

It optimises exactly the parameters that require grad (AdamW, linear warm-up then linear decay,
clipping, accumulation), evaluates on a schedule, stops early, shows one progress bar, writes
atomic checkpoints and resumes from them bit for bit, and refuses to go on after a NaN loss.

Resuming compares before it loads. Each checkpoint records the run: its TrainConfig (less
progress, device and where checkpoints go), its data signature (examples, batches per epoch,
batch size, the order's seed, a digest of the example lengths, validation size), the method
spec and the trainable parameters' names and shapes. `resume=True` refuses a checkpoint whose
record differs, naming each changed field; `resume="force"` continues anyway with a warning.
Launched by `torchrun --nproc_per_node=N` it runs data-parallel (gloo on CPU, nccl on GPU):
each rank takes its slice of the same global batch, and only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.loaders import EpochBatchSampler
from ..layers.dropout import set_attention_dropout, use_fast_dropout
from ..runtime import cpu_has_bf16, resolve_device
from . import checkpoint as ckpt
from .metrics import evaluate, model_logits, to_device


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or inf; training stopped before the bad step was applied."""


class ResumeMismatch(ckpt.CheckpointError):
    """resume=True found a checkpoint of a differently configured run; nothing was loaded."""


_NOT_COMPARED = ("progress", "device", "checkpoint_dir", "checkpoint_every")  # change nothing that is computed


def run_record(cfg, sampler, batches_per_epoch: int, val_loader, named: dict, spec) -> dict:
    """What identifies a run, as a checkpoint records it (JSON types only)."""
    data = {"batches_per_epoch": batches_per_epoch, "batch_size": cfg.batch_size}
    if sampler is not None:
        lengths = json.dumps(list(sampler.lengths)).encode()
        data.update(train_examples=len(sampler.lengths), order_seed=sampler.seed, bucket=sampler.bucket,
                    drop_last=sampler.drop_last, lengths_sha256=hashlib.sha256(lengths).hexdigest())
    val = getattr(val_loader, "dataset", None)
    if val is not None and hasattr(val, "__len__"):
        data["val_examples"] = len(val)
    config = {k: v for k, v in asdict(cfg).items() if k not in _NOT_COMPARED}
    if config.get("validate") is True:  # added later: absent at its default, so older checkpoints still resume
        config.pop("validate")
    record = {"config": config, "data": data,
              "method": spec, "trainable": {n: list(p.shape) for n, p in named.items()}}
    return json.loads(json.dumps(record, default=str))  # as it reads back from state.json


def _flat(d, prefix=""):
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def run_differences(saved: dict | None, now: dict) -> list[str]:
    """Each field where the checkpoint's run record and this run's differ, in words."""
    saved = saved if isinstance(saved, dict) else {}
    out = []
    for part in ("config", "data", "method", "trainable"):
        if part not in saved:
            out.append(f"{part}: not recorded in the checkpoint (written by an older peftkit)")
        elif part == "trainable":
            if saved[part] != now[part]:
                out.append("the trainable parameters (their names or shapes: another method or model)")
        elif saved[part] != now[part]:
            a, b = _flat(saved[part], f"{part}."), _flat(now[part], f"{part}.")
            for k in sorted(set(a) | set(b)):
                if a.get(k, "(absent)") != b.get(k, "(absent)"):
                    out.append(f"{k} is {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now")
    return out


def _method_spec(model, spec):
    """The method spec to record: `spec` if given, else the one peftkit.apply left on the model
    (read by duck typing: fit imports nothing of PEFT), else None."""
    if spec is not None:
        return spec
    method = getattr(getattr(model, "peftkit", None), "method", None)
    return method.to_dict() if hasattr(method, "to_dict") else None


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 5e-4                # fit knows no methods: experiments and the CLI pass Method.default_lr
    batch_size: int = 32            # the global batch; the loaders are built with it
    weight_decay: float = 0.0       # applied to matrices only, never to biases or norms
    warmup_ratio: float = 0.06      # the BERT/RoBERTa fine-tuning recipe
    grad_clip: float | None = 1.0   # max global grad norm; None turns clipping off
    grad_accumulation: int = 1      # micro-batches per optimizer step
    eval_every: int | None = None   # optimizer steps between evaluations; None: each epoch
    validate: bool = True           # False: never evaluate on the validation loader (no val_* columns), for runs
                                    # that choose nothing on it: an evaluation pass costs about a sixth of a quick run
    patience: int | None = None     # evaluations without improvement before stopping
    monitor: str = "f1_macro"       # the validation metric patience watches (higher is better)
    seed: int = 0
    device: str = "auto"            # "auto": cuda, then mps, then cpu
    bf16: bool = True               # bf16 autocast on cuda
    cpu_bf16: bool = False          # bf16 autocast on cpu too: faster only where the CPU has AVX512-BF16 or AMX
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None  # optimizer steps; None: each epoch
    max_steps: int | None = None    # stop after this many optimizer steps (smoke runs)
    attention_dropout: float | None = None  # None: the model's own (MiniLM: 0.1); 0 lets CPU attention use its fused kernel
    fast_dropout: bool = False      # swap nn.Dropout for peftkit.dropout.FastDropout: same p, half the cost on CPU, another random stream
    progress: bool = True

    def __post_init__(self):
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be positive or None"),
            (isinstance(self.grad_accumulation, int) and self.grad_accumulation >= 1, "grad_accumulation must be an integer >= 1"),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be >= 1 or None"),
            (self.patience is None or self.patience >= 1, "patience must be >= 1 or None"),
            (self.device in ("auto", "cpu", "mps") or str(self.device).startswith("cuda"), "device must be auto, cpu, cuda[:N] or mps"),
            (self.monitor in ("accuracy", "f1_macro", "f1_weighted", "neg_loss"), "monitor must be accuracy, f1_macro, f1_weighted or neg_loss"),
            (self.attention_dropout is None or 0 <= self.attention_dropout < 1, "attention_dropout must be in [0, 1) or None"),
            (isinstance(self.cpu_bf16, bool), "cpu_bf16 must be True or False"),
            (isinstance(self.fast_dropout, bool), "fast_dropout must be True or False"),
            (isinstance(self.validate, bool), "validate must be True or False"),
            (self.validate or (self.patience is None and self.eval_every is None),
             "validate=False evaluates nothing, so patience and eval_every must stay None"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"invalid TrainConfig: {'; '.join(bad)}.")


def autocast_for(device: torch.device, cfg: TrainConfig):
    """The autocast context `fit` trains under: bf16 on cuda (cfg.bf16), and on cpu when asked
    (cfg.cpu_bf16); otherwise a no-op. The parameters, gradients and AdamW state stay fp32."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.cpu_bf16:
        if not cpu_has_bf16():
            warnings.warn("cpu_bf16=True, but this CPU has neither AVX512-BF16 nor AMX: bf16 is emulated "
                          "and trains slower than fp32. Set cpu_bf16=False here.", stacklevel=3)
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world) — initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _schedule(total: int, warmup_ratio: float):
    warm = int(round(warmup_ratio * total))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))
    return lr_factor


def _iterate(loader):
    """Iterate without touching the global RNG: a DataLoader draws a seed from it for every new
    iterator, and a resumed run creates one more than the uninterrupted run did."""
    state = torch.get_rng_state()
    it = iter(loader)
    torch.set_rng_state(state)
    return it


def lr_multipliers(model: torch.nn.Module) -> dict[int, float]:
    """id(parameter) -> learning-rate multiplier, from every module that answers the duck-typed
    hook `lr_multipliers()` ({local parameter name: multiplier}; LoRA+'s B, for one). The loop
    reads the hook and knows nothing of the method behind it."""
    out = {}
    for module in model.modules():
        hook = getattr(type(module), "lr_multipliers", None)
        if callable(hook):
            for name, mult in module.lr_multipliers().items():
                if not (isinstance(mult, (int, float)) and math.isfinite(mult) and mult > 0):
                    raise ValueError(f"{type(module).__name__}.lr_multipliers() gave {name}: {mult!r}; a learning-rate "
                                     "multiplier must be a positive number.")
                out[id(module.get_parameter(name))] = float(mult)
    return out


def param_groups(model: torch.nn.Module, named: dict, lr: float, weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on matrices only, and one group per learning-rate multiplier
    (group 0 holds the base rate's matrices, so history's "lr" is the base rate)."""
    mult = lr_multipliers(model)
    groups: dict[tuple, list] = {(False, 1.0, False): [], (False, 1.0, True): []}  # the two groups of old checkpoints
    for p in named.values():
        groups.setdefault((mult.get(id(p), 1.0) != 1.0, mult.get(id(p), 1.0), p.ndim < 2), []).append(p)
    return [{"params": ps, "lr": lr * m, "weight_decay": 0.0 if vec else weight_decay}
            for (_, m, vec), ps in sorted(groups.items(), key=lambda kv: kv[0])]


def fit(model, train_loader, val_loader=None, cfg: TrainConfig | None = None, resume: bool | str = False,
        on_eval=None, spec: dict | None = None) -> pd.DataFrame:
    """Train `model` in place; returns the history (step, epoch, loss, lr, val_*, elapsed).

    resume: True continues from the latest checkpoint in cfg.checkpoint_dir when its recorded run
    (config, data signature, method, trainable shapes) equals this one, and raises ResumeMismatch
    naming each difference otherwise; "force" continues anyway, with a warning. No checkpoint
    yet: a fresh start.
    on_eval: called with a copy of each evaluation's history row (step, epoch, loss, lr, val_*);
    an exception it raises (e.g. optuna.TrialPruned) stops training and propagates.
    spec: a JSON description of what is trained (e.g. Method.to_dict()), recorded in checkpoints
    and compared on resume; by default the method `peftkit.apply` left on the model.
    """
    if resume not in (False, True, "force"):
        raise ValueError(f"resume must be False, True or 'force', got {resume!r}.")
    cfg = cfg or TrainConfig()
    device = resolve_device(cfg.device)
    if cfg.attention_dropout is not None:
        set_attention_dropout(model, cfg.attention_dropout)
    if cfg.fast_dropout:
        use_fast_dropout(model)
    rank, world = _distributed(device)
    model.to(device)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("no parameter requires grad: apply a method (peftkit.apply) or unfreeze something.")
    if resume and not cfg.checkpoint_dir:
        raise ValueError("resume=True needs cfg.checkpoint_dir, where the checkpoints are.")
    torch.manual_seed(cfg.seed)

    sampler = getattr(train_loader, "batch_sampler", None)  # a plain list of batches works too
    if not isinstance(sampler, EpochBatchSampler):
        if world > 1 or resume:
            raise ValueError("data-parallel runs and resuming need a loader from peftkit.make_loaders "
                             "(its batch order is reproducible); this one has a plain sampler.")
        sampler = None
    loader = train_loader
    if sampler is not None and world > 1:
        sampler = sampler.shard(rank, world)
        loader = DataLoader(train_loader.dataset, batch_sampler=sampler, collate_fn=train_loader.collate_fn)
    batches_per_epoch = len(sampler.global_batches()) if sampler else len(train_loader)
    record = run_record(cfg, getattr(train_loader, "batch_sampler", None) if sampler else None, batches_per_epoch,
                        val_loader, named, _method_spec(model, spec))
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accumulation)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    opt = torch.optim.AdamW(param_groups(model, named, cfg.lr, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    net = model
    if world > 1:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    state = {"step": 0, "epoch": 0, "batch": 0, "elapsed": 0.0, "history": [], "best": None,
             "bad_evals": 0, "stopped": False, "last_checkpoint": None}
    if resume and (path := ckpt.latest(cfg.checkpoint_dir)) is not None:
        found = ckpt.read(path)  # checksum and layout; nothing changes yet
        diffs = run_differences(found.meta.get("run"), record)
        if diffs and resume != "force":
            raise ResumeMismatch(
                f"resume=True, but this run differs from the one checkpointed in {path}: {'; '.join(diffs)}. "
                "Continuing would mix the two (a changed batch size re-reads the saved position in the wrong "
                "units; a new lr or seed would be silently overridden). Run with the checkpoint's settings, use "
                "a new checkpoint_dir to start afresh, or pass resume='force' to continue anyway.")
        if diffs:
            warnings.warn(f"resume='force': continuing {path} although {'; '.join(diffs)}. Its weights, optimizer, "
                          "schedule and position are restored as saved; the result matches neither run.", stacklevel=2)
        saved = ckpt.restore(found, named, opt, sched)  # every tensor checked before any is copied
        state.update({k: saved[k] for k in state if k in saved}, last_checkpoint=str(path))

    autocast = autocast_for(device, cfg)
    bar = tqdm(total=total, initial=state["step"], disable=not cfg.progress or rank != 0,
               desc="train", dynamic_ncols=True)
    t_start = time.perf_counter() - state["elapsed"]

    def save_checkpoint():
        if cfg.checkpoint_dir is None:
            return
        state["elapsed"] = time.perf_counter() - t_start
        if rank == 0:
            meta = {**state, "config": asdict(cfg), "run": record}
            state["last_checkpoint"] = str(ckpt.save(cfg.checkpoint_dir, named.items(), opt, sched, meta))
        if world > 1:
            dist.barrier()

    def run_eval(row):
        if val_loader is None or not cfg.validate:
            return
        m = evaluate(model, val_loader, device)
        row.update({f"val_{k}": v for k, v in m.items() if k != "confusion"})
        score = -m["loss"] if cfg.monitor == "neg_loss" else m[cfg.monitor]
        if state["best"] is None or score > state["best"]:
            state["best"], state["bad_evals"] = score, 0
        else:
            state["bad_evals"] += 1
            if cfg.patience and state["bad_evals"] >= cfg.patience:
                state["stopped"] = True
        if on_eval is not None:
            try:
                on_eval(dict(row))
            except BaseException:
                bar.close()
                model.train(was_training)
                raise

    was_training = model.training  # restored at the end: fit leaves the mode as it found it
    net.train()
    while state["epoch"] < cfg.epochs and state["step"] < total and not state["stopped"]:
        epoch = state["epoch"]
        if sampler is not None:
            sampler.set_epoch(epoch, skip=state["batch"])
        micro, losses = 0, []
        n_left = batches_per_epoch - state["batch"]
        for i, batch in enumerate(_iterate(loader)):
            batch = to_device(batch, device)
            last_micro = (micro + 1 == cfg.grad_accumulation) or (i + 1 == n_left)
            sync = contextlib.nullcontext() if (world == 1 or last_micro) else net.no_sync()
            with sync:
                with autocast:
                    loss = F.cross_entropy(model_logits(net, batch).float(), batch["labels"])
                check = loss.detach().clone()
                if world > 1:
                    dist.all_reduce(check)
                    check /= world
                if not torch.isfinite(check):
                    bar.close()
                    raise TrainingDiverged(
                        f"loss is {check.item()} at step {state['step'] + 1} (epoch {epoch + 1}); "
                        f"the step was not applied. Last good checkpoint: "
                        f"{state['last_checkpoint'] or 'none written yet'}. Lower lr (now {cfg.lr:g}), "
                        "check the data for empty or broken rows, or enable grad_clip.")
                (loss / cfg.grad_accumulation).backward()
            losses.append(check.item())
            micro += 1
            state["batch"] += 1
            if not last_micro:
                continue
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            row = {"step": state["step"], "epoch": epoch + state["batch"] / batches_per_epoch,
                   "loss": sum(losses) / len(losses), "lr": lr}
            micro, losses = 0, []
            end_of_epoch = state["batch"] >= batches_per_epoch
            if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or (end_of_epoch and not cfg.eval_every):
                run_eval(row)
            row["elapsed"] = time.perf_counter() - t_start
            state["history"].append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            done = state["step"] >= total or state["stopped"]
            if end_of_epoch:
                state["epoch"], state["batch"] = epoch + 1, 0
            if done or end_of_epoch or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
                save_checkpoint()
            if done:
                break
    bar.close()
    model.train(was_training)
    hist = pd.DataFrame(state["history"])
    hist.attrs.update(stopped_early=state["stopped"], best=state["best"], device=str(device),
                      world_size=world, checkpoint=state["last_checkpoint"])
    return hist


def save_history(hist: pd.DataFrame, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    hist.to_json(path, orient="records", lines=True)
