"""Wall and CPU time of a short ``spml-deploy train`` run by torch thread count and OpenMP wait
policy: torch's default policy (idle threads spin for a while before sleeping) against the
passive one the command line now sets (``OMP_WAIT_POLICY=PASSIVE`` unless the user set it).

Each configuration runs in a fresh process (the policy is read when torch loads OpenMP); the
configurations alternate, ``--repeats`` times, so that a changing load on a shared machine
spreads over all of them. Prints a markdown table (median of the repeats).

    .venv/bin/python benchmarks/train_threads.py --iters 30 --repeats 2 \\
        --out benchmarks/results/train_threads.md
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# "default": the command line's click group called directly, so main() sets no policy (what
# every command did before); "passive": the entry point, which sets OMP_WAIT_POLICY=PASSIVE.
LAUNCH = {"default": "import sys; from spml_deploy.cli import cli; cli(sys.argv[1:])",
          "passive": "import sys; from spml_deploy.cli import main; main(sys.argv[1:])"}


def one_run(policy: str, threads: int, scenes: Path, work: Path, iters: int) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one training run."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = work / f"run-{policy}-{threads}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-c", LAUNCH[policy], "train", str(scenes), "--out", str(out),
           "--iters", str(iters), "--batch", "4", "--crop", "64", "--threads", str(threads),
           "--quiet", "--set", "train.classifier_iters=0"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--out", type=Path, help="Also write the markdown table here.")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    from spml_deploy.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="spml-train-threads-") as tmp_s:
        tmp = Path(tmp_s)
        synthesize(tmp / "scenes", n_train=16, n_val=0, size=64, seed=0)
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        load = []
        for _ in range(args.repeats):
            for policy in LAUNCH:
                for n in threads:
                    load.append(os.getloadavg()[0])
                    results.setdefault((policy, n), []).append(
                        one_run(policy, n, tmp / "scenes", tmp, args.iters))
    lines = [f"`spml-deploy train` on 16 built-in 64 px scenes, tiny preset, {args.iters} "
             f"iterations, batch 4, crop 64, no final classifier; median of {args.repeats} runs "
             "per row, configurations interleaved.", "",
             f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
             f"shared with other jobs: 1-minute load average {min(load):.1f}-{max(load):.1f} "
             "during the runs.", "",
             f"Command: `{' '.join(sys.argv)}`", "",
             "| OpenMP wait policy | threads | wall s | CPU s | CPU / wall |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for (policy, n), runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        name = "torch default (before)" if policy == "default" else "PASSIVE (now the default)"
        lines.append(f"| {name} | {n} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Training threads and the OpenMP wait policy\n\n" + text)


if __name__ == "__main__":
    main()
