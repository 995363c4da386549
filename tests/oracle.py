"""Independent oracles for the choreographed and the re-encoding executors (docs/semantics.md).

Nothing here touches choreo's engine, message store or attention backends. An oracle keeps its own record of
every message (``Turn``: token ids, start position, and the (parent, shift) pairs it attended to when it was
encoded) and recomputes each call with the Hugging Face model's own forward pass over an explicit token sequence,
with explicit position ids and an explicit 4-D additive mask (``block_mask``).

* ``Oracle`` -- choreographed semantics. A parent that a call reads at shift d (its effective start minus its own
  start) is an *instance* (message, d): the message's tokens at positions start + d ... RoPE is relative, so the
  instance has the hidden states the message had when it was encoded if it attends to what the message attended
  to, moved by d as well: the instances of its own parents at (their recorded shift + d), the BOS prefix at d, and
  causally itself. Its keys are then the cached keys rotated by d and its values the cached values, which is what
  an executor reads. The call's own tokens attend to its parents' instances, BOS at 0, and causally themselves.
* ``BaselineOracle`` -- ordinary chat prompting: plain causal attention over BOS + the parents' token ids ordered
  by effective start (ties: listed order) + the call's header.

Turns are rendered by hand as ChatML (``<|im_start|>role\\n`` content ``<|im_end|>\\n``), which both test
templates write; a named role (``assistant:bob``) sits in the role slot. Sampling uses choreo's ``sample`` and
per-call generator (``tests/test_sampling.py`` checks them against Hugging Face's warpers): a draw depends only on
the logits and the seed, so equal logits give equal tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from choreo.sampling import make_generator, sample


@dataclasses.dataclass(eq=False)
class Turn:
    """The oracle's record of one message."""

    ids: list[int]
    start: int
    parents: list[tuple["Turn", int]]  # (parent, the shift it was read at)
    content: tuple[int, int]  # [a, b) of ids
    logits: torch.Tensor | None = None  # (len(tokens), V) fp32 of a teacher-forced call

    @property
    def tokens(self) -> list[int]:
        return self.ids[self.content[0]:self.content[1]]


class Block(NamedTuple):
    """A run of tokens in the oracle's sequence: ids, their positions, and the blocks it attends to in full."""

    ids: list[int]
    positions: list[int]
    sees: list[int]  # indices of earlier blocks


def block_mask(blocks: list[Block]) -> torch.Tensor:
    """(N, N) bool, N = all tokens of all blocks: a block attends causally to itself, in full to the blocks it sees.

    Example: A = 2 tokens, B = 2 tokens that see A, C = 1 token that sees only B (not transitively A)::

             A0 A1 B0 B1 C0
        A0    1  .  .  .  .
        A1    1  1  .  .  .
        B0    1  1  1  .  .
        B1    1  1  1  1  .
        C0    .  .  1  1  1
    """
    first = [0]
    for b in blocks:
        first.append(first[-1] + len(b.ids))
    allowed = torch.zeros(first[-1], first[-1], dtype=torch.bool)
    for i, b in enumerate(blocks):
        rows = slice(first[i], first[i + 1])
        allowed[rows, rows] = torch.ones(len(b.ids), len(b.ids), dtype=torch.bool).tril()
        for j in b.sees:
            allowed[rows, first[j]:first[j + 1]] = True
    return allowed


