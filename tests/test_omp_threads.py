"""omp_threads: a torch thread count for one thread, leaving the process default alone."""

import functools
import platform
import sys
import threading

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

from heiindex import omp_threads

LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture
def two_threads():
    with pf.torch_threads(2):
        yield


@pytest.mark.skipif(not LINUX_X86, reason="torch's x86-64 Linux wheels: libgomp and MKL")
def test_linux_wheel_torch_has_a_per_thread_setter_with_mkl():
    """torch's x86-64 Linux wheels (this project's pin, and CI's) link libgomp and hold MKL."""
    assert omp_threads.thread_local_setter() is not None and omp_threads._mkl_pair() is not None


@pf.needs_thread_local_setter
def test_worker_count_stays_in_the_worker(two_threads):
    """The worker runs on one thread (torch's count, and MKL's where torch holds MKL); a thread
    started while it runs, the caller, and a thread started after it ends keep two."""
    mkl = omp_threads._mkl_pair()
    mkl_count = mkl[1] if mkl else lambda: None

    def counts():
        return torch.get_num_threads(), mkl_count()

    def worker():
        omp_threads.set_worker_threads(1)
        return counts(), pf.in_thread(counts)

    want_two = (2, 2 if mkl else None)
    assert pf.in_thread(worker) == ((1, 1 if mkl else None), want_two)
    assert counts() == want_two and pf.in_thread(counts) == want_two


@pf.needs_thread_local_setter
def test_torch_set_num_threads_in_a_thread_is_what_the_check_refuses(two_threads):
    """The check that picks a setter refuses torch.set_num_threads (it changes the default of
    threads started later) and a setter that does nothing; it accepts OpenMP's own."""
    assert not omp_threads._acts_on_this_thread_only(torch.set_num_threads, torch.get_num_threads)
    assert pf.in_thread(torch.get_num_threads) == 1  # what the check saw: the default it changed
    torch.set_num_threads(2)
    assert not omp_threads._acts_on_this_thread_only(lambda count: None, torch.get_num_threads)
    assert omp_threads._acts_on_this_thread_only(omp_threads._openmp_setters()[0], torch.get_num_threads)


def test_set_worker_threads_refuses_without_a_setter(monkeypatch):
    monkeypatch.setattr(omp_threads, "thread_local_setter", lambda: None)
    with pytest.raises(RuntimeError, match="no per-thread torch thread count was found"):
        omp_threads.set_worker_threads(1)


@pf.needs_thread_local_setter
def test_threads_asking_at_once_get_the_one_checked_setter(monkeypatch):
    """The check runs once per process, however many threads ask for the setter together."""
    monkeypatch.setattr(omp_threads, "_checked_setter", functools.cache(omp_threads._checked_setter.__wrapped__))
    checks = []
    real = omp_threads._acts_on_this_thread_only

    def counted(*args):
        checks.append(args)
        return real(*args)

    monkeypatch.setattr(omp_threads, "_acts_on_this_thread_only", counted)
    got = []
    threads = [threading.Thread(target=lambda: got.append(omp_threads.thread_local_setter())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 6 and len({id(g) for g in got}) == 1 and got[0] is not None
    assert len(checks) == (2 if omp_threads._mkl_pair() else 1)  # OpenMP's call, then MKL's
