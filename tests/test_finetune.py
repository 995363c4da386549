"""Fine-tuning: the replay loss (CE and KL to the baseline), gradients through the cache, adapters, training,
resume, splits and selection on dev.

A tiny random Llama over the embedded tokenizer (tests/conftest.py ``build_tiny``), fp64 so that independent
computations of the same loss agree to round-off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile

import pytest
import torch

import choreo
from choreo.finetune import FinetuneConfig, Teacher, check_replayable, evaluate, replay_loss, schedule, \
    select_calls, sampled_end_of_turn, select_on_dev, split_traces, train, trained_adapter
from choreo.finetune_cli import register
from choreo.lora import add_adapter, adapter_disabled, is_adapted, load_adapter, lora_layers, save_adapter, \
    trainable_parameters, unload_adapter, use_adapter

from tests.conftest import build_tiny

MAX_TOKENS = 5


async def chain(ex, topic: str):
    """Parallel prefills, a parallel pair of decodes, then a call that attends to both decoded messages."""
    sys = await ex.prefill("Be brief.", role="system")
    a = await ex.prefill(f"Topic A: {topic}", role="user", parents=[sys])
    b = await ex.prefill(f"Topic B: {topic}!", role="user", parents=[sys])  # same positions as a
    x, y = await ex.decode([
        choreo.Call(role="assistant:x", parents=[sys, a], max_tokens=MAX_TOKENS),
        choreo.Call(role="assistant:y", parents=[sys, b], max_tokens=MAX_TOKENS + 1, prefix="Sure"),
    ])
    final = await ex.decode(role="assistant", parents=[sys, a, b, x, y], max_tokens=MAX_TOKENS)
    return final.tokens


def collect(model, topics, executor_cls=choreo.Baseline):
    runner = choreo.Runner(executor_cls(model), progress=False, trace=True)
    with torch.no_grad():
        runner.run([lambda ex, t=t: chain(ex, t) for t in topics])
    return [runner.traces[i] for i in range(len(topics))]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = build_tiny(tokenizer)
    yield model
    unload_adapter(model)


@pytest.fixture(scope="module")
def traces(tiny):
    return collect(tiny, ["cats", "rain", "tea", "maps", "jazz", "salt", "bees", "wind"])


def add_test_adapter(model) -> None:
    """A LoRA adapter whose B matrices are non-zero (so every LoRA weight gets gradient)."""
    add_adapter(model, rank=4, alpha=8, dropout=0.0, seed=1)
    with torch.no_grad():
        for name, p in model.hf_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def lora_gradients(model, attention: str, traces) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay ``traces`` through a fresh choreographed executor with ``attention``, one backward per replay (as
    training does); returns the summed loss and every LoRA gradient, flattened."""
    ch = choreo.Choreographer(model, attention=attention)
    ch.engine.grad = True
    for p in trainable_parameters(model):
        p.grad = None
    total = torch.zeros(())
    for events in traces:
        loss = replay_loss(ch, events).loss
        loss.backward()
        total = total + loss.detach().cpu()
    return total, torch.cat([p.grad.flatten() for p in trainable_parameters(model)])


@pytest.fixture
def adapted(tiny):
    add_test_adapter(tiny)
    yield tiny
    unload_adapter(tiny)


def isolated_loss(model, events, i: int) -> float:
    """Call i alone: a fresh reference-backend executor replays only its ancestors, then forces its output plus
    the end-of-turn token where the baseline sampled it; the loss is the mean negative log-probability of those."""
    need, stack = set(), [i]
    while stack:
        j = stack.pop()
        for p in events[j].parents:
            if p not in need:
                need.add(p)
                stack.append(p)
    ch = choreo.Choreographer(model, attention="reference")
    msgs = {}
    for j in sorted(need):
        e = events[j]
        parents = [msgs[p] for p in e.parents]
        if e.kind == "prefill":
            msgs[j] = ch.prefill(e.text, role=e.role, parents=parents, offsets=e.offsets, new_offset=e.new_offset)
        else:
            msgs[j] = ch.decode(role=e.role, parents=parents, offsets=e.offsets, new_offset=e.new_offset,
                                prefix=e.prefix, teacher_tokens=list(e.tokens))
    e = events[i]
    eot = [ch.format.footer(e.role)[0]] if sampled_end_of_turn(e, ch.format) else []  # the CE's rows
    msg = ch.decode(role=e.role, parents=[msgs[p] for p in e.parents], offsets=e.offsets, new_offset=e.new_offset,
                    prefix=e.prefix, teacher_tokens=list(e.tokens) + eot)
    return -sum(msg.logprobs) / len(msg.logprobs)


def test_replay_loss_is_the_sum_of_isolated_calls(tiny, traces):
    events = traces[0]
    decodes = select_calls(events, "all")
    assert len(decodes) == 3 and [events[i].group for i in decodes][:2] == [events[decodes[0]].group] * 2
    with torch.no_grad():
        out = replay_loss(choreo.Choreographer(tiny), events)
    expected = {i: isolated_loss(tiny, events, i) for i in decodes}
    for i in decodes:
        assert out.per_call[i] == pytest.approx(expected[i], rel=1e-6), i
    assert float(out.loss) == pytest.approx(sum(expected.values()), rel=1e-6)
    with torch.no_grad():
        last = replay_loss(choreo.Choreographer(tiny), events, calls="last")
        named = replay_loss(choreo.Choreographer(tiny), events, calls="role:assistant:y")
    assert set(last.per_call) == {decodes[-1]} and float(last.loss) == pytest.approx(expected[decodes[-1]], rel=1e-6)
    assert set(named.per_call) == {decodes[1]}


def test_replay_positions_equal_decoding_positions(tiny):
    """Decode greedily under the choreographed executor, then replay its trace teacher-forced: every message
    starts where it started when decoding, and each forced row's argmax is the token decoding chose there
    (content tokens, then the end-of-turn token when the turn ended by itself)."""
    runner = choreo.Runner(choreo.Choreographer(tiny), progress=False, trace=True)
    starts = []

    async def recorded(ex, topic):
        out = await chain(ex, topic)
        starts.append([m.start for m in ex.created])
        return out

    with torch.no_grad():
        runner.run([lambda ex: recorded(ex, "owls")])
        events = runner.traces[0]
        out = replay_loss(choreo.Choreographer(tiny), events, keep_logits=True)
    assert [m.start for m in out.messages] == starts[0]
    fmt = choreo.Choreographer(tiny).format
    for i in select_calls(events, "all"):
        predicted = out.logits[i].argmax(-1).tolist()  # (n + 1,)
        assert predicted[:-1] == list(events[i].tokens), i
        assert predicted[-1] == fmt.footer(events[i].role)[0] or not sampled_end_of_turn(events[i], fmt), i


def test_the_cross_entropy_scores_only_what_the_baseline_sampled(tiny):
    """A call cut at its token cap, cut by a stop string, or teacher-forced when recorded got its end-of-turn
    token from the engine: the cross-entropy leaves that row out (else it would teach the model to stop there).
    A call teacher-forced when recorded (a scripted turn, a one-token probe) did not sample its content either:
    the cross-entropy scores none of its rows. The KL keeps every row (the baseline's distribution there is a
    target whatever wrote the text)."""
    from choreo.trace import TraceEvent

    fmt = choreo.Choreographer(tiny).format
    tokens = tuple(fmt.tokenizer.encode(" one two three", add_special_tokens=False))
    sys = TraceEvent(kind="prefill", group=0, role="system", parents=(), text="Be brief.")

    def call(**kw):
        return TraceEvent(**{**dict(kind="decode", group=1, role="assistant", parents=(0,), tokens=tokens,
                                    max_tokens=len(tokens) + 5), **kw})

    cases = {"ended by itself": (call(), True), "capped": (call(max_tokens=len(tokens)), False),
             "stop string": (call(stop=(" three",)), False), "forced": (call(forced=True), False)}
    with torch.no_grad():
        for name, (event, scored) in cases.items():
            assert sampled_end_of_turn(event, fmt) is scored, name
            out = replay_loss(choreo.Choreographer(tiny), [sys, event], keep_logits=True)
            rows = out.logits[1]
            assert rows.shape[0] == len(tokens) + 1, name  # content tokens, then the end-of-turn row
            target = list(tokens) + [fmt.footer("assistant")[0]]
            if event.forced:
                assert out.per_call[1] == 0.0, name
            else:
                n = len(tokens) + scored
                expected = torch.nn.functional.cross_entropy(rows[:n].float(), torch.tensor(target[:n]))
                assert out.per_call[1] == pytest.approx(float(expected), rel=1e-6), name
            uniform = torch.full_like(rows, -math.log(rows.shape[-1]), dtype=torch.float32)
            kl = replay_loss(choreo.Choreographer(tiny), [sys, event], loss="kl", teacher={1: uniform})
            logq = rows.float().log_softmax(-1)  # every row, the end-of-turn one included
            expected_kl = (uniform.exp() * (uniform - logq)).sum(-1).mean()
            assert kl.per_call[1] == pytest.approx(float(expected_kl), rel=1e-5), name
    event = call(forced=True)
    assert TraceEvent.from_json(event.to_json()) == event
    legacy = {k: v for k, v in call().to_json().items() if k != "forced"}  # trace files written before the field
    assert TraceEvent.from_json(legacy).forced is False


