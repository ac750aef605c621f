"""Supervisor state table: every event from every state, and the restart policy."""

import pytest

from mer_pipeline.supervisor import TRANSITIONS, Event, RestartPolicy, State, Supervised, SupervisorError


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_event_in_every_state(state, event):
    supervised = Supervised("io", state=state)
    target = TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(SupervisorError, match=f"event {event.value} is not legal in state {state.value}"):
            supervised.handle(event, now_s=10.0)
        assert supervised.state is state
        assert supervised.exit_times_s == []
    else:
        assert supervised.handle(event, now_s=10.0) is target
        assert supervised.state is target


def test_crash_loop_gives_up_after_max_restarts():
    supervised = Supervised("worker:0", RestartPolicy(max_restarts=2, restart_window_s=60.0, backoff_initial_s=1.0))
    supervised.handle(Event.READY, 0.0)
    now = 0.0
    for expected_backoff in (1.0, 2.0):
        now += 1.0
        supervised.handle(Event.EXIT_UNWANTED, now)
        assert supervised.state is State.BACKOFF
        assert supervised.backoff_until_s == pytest.approx(now + expected_backoff)
        assert not supervised.should_give_up()
        supervised.handle(Event.BACKOFF_OVER, supervised.backoff_until_s)
        assert supervised.state is State.STARTING
    supervised.handle(Event.EXIT_UNWANTED, now + 5.0)
    assert supervised.should_give_up()
    assert supervised.restarts == 2


def test_old_exits_leave_the_window():
    supervised = Supervised("io", RestartPolicy(max_restarts=1, restart_window_s=10.0))
    supervised.handle(Event.EXIT_UNWANTED, 0.0)
    supervised.handle(Event.BACKOFF_OVER, 1.0)
    supervised.handle(Event.EXIT_UNWANTED, 100.0)
    assert supervised.exit_times_s == [100.0]
    assert not supervised.should_give_up()
