"""The zoo's causal language model, ``tiny-lm``: a small Llama-architecture model (RoPE, RMSNorm, SwiGLU,
grouped-query attention) with its own byte-level BPE tokenizer, trained at first use on English prose every CPython
ships, then cached like the digits models.

The corpus is the pydoc topics (``pydoc_data.topics``) followed by the docstrings of the standard library's
top-level modules, read with ``ast`` (never imported), in a fixed order. Every ``HOLD_OUT_EVERY``-th document is
held out (texts that occur more than once are kept once): it is never trained, tokenized for the vocabulary or
calibrated on, and is the model's evaluation text.
The corpus differs between CPython patch releases, so its sha256 is part of the cache key and of every artifact's
manifest. Training is deterministic (fixed seed, fixed thread count): the same torch version and CPU kind give the
same bits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["NAME", "EOS", "LMTraining", "TRAINING", "corpus", "corpus_sha256", "held_out_texts", "training_texts",
           "tiny_lm_path", "train_tiny_lm", "perplexity", "bpe_tokenizer", "save_tokenizer"]

NAME = "tiny-lm"
EOS = "<|endoftext|>"
HOLD_OUT_EVERY = 20
TRAINING_VERSION = 3  # bump when anything below changes what is trained, so caches are not reused


@dataclass(frozen=True)
class LMTraining:
    """The model's shape and how it is trained."""

    vocab_size: int = 1024
    hidden_size: int = 256  # a multiple of 128, so 4-bit groups of 128 fit every matrix (#18)
    intermediate_size: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention: two query heads share each key/value head
    max_positions: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    # 700 steps (1.4M tokens, about 3 passes over the text): trained for 200, the model was so far from a minimum
    # that 4-bit rounding moved its perplexity by noise alone, and no quantization method could be told apart (#18)
    steps: int = 700
    lr: float = 5e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2  # fixed, so that every machine reduces in the same order


TRAINING = LMTraining()


@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Every document of the corpus, in order (see the module docstring)."""
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc.strip())
    # Each text once (inherited docstrings repeat), so no held-out document is also a training one.
    return tuple(dict.fromkeys(docs))


def corpus_sha256() -> str:
    """sha256 of the corpus (documents joined by NUL bytes)."""
    return hashlib.sha256("\x00".join(corpus()).encode()).hexdigest()


def held_out_texts() -> list[str]:
    """The held-out documents: the model's evaluation text, never trained or calibrated on."""
    return [d for i, d in enumerate(corpus()) if i % HOLD_OUT_EVERY == 0]


def training_texts() -> list[str]:
    """The documents the tokenizer and the model are trained on (and calibration may use)."""
    return [d for i, d in enumerate(corpus()) if i % HOLD_OUT_EVERY != 0]


