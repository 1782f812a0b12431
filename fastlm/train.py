"""Training loop: one GPU, or many with torchrun (DDP or FSDP2), resumable from checkpoints.

    fastlm train --model tiny --steps 200                       # stdlib corpus, byte tokenizer
    torchrun --nproc_per_node 8 -m fastlm train --model llama-3.2-1b --distributed fsdp ...

- AdamW (fused on CUDA), gradient accumulation, gradient-norm clipping (the pre-clip norm is
  logged as ``grad_norm``), bf16 autocast on GPU (fp32 on CPU), optional activation
  checkpointing and torch.compile, periodic validation loss (evaluated in forwards of the
  training micro-batch size).
- Learning rate (lr_lambda): optimizer update k = 1..steps (the ``step`` of the metrics rows)
  uses ``lr * k / warmup`` for k <= warmup (update 1 takes lr / warmup; update ``warmup`` the
  peak lr), then ``lr * (r + (1 - r) * (1 + cos(pi * (k - 1 - warmup) / (steps - warmup))) / 2)``
  with r = min_lr_ratio: the peak again at update warmup + 1, decaying towards r * lr, which
  the cosine reaches one update after the last (warmup=0: the cosine from update 1).
- ``batch_size`` is the global number of sequences per optimizer step; every rank and
  micro-step takes its slice of the same global batch, so N processes compute the same
  losses as one process (DDP: to fp32 rounding; FSDP2 with bf16 keeps its parameters in bf16,
  where one process and DDP keep fp32 weights under autocast: to bf16 rounding).
- Checkpoint ``<out_dir>/checkpoint.pt``: model, optimizer, scheduler, data position, tokens trained and RNG
  state, as full (unsharded) state dicts, written to a temporary file and renamed (atomic).
  ``resume=True`` restores it (with any world size; every rank memory-maps the file) and
  continues the uninterrupted run: bitwise the same losses on CPU (same machine, world size
  and grad_accum).  On GPU they match to rounding, not bitwise: the fused attention backward
  accumulates dQ with fp32 atomics and autotunes its tiles by timing, unless the environment
  sets FASTLM_ATTENTION_DQ_ATOMIC=0 and FASTLM_ATTENTION_AUTOTUNE=0, and other GPU kernels
  (torch's SDPA backward of the reference backend, torch.compile's autotuning) are not
  guaranteed bitwise from process to process either.  Resume checks that the corpus is the
  same token stream (a fingerprint in the token cache and the checkpoint); a checkpoint from
  before fingerprints skips that check.  Losses go to ``metrics.csv`` and ``metrics.jsonl``;
  a resumed run drops the rows logged after the checkpoint (and a torn last line of a kill
  mid-append) and continues them.
- A new run refuses an out_dir holding a checkpoint or other run files (config.json, metrics.*)
  unless ``overwrite=True``, which deletes them before the new run writes its own.  Resuming with
  ``steps`` equal to the checkpoint's step does nothing (and says so); below it is an error.
- A resumed run must use the checkpoint's model and the settings that shape the loss trajectory
  (TRAJECTORY_FIELDS, and the tokenizer); ``resume_override=True`` (``--resume-override``)
  continues with changed ones on purpose, except those that define the training windows and
  their order (DATA_ORDER_FIELDS: seqlen, val_fraction, seed, the tokenizer).  ``steps`` may
  change (extend a run: the cosine schedule then ends at the new step count), and so may
  execution and bookkeeping settings.
- Under torchrun every rank must be launched with the same settings (all but PER_RANK_FIELDS):
  checked at start-up.
"""
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import importlib
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

