"""The toy tokenizer: byte-level BPE trained on every language, saved as a Hugging Face tokenizer.

Trained on all languages at once (as real tokenizers cover languages their model is weak in),
so continued pre-training later needs no vocabulary change. The chat template is a minimal
ChatML-like one; ``<|end|>`` closes every turn and is the eos token, so generation stops after
an assistant turn. A base model never saw ``<|end|>`` in pre-training, which is exactly why it
"cannot follow the chat format".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DOC_SEP = "<|endoftext|>"
END = "<|end|>"
SPECIAL_TOKENS = (DOC_SEP, END, "<|system|>", "<|user|>", "<|assistant|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def encode_plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, without special tokens, padding or truncation, from the Rust
    tokenizer in one batch (documents are packed, so a long one is no problem; the transformers
    call would warn about ``model_max_length``). A fast tokenizer's backend keeps the padding and
    truncation that an earlier padded call switched on, so then a clean copy encodes; the caller's
    tokenizer is never changed."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None or backend.truncation is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
    return [enc.ids for enc in backend.encode_batch(list(texts), add_special_tokens=False)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> Any:
    """Train byte-level BPE on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Newlines are split off first and every piece gets a prefix space, so a word is the same
    # token(s) at the start of a text, after a newline, after a chat special token and inside a
    # sentence. Without this a tiny model has to learn two forms of every name and answer
    # (" painter" in running text, "painter" right after "<|assistant|>\n").
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END,
        pad_token=DOC_SEP,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(tok: Any, directory: str | Path) -> None:
    tok.save_pretrained(directory)
