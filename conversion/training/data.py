"""The training data: text files or a dataset, tokenized into one token stream cut into blocks, the evaluation text,
and the tokenizer that reads them."""

from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from ..cli_checks import one_line
from ..measure import check_fills_one_block, read_eval_tokens
from ..text_files import read_text_file


class TokenBlocks(Dataset):
    """A token stream cut into blocks of `block_size` tokens (packing: documents follow each other)."""

    def __init__(self, token_ids: torch.LongTensor, block_size: int, source: str = "the text"):
        num_blocks = token_ids.numel() // block_size
        if num_blocks == 0:
            raise ValueError(
                f"{source} has {token_ids.numel()} tokens, fewer than one block of {block_size}: give more text, or a "
                f"smaller --block-size."
            )
        self.blocks = token_ids[: num_blocks * block_size].view(num_blocks, block_size)

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def tokenize_texts(tokenizer, texts) -> torch.LongTensor:
    """Concatenates documents, each starting with BOS and ending with EOS when the tokenizer has them."""
    ids = []
    for text in texts:
        if not text.strip():
            continue
        document = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            document = [tokenizer.bos_token_id, *document]
        if tokenizer.eos_token_id is not None:
            document.append(tokenizer.eos_token_id)
        ids.extend(document)
    return torch.tensor(ids, dtype=torch.long)


def load_training_texts(args) -> list[str]:
    if args.dataset:
        from datasets import load_dataset

        try:
            dataset = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        except Exception as error:  # datasets raises many kinds (not found, offline, a bad split or config)
            if Path(args.dataset).expanduser().exists():
                fix = ("check that it is a dataset folder (data files such as .jsonl, .csv, .parquet or .txt), and "
                       "--dataset-config and --dataset-split")
            else:
                fix = ("check the dataset name (a Hub dataset id or a local dataset folder), --dataset-config and "
                       "--dataset-split, the network connection, and unset HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) "
                       "to download it")
            raise ValueError(f"--dataset {args.dataset} could not be loaded ({one_line(error)}); nothing was "
                             f"written. Fix: {fix}; or give --train-file.") from None
        if args.text_column not in dataset.column_names:
            raise ValueError(f"--text-column {args.text_column!r} is not a column of {args.dataset}: {dataset.column_names}")
        if args.max_train_documents:
            dataset = dataset.select(range(min(args.max_train_documents, len(dataset))))
        return list(dataset[args.text_column])
    texts = []
    for path in args.train_file:
        text = read_text_file(path, "--train-file")
        # TinyStories-style files separate documents by <|endoftext|> or blank lines.
        separator = "<|endoftext|>" if "<|endoftext|>" in text else "\n\n"
        texts.extend(part.strip() for part in text.split(separator))
    if args.max_train_documents:
        texts = texts[: args.max_train_documents]
    return texts


class TrainingData(NamedTuple):
    train_dataset: TokenBlocks
    eval_tokens: torch.LongTensor | None  # the perplexity text, when --eval-file is given
    eval_dataset: TokenBlocks | None  # its blocks for Trainer's evaluation, when --eval-steps is given too


def load_training_data(args, tokenizer) -> TrainingData:
    """Reads and tokenizes the training and evaluation text (before any model is loaded, so that unusable data is
    refused at once)."""
    train_source = f"--dataset {args.dataset}" if args.dataset else f"--train-file {' '.join(args.train_file)}"
    train_dataset = TokenBlocks(tokenize_texts(tokenizer, load_training_texts(args)), args.block_size, train_source)
    eval_tokens = eval_dataset = None
    if args.eval_file:
        eval_tokens = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
        check_fills_one_block(eval_tokens, args.eval_block_size, args.eval_file, args.eval_max_tokens)
        if args.eval_steps:
            eval_dataset = TokenBlocks(eval_tokens, args.block_size, f"--eval-file {args.eval_file}")
    return TrainingData(train_dataset, eval_tokens, eval_dataset)
