"""The caching-allocator model: PyTorch's rounding, pools, segments and block reuse."""

from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.allocator import cublas_workspace_bytes, simulate_caching_allocator

MiB = 2**20


def trace(*steps):
    """Events from ("a", sid, bytes) / ("f", sid) steps."""
    sizes, events = {}, []
    for i, step in enumerate(steps):
        if step[0] == "a":
            sizes[step[1]] = step[2]
            events.append((i, step[1], step[2]))
        else:
            events.append((i, step[1], -sizes[step[1]]))
    return events


def run(*steps):
    return simulate_caching_allocator(trace(*steps), cublas_handles=0)


def test_small_requests_round_to_512_and_share_a_2mib_segment():
    est = run(("a", 0, 1), ("a", 1, 513), ("a", 2, 1000))
    assert est.allocated == 512 + 1024 + 1024
    assert est.reserved == 2 * MiB and est.segments == 1


def test_medium_requests_take_a_20mib_segment_and_large_ones_their_own():
    assert run(("a", 0, 2 * MiB)).reserved == 20 * MiB
    assert run(("a", 0, 10 * MiB + 1)).reserved == 12 * MiB  # rounded up to 2 MiB
    assert run(("a", 0, 2 * MiB), ("a", 1, 3 * MiB)).reserved == 20 * MiB  # split, shared


def test_freed_blocks_are_reused_and_merged():
    est = run(("a", 0, 4 * MiB), ("a", 1, 4 * MiB), ("f", 0), ("f", 1), ("a", 2, 8 * MiB))
    assert est.reserved == 20 * MiB and est.segments == 1
    assert est.allocated == 8 * MiB


def test_no_split_below_1mib_remainder_hands_out_the_whole_block():
    # A 19.5 MiB request from a 20 MiB segment leaves 0.5 MiB: not split, all 20 MiB allocated.
    assert run(("a", 0, 19 * MiB + MiB // 2)).allocated == 20 * MiB


def test_a_large_block_splits_only_when_more_than_1mib_would_remain():
    # should_split() in CUDACachingAllocator.cpp: `remaining > kSmallSize` for the large pool.
    # 19 MiB takes a segment rounded up to 20 MiB; exactly 1 MiB would remain: not split.
    exact = run(("a", 0, 19 * MiB))
    assert exact.reserved == 20 * MiB and exact.allocated == 20 * MiB
    # 512 bytes less leaves 1 MiB + 512: split, only the request is allocated, the rest is free.
    above = run(("a", 0, 19 * MiB - 512))
    assert above.reserved == 20 * MiB and above.allocated == 19 * MiB - 512
    assert run(("a", 0, 19 * MiB - 512), ("a", 1, MiB + 512)).segments == 1  # the remainder serves the next


def test_segments_are_kept_when_freed():
    est = run(("a", 0, 30 * MiB), ("f", 0), ("a", 1, 40 * MiB))
    assert est.reserved == 70 * MiB  # the 30 MiB segment cannot hold 40 MiB and is not released


def test_cublas_workspaces():
    assert cublas_workspace_bytes((9, 0)) == 32 * MiB
    assert cublas_workspace_bytes((8, 0)) == 4096 * 1024 * 2 + 16 * 1024 * 8
    est = simulate_caching_allocator([], capability=(9, 0))
    assert est.workspace == 64 * MiB and est.reserved == 64 * MiB


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 48 * MiB)), max_size=40))
def test_any_trace_reserves_at_least_what_it_allocates_in_cuda_rounded_units(steps):
    # Allocate (True) or free the live storage picked by the number (False), as a training step does.
    events, live, sizes, peak_rounded = [], [], {}, 0
    for i, (allocate, size) in enumerate(steps):
        if allocate or not live:
            sizes[i] = size
            live.append(i)
            events.append((i, i, size))
        else:
            sid = live.pop(size % len(live))
            events.append((i, sid, -sizes[sid]))
        peak_rounded = max(peak_rounded, sum(-(-sizes[s] // 512) * 512 for s in live))
    est = simulate_caching_allocator(events, cublas_handles=0)
    assert est.reserved >= est.allocated >= peak_rounded  # a block is at least its request rounded to 512
    assert est.allocated % 512 == 0 and est.reserved % (2 * MiB) == 0  # segments: 2 MiB, 20 MiB or n x 2 MiB
    assert est.segments >= (1 if events else 0)
    if all(s <= MiB for s in sizes.values()):  # the small pool only: 2 MiB segments, split at any 512 B
        assert est.allocated == peak_rounded and est.reserved == est.segments * 2 * MiB
