"""``python benchmarks/step_time.py``: AdamW step time against Optax, PyTorch and memory.

An AdamW step on float32 params reads the params, gradients and both moments and writes
the params and moments: 28 bytes per parameter, so it is bound by memory bandwidth. For each
tree this script times one training step of

* a bandwidth probe with exactly that traffic (read 4 arrays, write 3, in place), the
  practical limit on this machine;
* ``adamw_jax.adamw`` in the Optax protocol (``update`` + ``optax.apply_updates`` in one
  jitted function, params and state donated);
* the same with ``moment_layout="packed"`` (small leaves' moments in shared buffers);
* ``adamw_jax.fused_adamw``'s fused step (the C++ kernel on CPU, XLA elsewhere);
* the same optimizer in the Optax protocol (its ``update``, then ``optax.apply_updates``),
  as ``nnx.Optimizer``, Flax's ``TrainState`` and ``optax.chain`` call it;
* ``optax.adamw``, the same way as ``adamw_jax.adamw``;
* ``torch.optim.AdamW`` with ``foreach=False``, ``foreach=True`` and ``fused=True`` (on CUDA
  when available), if PyTorch is installed;
* with ``--moments int8 int4``, per low-bit storage: a probe with the traffic of the fused
  step on it (per block: params and both moments' codes and scales read and written, the
  gradient read: 16 bytes per parameter with int8 codes, 14 with int4, plus the scales),
  ``fused_adamw`` with those moments, and ``adamw``'s XLA step with them.

Contenders are timed in interleaved rounds, so that the machine's noise hits them all
alike, and the table reports the median, min and max milliseconds per step, the ratio of
the median to ``optax.adamw``'s and to the float32 fused step's, the percentage of the
speed of the probe with the row's traffic, the jit compile time and the compiled step's
peak memory (arguments + outputs - donated aliases + temporaries).

Example::

    python benchmarks/step_time.py                   # all four trees, default sizes
    python benchmarks/step_time.py --quick           # tiny sizes, seconds
    python benchmarks/step_time.py --trees gpt many --rounds 11 --json out.json
    # the fused step on float32, int8 and int4 moments, and their probes:
    python benchmarks/step_time.py --trees lm16m array64m --moments int8 int4 --fused-only

It needs ``adamw_jax`` installed (``pip install -e .``), or ``PYTHONPATH=.`` in the
repository's root; its contenders come from ``step_time_contenders.py`` beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Sequence

import jax
import step_time_contenders as bc

TREES = ("array16m", "array64m", "gpt", "many")  # the default run's
ALL_TREES = (*TREES, "lm16m")
COLUMNS = (
    "contender",
    "median ms",
    "min ms",
    "max ms",
    "vs optax",
    "vs fused",
    "% of limit",
    "compile s",
    "peak MB",
    "note",
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/step_time.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trees", nargs="+", choices=ALL_TREES, default=list(TREES))
    parser.add_argument(
        "--moments",
        nargs="+",
        choices=bc.LOWBIT,
        default=[],
        help="also time the fused step on these moments, with their probes",
    )
    parser.add_argument(
        "--fused-only",
        action="store_true",
        help="time only the probes and the fused steps (no Optax-protocol or PyTorch rows)",
    )
    parser.add_argument("--scale", type=float, default=None, help="multiplies every size")
    parser.add_argument("--leaves", type=int, default=None, help="leaves of the 'many' tree")
    parser.add_argument("--blocks", type=int, default=None, help="blocks of the 'gpt' tree")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--round-seconds", type=float, default=None, help="per contender")
    parser.add_argument(
        "--pause", type=float, default=None, help="seconds of idle before each contender"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and rounds (tests)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    defaults = (1 / 1024, 8, 1, 2, 0.0, 0.0) if args.quick else (1.0, 1000, 12, 7, 0.3, 0.05)
    names = ("scale", "leaves", "blocks", "rounds", "round_seconds", "pause")
    for name, default in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if min(args.leaves, args.blocks, args.rounds) < 1 or args.scale <= 0:
        parser.error("--scale must be > 0; --leaves, --blocks and --rounds >= 1")
    if min(args.round_seconds, args.pause) < 0:
        parser.error("--round-seconds and --pause must be >= 0")
    return args


def _time_rounds(
    contenders: list[bc.Contender], rounds: int, round_seconds: float, pause: float
) -> None:
    """Fills each contender's ``times_ms``: ms per step, one entry per round."""
    steps = {}
    for c in contenders:  # warm up, and size each contender's round
        c.step()
        c.sync()
        start = time.perf_counter()
        c.step()
        c.sync()
        once = max(time.perf_counter() - start, 1e-6)
        steps[c.name] = max(1, min(1000, round(round_seconds / once)))
    for r in range(rounds):
        shift = r % len(contenders)  # rotate the order so that no one always goes first
        for c in contenders[shift:] + contenders[:shift]:
            time.sleep(pause)  # lets the previous contender's worker threads go idle
            n = steps[c.name]
            start = time.perf_counter()
            for _ in range(n):
                c.step()
            c.sync()
            c.times_ms.append(1e3 * (time.perf_counter() - start) / n)


