"""Bad input gets an error naming the bad value, and leaves the cache exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import choreo
from choreo.cache import CapacityError


def snapshot(ex):
    memory = {k: v for k, v in ex.memory().items() if k != "tokens_peak"}  # a high-water mark may move
    return memory, list(ex.engine.store._free), [m.id for m in ex.messages]


def test_a_refused_parallel_batch_leaves_the_peak_as_it_was(tiny_gqa):
    """Rows reserved for a batch that is refused before it runs (one call cannot fit) were never used."""
    for cls in (choreo.Choreographer, choreo.Baseline):
        ex = cls(tiny_gqa, capacity=256)
        sys = ex.prefill("Be brief.", role="system")
        peak = ex.memory()["tokens_peak"]
        with pytest.raises(CapacityError):
            ex.decode([choreo.Call(parents=[sys], max_tokens=100), choreo.Call(parents=[sys], max_tokens=200)])
        assert ex.memory()["tokens_peak"] == peak, cls.__name__


@pytest.fixture(params=["choreographed", "baseline"])
def setup(request, tiny_gqa):
    cls = choreo.Choreographer if request.param == "choreographed" else choreo.Baseline
    ex = cls(tiny_gqa, capacity=256)
    sys = ex.prefill("Be brief.", role="system")
    gone = ex.prefill("Forget me.", role="user", parents=[sys])
    ex.free(gone)
    return ex, sys, gone


BAD = {
    "unknown parent id": (lambda ex, s, g: ex.decode(role="assistant", parents=[12345]), KeyError, "12345"),
    "freed parent": (lambda ex, s, g: ex.decode(role="assistant", parents=[g]), KeyError, "freed"),
    "offsets length": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[0, 1]),
                       ValueError, "2 entries"),
    "negative offset": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[-4]), ValueError, "-4"),
    "negative new_offset": (lambda ex, s, g: ex.prefill("x", role="user", new_offset=-1), ValueError, "-1"),
    "empty text": (lambda ex, s, g: ex.prefill("", role="user", parents=[s]), ValueError, "non-empty"),
    "unknown role": (lambda ex, s, g: ex.prefill("hi", role="wizard", parents=[s]), ValueError, "wizard"),
    "max_tokens 0": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], max_tokens=0), ValueError, "max_tokens"),
    "top_p 0": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], top_p=0.0), ValueError, "top_p"),
    "duplicate parent": (lambda ex, s, g: ex.decode(role="assistant", parents=[s, s]), ValueError, "twice"),
    "max_tokens above the capacity": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], max_tokens=1000),
                                      ValueError, r"max_tokens=1000.*capacity of 256 tokens"),
    "teacher tokens above the capacity": (
        lambda ex, s, g: ex.decode(role="assistant", parents=[s], teacher_tokens=[5] * 300), ValueError,
        "its 300 teacher_tokens"),
    "one bad call in a parallel batch": (
        lambda ex, s, g: ex.decode([choreo.Call(parents=[s], max_tokens=5), choreo.Call(parents=[s], max_tokens=900)]),
        ValueError, "max_tokens=900"),
    "capacity exceeded by a batch": (
        lambda ex, s, g: ex.decode([choreo.Call(parents=[s], max_tokens=120) for _ in range(2)]),
        CapacityError, "capacity"),
    "seed None": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], seed=None), ValueError, "seed"),
    "seed too large": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], seed=2 ** 70), ValueError, "seed"),
    "seed of 33 bits": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], seed=2 ** 32), ValueError,
                        r"\[0, 2\*\*32 - 1\], got 4294967296: .*low 32 bits"),
    "negative seed": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], seed=-1), ValueError, "got -1"),
    "one bad seed in a parallel batch": (
        lambda ex, s, g: ex.decode([choreo.Call(parents=[s], max_tokens=5), choreo.Call(parents=[s], seed="abc")]),
        ValueError, "'abc'"),
    "teacher token outside the vocabulary": (
        lambda ex, s, g: ex.decode(role="assistant", parents=[s], teacher_tokens=[5, 10 ** 7]), ValueError, "10000000"),
    "negative teacher token": (
        lambda ex, s, g: ex.decode(role="assistant", parents=[s], teacher_tokens=[-1]), ValueError, "-1"),
    "stop not a string": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], stop=[3]), ValueError, "stop"),
    "infinite temperature": (
        lambda ex, s, g: ex.decode(role="assistant", parents=[s], temperature=float("inf")), ValueError, "inf"),
    "temperature a string": (
        lambda ex, s, g: ex.decode(role="assistant", parents=[s], temperature="0.5"), ValueError, "temperature"),
    "max_tokens a bool": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], max_tokens=True), ValueError,
                          "max_tokens"),
    "a bool as a parent id": (lambda ex, s, g: ex.decode(role="assistant", parents=[True]), KeyError, "True"),
    "a call instead of a list": (lambda ex, s, g: ex.decode(choreo.Call(parents=[s])), TypeError, "list of calls"),
    "a message instead of a parents list": (lambda ex, s, g: ex.decode(role="assistant", parents=s), TypeError,
                                            r"parents must be a list .* got Message"),
    "an id instead of a parents list": (lambda ex, s, g: ex.prefill("x", role="user", parents=s.id), TypeError,
                                        r"parents must be a list .* got int"),
    "a position instead of an offsets list": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=3),
                                              TypeError, r"offsets must be a list .* got int 3"),
    "a bool as an offset": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[True]), ValueError,
                            r"offsets\[0\].*True"),
    "a float as an offset": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[3.0]), ValueError,
                             r"offsets\[0\].*3\.0"),
    "a negative numpy offset": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[np.int64(-3)]),
                                ValueError, "-3"),
    "a numpy float as new_offset": (lambda ex, s, g: ex.prefill("x", role="user", new_offset=np.float64(2)),
                                    ValueError, r"new_offset.*2\.0"),
    "free lists a message twice": (lambda ex, s, g: ex.free(s, s), ValueError, "twice"),
    "a position past int64": (lambda ex, s, g: ex.prefill("x", role="user", new_offset=2 ** 63), ValueError,
                              r"new_offset.*below 2\*\*62.*9223372036854775808"),
    "an offset past int64": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[2 ** 62]),
                             ValueError, r"offsets\[0\].*below 2\*\*62"),
    "a prefix that is no string": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], prefix=5), ValueError,
                                   "prefix must be a string.*5"),
    "keep_logits on a sampled call": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], keep_logits=True),
                                      ValueError, r"keep_logits=True keeps the logits of a teacher-forced call.*"
                                                  r"teacher-force them afterwards \(teacher_tokens=message.tokens"),
    "a special token as a stop string": (
        lambda ex, s, g: ex.decode([choreo.Call(parents=[s], max_tokens=5),
                                    choreo.Call(parents=[s], max_tokens=5, stop=["\n", "<|im_start|>"])]),
        ValueError, r"stop string '<\|im_start\|>' holds the special token .*would never stop"),
    "a message among the calls": (lambda ex, s, g: ex.decode([choreo.Call(parents=[s]), s]), TypeError,
                                  r"decode\(calls\)\[1\] must be a Call or a dict of Call fields, got Message"),
    "None among the calls": (lambda ex, s, g: ex.decode([None]), TypeError, r"decode\(calls\)\[0\] .* got NoneType"),
    "keep_logits not a bool": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], teacher_tokens=[5],
                                                          keep_logits="no"), ValueError, "keep_logits.*'no'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_rejected_and_the_cache_is_unchanged(setup, case):
    ex, sys, gone = setup
    action, error, text = BAD[case]
    before = snapshot(ex)
    with pytest.raises(error, match=text):
        action(ex, sys, gone)
    assert snapshot(ex) == before
    # ... and the executor still works.
    assert ex.decode(role="assistant", parents=[sys], max_tokens=2).tokens


def test_free_twice_is_an_error(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    m = ch.prefill("hello", role="user")
    ch.free(m)
    with pytest.raises(KeyError, match="freed"):
        ch.free(m)


def test_message_of_another_executor_is_rejected(tiny_gqa):
    a, b = choreo.Choreographer(tiny_gqa), choreo.Choreographer(tiny_gqa)
    m = a.prefill("hello", role="user")
    b.prefill("other", role="user")  # the same id, another message: refused by identity, not by id
    with pytest.raises(KeyError, match=r"parents: unknown or freed message Message\(id=0, role='user'.*'hello'"):
        b.decode(role="assistant", parents=[m])


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="'flash'"):
        choreo.attention.get_backend("flash")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        choreo.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        choreo.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        choreo.load_model(str(tmp_path))


def test_a_checkpoint_directory_is_identified_by_the_hash_of_its_files(tokenizer, tmp_path, monkeypatch):
    """Provenance names a local checkpoint by the sha256 of its config and weights, computed once per version of
    the files (cached by size and modification time)."""
    import hashlib

    from choreo.model import checkpoint_sha256
    from tests.conftest import build_tiny

    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ckpt"
    build_tiny(tokenizer, dtype=torch.float32).hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = choreo.load_model(str(folder))
    expected = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.name == "config.json" or f.suffix == ".safetensors":
            expected.update(f.name.encode() + b"\0" + f.read_bytes())
    assert model.spec.sha256 == expected.hexdigest()
    assert (tmp_path / "cache" / "checkpoint-sha256.json").exists()
    import builtins

    real_open = builtins.open

    def no_weights(file, *args, **kwargs):  # the cached digest: no weight file is read again
        assert not str(file).endswith(".safetensors"), file
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_weights)
    assert checkpoint_sha256(folder) == model.spec.sha256
    monkeypatch.setattr(builtins, "open", real_open)
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")  # another version
    assert checkpoint_sha256(folder) != model.spec.sha256


@pytest.mark.parametrize("kind,options", [(choreo.Choreographer, {}), (choreo.Baseline, {}),
                                          (choreo.Baseline, {"prefix_reuse": True})],
                         ids=["choreographed", "baseline", "baseline-prefix-reuse"])
def test_an_error_inside_the_forward_pass_rolls_the_calls_back(tiny_gqa, kind, options):
    """A call that fails midway (here: its attention raises on the second pass) leaves no message and no row."""
    ex = kind(tiny_gqa, capacity=256, **options)
    sys = ex.prefill("Be brief.", role="system")
    ex.decode(role="assistant", parents=[sys], max_tokens=3)  # with prefix reuse: a chain later calls reuse
    backend, passes = ex.engine.backend, []

    def failing(plan, *args):
        passes.append(plan)
        if len({id(p) for p in passes}) > 1:
            raise RuntimeError("attention failed")
        return backend(plan, *args)

    before = snapshot(ex)
    ex.engine.backend = failing
    with pytest.raises(RuntimeError, match="attention failed"):
        ex.decode([choreo.Call(parents=[sys], max_tokens=4), choreo.Call(parents=[sys], max_tokens=4, seed=1)])
    assert snapshot(ex) == before
    if kind is choreo.Choreographer:  # a prefill (the baseline's only records text)
        passes.extend([None, None])
        with pytest.raises(RuntimeError, match="attention failed"):
            ex.prefill("Hello there.", role="user", parents=[sys])
        assert snapshot(ex) == before
    ex.engine.backend = backend
    assert ex.decode(role="assistant", parents=[sys], max_tokens=2).tokens
    ex.free(*ex.messages)
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0


def test_triton_attention_where_it_cannot_run_is_refused_up_front(tiny_gqa, monkeypatch):
    import triton_kernels

    monkeypatch.setattr(triton_kernels, "is_available", lambda device=None: False)
    with pytest.raises(ValueError, match="attention='triton' cannot run on the model's device cpu"):
        choreo.Choreographer(tiny_gqa, attention="triton")


@pytest.mark.parametrize("bad", [None, 1.5, "100", True])
def test_capacity_must_be_an_integer(tiny_gqa, bad):
    with pytest.raises(ValueError, match=f"capacity must be an integer.*{bad!r}"):
        choreo.Choreographer(tiny_gqa, capacity=bad)


def test_executor_needs_a_choreo_model():
    with pytest.raises(TypeError, match="choreo Model.*NoneType"):
        choreo.Choreographer(None)


def test_linearize_errors(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    m = ch.prefill("hello", role="user")
    with pytest.raises(ValueError, match="start.*-5"):
        choreo.linearize([m], start=-5)
    with pytest.raises(TypeError, match="Message objects"):
        choreo.linearize([m.id])


def test_baseline_prefills_hold_no_rows(tiny_gqa):
    """The baseline records a prefill's text only: a prompt longer than the cache is fine until a call reads it."""
    bl = choreo.Baseline(tiny_gqa, capacity=16)
    long = bl.prefill("word " * 40, role="user")
    assert bl.memory()["tokens_used"] == 0 and bl.memory()["tokens_peak"] == 0
    with pytest.raises(CapacityError, match="capacity"):
        bl.decode(role="assistant", parents=[long], max_tokens=2)
    assert bl.memory()["tokens_used"] == 0 and [m.id for m in bl.messages] == [long.id]


