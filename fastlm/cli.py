"""The `fastlm` command line (also `python -m fastlm`).

    fastlm train [options]      train a model (see `fastlm train --help`); under torchrun for
                                multi-GPU: torchrun --nproc_per_node N -m fastlm train --distributed fsdp
    fastlm presets              list the model presets

Each subcommand is an (add_arguments, run) pair in COMMANDS, so others can be added alongside.
"""
import argparse
import json
import sys


def _train_args(p):
    from fastlm.train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="model preset (see `fastlm presets`)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set n_layers=4 (repeatable; JSON values)")
    g.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's, rounded up to 64")
    g.add_argument("--backend", choices=["fused", "reference"], default=d.backend)
    g.add_argument("--op-backend", choices=["triton", "cuda", "reference"], default=None,
                   help="backend of the fastlm ops in the fused model (default: best available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="*", default=None, help="text files or folders (default: the Python stdlib sources)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json of HF tokenizers (default: bytes)")
    g.add_argument("--cache-dir", default=None, help="token cache folder (default: ~/.cache/fastlm/tokens)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--seqlen", type=int, default=d.seqlen)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global sequences per optimizer step")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables clipping")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if <out-dir> has a checkpoint")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="0 disables validation")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default=d.dtype)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true")
    g.add_argument("--distributed", choices=["auto", "ddp", "fsdp", "none"], default=d.distributed)
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--summary-json", default=None, help="write the loss history to this JSON file")


def _parse_overrides(items):
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"fastlm train: --set expects FIELD=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _train_run(a):
    from fastlm.train import TrainConfig, train

    cfg = TrainConfig(
        model=a.model, model_overrides=_parse_overrides(a.overrides), vocab_size=a.vocab_size, backend=a.backend,
        op_backend=a.op_backend, data=a.data or None, tokenizer=a.tokenizer, cache_dir=a.cache_dir,
        val_fraction=a.val_fraction, seqlen=a.seqlen, batch_size=a.batch_size, grad_accum=a.grad_accum,
        steps=a.steps, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, out_dir=a.out_dir, resume=a.resume, overwrite=a.overwrite, eval_every=a.eval_every,
        eval_batches=a.eval_batches, ckpt_every=a.ckpt_every, log_every=a.log_every, seed=a.seed, device=a.device,
        dtype=a.dtype, compile=a.compile, activation_checkpointing=a.activation_checkpointing,
        distributed=a.distributed, progress=not a.no_progress, stop_after=a.stop_after,
    )
    hist = train(cfg)
    if a.summary_json and int(__import__("os").environ.get("RANK", 0)) == 0:
        with open(a.summary_json, "w") as f:
            json.dump(hist, f)
    return 0


def _presets_args(p):
    pass


def _presets_run(a):
    from fastlm.models.config import PRESETS, TransformerConfig

    for name in PRESETS:
        c = TransformerConfig.from_name(name)
        print(f"{name:14s} {c.num_params() / 1e6:9.1f}M params  dim {c.dim:5d}  layers {c.n_layers:3d}  heads "
              f"{c.n_heads}/{c.n_kv_heads}  ffn {c.ffn_dim}  vocab {c.vocab_size}  {c.positional}/{c.norm}/{c.mlp}")
    return 0


COMMANDS = {
    "train": (_train_args, _train_run, "train a Transformer LM (single process, or DDP/FSDP2 under torchrun)"),
    "presets": (_presets_args, _presets_run, "list the model presets"),
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastlm", description="fastlm: fused-kernel Transformer LMs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    a = p.parse_args(argv)
    if a.command is None:
        p.print_help()
        return 2
    try:
        return COMMANDS[a.command][1](a)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, TypeError) as e:
        print(f"fastlm {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