def test_gradients_reach_every_lora_layer_and_flow_through_the_cache(adapted, traces):
    events = traces[1]
    ch = choreo.Choreographer(adapted, attention="torch")
    ch.engine.grad = True
    params = dict((n, p) for n, p in adapted.hf_model.named_parameters() if p.requires_grad)
    assert params and all("lora_" in n for n in params)

    def grads(through_cache: bool) -> dict[str, torch.Tensor]:
        for p in params.values():
            p.grad = None
        replay_loss(ch, events, calls="last", through_cache=through_cache).loss.backward()
        return {n: p.grad.clone() for n, p in params.items()}

    full, local = grads(True), grads(False)
    layers = {n.split(".layers.")[1].split(".")[0] for n in params}
    assert layers == {str(i) for i in range(adapted.spec.n_layers)}
    assert all(g.abs().sum() > 0 for g in full.values()), [n for n, g in full.items() if g.abs().sum() == 0]
    # The last call's loss reaches the LoRA weights also through the cached keys/values of the earlier
    # messages (and of the earlier teacher-forced outputs): detaching the cache removes that part.
    diff = sum((full[n] - local[n]).norm() ** 2 for n in params) ** 0.5
    norm = sum(full[n].norm() ** 2 for n in params) ** 0.5
    assert diff > 1e-3 * norm
    assert ch.engine.store.used == 0  # the replay freed everything


def test_sdpa_bool_mask_backward_on_cpu(adapted, traces):
    """The torch backend's CPU backward equals the fp64 dense reference's."""
    out = {backend: lora_gradients(adapted, backend, [traces[2]])[1] for backend in ("torch", "reference")}
    torch.testing.assert_close(out["torch"], out["reference"], rtol=1e-7, atol=1e-9)


def test_lora_applies_in_forward_and_baseline_runs_without_it(adapted, traces):
    events = traces[3]
    with torch.no_grad():
        on = float(replay_loss(choreo.Choreographer(adapted), events).loss)
        with adapter_disabled(adapted):
            off = float(replay_loss(choreo.Choreographer(adapted), events).loss)
        assert on != pytest.approx(off, rel=1e-6)  # the injected layers change the forward pass
        base_b = collect(adapted, ["cats"])[0]
        with adapter_disabled(adapted):
            base_a = collect(adapted, ["cats"])[0]
    assert [e.tokens for e in base_b] == [e.tokens for e in base_a]  # the baseline ignores the adapter
    assert all(not layer.disable_adapters for layer in lora_layers(adapted))  # state restored
    assert all(p.requires_grad for p in trainable_parameters(adapted))


def test_a_baseline_pass_leaves_a_loaded_adapter_as_it_found_it(tokenizer, tmp_path):
    """The baseline switches the adapter off for its passes and back to what it was: a loaded (frozen) adapter
    stays frozen, and inside ``adapter_disabled`` it stays off for the choreographed calls after it."""
    model = build_tiny(tokenizer)
    add_test_adapter(model)
    save_adapter(model, tmp_path / "a")
    unload_adapter(model)
    load_adapter(model, tmp_path / "a")
    lora = [p for n, p in model.hf_model.named_parameters() if "lora_" in n]
    assert lora and not any(p.requires_grad for p in lora)

    def forced() -> torch.Tensor:
        ch = choreo.Choreographer(model)
        return ch.decode(role="assistant", parents=[ch.prefill("Be brief.", role="system")], teacher_tokens=[5, 6, 7],
                         keep_logits=True).logits

    def baseline() -> None:
        bl = choreo.Baseline(model)
        bl.decode(role="assistant", parents=[bl.prefill("Be brief.", role="system")], max_tokens=3)

    with torch.no_grad():
        on = forced()
        baseline()
        assert not any(p.requires_grad for p in lora)
        with adapter_disabled(model):
            off = forced()
            baseline()
            assert torch.equal(forced(), off)
        assert not torch.equal(off, on) and torch.equal(forced(), on)
    assert not any(p.requires_grad for p in lora)
    unload_adapter(model)


def test_save_load_round_trip(adapted, traces, tmp_path, tokenizer):
    with torch.no_grad():
        expected = float(replay_loss(choreo.Choreographer(adapted), traces[4]).loss)
    save_adapter(adapted, tmp_path / "a")
    fresh = build_tiny(tokenizer)
    with torch.no_grad():
        base = float(replay_loss(choreo.Choreographer(fresh), traces[4]).loss)
        with use_adapter(fresh, tmp_path / "a"):
            assert is_adapted(fresh)
            got = float(replay_loss(choreo.Choreographer(fresh), traces[4]).loss)
        assert not is_adapted(fresh)
        again = float(replay_loss(choreo.Choreographer(fresh), traces[4]).loss)
    assert got == pytest.approx(expected, rel=1e-12) and again == base != got
    load_adapter(fresh, tmp_path / "a")
    assert is_adapted(fresh) and not any(p.requires_grad for n, p in fresh.hf_model.named_parameters() if "lora_" in n)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh, tmp_path)


def test_train_selects_on_dev_and_resume_matches_uninterrupted(tiny, traces, tmp_path):
    config = FinetuneConfig.preset("smoke", lora_dropout=0.1, epochs=2, eval_every=2, seed=3)
    train_set, dev_set = traces[:4], traces[6:]
    full = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "full", progress=False)
    weights_full = {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters() if "lora_" in n}
    unload_adapter(tiny)
    assert full.steps == 4 and len(full.history) == 5  # 8 micro-batches / accumulation 2, plus the step-0 eval
    dev = [r["dev_loss"] for r in full.history if "dev_loss" in r]
    assert full.best_dev_loss == min(dev) and dev[0] == full.history[0]["dev_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in full.history[1:])
    assert (tmp_path / "full" / "history.json").exists() and (full.best_adapter / "adapter_config.json").exists()

    part = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "split", stop_after=1, progress=False)
    unload_adapter(tiny)
    assert part.steps == 1
    rest = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "split", resume=True, progress=False)
    unload_adapter(tiny)
    assert rest.steps == 4 and len(rest.history) == len(full.history)
    for a, b in zip(full.history, rest.history):
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "seconds"), (a, b)
    load_adapter(tiny, tmp_path / "split" / "last")
    for n, p in tiny.hf_model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, weights_full[n], rtol=0, atol=0)
    unload_adapter(tiny)
    with pytest.raises(ValueError, match="different config"):
        train(tiny, train_set, dev_set, config=FinetuneConfig.preset("smoke", lr=1e-2), out_dir=tmp_path / "split",
              resume=True, progress=False)
    unload_adapter(tiny)


