"""Kimi-VL's tokenizer without the checkpoints' ``tokenization_moonshot.py``: the published
``tiktoken.model`` (one base64 token and its rank per line) read as the byte-level BPE it is,
by transformers' tiktoken converter, split by Moonshot's pre-tokenizer pattern, with the
``RESERVED_IDS`` ids after the base vocabulary named as ``tokenizer_config.json``'s
``added_tokens_decoder`` names them (``<|reserved_token_N|>`` otherwise), all special.

The class keeps the published name, ``TikTokenTokenizer``, so that the checkpoint's
``tokenizer_config.json`` resolves to it once registered: importing this module registers it,
in every process that loads a Kimi-VL tokenizer (vLLM's through the plugin entry point).
``tests/test_kimi_vl.py`` checks it token for token against tiktoken itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from kimivl_rl.models.families.kimi_vl_model import KimiVLConfig

VOCAB_FILE = "tiktoken.model"
RESERVED_IDS = 256
# tokenization_moonshot.py's pat_str: Han runs, words (apart from Han), up to 3 digits, ...
PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


def reserved_tokens(base_size: int, added_tokens_decoder: dict[int, AddedToken]) -> list[AddedToken]:
    """The tokens of ids ``base_size .. base_size + RESERVED_IDS - 1``, in order: named and
    flagged as ``added_tokens_decoder`` says (a thinking marker is not special, so decoding keeps
    it), ``<|reserved_token_N|>`` and special otherwise."""
    named = {int(i): t for i, t in added_tokens_decoder.items()}
    return [AddedToken(named[i].content, special=named[i].special, normalized=False) if i in named else
            AddedToken(f"<|reserved_token_{i}|>", special=True, normalized=False)
            for i in range(base_size, base_size + RESERVED_IDS)]


def moonshot_tokenizer(vocab_file: str | Path, added_tokens_decoder: dict[int, AddedToken]) -> Tokenizer:
    """The ``tokenizers`` pipeline of a published ``tiktoken.model``: the base tokens keep
    their ranks as ids, the reserved ids follow them."""
    tokenizer = TikTokenConverter(vocab_file=str(vocab_file), pattern=PATTERN).converted()
    for token in reserved_tokens(tokenizer.get_vocab_size(), added_tokens_decoder):
        tokenizer.add_tokens([token])   # one at a time: ids in order, special or not
    return tokenizer


class TikTokenTokenizer(PreTrainedTokenizerFast):
    """The published class name over kimivl-rl's reading of ``tiktoken.model``."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, tokenizer_object: Tokenizer | None = None,
                 added_tokens_decoder: dict | None = None, **kwargs):
        if vocab_file is not None:
            # Built here even when transformers passes one: its own tiktoken conversion splits
            # by another pattern and makes every added token special.
            if not Path(vocab_file).is_file():
                raise ValueError(f"a Kimi-VL tokenizer needs its {VOCAB_FILE}; {vocab_file} is not a file")
            tokenizer_object = moonshot_tokenizer(vocab_file, added_tokens_decoder or {})
        elif tokenizer_object is None:
            raise ValueError(f"a Kimi-VL tokenizer needs its {VOCAB_FILE}")
        kwargs.pop("tokenizer_file", None)
        super().__init__(tokenizer_object=tokenizer_object, **kwargs)
        self.vocab_file = vocab_file

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        """The published layout: ``tiktoken.model`` (with ``tokenizer_config.json``), no
        ``tokenizer.json``."""
        if self.vocab_file is None:
            return super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        target = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        self._write_named_tokens(Path(save_directory) / "tokenizer_config.json")
        return (*file_names, str(target))

    def _write_named_tokens(self, config_file: Path) -> None:
        """The reserved ids' names and flags into ``tokenizer_config.json``, where the
        published one keeps them (transformers writes them only to a ``tokenizer.json``)."""
        config = json.loads(config_file.read_text())
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.added_tokens_decoder.items()) if t.content != f"<|reserved_token_{i}|>"}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def register() -> None:
    """``TikTokenTokenizer`` for ``KimiVLConfig`` and by name (again each time, as
    ``kimi_vl_model.register``)."""
    AutoTokenizer.register(KimiVLConfig, fast_tokenizer_class=TikTokenTokenizer, exist_ok=True)


register()
