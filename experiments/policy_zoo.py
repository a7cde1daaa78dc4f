"""The policy zoo: every schedule and staleness remedy of asyncnn, at equal epochs and equal wall
time, on MNIST-1D's MLP and on the character transformer.

**MNIST-1D**: every setting trains the staleness experiment's 4-stage MLP (40-256-256-256-10,
ReLU, one Linear per stage) from the same weights, on the same shuffled batches of 100, with SGD
(momentum 0.9) and with Adam. **Character transformer**: ``char_transformer.py``'s model, made
small (4 one-block stages, width 32, context 32), on a fixed set of windows of CPython's help
text, with Adam; the score is validation bits per character.

Each epoch ends with the weights scored on held-out data (the run drains there: a continuous
policy's stream restarts each epoch), and the time spent training (scoring excluded) is kept. The
**equal epochs** column is the score after ``epochs`` epochs; the **equal wall time** column the
score at the last epoch end within the time ``Sync`` took for those epochs (a faster setting
trains more epochs in it, up to ``max_epochs``). Per setting it also records the delay of the
gradients each stage applied (``ActorStatistics.delays``), the stages' idle fraction, and the
peak stored activations and parameter versions. ``Async`` depends on thread timing: its settings
run ``async_repeats`` times (mean and spread). Run ``python experiments/policy_zoo.py --help``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
import char_transformer  # noqa: E402 - the character transformer's text and model
from staleness import make_graph  # noqa: E402 - the staleness experiment's chain, as there


@dataclass(frozen=True)
class Config:
    width: int = 256  # the staleness experiment's 40-256-256-256-10 MLP
    epochs: int = 20  # equal epochs for every setting (Sync's accuracy is near its plateau)
    max_epochs: int = 40  # the most a fast setting trains to fill Sync's wall time
    batch_size: int = 100  # the MNIST-1D paper's batch size
    optimizers: tuple[str, ...] = ("sgd", "adam")  # the lr remedies scale SGD's step, not Adam's
    sgd_lr: float = 0.05  # SGD with momentum 0.9: Sync's test accuracy plateaus by 30 epochs
    adam_lr: float = 1e-3  # the staleness experiment's Adam rate
    microbatches: int = 4  # keys per minibatch of the pipelined schedules (PipeDream: 1)
    max_active_keys: int = 16  # Async's depth: its staleness is what the remedies fight
    async_repeats: int = 3  # Async depends on thread timing: its settings run this often
    dc_strength: float = 2.0  # DC-ASGD's lambda
    pipemare_warmup: int = 400  # PipeMare's T, in updates of a stage (~1/2 of the run's updates)
    num_samples: int = 5000  # the published MNIST-1D: 4,000 train / 1,000 test
    train_samples: int = 0  # 0: all; fewer for a quick smoke run
    # comma-separated setting names to run (empty: all); {M} and {A} stand for --microbatches
    # and --max-active-keys, so "Async A={A}" names the Async setting whatever its depth
    only: str = ""
    # -- the character transformer (Adam; "" in tasks skips it)
    tasks: tuple[str, ...] = ("mnist1d", "chars")  # chars: the character transformer
    char_dim: int = 32  # a quarter of char_transformer's width: ~10 s per setting on 2 cores
    char_context: int = 32  # characters per window
    char_batch: int = 16  # windows per minibatch: 4 per microbatch
    char_train_windows: int = 512  # one epoch: 32 minibatches
    char_epochs: int = 6  # equal epochs: 192 minibatches (bits/char well below the unigram's)
    char_max_epochs: int = 12  # as max_epochs, for the transformer
    char_lr: float = 2e-3  # Adam, constant: a schedule would differ with each policy's updates
    char_val_windows: int = 64  # held-out windows scored at each epoch end
    char_only: str = (
        "Sync,OneFOneB M={M},Interleaved1F1B M={M} V=2,ZeroBubbleH1 M={M},PipeDream,"
        "PipeDream2BW M={M},PipeDream + WeightPrediction,Async A={A},"
        "Async A={A} + ConstantScale 1/A,Async A={A} + WeightPrediction"
    )  # settings run on the transformer (empty: all): each schedule, and remedies that helped
    seed: int = 0  # weights, shuffling: the same start for every setting
    out: str = "runs/policy_zoo"  # results.json and PNGs


@dataclass(frozen=True)
class ConstantScale(policies.Remedy):
    """A baseline remedy: every stale gradient scaled by one constant (for SGD, a smaller
    learning rate for the stale updates only), against which the delay-aware ones compare."""

    scale: float = 1.0
    name: ClassVar[str] = "ConstantScale"

    def correct(self, grads: Any, delay: int, version: int, weights: Any, forward: Any) -> Any:
        return _scaled(grads, self.scale)


def _scaled(tree: Any, scale: float) -> Any:
    if isinstance(tree, dict):
        return {k: _scaled(v, scale) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_scaled(v, scale) for v in tree)
    return None if tree is None else tree * scale


def settings(cfg: Config, optimizer: str) -> list[tuple[str, Any]]:
    """Every setting ``(name, policy)``; spike compensation only with SGD (it corrects SGD's
    momentum step)."""
    m = cfg.microbatches
    stale = policies.Async(max_active_keys=cfg.max_active_keys)
    pipe = policies.PipeDream(microbatches=1)
    a = f"Async A={cfg.max_active_keys}"
    out: list[tuple[str, Any]] = [
        ("Sync", policies.Sync()),
        (f"GPipe M={m}", policies.GPipe(m)),
        (f"OneFOneB M={m}", policies.OneFOneB(m)),
        (f"Interleaved1F1B M={m} V=2", policies.Interleaved1F1B(m, virtual=2)),
        (f"ZeroBubbleH1 M={m}", policies.ZeroBubbleH1(m)),
        ("PipeDream", pipe),
        (f"PipeDream2BW M={m}", policies.PipeDream2BW(m)),
        (a, stale),
        (f"{a} + DelayCompensation", policies.DelayCompensation(stale, strength=cfg.dc_strength)),
        (f"{a} + StalenessScaledLR", policies.StalenessScaledLR(stale)),
        (f"{a} + ConstantScale 1/A", ConstantScale(stale, scale=1 / cfg.max_active_keys)),
        (f"{a} + PipeMareLR", policies.PipeMareLR(stale, warmup_updates=cfg.pipemare_warmup)),
        (f"{a} + DiscrepancyCorrection", policies.DiscrepancyCorrection(stale, decay=0.9)),
        (
            f"{a} + WeightPrediction",
            policies.WeightPrediction(
                policies.Async(max_active_keys=cfg.max_active_keys, stash=True)
            ),
        ),  # fmt: skip
        ("PipeDream + DelayCompensation", policies.DelayCompensation(pipe, cfg.dc_strength)),
        ("PipeDream + WeightPrediction", policies.WeightPrediction(pipe)),
    ]
    if optimizer == "sgd":
        out += [
            (f"{a} + SpikeCompensation", policies.SpikeCompensation(stale)),
            ("PipeDream + SpikeCompensation", policies.SpikeCompensation(pipe)),
        ]
    if cfg.only:
        wanted = setting_names(cfg, cfg.only)
        out = [(n, p) for n, p in out if n in wanted]
    return out


def setting_names(cfg: Config, names: str) -> set[str]:
    """The setting names of the comma-separated ``names`` (``--only``, ``--char-only``), with
    ``{M}`` and ``{A}`` replaced by this config's microbatches and keys in flight."""
    m, a = str(cfg.microbatches), str(cfg.max_active_keys)
    names = names.replace("{M}", m).replace("{A}", a)
    return {n.strip() for n in names.split(",") if n.strip()}


