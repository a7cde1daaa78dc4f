"""Synthetic gradients (Jaderberg et al. 2016, "Decoupled Neural Interfaces", DNI) as custom actors.

Each hidden stage of an MLP on MNIST-1D runs a :class:`SyntheticGradientLayer`: right after its
forward it predicts the gradient of its output with a linear synthesizer ``M(h) = h A + b``
(initialised to zero, as in the paper), updates its weights from that prediction at once, and
sends its output on. When the true gradient of the output arrives later (its backward), it trains
``M`` toward it (squared error, its own Adam state) and sends upstream the input gradient it had
computed from the synthetic gradient at forward time, which is what trains the synthesizer below
(the paper's bootstrapping). ``cdni`` also feeds the labels to the synthesizer (the paper's cDNI).
Compared against plain backprop on the same network, under ``Sync`` and ``PipeDream``.

Run ``python experiments/synthetic_gradients.py --help``; results go to ``runs/synthetic_gradients``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, ClassVar

import numpy as np

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # weights, shuffling; one seed so every run starts from the same weights
    width: int = 256  # the MLP width of the MNIST-1D baseline (experiments/train_mnist1d.py)
    hidden_stages: int = 3  # 3 hidden stages + the output layer: a 4-stage pipeline
    epochs: int = 30  # backprop's test accuracy has plateaued by then; each run 4-8 s here
    batch_size: int = 100  # the MNIST-1D paper's batch size
    lr: float = 1e-3  # Adam for the layers, the same for backprop and DNI
    synth_lr: float = 1e-3  # Adam for the synthesizers; 1e-4 learns too slowly in 30 epochs
    upstream: str = "synthetic"  # what DNI sends down: "synthetic" (the paper) or "none" (cut)
    methods: tuple[str, ...] = ("backprop", "dni", "cdni")  # cdni: synthesizer also reads labels
    policies: tuple[str, ...] = ("Sync", "PipeDream")  # each method under both
    num_samples: int = 5000  # the published MNIST-1D size: 4,000 train / 1,000 test
    out: str = "runs/synthetic_gradients"  # results.json and the PNGs


COLORS = {"backprop": "C0", "dni": "C3", "cdni": "C2"}  # one colour per method in the plots
STYLES = {"Sync": "-", "PipeDream": "--"}  # one line style per policy


class SyntheticGradientLayer(ann.LayerActor):
    """A layer decoupled by a synthetic gradient model (DNI).

    The synthesizer is this actor's own state: its parameters and Adam state live here, not in
    the run's parameters. Its hyperparameters come as ``actor_args`` (part of the graph's spec,
    so they reach worker processes too), and the run carries the synthesizer from one ``fit`` to
    the next through :meth:`actor_state` (checkpoints keep it too).
    """

    #: node name -> relative squared error of each key's synthetic gradient (a report only)
    synth_losses: ClassVar[dict[str, list[float]]] = {}

    def setup(self, synth_lr: float = 1e-3, upstream: str = "synthetic") -> None:
        if upstream not in ("synthetic", "none"):
            raise ValueError(f"upstream must be 'synthetic' or 'none', got {upstream!r}")
        self.synth_lr, self.upstream = float(synth_lr), upstream
        self.synth: tuple[Any, Any] | None = None  # (synth params, synth opt state), made lazily
        self.pending: dict[int, tuple[Any, Any]] = {}  # key -> (features, input gradients)

    def actor_state(self) -> Any:
        return None if self.synth is None else {"params": self.synth[0], "opt": self.synth[1]}

    def load_actor_state(self, state: Any) -> None:
        self.synth = (state["params"], state["opt"])

    def _synthesizer(self, out: Any) -> tuple[Any, Any, Any]:
        width = int(out.shape[-1])
        module = nn.Linear(width + (10 if self.conditioned else 0), width)
        opt = optim.Adam(lr=self.synth_lr)
        if self.synth is None:
            params = module.init(self.ctx.seed, backend="numpy", dtype=str(out.dtype))
            params = {k: self.backend.asarray(v * 0) for k, v in params.items()}  # zero init
            self.synth = (params, opt.init(params))
        return module, opt, self.synth

    @property
    def conditioned(self) -> bool:
        """cDNI: the node's second input is the labels, which the synthesizer also reads."""
        return len(self.node.inputs) == 2

    def _features(self, out: Any, inputs: list[Any]) -> Any:
        if not self.conditioned:
            return out
        xp = self.backend.xp
        one_hot = (inputs[1][:, None] == xp.arange(10)[None, :]).astype(out.dtype)
        return xp.concatenate([out, one_hot], axis=1)

    def _scale(self, meta: dict[str, Any]) -> float:
        # The gradient of the loss as the policy seeds it, per row: the synthesizer predicts the
        # gradient of one sample's loss, so its targets keep one scale whatever the batch split.
        rows = int(meta["rows"])
        return self.ctx.policy.loss_cotangent(rows, int(meta["mb_rows"])) / rows

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        scale = self._scale(meta)

        def forward_and_update(params: Any, xs: list[Any]) -> tuple[Any, Any, Any]:
            out, pullback = ann.vjp(lambda p, x: self.module(p, *x), params, xs)
            module, _, (sp, _) = self._synthesizer(out)
            synthetic = module(sp, self._features(out, xs)) * scale
            param_grads, input_grads = pullback(synthetic)
            return out, param_grads, input_grads

        out, param_grads, input_grads = await self.compute(forward_and_update, self.params, inputs)
        await self.apply_gradients(param_grads)  # no waiting for the true gradient
        self.pending[key] = (self._features(out, inputs), input_grads)
        return out

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        features, input_grads = self.pending.pop(key)
        if grad is not None:
            module, opt, (sp, state) = self._synthesizer(grad)
            target = grad / self._scale(meta)
            rows = int(meta["rows"])

            def train_synthesizer(sp: Any, state: Any) -> tuple[Any, Any, Any, Any]:
                loss, g = ann.value_and_grad(
                    lambda p: ops.sum(ops.square(module(p, features) - target)) / rows
                )(sp)
                sp, state = opt.update(sp, g, state)
                return sp, state, loss * rows, (target * target).sum()

            sp, state, error, energy = await self.compute(train_synthesizer, sp, state)
            self.synth = (sp, state)
            if float(energy) > 0:  # relative error: 1 is "predicts nothing" (the zero start)
                self.synth_losses.setdefault(self.name, []).append(float(error) / float(energy))
        if self.upstream == "none":
            return [None] * len(self.node.inputs)
        return list(input_grads)


