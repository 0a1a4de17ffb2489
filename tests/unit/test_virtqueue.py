"""Split virtqueue parsing and used-ring updates against rings built by hand in guest memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmctl.memory import GuestMemory
from vmctl.virtio.driver import QueueDriver
from vmctl.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_INDIRECT,
    Buffer,
    DescriptorChain,
    QueueError,
    Virtqueue,
    need_event,
)

RAM = 2 << 20
QUEUE_BASE = 0x10000
SIZE = 8


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def make_queue(memory, size=SIZE, event_idx=False, indirect=True) -> tuple[Virtqueue, QueueDriver]:
    driver = QueueDriver(memory, QUEUE_BASE, size, data_size=256 << 10)
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, driver.desc, driver.avail, driver.used
    queue.activate(event_idx=event_idx, indirect=indirect)
    return queue, driver


def put_desc(memory, table, index, address, length, flags, nxt=0):
    memory.write(table + 16 * index, struct.pack("<QIHH", address, length, flags, nxt))


def test_direct_chain_splits_readable_and_writable(memory):
    queue, driver = make_queue(memory)
    posted = driver.post([b"header--", b"payload"], [512, 1])
    chain = queue.pop()
    assert chain.head == posted.head
    assert [b.length for b in chain.readable] == [8, 7]
    # The two writable buffers are adjacent in guest memory: they become one iovec.
    (first, _), (second, _) = posted.writable
    assert second == first + 512 and chain.writable == [Buffer(first, 513)]
    assert chain.read_readable(memory) == b"header--payload"
    assert chain.read_readable(memory, 6, 4) == b"--pa"
    assert queue.pop() is None


def test_indirect_chain_is_walked_through_its_table(memory):
    queue, driver = make_queue(memory)
    driver.post([b"abc"], [16, 4], indirect=True)
    chain = queue.pop()
    assert chain.read_readable(memory) == b"abc"
    assert chain.writable_length == 20
    chain.write_writable(memory, b"x" * 20)
    assert memory.read(chain.writable[0].address, 20) == b"x" * 20


def test_adjacent_buffers_merge_only_within_one_direction(memory):
    queue, driver = make_queue(memory)
    put_desc(memory, driver.desc, 0, 0x1000, 16, DESC_F_NEXT, 1)
    put_desc(memory, driver.desc, 1, 0x1010, 16, DESC_F_NEXT, 2)  # continues descriptor 0
    put_desc(memory, driver.desc, 2, 0x1020, 16, DESC_F_WRITE | DESC_F_NEXT, 3)  # adjacent, but writable
    put_desc(memory, driver.desc, 3, 0x2000, 8, DESC_F_WRITE)
    driver.publish(0)
    chain = queue.pop()
    assert chain.readable == [Buffer(0x1000, 32)]
    assert chain.writable == [Buffer(0x1020, 16), Buffer(0x2000, 8)]


def test_used_ring_gets_element_then_index(memory):
    queue, driver = make_queue(memory)
    for _ in range(3):
        driver.post([b"r"], [4])
    chains = [queue.pop() for _ in range(3)]
    for chain, written in zip(chains, (4, 0, 2)):
        queue.add_used(chain.head, written)
    assert driver.take_used() == [(chains[0].head, 4), (chains[1].head, 0), (chains[2].head, 2)]


def test_indexes_wrap_at_16_bits(memory):
    queue, driver = make_queue(memory)
    start = 0xFFFE
    driver.avail_idx = driver.used_seen = start
    memory.write_u16(driver.avail + 2, start)
    queue.last_avail = queue.next_used = start
    for _ in range(4):
        driver.post([b"w"], [1])
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
        queue.add_used(chain.head, 1)
    assert len(heads) == 4 and queue.last_avail == 2 and memory.read_u16(driver.used + 2) == 2
    assert [h for h, _ in driver.take_used()] == heads


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 16, DESC_F_NEXT, 0), "loops"),
        (lambda m, d: (put_desc(m, d.desc, 0, 0x1000, 16, DESC_F_NEXT, 1),
                       put_desc(m, d.desc, 1, 0x1000, 16, DESC_F_NEXT, 0)), "loops"),
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 16, DESC_F_NEXT, SIZE), "outside a queue"),
        (lambda m, d: put_desc(m, d.desc, 0, 0xD000_0000, 16, 0), "outside guest RAM"),
        (lambda m, d: put_desc(m, d.desc, 0, RAM - 8, 16, 0), "outside guest RAM"),
        (lambda m, d: put_desc(m, d.desc, 0, 2**64 - 8, 16, 0), "outside guest RAM"),
        (lambda m, d: (put_desc(m, d.desc, 0, 0x1000, 16, DESC_F_WRITE | DESC_F_NEXT, 1),
                       put_desc(m, d.desc, 1, 0x2000, 16, 0)), "readable descriptor after"),
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1), "INDIRECT and NEXT"),
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 15, DESC_F_INDIRECT), "multiple of 16"),
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 0, DESC_F_INDIRECT), "multiple of 16"),
        (lambda m, d: put_desc(m, d.desc, 0, 0x1000, 16 * (MAX_INDIRECT + 1), DESC_F_INDIRECT), "exceeds"),
        (lambda m, d: put_desc(m, d.desc, 0, RAM - 16, 32, DESC_F_INDIRECT), "indirect table"),
        (lambda m, d: (put_desc(m, d.desc, 0, 0x3000, 32, DESC_F_INDIRECT),
                       put_desc(m, 0x3000, 0, 0x1000, 8, DESC_F_NEXT, 1),
                       put_desc(m, 0x3000, 1, 0x1000, 8, DESC_F_NEXT, 0)), "indirect descriptor chain loops"),
        (lambda m, d: (put_desc(m, d.desc, 0, 0x3000, 16, DESC_F_INDIRECT),
                       put_desc(m, 0x3000, 0, 0x4000, 16, DESC_F_INDIRECT)), "inside an indirect table"),
        (lambda m, d: (put_desc(m, d.desc, 0, 0x3000, 16, DESC_F_INDIRECT),
                       put_desc(m, 0x3000, 0, 0x1000, 8, DESC_F_NEXT, 5)), "outside a table"),
    ],
)
def test_bad_chains_are_queue_errors(memory, build, message):
    queue, driver = make_queue(memory)
    build(memory, driver)
    driver.publish(0)
    with pytest.raises(QueueError, match=message):
        queue.pop()


def test_indirect_needs_the_feature(memory):
    queue, driver = make_queue(memory, indirect=False)
    driver.post([b"x"], [1], indirect=True)
    with pytest.raises(QueueError, match="not negotiated"):
        queue.pop()


def test_head_outside_queue_and_runaway_avail_index(memory):
    queue, driver = make_queue(memory)
    driver.publish(SIZE)
    with pytest.raises(QueueError, match="chain head"):
        queue.pop()
    queue, driver = make_queue(memory)
    memory.write_u16(driver.avail + 2, SIZE + 1)
    with pytest.raises(QueueError, match="ahead of a queue"):
        queue.pop()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("size", 3, "power of two"),
        ("size", 512, "power of two"),
        ("desc_table", QUEUE_BASE + 8, "aligned"),
        ("used_ring", QUEUE_BASE + 0x2002, "aligned"),
        ("avail_ring", RAM - 4, "outside guest RAM"),
        ("used_ring", 0xFEE0_0000, "outside guest RAM"),
    ],
)
def test_activation_checks_the_layout(memory, field, value, message):
    queue = Virtqueue(memory, 256)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = 8, QUEUE_BASE, QUEUE_BASE + 0x1000, QUEUE_BASE + 0x2000
    setattr(queue, field, value)
    with pytest.raises(QueueError, match=message):
        queue.activate(False, False)
    assert not queue.ready


def test_interrupt_suppression_without_event_idx(memory):
    queue, driver = make_queue(memory)
    driver.post([b"a"], [])
    queue.add_used(queue.pop().head, 0)
    assert queue.needs_interrupt()
    memory.write_u16(driver.avail, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not queue.needs_interrupt()


def test_event_idx_interrupts_only_when_used_event_is_crossed(memory):
    queue, driver = make_queue(memory, event_idx=True)
    for _ in range(4):
        driver.post([b"a"], [])
    driver.set_used_event(2)  # "interrupt me once used idx passes 2"
    decisions = []
    for _ in range(4):
        queue.add_used(queue.pop().head, 0)
        decisions.append(queue.needs_interrupt())
    # The first completion always interrupts; then only the step from 2 to 3 crosses used_event.
    assert decisions == [True, False, True, False]


def test_event_idx_device_publishes_avail_event(memory):
    queue, driver = make_queue(memory, event_idx=True)
    driver.post([b"a"], [])
    driver.post([b"b"], [])
    assert len(list(queue.drain())) == 2
    assert driver.avail_event() == 2


def test_need_event_matches_the_spec_formula():
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(0xFFFF, 0, 0xFFFE)  # across the wrap


# --- fuzz: random rings never escape QueueError --------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descriptors=st.lists(
        st.tuples(
            st.one_of(st.integers(0, RAM + 64), st.integers(0, 2**64 - 1)),
            st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
            st.integers(0, 7),
            st.integers(0, 20),
        ),
        min_size=SIZE, max_size=SIZE,
    ),
    ring=st.lists(st.integers(0, 20), min_size=SIZE, max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
    indirect_table=st.binary(min_size=0, max_size=256),
)
def test_fuzz_random_rings(memory, descriptors, ring, avail_idx, indirect_table):
    queue, driver = make_queue(memory)
    for index, (address, length, flags, nxt) in enumerate(descriptors):
        # Point some indirect descriptors at a random table inside RAM.
        if flags & DESC_F_INDIRECT and address % 2:
            address = 0x30000
        put_desc(memory, driver.desc, index, address, length, flags, nxt)
    memory.write(0x30000, indirect_table.ljust(256, b"\0"))
    for slot, head in enumerate(ring):
        memory.write_u16(driver.avail + 4 + 2 * slot, head)
    memory.write_u16(driver.avail + 2, avail_idx)
    taken = 0
    try:
        while (chain := queue.pop()) is not None:
            taken += 1
            assert taken <= SIZE
            for buffer in chain.readable + chain.writable:
                assert memory.contains(buffer.address, buffer.length)
            assert len(chain.readable) + len(chain.writable) <= SIZE + MAX_INDIRECT
            queue.add_used(chain.head, chain.writable_length & 0xFFFFFFFF)
    except QueueError:
        pass


# --- the fast path for plain indirect tables must agree with the general walk --------------
def _walk_both(memory, table: int, entries: list[tuple[int, int, int, int]]):
    """(fast, general): each (readable, writable, one region?) or the QueueError text. The
    general walk (`_walk_indirect_slow`) is the descriptor-by-descriptor reference."""
    results = []
    for general in (False, True):
        queue, driver = make_queue(memory)
        for index, entry in enumerate(entries):
            put_desc(memory, table, index, *entry)
        try:
            if general:
                chain = DescriptorChain(0)
                queue._walk_indirect_slow(chain, table, 16 * len(entries))
            else:
                put_desc(memory, driver.desc, 0, table, 16 * len(entries), DESC_F_INDIRECT)
                driver.publish(0)
                chain = queue.pop()
            results.append((chain.readable, chain.writable, chain.region is not None))
        except QueueError as error:
            results.append(str(error))
    return results


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(
        st.tuples(
            st.one_of(st.integers(0x40000, 0x40000 + 64 * 4096).map(lambda a: a & ~0xFFF),
                      st.integers(0, RAM + 4096), st.integers(0, 2**64 - 1)),
            st.one_of(st.sampled_from([1, 16, 4096]), st.integers(0, 2**32 - 1)),
            st.sampled_from([0, DESC_F_WRITE]),
        ),
        min_size=1, max_size=40,
    ),
    break_at=st.integers(-1, 40),
    bad_flags=st.sampled_from([DESC_F_INDIRECT, 0x100, DESC_F_NEXT]),
)
def test_fast_indirect_walk_agrees_with_the_general_walk(memory, entries, break_at, bad_flags):
    # Plain tables: readable entries first, each linking to the next. Sometimes one entry is
    # broken (a bad flag, a missing NEXT, a wrong link) to exercise the fall-back.
    entries = sorted(entries, key=lambda e: e[2])
    table = []
    for index, (address, length, write) in enumerate(entries):
        last = index == len(entries) - 1
        flags, nxt = write | (0 if last else DESC_F_NEXT), (0 if last else index + 1)
        if index == break_at:
            flags ^= bad_flags
            nxt = (nxt + 1) % 50 if bad_flags == DESC_F_NEXT else nxt
        table.append((address, length, flags, nxt))
    fast, general = _walk_both(memory, 0x30000, table)
    assert fast == general
    if not isinstance(fast, str):
        for buffer in fast[0] + fast[1]:
            assert memory.contains(buffer.address, buffer.length)


def test_fast_indirect_walk_merges_contiguous_pages(memory):
    table = [(0x40000, 16, DESC_F_NEXT, 1), (0x41000, 4096, DESC_F_NEXT, 2), (0x42000, 4096, DESC_F_NEXT, 3),
             (0x44000, 4096, DESC_F_WRITE | DESC_F_NEXT, 4), (0x45000, 1, DESC_F_WRITE, 0)]
    fast, general = _walk_both(memory, 0x30000, table)
    assert fast == general == ([Buffer(0x40000, 16), Buffer(0x41000, 8192)], [Buffer(0x44000, 4097)], True)


def test_kick_on_next_names_the_drivers_next_slot_not_the_devices(memory):
    # A device that took buffers back (not enough for a large frame) must still get a kick
    # when the driver posts one more: avail_event = the driver's index, not last_avail.
    queue, driver = make_queue(memory, event_idx=True)
    driver.post([], [64])
    driver.post([], [64])
    assert queue.pop() and queue.pop()
    queue.last_avail = (queue.last_avail - 2) & 0xFFFF  # given back, still unused
    assert queue.kick_on_next() == 2
    assert driver.avail_event() == 2
    assert need_event(driver.avail_event(), 3, 2)  # the driver's next post kicks


def test_single_descriptor_fast_path_checks_ram(memory):
    queue, driver = make_queue(memory)
    driver.post([], [64])
    assert queue.pop().writable_length == 64  # the region is now cached
    put_desc(memory, driver.desc, 0, RAM - 8, 64, DESC_F_WRITE)  # runs past the end of RAM
    driver.publish(0)
    with pytest.raises(QueueError, match="outside guest RAM"):
        queue.pop()
