"""The scheduler and the page bookkeeping on their own: pure Python, no device.

A fake "device" here is just the scheduler's own bookkeeping: each step's plan is checked
against what a step may do (token budget, chunk alignment, pages owned), and sampled tokens
are made up."""

import random

import pytest

from jaxllm.kv_pages import KVPages, page_key
from jaxllm.scheduler import Scheduler, Sequence


def make(num_pages=32, page_size=4, max_num_seqs=4, max_step_tokens=16, chunk=8, rows=2):
    pages = KVPages(num_pages, page_size)
    return Scheduler(
        pages,
        max_num_seqs=max_num_seqs,
        max_step_tokens=max_step_tokens,
        chunk=chunk,
        max_prefill_rows=rows,
    )


def seq(tokens, max_tokens=4, name="s", stop_ids=()):
    return Sequence(name, list(tokens), len(tokens), max_tokens, frozenset(stop_ids))


def step(sched, token=7):
    plan = sched.schedule()
    for s in plan.decodes:  # every position the step writes has a page
        assert len(s.pages) * sched.page_size >= s.computed + 1
    for c in plan.prefills:
        assert c.start == c.seq.computed and 0 < c.length <= sched.chunk
        assert len(c.seq.pages) * sched.page_size >= c.start + c.length
    sched.update(plan, [[token]] * len(plan.decodes), [token] * len(plan.prefills))
    return plan


def test_page_keys_chain_the_whole_prefix():
    a = page_key(None, [1, 2, 3, 4])
    assert a == page_key(None, [1, 2, 3, 4])
    assert page_key(a, [5, 6, 7, 8]) != page_key(None, [5, 6, 7, 8])
    assert page_key(a, [5, 6, 7, 8]) != page_key(page_key(None, [1, 2, 3, 5]), [5, 6, 7, 8])


def test_a_prompt_is_prefilled_in_chunks_then_decoded():
    sched = make()
    s = seq(range(20), max_tokens=3)
    sched.add(s)
    plans = [step(sched) for _ in range(6)]
    chunks = [(c.start, c.length, c.samples) for p in plans for c in p.prefills]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert [len(p.decodes) for p in plans] == [0, 0, 0, 1, 1, 0]
    assert s.finished and s.tokens[20:] == [7, 7, 7]
    assert sched.idle and sched.pages.used == 0
    sched.pages.check()


def test_prefix_hits_reuse_full_pages_but_never_the_last_tokens_page():
    sched = make()
    first = seq(range(10), max_tokens=1, name="a")
    sched.add(first)
    while not sched.idle:
        step(sched)
    # [0..9] + 1 generated token: pages [0-3] and [4-7] are full and registered.
    assert sched.pages.cached == 2
    same = seq(range(10), max_tokens=1, name="b")
    sched.add(same)
    plan = sched.schedule()
    assert plan.prefills[0].start == 8 and same.pages[:2] == first_pages(sched, 2)
    assert sched.cached_tokens == 8
    # A prompt that is exactly the cached pages recomputes its last page.
    exact = seq(range(8), max_tokens=1, name="c")
    sched.add(exact)
    plan2 = sched.schedule()
    assert [c.start for c in plan2.prefills if c.seq is exact] == [4]
    sched.update(plan, [], [1])
    sched.update(plan2, [[1]] * len(plan2.decodes), [1] * len(plan2.prefills))
    while not sched.idle:
        step(sched)
    sched.pages.check()


def first_pages(sched, n):
    return sorted(p for p in range(sched.pages.num_pages) if p in sched.pages._key_of)[:n]


def test_cached_pages_are_evicted_least_recently_released_first():
    pages = KVPages(num_pages=3, page_size=2)
    a, b = pages.allocate(1), pages.allocate(1)
    pages.register(a[0], b"a")
    pages.register(b[0], b"b")
    pages.release(a)
    pages.release(b)
    assert pages.cached == 2 and pages.available == 3
    assert pages.allocate(2) == [2, a[0]]  # the free page first, then the oldest cached
    assert pages.match_prefix([9, 9, 9]) == ([], [])  # "a" is gone; no key matches anyway
    pages.check()