def check(cfg: Config) -> str | None:
    """What is wrong with ``cfg`` that argparse cannot see, or None: above all a setting name
    that matches none (a misspelt ``--only`` would otherwise run nothing, silently)."""
    # the equal-epochs score is taken after --epochs: a run capped below that would report an
    # earlier epoch's score in that column
    for most, least in (("max_epochs", "epochs"), ("char_max_epochs", "char_epochs")):
        if getattr(cfg, most) < getattr(cfg, least):
            flags = [f"--{n.replace('_', '-')}" for n in (most, least)]
            return f"{flags[0]} {getattr(cfg, most)} is below {flags[1]} {getattr(cfg, least)}"
    if cfg.char_dim % 2:
        return f"--char-dim must be even (2 attention heads), got {cfg.char_dim}"
    if problem := _common.num_samples_problem(cfg.num_samples):
        return problem
    every = dataclasses.replace(cfg, only="")
    # mnist1d runs each of --optimizers (the SGD-only settings need sgd among them); chars Adam
    opts = cfg.optimizers if "mnist1d" in cfg.tasks else ("adam",)
    known = {n for opt in opts for n, _ in settings(every, opt)}
    chars = {n for n, _ in settings(every, "adam")}
    if unknown := sorted(setting_names(cfg, cfg.only) - known):
        others = sorted({n for n, _ in settings(every, "sgd")} & set(unknown))
        if others:
            return (f"--only names no setting of --optimizers {' '.join(opts)}: {others} (a "
                    "setting of --optimizers sgd only)")  # fmt: skip
        return f"--only names no setting: {unknown}; the settings: {', '.join(sorted(known))}"
    if unknown := sorted(setting_names(cfg, cfg.char_only) - chars):
        return f"--char-only names no setting: {unknown}; the settings: {', '.join(sorted(chars))}"
    picked = setting_names(cfg, cfg.char_only) or chars
    if cfg.only:
        picked &= setting_names(cfg, cfg.only)
    if "chars" in cfg.tasks and not picked:
        return "--only and --char-only leave no setting to run on chars; or pass --tasks mnist1d"
    return None


