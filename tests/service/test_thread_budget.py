"""The thread budget: how many cores, split how, and which setting overrides which part."""

from __future__ import annotations

from typing import Callable

import pytest

from service import thread_budget
from service.config import Settings
from service.thread_budget import plan_threads, usable_cores


def test_two_cores_cpu_engine(make_settings: Callable[..., Settings]) -> None:
    plan = plan_threads(make_settings(), engine="cpu", cores=2)
    assert (plan.load_intra_op_threads, plan.idle_intra_op_threads, plan.preprocess_threads) == (1, 2, 1)
    assert plan.load_spinning is False and plan.idle_spinning is True
    assert plan.two_sessions
    assert set(plan.sources.values()) == {"machine"}
    described = plan.describe()
    assert described["two_sessions"] is True and described["idle_session"] is None
    assert all(described["reasons"][key] for key in ("intra_op_threads", "idle_intra_op_threads", "preprocess_threads"))


def test_one_core_has_one_session(make_settings: Callable[..., Settings]) -> None:
    plan = plan_threads(make_settings(), engine="cpu", cores=1)
    assert (plan.load_intra_op_threads, plan.idle_intra_op_threads, plan.preprocess_threads) == (1, 1, 1)
    assert not plan.two_sessions


def test_many_cores_split_between_engine_and_preprocessing(make_settings: Callable[..., Settings]) -> None:
    plan = plan_threads(make_settings(), engine="cpu", cores=8)
    # one core for the event loop, 7 shared by the measured cost per request (2.7 : 2.6 ms)
    assert plan.load_intra_op_threads == 4 and plan.preprocess_threads == 3
    assert plan.idle_intra_op_threads == 8
    big = plan_threads(make_settings(), engine="cpu", cores=64)
    assert big.idle_intra_op_threads == big.load_intra_op_threads == thread_budget.MAX_IDLE_THREADS
    assert big.preprocess_threads == thread_budget.MAX_PREPROCESS_THREADS


def test_gpu_engine_gives_the_cores_to_preprocessing(make_settings: Callable[..., Settings]) -> None:
    plan = plan_threads(make_settings(), engine="gpu", cores=6)
    assert plan.preprocess_threads == 5 and plan.load_intra_op_threads == plan.idle_intra_op_threads == 1
    assert not plan.two_sessions


def test_one_explicit_thread_count_means_one_session(make_settings: Callable[..., Settings]) -> None:
    plan = plan_threads(make_settings(intra_op_threads=1), engine="cpu", cores=4)
    assert plan.load_intra_op_threads == plan.idle_intra_op_threads == 1 and not plan.two_sessions
    assert plan.sources["intra_op_threads"] == plan.sources["idle_intra_op_threads"] == "ANEMIA_INTRA_OP_THREADS"


def test_each_setting_overrides_its_part(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANEMIA_IDLE_INTRA_OP_THREADS", "3")
    monkeypatch.setenv("ANEMIA_PREPROCESS_THREADS", "5")
    monkeypatch.setenv("ANEMIA_INTRA_OP_SPINNING", "true")
    plan = plan_threads(make_settings(), engine="cpu", cores=2)
    assert (plan.load_intra_op_threads, plan.idle_intra_op_threads, plan.preprocess_threads) == (1, 3, 5)
    assert plan.load_spinning is plan.idle_spinning is True
    assert plan.sources == {
        "intra_op_threads": "machine",
        "idle_intra_op_threads": "ANEMIA_IDLE_INTRA_OP_THREADS",
        "preprocess_threads": "ANEMIA_PREPROCESS_THREADS",
        "intra_op_spinning": "ANEMIA_INTRA_OP_SPINNING",
    }


def test_cores_come_from_the_affinity_mask(make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thread_budget.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert usable_cores() == 3
    assert plan_threads(make_settings()).cores == 3
