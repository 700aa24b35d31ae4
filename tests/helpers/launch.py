"""Running `finetune train` as a user types it: on two processes (gloo on CPU), or on one with the same global
batch, and comparing the weights they save."""

import socket

from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe, output, *args):
    """`finetune train RECIPE --nproc 2` as a user types it."""
    return runner.invoke(app, ["train", str(recipe), "--nproc", "2", "--main-process-port", str(free_port()),
                               "--output", str(output), *map(str, args)])


def single(recipe, output, *sets):
    """The same recipe in one process, with the global batch of the 2-process run (batch 2 x 2 ranks = 4)."""
    args = ["train", str(recipe), "--output", str(output), "--set", "distributed.strategy=none",
            "--set", "train.batch_size=4"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def max_diff(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a)
