"""A character-level transformer language model, pipelined over 4 stages.

Shows the attention path end to end: integer token ids enter stage 0 (a token and a learned
position embedding), pre-LayerNorm blocks of causal multi-head attention and a GELU MLP (each in
``nn.Residual``) run one block per stage, and the last stage maps to per-character logits for
``nn.CrossEntropyLoss`` over (N, C, T). The text is CPython's own ``pydoc_data.topics`` (the
English help pages shipped with every Python), so nothing is downloaded.

Measured: train and validation loss in bits per character against the step count, next to
unigram / bigram / trigram baselines fitted on the same training text; the per-stage busy
fraction; a few greedy and sampled continuations.

Run ``python experiments/char_transformer.py --help``; results go to ``runs/char_transformer/``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Config:
    seed: int = 0  # weights, window sampling and shuffling; fixed so reruns give the same curves
    context: int = 64  # characters seen per position; long enough to span most English words
    dim: int = 64  # embedding width: tiny, so a step takes well under a second on 2 cores
    heads: int = 4  # 16 features per head, the usual head size for a model this narrow
    blocks: int = 4  # one transformer block per pipeline stage
    stages: int = 4  # the pipeline depth the issue asks for
    policy: str = "OneFOneB"  # "OneFOneB" (flushed 1F1B) or "PipeDream" (no flush, stashing)
    microbatches: int = 4  # one per stage, so the 1F1B pipeline fills
    batch_size: int = 32  # windows per minibatch: 8 rows per microbatch
    lr: float = 3e-3  # Adam's peak rate for a model this small, annealed by a cosine to 0
    warmup_steps: int = 50  # linear warm-up (minibatches): attention at 3e-3 at once is jumpy
    steps: int = 1500  # minibatches: about 3-4 minutes on 2 cores; bits/char is still creeping down
    eval_every: int = 100  # minibatches between validation points: 15 points on the curve
    val_windows: int = 128  # validation windows per evaluation: 8k characters, ~1 s each
    val_fraction: float = 0.1  # the last 10% of the text is held out (contiguous, not shuffled)
    sample_chars: int = 200  # characters generated per sample
    temperature: float = 0.8  # sampling temperature of the sampled continuations
    out: str = "runs/char_transformer"  # results.json and the PNGs go here


# -- the text ----------------------------------------------------------------------------------------
def load_text() -> str:
    """CPython's help topics (``pydoc_data.topics.topics``), joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    """Character ids (int64) and the sorted character list."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], dtype=np.int64), chars


def windows(ids: np.ndarray, starts: np.ndarray, context: int) -> dict[str, np.ndarray]:
    """Inputs ``x`` = ids[s : s+T] and next-character targets ``y`` = ids[s+1 : s+T+1]."""
    rows = starts[:, None] + np.arange(context + 1)[None, :]
    chunk = ids[rows]
    return {"x": chunk[:, :-1], "y": chunk[:, 1:]}


def ngram_bits(train: np.ndarray, val: np.ndarray, vocab: int, order: int) -> float:
    """Validation cross-entropy (bits/char) of an add-one-smoothed n-gram fitted on ``train``.

    Order 1 is the unigram, 2 the bigram (previous character), 3 the trigram.
    """
    n = order - 1

    def context_ids(a: np.ndarray) -> np.ndarray:
        ctx = np.zeros(len(a) - n, dtype=np.int64)
        for k in range(n):
            ctx = ctx * vocab + a[k : len(a) - n + k]
        return ctx

    counts = np.zeros((vocab**n, vocab))
    np.add.at(counts, (context_ids(train), train[n:]), 1.0)
    probs = (counts + 1.0) / (counts.sum(axis=1, keepdims=True) + vocab)
    p = probs[context_ids(val), val[n:]]
    return float(-np.mean(np.log2(p)))


