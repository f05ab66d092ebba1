"""Weighted k-nearest-neighbour classifier on frozen features (DINO's protocol).

Cosine similarity between L2-normalised features; each of the k nearest train samples votes for
its class with weight exp(sim / T). DINO uses k = 20, T = 0.07.
"""
import numpy as np
import torch
import torch.nn.functional as F

from mlcd.eval.linear_probe import pick_device


@torch.no_grad()
def knn_predict(train_x, train_y, test_x, num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk: int = 1024, device=None) -> np.ndarray:
    """Predicted class per test row, searching the whole train set chunk by chunk of test rows."""
    dev = pick_device(device)
    train = F.normalize(torch.as_tensor(train_x).to(dev, torch.float32), dim=1)
    labels = torch.as_tensor(train_y).to(dev, torch.int64)
    test = torch.as_tensor(test_x)
    k = min(k, len(train))
    preds = []
    for i in range(0, len(test), chunk):
        q = F.normalize(test[i:i + chunk].to(dev, torch.float32), dim=1)
        sims, idx = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=dev)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