from fastlm import _backend
from fastlm import data as fdata
from fastlm._io import atomic_open
from fastlm.models import Transformer, TransformerConfig

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("config.json", "metrics.csv", "metrics.jsonl")  # the other files a run writes in out_dir
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
    resume_override: bool = False  # resume though TRAJECTORY_FIELDS differ from the checkpoint's (not DATA_ORDER_FIELDS)
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
        """Check the settings (a ValueError naming the bad one) and normalize them to plain Python
        values in place (paths -> str, numpy numbers -> int/float): the checkpoint stores them and
        is read back with torch.load(weights_only=True), which accepts only plain types."""
        def bad(msg):
            raise ValueError(f"train: {msg}")

        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
        # Absolute: the checkpoint stores them, and `fastlm train --resume` / `fastlm generate` run from
        # any folder.
        if self.tokenizer not in (None, "", "bytes"):
            self.tokenizer = os.path.abspath(self.tokenizer)
        if isinstance(self.data, str):
            self.data = os.path.abspath(self.data) if self.data else None  # "": the default corpus
        elif self.data is not None:
            self.data = [os.path.abspath(p) for p in self.data]
        if self.cache_dir:
            self.cache_dir = os.path.abspath(self.cache_dir)
        # Counts are ints (not bool, not float: warmup=0.1, an HF warmup_ratio habit, would start at 10x lr).
        for name, low in (("seqlen", 1), ("batch_size", 1), ("grad_accum", 1), ("steps", 1), ("warmup", 0),
                          ("eval_every", 0), ("eval_batches", 1), ("ckpt_every", 1), ("log_every", 1),
                          ("stop_after", 0)):
            v = getattr(self, name)
            if (v is not None or name != "stop_after") and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                bad(f"{name} (--{name.replace('_', '-')}) must be {'a positive' if low else 'a non-negative'} int, "
                    f"got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr (--lr) must be finite and > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:  # (`not` form: NaN fails too)
            bad(f"min_lr_ratio (--min-lr-ratio) must be in [0, 1] (the final lr as a fraction of lr), "
                f"got {self.min_lr_ratio!r}")
        if not 0.0 <= self.val_fraction < 1.0:  # `not` form: NaN fails too
            bad(f"val_fraction (--val-fraction) must be in [0, 1), got {self.val_fraction!r}")
        if not self.grad_clip >= 0:
            bad(f"grad_clip (--grad-clip) must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad(f"weight_decay (--weight-decay) must be finite and >= 0 (0 disables it), got {self.weight_decay!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed (--seed) must be a non-negative int, got {self.seed!r}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                                            or self.vocab_size <= 0):
            bad(f"vocab_size (--vocab-size) must be a positive int or None (the tokenizer's), got {self.vocab_size!r}")
        if "vocab_size" in (self.model_overrides or {}):
            bad("set the vocabulary size with vocab_size (--vocab-size), not model_overrides (--set vocab_size=...), "
                f"got model_overrides={self.model_overrides!r}")
        if self.data is not None and not isinstance(self.data, str) and len(self.data) == 0:
            bad("data (--data) is an empty list: give text files or folders, or leave it unset (None) for the "
                "default corpus (the Python standard library sources)")
        if self.device is not None:
            try:
                _backend.check_device(self.device, "device (--device)")
            except ValueError as e:
                bad(str(e))
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            bad(f"betas must be two values in [0, 1), got {self.betas!r}")
        if self.backend not in ("fused", "reference"):
            bad(f"backend must be 'fused' or 'reference', got {self.backend!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            bad(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.distributed not in ("auto", "ddp", "fsdp", "none"):
            bad(f"distributed must be auto, ddp, fsdp or none, got {self.distributed!r}")


# ------------------------------------------------------------------------------ helpers
# Training settings that shape the loss trajectory: a resumed run must use the checkpoint's
# values (or say resume_override=True), else its losses silently differ from the uninterrupted
# run's.  The model config (model, model_overrides, vocab_size) and the tokenizer are checked
# separately.  Deliberately NOT here:
# - steps: extending a finished run (resume with more steps) is how a run is continued; the
#   schedule then ends at the new step count.  The checkpoint's step is what matters for resume.
# - grad_accum, world size, backend/op_backend, dtype, compile, activation_checkpointing,
#   device, distributed: how the same math is executed.  batch_size is global and every
#   micro-batch has the same number of tokens, so the gradient is the same mean over the same
#   sequences (up to float rounding) for any grad_accum x world size; checkpoints are meant to
#   move between world sizes, and grad_accum is how per-device memory is kept when they do.
# - eval_every, eval_batches, ckpt_every, log_every, progress, stop_after, out_dir, cache_dir,
#   data paths (a moved corpus is the same corpus; the token stream's fingerprint, checked on
#   resume, catches a different one): bookkeeping that never touches the parameters, the
#   optimizer or the batch order.
TRAJECTORY_FIELDS = ("val_fraction", "seqlen", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay",
                     "betas", "grad_clip", "seed")
# The ones (and the tokenizer) that define the windows and their order: the checkpoint's data
# position (epoch, index into the seed's permutation of the windows) means nothing under other
# values, so resume_override cannot change them (a new run can).
DATA_ORDER_FIELDS = ("val_fraction", "seqlen", "seed", "tokenizer")
# Settings that may differ between the ranks of one run (where and how each process reports);
# every other TrainConfig field must agree, which train() checks at start-up.
PER_RANK_FIELDS = ("device", "progress")


def _plain(v):
    """`v` with paths as str, numpy scalars as int/float/bool and torch devices as str (recursively)."""
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return (tuple if isinstance(v, tuple) else list)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {_plain(k): _plain(x) for k, x in v.items()}
    return v


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def resume_config_diff(saved_run_config, cfg, tokenizer_identity):
    """[(name, checkpoint value, this run's value)] for the trajectory settings that differ."""
    saved = saved_run_config.get("train_config") or {}
    diff = [(k, saved[k], getattr(cfg, k)) for k in TRAJECTORY_FIELDS
            if k in saved and _norm(saved[k]) != _norm(getattr(cfg, k))]
    old_tok = saved_run_config.get("tokenizer")
    if old_tok is not None and old_tok != tokenizer_identity:
        diff.append(("tokenizer", old_tok, tokenizer_identity))
    return diff


def read_metrics(path, upto_step):
    """The rows of metrics.jsonl with step <= upto_step, and the dropped torn last line (or None).

    Rows are appended (not written atomically), so a kill mid-append can leave a torn last line:
    it is dropped (it was logged after the checkpoint, so nothing is lost).  An unparseable line
    anywhere else is not a torn append: a ValueError naming the file and line.
    """
    if not os.path.exists(path):
        return [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows, torn = [], None
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row (a JSON object with an integer 'step')")
        except ValueError as e:
            if k == len(numbered) - 1:
                torn = line
                break
            raise ValueError(f"{path}, line {lineno}: cannot be parsed ({e}); only a torn last line (a kill "
                             "mid-write) is dropped on resume: fix or delete that line, then resume again") from None
        if row["step"] <= upto_step:
            rows.append(row)
    return rows, torn


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
        # mmap: the tensors are read from the page cache on demand (shared by the ranks of a node),
        # not copied into each process's memory.  torch.save's zip format (atomic_save) allows it.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated and cannot be read: {e}") from e
    missing = {"model", "optimizer", "scheduler", "step", "data", "config"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise RuntimeError(f"checkpoint {path} is not a fastlm training checkpoint (missing {sorted(missing)})")
    fmt = ckpt.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise RuntimeError(f"checkpoint {path} has format {fmt!r}, which this fastlm (reading formats up to "
                           f"{FORMAT_VERSION}) does not know (a newer fastlm's checkpoint needs that fastlm to resume it)")
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
            n = torch.cuda.device_count()
            if self.device.index is not None and self.device.index >= n:  # (before waiting for the other ranks)
                raise ValueError(f"train: rank {self.rank} would use {self.device} (LOCAL_RANK={self.local_rank}), but "
                                 f"this machine has {n} CUDA device(s): launch at most {n} process(es) per node "
                                 "(torchrun --nproc-per-node), or train on cpu (--device cpu)")
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.launched and not dist.is_initialized():
            # torch._dynamo, imported after the group exists (DDP imports it), keeps 10 references to
            # the group for good (torch 2.14), so destroy_process_group() would not free it and its
            # gloo worker threads would outlive close(): a worker that drops a finished collective's
            # tensors while the interpreter shuts down aborts the process ("terminate called without
            # an active exception", SIGABRT after a successful run).  Imported first, it holds none,
            # and close() joins the workers.
            importlib.import_module("torch._dynamo")

            # A long timeout: the other ranks wait at a barrier while rank 0 tokenizes the corpus on a
            # first run, which can take longer than NCCL's 10-minute default.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                     timeout=datetime.timedelta(hours=2))
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
            # FSDP2's device mesh stays in DTensor's caches and holds the group, so its gloo workers
            # outlive destroy_process_group() (gloo's shutdown does not stop them).  A worker that
            # finished the last collective still has to drop its tensors, which takes the GIL; let it
            # do that now, not while the interpreter is finalizing (see the torch._dynamo note in __init__).
            if _gloo_workers_alive():
                time.sleep(0.2)


def _gloo_workers_alive():
    """Whether this process still runs gloo worker threads (Linux names them; elsewhere: assume so)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return True
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                if f.read().startswith("pt_gloo"):
                    return True
        except OSError:
            pass
    return False


def check_ranks_agree(cfg, world):
    """Raise (on every rank) if the ranks were launched with different settings: DDP/FSDP would
    train on, each rank with its own lr, data or schedule, and the replicas silently diverge."""
    if world.world == 1:
        return
    mine = {f.name: hashlib.blake2b(repr(getattr(cfg, f.name)).encode(), digest_size=8).hexdigest()
            for f in dataclasses.fields(cfg) if f.name not in PER_RANK_FIELDS}
    every = [None] * world.world
    dist.all_gather_object(every, mine)
    differ = [k for k in mine if len({d[k] for d in every}) > 1]
    if differ:
        ranks = {k: [r for r, d in enumerate(every) if d[k] != every[0][k]] for k in differ}
        raise ValueError("train: the ranks were launched with different settings: " + "; ".join(
            f"{k} (ranks {ranks[k]} differ from rank 0; this rank {world.rank}: {getattr(cfg, k)!r})" for k in differ)
            + ". Launch every rank with the same options")


class MetricsLog:
    """metrics.csv + metrics.jsonl, both rewritten (atomically) to `rows` -- on resume, the rows
    up to the checkpoint step (read_metrics) -- and then appended to."""

    FIELDS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s"]

    def __init__(self, out_dir, rows=(), enabled=True):
        self.enabled = enabled
        self.csv_path, self.json_path = os.path.join(out_dir, "metrics.csv"), os.path.join(out_dir, "metrics.jsonl")
        if not enabled:
            return
        rows = list(rows)
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
    check_ranks_agree(cfg, world)
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
    if cfg.backend == "fused" and cfg.op_backend is not None:  # else found at the first forward, after the writes
        why = _backend.why_unavailable(cfg.op_backend, device)
        if why:
            raise ValueError(f"train: op_backend={cfg.op_backend!r} (--op-backend) cannot run on {device}: {why}")
    out_dir = cfg.out_dir
    for name, d in (("out_dir (--out-dir)", out_dir), ("cache_dir (--cache-dir)", cfg.cache_dir)):
        if d and os.path.exists(d) and not os.path.isdir(d):  # (makedirs would say only "File exists")
            raise NotADirectoryError(f"train: {name} {d} is a file, not a folder")
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    for p in [cfg.data] if isinstance(cfg.data, (str, os.PathLike)) else cfg.data or ():  # before any mkdir
        if not os.path.exists(p):
            raise FileNotFoundError(f"corpus path not found: {p}")
    ckpt, metrics_rows = None, ()
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        saved_mc = ckpt["config"]["model_config"]
        if saved_mc != mc.to_dict():
            fields = ", ".join(f"{k}: {saved_mc.get(k)!r} (checkpoint) -> {v!r} (this run)"
                               for k, v in mc.to_dict().items() if saved_mc.get(k) != v)
            raise ValueError(f"train: the checkpoint's model config differs from this run's: {fields}; resume with "
                             "the same model options (--model, --set, --vocab-size)")
        diff = resume_config_diff(ckpt["config"], cfg, tokenizer.identity)
        changes = ", ".join(f"{k}: {old!r} (checkpoint) -> {new!r} (this run)" for k, old, new in diff)
        if diff and not cfg.resume_override:
            raise ValueError(
                f"train: this run's training settings differ from those of {ckpt_path}, so its losses would differ "
                f"from the uninterrupted run's: {changes}. Resume with the checkpoint's settings, or pass "
                "resume_override=True (--resume-override) to continue with the new ones"
            )
        fixed = [(k, old, new) for k, old, new in diff if k in DATA_ORDER_FIELDS]
        if fixed:
            raise ValueError(
                "train: resume_override (--resume-override) cannot change " + ", ".join(
                    f"{k}: {old!r} (checkpoint) -> {new!r} (this run)" for k, old, new in fixed)
                + f": {', '.join(DATA_ORDER_FIELDS)} define the training windows and their order, which the "
                f"checkpoint's data position belongs to. Resume with the checkpoint's values, or start a new run"
            )
        if diff:
            log(f"resuming with changed settings (resume override): {changes}")
        ckpt_step = int(ckpt["step"])
        if cfg.steps < ckpt_step:
            raise ValueError(f"train: steps={cfg.steps} (--steps) is below step {ckpt_step} of the checkpoint "
                             f"{ckpt_path}: resume with steps >= {ckpt_step}")
        if cfg.steps == ckpt_step:  # nothing to train: leave the run's files as they are
            log(f"{ckpt_path} is already at step {ckpt_step} = steps: nothing to do (resume with more steps to "
                "train further)")
            return {"train_loss": {}, "val_loss": {}, "tokens_per_s": None, "n_params": mc.num_params(),
                    "step": ckpt_step}
        old_steps = (ckpt["config"].get("train_config") or {}).get("steps", cfg.steps)
        if old_steps != cfg.steps:
            log(f"steps {old_steps} -> {cfg.steps}: the lr schedule now ends at step {cfg.steps}")
        metrics_rows, torn = read_metrics(os.path.join(out_dir, "metrics.jsonl"), int(ckpt["step"]))
        if torn is not None:
            log(f"dropping the torn last line of {os.path.join(out_dir, 'metrics.jsonl')} (a kill mid-write): "
                f"{torn[:80]!r}")
    elif os.path.exists(ckpt_path) and not cfg.overwrite:
        raise FileExistsError(
            f"train: {ckpt_path} already exists; pass resume=True (--resume) to continue that run or "
            "overwrite=True (--overwrite) to start over"
        )
    elif not cfg.overwrite and (clash := [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]):
        raise FileExistsError(
            f"train: {out_dir} already holds {', '.join(clash)} (but no {CHECKPOINT} to resume=True / --resume "
            "from), which this run would replace; pass overwrite=True (--overwrite) to replace them, or use "
            "another out_dir (--out-dir)"
        )
    if world.main:
        os.makedirs(out_dir, exist_ok=True)

    # Data (rank 0 builds the token cache, the others wait and map it).
    if not world.main:
        world.barrier()
    corpus = fdata.TokenData(cfg.data, tokenizer, cfg.cache_dir, cfg.val_fraction, log=log, exclude=(out_dir,))
    if world.main:
        world.barrier()
    fingerprint = corpus.meta["fingerprint"]
    saved_fp = ckpt["config"].get("data_fingerprint") if ckpt is not None else None  # None: an older checkpoint
    if saved_fp is not None and saved_fp != fingerprint:
        raise ValueError(
            f"train: the corpus differs from the one {ckpt_path} was trained on: its token stream (data "
            f"{cfg.data or 'the Python stdlib sources'}, tokenizer {tokenizer.identity}) has fingerprint "
            f"{fingerprint}, the checkpoint's has {saved_fp}. Resume with the checkpoint's data (a moved or copied "
            "corpus is fine; changed files are not), or start a new run")
    train_sampler = fdata.BatchSampler(corpus.train, cfg.seqlen, seed=cfg.seed, name="train")
    val_sampler = fdata.BatchSampler(corpus.val, cfg.seqlen, name="validation") if cfg.eval_every and len(corpus.val) else None

    # Model, optimizer, schedule.
    amp_dtype = _autocast_dtype(cfg, device)
    model = build_model(cfg, mc, device)
    n_params = sum(p.numel() for p in model.parameters())
    wrapped = wrap_model(model, cfg, world, amp_dtype)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step = tokens = 0  # tokens: trained so far (a running total: resume_override may change the tokens per step)
    if ckpt is not None:
        _load_state_dicts(model, optimizer, ckpt["model"], ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        train_sampler.load_state_dict(ckpt["data"])  # the data order (and its seed) continue from the checkpoint
        rng = ckpt["rng"]
        _set_rng_state(rng[world.rank] if len(rng) == world.world else rng[0])
        step = int(ckpt["step"])
        old = ckpt["config"].get("train_config") or {}  # (checkpoints without "tokens": its constant tokens/step)
        tokens = int(ckpt.get("tokens", step * old.get("batch_size", cfg.batch_size) * old.get("seqlen", cfg.seqlen)))
        # The restored optimizer and scheduler hold the checkpoint's lr, weight decay and betas: set this
        # run's (the same values unless resume_override) and the next step's lr from this run's schedule
        # (its steps may have grown).  base_lr * lambda(step) is what LambdaLR computes: bitwise the same.
        lam = lr_lambda(cfg)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for g, wd in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):  # make_optimizer's groups
            g.update(initial_lr=cfg.lr, lr=cfg.lr * lam(step), weight_decay=wd, betas=tuple(cfg.betas))
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        log(f"resumed from {ckpt_path} at step {step}")
        ckpt = None  # restored: let go of the rest of the mapped file
    run_config = {"train_config": dataclasses.asdict(cfg), "model_config": model.config.to_dict(),
                  "tokenizer": tokenizer.identity, "data_fingerprint": fingerprint, "world_size": world.world}
    if world.main:
        if cfg.overwrite and not cfg.resume:  # the old run goes first: --resume must never pair it with this one
            for name in (CHECKPOINT,) + RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out_dir, name))
        with open(os.path.join(out_dir, "config.json.tmp"), "w") as f:
            json.dump(run_config, f, indent=1, default=str)
        os.replace(os.path.join(out_dir, "config.json.tmp"), os.path.join(out_dir, "config.json"))
    metrics = MetricsLog(out_dir, rows=metrics_rows, enabled=world.main)
    log(f"model {cfg.model} ({cfg.backend}): {n_params / 1e6:.2f}M params, vocab {vocab_size}; corpus "
        f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens; {world.world} process(es) [{world.mode}] on "
        f"{device}, {'bf16 autocast' if amp_dtype else 'fp32'}; global batch "
        f"{cfg.batch_size} x {cfg.seqlen} tokens, micro-batch {micro} x {cfg.grad_accum} accum")
    if cfg.warmup >= cfg.steps:
        log(f"note: warmup {cfg.warmup} >= steps {cfg.steps}: the learning rate only rises (to "
            f"{cfg.lr * cfg.steps / max(1, cfg.warmup):.2e} at the last step, peak {cfg.lr:.2e} at step {cfg.warmup}); "
            f"lower --warmup for a short run")
    if val_sampler is not None and cfg.eval_batches * cfg.batch_size > val_sampler.n_windows:
        log(f"note: an evaluation reads {cfg.eval_batches} x {cfg.batch_size} windows but the validation split has "
            f"{val_sampler.n_windows}: it goes over them repeatedly (time spent on no new data); lower --eval-batches "
            f"to at most {max(1, val_sampler.n_windows // cfg.batch_size)}, or raise --val-fraction")

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
        """Mean loss over eval_batches global batches of validation windows, in forwards of the
        training micro-batch size (what device memory was sized for): every forward has micro x
        seqlen tokens, so the mean of their means is the mean over all the windows."""
        wrapped.eval()
        idx = fdata.eval_windows(val_sampler.n_windows, cfg.eval_batches * cfg.batch_size)
        mine = idx.reshape(-1, world.world, micro)[:, world.rank]  # this rank's micro-batches, as in training
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for rows in mine:
                w = to_device(val_sampler.fetch(rows))
                with autocast():
                    total += wrapped(w[:, :-1], w[:, 1:]).float()
        wrapped.train()
        return world.mean(total / len(mine)).item()

    def save(step, tokens):
        msd, osd = _state_dicts(model, optimizer)
        rngs = [None] * world.world
        if world.launched:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if world.main:
            atomic_save({"format": FORMAT_VERSION, "step": step, "model": msd, "optimizer": osd,
                         "scheduler": scheduler.state_dict(), "data": train_sampler.state_dict(), "rng": rngs,
                         "tokens": tokens, "config": run_config}, ckpt_path)
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
    pending = []  # (step, tokens, loss tensor, grad-norm tensor or None, lr) not yet synced to the host
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
        grad_norm = None  # the norm before clipping (without clipping it is not computed)
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        tokens_since += tokens_per_step
        pending.append((step, tokens, world.mean(loss_sum / cfg.grad_accum), grad_norm, lr))
        do_eval = val_sampler is not None and cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)
        do_save = step % cfg.ckpt_every == 0 or step == cfg.steps
        if not (do_eval or do_save or step % cfg.log_every == 0 or step == stop_at):
            continue
        synced = torch.stack([p[2] for p in pending] + [p[3].float() for p in pending if p[3] is not None]).tolist()
        losses, norms = synced[: len(pending)], iter(synced[len(pending):])  # one host sync per log interval
        now = time.perf_counter()
        tps = tokens_since / (now - t_last)  # training only: eval and checkpoint time come after
        val_loss = evaluate() if do_eval else None
        for (s, tok_s, _, gn, lr_s), l in zip(pending, losses):
            history["train_loss"][s] = l
            row = {"step": s, "loss": l, "lr": lr_s, "tokens": tok_s, "time_s": now - t_start}
            if gn is not None:
                row["grad_norm"] = gn = next(norms)
            if s == step:
                row["tokens_per_s"] = tps
                if val_loss is not None:
                    row["val_loss"] = val_loss
            metrics.write(row)
        if val_loss is not None:
            history["val_loss"][step] = val_loss
        history["tokens_per_s"] = tps
        msg = f"step {step}/{cfg.steps} loss {losses[-1]:.4f} lr {lr:.2e}" + (
            f" grad norm {gn:.3g}" if gn is not None else "") + f" {tps:,.0f} tok/s" + (
            f" val {val_loss:.4f}" if val_loss is not None else "")
        if bar is not None:
            bar.set_postfix_str(msg.split(" ", 2)[2])
            bar.update(len(pending))
        else:
            log(msg)
        if do_save:
            save(step, tokens)
        pending, t_last, tokens_since = [], time.perf_counter(), 0
    if bar is not None:
        bar.close()
    history["step"] = step
    if step == cfg.steps:
        log(f"done: {step} steps, final loss {history['train_loss'].get(step, float('nan')):.4f}; checkpoint {ckpt_path}")
    return history