def test_decodes_always_run_and_prefill_fits_the_budget():
    sched = make(num_pages=64, max_num_seqs=8, max_step_tokens=10, chunk=4, rows=4)
    for i in range(8):
        sched.add(seq([i] * 3, max_tokens=50, name=str(i)))
    for _ in range(30):
        plan = step(sched)
        # One chunk row is always allowed; beyond it, rows fit what decodes leave.
        assert len(plan.prefills) <= max(1, (10 - len(plan.decodes)) // 4)
    assert len(sched.running) == 8


def test_max_num_seqs_bounds_running_and_admission_is_first_come_first_served():
    sched = make(max_num_seqs=2)
    seqs = [seq([i, i], max_tokens=3, name=str(i)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    started = []
    while not sched.idle:
        plan = step(sched)
        started += [c.seq.id for c in plan.prefills]
        assert len(sched.running) <= 2
    assert started == ["0", "1", "2", "3", "4"]


def test_a_full_pool_preempts_the_newest_and_everything_still_finishes():
    # 6 pages of 4 tokens: two sequences that write 13 positions (4 pages) cannot both fit.
    sched = make(num_pages=6, page_size=4, max_num_seqs=4)
    a, b = seq(range(4), max_tokens=10, name="a"), seq(range(10, 14), max_tokens=10, name="b")
    sched.add(a)
    sched.add(b)
    preempted = []
    while not sched.idle:
        preempted += [s.id for s in step(sched).preempted]
        sched.pages.check()
    assert preempted and set(preempted) == {"b"}  # the newest gives way, never the oldest
    assert a.finished and b.finished and len(a.tokens) == len(b.tokens) == 14
    assert sched.pages.used == 0


def test_stopped_sequences_are_freed_at_the_next_step():
    sched = make()
    stopped = {"flag": False}
    s = seq(range(6), max_tokens=100)
    s.done = lambda: stopped["flag"]
    waiting = seq(range(6), max_tokens=100, name="w")
    waiting.done = lambda: True  # cancelled before it ever ran
    sched.add(s)
    sched.add(waiting)
    step(sched)
    assert sched.pages.used > 0 and waiting not in sched.running
    stopped["flag"] = True
    sched.schedule()
    assert sched.idle and sched.pages.used == 0


def test_stop_tokens_finish_a_sequence():
    sched = make()
    s = seq(range(3), max_tokens=10, stop_ids=[5])
    sched.add(s)
    step(sched, token=1)
    step(sched, token=5)
    assert s.finished and s.tokens[3:] == [1, 5] and sched.idle


@pytest.mark.parametrize("seed", range(3))
def test_random_workloads_keep_the_books_straight(seed):
    """Many sequences with random lengths, shared prefixes, stops from outside and a small
    pool: after every step the page books are consistent; at the end every page is free or
    cached and every sequence finished or was stopped."""
    rng = random.Random(seed)
    sched = make(num_pages=24, page_size=4, max_num_seqs=6, max_step_tokens=20, chunk=8, rows=3)
    prefix = [rng.randrange(50) for _ in range(9)]
    stopped = set()
    seqs = []
    for step_no in range(400):
        if step_no < 300 and rng.random() < 0.3:
            body = [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
            s = seq(
                (prefix if rng.random() < 0.5 else []) + body, rng.randrange(1, 20), str(step_no)
            )
            s.done = lambda s=s: s.id in stopped
            seqs.append(s)
            sched.add(s)
        if seqs and rng.random() < 0.1:
            stopped.add(rng.choice(seqs).id)
        step(sched, token=rng.randrange(50))
        sched.pages.check()
        assert sum(len(s.pages) for s in sched.running) >= sched.pages.used
    while not sched.idle:
        step(sched)
    assert all(s.finished or s.id in stopped for s in seqs)
    assert sched.pages.used == 0
    sched.pages.check()


def test_a_sliding_window_gives_back_the_pages_older_than_it():
    """Window 8, pages of 4: after each step a sequence holds only the pages its next query
    can see; the rest are FREED in its list, cached (registered) in the pool."""
    from jaxllm.scheduler import FREED

    sched = make(num_pages=8, page_size=4, max_num_seqs=1)
    sched.window = 8
    s = seq(range(20), max_tokens=30)  # 50 tokens: 13 pages, in a pool of 8
    sched.add(s)
    while not s.finished:
        step(sched)
        if s.finished:
            break
        oldest = max(0, s.computed - 8 + 1)  # the next query's oldest visible key
        held = [i for i, page in enumerate(s.pages) if page != FREED]
        assert held and held[0] == oldest // 4, (s.computed, s.pages)
        assert sched.pages.used == len(held) <= 4
        sched.pages.check()
    assert sched.preemptions == 0 and len(s.tokens) == 50
    assert sched.idle and sched.pages.used == 0
    sched.pages.check()
