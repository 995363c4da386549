"""Render single messages through the model's chat template.

Every message is encoded on its own, so the template is split into a per-role header and footer
around the content. Splitting with a sentinel keeps the result token-for-token equal to the template's
rendering of the whole conversation (tested with ChatML, Llama 2, 3.0 and 3.1), with three differences by design:

- the default system prompt that some templates (SmolLM2's, Llama 3.1's date lines) insert when a conversation
  lacks a system message is never added;
- every system message is rendered as a conversation's first one (Llama 3.1 gives only the first its date lines);
- a template that strips each content's edge whitespace (Llama 3's ``| trim``) is detected, and ``encode`` strips
  the text too.

A template whose turn headers hold other messages' text (Mistral v0.3's puts the system prompt inside the last
user turn), or that drops or rewrites a content, is refused with a ``ValueError`` naming the role; templates that
insist on user/assistant alternation (Mistral v0.1's) work for those roles. A token the template writes once at
the start of a conversation (Llama 3's ``<|begin_of_text|>``: ``prefix_ids``) belongs to no message: executors hold
it once, shared by every call (docs/protocols.md, "Engine facts").
"""

from __future__ import annotations

import functools

ROLES = ("system", "user", "assistant")
_SENTINEL = "\u2063CHOREO\u2063"
_PROBE = " \u2063probe\u2063 \n"  # a content with edge whitespace: shows whether the template keeps it
# Extra tokens, beyond one per byte of the longest stop string, in the window searched for stop strings: room for
# a token that decodes to no text (a special token) or a leading space a tokenizer drops at the window's start.
STOP_SLACK = 4


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


def stop_window(stop) -> int:
    """How many trailing generated tokens ``hits_stop`` decodes for the stop strings ``stop`` (non-empty)."""
    return max(len(s.encode("utf-8")) for s in stop) + STOP_SLACK


class _Unusable(Exception):
    """A context after which a turn cannot be split from the template's rendering (the reason)."""