IN_FLIGHT = {
    "as a prefill's parent": lambda ex, s, m: ex.prefill("Child.", role="user", parents=[s, m]),
    "as a decode's parent, by id": lambda ex, s, m: ex.decode(role="assistant", parents=[m.id], max_tokens=2),
    "as a parent in a parallel batch": lambda ex, s, m: ex.decode([choreo.Call(parents=[s], max_tokens=2),
                                                                   choreo.Call(parents=[m], max_tokens=2)]),
    "freed": lambda ex, s, m: ex.free(m),
    "freed by id after a finished message": lambda ex, s, m: ex.free(s, m.id),
}


@pytest.mark.parametrize("teacher", [None, [], [5, 6, 7]], ids=["sampled", "empty-forced", "teacher-forced"])
@pytest.mark.parametrize("case", list(IN_FLIGHT), ids=list(IN_FLIGHT))
def test_a_message_still_being_decoded_is_no_parent_and_cannot_be_freed(tiny_gqa, case, teacher):
    """A started decode is listed (its id is taken) before it runs: a child would read only its header at positions
    its later tokens take, and freeing it would return rows still being written. Both are refused, changing
    nothing; once the decode has returned, the message is an ordinary one."""
    ch = choreo.Choreographer(tiny_gqa, capacity=256)
    sys = ch.prefill("Be brief.", role="system")
    jobs = ch.start_decode([choreo.Call(parents=[sys], max_tokens=4, teacher_tokens=teacher)])
    msg = jobs[0].msg
    assert ch.message(msg.id) is msg and msg.decoding  # readable, not usable
    before = snapshot(ch)
    with pytest.raises(ValueError, match=f"message {msg.id} is still being decoded"):
        IN_FLIGHT[case](ch, sys, msg)
    assert snapshot(ch) == before and not sys.freed
    ch.engine.run(jobs)
    (done,) = ch.finish(jobs)
    assert done is msg and not done.decoding
    child = ch.decode(role="assistant", parents=[sys, done], max_tokens=2)
    assert child.start == done.end
    ch.free(child, done, sys)
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0