def test_a_dev_score_chooses_the_checkpoint_without_changing_training(tiny, traces, tmp_path):
    """``dev_score`` ranks the dev evaluations (highest first, ties to the lower dev loss); it runs with the adapter
    on, in eval mode, without gradients; its sampling leaves the training steps as they are without it."""
    import random

    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = FinetuneConfig.preset("smoke", lora_dropout=0.1, epochs=2, eval_every=2, seed=3)
    train_set, dev_set = traces[:4], traces[6:]
    plain = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "plain", progress=False)
    unload_adapter(tiny)
    scripted, seen = iter([0.0, 0.5, 0.25]), []

    def score(model):
        seen.append((is_adapted(model), model.hf_model.training, torch.is_grad_enabled()))
        torch.rand(7), random.random()  # a workflow that samples
        return next(scripted)

    scored = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "scored", progress=False,
                   dev_score=score)
    loaded = get_peft_model_state_dict(tiny.hf_model)  # the chosen checkpoint (step 2), not the last step's (4)
    best, last = (load_peft_weights(str(tmp_path / "scored" / name)) for name in ("best", "last"))
    assert loaded.keys() == best.keys() == last.keys()
    assert all(torch.equal(loaded[k], best[k]) for k in best), [k for k in best if not torch.equal(loaded[k], best[k])]
    assert any(not torch.equal(loaded[k], last[k]) for k in last)
    unload_adapter(tiny)
    assert seen == [(True, False, False)] * 3
    evals = [r for r in scored.history if "dev_loss" in r]
    assert [(r["step"], r["dev_score"]) for r in evals] == [(0, 0.0), (2, 0.5), (4, 0.25)]
    assert scored.best_step == 2 and scored.best_dev_score == 0.5 and scored.best_dev_loss == evals[1]["dev_loss"]
    for a, b in zip(plain.history, scored.history):  # the same steps, losses and dev losses
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items()
                                                                  if k not in ("seconds", "dev_score")}
    saved = json.loads((tmp_path / "scored" / "history.json").read_text())
    assert saved["selected_by"] == "dev_score" and saved["best_dev_score"] == 0.5 and saved["best_step"] == 2
    assert scored.summary()["best_dev_score"] == 0.5 and plain.summary()["best_dev_score"] is None

    tied = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "tied", progress=False,
                 dev_score=lambda model: 0.0)
    unload_adapter(tiny)
    assert (tied.best_step, tied.best_dev_loss) == (plain.best_step, plain.best_dev_loss)

    def weights(model):  # a score that depends on the adapter only: equal for equal checkpoints
        return float(sum(p.abs().sum() for n, p in model.hf_model.named_parameters() if "lora_B" in n))

    part = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "split", stop_after=2, progress=False,
                 dev_score=weights)
    unload_adapter(tiny)
    assert part.steps == 2
    with pytest.raises(ValueError, match="by dev_score, this call by dev_loss"):
        train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "split", resume=True, progress=False)
    assert not is_adapted(tiny)
    rest = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "split", resume=True, progress=False,
                 dev_score=weights)
    unload_adapter(tiny)
    full = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "full", progress=False,
                 dev_score=weights)
    unload_adapter(tiny)
    assert (rest.best_step, rest.best_dev_score) == (full.best_step, full.best_dev_score) and full.best_step > 0
    for a, b in zip(full.history, rest.history):
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "seconds"), (a, b)
    with pytest.raises(ValueError, match="nan"):
        train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "nan", progress=False,
              dev_score=lambda model: float("nan"))
    assert not is_adapted(tiny)


def test_a_run_killed_while_saving_resumes_as_if_uninterrupted(tiny, traces, tmp_path, monkeypatch):
    """``last/`` holds the adapter beside ``trainer_state.pt``; a kill between the two writes (or in the middle of
    ``best/``) must not mix steps: resume reads the weights saved in the state file and rewrites ``best/``."""
    import choreo.finetune as ft

    config = FinetuneConfig.preset("smoke", epochs=3, eval_every=2, seed=5)
    train_set, dev_set = traces[:4], traces[6:]
    full = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "full", progress=False)
    lora = lambda: {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters() if "lora_" in n}  # noqa: E731
    best_full = lora()
    load_adapter(tiny, full.best_adapter.parent / "last")
    last_full = lora()
    unload_adapter(tiny)
    assert full.steps == 6

    saves, real_save = [], torch.save

    def killed(obj, path, *a, **kw):  # the step-4 state write dies: last/ already holds the step-4 adapter
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ft.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(ft.torch, "save", real_save)
    assert not is_adapted(tiny)
    assert torch.load(tmp_path / "cut" / "last" / "trainer_state.pt", weights_only=False)["state"]["step"] == 2
    # and a write of best/ that was cut off after the last state save: other weights there
    add_adapter(tiny, rank=config.lora_rank, alpha=config.lora_alpha, dropout=0.0, seed=9)
    with torch.no_grad():
        for n, p in tiny.hf_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.25)
    save_adapter(tiny, tmp_path / "cut" / "best")
    unload_adapter(tiny)

    rest = train(tiny, train_set, dev_set, config=config, out_dir=tmp_path / "cut", resume=True, progress=False)
    assert (rest.steps, rest.best_step) == (full.steps, full.best_step)
    for a, b in zip(full.history, rest.history):
        assert all(a[k] == b[k] for k in a if k != "seconds"), (a, b)
    for n, p in lora().items():
        torch.testing.assert_close(p, best_full[n], rtol=0, atol=0)
    unload_adapter(tiny)
    load_adapter(tiny, tmp_path / "cut" / "last")
    for n, p in lora().items():
        torch.testing.assert_close(p, last_full[n], rtol=0, atol=0)
    unload_adapter(tiny)


def test_resume_refuses_other_traces(tiny, traces, tmp_path):
    config = FinetuneConfig.preset("smoke", epochs=2)
    train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, stop_after=1, progress=False)
    unload_adapter(tiny)
    for train_set, dev_set in ((traces[1:5], traces[6:]), (traces[:4], traces[4:6]), (traces[:4], traces[5:7])):
        with pytest.raises(ValueError, match="other training or dev traces"):
            train(tiny, train_set, dev_set, config=config, out_dir=tmp_path, resume=True, progress=False)
        assert not is_adapted(tiny)
    rest = train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, resume=True, progress=False)
    unload_adapter(tiny)
    assert rest.steps == 4


def test_resume_refuses_another_model_or_dtype(tiny, traces, tmp_path, monkeypatch):
    """A run resumed in another dtype (``choreo finetune train --device cuda`` after a CPU start: bf16 instead of
    fp32) or on another checkpoint would continue other numerics under the same history: refused, naming both."""
    config = FinetuneConfig.preset("smoke", epochs=2)
    train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, stop_after=1, progress=False)
    unload_adapter(tiny)
    spec = tiny.spec
    for other in (dataclasses.replace(spec, dtype=torch.bfloat16), dataclasses.replace(spec, sha256="0" * 64)):
        monkeypatch.setattr(tiny, "spec", other)
        with pytest.raises(ValueError, match="another model or dtype.*saved .*given "):
            train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, resume=True, progress=False)
        assert not is_adapted(tiny)
    monkeypatch.setattr(tiny, "spec", spec)
    assert train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, resume=True, progress=False).steps == 4
    unload_adapter(tiny)


def test_selection_refuses_a_model_that_already_carries_an_adapter(tiny, traces, tmp_path):
    """``select_on_dev`` and ``recovery_experiment`` add and remove their own adapters: they refuse to start
    rather than remove the caller's."""
    from choreo.recovery import recovery_experiment

    add_adapter(tiny, rank=4, alpha=8, dropout=0.0)
    try:
        with pytest.raises(ValueError, match="already carries an adapter"):
            select_on_dev(tiny, traces[:4], traces[6:], configs=[FinetuneConfig.preset("smoke")], out_dir=tmp_path,
                          progress=False)
        assert is_adapted(tiny)
        with pytest.raises(ValueError, match="already carries an adapter"):
            recovery_experiment(tiny, configs=[FinetuneConfig.preset("smoke")], out_dir=tmp_path, n_train=4,
                                n_eval=2, progress=False)
        assert is_adapted(tiny) and not any(tmp_path.iterdir())
    finally:
        unload_adapter(tiny)


def test_replay_loss_refuses_a_spec_that_selects_no_call(tiny, traces):
    with pytest.raises(ValueError, match="'role:judge' selects none of the trace's 3 decodes"):
        replay_loss(choreo.Choreographer(tiny), traces[0], calls="role:judge")


def test_trained_adapter_is_on_inside_the_block_and_gone_after(tiny, traces, tmp_path, monkeypatch):
    """The block runs with the dev-best adapter; the model leaves without it, also when the block raises; the
    default folder is temporary, an ``out_dir`` is kept."""
    config = FinetuneConfig.preset("smoke", lora_dropout=0.0)
    with trained_adapter(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path / "kept",
                         progress=False) as result:
        assert is_adapted(tiny) and result.best_adapter == tmp_path / "kept" / "best"
        inside = evaluate(tiny, traces[6:], config=config)
    assert not is_adapted(tiny) and (result.best_adapter / "adapter_config.json").exists()
    assert inside == pytest.approx(result.best_dev_loss)
    summary = result.summary()
    assert summary["steps"] == result.steps == 2 and summary["history"] == result.history
    json.dumps(summary)  # JSON-ready
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    with pytest.raises(RuntimeError, match="inside"):
        with trained_adapter(tiny, traces[:4], traces[6:], config=config, progress=False) as result:
            assert result.best_adapter.parent.parent == tmp_path / "scratch"
            raise RuntimeError("inside the block")
    assert not is_adapted(tiny) and not any((tmp_path / "scratch").iterdir())


def test_dev_loss_drops_when_training_on_the_dev_traces(tiny, traces, tmp_path):
    """Training does what it says: fitting a set of traces lowers their replay loss."""
    config = FinetuneConfig.preset("smoke", lr=1e-2, epochs=6, eval_every=3, lora_dropout=0.0)
    before = evaluate(tiny, traces[:2], config=config)
    result = train(tiny, traces[:2], traces[:2], config=config, out_dir=tmp_path, progress=False,
                   dev_may_overlap=True)
    after = evaluate(tiny, traces[:2], config=config)
    unload_adapter(tiny)
    assert result.best_dev_loss == pytest.approx(after) and after < before - 0.2  # deterministic: 30.71 -> 30.21


