"""Write a small GPT-2 in Hugging Face format (config.json + model.safetensors + tokenizer.json) to a directory.

No pretrained GPT-2 weights can be downloaded on the machines this project is built on, so the fine-tuning
end-to-end run (`textgen-train --arch gpt2 --init-from DIR`) starts from this stand-in: a randomly initialised
GPT-2 of a chosen size with a GPT-2-style byte-level BPE tokenizer trained on a corpus. With real weights on
disk (e.g. a `save_pretrained` copy of distilgpt2 or gpt2) the same command works unchanged.

    python -m benchmarks.make_small_hf_gpt2 --corpus ../shared/data/tinyshakespeare.txt --out runs/small-gpt2

Needs `transformers` (a test/dev dependency).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(corpus)], trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="text used to train the BPE tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    tokenizer = train_tokenizer(args.corpus, args.vocab_size)
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).save_pretrained(args.out)
    tokenizer.save(str(args.out / "tokenizer.json"))
    print(f"wrote {args.out} (vocab {config.vocab_size}, {args.n_layer}x{args.n_embd}, context {args.n_positions})")


if __name__ == "__main__":
    main()