@dataclasses.dataclass(frozen=True)
class IgnoreLabels(nn.Module):
    """``block`` applied to its first input; the second (the labels) is there for the actor's
    label-conditioned synthesizer (cDNI), which is the only way to get labels to an actor."""

    block: nn.Module

    def init_params(self, init: Any) -> Any:
        return self.block.init_params(init)

    @property
    def stochastic(self) -> bool:
        # it only passes its rng on: as random as its block (else a Generator per key for
        # nothing, and no CUDA-graph capture on a GPU)
        return bool(self.block.stochastic)

    def __call__(self, params: Any, x: Any, labels: Any, *, rng: Any = None) -> Any:
        return self.block(params, x, rng=rng)


def build_graph(cfg: Config, method: str) -> ann.Graph:
    """``hidden_stages`` stages Linear+ReLU, then a Linear output stage and a cross-entropy.

    ``method`` is ``"backprop"`` (plain actors), ``"dni"`` or ``"cdni"`` (labels fed to each
    hidden stage, for its synthesizer)."""
    g = ann.Graph()
    h = g.input("x", shape=(None, 40))
    y = g.input("y", shape=(None,), dtype="int64")
    width_in = 40
    args = {"synth_lr": cfg.synth_lr, "upstream": cfg.upstream}
    for i in range(cfg.hidden_stages):
        block = nn.Sequential(nn.Linear(width_in, cfg.width), nn.ReLU())
        if method == "backprop":
            h = g.layer(f"block{i}", block, h)
        elif method == "dni":
            h = g.layer(f"block{i}", block, h, actor=SyntheticGradientLayer, actor_args=args)
        else:
            h = g.layer(
                f"block{i}", IgnoreLabels(block), h, y, actor=SyntheticGradientLayer,
                actor_args=args,
            )  # fmt: skip
        width_in = cfg.width
    out = g.layer("head", nn.Linear(cfg.width, 10), h)  # gets the true gradient at once
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def make_policy(name: str) -> Any:
    """``Sync`` (one key per minibatch, flush) or ``PipeDream`` (one key per minibatch, no flush:
    up to 4 minibatches in the pipeline, each stage updating after its backward)."""
    if name == "Sync":
        return policies.Sync()
    if name == "PipeDream":
        return policies.PipeDream(microbatches=1)
    raise ValueError(f"unknown policy {name!r}: use Sync or PipeDream")