def test_training_runs_under_deterministic_algorithms(tiny, traces, tmp_path):
    """``choreo finetune train --deterministic`` turns on torch.use_deterministic_algorithms: no operation of the
    training loop refuses it (PyTorch raises for one without a deterministic implementation), and on CPU the run
    matches the ordinary one."""
    config = FinetuneConfig.preset("smoke", epochs=2)
    plain = train(tiny, traces[:2], traces[:2], config=config, out_dir=tmp_path / "plain", progress=False,
                  dev_may_overlap=True)
    unload_adapter(tiny)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = train(tiny, traces[:2], traces[:2], config=config, out_dir=tmp_path / "det", progress=False,
                    dev_may_overlap=True)
    finally:
        torch.use_deterministic_algorithms(before)
        unload_adapter(tiny)
    assert det.steps == plain.steps == 2
    assert [h.get("train_loss") for h in det.history] == pytest.approx([h.get("train_loss") for h in plain.history])


async def serial_chain(ex, topic: str):
    """Every call sees exactly the serial prompt the baseline re-encodes: choreographed == baseline encodings."""
    sys = await ex.prefill("Be brief.", role="system")
    user = await ex.prefill(f"Topic: {topic}", role="user", parents=[sys])
    first = await ex.decode(role="assistant", parents=[sys, user], max_tokens=MAX_TOKENS)
    again = await ex.prefill("Again.", role="user", parents=[sys, user, first])
    final = await ex.decode(role="assistant", parents=[sys, user, first, again], max_tokens=MAX_TOKENS)
    return final.tokens


@pytest.fixture(scope="module")
def serial_traces(tiny):
    runner = choreo.Runner(choreo.Baseline(tiny), progress=False, trace=True)
    with torch.no_grad():
        runner.run([lambda ex, t=t: serial_chain(ex, t) for t in ["owls", "figs"]])
    return [runner.traces[i] for i in range(2)]


def test_kl_loss_is_zero_when_the_encodings_coincide(tiny, serial_traces, traces):
    teacher = Teacher(tiny)
    ch = choreo.Choreographer(tiny)
    with torch.no_grad():
        same = replay_loss(ch, serial_traces[0], loss="kl", teacher=teacher(serial_traces[0]))
        blocked = replay_loss(ch, traces[0], loss="kl", teacher=teacher(traces[0]))
        ce = replay_loss(ch, traces[0])
        both = replay_loss(ch, traces[0], loss="ce+kl", teacher=teacher(traces[0]))
    assert len(same.per_call) == 2 and all(abs(v) < 1e-10 for v in same.per_call.values()), same.per_call
    # In ``chain`` the two parallel calls each see a serial prompt (system, their own topic), as in the baseline;
    # the last attends to two independently encoded topics and outputs (blockage): only its distributions differ.
    x, y, last = select_calls(traces[0], "all")
    assert abs(blocked.per_call[x]) < 1e-10 and abs(blocked.per_call[y]) < 1e-10, blocked.per_call
    assert blocked.per_call[last] > 1e-4, blocked.per_call
    assert float(both.loss) == pytest.approx(float(ce.loss) + float(blocked.loss), rel=1e-6)  # fp32 losses
    # The teacher rows are the content rows and the end-of-turn row, computed once per trace.
    decodes = select_calls(traces[0], "all")
    assert sorted(teacher(traces[0])) == decodes and len(teacher) == 2
    assert all(teacher(traces[0])[i].shape[0] == len(traces[0][i].tokens) + 1 for i in decodes)
    assert teacher(list(traces[0])) is teacher(traces[0])


def test_teacher_ignores_the_adapter_and_kl_gradients_reach_lora(adapted, traces):
    events = traces[5]
    with adapter_disabled(adapted):
        off = Teacher(adapted)(events)
    on = Teacher(adapted)(events)
    for i in off:
        torch.testing.assert_close(on[i], off[i], rtol=0, atol=0)
    ch = choreo.Choreographer(adapted, attention="torch")
    ch.engine.grad = True
    params = dict((n, p) for n, p in adapted.hf_model.named_parameters() if p.requires_grad)
    out = replay_loss(ch, events, loss="kl", teacher=on)
    assert float(out.loss.detach()) > 0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), \
        [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(not t.requires_grad for t in on.values())


def test_kl_loss_needs_a_teacher(tiny, traces):
    with pytest.raises(ValueError, match="needs teacher log-probs"):
        replay_loss(choreo.Choreographer(tiny), traces[0], loss="kl")
    with pytest.raises(ValueError, match="loss must be one of 'ce', 'kl', 'ce\\+kl', got 'mse'"):
        replay_loss(choreo.Choreographer(tiny), traces[0], loss="mse")


def test_select_on_dev_compares_candidates_on_dev_kl(tiny, traces, tmp_path):
    """CE and KL candidates are trained and compared on one dev metric; the lowest wins and is loaded."""
    base = FinetuneConfig.preset("smoke", lora_dropout=0.0, epochs=1, eval_every=1)
    configs = [dataclasses.replace(base, loss="ce", lr=1e-2), dataclasses.replace(base, loss="kl", lr=1e-2),
               dataclasses.replace(base, loss="ce+kl", lr=1e-5)]
    teacher = Teacher(tiny)
    chosen = select_on_dev(tiny, traces[:4], traces[6:], configs=configs, out_dir=tmp_path, teacher=teacher,
                           progress=False)
    try:
        assert is_adapted(tiny) and chosen.metric == "kl" and len(teacher) == 6  # train + dev, each once
        best = [c["best_dev"] for c in chosen.candidates]
        assert chosen.best == min(range(3), key=best.__getitem__) and chosen.config.loss == configs[chosen.best].loss
        assert all(c["config"]["dev_metric"] == "kl" for c in chosen.candidates)
        assert len({c["dev_step0"] for c in chosen.candidates}) == 1  # the same base model, the same metric
        assert min(best) < chosen.candidates[0]["dev_step0"]  # training moved dev KL down
        assert evaluate(tiny, traces[6:], config=chosen.config, teacher=teacher) == pytest.approx(best[chosen.best])
    finally:
        unload_adapter(tiny)
    with pytest.raises(ValueError, match="share loss_calls"):
        select_on_dev(tiny, traces[:4], traces[6:], configs=[base, dataclasses.replace(base, loss_calls="last")],
                      out_dir=tmp_path, progress=False)
    assert not is_adapted(tiny)


def test_split_traces_is_seeded_and_disjoint():
    items = list(range(50))
    train_a, dev_a = split_traces(items, dev_fraction=0.1, seed=0)
    train_b, dev_b = split_traces(items, dev_fraction=0.1, seed=0)
    _, dev_c = split_traces(items, dev_fraction=0.1, seed=1)
    assert (train_a, dev_a) == (train_b, dev_b) and dev_a != dev_c
    assert len(dev_a) == 5 and not set(train_a) & set(dev_a) and sorted(train_a + dev_a) == items
    with pytest.raises(ValueError, match="at least 2"):
        split_traces([1], dev_fraction=0.5, seed=0)


def test_each_epoch_visits_every_training_trace_once_in_a_seeded_order():
    from choreo.finetune import _instance

    n = 5
    orders = {seed: [[_instance(m, n, seed) for m in range(n * e, n * e + n)] for e in range(4)] for seed in (0, 3)}
    for seed, epochs in orders.items():
        assert all(sorted(order) == list(range(n)) for order in epochs), (seed, epochs)
        assert len({tuple(order) for order in epochs}) > 1, (seed, epochs)  # reshuffled each epoch
    assert orders[0] != orders[3]


def test_config_defaults_presets_and_validation():
    paper = FinetuneConfig.preset("paper")
    assert (paper.lora_rank, paper.lora_alpha, paper.lora_dropout, paper.lr, paper.weight_decay, paper.warmup,
            paper.max_grad_norm, paper.grad_accum) == (64, 32.0, 0.05, 5e-5, 0.01, 0.1, 1.0, 4)
    assert paper.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    cpu = FinetuneConfig.preset("embedded-cpu")
    assert cpu.lora_rank < paper.lora_rank and cpu.lr > paper.lr
    with pytest.raises(TypeError):
        FinetuneConfig(64)  # keyword-only
    with pytest.raises(ValueError, match="unknown fine-tuning preset 'gpu-xl'"):
        FinetuneConfig.preset("gpu-xl")
    with pytest.raises(ValueError, match="loss_calls"):
        FinetuneConfig(loss_calls="first")
    with pytest.raises(ValueError, match="attention must be .* got 'flash'"):
        FinetuneConfig(attention="flash")
    assert FinetuneConfig(attention="triton").attention == "triton"  # the kernel has a backward pass
    with pytest.raises(ValueError, match="loss must be one of 'ce', 'kl', 'ce\\+kl', got 'KL'"):
        FinetuneConfig(loss="KL")
    with pytest.raises(ValueError, match="dev_metric must be one of .* got 'nll'"):
        FinetuneConfig(dev_metric="nll")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        FinetuneConfig(seed=-1)
    with pytest.raises(ValueError, match="lora_targets .* got 'q_proj'"):
        FinetuneConfig(lora_targets="q_proj")
    assert paper.loss == "ce" and paper.dev_criterion == "ce"
    assert (FinetuneConfig(loss="ce+kl").dev_criterion == "ce+kl"
            and FinetuneConfig(dev_metric="kl").dev_criterion == "kl")
    total = 20  # warm-up over 2 steps, then cosine to 0
    lrs = [schedule(s, total, 0.1) for s in range(total)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01


def test_command_line_parses():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "train", "--traces", "a.jsonl", "--out", "run", "--resume"])
    assert args.verb == "train" and args.resume and args.config == "embedded-cpu" and args.attention == "torch"
    assert not args.deterministic and args.device is None  # None: cuda where this torch finds it, else cpu
    assert parser.parse_args(["finetune", "train", "--traces", "a", "--out", "r", "--device", "cuda:1"]).device \
        == "cuda:1"
    assert parser.parse_args(["finetune", "train", "--traces", "a", "--out", "r", "--deterministic"]).deterministic
    assert parser.parse_args(["finetune", "train", "--traces", "a", "--out", "r", "--attention", "triton"]).attention \
        == "triton"
    args = parser.parse_args(["finetune", "collect", "--task", "blockage", "--n", "8", "--out", "t.jsonl"])
    assert args.task == "blockage" and args.n == 8
    args = parser.parse_args(["finetune", "recovery", "--out", "r", "--losses", "ce", "kl", "--lrs", "1e-3"])
    assert args.losses == ["ce", "kl"] and args.lrs == [1e-3]