@pytest.mark.parametrize("kind,options", [(choreo.Choreographer, {}), (choreo.Baseline, {"prefix_reuse": True})],
                         ids=["choreographed", "baseline-prefix-reuse"])
def test_an_aborted_decode_is_no_longer_in_flight(tiny_gqa, kind, options):
    ex = kind(tiny_gqa, **options)
    sys = ex.prefill("Be brief.", role="system")
    jobs = ex.start_decode([choreo.Call(parents=[sys], max_tokens=3), choreo.Call(parents=[sys], max_tokens=5)])
    ex.engine.step(jobs)
    ex.abort(jobs)
    assert not any(j.msg.decoding for j in jobs)
    ex.free(sys)
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0


def failing_backend(ex, after: int):
    """The executor's attention backend, made to raise on every pass after the first ``after`` passes."""
    backend, passes = ex.engine.backend, []

    def failing(plan, *args):
        passes.append(plan)
        if len({id(p) for p in passes}) > after:
            raise RuntimeError("attention failed")
        return backend(plan, *args)

    return failing


REFUSALS = {
    "a call that cannot fit": lambda ex, calls: ex.decode(calls + [choreo.Call(max_tokens=500)]),
    "a call that fails in its first pass": lambda ex, calls: ex.decode(calls),
    "a call that fails midway": lambda ex, calls: ex.decode(calls),
}
REFUSED_WITH = {  # what each refusal raises: the reservation check before any pass, or the backend's failure
    "a call that cannot fit": (ValueError, "reserves 505 cache rows \\(max_tokens=500.*capacity of 300 tokens"),
    "a call that fails in its first pass": (RuntimeError, "^attention failed$"),
    "a call that fails midway": (RuntimeError, "^attention failed$"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_a_call_that_does_not_finish_reuses_no_tokens(tiny_gqa, case):
    """``Baseline.reused_tokens`` counts the cached prompt tokens of calls that ran to the end, nothing else."""
    bl = choreo.Baseline(tiny_gqa, capacity=300, prefix_reuse=True)
    sys = bl.prefill("Be brief.", role="system")
    q = bl.prefill("Name a colour.", role="user", parents=[sys])
    a = bl.decode(role="assistant", parents=[sys, q], max_tokens=3)
    q2 = bl.prefill("Another one.", role="user", parents=[sys, q, a])
    calls = [choreo.Call(parents=[sys, q, a, q2], max_tokens=3), choreo.Call(parents=[sys, q], max_tokens=2, seed=1)]
    reused = bl.reused_tokens
    if case != "a call that cannot fit":
        bl.engine.backend = failing_backend(bl, after=0 if "first" in case else 1)
    error, match = REFUSED_WITH[case]
    with pytest.raises(error, match=match) as refused:
        REFUSALS[case](bl, calls)
    assert refused.type is error
    assert bl.reused_tokens == reused
    bl.engine.backend = choreo.attention.get_backend(bl.attention)
    chain = [t for m in (sys, q, a) for t in m.ids]  # the prompt and output of the first call, cached
    cached = [bl._reuse(bl.serial_prompt(call)[0])[1] for call in calls]
    assert cached[0] == len(chain) and 0 < cached[1] < len(chain)
    bl.decode(calls)
    assert bl.reused_tokens == reused + sum(cached)


_LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[3.0] * 8,
                 original_max_position_embeddings=32, rope_theta=10000.0)
REFUSED_CONFIGS = {  # HF config fields -> what the error names
    "rope dynamic": (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)),
                     r"rope_type 'dynamic' .*supported: default, linear, yarn, llama3"),
    "rope longrope": (dict(max_position_embeddings=128, rope_parameters=_LONGROPE),
                      r"rope_type 'longrope' .*supported: default, linear, yarn, llama3"),
    "mistral with its default window": (dict(model_type="mistral"), r"sliding_window=4096.*sliding_window=None"),
    "mistral window 16": (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
    "qwen2 window on its last layer": (
        dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
        r"sliding_window=16 \(use_sliding_window=True, on layers \[1\]\)"),
    "qwen3 window on every layer": (
        dict(model_type="qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=0),
        r"sliding_window=16 .*layers \[0, 1\]"),
}


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS), ids=list(REFUSED_CONFIGS))
def test_configs_whose_attention_choreo_cannot_reproduce_are_refused(tokenizer, case):
    """Sequence-length-dependent RoPE frequencies and sliding windows gave other logits than HF's past the
    original context or the window: such models do not load."""
    from tests.conftest import tiny_hf

    options, message = REFUSED_CONFIGS[case]
    options = dict(options)
    hf = tiny_hf(tokenizer, options.pop("model_type", "llama"), **options)
    with pytest.raises(ValueError, match=message):
        choreo.load_model(hf, tokenizer=tokenizer)


