r"""Chat templates of the main open model families, and the `chat_template` option that picks one.

The Jinja files under ``templates/`` are written for this project to reproduce the formats the
families publish (special tokens, system handling, history rewriting), without tool calling:

- ``chatml``: ``<|im_start|>role\n...<|im_end|>\n`` (the built-in tokenizer's template).
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>``, contents trimmed.
- ``qwen2.5``: ChatML; Qwen's default system prompt when the conversation has none.
- ``qwen3``: ChatML; ``<think>`` blocks kept only after the last user turn (the final assistant
  turn always gets one, empty when it has no reasoning).
- ``deepseek_r1``: ``<｜User｜>`` / ``<｜Assistant｜>`` turns, ``<｜end▁of▁sentence｜>``; earlier
  turns lose their reasoning.
- ``gemma``: ``<start_of_turn>user|model\n...<end_of_turn>\n``; no system role, the system
  text is folded into the first user turn.
- ``mistral``: v0.3 ``[INST] ...[/INST] answer</s>``; the system text precedes the last user
  turn only when the conversation ends there.
- ``phi3``: ``<|system|>``, ``<|user|>``, ``<|assistant|>`` headers, ``<|end|>`` after each turn.

``qwen3`` and ``deepseek_r1`` render earlier turns differently once later ones follow, and
``mistral``'s generation prompt is not a prefix of the answered conversation; `esft.data.tokenize`
masks them exactly all the same (one example per assistant turn where the history changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from esft.models.tokenizer import CHATML_TEMPLATE

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Family:
    """A family's template file, the tokens it needs as single tokens, and its end-of-turn marker."""

    file: str | None
    special_tokens: tuple[str, ...]
    end_of_turn: str

    def template(self) -> str:
        return CHATML_TEMPLATE if self.file is None else (TEMPLATES_DIR / self.file).read_text(encoding="utf-8")


FAMILIES: dict[str, Family] = {
    "chatml": Family(None, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "llama3": Family("llama3.jinja", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "qwen2.5": Family("qwen2.5.jinja", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "qwen3": Family("qwen3.jinja", ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "deepseek_r1": Family(
        "deepseek_r1.jinja", ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"),
        "<｜end▁of▁sentence｜>",
    ),
    "gemma": Family("gemma.jinja", ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    "mistral": Family("mistral.jinja", ("<s>", "</s>"), "</s>"),
    "phi3": Family("phi3.jinja", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"), "<|end|>"),
}
END_OF_TURN_MARKERS = tuple(sorted({f.end_of_turn for f in FAMILIES.values()} | {"<|endoftext|>", "<|eom_id|>"}))


def _missing_tokens(tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...]) -> list[str]:
    return [t for t in tokens if len(tokenizer.encode(t, add_special_tokens=False)) != 1]


def resolve_chat_template(spec: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja text for `spec`: a family name (see `FAMILIES`), a ``.jinja`` file, or Jinja itself.

    A family's special tokens must each be one token of `tokenizer` (a template written for
    another tokenizer would otherwise be split into pieces the model never saw).
    """
    if spec in FAMILIES:
        missing = _missing_tokens(tokenizer, FAMILIES[spec].special_tokens)
        if missing:
            raise ValueError(
                f"chat_template {spec!r}: tokenizer {tokenizer.name_or_path!r} has no single token for "
                f"{', '.join(missing)}; use the family's own tokenizer"
            )
        return FAMILIES[spec].template()
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.suffix in (".jinja", ".j2", ".jinja2") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"chat_template: no such template file: {path}")
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"chat_template {spec!r} is neither a family ({', '.join(FAMILIES)}), a .jinja file nor a Jinja template"
    )
