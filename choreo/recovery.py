"""Blockage recovery: does fine-tuning make the choreographed executor behave like the re-encoding baseline?

The task: a system prompt asks for both answers as a numbered list; two short factual questions are two user
turns ("Question 1: ...", "Question 2: ..."), and one assistant call answers them. The workflow is written once:

- baseline: the answer re-encodes system, question 1, question 2 serially (ordinary chat prompting);
- choreographed: the two questions are encoded in parallel (each sees only the system prompt, same positions),
  and the answer attends to the three cached messages -- the questions never saw each other (blockage).

Both arms encode the same tokens (one user turn per question in both; docs/protocols.md, MultiQA, notes that on the
135M model this format makes even the serial prompt favour the later question, which is what the baseline traces
record). The learning rate, and the loss when several are given, are chosen on dev traces split off the training
pairs (``select_on_dev``, by dev KL to the adapter-off baseline); the held-out pairs are collected and measured
once, after that choice, adapter off (before) and on (after): mean KL(baseline || choreographed) of next-token
distributions over the baseline answer tokens (teacher-forced), NLL and top-1 of those tokens, and exact agreement
of greedy choreographed answers with the baseline's.

Example::

    report = recovery_experiment(choreo.load_model(), configs=candidate_configs(FinetuneConfig.preset("embedded-cpu")),
                                 out_dir="runs/recovery", n_train=48, n_eval=24)
    report["summary"]["kl_before"], report["summary"]["kl_after"]
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .baseline import Baseline
from .checks import check_int, is_int
from .choreographer import Choreographer
from .runner import Runner
from .trace import TraceEvent, replay_calls

SYSTEM = ("Answer both questions. Reply with a numbered list: "
          "1. the answer to question 1, 2. the answer to question 2.")
MAX_TOKENS = 24

# Short facts the 135M model mostly knows; disjoint pools for training and held-out pairs.
TRAIN_QUESTIONS = (
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Germany?", "What is the capital of Spain?", "What is the capital of Russia?",
    "What is the capital of Egypt?", "What is the capital of Greece?", "What colour is the sky on a clear day?",
    "What colour is grass?", "What colour is snow?", "What colour is a banana?", "What colour is blood?",
    "How many legs does a spider have?", "How many days are in a week?", "What is 2 + 2?",
    "What planet do we live on?", "Which animal says moo?", "What is frozen water called?",
    "Who wrote Romeo and Juliet?", "What is the opposite of hot?", "How many hours are in a day?",
    "What is the largest planet in the solar system?", "What do bees make?", "What is the capital of China?",
    "How many wheels does a bicycle have?", "What colour is coal?", "What is the chemical symbol for water?",
    "Which animal is known as the king of the jungle?", "What is the largest ocean on Earth?",
    "How many months are in a year?", "What is the capital of England?",
)
EVAL_QUESTIONS = (
    "What is the capital of Portugal?", "What is the capital of Canada?", "What colour is a ripe tomato?",
    "What colour are leaves in summer?", "How many legs does a dog have?", "What is 3 + 5?",
    "Which animal barks?", "What is the boiling point of water in Celsius?", "Who painted the Mona Lisa?",
    "What is the closest star to Earth?", "What language is spoken in Brazil?", "How many minutes are in an hour?",
    "What is the capital of Australia?", "What colour is milk?", "What gas do humans breathe in to live?",
    "What is the opposite of up?",
)


def question_pools(*, dev_fraction: float, seed: int = 0, dev_pairs: int = 0) -> dict[str, tuple[str, ...]]:
    """The 'train', 'dev' and 'eval' question pools: 'dev' is a seeded share ``dev_fraction`` of TRAIN_QUESTIONS
    (at least 2, and enough for ``dev_pairs`` different pairs) and 'train' the rest, so that no dev pair holds a
    question a training pair holds: choosing on dev then rewards what the held-out pairs measure (answering new
    questions), not memorised answers.

    Example: ``question_pools(dev_fraction=0.2)["dev"]`` -> 6 of the 32 training questions.
    """
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    check_int("seed", seed, minimum=0)  # numpy's generators take no negative seed
    n_questions = max(2, round(len(TRAIN_QUESTIONS) * dev_fraction))
    while n_questions * (n_questions - 1) < dev_pairs:
        n_questions += 1
    n_questions = min(len(TRAIN_QUESTIONS) - 2, n_questions)
    dev = set(np.random.default_rng([seed, 3]).permutation(len(TRAIN_QUESTIONS))[:n_questions].tolist())
    return {"train": tuple(q for i, q in enumerate(TRAIN_QUESTIONS) if i not in dev),
            "dev": tuple(q for i, q in enumerate(TRAIN_QUESTIONS) if i in dev), "eval": EVAL_QUESTIONS}


def question_pairs(split: str, n: int, *, seed: int = 0, pools: dict[str, tuple[str, ...]] | None = None
               ) -> list[tuple[str, str]]:
    """n seeded pairs of two different questions (strings) from the 'train' or 'eval' pool (or the pools of
    ``question_pools``, 'dev' too), no ordered pair repeated; the first n of one seed's order for any n (the
    trivia benchmark's pairs of ``Question`` are ``choreo.data.trivia.make_pairs``).

    Example: ``question_pairs("eval", 3, seed=0)`` -> three (question 1, question 2) tuples from EVAL_QUESTIONS.
    """
    check_int("seed", seed, minimum=0)  # numpy's generators take no negative seed
    pools = pools or {"train": TRAIN_QUESTIONS, "eval": EVAL_QUESTIONS}
    if split not in pools:
        raise ValueError(f"split must be one of {', '.join(map(repr, pools))}, got {split!r}")
    pool = pools[split]
    if not is_int(n) or n < 1 or n > len(pool) * (len(pool) - 1):
        raise ValueError(f"n must be in 1..{len(pool) * (len(pool) - 1)} for the {split!r} pool, got {n!r}")
    rng = np.random.default_rng([seed, len(split)])
    all_pairs = [(a, b) for a in pool for b in pool if a != b]
    return [all_pairs[i] for i in rng.permutation(len(all_pairs))[:n]]


async def two_questions(ex, q1: str, q2: str, *, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The blockage workflow (one definition for every executor); returns the answer's content tokens."""
    system = await ex.prefill(SYSTEM, role="system")
    first = await ex.prefill(f"Question 1: {q1}", role="user", parents=[system])
    second = await ex.prefill(f"Question 2: {q2}", role="user", parents=[system])  # a parallel sibling of first
    answer = await ex.decode(role="assistant", parents=[system, first, second], max_tokens=max_tokens)
    return answer.tokens


