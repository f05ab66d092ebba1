"""A kNN monitor during training (as DINO and solo-learn do): top-1 of a weighted kNN on a held-out labelled set,
every `monitor.every` steps, so a sweep shows curves and not only end points.

It runs on rank 0 (the others wait at their next collective), in eval mode and under no_grad, and draws no
random numbers: the training stream, and so exact resume, are unchanged (tested).
"""
import time

import numpy as np
import torch

from mlcd.data.transforms import EvalTransform
from mlcd.eval.datasets import labels_of, load_dataset, stratified_pick
from mlcd.eval.knn import knn_predict


class KnnMonitor:
    def __init__(self, cfg, image_size: int):
        self.every, self.k, self.feature = int(cfg.every), int(cfg.k), cfg.feature
        splits = load_dataset(cfg.dataset, cfg.root)
        self.num_classes = splits.num_classes
        tf = EvalTransform(image_size)

        def tensors(ds, idx):
            return torch.stack([tf(ds[int(i)][0]) for i in idx]), labels_of(ds)[idx]
        n_mem, n_query = int(cfg.train_size), int(cfg.test_size)
        if cfg.queries == "test":
            self.train_x, self.train_y = tensors(splits.train, stratified_pick(labels_of(splits.train), n_mem, 0))
            self.test_x, self.test_y = tensors(splits.test, stratified_pick(labels_of(splits.test), n_query, 1))
        elif cfg.queries == "train":  # model selection without looking at the test split: disjoint train subsets
            idx = stratified_pick(labels_of(splits.train), n_mem + n_query, 0)
            idx = np.random.default_rng(0).permutation(idx)
            self.train_x, self.train_y = tensors(splits.train, np.sort(idx[:n_mem]))
            self.test_x, self.test_y = tensors(splits.train, np.sort(idx[n_mem:]))
        else:
            raise ValueError(f"monitor.queries={cfg.queries!r}: test | train")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def _features(self, model, x, batch: int = 512):
        device = next(model.parameters()).device
        out = []
        for i in range(0, len(x), batch):
            o = model(x[i:i + batch].to(device))
            out.append((o.pooled if self.feature == "pooled" else o.embedding).float().cpu())
        return torch.cat(out)

    def __call__(self, model) -> dict:
        """{"monitor/knn_top1": ..., "monitor/seconds": ...} for the backbone `model` (not DDP-wrapped)."""
        t0, was_training = time.time(), model.training
        model.eval()
        try:
            train_f, test_f = self._features(model, self.train_x), self._features(model, self.test_x)
        finally:
            model.train(was_training)
        pred = knn_predict(train_f, self.train_y, test_f, self.num_classes, k=self.k, device="cpu")
        return {"monitor/knn_top1": float(100 * np.mean(pred == self.test_y)), "monitor/seconds": time.time() - t0}
