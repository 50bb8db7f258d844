"""Chat rendering, prompt masking and the truncation policy.

A record's messages are rendered once with the tokenizer's chat template. The character spans of
the assistant turns are found by rendering prefixes of the conversation (up to a turn with the
generation prompt, and up to the end of that turn), so every assistant turn is trained on,
whatever the template. The full text is then tokenized once, in batches, and a token is trained
on when its first character lies inside an assistant span.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from esft.data.records import DataFormatError, origin

IGNORE_INDEX = -100
TrainOn = Literal["assistant", "all"]
Truncation = Literal["right", "drop", "error"]


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str = "", first_turn: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the character spans of every assistant turn from
    turn `first_turn` on (earlier turns are context: a preference pair's shared history).

    A span covers the turn's content and the template's end-of-turn marker, so the model learns
    to stop. Raises `DataFormatError` when the template is not prefix-stable (it rewrites earlier
    turns when later ones are added), since no masking would then be exact.
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_turn:
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or start > len(upto):
            raise DataFormatError(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so "
                "assistant tokens cannot be masked exactly; use train_on='all' or another chat_template"
            )
        spans.append((start, len(upto)))
    return text, spans


def completion_example(prompt_ids: list[int], completion_ids: list[int]) -> dict[str, Any]:
    """A tokenized example from a prompt and its completion (rollouts, on-policy samples): the
    completion is trained on, the prompt is -100."""
    ids = list(prompt_ids) + list(completion_ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids), "length": len(ids)}


def _where(record: dict[str, Any], index: int) -> str:
    """Where a record came from (``file:line`` as the loader set it), else its id or position."""
    return str(origin(record) or record.get("id") or f"record {index}")


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: TrainOn = "assistant",
    truncation: Truncation = "right",
    batch_size: int = 1000,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenize records into ``{"input_ids", "labels", "length"}`` examples (labels -100 = not trained).

    A record's optional ``train_from_turn`` leaves the assistant turns before that index untrained.

    Truncation policy for examples longer than `max_length`: ``right`` keeps the first
    `max_length` tokens (counted in ``stats.truncated``), ``drop`` drops the example (counted),
    ``error`` raises, naming the record's ``file:line``. An example left with no trained token is
    dropped and counted. `progress` shows a progress bar (for large datasets).
    """
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; set data.chat_template "
            "(a Jinja template, or 'chatml')"
        )
    stats = TokenizeStats()
    examples = []
    bar = tqdm(total=len(records), desc="tokenizing", unit="rec", disable=not progress, leave=False)
    for lo in range(0, len(records), batch_size):
        bar.update(min(batch_size, len(records) - lo))
        chunk = records[lo : lo + batch_size]
        rendered = [assistant_spans(tokenizer, r["messages"], _where(r, lo + j), r.get("train_from_turn", 0))
                    for j, r in enumerate(chunk)]
        encoded = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=False,
            return_offsets_mapping=train_on == "assistant",
            return_attention_mask=False,
        )
        for j, (record, (_, spans)) in enumerate(zip(chunk, rendered)):
            ids = encoded["input_ids"][j]
            if train_on == "all":
                labels = list(ids)
            else:
                labels = [IGNORE_INDEX] * len(ids)
                for k, (start, _) in enumerate(encoded["offset_mapping"][j]):
                    if any(s <= start < e for s, e in spans):
                        labels[k] = ids[k]
            if len(ids) > max_length:
                if truncation == "error":
                    raise DataFormatError(f"{_where(record, lo + j)}: {len(ids)} tokens exceed max_length={max_length} (truncation='error')")
                if truncation == "drop":
                    stats.dropped["longer than max_length"] += 1
                    continue
                ids, labels = ids[:max_length], labels[:max_length]
                stats.truncated += 1
            trained = sum(label != IGNORE_INDEX for label in labels)
            if trained == 0:
                stats.dropped["no trained tokens (after truncation)"] += 1
                continue
            stats.examples += 1
            stats.tokens += len(ids)
            stats.trained_tokens += trained
            example = {"input_ids": ids, "labels": labels, "length": len(ids)}
            for key in ("task", "pair"):  # `pair`: the preference pair an example belongs to
                if key in record:
                    example[key] = record[key]
            examples.append(example)
    bar.close()
    return examples, stats