def collect_traces(model, *, n: int, split: str = "train", seed: int = 0, pairs=None, pools=None,
                   max_tokens: int = MAX_TOKENS) -> tuple[list[list[TraceEvent]], list[dict]]:
    """Baseline traces of the blockage task (greedy), and per-trace metadata; empty answers are dropped."""
    pairs = pairs if pairs is not None else question_pairs(split, n, seed=seed, pools=pools)
    runner = Runner(Baseline(model), progress=False, trace=True)
    with torch.no_grad():
        runner.run([lambda ex, p=p: two_questions(ex, *p, max_tokens=max_tokens) for p in pairs])
    traces, meta = [], []
    for i, (q1, q2) in enumerate(pairs):
        events = runner.traces[i]
        if events[-1].tokens:
            traces.append(events)
            meta.append({"task": "blockage", "q1": q1, "q2": q2, "answer": events[-1].text})
    return traces, meta


async def replay_async(ex, events: Sequence[TraceEvent], *, teacher: bool, keep_logits: bool = False):
    """Replay a trace inside a runner session; returns the last decode's message (teacher-forced, or free: then
    only the calls that sampled when recorded sample again)."""
    messages = [None] * len(events)
    for group in sorted({e.group for e in events}):
        idx = [i for i, e in enumerate(events) if e.group == group]
        e = events[idx[0]]
        if e.kind == "prefill":
            messages[idx[0]] = await ex.prefill(e.text, role=e.role, parents=[messages[p] for p in e.parents],
                                                offsets=e.offsets, new_offset=e.new_offset)
            continue
        calls = [dataclasses.replace(c, keep_logits=keep_logits)
                 for c in replay_calls(events, messages, teacher=teacher, group=group)]
        for i, msg in zip(idx, await ex.decode(calls)):
            messages[i] = msg
    last = max(i for i, e in enumerate(events) if e.kind == "decode")
    return messages[last]


