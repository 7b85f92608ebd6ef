"""Turns on the CPU's cores: first come, first served, and the indexer embeds only in its turn."""

from __future__ import annotations

import threading
import time

from deploy.compute_turns import ComputeTurns
from deploy.index_budget import ComputeBudget
from tests.snapshot_testkit import open_indexer, submit_colour, write_experience_checkpoint


def wait_for_tickets(turns: ComputeTurns, count: int) -> None:
    """Until `count` turns have been asked for (held or waiting)."""
    deadline = time.monotonic() + 10
    while turns._issued < count:
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_waiting_thread_is_served_before_one_that_asks_again():
    turns = ComputeTurns()
    greedy_turns, granted, stop = [0], [None], threading.Event()

    def greedy() -> None:  # the indexer between chunks: releases and asks again at once
        while not stop.is_set():
            with turns:
                greedy_turns[0] += 1

    def step() -> None:  # asks while the greedy thread waits: served right after its one turn
        with turns:
            granted[0] = greedy_turns[0]

    turns.acquire()
    greedy_thread, step_thread = threading.Thread(target=greedy), threading.Thread(target=step)
    greedy_thread.start()
    wait_for_tickets(turns, 2)
    step_thread.start()
    wait_for_tickets(turns, 3)
    turns.release()
    step_thread.join()
    stop.set()
    greedy_thread.join()
    assert granted[0] == 1


def test_disabled_turns_never_wait():
    turns = ComputeTurns(enabled=False)
    turns.acquire()
    with turns:  # a second holder at once: a no-op on a GPU
        pass
    turns.release()


def test_the_indexer_embeds_only_while_the_step_does_not_hold_the_cores(tmp_path):
    turns = ComputeTurns()
    indexer = open_indexer(tmp_path, budget=ComputeBudget(None, turns=turns))
    try:
        indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
        assert indexer.flush(30) and indexer.encoder_version == 1
        with turns:  # a training step that lasts
            submit_colour(indexer, 1, "red", 8)
            assert indexer.wait_stored(10)  # storing needs no turn
            assert indexer.store.stats()["count"] == 8
            time.sleep(1.0)
            assert indexer.index_size() == 0
        assert indexer.flush(30)
        assert indexer.index_size() == 8
    finally:
        indexer.stop()


def test_wait_stored_waits_for_the_write_under_way(tmp_path, monkeypatch):
    indexer = open_indexer(tmp_path, budget=ComputeBudget(None, turns=ComputeTurns()))
    try:
        add = indexer.store.add

        def slow_add(*args, **kwargs):  # a store write on a slow disk
            time.sleep(0.5)
            return add(*args, **kwargs)

        monkeypatch.setattr(indexer.store, "add", slow_add)
        submit_colour(indexer, 1, "red", 4)
        assert indexer.wait_stored(10)
        assert indexer.store.stats()["count"] == 4
    finally:
        indexer.stop()
