"""The lifeline: a child learns its router is gone from end of file, and only from that."""

from __future__ import annotations

import os

from gateway.orphans import parent_gone


def test_only_end_of_file_means_the_router_is_gone() -> None:
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x")  # nobody should write here; if somebody does, nothing ends
        assert not parent_gone(read_end)
        os.close(write_end)
        assert parent_gone(read_end)
    finally:
        os.close(read_end)