def _last_logits(executor, traces) -> list[torch.Tensor]:
    async def forced(ex, events):
        return (await replay_async(ex, events, teacher=True, keep_logits=True)).logits  # (n, V)

    with torch.no_grad():
        return Runner(executor, progress=False).run([lambda ex, t=t: forced(ex, t) for t in traces])


def divergence(model, traces: Sequence[Sequence[TraceEvent]]) -> dict:
    """Per trace, over the last call's baseline answer tokens (teacher-forced): mean KL(baseline || choreographed)
    of the next-token distributions (``kl``), the choreographed mean negative log-likelihood of the baseline's
    tokens (``nll``, the held-out counterpart of the training loss without the end-of-turn token), the share of
    rows whose choreographed argmax is the baseline's token (``top1``); and whether the free greedy choreographed
    answer equals the baseline's token for token (``agree``). The baseline runs adapter-free.
    """
    base = _last_logits(Baseline(model), traces)
    chor = _last_logits(Choreographer(model), traces)
    kl, nll, top1 = [], [], []
    for b, c, t in zip(base, chor, traces):
        logp, logq = b.log_softmax(-1), c.log_softmax(-1)  # (n, V)
        kl.append(float((logp.exp() * (logp - logq)).sum(-1).mean()))
        target = torch.tensor(t[-1].tokens, device=logq.device)[:, None]  # (n, 1) the baseline's answer tokens
        nll.append(float(-logq.gather(1, target).mean()))
        top1.append(float((logq.argmax(-1) == target[:, 0]).float().mean()))

    async def free(ex, events):
        return (await replay_async(ex, events, teacher=False)).tokens

    with torch.no_grad():
        greedy = Runner(Choreographer(model), progress=False).run([lambda ex, t=t: free(ex, t) for t in traces])
    agree = [int(list(g) == list(t[-1].tokens)) for g, t in zip(greedy, traces)]
    return {"kl": kl, "nll": nll, "top1": top1, "agree": agree}


def candidate_configs(base, *, losses: Sequence[str] = ("kl",), lrs: Sequence[float] = (3e-4, 1e-3)) -> list:
    """The grid ``select_on_dev`` chooses from: ``base`` with every (loss, lr) combination, losses outer.

    Example: ``candidate_configs(FinetuneConfig.preset("embedded-cpu"), losses=("ce", "kl"), lrs=(3e-4,))``.
    """
    import dataclasses

    if not losses or not lrs:
        raise ValueError(f"need at least one loss and one learning rate, got {list(losses)} and {list(lrs)}")
    return [dataclasses.replace(base, loss=loss, lr=float(lr)) for loss in losses for lr in lrs]