class Oracle:
    """Choreographed semantics, recomputed by one dense-mask Hugging Face forward per call (per sampled token)."""

    def __init__(self, model, *, bos: bool):
        """``bos``: the chat template writes one BOS token before the whole conversation (Llama 3 style)."""
        self.hf, self.tok, self.dtype = model.hf_model, model.tokenizer, model.spec.dtype
        self.bos = [self.tok.bos_token_id] if bos else []
        self.floor = len(self.bos)  # default starts never fall inside the prefix
        self.stop_ids = {self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.eos_token_id}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    # -- placement
    def place(self, parents: list[Turn], offsets, new_offset) -> tuple[list[tuple[Turn, int]], int]:
        """(parent, shift) pairs and the new message's start (docs/semantics.md "Positions"): ``offsets[i]`` moves
        parent i to start there; the message starts at ``new_offset``, else at 1 + the largest position it attends to
        (0 without parents, or the first position after the BOS prefix)."""
        starts = [p.start if offsets is None or offsets[i] is None else offsets[i] for i, p in enumerate(parents)]
        if new_offset is None:
            new_offset = max([self.floor] + [s + len(p.ids) for p, s in zip(parents, starts)])
        return [(p, s - p.start) for p, s in zip(parents, starts)], new_offset

    # -- the sequence a call's tokens are computed in
    def blocks(self, placed: list[tuple[Turn, int]], own: list[int], start: int) -> list[Block]:
        """The instances the call's tokens depend on (each once, parents before children), then its own block.

        docs/semantics.md "prefill": tokens attend to all tokens of the listed parents, not transitively to the parents'
        parents, and causally to themselves; "Positions": a parent moved by d keeps its encoding, rotated by d,
        which is the encoding of the message and of everything it saw, all moved by d.
        """
        blocks, index = [], {}

        def add(key, ids, first, sees):
            if key not in index:
                blocks.append(Block(ids, list(range(first, first + len(ids))), sees))
                index[key] = len(blocks) - 1
            return index[key]

        def bos(shift):
            return [add(("bos", shift), self.bos, shift, [])] if self.bos else []

        def instance(msg, shift):
            if (id(msg), shift) not in index:
                sees = [instance(p, d + shift) for p, d in msg.parents] + bos(shift)
                add((id(msg), shift), msg.ids, msg.start + shift, sees)
            return index[(id(msg), shift)]

        sees = [instance(p, d) for p, d in placed] + bos(0)
        return blocks + [Block(own, list(range(start, start + len(own))), sees)]

    def logits(self, blocks: list[Block], rows: list[int]) -> torch.Tensor:
        """Logits (len(rows), V) in fp32 of the given rows of the last block: one forward of the HF decoder over
        all N tokens of ``blocks`` with their own position ids and the blocks' mask."""
        ids = torch.tensor([[t for b in blocks for t in b.ids]])  # (1, N)
        pos = torch.tensor([[p for b in blocks for p in b.positions]])  # (1, N)
        mask = torch.zeros(ids.shape[1], ids.shape[1], dtype=self.dtype)  # (N, N) additive
        mask.masked_fill_(~block_mask(blocks), torch.finfo(self.dtype).min)
        with torch.no_grad():
            h = self.hf.model(input_ids=ids, attention_mask=mask[None, None], position_ids=pos).last_hidden_state
            own = h[0, ids.shape[1] - len(blocks[-1].ids):]  # (S, hidden)
            return self.hf.lm_head(own[rows]).float()  # (len(rows), V)

    # -- verbs
    def prefill(self, text: str, role: str, parents: list[Turn], offsets=None, new_offset=None) -> Turn:
        """Only a record: the tokens are recomputed, as instances, wherever a later call reads them."""
        placed, start = self.place(parents, offsets, new_offset)
        if role == "raw":
            ids = self.encode(text)
            return Turn(ids, start, placed, (0, len(ids)))
        header, footer = self.encode(f"<|im_start|>{role}\n"), self.encode("<|im_end|>\n")
        ids = self.encode(f"<|im_start|>{role}\n{text}<|im_end|>\n")
        return Turn(ids, start, placed, (len(header), len(ids) - len(footer)))

    def decode(self, call: dict, parents: list[Turn]) -> Turn:
        """``call``: the keyword fields of ``choreo.Call`` (offsets as positions, parents given apart). Calls of a
        parallel batch never see each other, so each is computed alone. A turn ends at an end-of-turn token (not
        content), at ``max_tokens``, or once a stop string is in its generated text (all of it: no window)."""
        placed, start = self.place(parents, call.get("offsets"), call.get("new_offset"))
        header = self.encode(f"<|im_start|>{call.get('role', 'assistant')}\n" + call.get("prefix", ""))
        footer = self.encode("<|im_end|>\n")
        n = len(header)
        teacher = call.get("teacher_tokens")
        if teacher is not None:  # one pass; row i predicts token i + 1
            own = header + list(teacher) + footer
            logits = self.logits(self.blocks(placed, own, start), list(range(n - 1, n - 1 + len(teacher))))
            return Turn(own, start, placed, (n, n + len(teacher)), logits=logits)
        generator, stop = make_generator(call.get("seed", 0)), call.get("stop", ())
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        gen = []
        while True:
            logits = self.logits(self.blocks(placed, header + gen, start), [n + len(gen) - 1])[0]  # (V,)
            token = sample(logits, temperature=call.get("temperature", 0.0), top_p=call.get("top_p", 1.0),
                           generator=generator)
            if token in self.stop_ids:  # end of turn: not content
                break
            gen.append(token)
            if len(gen) >= call.get("max_tokens", 256):
                break
            if any(s in self.tok.decode(gen, skip_special_tokens=True) for s in stop):
                break
        return Turn(header + gen + footer, start, placed, (n, n + len(gen)))


class BaselineOracle(Oracle):
    """docs/semantics.md "Baseline executor": every call re-encodes from scratch a serial prompt of its parents'
    turns in position order (ties: listed order), then its header. Placement still gives the message's start."""

    def blocks(self, placed: list[tuple[Turn, int]], own: list[int], start: int) -> list[Block]:
        order = sorted(range(len(placed)), key=lambda i: (placed[i][0].start + placed[i][1], i))
        prompt = self.bos + [t for i in order for t in placed[i][0].ids]
        n = len(prompt)
        return [Block(prompt, list(range(n)), []), Block(own, list(range(n, n + len(own))), [0])]