def _describe(context: tuple[str, ...] | None) -> str:
    return "alone" if context is None else "after a " + " + ".join(context) + " message"


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

    @functools.cached_property
    def _no_text(self) -> frozenset[int]:
        """Ids that ``decode`` drops (``skip_special_tokens``): the tokenizer's special tokens, its added tokens
        marked special included (``all_special_ids`` lists only the named ones: BOS, EOS, ...)."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return frozenset(self.tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    @functools.cached_property
    def _prefix_text(self) -> str:
        """The BOS text the template writes once before the first turn, or "" (ChatML: every turn starts with
        the tokenizer's bos_token, so it is part of each turn, not a conversation prefix). Read from a render of
        two user turns: a template that opens every user turn with BOS (Llama 2's ``bos_token + '[INST] '``)
        writes it twice there, though once in a two-message conversation; templates that render no such
        conversation are read from two messages."""
        bos = self.tokenizer.bos_token
        if not bos:
            return ""
        errors = []
        for conversation in (["user", "assistant", "user"], ["system", "user", "assistant", "user"],
                             ["system", "user"], ["user", "assistant"]):  # some have no system; some need one
            try:
                text = self._render([{"role": r, "content": f"x{k}"} for k, r in enumerate(conversation)])
            except Exception as error:  # jinja raises template-specific exception types
                errors.append(f"{error}")
                continue
            return bos if text.startswith(bos) and text.count(bos) == 1 else ""
        raise ValueError(f"the chat template renders none of the conversations tried (user/assistant/user, with a "
                         f"system message first, system/user, user/assistant): {'; '.join(errors)}")

    @functools.cached_property
    def prefix_ids(self) -> list[int]:
        """Token ids the template writes once at the start of a conversation (a BOS token); [] for none."""
        return self._ids(self._prefix_text) if self._prefix_text else []

    def _split(self, role: str) -> tuple[str, str]:
        """(header, footer): the template's text before and after a ``role`` message's content."""
        return self._layout(role)[:2]

    @functools.cache
    def _layout(self, role: str) -> tuple[str, str, bool]:
        """(header, footer, trims): ``trims`` when the template strips the content's edge whitespace (Llama 3's
        ``| trim``), which ``encode`` then does too."""
        base, name = parse_role(role)
        turn = {"role": base, "content": _SENTINEL}
        if name is not None:
            named = self._layout_turn({**turn, "name": name})
            # A template that ignores "name" renders it like the bare role: put the name in the role slot.
            return named if named != self._layout(base) else self._layout_turn({**turn, "role": role})
        return self._layout_turn(turn)

    def _layout_turn(self, turn: dict) -> tuple[str, str, bool]:
        """Split the template's rendering of ``turn`` after a short context. A context is used only if the turn's
        header and footer do not depend on it (Mistral v0.3's folds the system message into the next user turn)
        and the content comes back verbatim (or stripped, for a template that trims); templates that insist on
        user/assistant alternation get a context they accept."""
        base = turn["role"].partition(":")[0]
        if base == "system":
            contexts = [None]  # a conversation's first message: rendered alone
        elif base == "user":
            contexts = [("system",), ("user", "assistant")]
        else:
            contexts = [("system",), ("system", "user"), ("user",)]
        reasons = []
        for context in contexts:
            try:
                return self._layout_after(context, turn)
            except _Unusable as why:
                reasons.append(f"{_describe(context)}: {why}")
        raise ValueError(f"cannot render a {turn['role']!r} message on its own with this chat template "
                         f"({'; '.join(reasons)})")

    def _layout_after(self, context: tuple[str, ...] | None, turn: dict) -> tuple[str, str, bool]:
        """``_layout_turn`` after messages of the roles ``context`` (None: the turn rendered alone, after the
        conversation prefix); raises ``_Unusable`` with the reason the context does not work."""
        def text_of(content: str, filler: str = "x") -> str:
            """What the template adds for ``turn`` holding ``content``, after the context (its contents ``filler``)."""
            messages = [{"role": role, "content": filler} for role in context or ()]
            try:
                full = self._render(messages + [{**turn, "content": content}])
                before = self._render(messages) if context else self._prefix_text
            except Exception as error:  # jinja raises template-specific exception types
                raise _Unusable(f"the template raised {error}") from None
            if not full.startswith(before):
                raise _Unusable("the turn changes the text rendered before it")
            return full[len(before):]

        header, sep, footer = text_of(_SENTINEL).partition(_SENTINEL)
        if not sep:
            raise _Unusable("the template drops the message's content")
        if context and text_of(_SENTINEL, "y") != header + _SENTINEL + footer:
            raise _Unusable("the turn's header or footer holds the earlier messages' text")
        probe = text_of(_PROBE)
        if probe == header + _PROBE + footer:
            return header, footer, False
        if probe == header + _PROBE.strip() + footer:
            return header, footer, True
        raise _Unusable(f"the template rewrites the content ({_PROBE!r} became {probe[len(header):]!r})")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def header(self, role: str, prefix: str = "") -> list[int]:
        """Token ids that open a turn of ``role`` followed by a forced ``prefix``."""
        return self._ids(self._split(role)[0] + prefix)

    def footer(self, role: str) -> list[int]:
        """Token ids that close a turn (end-of-turn token first)."""
        return self._ids(self._split(role)[1])

    def encode(self, text: str, role: str) -> list[int]:
        """The whole turn: header + content + footer, tokenized as one string (the content stripped of edge
        whitespace where the template strips it)."""
        return self._ids("".join(self._turn(text, role)))

    def _turn(self, text: str, role: str) -> tuple[str, str, str]:
        """(header, content, footer) of a turn as the template renders it: the content stripped of edge whitespace
        where the template strips it."""
        header, footer, trims = self._layout(role)
        return header, text.strip() if trims else text, footer

    def encode_turn(self, text: str, role: str) -> tuple[list[int], tuple[int, int]]:
        r"""``encode(text, role)`` and the [a, b) index range of the text's tokens within it.

        Tokenized as one string, the turn usually splits into the header's own tokens, the text's and the footer's.
        A text can merge with the template's characters instead (the header's "\n" and a text's leading "\n" or
        " " become one token): then a token straddling the boundary counts as content, as it holds part of the text.

        Example (SmolLM2): ``encode_turn("\nHi", "user")`` -> (ids, (3, 5)), ``ids[3:5]`` the tokens "\n", "Hi";
        ``encode_turn("\n\nHi", "user")`` -> (ids, (2, 5)): ``ids[2]`` is "\n\n", the header's "\n" and one of
        the text's.
        """
        header, text, footer = self._turn(text, role)
        ids = self._ids(header + text + footer)
        h, f = self._ids(header), self._ids(footer)
        if len(h) + len(f) <= len(ids) and ids[:len(h)] == h and ids[len(ids) - len(f):] == f:
            return ids, (len(h), len(ids) - len(f))
        lo, hi = len(header), len(header) + len(text)  # the text's characters
        inside = [i for i, (a, b) in enumerate(self._token_spans(header + text + footer, ids)) if a < hi and b > lo]
        return ids, (inside[0], inside[-1] + 1)

    def _token_spans(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """The (start, end) character range of each token of ``ids``, the tokenization of ``text``: the fast
        tokenizer's offset mapping, or else (a slow tokenizer has none) the lengths of the decoded prefixes."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            enc = None
        if enc is not None and list(enc["input_ids"]) == ids:
            return [tuple(span) for span in enc["offset_mapping"]]
        ends = [len(self.tokenizer.decode(ids[:i + 1], clean_up_tokenization_spaces=False)) for i in range(len(ids))]
        return list(zip([0] + ends[:-1], ends))

    @functools.cache  # every decode call asks; the answer depends on the role only
    def stop_ids(self, role: str) -> frozenset[int]:
        """Tokens that end generation: the footer's first special token (ChatML's ``<|im_end|>``), or where it holds
        none its first added token (an end-of-turn token added to the vocabulary as a plain one), and the
        tokenizer's EOS. Never a footer's text: Llama 2's assistant turn ends ``' ' + eos``, and a bare space token
        would end every answer at its first number; a footer of a blank line, every answer at its first paragraph."""
        footer = self.footer(role)
        added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        end = next((t for t in footer if t in self._no_text), None)
        if end is None:  # an end-of-turn token added to the vocabulary as a plain one; never plain text ("\n\n")
            end = next((t for t in footer if t in added), None)
        return frozenset({end, self.tokenizer.eos_token_id} - {None})

    def check_stop(self, stop, role: str = "assistant") -> None:
        """ValueError naming the string unless every one of ``stop`` can match: a stop string holding a special
        token's text never does (``hits_stop`` reads the generated text, which has none)."""
        for s in stop:
            special = [t for t in self._ids(s) if t in self._no_text]
            if special:
                names = ", ".join(map(repr, self.tokenizer.convert_ids_to_tokens(special)))
                raise ValueError(f"stop string {s!r} holds the special token {names} (id {special[0]}): stop strings "
                                 f"match the generated text, which holds no special tokens, so it would never stop "
                                 f"the call (the end of a {role!r} turn, ids {sorted(self.stop_ids(role))}, "
                                 f"stops it already)")

    def hits_stop(self, tokens, stop) -> bool:
        """Whether one of the ``stop`` strings occurs in the text of the last generated tokens: the engine's check
        after each sampled token (and how a trace tells that a call ended on one).

        Checked after every token, a stop string first occurs ending in the newest token, so only a window at the
        end is decoded: the last ``stop_window(stop)`` tokens that have text (special tokens, which decode to none,
        are passed over: they would hide a string split around them), so the cost per token stays bounded however
        long the generation (unless it is mostly special tokens)."""
        if not stop:
            return False
        n, window = stop_window(stop), []
        for t in reversed(tokens):  # the last n tokens that have text: special ones decode to none
            if t not in self._no_text:
                window.append(t)
                if len(window) == n:
                    break
        text = self.decode(window[::-1])
        return any(s in text for s in stop)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