def recovery_experiment(model, *, configs, out_dir, n_train: int = 40, n_eval: int = 24, seed: int = 0,
                        adapter_dir=None, progress: bool = True, command: str | None = None) -> dict:
    """Collect training traces, choose a fine-tuning config on dev, then compare held-out metrics before and after.

    ``configs``: the candidates (``candidate_configs``). ``n_train`` pairs are split into training and dev pairs by
    the first config's ``dev_fraction``; the dev pairs are drawn from questions no training pair holds
    (``question_pools``, seeded by that config's ``seed``). The held-out pairs are collected only after the
    choice and measured once per arm. The model is returned to its adapter-free state. Writes
    ``out_dir/recovery.json`` and ``out_dir/recovery.md``; the training runs (adapters, histories) go to
    ``adapter_dir``, or to a temporary folder deleted afterwards.
    """
    import tempfile

    from .finetune import select_on_dev
    from .lora import adapter_disabled, unload_adapter
    from .provenance import provenance
    from .results import write_json, write_text

    from .lora import check_no_adapter

    configs = list(configs)
    if not configs:
        raise ValueError("recovery_experiment needs at least one candidate config")
    check_no_adapter(model)  # it trains its own adapters and removes them when it ends
    pools, n_dev = check_recovery_sizes(n_train, n_eval, configs, seed=seed)  # now, not after training
    t0 = time.perf_counter()
    launch = launch_record()  # the run takes minutes: the code and scheduling it started with
    train_set, _ = collect_traces(model, n=n_train - n_dev, split="train", seed=seed, pools=pools)
    dev_set, _ = collect_traces(model, n=n_dev, split="dev", seed=seed, pools=pools)
    _enough_traces("training", train_set, n_train - n_dev, least=1)
    _enough_traces("dev", dev_set, n_dev, least=1)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            chosen = select_on_dev(model, train_set, dev_set, configs=configs, out_dir=Path(adapter_dir or scratch),
                                   progress=progress)
            t_selected = time.perf_counter()
            # Held-out data: first touched here, once, for the before/after report.
            eval_traces, eval_meta = collect_traces(model, n=n_eval, split="eval", seed=seed)
            _enough_traces("held-out", eval_traces, n_eval, least=2)
            after = divergence(model, eval_traces)
            with adapter_disabled(model):
                before = divergence(model, eval_traces)
        finally:
            unload_adapter(model)
    result = chosen.result
    summary = {
        "n_eval": len(eval_traces), "n_train": len(train_set), "n_dev": len(dev_set),
        **compare(before, after),
        "selection_metric": chosen.metric, "chosen": chosen.best, "chosen_loss": chosen.config.loss,
        "chosen_lr": chosen.config.lr, "best_step": result.best_step, "steps": result.steps,
        "best_dev": result.best_dev_loss, "dev_step0": result.history[0]["dev_loss"],
        "seconds_per_step": result.seconds_per_step,
        "seconds_per_step_all": float(np.mean([c["seconds_per_step"] for c in chosen.candidates])),
        "peak_rss_mb": result.peak_rss_mb, "train_wall_s": t_selected - t0, "wall_s": time.perf_counter() - t0,
    }
    report = {"summary": summary, "candidates": chosen.candidates, "before": before, "after": after,
              "eval_pairs": eval_meta, "config": chosen.config.to_json(), "history": result.history,
              "provenance": provenance(model, seeds={"pairs": seed, "finetune": configs[0].seed},
                                       sample_sizes={"train_pairs": n_train, "train": len(train_set),
                                                     "dev": len(dev_set), "eval": len(eval_traces)},
                                       command=command, **launch)}
    write_json(Path(out_dir) / "recovery.json", report)
    write_text(Path(out_dir) / "recovery.md", recovery_markdown(report))
    return report


def _enough_traces(what: str, traces: list, asked: int, *, least: int) -> None:
    """ValueError unless at least ``least`` of the ``asked`` pairs left a trace (``collect_traces`` drops a pair
    whose baseline answer is empty)."""
    if len(traces) < least:
        raise ValueError(f"{len(traces)} of {asked} {what} pairs left a trace (the baseline's answer was empty for "
                         f"the rest); the experiment needs at least {least}: draw more pairs")


def check_recovery_sizes(n_train: int, n_eval: int, configs, *, seed: int = 0,
                         names: tuple[str, str] = ("n_train", "n_eval")) -> tuple[dict, int]:
    """Raise ValueError naming the option (``names``: how the caller calls n_train and n_eval) unless ``n_train``
    pairs split into training and dev pairs and ``n_eval`` >= 2 held-out pairs (the paired tests' least) can be
    drawn; returns the question pools and the number of dev pairs."""
    if not is_int(n_train) or n_train < 2:
        raise ValueError(f"{names[0]} must be an integer >= 2 (training and dev pairs), got {n_train!r}")
    if not is_int(n_eval) or n_eval < 2:
        raise ValueError(f"{names[1]} must be an integer >= 2 (the before/after tests pair held-out pairs), "
                         f"got {n_eval!r}")
    n_dev = min(n_train - 1, max(1, round(n_train * configs[0].dev_fraction)))
    pools = question_pools(dev_fraction=configs[0].dev_fraction, seed=configs[0].seed, dev_pairs=n_dev)
    for (name, given), split, n in (((names[0], n_train), "train", n_train - n_dev),
                                    ((names[0], n_train), "dev", n_dev), ((names[1], n_eval), "eval", n_eval)):
        try:
            question_pairs(split, n, seed=seed, pools=pools)
        except ValueError as error:
            raise ValueError(f"{name} {given}: {error}") from None
    return pools, n_dev


