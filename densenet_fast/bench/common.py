"""Shared measuring tools: timing, fresh-process workers, environment metadata,
tables and JSON output.

Times are in seconds, memory in bytes (reported in MiB).  Peak memory on the
CPU is the peak resident set size of a fresh worker process above its
baseline (after imports, model and input creation); on a GPU it is
``torch.cuda.max_memory_allocated`` above the allocation at that baseline.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..cli import CommandFailed

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
GIB = 2**30
RESULT_PREFIX = "RESULT "
BASELINE_PREFIX = "BASELINE "


# -- option types (argparse: a bad value is a usage error, exit status 2) -------------------------------
def at_least(least: int) -> Callable[[str], int]:
    """An option type: an integer of at least ``least``."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return integer


def positive_number(text: str) -> float:
    """An option type: a finite number above 0."""
    value = non_negative_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_number(text: str) -> float:
    """An option type: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def plot_path(out: Path) -> Path:
    """The PNG beside the JSON result ``out``: ``.json`` replaced, any other
    name's ``.png`` added (``run.1`` and ``run.2`` both had ``run.png``)."""
    out = Path(out)
    return out.with_suffix(".png") if out.suffix.lower() == ".json" else out.with_name(out.name + ".png")


def output_file(text: str) -> Path:
    """An option type: a file path that can be written (a JSON result, its PNG
    beside it), checked before anything is measured."""
    path = Path(text)
    if path.suffix.lower() == ".png":  # the plot would be written over the JSON
        raise argparse.ArgumentTypeError(f"{text}: the result is JSON, its plot is written beside it as "
                                         f"<name>.png; give a name such as {path.with_suffix('.json')}")
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name such as "
                                             f"{path / 'result.json'}")
        for file in (path, plot_path(path)):
            if file.is_dir() or (file.exists() and not os.access(file, os.W_OK)):
                raise argparse.ArgumentTypeError(f"cannot write {file}: it is a directory or read-only")
        folder = path.parent
        while not folder.exists():  # the folders write_json would create
            folder = folder.parent
    except OSError as exc:  # a name too long, say
        raise argparse.ArgumentTypeError(f"cannot write {text}: {exc.strerror or exc}") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a writable directory")
    return path


def result_file(benchmark: str, keys: tuple[str, ...] = ("rows",)) -> Callable[[str], Path]:
    """An option type: a JSON result file of ``benchmark`` (its environment and ``keys``)."""
    def path(text: str) -> Path:
        try:
            result = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text} as a JSON result: {exc}") from None
        if not isinstance(result, dict) or result.get("benchmark") != benchmark \
                or not {"environment", *keys} <= result.keys():
            found = result.get("benchmark") if isinstance(result, dict) else None
            raise argparse.ArgumentTypeError(f"{text} is not a result of bench {benchmark} "
                                             f"(its benchmark: {found})")
        return Path(text)
    return path


def device_type(text: str) -> str:
    """An option type: ``cpu``, or ``cuda`` where a GPU is present."""
    import torch
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda: no GPU is available here")
    return text


