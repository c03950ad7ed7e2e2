"""Tokenised datasets and loaders that pad each batch only to its own longest sequence.

The batch order comes from `EpochBatchSampler`, a pure function of (seed, epoch): a resumed run
can skip exactly the batches it already did, and a data-parallel run can hand each rank its
slice of the *same* global batch, so N processes see what one process would.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset


class TextDataset(Dataset):
    """Texts tokenised once, up front; items are (token ids, label)."""

    def __init__(self, tokenizer, texts, labels, max_length: int = 128):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id or 0
        self.truncated = sum(len(x) >= max_length for x in enc["input_ids"])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


def pad_batch(sequences, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences right-padded to the longest: (input_ids, attention_mask), both (n, width)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


class PadCollator:
    """Pads a batch to its longest member: input_ids, attention_mask, labels."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, items):
        input_ids, mask = pad_batch([ids for ids, _ in items], self.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": torch.stack([label for _, label in items])}


class EpochBatchSampler:
    """Global batches of indices, shuffled per epoch from (seed, epoch); optionally bucketed.

    Bucketing sorts each window of 50 batches by length before cutting it into batches, so a
    batch holds similar lengths and pads little; batch order is still shuffled. `by_length`
    (for evaluation, unshuffled) goes through the whole set shortest first.
    `rank`/`world` keep slice rank::world of every global batch (data parallelism);
    `skip` drops the first batches of the current epoch (resuming).
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool = True, seed: int = 0,
                 bucket: bool = False, drop_last: bool = False, rank: int = 0, world: int = 1,
                 by_length: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.bucket, self.drop_last, self.rank, self.world = bucket, drop_last, rank, world
        self.by_length = by_length
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def shard(self, rank: int, world: int) -> "EpochBatchSampler":
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} does not split evenly over {world} "
                             "processes; choose a multiple of the process count.")
        s = EpochBatchSampler(self.lengths, self.batch_size, self.shuffle, self.seed, self.bucket,
                              self.drop_last, rank, world, self.by_length)
        s.set_epoch(self.epoch, self.skip)
        return s

    def global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.by_length:  # stable: equal lengths keep their order
            order = sorted(order, key=self.lengths.__getitem__)
        elif self.bucket:
            window = self.batch_size * 50
            order = [i for s in range(0, n, window)
                     for i in sorted(order[s:s + window], key=self.lengths.__getitem__)]
        batches = [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.bucket and self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        for batch in self.global_batches()[self.skip:]:
            part = batch[self.rank::self.world]
            if part:
                yield part

    def __len__(self):
        n = len(self.lengths)
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return max(full - self.skip, 0)


def make_loaders(tokenizer, splits: dict, batch_size: int = 32, max_length: int = 128,
                 bucket: bool = False, seed: int = 0, eval_batch_size: int | None = None,
                 eval_by_length: bool = True) -> dict:
    """DataLoaders for each split (a dict of DataFrames with text and label columns).

    The "train" loader shuffles (per epoch, from `seed`). The others go through their examples
    shortest first (`eval_by_length`): accuracy, F1 and mean loss do not depend on the order, and
    batches of similar lengths pad little, which makes evaluation about twice as fast on these
    snippets. Pass eval_by_length=False to keep the DataFrame's row order.
    """
    loaders = {}
    for name, df in splits.items():
        if len(df) == 0:
            raise ValueError(f"split {name!r} is empty; use larger fractions or more data.")
        ds = TextDataset(tokenizer, df["text"], df["label"], max_length)
        train = name == "train"
        bs = batch_size if train else (eval_batch_size or 2 * batch_size)
        sampler = EpochBatchSampler(ds.lengths(), bs, shuffle=train, seed=seed, bucket=bucket,
                                    by_length=eval_by_length and not train)
        loaders[name] = DataLoader(ds, batch_sampler=sampler, collate_fn=PadCollator(ds.pad_id))
    return loaders


def padding_stats(loader) -> "pd.Series":
    """How much of a loader's batches is padding: batches, real tokens, padded tokens (batch x
    longest) and the padding share. In training, `load_base`'s padding-free encoder
    (`peftkit.bases.fast_bert`) skips exactly that share of the projection and feed-forward work."""
    batches = real = padded = 0
    for batch in loader:
        mask = batch["attention_mask"]
        batches, real, padded = batches + 1, real + int(mask.sum()), padded + mask.numel()
    if batches == 0:
        raise ValueError("the loader gave no batches; check its split and batch size.")
    return pd.Series({"batches": batches, "real_tokens": real, "padded_tokens": padded,
                      "padding_share": round(1 - real / padded, 3)}, dtype=object)
