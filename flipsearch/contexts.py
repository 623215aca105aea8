"""Contexts: loading the library, placing a context in a chat, rendering it exactly.

A context is a text plus a placement. The teacher sees the prompt rendered with the context; the
student sees it without. Everything that knows how a context enters a chat is here: the one
placement rule (``user_turn`` and ``build_messages``), the one id rule (``make_id``), the one
reader of a context's fields (``Context.from_dict``). Rendering goes through the model's own
chat template, and a rendering that would not fit is an error, never a silent truncation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_yaml

PLACEMENTS = ("system", "user_prefix", "user_suffix")


@dataclass(frozen=True)
class Context:
    """A privileged safety context: ``text`` shown to the teacher at ``placement``."""

    id: str
    text: str
    placement: str = "system"
    family: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise FlipsearchError(
                f"context {self.id!r}: unknown placement {self.placement!r}; choose {PLACEMENTS}"
            )
        if not self.text.strip():
            raise FlipsearchError(f"context {self.id!r} has no text")

    @classmethod
    def from_text(
        cls,
        text: str,
        placement: str = "system",
        prefix: str = "ctx",
        family: str = "inline",
        tags: Sequence[str] = (),
    ) -> Context:
        """A context made from its text; its id is ``prefix-`` + a hash of text and placement."""
        return cls(make_id(prefix, placement, text), text, placement, family, tuple(tags))

    @classmethod
    def composed(
        cls, text: str, placement: str, prefix: str, family: str, tags: Sequence[str] = ()
    ) -> Context:
        """A generated context (grammar, proposer). At ``user_suffix`` it is set off from the
        prompt in parentheses, so it reads as a note rather than part of the request."""
        if placement == "user_suffix":
            text = f"({text})"
        return cls.from_text(text, placement, prefix, family, tags)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "", family: str = "") -> Context:
        """A context from its fields (a YAML entry, a study's record); errors name ``where``."""
        at = f"{where}: " if where else ""
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise FlipsearchError(f"{at}context has no text")
        context_id = data.get("id")
        if not isinstance(context_id, str) or not context_id.strip():
            raise FlipsearchError(f"{at}context has no id")
        tags = data.get("tags") or []
        if not isinstance(tags, list | tuple):
            raise FlipsearchError(f"{at}'tags' must be a list")
        placement = data.get("placement", "system")
        if not isinstance(placement, str) or placement not in PLACEMENTS:
            raise FlipsearchError(f"{at}unknown placement {placement!r}; choose {PLACEMENTS}")
        chosen_family = str(data.get("family") or family)
        return cls(context_id, text, placement, chosen_family, tuple(map(str, tags)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data


def make_id(prefix: str, placement: str, text: str) -> str:
    """A context's stable id: the same text at the same placement always has the same id."""
    digest = hashlib.sha256(f"{placement}\n{text}".encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def default_contexts_dir() -> Path:
    return data_path("contexts")


def load_contexts(source: str | Path | None = None) -> list[Context]:
    """Load seed contexts from a directory of family files, or from one file.

    A family file has ``family``, ``description`` and a list ``contexts`` of entries with
    ``id``, ``text``, ``placement`` and optional ``tags``. A single-context file (like a run's
    ``best_context.yaml``) has ``id``, ``text`` and ``placement`` at the top level. Files
    without a ``contexts`` list or a ``text`` (the search grammar, for instance) are skipped.
    """
    root = Path(source) if source is not None else default_contexts_dir()
    if not root.exists():
        raise FlipsearchError(f"context path {root} does not exist")
    files = sorted(root.rglob("*.y*ml")) if root.is_dir() else [root]
    contexts: list[Context] = []
    origin: dict[str, str] = {}
    for path in files:
        for context, where in _contexts_in_file(path, strict=not root.is_dir()):
            if context.id in origin:
                raise FlipsearchError(
                    f"{where}: duplicate context id {context.id!r} (also at {origin[context.id]})"
                )
            origin[context.id] = where
            contexts.append(context)
    if not contexts:
        raise FlipsearchError(f"{root}: no contexts found")
    return contexts


# The keys a hand-written context file may hold (``measured``: what a run wrote beside its
# winner in best_context.yaml); any other key is a typo that would silently change nothing.
_ENTRY_KEYS = {"id", "text", "placement", "tags", "family", "description", "measured"}
_FAMILY_KEYS = {"family", "description", "contexts"}


def _contexts_in_file(path: Path, strict: bool) -> list[tuple[Context, str]]:
    data = read_yaml(path)
    if isinstance(data, dict) and "contexts" in data:
        at = f"{path}:{data['__line__']}"
        entries = data["contexts"]
        if not isinstance(entries, list):
            raise FlipsearchError(f"{at}: 'contexts' must be a list")
        _known_keys(data, _FAMILY_KEYS, f"{at}: the family file")
        family = _family(data, path.stem, at)
        return [_parse_entry(entry, path, family, i) for i, entry in enumerate(entries, 1)]
    if strict and isinstance(data, dict) and "grammar" in data:
        raise FlipsearchError(f"{path}: this is a context grammar; give it with --grammar")
    if isinstance(data, dict) and ("text" in data or strict):
        where = f"{path}:{data['__line__']}"
        return [_parse_entry(data, path, _family(data, path.stem, where), 1)]
    if strict:
        raise FlipsearchError(
            f"{path}: expected a context (id, placement, text) or a contexts list"
        )
    return []


def _family(data: dict[str, Any], default: str, at: str) -> str:
    family = data.get("family")
    if family is not None and not isinstance(family, str):
        raise FlipsearchError(f"{at}: 'family' must be text, got {type(family).__name__}")
    return family.strip() if family else default


def _known_keys(data: dict[str, Any], known: set[str], at: str) -> None:
    unknown = sorted(str(k) for k in data if k != "__line__" and k not in known)
    if unknown:
        raise FlipsearchError(f"{at}: unknown key(s) {unknown}; expected {sorted(known)}")


def _parse_entry(entry: Any, path: Path, family: str, number: int) -> tuple[Context, str]:
    if not isinstance(entry, dict):
        raise FlipsearchError(
            f"{path}: context #{number} must be a mapping with id, placement, text, "
            f"got {type(entry).__name__}"
        )
    where = f"{path}:{entry.get('__line__', '?')}"
    _known_keys(entry, _ENTRY_KEYS, where)
    family = _family(entry, family, where)
    tags = entry.get("tags")
    if isinstance(tags, list) and not all(isinstance(t, str | int | float) for t in tags):
        raise FlipsearchError(f"{where}: 'tags' must be a list of words, like [short, polite]")
    # Hand-written files: surrounding white space is layout, not part of the id or the text.
    cleaned = {k: v.strip() if isinstance(v, str) else v for k, v in entry.items()}
    return Context.from_dict({**cleaned, "family": family}, where), where


def context_from_arg(value: str, placement: str = "system") -> Context:
    """Interpret a ``--context`` value: a YAML file if one exists at that path, else the text."""
    path = Path(value)
    if value.endswith((".yaml", ".yml")) or path.is_file():
        contexts = load_contexts(path)
        if len(contexts) != 1:
            raise FlipsearchError(f"{path}: holds {len(contexts)} contexts; --context takes one")
        return contexts[0]
    return Context.from_text(value, placement)


def user_turn(prompt: str, context: Context | None) -> str:
    """The last user turn's text: the prompt, with a ``user_*`` context joined to it.

    ``user_suffix`` joins as ``"{prompt}\n\n{context}"``, the form TRL's self-distillation
    trainer uses for its privileged context, so an exported dataset conditions identically.
    """
    if context is None or context.placement == "system":
        return prompt
    if context.placement == "user_prefix":
        return f"{context.text}\n\n{prompt}"
    return f"{prompt}\n\n{context.text}"


def build_messages(prompt: str, context: Context | None) -> list[dict[str, str]]:
    """The chat the model sees: the student's (no context) or the teacher's."""
    user = {"role": "user", "content": user_turn(prompt, context)}
    if context is not None and context.placement == "system":
        return [{"role": "system", "content": context.text}, user]
    return [user]


class Rendered(str):
    """A rendered prompt: the exact text the model sees (a ``str``, so it keys the cache and
    tokenizes like one), carrying the chat it was rendered from for backends that send
    messages instead of text (the openai backend's chat endpoint)."""

    messages: tuple[dict[str, str], ...]

    def __new__(cls, text: str, messages: Sequence[dict[str, str]] = ()) -> Rendered:
        rendered = super().__new__(cls, text)
        rendered.messages = tuple(messages)
        return rendered

    @property
    def text(self) -> str:
        return str(self)


class Renderer:
    """Renders chats through a tokenizer's chat template and checks they fit."""

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int,
        max_length: int | None = None,
        template_args: dict[str, Any] | None = None,
    ) -> None:
        """``max_new_tokens``: the response tokens a prompt must leave room for (with a
        thinking budget, the reasoning's too); ``template_args``: the chat template's own
        arguments (``--chat-template-arg``, e.g. Qwen3's ``enable_thinking``)."""
        if not getattr(tokenizer, "chat_template", None):
            raise FlipsearchError("the model's tokenizer has no chat template; use a chat model")
        self.tokenizer = tokenizer
        self.template_args = dict(template_args or {})
        limit = max_length or _model_max_length(tokenizer)
        self.max_prompt_tokens = limit - max_new_tokens

    def render(self, prompt: str, context: Context | None = None) -> Rendered:
        rendered = self.render_chat(build_messages(prompt, context))
        text = str(rendered)
        if context is not None and context.text not in text:
            raise FlipsearchError(
                f"context {context.id!r}: the chat template dropped or altered it at placement "
                f"{context.placement!r}; try another placement"
            )
        length = self._length(text)
        if length > self.max_prompt_tokens:
            who = f"context {context.id!r}" if context is not None else "a prompt"
            raise FlipsearchError(
                f"{who}: rendered prompt is {length} tokens, over the {self.max_prompt_tokens} "
                "that fit beside the response (contexts are never truncated)"
            )
        return rendered

    def count_tokens(self, prompt: str, context: Context | None = None) -> int:
        """Tokens of ``prompt`` rendered as the model sees it (no fit check), for
        ``prompts.check_prompt_lengths`` against ``max_prompt_tokens``."""
        return self._length(str(self.render_chat(build_messages(prompt, context))))

    def _length(self, text: str) -> int:
        # verbose=False: an over-long text is reported by the caller, not by a library warning.
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def render_chat(self, messages: Sequence[dict[str, str]]) -> Rendered:
        """Any chat through the chat template, ready for generation (no fit check)."""
        try:
            text: str = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True, **self.template_args
            )
        except Exception as exc:  # jinja2 raises its own errors for a template's complaints
            if not self.template_args:
                raise
            raise FlipsearchError(
                f"the chat template fails with --chat-template-arg {self.template_args}: {exc}"
            ) from exc
        return Rendered(text, messages)

    def render_all(self, prompts: Sequence[str], context: Context | None = None) -> list[Rendered]:
        return [self.render(prompt, context) for prompt in prompts]


def _model_max_length(tokenizer: Any) -> int:
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return 8192