def train_one(cfg: Config, data: dict[str, np.ndarray], method: str, policy: str) -> dict[str, Any]:
    """Trains one (method, policy) pair epoch by epoch; returns its curves and totals."""
    dni = method != "backprop"
    SyntheticGradientLayer.synth_losses.clear()
    tr = ann.Trainer(
        build_graph(cfg, method), optimizer=optim.Adam(lr=cfg.lr), policy=make_policy(policy),
        seed=cfg.seed,
    )  # fmt: skip
    train = {"x": data["x_train"], "y": data["y_train"]}
    test = {"x": data["x_test"], "y": data["y_test"]}
    losses: list[float] = []
    test_acc: list[float] = []
    seconds = 0.0
    for _ in range(cfg.epochs):
        hist = tr.fit(train, epochs=1, batch_size=cfg.batch_size, shuffle=True)
        seconds += hist.seconds
        losses += hist.losses
        test_acc.append(float(tr.evaluate(test)["accuracy"]))
    final_train = tr.evaluate(train)
    synth = {k: v for k, v in SyntheticGradientLayer.synth_losses.items()} if dni else {}
    label = f"{ {'backprop': 'backprop', 'dni': 'DNI', 'cdni': 'cDNI'}[method] } / {policy}"
    print(
        f"{label:22s} test accuracy {test_acc[-1]:.3f} (best {max(test_acc):.3f}), train "
        f"accuracy {final_train['accuracy']:.3f}, {seconds:.1f} s"
    )
    return {
        "method": method,
        "policy": policy,
        "label": label,
        "test_accuracy": test_acc[-1],
        "best_test_accuracy": max(test_acc),
        "train_accuracy": final_train["accuracy"],
        "train_loss": final_train["loss"],
        "seconds": round(seconds, 2),
        "test_accuracy_per_epoch": test_acc,
        "loss_per_step": losses,
        "synth_loss_per_key": synth,
    }


def plot(cfg: Config, runs: list[dict[str, Any]], out: str) -> list[str]:
    """Loss and test-accuracy curves; the synthesizers' squared error."""
    plt = _common.pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps_per_epoch = max(1, len(runs[0]["loss_per_step"]) // cfg.epochs)
    for r in runs:
        losses = np.asarray(r["loss_per_step"])
        n = len(losses) // steps_per_epoch * steps_per_epoch
        per_epoch = losses[:n].reshape(-1, steps_per_epoch).mean(1)
        look = {"color": COLORS[r["method"]], "ls": STYLES[r["policy"]], "label": r["label"]}
        ax_loss.plot(np.arange(1, len(per_epoch) + 1), per_epoch, **look)
        ax_acc.plot(np.arange(1, cfg.epochs + 1), r["test_accuracy_per_epoch"], **look)
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, MLP {cfg.hidden_stages}x{cfg.width} + head: DNI vs backprop")
    curves = _common.save_figure(fig, out, "synthetic_gradients_curves.png")

    methods = [m for m in ("dni", "cdni") if any(r["method"] == m for r in runs)]
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(10, 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=False):
        for r in runs:
            if r["method"] != method:
                continue
            for i, (name, vals) in enumerate(sorted(r["synth_loss_per_key"].items())):
                v = np.asarray(vals)
                k = max(1, len(v) // 60)
                v = v[: len(v) // k * k].reshape(-1, k).mean(1)
                ax.plot(np.linspace(0, cfg.epochs, len(v)), v, color=f"C{i}",
                        ls=STYLES[r["policy"]], label=f"{name} ({r['policy']})")  # fmt: skip
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xlabel="epoch", ylabel="relative squared error", yscale="log")
        ax.set_title(f"{method.upper().replace('C', 'c')}: ||M - true||^2 / ||true||^2")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    synth = _common.save_figure(fig, out, "synthetic_gradients_synth_error.png")
    return [curves, synth]


def check(cfg: Config) -> str | None:
    """What is wrong with ``cfg`` that argparse cannot see (a usage error, before any
    training), or None."""
    return _common.num_samples_problem(cfg.num_samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {
        "methods": ("backprop", "dni", "cdni"),
        "policies": ("Sync", "PipeDream"),
        "upstream": ("synthetic", "none"),
    }
    positive = ("width", "hidden_stages", "epochs", "batch_size", "num_samples", "lr", "synth_lr")
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=positive
    )
    data = ann.data.load_mnist1d(num_samples=cfg.num_samples)
    start = time.perf_counter()
    runs = [
        train_one(cfg, data, method, policy) for policy in cfg.policies for method in cfg.methods
    ]
    figures = plot(cfg, runs, cfg.out)
    results = {"runs": runs, "figures": figures, "total_seconds": time.perf_counter() - start}
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    main()
