"""llama.cpp's SentencePiece tokenizer puts a space before the text that follows every special token unless the
GGUF says `add_space_prefix` false; the export sets that flag from the training tokenizer and checks it.

Two SentencePiece-style tokenizers differ here: one that marks a space at the start of each piece of text (the
`Prepend` normalizer of Llama-2's and Phi-3's published tokenizer.json) and one that marks it only at the start of
the whole text (`Metaspace` with prepend_scheme "first": Mistral v0.3, and what transformers 5 converts a
SentencePiece model to).
"""

from __future__ import annotations

import json

import gguf
import pytest

from qlora_trainer.deploy.llama_cpp_converter import prepare_tokenizer_config, space_after_special_tokens
from qlora_trainer.errors import UserError


def sentencepiece_style(every_piece: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "\u2581": 2, "a": 3, "\u2581a": 4}
    backend = Tokenizer(models.BPE(vocab, [("\u2581", "a")], unk_token="<unk>"))
    if every_piece:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


def write_gguf(path, model: str, add_space_prefix: bool | None) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_probe_tells_the_two_sentencepiece_styles_apart():
    every, first = sentencepiece_style(every_piece=True), sentencepiece_style(every_piece=False)
    assert every("</s>a", add_special_tokens=False)["input_ids"] == [1, 4]
    assert first("</s>a", add_special_tokens=False)["input_ids"] == [1, 3]
    assert space_after_special_tokens(every) is True
    assert space_after_special_tokens(first) is False


@pytest.mark.parametrize("every_piece", [True, False])
def test_the_converter_is_told_the_training_tokenizers_choice(tmp_path, every_piece):
    tokenizer = sentencepiece_style(every_piece)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")  # the converter's SentencePiece path reads this file
    prepare_tokenizer_config(tmp_path, space_after_special_tokens(tokenizer))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is every_piece
    assert config["added_tokens_decoder"]["1"]["content"] == "</s>"


def test_a_byte_level_vocabulary_gets_no_space_flag(tmp_path):
    sentencepiece_style(every_piece=False).save_pretrained(tmp_path)  # no tokenizer.model: the BPE path
    prepare_tokenizer_config(tmp_path, False)
    assert "add_prefix_space" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("every_piece, flag, refused", [
    (True, None, False),  # llama.cpp's default is on, as this tokenizer
    (False, None, True),  # the converter's default would put a space into every chat turn
    (False, False, False),
    (True, False, True),
])
def test_the_verification_refuses_a_gguf_whose_flag_disagrees(tmp_path, every_piece, flag, refused):
    from qlora_trainer.deploy.gguf_verify import check_space_after_special

    write_gguf(tmp_path / "m.gguf", "llama", flag)
    check = lambda: check_space_after_special(sentencepiece_style(every_piece), tmp_path / "m.gguf", tmp_path / "o")  # noqa: E731
    if not refused:
        check()
        return
    with pytest.raises(UserError, match="llama.cpp would (not )?put a space before the text that follows each "
                                        "special token") as error:
        check()
    assert "\n" not in str(error.value) and "nothing was written to" in str(error.value)


def test_a_byte_level_gguf_is_not_checked(tmp_path):
    from qlora_trainer.deploy.gguf_verify import check_space_after_special

    write_gguf(tmp_path / "m.gguf", "gpt2", None)
    check_space_after_special(sentencepiece_style(every_piece=False), tmp_path / "m.gguf", tmp_path / "o")
