"""``choreo finetune collect|train|recovery``: the command line of ``choreo.finetune`` and ``choreo.recovery``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .attention import BACKENDS
from .checks import check_int
from .cli import DEVICE_HELP, input_file, model_device, output_dir, output_file, positive_int
from .finetune import LOSSES, FinetuneConfig, split_traces, train
from .results import finite

__all__ = ["register"]

# ``choreo finetune recovery``'s options that run the experiment (``--render-only`` refuses any other value)
RECOVERY_DEFAULTS = dict(n_train=40, n_eval=24, config="embedded-cpu", losses=["kl"], lrs=[3e-4, 1e-3], epochs=None,
                         runs=None, model=None)


def register(sub) -> None:
    """Add ``choreo finetune collect|train|recovery`` to an argparse subparsers object."""
    p = sub.add_parser("finetune", help="collect baseline traces and fine-tune a LoRA adapter on them")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    c = verbs.add_parser("collect", help="run a built-in task under the baseline and save its traces (JSONL)")
    c.add_argument("--task", default="blockage", choices=["blockage"])
    c.add_argument("--n", type=positive_int, default=64, help="workflow instances")
    c.add_argument("--split", default="train", choices=["train", "eval"], help="which question pool")
    c.add_argument("--seed", type=int, default=0, help="seed of the question pairs' draw (an integer >= 0)")
    c.add_argument("--out", required=True, help="trace file to write")
    c.add_argument("--model", default=None, help="local checkpoint directory (default: embedded SmolLM2-135M)")
    c.set_defaults(func=_cli_collect)
    t = verbs.add_parser("train", help="train an adapter from trace files")
    t.add_argument("--traces", required=True, nargs="+", help="training trace files (JSONL)")
    t.add_argument("--dev-traces", nargs="*", default=None, help="dev trace files (default: split off --traces)")
    t.add_argument("--out", required=True, help="run folder (best/, last/, history.json)")
    t.add_argument("--config", default="embedded-cpu", choices=sorted(FinetuneConfig.PRESETS))
    t.add_argument("--loss", default=None, choices=list(LOSSES),
                   help="training loss (default: the preset's, 'ce'); 'kl' distils the adapter-off baseline")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last")
    t.add_argument("--attention", default="torch", choices=sorted(BACKENDS),
                   help="attention backend of the replays ('triton': the fused kernel's forward and backward; needs "
                        "--device cuda, or TRITON_INTERPRET=1 on cpu)")
    t.add_argument("--device", default=None, help=f"where the model trains: {DEVICE_HELP}; fp32 on cpu, bf16 on cuda")
    t.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) for the run: deterministic GPU algorithms, an "
                        "operation without one raises (the kernel's backward adds dK / dV in a fixed order)")
    t.add_argument("--model", default=None)
    t.set_defaults(func=_cli_train)
    r = verbs.add_parser("recovery", help="blockage recovery: KL and agreement before/after fine-tuning")
    d = RECOVERY_DEFAULTS
    r.add_argument("--n-train", type=positive_int, default=d["n_train"], help="training pairs (dev is split off these)")
    r.add_argument("--n-eval", type=positive_int, default=d["n_eval"], help="held-out pairs (at least 2)")
    r.add_argument("--out", required=True, help="folder for recovery.json and recovery.md")
    r.add_argument("--config", default=d["config"], choices=sorted(FinetuneConfig.PRESETS))
    r.add_argument("--losses", nargs="+", default=d["losses"], choices=list(LOSSES), help="candidate losses")
    r.add_argument("--lrs", nargs="+", type=float, default=d["lrs"], help="candidate learning rates")
    r.add_argument("--epochs", type=int, default=d["epochs"], help="override the preset's epochs")
    r.add_argument("--runs", default=d["runs"], help="keep the candidates' adapters here (default: a temporary folder)")
    r.add_argument("--model", default=d["model"])
    r.add_argument("--render-only", action="store_true",
                   help="recompute the statistics of OUT/recovery.json from its per-pair metrics and rewrite it and "
                        "recovery.md (nothing runs)")
    r.set_defaults(func=_cli_recovery)


def _cli_collect(args) -> int:
    from .model import load_model
    from .recovery import collect_traces, question_pairs

    from .provenance import provenance
    from .results import write_json
    from .trace import save_traces

    sidecar = f"{args.out}.provenance.json"
    for path in (args.out, sidecar):  # before the model loads and the traces are collected
        output_file(path, option="--out")
    check_int("--seed", args.seed, minimum=0)
    try:
        question_pairs(args.split, args.n, seed=args.seed)  # the pool holds that many pairs
    except ValueError as error:
        raise ValueError(f"--n: {error}") from None
    model = load_model(args.model)
    traces, meta = collect_traces(model, n=args.n, split=args.split, seed=args.seed)
    save_traces(args.out, traces, meta=meta)
    write_json(sidecar, provenance(model, seeds=[args.seed], sample_sizes={"instances": args.n, "traces": len(traces)},
                                   task=args.task, split=args.split))
    print(f"wrote {len(traces)} {args.task} traces to {args.out} (provenance: {sidecar})")
    return 0


def _cli_train(args) -> int:
    from .model import load_model
    from .trace import load_traces

    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    config = FinetuneConfig.preset(args.config, attention=args.attention,
                                   **({} if args.loss is None else {"loss": args.loss}))
    device = model_device(args.device, attention=config.attention)
    for option, paths in (("--traces", args.traces), ("--dev-traces", args.dev_traces or ())):
        for path in paths:
            input_file(path, option=option)
    output_dir(args.out, option="--out")  # before the model loads: train writes OUT/best, OUT/last as it goes
    earlier = [n for n in ("best", "last", "history.json") if (Path(args.out) / n).exists()]
    if earlier and not args.resume:  # a fresh run would overwrite best/ at its first evaluation
        raise ValueError(f"--out {args.out!r} holds a training run ({', '.join(earlier)}): pass --resume to continue "
                         f"it, or choose another folder (a new run would replace its adapter)")
    traces = [events for path in args.traces for _, events in load_traces(path)]
    if args.dev_traces:
        train_set, dev_set = traces, [events for path in args.dev_traces for _, events in load_traces(path)]
    else:
        train_set, dev_set = split_traces(traces, dev_fraction=config.dev_fraction, seed=config.seed)
    result = train(load_model(args.model, device=device), train_set, dev_set, config=config, out_dir=args.out,
                   resume=args.resume)
    if args.resume and result.steps_run == 0:
        print(f"--out {args.out!r}: the run had finished all {result.steps} steps; none left to run",
              file=sys.stderr)
    print(json.dumps(finite({"best_adapter": str(result.best_adapter), "best_step": result.best_step,
                             "best_dev_loss": result.best_dev_loss, "steps": result.steps,
                             "seconds_per_step": result.seconds_per_step, "peak_rss_mb": result.peak_rss_mb}),
                     indent=1, allow_nan=False))
    return 0


def _cli_recovery(args) -> int:
    from .model import load_model
    from .recovery import candidate_configs, check_recovery_sizes, recovery_experiment, rerender

    if args.render_only:
        given = [f"--{name.replace('_', '-')}" for name in ("n_train", "n_eval", "config", "losses", "lrs", "epochs",
                                                            "runs", "model")
                 if getattr(args, name) != RECOVERY_DEFAULTS[name]]
        if given:
            raise ValueError(f"{', '.join(given)} has no effect with --render-only (nothing runs)")
        print(f"wrote {rerender(args.out)}")
        return 0
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    configs = candidate_configs(FinetuneConfig.preset(args.config, **overrides), losses=args.losses, lrs=args.lrs)
    check_recovery_sizes(args.n_train, args.n_eval, configs, names=("--n-train", "--n-eval"))  # before loading
    # before the model loads: recovery.json and .md are written when the experiment ends, --runs as it trains
    output_dir(args.out, option="--out")
    if args.runs is not None:
        output_dir(args.runs, option="--runs")
    report = recovery_experiment(load_model(args.model), configs=configs, out_dir=args.out, n_train=args.n_train,
                                 n_eval=args.n_eval, adapter_dir=args.runs)
    print(json.dumps(report["summary"], indent=1))
    return 0
