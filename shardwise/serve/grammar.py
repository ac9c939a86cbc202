"""Structured output: grammars compiled by llguidance, and the token mask they give each step.

The server turns ``response_format`` (a JSON schema, or any JSON object) and tool calls
(:mod:`.tools`) into one llguidance grammar (a JSON text; :func:`json_grammar`,
:func:`lark_grammar`), checked before the request is accepted, so a schema llguidance cannot compile
is a 400 that says why. Rank 0 holds one :class:`Constraint` per constrained sequence: before each
step that samples it, :meth:`Constraint.mask` is the packed bitmask of the tokens the grammar allows
next (one bit per token of the model's vocabulary; :mod:`shardwise.sampling` applies it to every
rank's slice of the logits); after the step, :meth:`Constraint.advance` feeds it the sampled token.
A grammar that is complete (nothing but the end may follow) finishes its sequence at once.

JSON is generated compactly, with the separators ``", "`` and ``": "`` and no other whitespace, so
a small model cannot wander into endless newlines. ``strict`` schemas must use only keywords
llguidance implements (an unknown one is a 400); non-strict schemas ignore the unknown keywords.
The matcher's tokenizer (:class:`Grammars`) is built from the model's Hugging Face tokenizer on
rank 0, in a thread started with the engine (about a second for SmolLM2), so that the first
constrained request does not stall the steps of the others.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Callable

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message says why."""


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a serve install has it
        raise GrammarError("structured output needs llguidance: pip install "
                           "'shardwise[serve]'") from None
    return llguidance


def check(grammar: str) -> str:
    """``grammar`` if llguidance accepts it; raises :class:`GrammarError` with its reason."""
    err = _llg().LLMatcher.validate_grammar(grammar)
    if err:
        raise GrammarError(err.strip().splitlines()[0])
    return grammar


def json_grammar(schema: dict[str, Any] | None, *, strict: bool = True) -> str:
    """The grammar of JSON texts valid under ``schema`` (``None``: any JSON object)."""
    opts = dict(JSON_STYLE, lenient=not strict)
    try:
        g = _llg().LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema, defaults=opts)
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from None
    return check(g)


def lark_grammar(lark: str) -> str:
    """The grammar of a Lark-like text (llguidance's syntax, with ``%json {schema}``)."""
    return check(_llg().LLMatcher.grammar_from_lark(lark))


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


def lark_json(schema: dict[str, Any] | None, *, strict: bool = True) -> str:
    """A ``%json`` item of a Lark grammar: JSON valid under ``schema``, compact."""
    s = {"type": "object"} if schema is None else dict(schema)
    own = s.get("x-guidance")
    s["x-guidance"] = {**JSON_STYLE, "lenient": not strict, **(own if isinstance(own, dict)
                                                               else {})}
    try:
        return "%json " + json.dumps(s)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"the schema is not JSON: {e}") from None


class Constraint:
    """One sequence's grammar state on rank 0."""

    def __init__(self, matcher: Any, words: int) -> None:
        self.matcher, self.words = matcher, words

    def mask(self) -> bytes:
        """The packed mask of the tokens allowed next: ``words`` little-endian int32."""
        return self.matcher.compute_bitmask()[:4 * self.words]

    def advance(self, token: int) -> bool:
        """Feed the sampled token; returns whether the grammar is complete. A token the mask
        forbade (it cannot happen) raises."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")
        return self.matcher.is_stopped()

    def copy(self) -> "Constraint":
        """The same grammar in the same state, to advance on its own."""
        return Constraint(self.matcher.deep_copy(), self.words)


class Grammars:
    """Rank 0's factory of :class:`Constraint` s for one model (tokenizer built on first use)."""

    def __init__(self, load: Callable[[], Any], *, vocab: int, eos_ids: list[int]) -> None:
        self._load, self.vocab, self.eos_ids = load, vocab, eos_ids
        self._tok: Any = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Build the tokenizer in the background (errors surface at the first request)."""
        def build() -> None:
            try:
                self._tokenizer()
            except Exception:  # noqa: BLE001 - the first constrained request reports it
                pass
        threading.Thread(target=build, daemon=True, name="grammar-tokenizer").start()

    def _tokenizer(self) -> Any:
        """llguidance's view of the model's tokenizer, with the same end-of-sequence ids as the
        server (the config's and the tokenizer's)."""
        with self._lock:
            if self._tok is None:
                import llguidance.hf
                hf = self._load()
                eos = sorted(set(self.eos_ids) | ({hf.eos_token_id} - {None}))
                self._tok = llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab,
                                                         eos_token=eos or None)
            return self._tok

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher of ``grammar``; raises :class:`GrammarError`."""
        llg = _llg()
        m = llg.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error().strip().splitlines()[0])
        from ..sampling import mask_words
        return Constraint(m, mask_words(self.vocab))
