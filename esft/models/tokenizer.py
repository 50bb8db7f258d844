"""Tokenizers: load one from a model path / hub id, or the small built-in one the project ships.

The built-in tokenizer is a byte-level BPE (any text encodes; digits split one per token, which
arithmetic needs) trained with `tokenizers` on the built-in tasks, with a ChatML chat template.
Regenerate the shipped files with:

    esft train-tokenizer
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).parent / "builtin_tokenizer"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_tokenizer_name(tokenizer: str | None, model_name_or_path: str | None) -> str:
    """The tokenizer to use: the one given, else the model's own, else the built-in one."""
    return tokenizer or model_name_or_path or BUILTIN


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`builtin` for the shipped tokenizer, else a local directory or a HF hub id.

    A tokenizer without a pad token gets its EOS token as pad (packing never pads; padded
    evaluation batches do).
    """
    path = str(BUILTIN_DIR) if name_or_path == BUILTIN else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_builtin_tokenizer(out_dir: Path = BUILTIN_DIR, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the built-in byte-level BPE on the built-in tasks and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from esft.data.tasks import TASKS

    def corpus():
        for name, cls in sorted(TASKS.items()):
            task = cls()
            for split in ("train", "heldout"):
                for record in task.generate(2000, seed=0, split=split):
                    for message in record["messages"]:
                        yield f"{message['role']}\n{message['content']}"

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast

