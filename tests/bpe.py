"""A byte-level BPE tokenizer trained in milliseconds, for tests: decoding gives back any text exactly."""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def build_tokenizer(folder: Path, text: str, special: str = "<|endoftext|>", vocab: int = 320) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder
