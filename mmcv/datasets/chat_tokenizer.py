"""A tiny word-level tokenizer for the synthetic Chat-B2D questions and answers.

The miniature world speaks a closed vocabulary of a few dozen words, so a
fixed word list is the whole tokenizer: deterministic, no files, no download.
Questions are left-padded to a fixed length and answers end with ``<eos>``,
which lets a causal LM train and decode whole batches without ragged shapes.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<plan>")

WORDS = (
    "how", "many", "cars", "pedestrians", "people", "are", "is", "in", "front", "ahead", "of", "the",
    "ego", "car", "what", "state", "traffic", "light", "colour", "should", "do", "next", "action",
    "?", "zero", "one", "two", "three", "four", "red", "yellow", "green", "none",
    "stop", "slow", "down", "go", "straight", "turn", "left", "right",
)

QUESTION_LEN = 9  # every question is left-padded to this many tokens (incl. <bos>)
ANSWER_LEN = 3  # at most two answer words plus <eos>


class ChatTokenizer:
    """Map the closed Chat-B2D vocabulary to ids and back.

    ``pad_id`` is 0, so zero-initialised id tensors are padding. Unknown words
    raise ``KeyError`` naming the word: the vocabulary is closed on purpose.
    """

    def __init__(self) -> None:
        self.itos: List[str] = list(SPECIAL_TOKENS) + list(WORDS)
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("chat_tokenizer.WORDS: duplicate words in the vocabulary")
        self.pad_id = self.stoi["<pad>"]
        self.bos_id = self.stoi["<bos>"]
        self.eos_id = self.stoi["<eos>"]
        self.plan_id = self.stoi["<plan>"]

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:
        """Split ``text`` on spaces and map each word to its id."""
        ids = []
        for word in text.split():
            if word not in self.stoi:
                raise KeyError(f"ChatTokenizer: word {word!r} is not in the vocabulary {self.itos}")
            ids.append(self.stoi[word])
        return ids

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """Map ids back to words, dropping padding and stopping at ``<eos>``."""
        words = []
        for i in ids:
            i = int(i)
            if stop_at_eos and i == self.eos_id:
                break
            if i == self.pad_id:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ChatTokenizer: id {i} outside [0, {self.vocab_size})")
            words.append(self.itos[i])
        return " ".join(words)

    def encode_question(self, text: str, length: int = QUESTION_LEN) -> List[int]:
        """``<bos>`` + words, left-padded with ``<pad>`` to ``length`` tokens."""
        ids = [self.bos_id] + self.encode(text)
        if len(ids) > length:
            raise ValueError(f"ChatTokenizer: question {text!r} has {len(ids)} tokens, expected <= {length}")
        return [self.pad_id] * (length - len(ids)) + ids

    def encode_answer(self, text: str, length: int = ANSWER_LEN) -> List[int]:
        """Words + ``<eos>``, right-padded with ``<pad>`` to ``length`` tokens."""
        ids = self.encode(text) + [self.eos_id]
        if len(ids) > length:
            raise ValueError(f"ChatTokenizer: answer {text!r} has {len(ids)} tokens, expected <= {length}")
        return ids + [self.pad_id] * (length - len(ids))


__all__ = ["ChatTokenizer", "SPECIAL_TOKENS", "WORDS", "QUESTION_LEN", "ANSWER_LEN"]