# -- the model -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenAndPosition(nn.Module):
    """Token embedding plus a learned position embedding: int ids (N, T) -> (N, T, dim)."""

    vocab: int
    dim: int
    context: int
    std: float = 0.02  # GPT-2's embedding init; N(0, 1) swamps the blocks' residual branches

    def init_params(self, init: nn.Initializer) -> Any:
        return {
            "token": init.normal((self.vocab, self.dim), self.std),
            "position": init.normal((self.context, self.dim), self.std),
        }

    def __call__(self, params: Any, ids: Any, *, rng: Any = None) -> Any:
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"{self!r}: got {length} positions, at most {self.context} allowed")
        position = params["position"]
        if length < self.context:
            position = ops.getitem(position, slice(0, length))
        return ops.add(ops.embedding(params["token"], ids), position)


@dataclass(frozen=True)
class ClassesFirst(nn.Module):
    """(N, T, C) -> (N, C, T), the logits layout ``CrossEntropyLoss`` takes for sequences."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.transpose(x, (0, 2, 1))


def block(dim: int, heads: int) -> nn.Sequential:
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""
    attention = nn.Sequential(nn.LayerNorm(dim), nn.MultiHeadAttention(dim, heads, causal=True))
    mlp = nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
    )
    return nn.Sequential(nn.Residual(attention), nn.Residual(mlp))


def build_modules(cfg: Config, vocab: int) -> tuple[list[nn.Module], list[int]]:
    """The model as a flat module list and the number of modules in each stage.

    Blocks are spread as evenly as the stage count allows; the embedding joins the first stage
    and the final LayerNorm + vocabulary projection the last.
    """
    if cfg.blocks < cfg.stages:
        raise ValueError(
            f"need at least one block per stage: blocks={cfg.blocks}, stages={cfg.stages}"
        )
    per_stage = [
        cfg.blocks // cfg.stages + (k < cfg.blocks % cfg.stages) for k in range(cfg.stages)
    ]
    modules: list[nn.Module] = [TokenAndPosition(vocab, cfg.dim, cfg.context)]
    modules += [block(cfg.dim, cfg.heads) for _ in range(cfg.blocks)]
    modules += [nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, vocab), ClassesFirst()]
    sizes = list(per_stage)
    sizes[0] += 1
    sizes[-1] += 3
    return modules, sizes


def make_policy(cfg: Config) -> policies.Policy:
    kinds = {"OneFOneB": policies.OneFOneB, "PipeDream": policies.PipeDream}
    if cfg.policy not in kinds:
        raise ValueError(f"policy must be one of {sorted(kinds)}, got {cfg.policy!r}")
    return kinds[cfg.policy](cfg.microbatches)


# -- generation ----------------------------------------------------------------------------------------
def next_logits(graph: ann.Graph, params: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """Logits (vocab,) for the character after ``ids`` (1-D), running each stage's module."""
    h: Any = ids[None, :]
    for name in graph.layers:
        h = graph.nodes[name].module(params[name], h)
    return np.asarray(h)[0, :, -1]


