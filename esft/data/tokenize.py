"""Chat rendering, prompt masking and the truncation policy.

Masking, per chat template (trained tokens: every assistant turn's content and its end-of-turn
marker, never the prompts, the system text or the template's role headers):

- A template with ``{% generation %}`` blocks marks the trained text itself
  (transformers' ``return_assistant_tokens_mask``).
- Otherwise each assistant turn ``i`` is located by rendering the conversation up to ``i`` with the
  generation prompt (the turn starts where that ends) and up to the end of ``i``. Where the
  prompt is not a prefix of the turn's rendering (Mistral moves the system prompt), the turn
  starts where the rendering with a placeholder answer departs from it (with the whitespace
  before it, unless the generation prompt ends in whitespace). The span ends after the
  end-of-turn marker (`END_OF_TURN_MARKERS`, or the tokenizer's EOS); whitespace and markers
  after it are scaffolding.
- Templates that rewrite history (Qwen3 and DeepSeek-R1 drop the reasoning of earlier turns)
  render a turn differently once later turns follow. Each assistant turn is then trained against
  the conversation as rendered when that turn is the last one; turns whose rendering is a prefix
  of a later one share that example, so a history-stable template gives one example per record.
  `multiturn="last"` keeps only the example of the whole conversation (the last turn and any
  earlier turn it renders unchanged).

The texts are tokenized in batches, and a token is trained on when it overlaps a trained span
(a token that straddles the start of an answer, like Mistral's " answer", is one the model must
produce).

Speed: at a million conversations the renders dominate, so `ChatRenderer` renders with the chat
template compiled once, skipping ``apply_chat_template``'s per-call message normalisation (same
text, about 3x faster for short chats); fast tokenizers encode through their Rust backend in
batches; the trained tokens of a span are found by binary search over the token offsets.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import TemplateError
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from esft.data.records import DataFormatError, origin
from esft.models.chat_templates import END_OF_TURN_MARKERS

IGNORE_INDEX = -100
TrainOn = Literal["assistant", "all"]
Truncation = Literal["right", "drop", "error"]
MultiTurn = Literal["per_turn", "last"]
Span = tuple[int, int]
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PLACEHOLDER = "\ue000"  # a private-use character: no answer starts with it


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    system_not_rendered: int = 0  # records whose system text the template leaves out (not counted for generation-block templates)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def merge(self, other: "TokenizeStats") -> None:
        """Add the counts of `other` (the same source tokenized in parts)."""
        for name in ("examples", "tokens", "trained_tokens", "truncated", "system_not_rendered"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped += other.dropped


class ChatRenderer:
    """``tokenizer.apply_chat_template(messages, tokenize=False)``, with the template compiled once.

    ``apply_chat_template`` normalises every message object on every call, which costs twice the
    render itself for short chats; records here are plain ``{"role", "content"}`` dicts already.
    The template is compiled by transformers' own (cached) compiler, so it sees the same Jinja
    environment and the same special-token variables. Where that compiler is not importable
    (another transformers version) the renderer calls ``apply_chat_template``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.template = _compile_jinja_template(tokenizer.chat_template)
        except (ImportError, AttributeError, TypeError):
            self.template = None
        self.variables = dict(tokenizer.special_tokens_map)

    def __call__(self, messages: list[dict], generation_prompt: bool = False) -> str:
        if self.template is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=generation_prompt, **self.variables)


def has_generation_blocks(template: str | None) -> bool:
    """Whether a chat template marks assistant text with ``{% generation %}`` blocks."""
    return bool(template and _GENERATION_BLOCK.search(template))