def make_optimizer(cfg: Config, name: str, task: str) -> Any:
    if name == "sgd":
        return optim.SGD(lr=cfg.sgd_lr, momentum=0.9)
    if name == "adam":
        return optim.Adam(lr=cfg.char_lr if task == "chars" else cfg.adam_lr)
    raise ValueError(f"--optimizers {name!r}: use sgd or adam")


# -- scoring at each epoch end -------------------------------------------------------------------
class Scores(ann.callbacks.Callback):
    """At each epoch end: the training time so far (scoring excluded) and the score of the
    trainer's weights; stops the fit once it has trained ``epochs`` epochs and ``seconds``."""

    def __init__(self, score: Any, epochs: int, seconds: float) -> None:
        self.score = score
        self.epochs = epochs
        self.seconds = seconds
        self.points: list[dict[str, float]] = []
        self.start = 0.0
        self.scoring = 0.0

    def on_fit_start(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
        t0 = time.perf_counter()
        trained = t0 - self.start - self.scoring
        score = float(self.score(trainer.graph, trainer.params))
        self.scoring += time.perf_counter() - t0
        self.points.append({"epoch": epoch + 1, "seconds": trained, "score": score})
        if epoch + 1 >= self.epochs and trained >= self.seconds:
            trainer.stop_training = True

    def at_epochs(self, epochs: int) -> dict[str, float]:
        return self.points[min(epochs, len(self.points)) - 1]

    def within(self, seconds: float) -> dict[str, float]:
        """The last point within ``seconds`` of training (the first, if none is)."""
        inside = [p for p in self.points if p["seconds"] <= seconds]
        return inside[-1] if inside else self.points[0]


def _forward(graph: ann.Graph, params: dict[str, Any], x: Any) -> np.ndarray:
    h = x
    for name in graph.layers:
        h = graph.nodes[name].module(params[name], h)
    return np.asarray(h)


def accuracy_score(x: np.ndarray, y: np.ndarray) -> Any:
    def score(graph: ann.Graph, params: dict[str, Any]) -> float:
        return float(np.mean(np.argmax(_forward(graph, params, x), axis=-1) == y))

    return score


def bits_score(x: np.ndarray, y: np.ndarray) -> Any:
    """Mean cross-entropy in bits per character of (N, C, T) logits against (N, T) ids."""

    def score(graph: ann.Graph, params: dict[str, Any]) -> float:
        logits = _forward(graph, params, x).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        picked = np.take_along_axis(logp, y[:, None, :], axis=1)[:, 0, :]
        return float(-picked.mean() / np.log(2.0))

    return score


# -- one setting ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What a setting trains on: the graph, its data, the score (and whether higher is better)."""

    name: str
    graph: Any  # a function of nothing that builds a fresh graph
    train: dict[str, np.ndarray]
    score: Any
    higher_is_better: bool
    epochs: int
    max_epochs: int
    batch_size: int


def train_one(
    cfg: Config, task: Task, name: str, policy: Any, opt: str, budget: float
) -> dict[str, Any]:
    """Trains one setting for ``task.epochs`` epochs and at least ``budget`` seconds."""
    tr = ann.Trainer(task.graph(), make_optimizer(cfg, opt, task.name), policy, seed=cfg.seed)
    scores = Scores(task.score, task.epochs, budget)
    try:
        hist = tr.fit(task.train, epochs=task.max_epochs, batch_size=task.batch_size,
                      shuffle=True, callbacks=[scores])  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a setting this runtime cannot run is reported
        print(f"{task.name:<8}{opt:<5}{name:<36} not run: {type(exc).__name__}: {exc}")
        return {"task": task.name, "setting": name, "optimizer": opt, "policy": repr(policy),
                "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    layers = tr.graph.layers
    st = {n: hist.statistics[n] for n in layers}
    equal_epochs = scores.at_epochs(task.epochs)
    equal_time = scores.within(budget) if budget else equal_epochs
    result: dict[str, Any] = {
        "task": task.name,
        "setting": name,
        "optimizer": opt,
        "policy": repr(policy),
        "score_equal_epochs": equal_epochs["score"],
        "seconds_for_epochs": equal_epochs["seconds"],
        "score_equal_time": equal_time["score"],
        "epochs_in_time": equal_time["epoch"],
        "budget_seconds": budget,
        "points": scores.points,
        "delay_mean_per_stage": {n: st[n].mean_delay for n in layers},
        "delay_max_per_stage": {n: st[n].max_delay for n in layers},
        "delay_mean": float(np.mean([st[n].mean_delay for n in layers])),
        "idle_fraction": float(
            np.mean(
                [s.idle_seconds / max(s.idle_seconds + s.busy_seconds, 1e-12) for s in st.values()]
            )
        ),  # fmt: skip
        "peak_stored_per_stage": {n: st[n].peak_stored for n in layers},
        "peak_versions_per_stage": {n: st[n].peak_versions_held for n in layers},
        "updates_per_stage": {n: st[n].updates for n in layers},
    }
    print(
        f"{task.name:<8}{opt:<5}{name:<36} {equal_epochs['score']:.3f} at {task.epochs} epochs "
        f"({equal_epochs['seconds']:.1f} s), {equal_time['score']:.3f} in {budget:.1f} s "
        f"({equal_time['epoch']} epochs); delay per stage "
        + " ".join(f"{v:.2f}" for v in result["delay_mean_per_stage"].values())
    )
    return result


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a setting: the first run's record, with the mean and the
    spread of both scores over all of them."""
    row = dict(runs[0])
    ok = [r for r in runs if "error" not in r]
    for key in ("score_equal_epochs", "score_equal_time"):
        values = [r[key] for r in ok]
        if values:
            row[key] = float(np.mean(values))
            row[f"{key}_runs"] = values
            row[f"{key}_std"] = float(np.std(values))
    return row


def run_task(cfg: Config, task: Task, opts: list[str], only: set[str] | None) -> list[dict]:
    rows = []
    for opt in opts:
        chosen = [(n, p) for n, p in settings(cfg, opt) if only is None or n in only]
        # the wall-time budget: Sync's time for the equal epochs (the first setting's without it)
        chosen.sort(key=lambda s: s[0] != "Sync")
        budget = 0.0
        for name, policy in chosen:
            repeats = cfg.async_repeats if policy.deterministic is False else 1
            runs = [train_one(cfg, task, name, policy, opt, budget) for _ in range(repeats)]
            row = _merge(runs)
            if not budget and "error" not in row:
                budget = row["seconds_for_epochs"]
                row["score_equal_time"] = row["score_equal_epochs"]
            rows.append(row)
    return rows


def mnist1d_task(cfg: Config) -> Task:
    data = ann.data.load_mnist1d(num_samples=cfg.num_samples)
    n = cfg.train_samples or len(data["y_train"])
    return Task(
        name="mnist1d",
        graph=lambda: make_graph(cfg),
        train={"x": data["x_train"][:n], "y": data["y_train"][:n]},
        score=accuracy_score(data["x_test"], data["y_test"]),
        higher_is_better=True,
        epochs=cfg.epochs,
        max_epochs=cfg.max_epochs,
        batch_size=cfg.batch_size,
    )


def chars_task(cfg: Config) -> Task:
    text = char_transformer.load_text()
    ids, chars = char_transformer.encode(text)
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(cfg.seed)
    t = cfg.char_context
    train = char_transformer.windows(
        train_ids, rng.integers(0, len(train_ids) - t - 1, cfg.char_train_windows), t
    )
    val = char_transformer.windows(
        val_ids, rng.integers(0, len(val_ids) - t - 1, cfg.char_val_windows), t
    )
    model_cfg = char_transformer.Config(
        context=t, dim=cfg.char_dim, heads=2, blocks=4, stages=4, seed=cfg.seed
    )

    def graph() -> ann.Graph:
        modules, sizes = char_transformer.build_modules(model_cfg, len(chars))
        return ann.Graph.sequential(
            modules, loss=nn.CrossEntropyLoss(), stages=sizes,
            input_shape=(None, t), input_dtype="int64",
            label_shape=(None, t), label_dtype="int64",
        )  # fmt: skip

    return Task(
        name="chars",
        graph=graph,
        train=train,
        score=bits_score(val["x"], val["y"]),
        higher_is_better=False,
        epochs=cfg.char_epochs,
        max_epochs=cfg.char_max_epochs,
        batch_size=cfg.char_batch,
    )


# -- the figure and main --------------------------------------------------------------------------
def plot(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    plt = _common.pyplot()
    paths = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == task]
        names = list(dict.fromkeys(r["setting"] for r in sel))
        opts = list(dict.fromkeys(r["optimizer"] for r in sel))
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(names) + 1.6), sharey=True)
        height = 0.8 / max(1, len(opts))
        for ax, key, label in zip(
            axes, ("score_equal_epochs", "score_equal_time"), ("equal epochs", "equal wall time"),
            strict=True,
        ):  # fmt: skip
            for j, opt in enumerate(opts):
                val = {r["setting"]: r.get(key, np.nan) for r in sel if r["optimizer"] == opt}
                ys = np.arange(len(names)) + j * height
                ax.barh(ys, [val.get(n, np.nan) for n in names], height=height, label=opt)
            ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2)
            ax.set_yticklabels(names, fontsize=8)
            ax.set_xlabel("test accuracy" if task == "mnist1d" else "validation bits/char")
            ax.set_title(f"{task}: {label}", fontsize=9)
            ax.legend(fontsize=8)
        axes[0].invert_yaxis()
        fig.tight_layout()
        paths.append(_common.save_figure(fig, cfg.out, f"policy_zoo_{task}.png"))
    return paths


def _score(row: dict[str, Any], key: str) -> str:
    if "error" in row:
        return "not run"
    text = f"{row[key]:.3f}"
    if f"{key}_std" in row and len(row[f"{key}_runs"]) > 1:
        text += f" ± {row[f'{key}_std']:.3f}"
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as Markdown tables, one per task (``table.md`` in the output folder)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sel = [r for r in rows if r["task"] == task]
        opts = list(dict.fromkeys(r["optimizer"] for r in sel))
        unit = "test accuracy" if task == "mnist1d" else "val. bits/char"
        head = "| setting |"
        for o in opts:
            head += f" {unit} {o}, equal epochs | {o}, equal wall time (epochs) |"
        head += " delay mean per stage | peak stored keys | peak versions | idle fraction |"
        out += [f"**{task}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for name in dict.fromkeys(r["setting"] for r in sel):
            by_opt = {r["optimizer"]: r for r in sel if r["setting"] == name}
            line = f"| {name} |"
            for o in opts:
                r = by_opt.get(o)
                if r is None:
                    line += " | |"
                    continue
                epochs = "" if "error" in r else f" ({r['epochs_in_time']})"
                line += f" {_score(r, 'score_equal_epochs')} | {_score(r, 'score_equal_time')}"
                line += f"{epochs} |"
            first = next(r for r in by_opt.values())
            if "error" in first:
                out.append(line + " | | | |")
                continue
            per = " / ".join(f"{v:.2f}" for v in first["delay_mean_per_stage"].values())
            stored = " / ".join(str(v) for v in first["peak_stored_per_stage"].values())
            versions = " / ".join(str(v) for v in first["peak_versions_per_stage"].values())
            line += f" {per} | {stored} | {versions} | {first['idle_fraction']:.2f} |"
            out.append(line)
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {"optimizers": ("sgd", "adam"), "tasks": ("mnist1d", "chars")}
    positive = (
        "width", "epochs", "max_epochs", "batch_size", "microbatches", "max_active_keys",
        "async_repeats", "pipemare_warmup", "num_samples", "char_dim", "char_context",
        "char_batch", "char_train_windows", "char_epochs", "char_max_epochs", "char_val_windows",
        "sgd_lr", "adam_lr", "char_lr",
    )  # fmt: skip
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=positive
    )
    os.makedirs(cfg.out, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        # Async diverges under SGD (the table shows it): numpy's overflow warnings would bury it
        warnings.simplefilter("ignore", RuntimeWarning)
        if "mnist1d" in cfg.tasks:
            rows += run_task(cfg, mnist1d_task(cfg), list(cfg.optimizers), None)
        if "chars" in cfg.tasks:
            only = setting_names(cfg, cfg.char_only) or None
            rows += run_task(cfg, chars_task(cfg), ["adam"], only)
    plots = plot(cfg, rows)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(markdown_table(rows))
    total = time.perf_counter() - start
    print(f"the whole zoo: {total:.0f} s")
    return _common.finish(cfg.out, cfg, {"rows": rows, "plots": plots, "seconds": total})


if __name__ == "__main__":
    main()
