"""DirtyBitmap and DirtyTracker, without KVM: the bookkeeping behind diffs and fast reset."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmlib import GuestAddress, GuestRegionMmap
from kvmlib.dirty import DirtyBitmap, DirtyTracker


def naive_runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


@given(st.sets(st.integers(0, 1023)))
def test_runs_and_pages_match_the_bits(pages: set[int]) -> None:
    bitmap = DirtyBitmap(0, GuestAddress(0), 1024, sum(1 << p for p in pages))
    assert bitmap.pages() == sorted(pages)
    assert bitmap.runs() == naive_runs(list(pages))
    assert len(bitmap) == len(pages)


@given(st.sets(st.integers(0, 65535), max_size=40), st.integers(0, 65535))
def test_runs_far_into_a_large_region_match_the_bits(pages: set[int], extra: int) -> None:
    # 256 MiB of pages: the scan starts at the first dirty word, wherever that is.
    pages |= {extra}
    bitmap = DirtyBitmap(0, GuestAddress(0), 65536, sum(1 << p for p in pages))
    assert bitmap.runs() == naive_runs(list(pages))


def test_a_full_word_and_the_last_page_make_runs() -> None:
    bitmap = DirtyBitmap(0, GuestAddress(0x100000), 130, ((1 << 64) - 1) << 64 | 1 << 129)
    assert bitmap.runs() == [(64, 64), (129, 1)]
    assert bitmap.addresses()[0] == 0x100000 + 64 * 0x1000
    assert bitmap.bitmap == bitmap.bits.to_bytes(24, "little")  # whole 64-bit words, as KVM has them


def test_each_cursor_sees_every_write_once_whatever_the_others_take() -> None:
    region = GuestRegionMmap.anonymous(0, 16 * 0x1000, log_dirty_pages=True)
    kernel_log = [0b0001]

    def fetch(slot: int, r: GuestRegionMmap) -> bytes:
        bits, kernel_log[0] = kernel_log[0], 0  # KVM clears its log when read
        return bits.to_bytes(8, "little")

    tracker = DirtyTracker([region], fetch)
    tracker.start("a")  # page 0 was written before anyone tracked: nobody sees it
    kernel_log[0] = 0b0010
    tracker.start("b")  # page 1 is drained into a only
    kernel_log[0] = 0b0100
    region.mark_dirty(3 * 0x1000, 1)
    assert tracker.take("a")[0].pages() == [1, 2, 3]
    kernel_log[0] = 0b10000
    assert tracker.take("b")[0].pages() == [2, 3, 4]
    assert tracker.take("a")[0].pages() == [4]
    region.close()


def test_take_runs_is_take_as_runs() -> None:
    region = GuestRegionMmap.anonymous(GuestAddress(0), 64 * 4096, log_dirty_pages=True)
    logs = [bytearray(8)]

    def fetch(slot: int, r: GuestRegionMmap) -> bytearray:
        log, logs[0] = logs[0], bytearray(8)
        return log

    try:
        tracker = DirtyTracker([region], fetch)
        tracker.start("a")
        logs[0][0] = 0b1110
        region.mark_dirty(63 * 4096, 1)  # a host write counts too
        assert tracker.take_runs("a") == {0: [(1, 3), (63, 1)]}
        assert tracker.take_runs("a") == {0: []}
    finally:
        region.close()
