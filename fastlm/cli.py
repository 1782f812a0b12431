"""The `fastlm` command line (also `python -m fastlm`).

    fastlm train [options]      train a model (see `fastlm train --help`); under torchrun for
                                multi-GPU: torchrun --nproc_per_node N -m fastlm train --distributed fsdp
    fastlm generate [options]   generate text from a `fastlm train` checkpoint or an HF folder
                                (see `fastlm generate --help`)
    fastlm presets              list the model presets

Each subcommand is an (add_arguments, run) pair in COMMANDS, so others can be added alongside.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys


def _train_args(p):
    from fastlm.train import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="model preset (see `fastlm presets`)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set n_layers=4 (repeatable; JSON values, or "
                        "True/False/None)")
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
    g.add_argument("--resume", action="store_true",
                   help="continue from <out-dir>/checkpoint.pt, with its settings for every flag not given")
    g.add_argument("--resume-override", action="store_true",
                   help="with --resume: continue even if lr, batch size, schedule or other loss-shaping "
                        "settings differ from the checkpoint's (the new ones apply; not seqlen, val fraction, "
                        "seed or tokenizer, which define the data order)")
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
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"--set expects FIELD=VALUE, got {it!r}")
        # Python spellings too: a string 'False' would be truthy
        v = {"True": "true", "False": "false", "None": "null"}.get(v.strip(), v)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _check_output_file(path, flag):
    """Raise (before any work) if `path` cannot be written as a file."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} expects a file path, got the directory {path}")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{flag} {path}: its folder {d} does not exist")
    if not os.access(path if os.path.exists(path) else d, os.W_OK):
        raise PermissionError(f"{flag} {path} is not writable")


# TrainConfig fields a --resume takes from the checkpoint when their flag is not on the command
# line (-> the CLI dest; betas has no flag): the run goes on as it was started, without
# repeating every option.  Not taken: where and how this process runs (out dir, device,
# distributed, compile, progress) and the resume flags themselves.
RESUME_FIELDS = {"model": "model", "model_overrides": "overrides", "vocab_size": "vocab_size", "backend": "backend",
                 "op_backend": "op_backend", "data": "data", "tokenizer": "tokenizer", "cache_dir": "cache_dir",
                 "val_fraction": "val_fraction", "seqlen": "seqlen", "batch_size": "batch_size",
                 "grad_accum": "grad_accum", "steps": "steps", "lr": "lr", "min_lr_ratio": "min_lr_ratio",
                 "warmup": "warmup", "weight_decay": "weight_decay", "betas": None, "grad_clip": "grad_clip",
                 "eval_every": "eval_every", "eval_batches": "eval_batches", "ckpt_every": "ckpt_every",
                 "log_every": "log_every", "seed": "seed", "dtype": "dtype"}


def _given(parser, argv):
    """The dests of the options that appear in argv (abbreviations are off for this parser)."""
    flags = {t.split("=", 1)[0] for t in argv if t.startswith("-")}
    return {act.dest for act in parser._actions if flags & set(act.option_strings)}


def _resume_settings(a):
    """{field: value} of the checkpoint in --out-dir for the RESUME_FIELDS not given on the command
    line ({} without a checkpoint: train() then says what is missing)."""
    import torch

    from fastlm.train import CHECKPOINT

    path = os.path.join(a.out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        return {}
    try:  # (mmap: the config without reading the weights)
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]["train_config"]
    except Exception:
        return {}  # train() reports the unreadable checkpoint
    return {f: saved[f] for f, dest in RESUME_FIELDS.items() if f in saved and (dest is None or dest not in a.given)}


def _train_run(a):
    from fastlm.train import TrainConfig, train

    main_rank = int(os.environ.get("RANK", 0)) == 0
    if a.summary_json and main_rank:
        _check_output_file(a.summary_json, "--summary-json")
    cfg = TrainConfig(
        model=a.model, model_overrides=_parse_overrides(a.overrides), vocab_size=a.vocab_size, backend=a.backend,
        op_backend=a.op_backend, data=a.data, tokenizer=a.tokenizer, cache_dir=a.cache_dir,
        val_fraction=a.val_fraction, seqlen=a.seqlen, batch_size=a.batch_size, grad_accum=a.grad_accum,
        steps=a.steps, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, out_dir=a.out_dir, resume=a.resume, resume_override=a.resume_override, overwrite=a.overwrite, eval_every=a.eval_every,
        eval_batches=a.eval_batches, ckpt_every=a.ckpt_every, log_every=a.log_every, seed=a.seed, device=a.device,
        dtype=a.dtype, compile=a.compile, activation_checkpointing=a.activation_checkpointing,
        distributed=a.distributed, progress=not a.no_progress, stop_after=a.stop_after,
    )
    if a.resume:
        inherited = _resume_settings(a)
        changed = {f: v for f, v in inherited.items() if getattr(cfg, f) != v and not (
            isinstance(v, list) and list(getattr(cfg, f) or ()) == v)}
        cfg = dataclasses.replace(cfg, **inherited)
        if changed and main_rank:
            print("fastlm train: --resume takes from the checkpoint: " + ", ".join(
                f"{f}={v!r}" for f, v in changed.items()), file=sys.stderr)
    hist = train(cfg)
    if a.summary_json and main_rank:
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


