"""Render single messages through the model's chat template.

Every message is encoded on its own, so the template is split into a per-role header and footer
around the content. Splitting with a sentinel keeps the result token-for-token equal to the template's
rendering of the whole conversation (tested), and never adds the default system prompt that some
templates (SmolLM2's) insert when a conversation lacks one. A token the template writes once at the start of
a conversation (Llama 3's ``<|begin_of_text|>``: ``prefix_ids``) belongs to no message: executors hold it
once, shared by every call (PROTOCOLS.md, "Engine facts").
"""

from __future__ import annotations

import functools

ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063CHOREO\u2063"
STOP_WINDOW = 16  # generated tokens whose text is searched for stop strings


def parse_role(role: str) -> tuple[str, str | None]:
    """'assistant:alice' -> ('assistant', 'alice'); raises ValueError for unknown roles."""
    if not isinstance(role, str) or not role:
        raise ValueError(f"role must be a non-empty string like 'user' or 'assistant:alice', got {role!r}")
    base, _, name = role.partition(":")
    if base not in ROLES:
        raise ValueError(f"unknown role {role!r}: the base role must be one of {ROLES}")
    if _ and not name:
        raise ValueError(f"role {role!r} has an empty name after ':'")
    return base, name or None


class ChatFormat:
    """Header/footer token ids per role, taken from the tokenizer's chat template.

    Example::

        fmt = ChatFormat(tokenizer)
        fmt.encode("What is 2+2?", "user")     # header + content + footer token ids
        fmt.header("assistant:alice")          # ids that open an assistant turn named alice
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat_template; choreo renders messages through it")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    @functools.cached_property
    def _prefix_text(self) -> str:
        """The BOS text the template writes once before the first turn, or "" (ChatML: every turn starts with
        the tokenizer's bos_token, so it is part of each turn, not a conversation prefix)."""
        bos = self.tokenizer.bos_token
        if not bos:
            return ""
        two = self._render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
        return bos if two.startswith(bos) and two.count(bos) == 1 else ""

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """Token ids the template writes once at the start of a conversation (a BOS token); [] for none."""
        return self._ids(self._prefix_text) if self._prefix_text else []

    @functools.cache
    def _split(self, role: str) -> tuple[str, str]:
        base, name = parse_role(role)
        turn = {"role": base, "content": _SENTINEL}
        if name is not None:
            named = self._split_turn({**turn, "name": name})
            # A template that ignores "name" renders it like the bare role: put the name in the role slot.
            return named if named != self._split(base) else self._split_turn({**turn, "role": role})
        return self._split_turn(turn)

    def _split_turn(self, turn: dict) -> tuple[str, str]:
        if turn["role"] == "system":
            text = self._render([turn]).removeprefix(self._prefix_text)
        else:
            contexts = [[{"role": "system", "content": "x"}]]
            if turn["role"].startswith("assistant"):
                contexts.append(contexts[0] + [{"role": "user", "content": "x"}])
            text, errors = None, []
            for context in contexts:  # some templates insist on user/assistant alternation
                try:
                    before, full = self._render(context), self._render(context + [turn])
                except Exception as error:  # jinja raises template-specific exception types
                    errors.append(error)
                    continue
                if full.startswith(before):
                    text = full[len(before):]
                    break
            if text is None:
                raise ValueError(f"cannot render a {turn['role']!r} turn with this chat template: {errors}")
        header, sep, footer = text.partition(_SENTINEL)
        assert sep, "chat template dropped the message content"
        return header, footer

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def header(self, role: str, prefix: str = "") -> list[int]:
        """Token ids that open a turn of ``role`` followed by a forced ``prefix``."""
        return self._ids(self._split(role)[0] + prefix)

    def footer(self, role: str) -> list[int]:
        """Token ids that close a turn (end-of-turn token first)."""
        return self._ids(self._split(role)[1])

    def encode(self, text: str, role: str) -> list[int]:
        """The whole turn: header + content + footer, tokenized as one string."""
        header, footer = self._split(role)
        return self._ids(header + text + footer)

    def stop_ids(self, role: str) -> frozenset[int]:
        """Tokens that end generation: the footer's first token and the tokenizer's EOS."""
        ids = set(self.footer(role)[:1])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def hits_stop(self, tokens, stop) -> bool:
        """Whether one of the ``stop`` strings occurs in the text of the last ``STOP_WINDOW`` generated tokens:
        the engine's check after each sampled token (and how a trace tells that a call ended on one)."""
        return bool(stop) and any(s in self.decode(list(tokens[-STOP_WINDOW:])) for s in stop)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
