"""The main job: MNIST-1D through a multi-stage actor graph under PipeDream.

An MLP 40-512-512-512-10 split into 3 stages (actors), trained with 1F1B pipelining and weight
stashing on the locally generated MNIST-1D (4,000 train / 1,000 test, no download). Prints the
test accuracy, the wall time, and each actor's utilisation; writes a JSON of the results.

Run: python experiments/pipeline_mnist1d.py [--epochs N] [--policy PipeDream|Sync|GPipe|OneFOneB|Async]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import asyncnn as ann
from asyncnn import data, nn, optim, policies


@dataclass(frozen=True)
class Config:
    epochs: int = 30  # enough for the MLP to pass the paper's 68% with margin
    batch_size: int = 100  # the MNIST-1D paper's batch size
    microbatches: int = 4  # keys per minibatch: fills a 3-stage pipeline (bubble 2/6 under a flush)
    stages: int = 3  # actors holding layers; a loss node is not a stage
    hidden: int = 512  # wide enough that each stage's matmuls dominate message costs
    lr: float = 1e-3  # Adam's usual rate; PipeDream updates per microbatch, so keep it modest
    policy: str = "PipeDream"  # any of asyncnn.policies' names
    seed: int = 0  # weights, shuffling
    out: str = "runs/pipeline_mnist1d"  # where results.json goes


def make_policy(cfg: Config) -> policies.Policy:
    if cfg.policy == "Sync":
        return policies.Sync()
    if cfg.policy == "Async":
        return policies.Async(max_active_keys=cfg.stages + 1)
    return getattr(policies, cfg.policy)(cfg.microbatches)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(Config):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--progress", action="store_true", help="show a live progress bar")
    args = ap.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})

    ds = data.load_mnist1d()
    train = {"x": ds["x_train"], "y": ds["y_train"]}
    test = {"x": ds["x_test"], "y": ds["y_test"]}
    h = cfg.hidden
    layers = [
        nn.Linear(40, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Linear(h, 10),
    ]
    graph = ann.Graph.sequential(
        layers, loss=nn.CrossEntropyLoss(), stages=cfg.stages, input_shape=(None, 40)
    )
    trainer = ann.Trainer(
        graph,
        optimizer=optim.Adam(lr=cfg.lr),
        policy=make_policy(cfg),
        seed=cfg.seed,
        progress=args.progress,
    )
    start = time.perf_counter()
    hist = trainer.fit(train, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True)
    seconds = time.perf_counter() - start
    result = trainer.evaluate(test)
    util = hist.utilisation()
    print(
        f"{cfg.policy} on {cfg.stages} stages, {cfg.epochs} epochs: test accuracy {result['accuracy']:.1%}, "
        f"test loss {result['loss']:.3f}, {seconds:.1f} s ({hist.samples_per_second:.0f} samples/s)"
    )
    print("actor utilisation (busy fraction of the last fit):")
    for name, u in util.items():
        st = hist.statistics[name]
        print(
            f"  {name:<8} {u:6.1%} busy   {st.forwards:6d} forwards  {st.updates:6d} updates  peak stored {st.peak_stored}"
        )
    report = {
        "config": dataclasses.asdict(cfg),
        "test": result,
        "seconds": seconds,
        "samples_per_second": hist.samples_per_second,
        "utilisation": util,
        "final_train_loss": hist.losses[-1],
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
