"""jaxpar's train step against MaxText's, side by side on this host; and MFU on a GPU.

Usage (from the repository root):
    python experiments/speed.py [--rounds R] [--steps N] [--jaxpar-python PY ...] [--remat ...]
    python experiments/speed.py --gpu [--steps N]

CPU, side by side: the small Llama of `../shared/peer-maxtext/README.md` (4 layers, d=128, 8/8
heads, MLP 352, vocabulary 256, sequence 128, global batch 16, float32) on mesh a
(`data=2,tensor=4`) and mesh b (`data=2,pipeline=2,tensor=2`, 4 micro-batches; MaxText's config
b). Each round runs, per mesh, MaxText's own trainer (`run_peer.sh`, when it is installed) and
`jaxpar bench` under every given Python (one per jax version) and remat policy, in an order that
turns around every round, so that drift in the host's speed hits every side alike. A run's step
time is its median over the timed steps (MaxText: its logged "seconds" from step 2 on; jaxpar:
`bench`, after 2 warm-up steps), both the spacing of consecutive steps with the host a step
ahead. Reported: per side, the median over rounds of tokens/s, the spread, and the ratio to
MaxText. Writes results/speed.json, .md and .png.

GPU (`--gpu`): `jaxpar bench` on one GPU for a ~350M and a ~1.1B Llama (sequence 2048,
bfloat16 compute, float32 master weights), per remat policy, with MFU and HFU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer-maxtext"
TOKENS = 16 * 128
MODEL = [
    "model.layers=4", "model.dim=128", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=352",
    "model.vocab=256", "train.seq_len=128", "train.batch_size=16", "train.dtype=float32",
]  # fmt: skip
MESHES = {
    "a": ("data=2,tensor=4", []),
    "b": ("data=2,pipeline=2,tensor=2", ["pipeline.microbatches=4"]),
}
GPU_MODELS = {
    "350M": ["model.layers=24", "model.dim=1024", "model.heads=16", "model.kv_heads=8",
             "model.mlp_dim=2816", "model.vocab=32000", "train.batch_size=16"],
    "1.1B": ["model.layers=22", "model.dim=2048", "model.heads=32", "model.kv_heads=4",
             "model.mlp_dim=5632", "model.vocab=32000", "train.batch_size=8"],
}  # fmt: skip
GPU_COMMON = ["train.seq_len=2048", "train.dtype=bfloat16", "train.warmup_steps=2"]


def bench(python: str, mesh: str, overrides: list[str], steps: int) -> dict:
    """`jaxpar bench --json` in a fresh process of `python`."""
    command = [python, "-m", "jaxpar", "bench", "--mesh", mesh, "--steps", str(steps),
               "--warmup", "2", "--json", *overrides]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.index("{") :])


def maxtext(config: str, steps: int, tag: str) -> float:
    """MaxText's median step time (s) on config a or b, from `run_peer.sh`'s summary."""
    root = Path(os.environ.get("TMPDIR", "/tmp")) / "jaxpar_speed_maxtext"
    env = {**os.environ, "TAG": tag, "OUT_ROOT": str(root)}
    out = subprocess.run(["bash", str(PEER / "run_peer.sh"), config, str(steps)], env=env,
                         capture_output=True, text=True, timeout=3600)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"MaxText config {config} failed:\n{out.stderr[-3000:]}")
    return json.loads((root / tag / "summary.json").read_text())["median_step_time_s"]


def maxtext_installed() -> bool:
    venv = Path(os.environ.get("MT_VENV", Path(os.environ.get("TMPDIR", "/tmp")) / "vmt12"))
    return (PEER / "run_peer.sh").exists() and (venv / "bin" / "python").exists()


def jax_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import jax; print(jax.__version__)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def side_by_side(args: argparse.Namespace) -> int:
    sides = [("maxtext", "", "full")] if maxtext_installed() else []
    if not sides:
        print("MaxText is not installed (bash ../shared/peer-maxtext/install.sh): jaxpar alone")
    for python in args.jaxpar_python:
        sides += [("jaxpar", python, remat) for remat in args.remat]
    versions = {python: jax_version(python) for python in args.jaxpar_python}
    times: dict[tuple, list[float]] = {}
    total, done, start = args.rounds * len(MESHES) * len(sides), 0, time.monotonic()
    for r in range(args.rounds):
        for mesh_name, (mesh, extra) in MESHES.items():
            order = sides if r % 2 == 0 else sides[::-1]
            for kind, python, remat in order:
                if kind == "maxtext":
                    step_s = maxtext(mesh_name, args.steps, f"{mesh_name}_{r}")
                else:
                    doc = bench(python, mesh, [*MODEL, *extra, f"model.remat={remat}"], args.steps)
                    step_s = doc["median_step_s"]
                key = (mesh_name, kind, versions.get(python, "0.12 (its venv)"), remat)
                times.setdefault(key, []).append(step_s)
                done += 1
                print(f"[{done}/{total}, {time.monotonic() - start:.0f}s] round {r} mesh "
                      f"{mesh_name} {kind} jax {key[2]} remat {remat}: {step_s * 1e3:.1f} ms",
                      flush=True)  # fmt: skip
    rows = []
    for (mesh_name, kind, jax, remat), ts in times.items():
        tps = [TOKENS / t for t in ts]
        rows.append({"mesh": MESHES[mesh_name][0], "config": mesh_name, "side": kind, "jax": jax,
                     "remat": remat, "step_s": ts, "median_step_s": statistics.median(ts),
                     "tokens_per_s": statistics.median(tps), "min_tokens_per_s": min(tps),
                     "max_tokens_per_s": max(tps)})  # fmt: skip
    for row in rows:
        peer = [p for p in rows if p["config"] == row["config"] and p["side"] == "maxtext"]
        row["vs_maxtext"] = row["tokens_per_s"] / peer[0]["tokens_per_s"] if peer else None
    header = ["mesh", "side", "jax", "remat", "median step ms", "tokens/s (median)",
              "min..max tokens/s", "vs MaxText"]  # fmt: skip
    out = write_results("speed", rows, header, lambda r: [
        r["mesh"], r["side"], r["jax"], r["remat"], f"{r['median_step_s'] * 1e3:.1f}",
        f"{r['tokens_per_s']:,.0f}", f"{r['min_tokens_per_s']:,.0f}..{r['max_tokens_per_s']:,.0f}",
        f"{r['vs_maxtext']:.2f}x" if r["vs_maxtext"] else "",
    ])  # fmt: skip
    plot(rows, out / "speed.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MESHES), figsize=(11, 4.2), sharey=True)
    for ax, name in zip(axes, MESHES, strict=True):
        rs = [r for r in rows if r["config"] == name]
        labels = [f"{r['side']}\njax {r['jax'].split(' ')[0]}\n{r['remat']}" for r in rs]
        med = [r["tokens_per_s"] for r in rs]
        err = [[r["tokens_per_s"] - r["min_tokens_per_s"] for r in rs],
               [r["max_tokens_per_s"] - r["tokens_per_s"] for r in rs]]  # fmt: skip
        colors = ["tab:gray" if r["side"] == "maxtext" else "tab:blue" for r in rs]
        ax.bar(range(len(rs)), med, yerr=err, capsize=3, color=colors)
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_title(f"mesh {name}: {MESHES[name][0]}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("tokens/s (median over rounds; bars min..max)")
    fig.suptitle("train step, 4-layer d=128 Llama, float32, 8 simulated CPU devices", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def gpu(args: argparse.Namespace) -> int:
    rows = []
    for name, overrides in GPU_MODELS.items():
        for remat in args.remat:
            doc = bench(sys.executable, "data=1", [*GPU_COMMON, *overrides, f"model.remat={remat}"],
                        args.steps)  # fmt: skip
            rows.append({"model": name, **doc})
            print(f"{name} remat {remat}: {doc['median_step_s'] * 1e3:.1f} ms, MFU {doc['mfu']}, "
                  f"HFU {doc['hfu']}", flush=True)  # fmt: skip
    percent = lambda x: f"{x:.1%}" if x is not None else "n/a"  # noqa: E731
    header = ["model", "params", "remat", "attention", "batch x seq", "median step ms",
              "tokens/s", "MFU", "HFU"]  # fmt: skip
    write_results("speed_gpu", rows, header, lambda r: [
        r["model"], f"{r['model_params'] / 1e6:.0f}M", r["remat"], r["attention"],
        f"{r['tokens_per_step'] // 2048} x 2048", f"{r['median_step_s'] * 1e3:.1f}",
        f"{r['tokens_per_s']:,.0f}", percent(r["mfu"]), percent(r["hfu"]),
    ])  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--jaxpar-python",
        nargs="+",
        default=[sys.executable],
        help="Pythons with jaxpar installed, e.g. one per jax version",
    )
    parser.add_argument("--remat", nargs="+", default=None,
                        help="jaxpar's model.remat values (CPU default: none full; GPU: none "
                             "dots_no_batch_attn)")  # fmt: skip
    parser.add_argument("--gpu", action="store_true", help="MFU of the 350M and 1.1B models")
    args = parser.parse_args()
    if args.gpu:
        args.remat = args.remat or ["none", "dots_no_batch_attn"]
        return gpu(args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.remat = args.remat or ["none", "full"]
    return side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
