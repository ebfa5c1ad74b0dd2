"""How many threads a CPU training process uses: the machine's cores divided among its local processes,
unless the user chose a number.

`accelerate launch` exports ``OMP_NUM_THREADS=1`` to its workers whenever the config says
``use_cpu: false`` (README's main config: it falls back to the CPU by itself when there is no GPU) and
the user passed no ``--num_cpu_threads_per_process``; a CPU run then trains on one core. The worker sees
only the result, so "the user chose 1" and "accelerate's default" look the same from inside it. The
launcher process (our parent, or grandparent under torchrun's elastic agent) still has both the
command line and the environment the user started it with; psutil (an accelerate dependency) reads
them. The user's choice, in order of precedence:

1. ``training.cpu_threads`` in the experiment YAML (an explicit number);
2. ``--num_cpu_threads_per_process N`` on the ``accelerate launch`` command line;
3. ``OMP_NUM_THREADS`` in the environment the user launched with;
4. otherwise: usable cores (the process's CPU affinity) // local processes, at least 1.

Example:
    >>> choose_cpu_threads(requested=3, local_processes=2).threads
    3
    >>> choose_cpu_threads(requested=None, local_processes=1, available_cores=8, launcher=LauncherInfo()).threads
    8
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "CpuThreads",
    "LauncherInfo",
    "choose_cpu_threads",
    "configure_cpu_threads",
    "launcher_from_argv",
    "launcher_info",
]


@dataclass(frozen=True)
class LauncherInfo:
    """What the user gave the process that launched this one (None: nothing / not found)."""

    num_cpu_threads_per_process: int | None = None
    omp_num_threads: int | None = None
    is_accelerate: bool = False


@dataclass(frozen=True)
class CpuThreads:
    threads: int
    reason: str


def _int_or_none(value) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def launcher_info() -> LauncherInfo:
    """Find an `accelerate launch` among this process's ancestors and read its argv and environment."""
    if "ACCELERATE_USE_CPU" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        # Not started by accelerate: OMP_NUM_THREADS, if set, is the user's own.
        return LauncherInfo(omp_num_threads=_int_or_none(os.environ.get("OMP_NUM_THREADS")))
    try:
        import psutil

        proc = psutil.Process().parent()
        for _ in range(4):  # worker <- accelerate (simple) or worker <- torchrun agent in accelerate
            if proc is None:
                break
            info = launcher_from_argv(proc.cmdline(), proc.environ())
            if info is not None:
                return info
            proc = proc.parent()
    except Exception:  # noqa: BLE001 - psutil missing or access denied: treat OMP_NUM_THREADS as chosen
        pass
    return LauncherInfo(omp_num_threads=_int_or_none(os.environ.get("OMP_NUM_THREADS")))


def launcher_from_argv(argv: list[str], environ: dict[str, str]) -> LauncherInfo | None:
    """`LauncherInfo` of an `accelerate launch` process's command line and environment (None when the
    command is something else). It may have been started as ``accelerate launch``, ``python -m
    accelerate.commands.launch`` or ``python -m accelerate.commands.accelerate_cli launch``.

    Example:
        >>> launcher_from_argv(["/venv/bin/accelerate", "launch", "--num_cpu_threads_per_process", "3", "t.py"], {})
        LauncherInfo(num_cpu_threads_per_process=3, omp_num_threads=None, is_accelerate=True)
        >>> launcher_from_argv(["python", "-m", "accelerate.commands.launch", "t.py"], {"OMP_NUM_THREADS": "4"})
        LauncherInfo(num_cpu_threads_per_process=None, omp_num_threads=4, is_accelerate=True)
        >>> launcher_from_argv(["python", "train.py"], {}) is None
        True
    """
    head = argv[:4]
    is_launch = any(
        (os.path.basename(part) == "accelerate" and argv[i + 1 : i + 2] == ["launch"])
        or part == "accelerate.commands.launch"
        or (part == "accelerate.commands.accelerate_cli" and argv[i + 1 : i + 2] == ["launch"])
        for i, part in enumerate(head)
    )
    if not is_launch:
        return None
    threads = None
    for i, part in enumerate(argv):
        if part == "--num_cpu_threads_per_process" and i + 1 < len(argv):
            threads = _int_or_none(argv[i + 1])
        elif part.startswith("--num_cpu_threads_per_process="):
            threads = _int_or_none(part.split("=", 1)[1])
    return LauncherInfo(threads, _int_or_none(environ.get("OMP_NUM_THREADS")), is_accelerate=True)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_cpu_threads(
    requested: int | None,
    local_processes: int,
    available_cores: int | None = None,
    launcher: LauncherInfo | None = None,
) -> CpuThreads:
    """The thread count for one of `local_processes` CPU training processes, and why."""
    if requested is not None:
        return CpuThreads(int(requested), "training.cpu_threads")
    launcher = launcher if launcher is not None else launcher_info()
    if launcher.num_cpu_threads_per_process is not None:
        return CpuThreads(launcher.num_cpu_threads_per_process, "--num_cpu_threads_per_process")
    if launcher.omp_num_threads is not None:
        return CpuThreads(launcher.omp_num_threads, "OMP_NUM_THREADS")
    cores = available_cores if available_cores is not None else _available_cores()
    return CpuThreads(max(1, cores // max(1, local_processes)), f"{cores} cores / {local_processes} local process(es)")


def configure_cpu_threads(requested: int | None, local_processes: int) -> CpuThreads:
    """Apply `choose_cpu_threads` to torch's intra-op pool (and OMP_NUM_THREADS for child processes)."""
    import torch

    choice = choose_cpu_threads(requested, local_processes)
    torch.set_num_threads(choice.threads)
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    return choice
