"""scikit-learn's digits (8x8, offline): a small CNN and a small ViT, trained in seconds.
Shared by the quality test and bench/bench_pruning.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_digits_tensors():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_train = 1400
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.b2 = nn.BatchNorm2d(64)
        self.c3 = nn.Conv2d(64, 64, 3, padding=1)
        self.b3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        x = x + F.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def small_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64,
                             depth=2, num_heads=4, mlp_ratio=4.0)


def train(model, data, epochs, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    x, y = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(model, data) -> float:
    x, y = data
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
