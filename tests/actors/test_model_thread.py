import threading

import pytest

from actors.model_thread import ModelThread


def test_calls_from_many_threads_run_on_one_thread_in_arrival_order():
    model_thread = ModelThread("test")
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(i: int) -> int:
        with lock:
            seen.append((i, threading.get_ident()))
        return i * i

    results: dict[int, int] = {}
    callers = [threading.Thread(target=lambda i=i: results.__setitem__(i, model_thread.call(record, i))) for i in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    model_thread.close()

    assert results == {i: i * i for i in range(8)}
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] not in {c.ident for c in callers} | {threading.get_ident()}


def test_exception_reaches_the_caller_with_its_type():
    model_thread = ModelThread("test")
    with pytest.raises(ValueError, match="bad document"):
        model_thread.call(lambda: (_ for _ in ()).throw(ValueError("bad document")))
    assert model_thread.call(lambda: 3) == 3  # the thread survives a failed call
    model_thread.close()