def generate(
    graph: ann.Graph,
    params: dict[str, Any],
    prompt: np.ndarray,
    length: int,
    context: int,
    temperature: float,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Continues ``prompt`` by ``length`` characters: greedy when ``rng`` is None, else sampled."""
    ids = list(prompt)
    for _ in range(length):
        logits = next_logits(graph, params, np.array(ids[-context:], dtype=np.int64))
        if rng is None:
            ids.append(int(np.argmax(logits)))
        else:
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return np.array(ids[len(prompt) :], dtype=np.int64)


def prompt_starts(text: str, context: int, count: int) -> list[int]:
    """``count`` prompt positions spread over ``text``, each at the start of a prose paragraph
    (after a blank line, an upper-case letter), so that samples continue English, not a table."""
    starts = [
        i + 2
        for i in range(len(text) - context - 2)
        if text[i : i + 2] == "\n\n"
        and text[i + 2].isupper()
        and "\n" not in text[i + 2 : i + context]
    ]
    if not starts:
        return [0] * count
    return [starts[int(j)] for j in np.linspace(0, len(starts) - 1, count)]


# -- the experiment ------------------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, Any]:
    text = load_text()
    ids, chars = encode(text)
    vocab = len(chars)
    split = int(len(ids) * (1 - cfg.val_fraction))
    train_ids, val_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(cfg.seed)
    val = windows(
        val_ids, rng.integers(0, len(val_ids) - cfg.context - 1, cfg.val_windows), cfg.context
    )
    baselines = {
        f"{name}_bits": ngram_bits(train_ids, val_ids, vocab, order)
        for order, name in ((1, "unigram"), (2, "bigram"), (3, "trigram"))
    }
    baselines["uniform_bits"] = math.log2(vocab)
    print(f"text: {len(ids)} characters, vocabulary {vocab}; baselines (bits/char): " +
          ", ".join(f"{k[:-5]} {v:.3f}" for k, v in baselines.items()))  # fmt: skip

    modules, sizes = build_modules(cfg, vocab)
    graph = ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=sizes,
        input_shape=(None, cfg.context), input_dtype="int64",
        label_shape=(None, cfg.context), label_dtype="int64",
    )  # fmt: skip
    policy = make_policy(cfg)
    # PipeDream updates after every microbatch, the flushed policies once per minibatch.
    updates = cfg.steps * (cfg.microbatches if isinstance(policy, policies.PipeDream) else 1)
    warmup = cfg.warmup_steps * updates // cfg.steps
    schedule = optim.LinearWarmup(optim.CosineAnnealing(cfg.lr, total_steps=updates), warmup)
    trainer = ann.Trainer(graph, optim.Adam(lr=schedule), policy, seed=cfg.seed)
    num_params = sum(graph.nodes[n].module.num_params(p) for n, p in trainer.params.items())
    print(f"{num_params} parameters in stages of {sizes} modules; policy {trainer.policy}")

    curve: list[dict[str, float]] = [{"step": 0, "val_bits": trainer.evaluate(val)["loss"] / LN2}]
    train_bits: list[float] = []
    busy = dict.fromkeys(graph.layers, 0.0)
    idle = dict.fromkeys(graph.layers, 0.0)
    seconds = 0.0
    steps_done = 0
    while steps_done < cfg.steps:
        n = min(cfg.eval_every, cfg.steps - steps_done)
        starts = rng.integers(0, len(train_ids) - cfg.context - 1, n * cfg.batch_size)
        history = trainer.fit(windows(train_ids, starts, cfg.context), batch_size=cfg.batch_size)
        steps_done += n
        seconds += history.seconds
        train_bits += [loss / LN2 for loss in history.losses]
        for name, s in history.statistics.items():
            if name in busy:
                busy[name] += s.busy_seconds
                idle[name] += s.idle_seconds
        point = {
            "step": steps_done,
            "val_bits": trainer.evaluate(val)["loss"] / LN2,
            "train_bits": float(np.mean(train_bits[-n:])),
            "seconds": seconds,
        }
        curve.append(point)
        print(f"step {steps_done:5d}  train {point['train_bits']:.3f}  val {point['val_bits']:.3f} "
              f"bits/char  ({seconds:.0f} s)")  # fmt: skip

    utilisation = {n: busy[n] / (busy[n] + idle[n]) if busy[n] + idle[n] else 0.0 for n in busy}
    print("busy fraction per stage: " + ", ".join(f"{n} {u:.2f}" for n, u in utilisation.items()))

    # The curve's 128 windows are a noisy sample of a varied text: the final number is taken over
    # the whole held-out text, in consecutive non-overlapping windows.
    full = windows(val_ids, np.arange(0, len(val_ids) - cfg.context - 1, cfg.context), cfg.context)
    full_val_bits = trainer.evaluate(full)["loss"] / LN2
    print(
        f"validation over all {full['x'].size} held-out characters: {full_val_bits:.3f} bits/char"
    )

    params = trainer.params
    samples = []
    for i, start in enumerate(prompt_starts(text[split:], cfg.context, 3)):
        prompt = val_ids[start : start + cfg.context]
        sample_rng = None if i == 0 else np.random.default_rng(cfg.seed + i)
        out = generate(graph, params, prompt, cfg.sample_chars, cfg.context, cfg.temperature,
                       sample_rng)  # fmt: skip
        samples.append({
            "mode": "greedy" if sample_rng is None else f"sampled, temperature {cfg.temperature}",
            "prompt": "".join(chars[i] for i in prompt),
            "continuation": "".join(chars[i] for i in out),
        })  # fmt: skip
        print(f"--- {samples[-1]['mode']}\n{samples[-1]['prompt']}|{samples[-1]['continuation']}")

    results = {
        "text": {"source": "pydoc_data.topics.topics", "characters": len(ids), "vocab": vocab,
                 "train_characters": int(split), "val_characters": int(len(val_ids))},
        "model": {"parameters": int(num_params), "stage_sizes": sizes,
                  "policy": repr(trainer.policy)},
        "baselines": baselines,
        "curve": curve,
        "train_bits_per_step": train_bits,
        "final_val_bits": curve[-1]["val_bits"],
        "full_val_bits": full_val_bits,
        "train_seconds": seconds,
        "samples_per_second": cfg.steps * cfg.batch_size / seconds if seconds else 0.0,
        "utilisation": utilisation,
        "samples": samples,
    }  # fmt: skip
    _common.write_results(cfg.out, cfg, results)
    plot(cfg, results)
    return results


def plot(cfg: Config, results: dict[str, Any]) -> None:
    plt = _common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    train = np.asarray(results["train_bits_per_step"])
    ax.plot(np.arange(1, len(train) + 1), train, color="tab:blue", alpha=0.3, lw=0.8,
            label="train (per minibatch)")  # fmt: skip
    curve = results["curve"]
    ax.plot([p["step"] for p in curve], [p["val_bits"] for p in curve], "o-", color="tab:red",
            ms=3, label="validation")  # fmt: skip
    styles = {"unigram": ":", "bigram": "--", "trigram": "-."}
    for name, style in styles.items():
        ax.axhline(results["baselines"][f"{name}_bits"], color="gray", ls=style,
                   label=f"{name} ({results['baselines'][f'{name}_bits']:.2f})")  # fmt: skip
    ax.set_ylim(1.0, results["baselines"]["uniform_bits"] + 0.3)
    ax.set_xlabel("minibatch")
    ax.set_ylabel("bits per character")
    ax.set_title(f"char transformer, {cfg.stages} stages, {results['model']['policy']}", fontsize=9)
    ax.legend(fontsize=8)
    names = list(results["utilisation"])
    bx.bar(names, [results["utilisation"][n] for n in names], color="tab:green")
    bx.set_ylim(0, 1)
    bx.set_ylabel("busy fraction")
    bx.set_title(f"per-stage utilisation (one process, {_common.cpu_label()})", fontsize=9)
    _common.save_figure(fig, cfg.out, "char_transformer.png")


POSITIVE = ("context", "dim", "heads", "blocks", "stages", "microbatches", "batch_size", "steps",
            "eval_every", "val_windows", "temperature", "lr")  # fmt: skip


def check(c: Config) -> str | None:
    """What is wrong with ``c`` that argparse cannot see, or None."""
    if not 1 <= c.stages <= c.blocks:
        return f"need 1 <= --stages <= --blocks (a block per stage), got {c.stages} and {c.blocks}"
    if c.dim % c.heads:
        return f"--dim {c.dim} is not a multiple of --heads {c.heads}: each head gets dim // heads"
    if c.microbatches > c.batch_size:
        return (
            f"--microbatches {c.microbatches} is more than the rows of a minibatch "
            f"(--batch-size {c.batch_size})"
        )
    if problem := _common.fraction_problem("--val-fraction", c.val_fraction, zero=False):
        return problem
    # both parts of the text must hold a window (and the first position after it): the
    # validation part is the last val_fraction of the text
    chars = len(load_text())
    val = chars - int(chars * (1 - c.val_fraction))
    if min(val, chars - val) < c.context + 2:
        return (
            f"--val-fraction {c.val_fraction} leaves {val} of {chars} characters for validation "
            f"and {chars - val} for training; each needs more than --context {c.context} + 1"
        )
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {"policy": ("OneFOneB", "PipeDream")}
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=POSITIVE
    )
    start = time.perf_counter()
    results = run(cfg)
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {cfg.out}/results.json")
    return results


if __name__ == "__main__":
    main()
