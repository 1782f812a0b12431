"""Training loop: one GPU, or many with torchrun (DDP or FSDP2), resumable from checkpoints.

    fastlm train --model tiny --steps 200                       # stdlib corpus, byte tokenizer
    torchrun --nproc_per_node 8 -m fastlm train --model llama-3.2-1b --distributed fsdp ...

- AdamW (fused on CUDA), linear warmup then cosine decay to min_lr_ratio * lr, gradient
  accumulation, gradient-norm clipping, bf16 autocast on GPU (fp32 on CPU), optional
  activation checkpointing and torch.compile, periodic validation loss.
- ``batch_size`` is the global number of sequences per optimizer step; every rank and
  micro-step takes its slice of the same global batch, so N processes compute the same
  losses as one process.
- Checkpoint ``<out_dir>/checkpoint.pt``: model, optimizer, scheduler, data position and RNG
  state, as full (unsharded) state dicts, written to a temporary file and renamed (atomic).
  ``resume=True`` restores it (with any world size) and reproduces the losses of an
  uninterrupted run.  Losses go to ``metrics.csv`` and ``metrics.jsonl``; a resumed run drops
  the rows logged after the checkpoint and continues them.
"""
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from fastlm import data as fdata
from fastlm._io import atomic_open
from fastlm.models import Transformer, TransformerConfig

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    # model
    model: str = "tiny"  # preset name (TransformerConfig.from_name)
    model_overrides: dict = field(default_factory=dict)  # e.g. {"n_layers": 4}
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary rounded up to a multiple of 64
    backend: str = "fused"  # "fused" | "reference"
    op_backend: Optional[str] = None  # backend= for the fastlm ops ("triton" | "cuda" | "reference" | None)
    # data
    data: Optional[list] = None  # text files / folders; None = the Python stdlib sources
    tokenizer: Optional[str] = None  # None = bytes; or a tokenizer.json
    cache_dir: Optional[str] = None
    val_fraction: float = 0.01
    seqlen: int = 256
    batch_size: int = 16  # global sequences per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step
    # optimization
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    # run
    out_dir: str = "runs/fastlm"
    resume: bool = False
    overwrite: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: Optional[str] = None  # default: cuda:LOCAL_RANK if available, else cpu
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    distributed: str = "auto"  # "auto" (ddp under torchrun) | "ddp" | "fsdp" | "none"
    progress: bool = True
    stop_after: Optional[int] = None  # stop (without a final checkpoint) after this step: simulates a kill

    def validate(self):
        def bad(msg):
            raise ValueError(f"train: {msg}")

        for name in ("seqlen", "batch_size", "grad_accum", "steps", "eval_batches", "ckpt_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.eval_every < 0:
            bad("warmup and eval_every must be >= 0")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            bad(f"lr must be > 0 and min_lr_ratio in [0, 1] (got {self.lr}, {self.min_lr_ratio})")
        if self.backend not in ("fused", "reference"):
            bad(f"backend must be 'fused' or 'reference', got {self.backend!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            bad(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            bad(f"distributed must be auto, ddp, fsdp or none, got {self.distributed!r}")


# ------------------------------------------------------------------------------ helpers
def lr_lambda(cfg):
    """Multiplier of cfg.lr at a step: linear warmup, then cosine decay to min_lr_ratio."""

    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated and cannot be read: {e}") from e
    missing = {"model", "optimizer", "scheduler", "step", "data", "config"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise RuntimeError(f"checkpoint {path} is not a fastlm training checkpoint (missing {sorted(missing)})")
    return ckpt


def _rng_state():
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    s["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


class Dist:
    """World info; a single process when not launched by torchrun."""

    def __init__(self, cfg):
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0)) if self.launched else 0
        self.world = int(os.environ.get("WORLD_SIZE", 1)) if self.launched else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.launched else 0
        mode = cfg.distributed
        if mode == "auto":
            mode = "ddp" if self.world > 1 else "none"
        if mode in ("ddp", "fsdp") and not self.launched:
            raise ValueError(f"train: distributed={mode!r} needs a torchrun launch (RANK/WORLD_SIZE are not set)")
        if mode == "none" and self.world > 1:
            raise ValueError("train: distributed='none' but WORLD_SIZE > 1; use ddp or fsdp under torchrun")
        self.mode = mode
        if cfg.device:
            self.device = torch.device(cfg.device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.launched and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        self.main = self.rank == 0

    def barrier(self):
        if self.launched:
            dist.barrier()

    def mean(self, t):
        """All-reduce mean of a tensor (in place)."""
        if self.launched:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class MetricsLog:
    """metrics.csv + metrics.jsonl; on resume, rows after the checkpoint step are dropped."""

    FIELDS = ["step", "loss", "val_loss", "lr", "tokens", "tokens_per_s", "time_s"]

    def __init__(self, out_dir, resume_step=None, enabled=True):
        self.enabled = enabled
        self.csv_path, self.json_path = os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, "metrics.jsonl")
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.exists(self.json_path):
            with open(self.json_path) as f:
                rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= resume_step]
        for path, text in ((self.json_path, "".join(json.dumps(r) + "\n" for r in rows)), (self.csv_path, self._csv(rows))):
            with atomic_open(path, "w") as f:
                f.write(text)

    def _csv(self, rows, header=True):
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.FIELDS, extrasaction="ignore")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow(r)
        return buf.getvalue()

    def write(self, row):
        if not self.enabled:
            return
        with open(self.json_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a") as f:
            f.write(self._csv([row], header=False))


def _autocast_dtype(cfg, device):
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": None}[cfg.dtype]


def model_config(cfg, vocab_size):
    mc = TransformerConfig.from_name(cfg.model, **cfg.model_overrides).replace(vocab_size=vocab_size)
    if cfg.seqlen > mc.max_seqlen:
        raise ValueError(f"train: seqlen={cfg.seqlen} exceeds max_seqlen={mc.max_seqlen} of model {cfg.model!r}")
    return mc


def build_model(cfg, mc, device):
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Transformer(mc, backend=cfg.backend, op_backend=cfg.op_backend)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def wrap_model(model, cfg, world, amp_dtype):
    """Optionally torch.compile each block (before sharding, as torchtitan does), then DDP or
    FSDP2 (fully_shard per block, then the root)."""
    if cfg.compile:
        model.compile_blocks()
    if world.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        wrapped = model
    elif world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    else:
        wrapped = model
    return wrapped


def make_optimizer(model, cfg, device):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_state_dicts(model, optimizer, msd, osd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------ main loop
def train(cfg: TrainConfig, log=print):
    """Run training; returns {"train_loss": {step: loss}, "val_loss": {step: loss}, ...}."""
    cfg.validate()
    world = Dist(cfg)
    try:
        return _train(cfg, world, log if world.main else (lambda *a, **k: None))
    finally:
        world.close()


def _train(cfg, world, log):
    device = world.device
    micro = cfg.batch_size // (world.world * cfg.grad_accum)
    if micro * world.world * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"train: batch_size={cfg.batch_size} must be divisible by world_size x grad_accum = "
            f"{world.world} x {cfg.grad_accum}"
        )
    # Everything that can be checked is checked before anything is written.
    tokenizer = fdata.load_tokenizer(cfg.tokenizer)
    vocab_size = cfg.vocab_size or 64 * math.ceil(tokenizer.vocab_size / 64)
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(f"train: vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    mc = model_config(cfg, vocab_size)
    out_dir = cfg.out_dir
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
    elif os.path.exists(ckpt_path) and not cfg.overwrite:
        raise FileExistsError(
            f"train: {ckpt_path} already exists; pass resume=True (--resume) to continue that run or "
            "overwrite=True (--overwrite) to start over"
        )
    if world.main:
        os.makedirs(out_dir, exist_ok=True)

    if ckpt is not None and ckpt["config"]["model_config"] != mc.to_dict():
        raise ValueError("train: the checkpoint's model config differs from this run's; resume with the same model options")

    # Data (rank 0 builds the token cache, the others wait and map it).
    if not world.main:
        world.barrier()
    corpus = fdata.TokenData(cfg.data, tokenizer, cfg.cache_dir, cfg.val_fraction, log=log)
    if world.main:
        world.barrier()
    train_sampler = fdata.BatchSampler(corpus.train, cfg.seqlen, seed=cfg.seed, name="train")
    val_sampler = fdata.BatchSampler(corpus.val, cfg.seqlen, name="validation") if cfg.eval_every and len(corpus.val) else None

    # Model, optimizer, schedule.
    amp_dtype = _autocast_dtype(cfg, device)
    model = build_model(cfg, mc, device)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = wrap_model(model, cfg, world, amp_dtype)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = 0
    if ckpt is not None:
        _load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_sampler.load_state_dict(ckpt["data"])
        rng = ckpt["rng"]
        _set_rng_state(rng[world.rank] if len(rng) == world.world else rng[0])
        step = int(ckpt["step"])
        log(f"resumed from {ckpt_path} at step {step}")
    run_config = {"train_config": dataclasses.asdict(cfg), "model_config": model.config.to_dict(),
                  "tokenizer": tokenizer.identity, "world_size": world.world}
    if world.main:
        with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
            json.dump(run_config, f, indent=1, default=str)
        os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    metrics = MetricsLog(out_dir, resume_step=step if ckpt is not None else None, enabled=world.main)
    log(f"model {cfg.model} ({cfg.backend}): {n_params / 1e6:.2f}M params, vocab {vocab_size}; corpus "
        f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens; {world.world} process(es) [{world.mode}] on "
        f"{device}, {'bf16 autocast' if amp_dtype else 'fp32'}; global batch "
        f"{cfg.batch_size} x {cfg.seqlen} tokens, micro-batch {micro} x {cfg.grad_accum} accum")

    def to_device(a):
        t = torch.from_numpy(a)
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def evaluate():
        wrapped.eval()
        idx = fdata.eval_windows(val_sampler.n_windows, cfg.eval_batches * cfg.batch_size)
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for b in range(cfg.eval_batches):
                rows = idx[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                rows = rows[world.rank * (cfg.batch_size // world.world) : (world.rank + 1) * (cfg.batch_size // world.world)]
                w = to_device(val_sampler.fetch(rows))
                with autocast():
                    total += wrapped(w[:, :-1], w[:, 1:]).float()
        wrapped.train()
        return world.mean(total / cfg.eval_batches).item()

    def save(step):
        msd, osd = _state_dicts(model, optimizer)
        rngs = [None] * world.world
        if world.launched:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if world.main:
            atomic_save({"format": FORMAT_VERSION, "step": step, "model": msd, "optimizer": osd,
                         "scheduler": scheduler.state_dict(), "data": train_sampler.state_dict(), "rng": rngs,
                         "config": run_config}, ckpt_path)
        world.barrier()

    bar = None
    if cfg.progress and world.main:  # a tqdm bar when tqdm is installed; log lines otherwise
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True, file=sys.stderr, unit="step")
        except ImportError:
            pass
    history = {"train_loss": {}, "val_loss": {}, "tokens_per_s": None, "n_params": n_params}
    tokens_per_step = cfg.batch_size * cfg.seqlen
    pending = []  # (step, loss tensor, lr) not yet synced to the host
    t_last, tokens_since = time.perf_counter(), 0
    t_start = time.perf_counter()
    wrapped.train()
    stop_at = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    while step < stop_at:
        rows = train_sampler.next_indices(cfg.batch_size)
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            lo = m * micro * world.world + world.rank * micro
            batch = to_device(train_sampler.fetch(rows[lo : lo + micro]))
            last = m == cfg.grad_accum - 1
            if world.mode == "fsdp":
                model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            elif world.mode == "ddp" and not last:
                sync = wrapped.no_sync()
            else:
                sync = contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = wrapped(batch[:, :-1], batch[:, 1:])
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += tokens_per_step
        pending.append((step, world.mean(loss_sum / cfg.grad_accum), lr))
        do_eval = val_sampler is not None and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)
        do_save = step % cfg.ckpt_every == 0 or step == cfg.steps
        if not (do_eval or do_save or step % cfg.log_every == 0 or step == stop_at):
            continue
        losses = torch.stack([p[1] for p in pending]).tolist()  # one host sync per log interval
        now = time.perf_counter()
        tps = tokens_since / (now - t_last)  # training only: eval and checkpoint time come after
        val_loss = evaluate() if do_eval else None
        for (s, _, lr_s), l in zip(pending, losses):
            history["train_loss"][s] = l
            row = {"step": s, "loss": l, "lr": lr_s, "tokens": s * tokens_per_step, "time_s": now - t_start}
            if s == step:
                row["tokens_per_s"] = tps
                if val_loss is not None:
                    row["val_loss"] = val_loss
            metrics.write(row)
        if val_loss is not None:
            history["val_loss"][step] = val_loss
        history["tokens_per_s"] = tps
        msg = f"step {step}/{cfg.steps} loss {losses[-1]:.4f} lr {lr:.2e} {tps:,.0f} tok/s" + (
            f" val {val_loss:.4f}" if val_loss is not None else "")
        if bar is not None:
            bar.set_postfix_str(msg.split(" ", 2)[2])
            bar.update(len(pending))
        else:
            log(msg)
        if do_save:
            save(step)
        pending, t_last, tokens_since = [], time.perf_counter(), 0
    if bar is not None:
        bar.close()
    history["step"] = step
    if step == cfg.steps:
        log(f"done: {step} steps, final loss {history['train_loss'].get(step, float('nan')):.4f}; checkpoint {ckpt_path}")
    return history
