"""omp_threads: a torch thread count for one thread, leaving the process default alone."""

import threading

import pipeline_fixtures as pf  # tests/ is on sys.path (pytest rootdir-relative import)
import pytest
import torch

from heiindex import omp_threads


def _in_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@pytest.fixture
def two_threads():
    with pf.torch_threads(2):
        yield


def test_linux_wheel_torch_has_a_per_thread_setter():
    """torch's Linux wheels (this project's pin, and CI's) load libgomp from torch/lib."""
    assert omp_threads.thread_local_setter() is not None


def test_worker_count_stays_in_the_worker(two_threads):
    """The worker runs on one thread (torch's count, and MKL's where torch holds MKL); a thread
    started while it runs, the caller, and a thread started after it ends keep two."""
    mkl = omp_threads._mkl_pair()
    assert (mkl is not None) == torch.backends.mkl.is_available()  # x86 Linux wheels hold MKL
    mkl_count = mkl[1] if mkl else lambda: None

    def counts():
        return torch.get_num_threads(), mkl_count()

    def worker():
        omp_threads.set_worker_threads(1)
        return counts(), _in_thread(counts)

    want_two = (2, 2 if mkl else None)
    assert _in_thread(worker) == ((1, 1 if mkl else None), want_two)
    assert counts() == want_two and _in_thread(counts) == want_two


def test_torch_set_num_threads_in_a_thread_is_what_the_check_refuses(two_threads):
    """The check that picks a setter refuses torch.set_num_threads (it changes the default of
    threads started later) and a setter that does nothing; it accepts OpenMP's own."""
    assert not omp_threads._acts_on_this_thread_only(torch.set_num_threads, torch.get_num_threads)
    assert _in_thread(torch.get_num_threads) == 1  # what the check saw: the default it changed
    torch.set_num_threads(2)
    assert not omp_threads._acts_on_this_thread_only(lambda count: None, torch.get_num_threads)
    (openmp,) = omp_threads._loaded(omp_threads._OPENMP_RUNTIMES, "omp_set_num_threads")
    assert omp_threads._acts_on_this_thread_only(openmp, torch.get_num_threads)


def test_set_worker_threads_refuses_without_a_setter(monkeypatch):
    monkeypatch.setattr(omp_threads, "thread_local_setter", lambda: None)
    with pytest.raises(RuntimeError, match="no per-thread thread count"):
        omp_threads.set_worker_threads(1)