def test_a_refused_config_is_refused_from_a_checkpoint_directory_too(tokenizer, tmp_path, monkeypatch):
    from tests.conftest import tiny_hf

    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "cache"))
    tiny_hf(tokenizer, max_position_embeddings=128, rope_parameters=_LONGROPE).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        choreo.load_model(str(tmp_path / "ckpt"))


def _poison_logits(monkeypatch, model, *, clean_passes: int):
    """Make ``model.forward`` put a NaN in token 7's logit on every pass after the first ``clean_passes``."""
    forward, passes = model.forward, []

    def poisoned(*args, **kwargs):
        passes.append(None)
        logits = forward(*args, **kwargs)
        return logits if len(passes) <= clean_passes else logits.index_fill(-1, torch.tensor([7]), float("nan"))

    monkeypatch.setattr(model, "forward", poisoned)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("clean_passes", [0, 2], ids=["first-token", "third-token"])
@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline], ids=["choreographed", "baseline"])
def test_nan_logits_name_the_call_and_roll_it_back(tiny_gqa, monkeypatch, kind, clean_passes, temperature):
    ex = kind(tiny_gqa, capacity=256)
    sys = ex.prefill("Be brief.", role="system")
    before = snapshot(ex)
    _poison_logits(monkeypatch, tiny_gqa, clean_passes=clean_passes)
    expected = rf"role 'assistant', seed 5\) at generated token {clean_passes}: .*temperature {temperature}.*1 NaN"
    with pytest.raises(ValueError, match=expected):
        ex.decode(role="assistant", parents=[sys], max_tokens=8, seed=5, temperature=temperature)
    assert snapshot(ex) == before
    monkeypatch.undo()
    assert ex.decode(role="assistant", parents=[sys], max_tokens=2).tokens