def _generate_args(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a `fastlm train` checkpoint.pt, or its --out-dir")
    src.add_argument("--hf", help="a local Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    g = p.add_argument_group("sampling")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None,
                   help="keep the tokens at least this fraction as likely as the most likely one")
    g.add_argument("--repetition-penalty", type=float, default=None, help="HF's repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="default: random")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", choices=["fused", "reference"], default="fused")
    g.add_argument("--op-backend", choices=["triton", "cuda", "reference"], default=None,
                   help="backend of the fastlm ops in the fused model (default: best available)")
    g.add_argument("--cache", choices=["static", "paged"], default="static", help="KV cache of the fused model")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run the decode steps eagerly")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or 'bytes') instead of the checkpoint's / the HF folder's")


def _load_for_generation(checkpoint, hf, tokenizer, backend, op_backend, device, dtype):
    """-> (model on device/dtype in eval mode, tokenizer, eos id(s) or None, encode(text) -> ids)."""
    import torch

    from fastlm import data as fdata
    from fastlm.models import Transformer, TransformerConfig

    if checkpoint is not None:
        from fastlm.train import CHECKPOINT, load_checkpoint

        path = os.path.join(checkpoint, CHECKPOINT) if os.path.isdir(checkpoint) else checkpoint
        ckpt = load_checkpoint(path)
        cfg = TransformerConfig.from_dict(ckpt["config"]["model_config"])
        with torch.device("meta"):
            model = Transformer(cfg, backend=backend, op_backend=op_backend)
        model.to_empty(device="cpu")
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
        spec = tokenizer or ckpt["config"]["train_config"].get("tokenizer")
        try:
            tok = fdata.load_tokenizer(spec)
        except FileNotFoundError:
            if tokenizer is not None:
                raise
            raise FileNotFoundError(f"tokenizer file not found: {spec}, the tokenizer {path} was trained with "
                                    "(the path its training stored); pass it with --tokenizer") from None
        if tokenizer is None and tok.identity != ckpt["config"].get("tokenizer", tok.identity):
            raise ValueError(f"the tokenizer {spec or 'bytes'} differs from the one {path} was trained with; "
                             "pass the original one with --tokenizer")
        eos = tok.eot_id
        encode = lambda text: tok.encode(text).tolist()  # noqa: E731
    else:
        from fastlm.train import CHECKPOINT

        try:  # a `fastlm train` run folder also has a config.json, without an HF model_type
            with open(os.path.join(hf, "config.json")) as fh:
                hf_config = json.load(fh)
        except (OSError, ValueError):
            hf_config = None  # from_hf reports it
        if isinstance(hf_config, dict) and "model_type" not in hf_config:
            hint = (f"; it looks like a `fastlm train` run folder: use --checkpoint {hf}"
                    if "model_config" in hf_config or os.path.isfile(os.path.join(hf, CHECKPOINT)) else "")
            raise ValueError(f"--hf {hf}: its config.json has no model_type (not a Hugging Face model folder){hint}")
        model = Transformer.from_hf(hf, backend=backend, op_backend=op_backend)
        spec = tokenizer or (hf if os.path.isfile(os.path.join(hf, "tokenizer.json")) else None)
        tok = fdata.load_tokenizer(spec)
        if spec is None:
            print(f"[generate] no tokenizer.json in {hf}: byte-level prompt and output", file=sys.stderr)
        eos = None
        for name in ("generation_config.json", "config.json"):  # the model's own end-of-text id(s)
            f = os.path.join(hf, name)
            if eos is None and os.path.isfile(f):
                with open(f) as fh:
                    eos = json.load(fh).get("eos_token_id")
        if eos is None:
            eos = tok.eot_id
        if isinstance(tok, fdata.HFTokenizer):  # with the tokenizer's special tokens (e.g. Llama's BOS)
            encode = lambda text: tok.tok.encode(text).ids  # noqa: E731
        else:
            encode = lambda text: tok.encode(text).tolist()  # noqa: E731
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{model.config.vocab_size}")
    model = model.to(device=device, dtype=dtype).eval()  # (the RoPE tables stay fp32)
    return model, tok, eos, encode


def _continuation(tok, context, new, window=8):
    """The text that tokens `new` add after `context` (token ids).  Decoding `new` alone can
    differ: SentencePiece-style tokenizers drop the leading space of the first word of a decode,
    so it is decoded after the last few context tokens and their own text is cut off."""
    ctx = list(context[-window:])
    base, full = tok.decode(ctx), tok.decode(ctx + list(new))
    return full[len(base):] if full.startswith(base) else tok.decode(list(new))