def test_blockage_task_helpers(tiny):
    from choreo.recovery import EVAL_QUESTIONS, TRAIN_QUESTIONS, collect_traces, divergence, question_pairs, \
        question_pools

    assert not set(TRAIN_QUESTIONS) & set(EVAL_QUESTIONS)
    pairs = question_pairs("eval", 3, seed=0)
    assert pairs == question_pairs("eval", 3, seed=0) and all(a != b and a in EVAL_QUESTIONS for a, b in pairs)
    with pytest.raises(ValueError, match="split must be one of 'train', 'eval', got 'test'"):
        question_pairs("test", 3)
    pools = question_pools(dev_fraction=0.2, seed=0)
    assert pools == question_pools(dev_fraction=0.2, seed=0) != question_pools(dev_fraction=0.2, seed=1)
    assert len(pools["dev"]) == 6 and set(pools["train"]) | set(pools["dev"]) == set(TRAIN_QUESTIONS)
    wide = question_pools(dev_fraction=0.2, seed=0, dev_pairs=80)  # 6 questions make 30 pairs: 10 make 90
    assert len(wide["dev"]) == 10 and set(pools["dev"]) < set(wide["dev"])
    assert not set(pools["train"]) & set(pools["dev"]) and pools["eval"] == EVAL_QUESTIONS
    dev = question_pairs("dev", 30, seed=0, pools=pools)  # every ordered pair of the 6 dev questions
    assert len(set(dev)) == 30 and all(a in pools["dev"] and b in pools["dev"] for a, b in dev)
    with pytest.raises(ValueError, match="n must be in 1..30 for the 'dev' pool, got 31"):
        question_pairs("dev", 31, seed=0, pools=pools)
    with pytest.raises(ValueError, match="n must be in 1..30 for the 'dev' pool, got True"):
        question_pairs("dev", True, seed=0, pools=pools)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):  # numpy's error named no value
        question_pairs("eval", 3, seed=-1)
    assert question_pairs("dev", 7, seed=0, pools=pools) == dev[:7]  # the first n of one seed's order
    with pytest.raises(ValueError, match="dev_fraction must be in \\(0, 1\\), got 1.0"):
        question_pools(dev_fraction=1.0)
    traces, meta = collect_traces(tiny, n=3, pairs=pairs, max_tokens=4)
    assert [m["q1"] for m in meta] == [p[0] for p in pairs[:len(meta)]]
    events = traces[0]
    assert [e.kind for e in events] == ["prefill"] * 3 + ["decode"] and events[3].parents == (0, 1, 2)
    result = divergence(tiny, traces)
    # The questions are encoded in parallel in the choreographed arm: its distributions differ from the baseline's.
    assert len(result["kl"]) == len(traces) and all(k > 0 for k in result["kl"])
    assert set(result["agree"]) <= {0, 1}


def test_recovery_chooses_on_dev_before_touching_held_out_pairs(tiny, tmp_path, monkeypatch):
    """The held-out pairs are collected after the dev choice and measured once per arm; the report is written."""
    import json

    from choreo import recovery

    calls = []
    collect, divergence, select = recovery.collect_traces, recovery.divergence, choreo.finetune.select_on_dev

    pairs = {}

    def spy_collect(model, *, split, **kw):
        calls.append(f"collect:{split}")
        traces, meta = collect(model, split=split, max_tokens=4, **kw)
        pairs[split] = {q for m in meta for q in (m["q1"], m["q2"])}
        return traces, meta

    def spy_divergence(model, traces):
        calls.append("measure:" + ("after" if any(not l.disable_adapters for l in lora_layers(model)) else "before"))
        return divergence(model, traces)

    def spy_select(*args, **kw):
        calls.append("select")
        return select(*args, **kw)

    monkeypatch.setattr(recovery, "collect_traces", spy_collect)
    monkeypatch.setattr(recovery, "divergence", spy_divergence)
    monkeypatch.setattr(choreo.finetune, "select_on_dev", spy_select)
    configs = recovery.candidate_configs(FinetuneConfig.preset("smoke", epochs=1), losses=("ce", "kl"), lrs=(1e-3,))
    assert [(c.loss, c.lr) for c in configs] == [("ce", 1e-3), ("kl", 1e-3)]
    report = recovery.recovery_experiment(tiny, configs=configs, out_dir=tmp_path, n_train=6, n_eval=4,
                                          progress=False, command="test")
    assert calls == ["collect:train", "collect:dev", "select", "collect:eval", "measure:after", "measure:before"]
    assert not is_adapted(tiny)
    assert pairs["dev"] and not pairs["dev"] & pairs["train"]  # dev pairs ask new questions, as held-out ones do
    s = report["summary"]
    assert s["n_train"] + s["n_dev"] <= 6 and len(report["candidates"]) == 2 and s["chosen"] in (0, 1)
    for name in ("kl", "nll", "top1", "agree"):
        assert {f"{name}_before", f"{name}_after", f"{name}_gain_ci", f"{name}_holm_pvalue"} <= set(s)
    assert json.loads((tmp_path / "recovery.json").read_text())["provenance"]["command"] == "test"
    md = (tmp_path / "recovery.md").read_text()
    assert "| KL(baseline \\|\\| choreographed)" in md and "(chosen)" in md
    assert all(line.count(" | ") == 6 for line in md.splitlines() if line.startswith("| KL"))  # 7 cells
    with pytest.raises(ValueError, match="at least one loss"):
        recovery.candidate_configs(FinetuneConfig(), losses=())


def _bad_traces(events):
    """Variants of one trace that cannot be replayed, with what the error must name."""
    d = max(i for i, e in enumerate(events) if e.kind == "decode")
    x, y = [i for i, e in enumerate(events) if e.kind == "decode"][:2]  # two calls decoded together
    p1, p2 = [i for i, e in enumerate(events) if e.kind == "prefill"][1:3]
    assert events[x].group == events[y].group and events[p1].group != events[p2].group
    swap = lambda i, **kw: [dataclasses.replace(e, **kw) if j == i else e for j, e in enumerate(events)]  # noqa: E731
    return {"parent out of range": (swap(d, parents=(99,)), "earlier events.*99"),
            "negative parent": (swap(d, parents=(-2,)), "earlier events.*-2"),
            "unknown kind": (swap(0, kind="bogus"), "kind.*'bogus'"),
            "token outside the vocabulary": (swap(d, tokens=(10 ** 7,)), "10000000 outside the vocabulary"),
            "parent decoded in the same group": (swap(y, parents=events[y].parents + (x,)),
                                                 f"event {y} .*parent {x} is in group {events[x].group}"),
            "two prefills in one group": (swap(p2, group=events[p1].group), "group .* holds 2 events")}