def launch_record() -> dict:
    """The git commit, niceness and OMP thread setting at the start of a run (provenance is written at its end; its
    ``git_commit`` is the same commit, the code as imported)."""
    import os

    from .provenance import COMMIT_AT_START

    return {"git_commit_at_start": COMMIT_AT_START, "niceness": os.nice(0),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


METRICS = (  # name, what it is, which direction is better
    ("kl", "KL(baseline || choreographed), nats/token", "lower"),
    ("nll", "NLL of the baseline's tokens, nats/token", "lower"),
    ("top1", "top-1 = baseline token", "higher"),
    ("agree", "greedy answer = baseline's", "higher"),
)


def compare(before: dict, after: dict, *, alpha: float = 0.05) -> dict:
    """Paired before/after statistics per metric: means, the improvement (before - after for "lower" metrics,
    after - before otherwise) with its t interval, paired t and Wilcoxon p, and Holm-adjusted p across the
    four metrics; agreement adds its rates with Wilson intervals (``agree_before_rate``, and as text
    ``agree_before_ci``: "9.4% ± 10.1% [3.2, 24.2]") and the exact McNemar p (the p that enters the adjustment)."""
    from . import stats

    out, pvalues = {}, []
    for name, _, better in METRICS:
        x, y = (before[name], after[name]) if better == "lower" else (after[name], before[name])
        d = stats.paired_mean_difference(x, y, alpha=alpha)
        out.update({f"{name}_before": float(np.mean(before[name])), f"{name}_after": float(np.mean(after[name])),
                    f"{name}_gain": d.mean_difference, f"{name}_gain_ci": [d.low, d.high],
                    f"{name}_t_pvalue": d.t_pvalue, f"{name}_wilcoxon_pvalue": d.wilcoxon_pvalue})
        pvalues.append(d.t_pvalue)
    n = len(before["agree"])
    for arm, values in (("before", before["agree"]), ("after", after["agree"])):
        agreement = stats.rate(sum(values), n)
        out[f"agree_{arm}_ci"] = agreement.format_both()  # the paper's ± and the Wilson interval
        out[f"agree_{arm}_rate"] = agreement.to_json()
    out["agree_mcnemar_pvalue"] = stats.mcnemar_exact(after["agree"], before["agree"]).pvalue
    pvalues[-1] = out["agree_mcnemar_pvalue"]
    adjusted = stats.adjust_pvalues(pvalues, method="holm", alpha=alpha).adjusted
    for (name, _, _), p in zip(METRICS, adjusted):
        out[f"{name}_holm_pvalue"] = float(p)
    return out


def rerender(out_dir) -> Path:
    """Recompute the before/after statistics of ``out_dir/recovery.json`` from the per-pair metrics it logged
    (``before``, ``after``) and rewrite it and ``recovery.md``; nothing is measured, the run's provenance is kept
    (``choreo finetune recovery --render-only --out DIR``). Returns the ``.md``."""
    import json

    from .results import write_json, write_text

    path = Path(out_dir) / "recovery.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist: no recovery experiment was written there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not JSON ({error})") from None
    names = [name for name, _, _ in METRICS]
    ok = isinstance(report, dict) and all(isinstance(report.get(k), dict) for k in ("summary", "before", "after",
                                                                                       "provenance"))
    lengths = ok and {len(report[arm].get(name) or ()) for arm in ("before", "after") for name in names}
    if not ok or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"{str(path)!r} lacks the per-pair metrics {names} of both arms, of one length: not a "
                         f"report recovery_experiment wrote")
    report["summary"].update(compare(report["before"], report["after"]))
    try:  # the whole table before either file is written
        text = recovery_markdown(report)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"{str(path)!r}: its summary, candidates or provenance lack what recovery.md shows "
                         f"({type(error).__name__}: {error}): not a report recovery_experiment wrote") from None
    write_json(path, report)
    md = Path(out_dir) / "recovery.md"
    write_text(md, text)
    return md


