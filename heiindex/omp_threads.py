"""Set torch's CPU thread count for the calling thread only.

``torch.set_num_threads`` sets the calling thread's count and also a process-wide default, which
every thread reads on its first parallel torch call. A worker that sets one thread for itself so
also gives one thread, for good, to any thread of the program whose first torch call falls while
that worker runs (a server's new request thread, say; measured about 40% slower).

Two calls act on the calling thread alone, and together do what ``torch.set_num_threads`` does
for it: OpenMP's ``omp_set_num_threads`` (torch's own kernels) and MKL's
``MKL_Set_Num_Threads_Local`` (its matrix products; left out, two single-threaded re-ranking
workers were ~9% slower on 2 cores, as MKL then asked OpenMP per call). This module finds them in
the libraries torch has already loaded, loading nothing itself: through ``libtorch_cpu`` (whose
lookups also search the libraries it was linked with, wherever they lie: ``libgomp`` in torch's
Linux wheels, a conda or system OpenMP elsewhere; MKL lies inside it on x86), else in torch's
library folder. It checks once per process, in throwaway threads, that they do what is asked:
the thread's counts change, and a thread started after it keeps the process defaults. Where
OpenMP's call cannot be found or fails that check,
:func:`thread_local_setter` returns None and the caller does without (re-ranking then runs its
chunks one at a time); without MKL's call, OpenMP's alone is used.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

_TORCH_CPU = ("libtorch_cpu*",)
_OPENMP_RUNTIMES = ("libtorch_cpu*", "libgomp*", "libomp*", "libiomp5*")  # the first: its dependencies'
_PROBE_LOCK = threading.Lock()


def _loaded(patterns: tuple[str, ...], symbol: str, argtypes: list, restype) -> list[Callable]:
    """``symbol`` from each library in torch's library folder matching ``patterns`` (in that order)
    that the process has already loaded; a lookup through a library also searches the libraries
    it was linked with. ``RTLD_NOLOAD``: a library not yet loaded is left so, as a second OpenMP
    runtime in one process can abort it."""
    folder = Path(torch.__file__).parent / "lib"
    found = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            try:
                function = getattr(ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LOCAL), symbol)
            except (OSError, AttributeError):  # not loaded, no such symbol, or no RTLD_NOLOAD (Windows)
                continue
            function.argtypes, function.restype = argtypes, restype
            found.append(function)
    return found


def _openmp_setters() -> list[Callable[[int], None]]:
    """OpenMP's ``void omp_set_num_threads(int)`` as torch's libraries reach it."""
    return _loaded(_OPENMP_RUNTIMES, "omp_set_num_threads", [ctypes.c_int], None)


def _mkl_pair() -> tuple[Callable[[int], int], Callable[[], int]] | None:
    """MKL's C calls that set and read the calling thread's MKL count, where torch holds MKL
    (``int MKL_Set_Num_Threads_Local(int)``, ``int MKL_Get_Max_Threads(void)``: the C forms; the
    lower-case names are the Fortran ones, which take pointers)."""
    setters = _loaded(_TORCH_CPU, "MKL_Set_Num_Threads_Local", [ctypes.c_int], ctypes.c_int)
    getters = _loaded(_TORCH_CPU, "MKL_Get_Max_Threads", [], ctypes.c_int)
    if not setters or not getters:
        return None
    return setters[0], getters[0]


def _run_in_thread(fn: Callable[..., None], *args: object) -> None:
    thread = threading.Thread(target=fn, args=args)
    thread.start()
    thread.join()


def _acts_on_this_thread_only(set_count: Callable[[int], object], read_count: Callable[[], int]) -> bool:
    """Whether ``set_count`` changes ``read_count`` in the thread calling it and leaves the count a
    thread started later reads. Runs in throwaway threads, so no caller's count is touched."""
    seen: dict[str, int] = {}

    def count_as(name: str) -> None:
        torch.get_num_threads()  # a thread's first torch call applies torch's process default
        seen[name] = read_count()

    def probe() -> None:
        count_as("default")
        set_count(1 if seen["default"] != 1 else 2)
        count_as("own")
        _run_in_thread(count_as, "later")

    _run_in_thread(probe)
    return seen.get("own") not in (None, seen.get("default")) and seen.get("later") == seen.get("default")


def thread_local_setter() -> Callable[[int], None] | None:
    """A function that sets torch's thread count for the calling thread only, or None where none
    is found that passes the check (module docstring). In a worker thread, call
    ``torch.get_num_threads()`` before it: torch's first call in a thread applies the process
    default, which would undo a count set earlier (``set_worker_threads`` does both). Checked
    once per process: threads asking at once wait for the one check."""
    with _PROBE_LOCK:
        return _checked_setter()


@functools.cache
def _checked_setter() -> Callable[[int], None] | None:
    openmp = next((s for s in _openmp_setters() if _acts_on_this_thread_only(s, torch.get_num_threads)), None)
    if openmp is None:
        return None
    mkl = _mkl_pair() if torch.backends.mkl.is_available() else None
    if mkl is not None and not _acts_on_this_thread_only(*mkl):
        mkl = None  # MKL then reads OpenMP's count: the same threads, a little slower

    def set_count(count: int) -> None:
        openmp(count)
        if mkl is not None:
            mkl[0](count)

    return set_count


def set_worker_threads(count: int) -> None:
    """A thread pool's initializer: this worker thread runs torch on ``count`` threads; other
    threads, and the process defaults, keep theirs. Only where :func:`thread_local_setter` found
    a setter (the caller checks)."""
    setter = thread_local_setter()
    if setter is None:
        raise RuntimeError("no per-thread torch thread count was found here (heiindex.omp_threads)")
    torch.get_num_threads()
    setter(count)