def tiny_lm_path(log: Callable[[str], None] | None = None) -> Path:
    """The trained model as a Hugging Face directory (config.json, model.safetensors, tokenizer files,
    training.json), from the cache or trained now (about four minutes on two cores) and cached."""
    import torch

    from .zoo import cache_dir

    from importlib.metadata import version as installed

    # What decides the trained bits: the recipe of training, torch (kernels, initialisation), transformers (the
    # model's code), tokenizers (the BPE trainer) and the corpus.
    versions = f"torch{torch.__version__.split('+')[0]}-tf{installed('transformers')}-tok{installed('tokenizers')}"
    path = cache_dir() / "zoo" / f"{NAME}-v{TRAINING_VERSION}-{versions}-{corpus_sha256()[:12]}"
    if (path / "training.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _one_trainer(path.parent / f".{NAME}.lock", log or _stderr):
        if (path / "training.json").is_file():  # another process trained it while this one waited
            return path
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a shared cache is read by other users
            train_tiny_lm(tmp, log=log)
            if path.is_dir() and not (path / "training.json").is_file():
                shutil.rmtree(path, ignore_errors=True)  # an incomplete copy (a crash mid-write): replaced
            try:
                os.replace(tmp, path)  # atomic: readers see a whole directory or none
            except OSError:
                if not (path / "training.json").is_file():  # not another process's finished copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextmanager
def _one_trainer(lock: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Held while training: a second first use (another `compress run`, a test process) waits for the first one's
    minutes instead of spending its own on the same bits. The kernel drops the lock when its holder dies. Where no
    lock can be taken (not POSIX, a read-only lock file of another user, a file system without flock) each first
    use trains, as before: os.replace still keeps one whole copy."""
    try:
        import fcntl

        # Read-only is enough for flock, and 0666 lets every user of a shared cache take it.
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{NAME}: another process is training it; waiting for that one")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _stderr(message: str) -> None:
    """Progress of first-use training (minutes) when no ``log`` is given: through the active run's reporter
    (silent under --quiet), else on stderr like compress's own."""
    from .log import progress

    progress(message)


def bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (any text encodes; nothing is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Any, out: Path, max_positions: int) -> None:
    """Save a tokenizer from ``bpe_tokenizer`` into the model directory ``out`` as transformers reads it (EOS doubling
    as BOS, padding and unknown)."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                      pad_token=EOS, model_max_length=max_positions,
                                      model_input_names=["input_ids", "attention_mask"])
    wrapped.save_pretrained(out)


def _ids(tok: Any, texts: list[str]) -> Any:
    """All ``texts`` as one stream of token ids, each document followed by EOS."""
    import torch

    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def train_tiny_lm(out: Path, plan: LMTraining = TRAINING, log: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Train the tokenizer and the model into the directory ``out``; returns what training.json records."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    say = log or _stderr
    start = time.perf_counter()
    tok = bpe_tokenizer(training_texts(), plan.vocab_size)
    train, held = _ids(tok, training_texts()), _ids(tok, held_out_texts())
    eos = tok.token_to_id(EOS)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=plan.hidden_size,
                         intermediate_size=plan.intermediate_size, num_hidden_layers=plan.layers,
                         num_attention_heads=plan.heads, num_key_value_heads=plan.kv_heads,
                         max_position_embeddings=plan.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(plan.seed)
            model = LlamaForCausalLM(config)
        say(f"{NAME}: training {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on "
            f"{train.numel():,} tokens for {plan.steps} steps (once; cached)")
        losses = _train(model, train, plan, say)
        model.eval()
        ppl = perplexity(model, held, plan.seq_len)
    finally:
        torch.set_num_threads(threads)
    unigram = _unigram_perplexity(train, held, config.vocab_size)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out, plan.max_positions)
    record = {"name": NAME, "training_version": TRAINING_VERSION, "corpus_sha256": corpus_sha256(),
              "documents": {"train": len(training_texts()), "held_out": len(held_out_texts())},
              "tokens": {"train": int(train.numel()), "held_out": int(held.numel())},
              "parameters": sum(p.numel() for p in model.parameters()), "plan": asdict(plan),
              "loss_first": round(sum(losses[:20]) / 20, 4), "loss_last": round(sum(losses[-20:]) / 20, 4),
              "held_out_perplexity": round(ppl, 3), "unigram_perplexity": round(unigram, 3),
              "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"{NAME}: held-out perplexity {ppl:.1f} (a unigram model: {unigram:.1f}) after {record['seconds']:.0f}s")
    return record


def _train(model: Any, ids: Any, plan: LMTraining, say: Callable[[str], None]) -> list[float]:
    """AdamW with warmup and cosine decay on random windows of ``ids``; returns every step's loss."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": plan.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.95))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / plan.warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * step / plan.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(plan.seed)
    model.train()
    losses: list[float] = []
    for step in range(plan.steps):
        starts = torch.randint(0, ids.numel() - plan.seq_len - 1, (plan.batch_size,), generator=gen)
        batch = torch.stack([ids[i:i + plan.seq_len] for i in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, plan.steps // 10) == 0:
            say(f"{NAME}: step {step + 1}/{plan.steps}, loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def perplexity(model: Any, ids: Any, window: int) -> float:
    """exp(mean next-token negative log-likelihood) of ``ids`` in consecutive windows of ``window`` tokens."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1]
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[None, :-1]).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
            count += chunk.numel() - 1
    return math.exp(nll / count)


def _unigram_perplexity(train: Any, held: Any, vocab: int) -> float:
    """Perplexity of the held-out tokens under add-one smoothed token frequencies of the training tokens."""
    import torch

    counts = torch.bincount(train, minlength=vocab).double() + 1
    return math.exp(-float(torch.log(counts / counts.sum())[held].mean()))
