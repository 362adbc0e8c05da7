"""Features of a frozen text tower, computed once per unique caption."""
from __future__ import annotations

import time
from collections import OrderedDict

import torch
from torch import nn


class TextFeatureCache:
    """caption -> frozen text-tower features, each unique caption encoded once (least recently used evicted).

    A frozen tower maps a caption to the same features every time it is seen, so a training run needs to encode
    each unique caption once, not once per batch. Missing captions of a batch are tokenised and encoded together in
    one call. Features are kept on the device they were computed on.

    Args:
        text_encoder: the frozen tower (``forward(input_ids, attention_mask) -> [N, W]``), run in eval mode.
        tokenizer: callable list[str] -> dict of [N, L] tensors.
        max_entries: captions kept; beyond it the least recently used are dropped.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, max_entries: int = 200_000):
        if any(p.requires_grad for p in text_encoder.parameters()):
            raise ValueError("TextFeatureCache needs a frozen text tower (text.freeze: true)")
        self.encoder, self.tokenizer, self.max_entries = text_encoder, tokenizer, int(max_entries)
        self.store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0
        self.encode_seconds = 0.0  # time spent encoding missing captions

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device | str) -> torch.Tensor:
        """[N] captions -> [N, W] features."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.store))
        self.misses += sum(c not in self.store for c in captions)
        self.hits += len(captions) - sum(c not in self.store for c in captions)
        if missing:
            start = time.perf_counter()
            was_training = self.encoder.training
            self.encoder.eval()
            tokens = {k: v.to(device) for k, v in self.tokenizer(missing).items()}
            feats = self.encoder(tokens["input_ids"], tokens.get("attention_mask"))
            self.encoder.train(was_training)
            self.store.update(zip(missing, feats))
            if feats.is_cuda:
                torch.cuda.synchronize(feats.device)
            self.encode_seconds += time.perf_counter() - start
        for c in captions:
            self.store.move_to_end(c)
        out = torch.stack([self.store[c] for c in captions])
        while len(self.store) > self.max_entries:
            self.store.popitem(last=False)
        return out

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