class _TurnEnd:
    """Cuts a turn's span after its end-of-turn marker (what follows is scaffolding)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        markers = set(END_OF_TURN_MARKERS) | ({tokenizer.eos_token} if tokenizer.eos_token else set())
        alternatives = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))
        self.marker = re.compile(alternatives)
        self.tail = re.compile(rf"(?:\s|{alternatives})*")

    def __call__(self, text: str, start: int, end: int) -> int:
        for match in self.marker.finditer(text, start, end):
            if self.tail.fullmatch(text, match.end(), end):
                return match.end()
        return end


def _turn(render: ChatRenderer, messages: list[dict], i: int, turn_end: _TurnEnd) -> tuple[str, int, int]:
    """The conversation up to assistant turn `i`, as rendered with `i` last, and the turn's span in it."""
    text = render(messages[: i + 1])
    prompt = render(messages[:i], generation_prompt=True) if i else None
    if prompt is not None and text.startswith(prompt):
        start = len(prompt)
    else:
        probe = render([*messages[:i], {**messages[i], "content": _PLACEHOLDER}])
        start = len(os.path.commonprefix([text, probe]))
        # whitespace before the answer is the answer's unless the generation prompt ends with it
        # (Mistral's " answer" after "[/INST]"; ChatML's "\n" after "assistant" stays prompt)
        before = len(text[:start]) - len(text[:start].rstrip())
        after_prompt = len(prompt) - len(prompt.rstrip()) if prompt else 0
        start -= max(0, before - after_prompt)
    return text, start, turn_end(text, start, len(text))


def assistant_examples(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], multiturn: MultiTurn = "per_turn",
    turn_end: _TurnEnd | None = None, first_turn: int = 0, render: ChatRenderer | None = None,
) -> list[tuple[str, list[Span]]]:
    """Training texts for one conversation, each with the character spans to train on; assistant
    turns before message `first_turn` are context only (a preference pair's shared history).

    One text when the template renders earlier turns the same as later turns are added; else
    one per group of assistant turns that render alike (see the module docstring).
    """
    turn_end = turn_end or _TurnEnd(tokenizer)
    render = render or ChatRenderer(tokenizer)
    turns = [_turn(render, messages, i, turn_end) for i, m in enumerate(messages)
             if m["role"] == "assistant" and i >= first_turn]
    groups: list[tuple[str, list[Span]]] = []  # the latest turn's first
    for text, start, end in reversed(turns):
        home = next((g for g in groups if g[0].startswith(text[:end])), None)
        if home is not None:
            home[1].insert(0, (start, end))
        elif multiturn == "per_turn" or not groups:
            groups.append((text, [(start, end)]))
    return groups[::-1]


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """`ids` where the token overlaps a span (starts before its end, ends after its start), else
    `IGNORE_INDEX`. Token offsets are in order, so each span's tokens are one binary search away."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    for s_span, e_span in spans:
        lo, hi = bisect.bisect_right(ends, s_span), bisect.bisect_left(starts, e_span)
        labels[lo:hi] = ids[lo:hi]
    return labels


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], offsets: bool) -> tuple[list[list[int]], list | None]:
    """Token ids (and character offsets) of `texts`, no special tokens added. A fast tokenizer
    whose backend neither truncates nor pads encodes through the backend directly (the same ids
    as ``tokenizer(texts)``, without its per-call conversion); others through ``tokenizer``."""
    backend = getattr(tokenizer, "_tokenizer", None) if tokenizer.is_fast else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings] if offsets else None
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False)
    return encoded["input_ids"], encoded["offset_mapping"] if offsets else None


def completion_example(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, Any]:
    """A tokenized example from a prompt and its completion (rollouts, on-policy samples): the
    completion is trained on, the prompt is -100."""
    ids = list(prompt_ids) + list(completion_ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids), "length": len(ids)}


def _where(record: dict[str, Any], index: int) -> str:
    """Where a record came from (``file:line`` as the loader set it), else its id or position."""
    return str(origin(record) or record.get("id") or f"record {index}")


def _system_text(messages: list[dict]) -> str:
    return " ".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())


def _encode_chunk(
    tokenizer: PreTrainedTokenizerBase, chunk: Sequence[dict[str, Any]], wheres: list[str], train_on: TrainOn,
    multiturn: MultiTurn, stats: TokenizeStats,
) -> list[tuple[int, list[int], list[int]]]:
    """``(index in chunk, input_ids, labels)`` for every training example of `chunk`'s records."""
    if train_on == "assistant" and has_generation_blocks(tokenizer.chat_template):
        out = []
        for j, (record, where) in enumerate(zip(chunk, wheres)):
            try:
                enc = tokenizer.apply_chat_template(record["messages"], return_dict=True, return_assistant_tokens_mask=True)
            except TemplateError as e:
                raise DataFormatError(f"{where}: chat template error: {e}") from e
            ids = list(enc["input_ids"])
            out.append((j, ids, [t if m else IGNORE_INDEX for t, m in zip(ids, enc["assistant_masks"])]))
        return out
    turn_end, render = _TurnEnd(tokenizer), ChatRenderer(tokenizer)
    pieces = []  # (index in chunk, text, spans)
    for j, (record, where) in enumerate(zip(chunk, wheres)):
        try:
            if train_on == "all":
                examples = [(render(record["messages"]), [])]
            else:
                examples = assistant_examples(tokenizer, record["messages"], multiturn, turn_end,
                                              record.get("train_from_turn", 0), render)
        except TemplateError as e:
            raise DataFormatError(f"{where}: chat template error: {e}") from e
        system = _system_text(record["messages"])
        if system and any(system not in text for text, _ in examples):
            stats.system_not_rendered += 1
        pieces += [(j, text, spans) for text, spans in examples]
    if not pieces:
        return []
    all_ids, all_offsets = _encode(tokenizer, [text for _, text, _ in pieces], offsets=train_on == "assistant")
    out = []
    for k, (j, _, spans) in enumerate(pieces):
        ids = all_ids[k]
        labels = list(ids) if train_on == "all" else _labels(ids, all_offsets[k], spans)
        out.append((j, ids, labels))
    return out