@pytest.mark.parametrize("case", ["parent out of range", "negative parent", "unknown kind",
                                  "token outside the vocabulary", "parent decoded in the same group",
                                  "two prefills in one group", "a trace in both sets", "loss_calls selects no call"])
def test_train_refuses_bad_traces_before_adding_an_adapter(tiny, traces, tmp_path, case):
    config = FinetuneConfig.preset("smoke")
    train_set, dev_set, match = list(traces[:3]), list(traces[3:5]), "both training and dev"
    if case == "loss_calls selects no call":
        config, match = FinetuneConfig.preset("smoke", loss_calls="role:judge"), "'role:judge' selects none"
    elif case != "a trace in both sets":
        bad, match = _bad_traces(traces[0])[case]
        train_set[0] = bad
    else:
        dev_set.append(train_set[1])
    with pytest.raises(ValueError, match=match):
        train(tiny, train_set, dev_set, config=config, out_dir=tmp_path, progress=False)
    assert not is_adapted(tiny) and not any(tmp_path.iterdir())


def test_an_empty_output_replays_as_an_empty_turn_scored_on_its_end_of_turn(tiny, traces):
    """A call that ended its turn at once replays as a forced empty turn: its sampled end-of-turn is its whole
    cross-entropy term (finite), and its KL term compares one row; an empty output whose
    end-of-turn was not sampled (teacher-forced when recorded) has nothing to score."""
    events = list(traces[0])
    d = max(i for i, e in enumerate(events) if e.kind == "decode")
    empty = [dataclasses.replace(e, tokens=(), forced=False) if j == d else e for j, e in enumerate(events)]
    check_replayable(empty, vocab_size=len(tiny.tokenizer))
    ch = choreo.Choreographer(tiny)
    ch.engine.grad = True
    out = replay_loss(ch, empty, calls="last")
    eot = ch.format.footer("assistant")[0]
    assert math.isfinite(out.per_call[d])
    with torch.no_grad():  # the same term by hand: -log p(end-of-turn) at the empty turn's first position
        message = replay_loss(ch, empty, calls="last", keep_logits=True)
        row = message.logits[d]
    assert row.shape[0] == 1
    assert out.per_call[d] == pytest.approx(float(-row.float().log_softmax(-1)[0, eot]), rel=1e-6)
    kl = replay_loss(ch, empty, calls="last", loss="kl", teacher=Teacher(tiny)(empty))
    assert math.isfinite(kl.per_call[d]) and kl.per_call[d] >= 0
    forced = [dataclasses.replace(e, forced=True) if j == d else e for j, e in enumerate(empty)]
    assert replay_loss(ch, forced, calls="last").per_call[d] == 0.0


@pytest.mark.parametrize("tokens", [(), None], ids=["empty", "with tokens"])
def test_a_trace_with_nothing_for_the_cross_entropy_to_score_is_refused_before_training(tiny, traces, tmp_path,
                                                                                       tokens):
    """A selected call that was teacher-forced when recorded (empty, or with the tokens it was given) has no
    cross-entropy row: as the only selected call of a trace it would add a loss of zero (and no graph for
    backward), so ``train`` refuses it before writing anything; the KL still compares its rows, so a KL run
    takes it."""
    events = list(traces[0])
    d = max(i for i, e in enumerate(events) if e.kind == "decode")
    forced = [dataclasses.replace(e, tokens=e.tokens if tokens is None else tokens, forced=True) if j == d else e
              for j, e in enumerate(events)]
    vocab = len(tiny.tokenizer)
    with pytest.raises(ValueError, match=f"bad: the decodes loss_calls 'last' selects \\(\\[{d}\\]\\) were "
                                         f"teacher-forced when recorded"):
        check_replayable(forced, vocab_size=vocab, where="bad", calls="last", loss="ce")
    check_replayable(forced, vocab_size=vocab, calls="last", loss="kl")
    check_replayable(forced, vocab_size=vocab, calls="all", loss="ce")  # the other decodes have tokens
    with pytest.raises(ValueError, match="training trace 0: the decodes"):
        train(tiny, [forced, traces[1]], traces[2:4], config=FinetuneConfig.preset("smoke", loss_calls="last"),
              out_dir=tmp_path / "run", progress=False)
    assert not is_adapted(tiny) and not (tmp_path / "run").exists()


def test_a_failing_run_leaves_the_model_without_an_adapter(tiny, traces, tmp_path, monkeypatch):
    import choreo.finetune as ft

    def broken(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(ft, "_optimizer_step", broken)
    with pytest.raises(RuntimeError, match="step failed"):
        train(tiny, traces[:3], traces[3:5], config=FinetuneConfig.preset("smoke"), out_dir=tmp_path, progress=False)
    assert not is_adapted(tiny)


def test_history_records_the_rate_each_step_used_and_its_provenance(tiny, traces, tmp_path):
    import json

    config = FinetuneConfig.preset("smoke", epochs=3, eval_every=100)
    result = train(tiny, traces[:4], traces[4:6], config=config, out_dir=tmp_path, progress=False)
    unload_adapter(tiny)
    history = json.loads((tmp_path / "history.json").read_text())
    steps = [r for r in history["history"] if "lr" in r]
    assert len(steps) == result.steps > 2
    for r in steps:  # record k is optimizer step k - 1 (0-based), which ran at lr x schedule(k - 1)
        assert r["lr"] == pytest.approx(config.lr * schedule(r["step"] - 1, result.steps, config.warmup)), r
    prov = history["provenance"]
    assert prov["sample_sizes"] == {"train_traces": 4, "dev_traces": 2} and prov["seeds"] == [config.seed]
    # the summary the suites store beside their logs carries it too
    assert result.provenance == prov and result.summary()["provenance"] == prov
    assert prov["model"]["sha256"] == tiny.spec.sha256


def test_config_refuses_an_infinite_learning_rate():
    with pytest.raises(ValueError, match="finite.*inf"):
        FinetuneConfig.preset("smoke", lr=float("inf"))


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", -1.0, "lora_alpha must be finite and > 0, got -1.0"),  # add_adapter refused it after collection
    ("lora_alpha", 0.0, "lora_alpha must be finite and > 0, got 0.0"),
    ("weight_decay", float("inf"), "weight_decay must be finite and >= 0, got inf"),  # trained to NaN, step 0 kept
    ("weight_decay", -0.5, "weight_decay must be finite and >= 0, got -0.5"),
    ("lr", True, "lr must be finite and > 0, got True"),  # trained at lr 1.0
    ("max_grad_norm", True, "max_grad_norm must be finite and > 0, got True"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1), got 1.0"),
    ("warmup", "0.1", "warmup must be a fraction in [0, 1), got '0.1'"),
    ("dev_fraction", 0, "dev_fraction must be in (0, 1), got 0"),
])
def test_config_refuses_bad_numbers_naming_them(field, value, message):
    with pytest.raises(ValueError) as error:
        FinetuneConfig.preset("smoke", **{field: value})
    assert str(error.value) == message
    assert FinetuneConfig.preset("smoke", weight_decay=0.0).weight_decay == 0.0  # no decay is allowed


@pytest.mark.parametrize("stop_after", [0, -3, 1.5, True])
def test_train_refuses_a_stop_after_that_leaves_nothing_to_resume(tiny, tmp_path, stop_after):
    """``stop_after`` 0 or below ran no step and wrote no ``last/``, so the ``resume`` it promises failed."""
    traces = [[]]  # never read: the argument is refused first
    with pytest.raises(ValueError, match=f"stop_after must be an integer >= 1 or None, got {stop_after!r}"):
        train(tiny, traces, traces, config=FinetuneConfig.preset("smoke"), out_dir=tmp_path, stop_after=stop_after)
    assert not any(tmp_path.iterdir())