def _generate_run(a):
    import time

    import torch

    from fastlm.generation import Generator

    from fastlm._backend import check_device

    device = check_device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[a.dtype]
    if a.backend == "fused" and a.op_backend is not None:  # before loading (and before the prompt is printed)
        from fastlm._backend import why_unavailable

        if why := why_unavailable(a.op_backend, device):
            raise ValueError(f"--op-backend {a.op_backend} cannot run on {device}: {why}")
    model, tok, eos, encode = _load_for_generation(checkpoint=a.checkpoint, hf=a.hf, tokenizer=a.tokenizer,
                                                  backend=a.backend, op_backend=a.op_backend, device=device,
                                                  dtype=dtype)
    prompts = [encode(text) for text in a.prompt]
    gen = Generator(model, cache=a.cache, cuda_graphs=not a.no_cuda_graphs)
    outs = [[] for _ in prompts]
    shown = [""]

    def show(i, token):  # one prompt: print the text as it arrives (holding back a partial UTF-8 char)
        outs[i].append(token)
        if len(prompts) == 1:
            text = _continuation(tok, prompts[0], outs[0]).rstrip("\ufffd")
            if text.startswith(shown[0]):
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text

    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
              repetition_penalty=a.repetition_penalty, greedy=a.greedy,
              eos_token_id=None if a.ignore_eos else eos, seed=a.seed)
    gen.check_args(prompts, a.max_new_tokens, **kw)  # a bad argument: only the error, nothing on stdout
    if len(prompts) == 1:
        sys.stdout.write(a.prompt[0])
        sys.stdout.flush()
    t0 = time.perf_counter()
    gen.generate(prompts, a.max_new_tokens, stream=show, **kw)
    wall = time.perf_counter() - t0
    if len(prompts) == 1:
        sys.stdout.write(_continuation(tok, prompts[0], outs[0])[len(shown[0]):] + "\n")
        sys.stdout.flush()
    else:
        for i, (text, ids, out) in enumerate(zip(a.prompt, prompts, outs)):
            print(f"--- [{i}] ---\n{text}{_continuation(tok, ids, out)}", flush=True)
    s = gen.stats
    print(f"[generate] {s['new_tokens']} new tokens for {len(prompts)} prompt(s) in {wall:.3f} s: "
          f"{s['new_tokens'] / wall:.1f} tokens/s; prefill {s['prompt_tokens']} tokens in {s['prefill_s'] * 1e3:.1f} ms; "
          f"{_decode_stats(s)} [{model.backend}, {a.cache if model.backend == 'fused' else 'torch'} "
          f"cache, {'CUDA graphs' if gen.cuda_graphs else 'eager'}, {dtype}, {device}]", file=sys.stderr)
    return 0


def _decode_stats(s):
    """The decode part of the stats line, from Generator.stats.  Its decode_tokens_per_s counts
    every step of every sequence, also the steps run after a sequence's EOS: here only the tokens
    returned count (all but each prompt's first, which the prefill made)."""
    steps, secs = s["decode_steps"], s["decode_s"]
    if steps == 0 or not secs > 0:
        return "decode n/a (no decode steps)"
    produced = s["new_tokens"] - s["batch"]
    return (f"decode {produced} new tokens in {steps} steps, {secs * 1e3 / steps:.2f} ms/step "
            f"({produced / secs:.1f} tokens/s)")


COMMANDS = {
    "train": (_train_args, _train_run, "train a Transformer LM (single process, or DDP/FSDP2 under torchrun)"),
    "generate": (_generate_args, _generate_run, "generate text from a trained checkpoint or an HF model folder"),
    "presets": (_presets_args, _presets_run, "list the model presets"),
}


class _DefaultsHelp(argparse.HelpFormatter):
    """--help shows each option's default value, where it has one (not None / False) that its
    help text does not already describe."""

    @staticmethod
    def _shows_default(action):
        d, text = action.default, action.help or ""
        return (bool(action.option_strings) and d not in (None, False, argparse.SUPPRESS, [])
                and text is not argparse.SUPPRESS and "default" not in text)

    def _format_action(self, action):
        if not action.help and self._shows_default(action):  # (options with no help text at all)
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        if self._shows_default(action):
            text = f"{text} (default: %(default)s)".lstrip()
        return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastlm", description="fastlm: fused-kernel Transformer LMs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (add, _, help_) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False,
                                       formatter_class=_DefaultsHelp)
        add(parsers[name])
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.command is None:
        p.print_help()
        return 2
    a.given = _given(parsers[a.command], argv)
    try:
        return COMMANDS[a.command][1](a)
    except BrokenPipeError:  # the reader went away (`fastlm presets | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0
    except (ValueError, OSError, RuntimeError, TypeError) as e:  # OSError: FileNotFoundError, NotADirectoryError, ...
        print(f"fastlm {a.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
