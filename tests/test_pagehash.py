"""Page fingerprints: any single-word change is always detected; only selected pages are reported."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fph.ram_layout import PAGE_SIZE
from fph.transfer.pagehash import changed_pages, copy_scan, page_hashes


@settings(max_examples=300, deadline=None)
@given(word=st.integers(0, PAGE_SIZE // 8 - 1), bit=st.integers(0, 63), seed=st.integers(0, 2**32 - 1))
def test_a_single_bit_flip_changes_the_fingerprint(word: int, bit: int, seed: int) -> None:
    page = np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    before = page_hashes(page)[0]
    page.view(np.uint64)[word] ^= np.uint64(1) << np.uint64(bit)
    assert page_hashes(page)[0] != before


def test_changed_pages_reads_only_selected_pages() -> None:
    pages = np.zeros(8 * PAGE_SIZE, dtype=np.uint8)
    expected = page_hashes(pages)
    pages[2 * PAGE_SIZE + 100] = 1
    pages[5 * PAGE_SIZE] = 1
    selected = np.array([1, 1, 1, 1, 1, 0, 1, 1], dtype=np.uint8)
    assert changed_pages(pages, selected, expected).tolist() == [2]
    assert changed_pages(pages, np.ones(8, np.uint8), expected).tolist() == [2, 5]


@settings(max_examples=300, deadline=None)
@given(byte=st.integers(0, PAGE_SIZE - 1), value=st.integers(1, 255))
def test_a_page_expected_zero_is_changed_by_any_non_zero_byte(byte: int, value: int) -> None:
    """Pages the destination holds as zeros are checked with the zero test, not the fingerprint: one byte
    anywhere (the last of a 512-byte block included) is a change; a zero page is not; and a page that was
    sent with data and is zero now is still a change (its fingerprint is not the zero page's)."""
    pages = np.zeros(3 * PAGE_SIZE, dtype=np.uint8)
    pages[2 * PAGE_SIZE :] = np.random.default_rng(byte).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    expected = page_hashes(pages)  # zero, zero, data
    pages[byte] = value
    pages[2 * PAGE_SIZE :] = 0
    assert changed_pages(pages, np.ones(3, np.uint8), expected).tolist() == [0, 2]


def test_copy_scan_copies_flags_and_fingerprints_in_one_pass() -> None:
    src = np.zeros(4 * PAGE_SIZE, dtype=np.uint8)
    src[PAGE_SIZE + 4095] = 7
    src[3 * PAGE_SIZE] = 1
    dst = np.full(4 * PAGE_SIZE, 0xFF, dtype=np.uint8)
    zero = np.empty(4, dtype=np.uint8)
    hashes = np.empty(4, dtype=np.uint64)
    assert copy_scan(src, dst, zero, hashes) == 2
    assert np.array_equal(src, dst)
    assert zero.tolist() == [1, 0, 1, 0]
    assert hashes.tolist() == page_hashes(src).tolist()


def test_copy_scan_classifies_fill_pages() -> None:
    """A page repeating one 8-byte value (a poisoned free page: 0xaa bytes) is a FILL page with that value;
    one differing byte makes it data again."""
    from fph.kernels import PAGE_DATA, PAGE_FILL, PAGE_ZERO

    src = np.zeros(4 * PAGE_SIZE, dtype=np.uint8)
    src[PAGE_SIZE : 2 * PAGE_SIZE] = 0xAA
    src[2 * PAGE_SIZE : 3 * PAGE_SIZE].view(np.uint64)[:] = 0x0102_0304_0506_0708
    src[3 * PAGE_SIZE : 4 * PAGE_SIZE] = 0xAA
    src[4 * PAGE_SIZE - 1] = 0xAB
    classes = np.empty(4, dtype=np.uint8)
    fills = np.zeros(4, dtype=np.uint64)
    hashes = np.empty(4, dtype=np.uint64)
    assert copy_scan(src, np.empty_like(src), classes, hashes, fills) == 3
    assert classes.tolist() == [PAGE_ZERO, PAGE_FILL, PAGE_FILL, PAGE_DATA]
    assert fills[1] == 0xAAAA_AAAA_AAAA_AAAA and fills[2] == 0x0102_0304_0506_0708
    assert hashes.tolist() == page_hashes(src).tolist()


def test_copy_scan_without_zero_pages_copies_the_rest_alike() -> None:
    """``copy_zero_pages=False`` (the rounds' sends): a zero page is read but not copied, its fingerprint
    is the zero page's; data and fill pages are copied, classified and fingerprinted as by the full
    copy_scan, also when the data sits past the zero test's first block or in its last word."""
    from fph.kernels import ZERO_PAGE_FINGERPRINT

    rng = np.random.default_rng(7)
    src = np.zeros(8 * PAGE_SIZE, dtype=np.uint8)
    src[PAGE_SIZE : 2 * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)  # data
    src[3 * PAGE_SIZE : 4 * PAGE_SIZE] = 0xAA  # fill
    src[5 * PAGE_SIZE + 2000] = 3  # one byte in the fourth 512-byte block
    src[7 * PAGE_SIZE - 1] = 1  # the last byte of page 6
    full = [np.empty(8, dtype=np.uint8), np.empty(8, dtype=np.uint64), np.zeros(8, dtype=np.uint64)]
    part = [np.empty(8, dtype=np.uint8), np.empty(8, dtype=np.uint64), np.zeros(8, dtype=np.uint64)]
    dst_full = np.empty_like(src)
    dst_part = np.full_like(src, 0x5A)
    assert copy_scan(src, dst_full, *full) == copy_scan(src, dst_part, *part, copy_zero_pages=False) == 5
    for a, b in zip(full, part, strict=True):
        assert a.tolist() == b.tolist()
    assert int(full[1][0]) == int(ZERO_PAGE_FINGERPRINT) == int(page_hashes(np.zeros(PAGE_SIZE, np.uint8))[0])
    for p in range(8):
        page = slice(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)
        if full[0][p] == 1:  # zero: left as it was
            assert (dst_part[page] == 0x5A).all()
        else:
            assert np.array_equal(dst_part[page], src[page])