# -- timing --------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str, lead_cycles: int = 0) -> float:
    """Seconds one call of ``fn`` takes (CUDA events on a GPU, after keeping it
    busy ``lead_cycles`` clock cycles where given, so that the host's launch of
    ``fn`` is not timed)."""
    if device.startswith("cuda"):
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if lead_cycles:
            torch.cuda._sleep(lead_cycles)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_function(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> list[float]:
    """``repeats`` timings (seconds) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return [time_once(fn, device) for _ in range(repeats)]


def summarize(seconds: Iterable[float]) -> dict:
    """Median, quartiles, min and max of a list of timings (seconds); quartiles
    interpolated linearly, as numpy's percentiles (numpy is not needed: a GPU
    machine with only torch and triton runs the benchmarks)."""
    values = [float(v) for v in seconds]
    if not values:
        return {"n": 0}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"n": len(values), "median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "all": values}


# -- fits ------------------------------------------------------------------------------------
def fit(xs: list[float], values: list[float], degree: int) -> Optional[dict]:
    """Least-squares polynomial ``values ~ x`` (coefficients lowest order
    first) and its R^2; ``None`` without enough points."""
    import numpy as np
    if len(xs) < degree + 1:
        return None
    x, y = np.asarray(xs, float), np.asarray(values, float)
    coefficients = np.polyfit(x, y, degree)[::-1]
    predicted = np.polyval(coefficients[::-1], x)
    ss_res, ss_tot = float(((y - predicted) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"coefficients": coefficients.tolist(), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


def evaluate(model_fit: dict, x: float) -> float:
    return float(sum(c * x**i for i, c in enumerate(model_fit["coefficients"])))


# -- memory --------------------------------------------------------------------------------
def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM: ru_maxrss, but resettable)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak to the current resident size (Linux clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_anon_bytes() -> int:
    """Resident memory of this process that is not file-backed (statm resident - shared)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class AnonPeakSampler:
    """Samples :func:`current_anon_bytes` every ``interval_s`` in a thread and keeps the maximum
    of the window that :meth:`restart` ends (code pages of libraries mapped during a step count
    in RSS but not here)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s, self._stop, self._lock = interval_s, threading.Event(), threading.Lock()
        self._peak = current_anon_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _observe(self) -> None:
        with self._lock:
            self._peak = max(self._peak, current_anon_bytes())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._observe()
            time.sleep(self.interval_s)

    def restart(self) -> int:
        """The peak since the previous restart (or the start); a new window begins."""
        self._observe()
        with self._lock:
            peak, self._peak = self._peak, current_anon_bytes()
        return peak

    def __enter__(self) -> "AnonPeakSampler":
        sys.setswitchinterval(self.interval_s / 2)  # let the sampler run between Python-level ops
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def process_rss_bytes(pid: int) -> Optional[int]:
    """Resident set size of process ``pid`` (``None`` once it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def available_memory_bytes() -> int:
    """The memory available to this process (memory.available_memory_bytes; 0 where unknown)."""
    from ..memory import available_memory_bytes as available  # (torch only when asked)
    return available() or 0


# -- fresh-process workers -----------------------------------------------------------------
FAILED = ("error", "timeout")  # outcomes that measured nothing (over_budget, oom and refused are findings)
# this process's measurements (per implementation, or per kernel case): "measured", "failed" or (a result
# --check found wrong) "wrong"; ``bench`` fails when one is wrong or none was measured
outcomes: collections.Counter = collections.Counter()
_said_failures: set[tuple[str, str]] = set()


def run_worker(spec: dict, timeout_s: float, rss_limit_bytes: Optional[float] = None) -> dict:
    """Run ``python -m densenet_fast.bench.worker`` on ``spec`` in a fresh process.

    The parent watches the worker's resident memory and stops it once it
    exceeds ``rss_limit_bytes`` above the baseline the worker announces (on
    the CPU), or once ``timeout_s`` has passed.  Returns the worker's result
    dict, or ``{"status": "over_budget" | "timeout" | "error", ...}``; an
    implementation that failed is said on stderr, once per reason.
    """
    result = _run_worker(spec, timeout_s, rss_limit_bytes)
    per_impl = result["impls"] if "impls" in result else {impl: result for impl in spec["impls"]}
    for impl, outcome in per_impl.items():
        failed = outcome.get("status") in FAILED
        outcomes["failed" if failed else "measured"] += 1
        reason = failure_reason(outcome) if failed else None
        if reason and (impl, reason) not in _said_failures:
            _said_failures.add((impl, reason))
            print(f"{impl}: {outcome['status']}: {reason}", file=sys.stderr, flush=True)
    return result


def failure_reason(outcome: dict) -> str:
    """One line on why a worker measured nothing."""
    if outcome["status"] == "timeout":
        return f"no result within {outcome.get('wall_s', 0):.0f} s"
    lines = (outcome.get("error") or outcome.get("stderr_tail") or "").strip().splitlines()
    return lines[-1] if lines else f"the worker exited with status {outcome.get('returncode')}"


def _run_worker(spec: dict, timeout_s: float, rss_limit_bytes: Optional[float]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONWARNINGS", "ignore::RuntimeWarning")
    proc = subprocess.Popen([sys.executable, "-m", "densenet_fast.bench.worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
    lines: list[str] = []
    errors: list[str] = []
    readers = [threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
               threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    start = time.monotonic()
    try:
        stopped, watched_peak = _watch(proc, lines, start, timeout_s, rss_limit_bytes)
    finally:  # also on Ctrl-C: the worker goes with the benchmark (it was left running, measuring for nobody)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    wall = time.monotonic() - start
    if stopped:
        return {"status": stopped, "wall_s": wall, "watched_peak_rss_bytes": watched_peak}
    result = next((json.loads(line[len(RESULT_PREFIX):]) for line in lines if line.startswith(RESULT_PREFIX)), None)
    if result is None:
        return {"status": "error", "returncode": proc.returncode, "wall_s": wall,
                "stderr_tail": "".join(errors)[-2000:]}
    result["wall_s"] = wall
    return result


def _watch(proc: subprocess.Popen, lines: list[str], start: float, timeout_s: float,
           rss_limit_bytes: Optional[float]) -> tuple[Optional[str], int]:
    """Wait for the worker: ``(why it was stopped or None, its peak resident bytes seen)``."""
    watched_peak = 0
    while proc.poll() is None:
        rss = process_rss_bytes(proc.pid) or 0
        watched_peak = max(watched_peak, rss)
        baseline = next((int(line[len(BASELINE_PREFIX):]) for line in list(lines) if line.startswith(BASELINE_PREFIX)),
                        None)
        finished = any(line.startswith(RESULT_PREFIX) for line in list(lines))
        if rss_limit_bytes is not None and baseline is not None and not finished and rss - baseline > rss_limit_bytes:
            return "over_budget", watched_peak
        if time.monotonic() - start > timeout_s:
            return "timeout", watched_peak
        time.sleep(0.02)
    return None, watched_peak


# -- environment ---------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human-readable name of ``device`` (``"cpu"`` or ``"cuda[:i]"``)."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def git_revision() -> str:
    """``<commit>`` of the repository, with ``+dirty`` if tracked files changed;
    without git or a repository (a copied tree), ``$GIT_REVISION`` or ``"unknown"``."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    commit = git("rev-parse", "HEAD")
    if not commit:
        return os.environ.get("GIT_REVISION", "unknown")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment(device: str, settings: dict) -> dict:
    """Everything a result depends on: device, versions, revision, load, settings."""
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "triton", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    from .. import available_backends
    return {
        "device": device,
        "device_name": device_name(device),
        "versions": versions,
        "git_revision": git_revision(),
        "available_backends": available_backends(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "-m", "densenet_fast"] + sys.argv[1:])
        if Path(sys.argv[0]).name == "__main__.py" else " ".join(["python"] + sys.argv),
        "malloc_environment": {k: v for k, v in os.environ.items()  # what chose this process's allocator
                               if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")},
        "settings": settings,
    }


def settings_of(args) -> dict:
    """Every option of a run, as JSON-friendly values (functions left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}


def finish_environment(env: dict) -> dict:
    """Add the load at the end of a run (other processes sharing the CPU skew timings)."""
    env["load_average_at_end"] = list(os.getloadavg())
    env["git_revision_at_end"] = git_revision()  # others may commit while a long run goes on
    return env


# -- output --------------------------------------------------------------------------------
def new_result_path(name: str) -> Path:
    """Where a run given no ``--out`` writes its JSON (and PNG): ``name`` in
    ``benchmarks/results/`` of this checkout (``./benchmark-results/`` for an
    installed package), with ``-2``, ``-3``... before ``.json`` where that name
    is taken, so that no earlier result, a committed one least of all, is replaced."""
    folder = RESULTS_DIR if (REPO_ROOT / "setup.py").is_file() else Path("benchmark-results")
    stem, path, count = Path(name).stem, folder / name, 1
    while path.exists() or plot_path(path).exists():
        count += 1
        path = folder / f"{stem}-{count}.json"
    return path


def out_unless_given(argv: list[str], name: str) -> list[str]:
    """A preset's ``--out``: ``[]`` where ``argv`` (the user's options) gives one,
    else :func:`new_result_path` of ``name``, so a preset never replaces a result."""
    if any(a == "--out" or a.startswith("--out=") for a in argv):
        return []
    return ["--out", str(new_result_path(name))]


def write_json(result: dict, path: Path) -> Path:
    """``result`` to ``path`` through a temporary file renamed over it: a run
    stopped mid-write (Ctrl-C, a time limit) leaves the previous version whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(temporary, path)
    except OSError as exc:  # a full disk, a folder that went away: one line, exit status 1
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise CommandFailed(f"cannot write {path} ({exc.strerror or exc})") from exc
    return path


def save_result(result: dict, out, plot: Optional[str]) -> None:
    """Write ``result`` as JSON to ``out`` and, unless ``plot`` is ``None``, the
    PNG beside it drawn by ``densenet_fast.bench.plots.<plot>``."""
    out = write_json(result, out)
    print(f"\nwrote {out}")
    if plot is not None:
        from . import plots
        print(f"wrote {getattr(plots, plot)(result, plot_path(out))}")


def script_main(doc: str, add_arguments, run, argv=None) -> dict:
    """Parse ``argv`` with a benchmark's ``add_arguments`` and ``run`` it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def format_table(rows: list[dict], columns: list[str], header: bool = True,
                 min_widths: Optional[list[int]] = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given column keys
    (``header=False``: its rows only; ``min_widths``: per column, so that rows
    printed one at a time line up under a header printed before them)."""
    cells = [[("" if row.get(c) is None else (f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])))
              for c in columns] for row in rows]
    minimum = min_widths or [0] * len(columns)
    widths = [max(len(c), minimum[i], *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join(([line(columns), line(["-" * w for w in widths])] if header else []) + [line(r) for r in cells])


def progress(iterable, total: Optional[int] = None, desc: str = "", enabled: bool = True):
    """A tqdm progress bar on stderr (plain iteration if tqdm is missing or disabled)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)
