"""Contexts: loading the library, placing a context in a chat, rendering it exactly.

A context is a text plus a placement. The teacher sees the prompt rendered with the context; the
student sees it without. Rendering goes through the model's own chat template, and a rendering
that would not fit is an error, never a silent truncation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError

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
    def from_text(cls, text: str, placement: str = "system") -> Context:
        """A context given inline; its id is a hash of its text and placement."""
        digest = hashlib.sha256(f"{placement}\n{text}".encode()).hexdigest()[:10]
        return cls(id=f"ctx-{digest}", text=text, placement=placement, family="inline")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tags"] = list(self.tags)
        return data


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of each mapping, for error messages."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping  # type: ignore[return-value]


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; mappings carry ``__line__``; errors name the file and line."""
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise FlipsearchError(f"{where}: malformed YAML ({problem})") from exc
    except UnicodeDecodeError as exc:
        raise FlipsearchError(f"{path}: not UTF-8 text") from exc


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


def _contexts_in_file(path: Path, strict: bool) -> list[tuple[Context, str]]:
    data = read_yaml(path)
    if isinstance(data, dict) and "contexts" in data:
        entries = data["contexts"]
        if not isinstance(entries, list):
            raise FlipsearchError(f"{path}:{data['__line__']}: 'contexts' must be a list")
        family = str(data.get("family") or path.stem)
        return [_parse_entry(entry, path, family) for entry in entries]
    if isinstance(data, dict) and ("text" in data or strict):
        return [_parse_entry(data, path, str(data.get("family") or path.stem))]
    if strict:
        raise FlipsearchError(
            f"{path}: expected a context (id, placement, text) or a contexts list"
        )
    return []


def _parse_entry(entry: Any, path: Path, family: str) -> tuple[Context, str]:
    if not isinstance(entry, dict):
        raise FlipsearchError(f"{path}: each context must be a mapping with id, placement, text")
    where = f"{path}:{entry.get('__line__', '?')}"
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise FlipsearchError(f"{where}: context has no text")
    context_id = entry.get("id")
    if not isinstance(context_id, str) or not context_id.strip():
        raise FlipsearchError(f"{where}: context has no id")
    tags = entry.get("tags") or []
    if not isinstance(tags, list):
        raise FlipsearchError(f"{where}: 'tags' must be a list")
    placement = entry.get("placement", "system")
    if placement not in PLACEMENTS:
        raise FlipsearchError(f"{where}: unknown placement {placement!r}; choose {PLACEMENTS}")
    context = Context(context_id.strip(), text.strip(), placement, family, tuple(map(str, tags)))
    return context, where


def context_from_arg(value: str, placement: str = "system") -> Context:
    """Interpret a ``--context`` value: a YAML file if one exists at that path, else the text."""
    path = Path(value)
    if value.endswith((".yaml", ".yml")) or path.is_file():
        contexts = load_contexts(path)
        if len(contexts) != 1:
            raise FlipsearchError(f"{path}: holds {len(contexts)} contexts; --context takes one")
        return contexts[0]
    return Context.from_text(value, placement)


def build_messages(prompt: str, context: Context | None) -> list[dict[str, str]]:
    """The chat the model sees: the student's (no context) or the teacher's.

    ``user_suffix`` joins as ``"{prompt}\\n\\n{context}"``, the form TRL's self-distillation
    trainer uses for its privileged context, so an exported dataset conditions identically.
    """
    if context is None:
        return [{"role": "user", "content": prompt}]
    if context.placement == "system":
        return [{"role": "system", "content": context.text}, {"role": "user", "content": prompt}]
    if context.placement == "user_prefix":
        return [{"role": "user", "content": f"{context.text}\n\n{prompt}"}]
    return [{"role": "user", "content": f"{prompt}\n\n{context.text}"}]


class Renderer:
    """Renders chats through a tokenizer's chat template and checks they fit."""

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int,
        max_length: int | None = None,
        chats: dict[str, list[dict[str, str]]] | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise FlipsearchError("the model's tokenizer has no chat template; use a chat model")
        self.tokenizer = tokenizer
        # Rendered prompt -> its messages, for a backend that sends messages (openai chat).
        self.chats = chats
        limit = max_length or _model_max_length(tokenizer)
        self.max_prompt_tokens = limit - max_new_tokens

    def render(self, prompt: str, context: Context | None = None) -> str:
        messages = build_messages(prompt, context)
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        if context is not None and context.text not in text:
            raise FlipsearchError(
                f"context {context.id!r}: the chat template dropped or altered it at placement "
                f"{context.placement!r}; try another placement"
            )
        length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > self.max_prompt_tokens:
            who = f"context {context.id!r}" if context is not None else "a prompt"
            raise FlipsearchError(
                f"{who}: rendered prompt is {length} tokens, over the {self.max_prompt_tokens} "
                "that fit beside the response (contexts are never truncated)"
            )
        if self.chats is not None:
            self.chats[text] = messages
        return text

    def render_all(self, prompts: Sequence[str], context: Context | None = None) -> list[str]:
        return [self.render(prompt, context) for prompt in prompts]


def _model_max_length(tokenizer: Any) -> int:
    value = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return 8192
