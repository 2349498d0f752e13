"""Tokenizer with BLIP's special tokens, vocab writing, and the train/test image transforms."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mflightning.data import (
    CLIP_MEAN,
    CLIP_STD,
    build_test_transform,
    build_tokenizer,
    build_train_transform,
    write_vocab,
)


@pytest.fixture
def vocab(tmp_path):
    return write_vocab(tmp_path / "vocab.txt", ["a", "red", "circle", "left", "of", "?", "red"])


def test_write_vocab_puts_special_tokens_first_and_dedupes(vocab):
    with open(vocab) as f:
        lines = f.read().splitlines()
    assert lines == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "left", "of", "?"]


def test_write_vocab_rejects_words_with_spaces(tmp_path):
    with pytest.raises(ValueError, match="'red circle'"):
        write_vocab(tmp_path / "v.txt", ["red circle"])


@pytest.mark.parametrize("from_dir", [False, True])
def test_build_tokenizer_adds_dec_and_enc(vocab, from_dir, tmp_path):
    tokenizer = build_tokenizer(str(tmp_path) if from_dir else vocab)
    assert len(tokenizer) == 13
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 11
    assert tokenizer.enc_token_id == 12 and tokenizer.convert_ids_to_tokens(12) == "[ENC]"
    encoded = tokenizer("A red circle left of?", padding="max_length", max_length=10)
    assert encoded["input_ids"] == [2, 5, 6, 7, 8, 9, 10, 3, 0, 0]
    assert encoded["attention_mask"] == [1] * 8 + [0, 0]


def test_build_tokenizer_directory_without_vocab_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer(str(tmp_path))


def _image(size=40):
    return Image.fromarray(torch.randint(0, 256, (size, size + 8, 3), dtype=torch.uint8).numpy())


def test_train_transform_steps_and_output():
    with_aug = build_train_transform(24, scale=(0.2, 1.0))
    kinds = [type(t) for t in with_aug.transforms]
    assert kinds == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment, T.ToTensor, T.Normalize]
    assert with_aug.transforms[0].scale == (0.2, 1.0)
    assert with_aug.transforms[2].num_ops == 2 and with_aug.transforms[2].magnitude == 7
    plain = build_train_transform(24, augment=False, hflip=False)
    assert [type(t) for t in plain.transforms] == [T.RandomResizedCrop, T.ToTensor, T.Normalize]
    assert plain.transforms[0].scale == (0.5, 1.0)
    out = with_aug(_image())
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_test_transform_resizes_and_normalises_with_clip_stats():
    out = build_test_transform(16)(Image.new("RGB", (30, 20), (255, 0, 128)))
    assert out.shape == (3, 16, 16)
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 128 / 255), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out[:, 8, 8], torch.tensor(expected), atol=1e-4)