def test_a_refused_batch_leaves_the_store_allocation_as_it_was(tiny_gqa):
    """The first call of a refused batch grew the buffers (no free run fit it): they shrink back."""
    for cls in (choreo.Choreographer, choreo.Baseline):
        for bad, match in ((choreo.Call(max_tokens=5000), r"reserves 5006 cache rows \(max_tokens=5000.*of 4096"),
                           (choreo.Call(teacher_tokens=[10 ** 7]), "token id 10000000, outside the model's vocab")):
            ex = cls(tiny_gqa, capacity=4096)
            sys = ex.prefill("Be brief.", role="system")
            before = ex.memory(), list(ex.engine.store._free)
            with pytest.raises(ValueError, match=match) as refused:
                ex.decode([choreo.Call(parents=[sys], max_tokens=2000), bad])
            assert refused.type is ValueError
            assert (ex.memory(), list(ex.engine.store._free)) == before, cls.__name__
            assert ex.engine.store.k[0].shape[1] == before[0]["tokens_allocated"] == ex.engine.store.writes.shape[0]
            fresh = cls(tiny_gqa, capacity=4096)
            want = fresh.decode(parents=[fresh.prefill("Be brief.", role="system")], teacher_tokens=[5, 6],
                                keep_logits=True).logits
            assert torch.equal(ex.decode(parents=[sys], teacher_tokens=[5, 6], keep_logits=True).logits, want)


