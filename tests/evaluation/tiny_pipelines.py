"""Tiny text-to-image and text-to-video pipelines saved as complete local directories, text encoders and tokenizers
included (random weights, a character vocabulary): what ``relcache bench --model DIR`` loads with
``DiffusionPipeline.from_pretrained``. Nothing is downloaded. The transformers and VAEs are tests/families.py's."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from families import flux_pipe, pixart_pipe, sd3_pipe, wan_pipe
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

#: CLIP's context length in these pipelines (the tokenizer's model_max_length and the encoder's positions)
CLIP_LENGTH = 16


def t5_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer over single letters (T5's special tokens first: pad 0, eos 1, unk 2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in string.ascii_lowercase] + [(c, -4.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_tokenizer() -> CLIPTokenizer:
    """A BPE tokenizer without merges over single letters (start and end of text first)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)


def t5_encoder(dim: int = 16) -> T5EncoderModel:
    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=dim, d_ff=2 * dim, d_kv=8, num_layers=1, num_heads=2)).eval()


def _clip_config(hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def save_flux(path: Path) -> Path:
    """FLUX.1-dev-like: CLIP (pooled, 16) and T5 (16) text encoders."""
    pipe = flux_pipe()
    torch.manual_seed(2)
    pipe.register_modules(text_encoder=CLIPTextModel(_clip_config(16, 16)).eval(), tokenizer=clip_tokenizer(),
                          text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer())
    pipe.save_pretrained(path)
    return path


def save_sd3(path: Path) -> Path:
    """SD3-like: two CLIP encoders with projection (hidden 8 each, concatenated to 16; pooled 8 + 8) and T5 (16)."""
    pipe = sd3_pipe()
    torch.manual_seed(3)
    pipe.register_modules(
        text_encoder=CLIPTextModelWithProjection(_clip_config(8, 8)).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(8, 8)).eval(), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(path)
    return path


def save_pixart(path: Path) -> Path:
    """PixArt-sigma-like with a T5 encoder (16)."""
    pipe = pixart_pipe()
    pipe.register_modules(text_encoder=t5_encoder(), tokenizer=t5_tokenizer())
    pipe.save_pretrained(path)
    return path


def save_wan(path: Path) -> Path:
    """Wan 2.1-like (CFG as separate calls) with a UMT5 encoder (16)."""
    pipe = wan_pipe()
    torch.manual_seed(4)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    pipe.register_modules(text_encoder=encoder.eval(), tokenizer=t5_tokenizer())
    pipe.save_pretrained(path)
    return path
