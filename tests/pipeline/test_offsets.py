from pipeline.stream_io.offsets import OffsetTracker


def test_commit_stops_below_the_oldest_unfinished_record():
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.started(0, offset)
    tracker.started(1, 5)
    assert tracker.committable() == {0: 10, 1: 5}
    tracker.finished(0, 11)  # out of order: 10 is still open
    assert tracker.committable()[0] == 10
    tracker.finished(0, 10)
    assert tracker.committable()[0] == 12
    tracker.finished(0, 12)
    tracker.finished(1, 5)
    assert tracker.committable() == {0: 13, 1: 6}
    assert tracker.open == 0
