"""Model factories and checks shared by the tests."""

import torch
import torch.nn as nn


def tanh_mlp(sizes=(6, 7, 5, 4), dtype=torch.float64):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def set_feedback_to_weights(model):
    """FA oracle: make every converted layer's feedback equal its forward weight."""
    from bio_ext import feedback_layers
    for _, layer in feedback_layers(model):
        with torch.no_grad():
            layer.feedback.copy_(layer.weight)


def train_steps(model, x, y, steps=3, lr=0.05, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    return losses