def test_numpy_fields_of_a_call_become_python_numbers(tiny_gqa):
    call = choreo.Call(max_tokens=np.int64(3), seed=np.int64(4), temperature=np.float32(0.5), top_p=np.float32(0.5),
                       new_offset=np.int64(40))
    assert [type(getattr(call, f)) for f in ("max_tokens", "seed", "temperature", "top_p", "new_offset")] == \
        [int, int, float, float, int]
    ex = choreo.Choreographer(tiny_gqa)
    ex.free(ex.decode(max_tokens=np.int64(3)))
    assert type(ex.memory()["tokens_used"]) is int


def test_iterables_in_a_call_are_read_once(tiny_gqa):
    ex = choreo.Choreographer(tiny_gqa)
    sys = ex.prefill("Be brief.", role="system")
    call = choreo.Call(parents=(m for m in [sys]), offsets=(o for o in [5]), max_tokens=2)
    assert call.parents == (sys,) and call.offsets == (5,)
    a, b = ex.decode([call, call])  # the same call twice: both read the parent
    assert a.parents == b.parents == (sys.id,) and a.start == b.start == 5 + sys.length


@pytest.mark.parametrize("tokens, match", [([10 ** 7], "10000000, outside"), ([-5], "-5"), ([2.7], "2.7"),
                                           ([True], "True"), (["5"], "'5'")])
def test_baseline_add_generated_checks_its_tokens(tiny_gqa, tokens, match):
    bl = choreo.Baseline(tiny_gqa)
    sys = bl.prefill("Be brief.", role="system")
    with pytest.raises(ValueError, match=f"add_generated tokens.*{match}"):
        bl.add_generated(choreo.Call(parents=[sys]), tokens)
    assert [m.id for m in bl.messages] == [sys.id]


