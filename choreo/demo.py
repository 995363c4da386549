"""A three-agent conversation run under both executors, printing transcripts and per-call timings."""

from __future__ import annotations

from .baseline import Baseline
from .choreographer import Choreographer
from .model import Model

AGENTS = {
    "alice": "You are Alice, an optimist. Answer in one short sentence.",
    "bob": "You are Bob, a sceptic. Answer in one short sentence.",
    "carol": "You are Carol, a mediator. Answer in one short sentence.",
}
TOPIC = "Should our town build a new library or a new park?"


def conversation(executor, *, rounds: int = 1, max_tokens: int = 40) -> list[tuple[str, object]]:
    """Each turn attends to its agent's own system prompt, the topic and every earlier public message.

    The system prompts are private: each is encoded alone from position 0, and the topic attends to none
    of them (it starts after the longest, so every agent reads its prompt, then the topic). Under the
    ``Choreographer`` a public message's cached keys and values were computed over its author's system
    prompt and what that turn attended to, and later agents read them as encoded; the ``Baseline``
    re-encodes each parent's token ids in every call, so an agent reads only the tokens of other agents' turns.

    Turns use the plain assistant role: SmolLM2's template has no name field, and a named role header
    (``assistant:alice``) makes the 135M model end its turn at once.
    """
    systems = {name: executor.prefill(text, role="system") for name, text in AGENTS.items()}
    topic = executor.prefill(TOPIC, role="user", new_offset=max(s.end for s in systems.values()))
    public, transcript = [topic], []
    for r in range(rounds):
        for i, name in enumerate(AGENTS):
            msg = executor.decode(role="assistant", parents=[systems[name], *public], max_tokens=max_tokens,
                                  temperature=0.8, seed=10 * r + i)
            public.append(msg)
            transcript.append((name, msg))
    return transcript


NOTE = ("The two transcripts differ from the first turn on: the topic was encoded once, after the longest system "
        "prompt, and every agent reads that cached encoding (choreographed) instead of re-encoding it right after "
        "its own prompt (baseline); the same seeds at T = 0.8 then draw from slightly different distributions.")


def run_demo(model: Model, *, rounds: int = 1, max_tokens: int = 40, attention: str | None = None) -> None:
    for label, executor in (("choreographed", Choreographer(model, attention=attention)),
                            ("baseline", Baseline(model, attention=attention))):
        print(f"\n=== {label} ===")
        for name, msg in conversation(executor, rounds=rounds, max_tokens=max_tokens):
            print(f"[{name}] (ttft {1000 * msg.ttft:.0f} ms, {len(msg.tokens)} tokens) {msg.text}")
        memory = executor.memory()
        if label == "baseline" and not memory["tokens_used"]:  # ids only: each prompt is encoded for its call
            print(f"cache: {memory['messages']} messages kept as token ids, no rows between calls")
        else:
            print(f"cache: {memory['messages']} messages, {memory['tokens_used']} tokens in the shared cache")
    print(f"\n{NOTE}")