def _rows(contenders: list[bc.Contender]) -> list[dict]:
    medians = {c.name: statistics.median(c.times_ms) for c in contenders}
    reference, fused = medians.get(bc.REFERENCE), medians.get(bc.FUSED)
    rows = []
    for c in contenders:
        median, probe = medians[c.name], medians.get(c.probe)
        rows.append(
            {
                "contender": c.name,
                "median_ms": median,
                "min_ms": min(c.times_ms),
                "max_ms": max(c.times_ms),
                "ratio_to_optax": median / reference if reference else None,
                "ratio_to_fused": median / fused if fused else None,
                "percent_of_limit": 100 * probe / median if probe else None,
                "compile_s": c.compile_s,
                "peak_mb": c.peak_mb,
                "note": c.note,
                "times_ms": c.times_ms,
            }
        )
    return rows


def _format_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [
        [
            r["contender"],
            fmt(r["median_ms"], ".2f"),
            fmt(r["min_ms"], ".2f"),
            fmt(r["max_ms"], ".2f"),
            fmt(r["ratio_to_optax"], ".2f"),
            fmt(r["ratio_to_fused"], ".2f"),
            fmt(r["percent_of_limit"], ".0f"),
            fmt(r["compile_s"], ".2f"),
            fmt(r["peak_mb"], ".0f"),
            r["note"],
        ]
        for r in rows
    ]
    table = [list(COLUMNS), *lines]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    out = []
    for k, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [
            row[i].rjust(widths[i]) for i in range(1, len(COLUMNS) - 1)
        ]
        out.append("| " + " | ".join([*cells, row[-1].ljust(widths[-1])]) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def run_tree(name: str, args: argparse.Namespace) -> dict:
    """Times every contender on one tree; returns its record (also printed)."""
    shapes = bc.tree_shapes(name, args.scale, args.leaves, args.blocks)
    params = bc.make_tree(shapes, seed=0, std=0.02)
    grads = bc.make_tree(shapes, seed=1, std=1.0)
    size = sum(p.size for p in params.values())
    contenders = bc.jax_contenders(params, grads, fused_only=args.fused_only)
    contenders += bc.lowbit_contenders(params, grads, args.moments, fused_only=args.fused_only)
    if not (args.no_torch or args.fused_only):
        contenders += bc.torch_contenders(params, grads)
    _time_rounds(contenders, args.rounds, args.round_seconds, args.pause)
    rows = _rows(contenders)
    probe_ms = next(r["median_ms"] for r in rows if r["contender"] == bc.PROBE)
    # The low-bit probes' traffic: params and gradient (12 bytes/param) and the moments'
    # codes and scales, read and written.
    lowbit = {
        c.name: (12 * int(size) + 2 * c.moment_bytes, c.times_ms)
        for c in contenders
        if c.moment_bytes is not None
    }
    record = {
        "tree": name,
        "title": bc.tree_title(name, shapes),
        "params": int(size),
        "leaves": len(shapes),
        "bytes_per_step": 28 * int(size),
        "probe_gb_per_s": 28 * size / (probe_ms * 1e6),
        "lowbit_probes": {
            k: {"bytes_per_step": b, "gb_per_s": b / (statistics.median(t) * 1e6)}
            for k, (b, t) in lowbit.items()
        },
        "rows": rows,
    }
    print(
        f"\n{record['title']}: {size:,} params in {len(shapes)} leaves; probe moves "
        f"{record['probe_gb_per_s']:.1f} GB/s (28 bytes/param)"
        + "".join(
            f"; {k} {v['gb_per_s']:.1f} GB/s ({v['bytes_per_step'] / size:.2f} bytes/param)"
            for k, v in record["lowbit_probes"].items()
        )
    )
    print(_format_table(rows))
    del contenders
    gc.collect()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; ``argv`` as on the command line (None: ``sys.argv[1:]``)."""
    args = _parse(argv)
    device = jax.devices()[0]
    header = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "scale": args.scale,
    }
    print(
        f"AdamW step, float32, lr={bc.LEARNING_RATE}, weight_decay={bc.WEIGHT_DECAY}; jax "
        f"{header['jax']} on {header['backend']} ({header['device']}); {args.rounds} "
        "interleaved rounds; 'vs optax' = median / optax.adamw's median; 'vs fused' = "
        "median / the float32 fused step's; '% of limit' = time of the probe with the row's "
        "traffic / step time."
    )
    with jax.numpy_dtype_promotion("standard"):  # as optax.adamw expects
        records = [run_tree(name, args) for name in args.trees]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "trees": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