def test_loading_an_adapter_of_another_shape_over_one_is_refused(tokenizer, tmp_path):
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    model = build_tiny(tokenizer)
    add_adapter(model, rank=4, alpha=8, dropout=0.0, seed=1)
    save_adapter(model, tmp_path / "alpha8")
    unload_adapter(model)
    add_adapter(model, rank=4, alpha=16, dropout=0.0, seed=1)
    with pytest.raises(ValueError, match="unload_adapter"):
        load_adapter(model, tmp_path / "alpha8")
    save_adapter(model, tmp_path / "alpha16")
    with torch.no_grad():  # other weights than the saved ones, so that a load that copies nothing shows
        for n, p in model.hf_model.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    load_adapter(model, tmp_path / "alpha16")  # the same shape: new weights over the old ones
    loaded, saved = get_peft_model_state_dict(model.hf_model), load_peft_weights(str(tmp_path / "alpha16"))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # The same config, but the weights of another model (one layer fewer): refused before any weight is loaded.
    from safetensors.torch import load_file, save_file

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / "adapter_config.json").write_text((tmp_path / "alpha16" / "adapter_config.json").read_text())
    weights = load_file(tmp_path / "alpha16" / "adapter_model.safetensors")
    save_file({k: v + 1 for k, v in weights.items() if "layers.1." not in k}, fewer / "adapter_model.safetensors")
    before = {n: p.detach().clone() for n, p in model.hf_model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="fewer.*8 of its weights missing.*layers.1"):
        load_adapter(model, fewer)
    for n, p in model.hf_model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, before[n]), n
    # The same weights under another scaling (rsLoRA: alpha / sqrt(r) instead of alpha / r) compute another model.
    rs = tmp_path / "rslora"
    rs.mkdir()
    config = json.loads((tmp_path / "alpha16" / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    (rs / "adapter_model.safetensors").write_bytes((tmp_path / "alpha16" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="rslora.*use_rslora \\(True against False\\)"):
        load_adapter(model, rs)
    unload_adapter(model)
    # On a model without an adapter, peft would load what matches and leave layer 1 unadapted (B = 0, silently).
    plain = {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}
    with pytest.raises(ValueError, match="fewer.*8 of its weights missing.*adapter of this model"):
        load_adapter(model, fewer)
    assert not is_adapted(model)
    after = dict(model.hf_model.named_parameters())
    assert after.keys() == plain.keys() and all(torch.equal(after[n], plain[n]) for n in plain)


def test_adapter_weights_round_trip_and_a_misfit_is_refused_before_any_copy(tokenizer):
    from choreo.lora import adapter_weights, set_adapter_weights

    model = build_tiny(tokenizer)
    add_adapter(model, rank=4, alpha=8, dropout=0.0, seed=1)
    saved = adapter_weights(model)
    assert saved and all(t.device.type == "cpu" for t in saved.values())
    shifted = {n: t + 1 for n, t in saved.items()}
    set_adapter_weights(model, shifted, where="test")
    assert all(torch.equal(p, shifted[n]) for n, p in model.hf_model.named_parameters() if "lora_" in n)
    first, last = sorted(saved)[0], sorted(saved)[-1]
    for bad, match in [({n: t for n, t in saved.items() if n != last}, "test: .*do not match.*saved"),
                       ({**saved, first: saved[first][:, :1]}, f"test: 1 of its LoRA weights have another shape.*"
                                                                 f"{first}")]:
        with pytest.raises(ValueError, match=match):
            set_adapter_weights(model, bad, where="test")
        assert all(torch.equal(p, shifted[n]) for n, p in model.hf_model.named_parameters() if "lora_" in n)
    unload_adapter(model)


def test_fluency_filter_drops_a_game_with_an_empty_message(tiny, traces):
    from choreo.workflows.prisoners import game_nll

    d = max(i for i, e in enumerate(traces[0]) if e.kind == "decode")
    empty = [dataclasses.replace(e, tokens=()) if i == d else e for i, e in enumerate(traces[0])]
    nll = game_nll(tiny, [traces[0], empty])
    assert nll[0] == nll[0] and nll[1] != nll[1]  # a number, then NaN (kept by no filter)


def test_recovery_checks_the_held_out_size_before_training(tiny, monkeypatch, tmp_path):
    import choreo.finetune as ft
    from choreo.recovery import recovery_experiment

    monkeypatch.setattr(ft, "select_on_dev", lambda *a, **k: pytest.fail("trained before checking n_eval"))
    for n_eval, message in ((0, "n_eval must be an integer >= 2 .*got 0"), (1, "n_eval must be .*got 1"),
                            (10 ** 6, "n must be in 1..*got 1000000")):
        with pytest.raises(ValueError, match=message):
            recovery_experiment(tiny, configs=[FinetuneConfig.preset("smoke")], out_dir=tmp_path, n_train=4,
                                n_eval=n_eval)


def test_a_failed_adapter_load_leaves_the_model_untouched(tokenizer, tmp_path, monkeypatch):
    """An adapter of another architecture fails to load; the model keeps its modules, state and outputs."""
    import choreo.lora

    other = build_tiny(tokenizer, "llama-mha")  # 4 KV heads: k_proj / v_proj of another shape
    add_adapter(other, rank=4, alpha=8, dropout=0.0, seed=1)
    save_adapter(other, tmp_path / "mha")
    model = build_tiny(tokenizer, "llama-gqa")
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    types = [type(m).__name__ for m in model.hf_model.modules()]
    stripped = []
    strip = choreo.lora._strip_lora
    monkeypatch.setattr(choreo.lora, "_strip_lora", lambda hf: (stripped.append(hf), strip(hf)))
    with pytest.raises(RuntimeError, match=r"size mismatch for \S*layers\.0\.self_attn\.k_proj\.lora_B"):
        with use_adapter(model, tmp_path / "mha"):
            pytest.fail("the block ran")
    assert len(stripped) == 1 and stripped[0] is model.hf_model  # peft's injected layers were taken out again
    after = model.hf_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [type(m).__name__ for m in model.hf_model.modules()] == types and not is_adapted(model)
    assert not hasattr(model.hf_model, "peft_config")
    add_adapter(model, rank=4, alpha=8, dropout=0.0, seed=1)  # a later adapter loads cleanly
    unload_adapter(model)


@pytest.mark.parametrize("argv, bad", [
    (["--n-train", "1"], "--n-train must be an integer >= 2 (training and dev pairs), got 1"),
    (["--n-train", "900"], "--n-train 900: n must be in 1..306 for the 'train' pool, got 720"),
    (["--n-eval", "100000"], "--n-eval 100000: n must be in 1..240 for the 'eval' pool, got 100000"),
])
def test_recovery_sizes_are_checked_before_the_model_loads(no_model, capsys, tmp_path, argv, bad):
    from choreo.cli import main

    assert main(["finetune", "recovery", *argv, "--out", str(tmp_path / "out")]) == 2
    assert bad in capsys.readouterr().err


def test_train_into_a_folder_holding_a_run_needs_resume(no_model, capsys, tmp_path):
    """A fresh run would replace the folder's best adapter at its first evaluation: refused before loading."""
    from choreo.cli import main
    from choreo.trace import save_traces

    traces = tmp_path / "t.jsonl"
    event = choreo.trace.TraceEvent(kind="decode", group=0, role="assistant", parents=(), tokens=(5,))
    save_traces(traces, [[event]])
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "history.json").write_text("{}")
    assert main(["finetune", "train", "--traces", str(traces), "--out", str(tmp_path / "run")]) == 2
    assert "holds a training run (best, history.json): pass --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "history.json").read_text() == "{}"


@pytest.mark.parametrize("argv, cuda, expected", [
    ([], False, "cpu"), ([], True, "cuda"), (["--device", "cpu"], True, "cpu"),
    (["--device", "cpu", "--attention", "triton"], False, "cpu"),  # the interpreter (TRITON_INTERPRET=1, below)
], ids=["default-no-cuda", "default-cuda", "cpu-on-a-cuda-machine", "triton-interpreted-on-cpu"])
def test_train_loads_the_model_on_the_device_it_trains_on(capsys, tmp_path, monkeypatch, argv, cuda, expected):
    """``choreo finetune train`` loads the model on --device (load_model's dtype: fp32 on cpu, bf16 on cuda): it
    used to load it on the CPU always, so that --attention triton could not run on a CUDA machine."""
    import types

    import choreo.finetune_cli
    import choreo.model
    from choreo.cli import main
    from choreo.trace import save_traces

    traces = tmp_path / "t.jsonl"
    save_traces(traces, [[choreo.trace.TraceEvent(kind="decode", group=0, role="assistant", parents=(), tokens=(5,))]
                         for _ in range(4)])
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(choreo.model, "load_model", lambda source, **kw: seen.update(kw) or "model")
    done = types.SimpleNamespace(best_adapter=tmp_path / "run" / "best", best_step=0, best_dev_loss=1.0, steps=1,
                                 steps_run=1, seconds_per_step=0.5, peak_rss_mb=10.0)
    monkeypatch.setattr(choreo.finetune_cli, "train", lambda model, *a, config, **kw: seen.update(
        model=model, attention=config.attention) or done)
    assert main(["finetune", "train", "--traces", str(traces), "--out", str(tmp_path / "run"), *argv]) == 0
    attention = argv[argv.index("--attention") + 1] if "--attention" in argv else "torch"
    assert seen == {"device": torch.device(expected), "model": "model", "attention": attention}
    assert json.loads(capsys.readouterr().out)["steps"] == 1


def test_a_template_with_no_end_of_turn_text_scores_content_and_eos(tokenizer, monkeypatch):
    """With an empty footer the end-of-turn token is the tokenizer's EOS: the loss gets one target per row (the
    content tokens, then EOS), not one fewer (which scored the last content token's row against nothing)."""
    import copy

    import choreo.finetune as ft

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    model = build_tiny(tok)

    async def workflow(ex):
        s = await ex.prefill("You are terse.", role="system")
        return await ex.decode(role="assistant", parents=[s], max_tokens=4)

    runner = choreo.Runner(choreo.Baseline(model), progress=False, trace=True)
    runner.run([workflow])
    events = runner.traces[0]
    seen = []
    real = ft.call_losses
    monkeypatch.setattr(ft, "call_losses", lambda rows, target, **kw: seen.append((rows, target)) or real(
        rows, target, **kw))
    out = replay_loss(choreo.Choreographer(model), events, calls="last")
    (rows, target), = seen
    assert rows.shape[0] == len(target) == len(events[-1].tokens) + 1
    assert target.tolist() == [*events[-1].tokens, tok.eos_token_id] and math.isfinite(float(out.loss))


def test_recovery_agreement_is_reported_with_wilson_intervals():
    """The agreement cells carry the Wilson interval the docstring promises: the normal "±" alone ran below 0%
    (3 of 32: "9.4% ± 10.1%") and collapsed to "± 0.0%" at 0/n."""
    from choreo.recovery import compare

    n = 32
    before = {"kl": [0.5] * n, "nll": [1.0] * n, "top1": [0.5] * n, "agree": [1] * 3 + [0] * (n - 3)}
    after = {"kl": [0.25] * n, "nll": [0.75] * n, "top1": [0.75] * n, "agree": [1] * 8 + [0] * (n - 8)}
    out = compare(before, after)
    assert out["agree_before_ci"] == "9.4% ± 10.1% [3.2, 24.2]"
    assert out["agree_after_ci"] == "25.0% ± 15.0% [13.3, 42.1]"
    assert out["agree_before_rate"]["successes"] == 3 and out["agree_before_rate"]["method"] == "wilson"
    assert out["agree_before_rate"]["low"] == pytest.approx(0.0324, abs=1e-4)
    none = compare(before, {**after, "agree": [0] * n})
    assert none["agree_after_ci"] == "0.0% ± 0.0% [0.0, 10.7]"


def test_recovery_render_only_recomputes_the_statistics_from_the_logged_metrics(tmp_path, capsys):
    from choreo.cli import main
    from choreo.recovery import METRICS

    n = 4
    before = {name: [0.5, 0.25, 0.5, 0.75] for name, _, _ in METRICS} | {"agree": [0, 0, 1, 0]}
    after = {name: [0.25, 0.25, 0.25, 0.5] for name, _, _ in METRICS} | {"agree": [1, 0, 1, 1]}
    summary = {"n_eval": n, "n_train": 8, "n_dev": 2, "agree_before_ci": "stale", "selection_metric": "kl",
               "chosen": 0, "chosen_loss": "kl", "chosen_lr": 1e-3, "best_step": 2, "steps": 4, "seconds_per_step": 1.0,
               "peak_rss_mb": 100.0, "wall_s": 60.0}
    provenance = {"model": {"name": "m", "sha256": "abc", "dtype": "float32"}, "device": "cpu", "seeds": {},
                  "sample_sizes": {}, "versions": {"torch": "x"}, "git_commit": "c", "date": "d", "command": "run"}
    report = {"summary": summary, "candidates": [{"loss": "kl", "lr": 1e-3, "dev_step0": 1.0, "best_dev": 0.5,
                                                  "best_step": 2, "steps": 4, "seconds_per_step": 1.0}],
              "before": before, "after": after, "provenance": provenance}
    (tmp_path / "recovery.json").write_text(json.dumps(report))
    assert main(["finetune", "recovery", "--render-only", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "recovery.json").read_text())
    assert stored["summary"]["agree_before_ci"] == "25.0% ± 42.4% [4.6, 69.9]"
    assert stored["summary"]["kl_gain"] == pytest.approx(0.5 - 0.3125) and stored["provenance"] == provenance
    assert "25.0% ± 42.4% [4.6, 69.9]" in (tmp_path / "recovery.md").read_text()
    del report["after"]["kl"]
    (tmp_path / "recovery.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["finetune", "recovery", "--render-only", "--out", str(tmp_path)]) == 2
    assert "lacks the per-pair metrics" in capsys.readouterr().err
    assert main(["finetune", "recovery", "--render-only", "--lrs", "0.1", "--out", str(tmp_path)]) == 2
    assert "--lrs has no effect with --render-only" in capsys.readouterr().err
    report["after"]["kl"] = report["before"]["kl"]  # metrics again, but a summary that lacks what the table shows
    del report["summary"]["n_eval"]
    (tmp_path / "recovery.json").write_text(json.dumps(report))
    before = (tmp_path / "recovery.json").read_bytes()
    assert main(["finetune", "recovery", "--render-only", "--out", str(tmp_path)]) == 2
    assert "lack what recovery.md shows (KeyError: 'n_eval')" in capsys.readouterr().err
    assert (tmp_path / "recovery.json").read_bytes() == before  # nothing written


def test_recovery_refuses_too_few_held_out_traces_with_a_clear_error(tiny, tmp_path, monkeypatch):
    """``collect_traces`` drops pairs with an empty baseline answer; fewer than 2 held-out traces left used to end
    in the paired test's bare "need at least 2 pair(s)"."""
    import choreo.recovery as recovery

    collect = recovery.collect_traces

    def few_held_out(model, *, n, split="train", **kw):
        traces, meta = collect(model, n=n, split=split, **kw)
        return (traces[:1], meta[:1]) if split == "eval" else (traces, meta)

    monkeypatch.setattr(recovery, "collect_traces", few_held_out)
    with pytest.raises(ValueError, match="1 of 3 held-out pairs left a trace .* needs at least 2"):
        recovery.recovery_experiment(tiny, configs=[FinetuneConfig.preset("smoke", max_steps=1)], out_dir=tmp_path,
                                     n_train=4, n_eval=3, progress=False)
    assert not is_adapted(tiny)


def _files(folder) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_leaves_its_folder_as_it_was(tiny, traces, tmp_path, monkeypatch, capsys):
    """``choreo finetune train --resume`` on a run that had run every step printed "seconds_per_step": NaN (not
    JSON) and rewrote history.json (its date) and best/."""
    import choreo.model
    from choreo.cli import main
    from choreo.trace import save_traces

    save_traces(tmp_path / "t.jsonl", traces)
    monkeypatch.setattr(choreo.model, "load_model", lambda *args, **kwargs: tiny)
    argv = ["finetune", "train", "--traces", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "run"),
            "--config", "smoke"]
    assert main(argv) == 0
    unload_adapter(tiny)
    first = json.loads(capsys.readouterr().out)
    before = _files(tmp_path / "run")
    assert main(argv + ["--resume"]) == 0
    out, err = capsys.readouterr()
    resumed = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    loaded = {n: p.detach().clone() for n, p in tiny.hf_model.named_parameters() if "lora_" in n}
    unload_adapter(tiny)
    assert resumed["seconds_per_step"] is None and resumed["steps"] == first["steps"]
    assert resumed["best_step"] == first["best_step"] and resumed["best_dev_loss"] == first["best_dev_loss"]
    assert f"the run had finished all {first['steps']} steps; none left to run" in err
    assert _files(tmp_path / "run") == before
    load_adapter(tiny, tmp_path / "run" / "best")  # the model carried the chosen adapter
    assert all(torch.equal(p, loaded[n]) for n, p in tiny.hf_model.named_parameters() if "lora_" in n)
    unload_adapter(tiny)


def test_a_finished_run_killed_before_its_history_was_written_writes_it_on_resume(tiny, traces, tmp_path):
    config = FinetuneConfig.preset("smoke", epochs=2, eval_every=2, seed=3)
    full = train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, progress=False)
    unload_adapter(tiny)
    written = json.loads((tmp_path / "history.json").read_text())
    (tmp_path / "history.json").unlink()
    rest = train(tiny, traces[:4], traces[6:], config=config, out_dir=tmp_path, resume=True, progress=False)
    unload_adapter(tiny)
    assert rest.steps_run == 0 and math.isnan(rest.seconds_per_step) and rest.best_step == full.best_step
    assert json.loads((tmp_path / "history.json").read_text())["history"] == written["history"]
