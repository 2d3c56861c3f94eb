"""Patterns from third-party apps' own test suites, reduced to what the pool sees.

docs/third-party-suites.md records the suites run on herokupool's engine beside Django's
own; each difference that was herokupool's fault has its reduction here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from tests.integration.conftest import MakeWrapper, backend_pid

pytestmark = pytest.mark.integration


def test_worker_threads_that_end_without_closing_do_not_exhaust_the_pool(
    make_wrapper: MakeWrapper, sessions: Callable[[], int]
) -> None:
    # django-pglock's and django-pgactivity's tests (and code like them): the test holds
    # its connection in a transaction (pytest-django's django_db), starts two threads that
    # query (a lock holder and a lock waiter, a killer and its victim), joins them, and
    # never closes the threads' connections.  Django's backend opens a connection per
    # thread and has no cap, so it passes; a pool must take a dead thread's connection
    # back, or the third such test waits for a connection that nobody will release.
    main = make_wrapper(MAX_CONNS=3, TIMEOUT=2)
    main.set_autocommit(False)  # holds its connection for the whole test, as django_db
    backend_pid(main)
    errors: list[BaseException] = []
    pids: set[int] = set()

    def worker(barrier: threading.Barrier) -> None:
        try:
            wrapper = make_wrapper(MAX_CONNS=3, TIMEOUT=2)
            pids.add(backend_pid(wrapper))
            barrier.wait(timeout=10)  # both threads hold a connection at once
            # ...and the thread ends without wrapper.close() or close_old_connections()
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    for _ in range(3):  # three such tests in a row
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=worker, args=(barrier,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

    main.rollback()
    main.set_autocommit(True)
    assert len(pids) <= 2, "the two worker slots are reused"
    assert sessions() <= 3
