"""Blockage recovery: does fine-tuning make the choreographed executor behave like the re-encoding baseline?

The task: a system prompt asks for both answers as a numbered list; two short factual questions are two user
turns ("Question 1: ...", "Question 2: ..."), and one assistant call answers them. The workflow is written once:

- baseline: the answer re-encodes system, question 1, question 2 serially (ordinary chat prompting);
- choreographed: the two questions are encoded in parallel (each sees only the system prompt, same positions),
  and the answer attends to the three cached messages -- the questions never saw each other (blockage).

Both arms encode the same tokens (one user turn per question in both; PROTOCOLS.md notes that on the 135M model
this format makes even the serial prompt favour the later question, which is what the baseline traces record).
Metrics on held-out pairs, before and after fine-tuning on baseline traces of training pairs: mean
KL(baseline || choreographed) of next-token distributions over the baseline answer tokens (teacher-forced), and
exact agreement of greedy choreographed answers with the baseline's.

Example::

    report = recovery_experiment(choreo.load_model(), config=FinetuneConfig.preset("embedded-cpu"),
                                 out_dir="runs/recovery", n_train=48, n_eval=24)
    report["summary"]["kl_before"], report["summary"]["kl_after"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .baseline import Baseline
from .engine import Call, Choreographer
from .runner import Runner
from .trace import TraceEvent

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


def make_pairs(split: str, n: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """n seeded question pairs (two different questions) from the 'train' or 'eval' pool, no pair repeated
    while unused pairs remain.

    Example: ``make_pairs("eval", 3, seed=0)`` -> three (question 1, question 2) tuples from EVAL_QUESTIONS.
    """
    pools = {"train": TRAIN_QUESTIONS, "eval": EVAL_QUESTIONS}
    if split not in pools:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    pool = pools[split]
    if n < 1 or n > len(pool) * (len(pool) - 1):
        raise ValueError(f"n must be in 1..{len(pool) * (len(pool) - 1)} for the {split!r} pool, got {n}")
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


def collect_traces(model, *, n: int, split: str = "train", seed: int = 0, pairs=None,
                   max_tokens: int = MAX_TOKENS) -> tuple[list[list[TraceEvent]], list[dict]]:
    """Baseline traces of the blockage task (greedy), and per-trace metadata; empty answers are dropped."""
    pairs = pairs if pairs is not None else make_pairs(split, n, seed=seed)
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
    """Replay a trace inside a runner session; returns the last decode's message (teacher-forced or free)."""
    messages = [None] * len(events)
    for group in sorted({e.group for e in events}):
        idx = [i for i, e in enumerate(events) if e.group == group]
        e = events[idx[0]]
        if e.kind == "prefill":
            messages[idx[0]] = await ex.prefill(e.text, role=e.role, parents=[messages[p] for p in e.parents],
                                                offsets=e.offsets, new_offset=e.new_offset)
            continue
        calls = [Call(role=events[i].role, parents=[messages[p] for p in events[i].parents],
                      offsets=events[i].offsets, new_offset=events[i].new_offset, prefix=events[i].prefix,
                      max_tokens=max(events[i].max_tokens, 1), temperature=events[i].temperature,
                      top_p=events[i].top_p, seed=events[i].seed, stop=events[i].stop,
                      teacher_tokens=list(events[i].tokens) if teacher else None, keep_logits=keep_logits)
                 for i in idx]
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
        target = torch.tensor(t[-1].tokens)[:, None]  # (n, 1) the baseline's answer tokens
        nll.append(float(-logq.gather(1, target).mean()))
        top1.append(float((logq.argmax(-1) == target[:, 0]).float().mean()))

    async def free(ex, events):
        return (await replay_async(ex, events, teacher=False)).tokens

    with torch.no_grad():
        greedy = Runner(Choreographer(model), progress=False).run([lambda ex, t=t: free(ex, t) for t in traces])
    agree = [int(list(g) == list(t[-1].tokens)) for g, t in zip(greedy, traces)]
    return {"kl": kl, "nll": nll, "top1": top1, "agree": agree}


def recovery_experiment(model, *, config, out_dir, n_train: int = 40, n_eval: int = 24, seed: int = 0,
                        adapter_dir=None, progress: bool = True) -> dict:
    """Collect baseline traces, fine-tune, and compare held-out KL and agreement before and after.

    The model is returned to its adapter-free state at the end. Writes ``out_dir/recovery.json``; the
    training run (adapters, history) goes to ``adapter_dir``, or to a temporary folder deleted afterwards.
    """
    import tempfile

    from . import stats
    from .finetune import split_traces, train
    from .lora import unload_adapter
    from .provenance import provenance
    from .results import write_json

    t0 = time.perf_counter()
    train_traces, _ = collect_traces(model, n=n_train, split="train", seed=seed)
    eval_traces, eval_meta = collect_traces(model, n=n_eval, split="eval", seed=seed)
    before = divergence(model, eval_traces)
    train_set, dev_set = split_traces(train_traces, dev_fraction=config.dev_fraction, seed=config.seed)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = train(model, train_set, dev_set, config=config, out_dir=Path(adapter_dir or scratch),
                           progress=progress)
            after = divergence(model, eval_traces)
        finally:
            unload_adapter(model)
    diff = stats.paired_mean_difference(before["kl"], after["kl"])
    agree_test = stats.mcnemar_exact(after["agree"], before["agree"])
    nll_diff = stats.paired_mean_difference(before["nll"], after["nll"])
    top1_diff = stats.paired_mean_difference(after["top1"], before["top1"])
    n = len(eval_traces)
    summary = {
        "n_eval": n, "n_train": len(train_set), "n_dev": len(dev_set),
        "kl_before": float(np.mean(before["kl"])), "kl_after": float(np.mean(after["kl"])),
        "kl_reduction": diff.mean_difference, "kl_reduction_ci": [diff.low, diff.high],
        "kl_t_pvalue": diff.t_pvalue, "kl_wilcoxon_pvalue": diff.wilcoxon_pvalue,
        "nll_before": float(np.mean(before["nll"])), "nll_after": float(np.mean(after["nll"])),
        "nll_reduction": nll_diff.mean_difference, "nll_t_pvalue": nll_diff.t_pvalue,
        "top1_before": float(np.mean(before["top1"])), "top1_after": float(np.mean(after["top1"])),
        "top1_gain": top1_diff.mean_difference, "top1_t_pvalue": top1_diff.t_pvalue,
        "agree_before": stats.rate(sum(before["agree"]), n).format(),
        "agree_after": stats.rate(sum(after["agree"]), n).format(),
        "agree_mcnemar_pvalue": agree_test.pvalue,
        "best_step": result.best_step, "steps": result.steps, "best_dev_loss": result.best_dev_loss,
        "dev_loss_step0": result.history[0]["dev_loss"],
        "seconds_per_step": result.seconds_per_step, "peak_rss_mb": result.peak_rss_mb,
        "wall_s": time.perf_counter() - t0,
    }
    report = {"summary": summary, "before": before, "after": after, "eval_pairs": eval_meta,
              "config": config.to_json(), "history": result.history,
              "provenance": provenance(model, seeds=[seed, config.seed], sample_sizes={"train": n_train, "eval": n})}
    write_json(Path(out_dir) / "recovery.json", report)
    return report