def iter_examples(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: TrainOn = "assistant",
    truncation: Truncation = "right",
    multiturn: MultiTurn = "per_turn",
    stats: TokenizeStats | None = None,
    batch_size: int = 1000,
    first_index: int = 0,
) -> Iterator[tuple[int, list[int], list[int]]]:
    """``(record index, input_ids, labels)`` for every training example of `records`, after the
    truncation policy (see `tokenize_records`), counting into `stats`. `first_index` is the index
    of ``records[0]`` in its source, for positions named in errors."""
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set data.chat_template "
            "(a family name such as 'chatml' or 'llama3', a .jinja file, or a Jinja template)"
        )
    stats = stats if stats is not None else TokenizeStats()
    for lo in range(0, len(records), batch_size):
        chunk = records[lo : lo + batch_size]
        wheres = [_where(r, first_index + lo + j) for j, r in enumerate(chunk)]
        for j, ids, labels in _encode_chunk(tokenizer, chunk, wheres, train_on, multiturn, stats):
            if len(ids) > max_length:
                if truncation == "error":
                    raise DataFormatError(f"{wheres[j]}: {len(ids)} tokens exceed max_length={max_length} (truncation='error')")
                if truncation == "drop":
                    stats.dropped["longer than max_length"] += 1
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                stats.truncated += 1
            trained = len(labels) - labels.count(IGNORE_INDEX)
            if trained == 0:
                stats.dropped["no trained tokens (after truncation)"] += 1
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            stats.trained_tokens += trained
            yield lo + j, ids, labels


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: TrainOn = "assistant",
    truncation: Truncation = "right",
    batch_size: int = 1000,
    progress: bool = False,
    multiturn: MultiTurn = "per_turn",
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize records into ``{"input_ids", "labels", "length"}`` examples (labels -100 = not trained).

    A record gives one example, or one per group of assistant turns when its template rewrites
    earlier turns (`multiturn`, see the module docstring); its optional ``train_from_turn`` leaves
    the assistant turns before that message index untrained. Truncation policy for examples longer
    than `max_length`: ``right`` keeps the first `max_length` tokens (counted in
    ``stats.truncated``), ``drop`` drops the example (counted), ``error`` raises, naming the
    record's ``file:line``. An example left with no trained token is dropped and counted.
    `progress` shows a progress bar (for large datasets).
    """
    stats = TokenizeStats()
    examples = []
    bar = tqdm(total=len(records), desc="tokenizing", unit="rec", disable=not progress, leave=False)
    for lo in range(0, len(records), batch_size):
        chunk = records[lo : lo + batch_size]
        for j, ids, labels in iter_examples(chunk, tokenizer, max_length, train_on, truncation, multiturn, stats,
                                            batch_size, first_index=lo):
            record = chunk[j]
            example = {"input_ids": ids, "labels": labels, "length": len(ids)}
            for key in ("task", "pair"):  # `pair`: the preference pair an example belongs to
                if key in record:
                    example[key] = record[key]
            examples.append(example)
        bar.update(len(chunk))
    bar.close()
    return examples, stats