def test_freeing_a_parent_of_a_started_call_keeps_its_rows_until_the_call_is_done(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief. " * 5, role="system")
    want = choreo.Choreographer(tiny_gqa)
    want = want.decode(parents=[want.prefill("Be brief. " * 5, role="system")], max_tokens=6).tokens
    jobs = ch.start_decode([choreo.Call(parents=[sys], max_tokens=6)])
    ch.free(sys)  # unlisted at once: no new call can read it ...
    with pytest.raises(KeyError, match="freed"):
        ch.decode(parents=[sys])
    ch.prefill("Overwrite " * 20, role="user")  # ... and its rows are not reused while the started call reads them
    assert ch._run(jobs)[0].tokens == want
    assert ch.memory()["tokens_used"] == ch.messages[-1].length + jobs[0].msg.length  # sys's rows went back


def _with_template(tokenizer, template: str):
    import copy

    from tests.conftest import build_tiny

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return build_tiny(tok, "llama-gqa")


def test_a_turn_with_no_header_needs_a_prefix_instead_of_hanging(tokenizer):
    """A template that opens the assistant's turn with no tokens (content, then end-of-turn): a choreographed call
    has no token of its own to predict its first one from, so it is refused naming the fix, and nothing is kept;
    with a prefix it runs, and the baseline (which re-encodes its parents) runs without one."""
    model = _with_template(tokenizer, "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    ch = choreo.Choreographer(model)
    assert ch.format.header("assistant") == []
    q = ch.prefill("Two plus two?", role="user")
    before = snapshot(ch)
    for call in (dict(max_tokens=3), dict(teacher_tokens=[5, 6])):
        with pytest.raises(ValueError, match="role 'assistant'.* no tokens, and the call has no prefix; give it a "
                                             "prefix"):
            ch.decode(role="assistant", parents=[q], **call)
        assert snapshot(ch) == before
    choreographed = ch.decode(role="assistant", parents=[q], prefix="Sure", max_tokens=2)
    bl = choreo.Baseline(model)
    bq = bl.prefill("Two plus two?", role="user")
    assert len(bl.decode(role="assistant", parents=[bq], max_tokens=2).tokens) <= 2
    # The full conversation as the parents (docs/semantics.md, "The invariant"): the same greedy tokens, and the
    # same logits for them.
    assert len(choreographed.tokens) <= 2
    greedy = [ex.decode(role="assistant", parents=[p], prefix="Sure", max_tokens=8) for ex, p in ((ch, q), (bl, bq))]
    assert greedy[0].ids == greedy[1].ids and greedy[0].tokens, [m.ids for m in greedy]
    forced = [ex.decode(role="assistant", parents=[p], prefix="Sure", teacher_tokens=greedy[0].tokens,
                        keep_logits=True).logits for ex, p in ((ch, q), (bl, bq))]
    torch.testing.assert_close(forced[0], forced[1], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="no prefix and no parents"):
        bl.decode(role="assistant", max_tokens=2)


def test_a_turn_with_no_footer_ends_at_its_end_of_turn_token(tokenizer, monkeypatch):
    """A template with no end-of-turn text: a call that samples the end-of-turn token is done, adding nothing."""
    import choreo.engine as engine

    model = _with_template(tokenizer, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                      "{% endfor %}")
    ch = choreo.Choreographer(model)
    assert ch.format.footer("assistant") == [] and tokenizer.eos_token_id in ch.format.stop_ids("assistant")
    s = ch.prefill("You are terse.", role="system")
    draws = iter([5, tokenizer.eos_token_id])
    monkeypatch.setattr(engine, "sample", lambda logits, **kw: next(draws))
    msg = ch.decode(role="assistant", parents=[s], max_tokens=5)
    assert msg.tokens == [5] and msg.ids[-1] == 5 and ch.memory()["tokens_used"] == s.length + msg.length


def test_a_job_with_nothing_to_feed_is_an_error_not_a_hang(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    job, = ch.start_decode([choreo.Call(max_tokens=2)])
    job.pending = []  # a state no call should reach: the engine must not spin on it
    with pytest.raises(RuntimeError, match=f"message {job.msg.id} .* has no token to feed"):
        ch.engine.run([job])
    ch.abort([job])


def test_a_stop_string_split_by_tokens_with_no_text_still_stops(tiny_gqa, tokenizer, monkeypatch):
    """Special tokens decode to no text: five of them between 'a' and 'b' must not hide the stop string 'ab'."""
    import choreo.engine as engine

    ch = choreo.Choreographer(tiny_gqa)
    a, b = (tokenizer.encode(t, add_special_tokens=False) for t in ("a", "b"))
    special = tokenizer.convert_tokens_to_ids("<repo_name>")
    assert ch.format.decode([special]) == "" and special not in ch.format.stop_ids("assistant")
    tokens = a + [special] * 5 + b
    assert ch.format.hits_stop(tokens, ["ab"]) and not ch.format.hits_stop(tokens[:-1], ["ab"])
    draws = iter(tokens + tokenizer.encode(" and more", add_special_tokens=False) * 5)
    monkeypatch.setattr(engine, "sample", lambda logits, **kw: next(draws))
    msg = ch.decode(role="assistant", max_tokens=20, stop=["ab"])
    assert msg.tokens == tokens and msg.text == "ab"


def test_call_fields_given_as_iterators_or_numpy_ids_are_read_once(tiny_gqa):
    """A generator of stop strings is kept (not used up by the check); a numpy integer names a message id."""
    assert choreo.Call(stop=(s for s in ["the", "\n"])).stop == ("the", "\n")
    assert choreo.Call(stop=iter(["x"])).stop == ("x",)
    ch = choreo.Choreographer(tiny_gqa)
    s = ch.prefill("Be brief.", role="system")
    assert ch.message(np.int64(s.id)) is s
    assert ch.decode(parents=[np.int32(s.id)], max_tokens=1).parents == (s.id,)
    for bad in (torch.tensor(True), np.bool_(True), torch.tensor([s.id]), np.array([s.id]), float(s.id)):
        with pytest.raises(KeyError, match="unknown or freed message"):  # a bool or a 1-element array: no id
            ch.decode(parents=[bad], max_tokens=1)
    ch.free(torch.tensor(s.id))  # a 0-d id is one id, not a list to spread
    assert s.freed


def test_free_given_a_list_says_to_spread_it(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    a, b = ch.prefill("One.", role="user"), ch.prefill("Two.", role="user")
    before = snapshot(ch)
    with pytest.raises(TypeError, match=r"separate arguments, got a list .*write free\(\*messages\)"):
        ch.free([a, b])
    assert snapshot(ch) == before and not a.freed
    ch.free(*[a, b])
    assert a.freed and b.freed


def test_a_cache_folder_that_is_a_file_is_named(monkeypatch, tmp_path):
    from choreo.model import _cache_root

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "afile"))
    with pytest.raises(NotADirectoryError, match=r"\$CHOREO_CACHE '.*afile' is not a folder"):
        _cache_root()
    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "new"))
    assert _cache_root() == tmp_path / "new"