def recovery_markdown(report: dict) -> str:
    """The before/after table, the dev selection and provenance, as Markdown."""
    s, prov = report["summary"], report["provenance"]
    lines = [
        "# Blockage recovery after fine-tuning (embedded model)",
        "",
        f"Held-out question pairs: {s['n_eval']} (pool disjoint from training). Training pairs: {s['n_train']}, "
        f"dev: {s['n_dev']} (from questions no training pair holds). Chosen on dev ({s['selection_metric']}): "
        f"loss {s['chosen_loss']!r}, lr {s['chosen_lr']:g}, "
        f"best step {s['best_step']} of {s['steps']}. The held-out pairs were collected and measured once, after "
        f"that choice. Mean KL to the baseline: {s['kl_before']:.4f} -> {s['kl_after']:.4f} nats/token "
        f"({s['kl_gain'] / s['kl_before']:.0%} of the gap closed).",
        "",
        "| metric | before | after | gain [95% CI] | paired t p | Wilcoxon p | Holm p |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label, better in METRICS:
        lo, hi = s[f"{name}_gain_ci"]
        before, after = s[f"{name}_before"], s[f"{name}_after"]
        if name == "agree":
            before, after = s["agree_before_ci"], s["agree_after_ci"]
            p_main = f"McNemar {s['agree_mcnemar_pvalue']:.3g}"
        else:
            before, after = f"{before:.4f}", f"{after:.4f}"
            p_main = f"{s[f'{name}_t_pvalue']:.3g}"
        label = label.replace("|", "\\|")  # a bare pipe would split the Markdown cell
        lines.append(f"| {label} ({better} is better) | {before} | {after} | {s[f'{name}_gain']:+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] | {p_main} | {s[f'{name}_wilcoxon_pvalue']:.3g} | "
                     f"{s[f'{name}_holm_pvalue']:.3g} |")
    lines += ["", "Gain: before - after for lower-is-better metrics, after - before otherwise (positive = closer to "
              "the baseline). Tests are two-sided and paired over held-out pairs; Holm adjusts across the four rows.",
              "", "## Selection on dev (held-out data not used)", "",
              f"| candidate | loss | lr | dev {s['selection_metric']} at step 0 | best dev {s['selection_metric']} | "
              "best step | s/step |", "|---|---|---|---|---|---|---|"]
    for k, c in enumerate(report["candidates"]):
        mark = " (chosen)" if k == s["chosen"] else ""
        lines.append(f"| {k}{mark} | {c['loss']} | {c['lr']:g} | {c['dev_step0']:.4f} | {c['best_dev']:.4f} | "
                     f"{c['best_step']}/{c['steps']} | {c['seconds_per_step']:.1f} |")
    model = prov.get("model") or {}
    lines += ["", "## Provenance", "",
              f"- model: {model.get('name')} sha256 {model.get('sha256')} ({model.get('dtype')})",
              f"- device: {prov['device']}",
              f"- seeds: {prov['seeds']}; sizes: {prov['sample_sizes']}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}",
              f"- git commit at start: {prov.get('git_commit_at_start')}; at the end: "
              f"{prov.get('git_commit_at_write', prov['git_commit'])}; "
              f"finished {prov['date']}",
              f"- OMP_NUM_THREADS={prov.get('omp_num_threads')}, niceness {prov.get('niceness')}",
              f"- time per optimizer step (chosen run): {s['seconds_per_step']:.1f} s; "
              f"peak RSS {s['peak_rss_mb']:.0f} MiB; "
              f"wall {s['wall_s'] / 60:.1f} min",
              f"- command: `{prov['command']}`", ""]
    return "\n".join(lines)