def test_a_cache_folder_that_cannot_be_written_is_named_before_converting(monkeypatch, tmp_path):
    """The embedded model's conversion takes about half a minute: an unwritable cache is refused before it."""
    import choreo.model as model_module

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CHOREO_CACHE", str(tmp_path / "afile" / "below"))
    monkeypatch.setattr(model_module, "embedded_gguf", lambda: tmp_path / "afile")
    with pytest.raises(ValueError, match=r"\$CHOREO_CACHE '.*below': cannot write there \(Not a directory\)"):
        model_module.embedded_checkpoint()


def test_cached_prompts_make_room_least_recently_used_first(tiny_gqa):
    """With prefix reuse the Baseline keeps each call's encoded prompt; a call that does not fit evicts the least
    recently used ones (a reuse counts as a use) until it does, so a program that fits without reuse fits with it,
    and gives the same tokens."""
    def program(bl, record=None):
        u = bl.prefill("one two three", role="user")
        a = bl.decode(parents=[u], max_tokens=8)
        b = bl.decode(parents=[bl.prefill("four", role="user")], max_tokens=8)
        c = bl.decode(parents=[u, a], max_tokens=4)  # reads a's cached prompt: a is used again after b
        if record is not None:
            assert list(bl._chains) == [b.id, a.id, c.id]
        d = bl.decode(parents=[bl.prefill("five six seven eight nine ten", role="user")], max_tokens=8)
        return [m.ids for m in (a, b, c, d)], (a.id, b.id, c.id)

    plain, _ = program(choreo.Baseline(tiny_gqa, capacity=70))
    bl = choreo.Baseline(tiny_gqa, capacity=70, prefix_reuse=True)
    evicted, evict = [], bl._evict_oldest
    bl._evict_oldest = lambda: evicted.append(next(iter(bl._chains))) or evict()
    tokens, (a, b, c) = program(bl, record=True)
    assert tokens == plain and bl.reused_tokens > 0
    # d's prompt shares only the user turn's header with the cached prompts; of those equal prefixes each try reads
    # (and refreshes) the earliest cached, a's, so b goes first, then c (whose own rows free; a's are read again).
    assert evicted == [b, c] and bl.evicted_chains == 2 and list(bl._chains) == [a, bl.messages[-1].id]
    assert bl.memory()["tokens_used"] == sum(m.length for m in bl._internal.values())
    e = bl.decode(parents=[bl.prefill("word " * 40, role="user")], max_tokens=2)  # needs most of the store
    assert list(bl._chains) == [e.id] and bl.memory()["tokens_used"] == bl._chains[e.id].parts[-1][1]
    with pytest.raises(CapacityError):  # a prompt longer than the store: refused as without reuse
        bl.decode(parents=[bl.prefill("word " * 70, role="user")], max_tokens=2)
    assert bl.memory()["tokens_used"] == 0 and not bl._chains  # (e was evicted trying)
