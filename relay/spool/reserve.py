"""Spool, the disk reserve (Postfix's queue_minfree): the room kept free on the spool's
file system, and why a new message cannot be taken when it is not there."""

from __future__ import annotations

from dataclasses import dataclass

from relay.observe.metrics import Room

# By default (spool.min_free: auto) the smaller of 512 MiB and 5% of the spool's file system,
# so that a small disk is not refused from the start; and, with any reserve on, the smaller of
# 1000 inodes and 1% of the file system's inodes (a message takes two; what is kept lets
# deliveries rewrite their state files and write bounces).
RESERVE_BYTES, RESERVE_SHARE = 512 * 1024 * 1024, 0.05
RESERVE_INODES, RESERVE_INODE_SHARE = 1000, 0.01


@dataclass(frozen=True)
class Space:
    """Room on the spool's file system as statvfs(3) gives it to an unprivileged process: the
    blocks and inodes reserved for root (ext4's 5%) are not free."""

    free_bytes: int
    total_bytes: int
    free_inodes: int
    total_inodes: int  # 0: the file system has no fixed inode count (btrfs)


def reserve(space: Space, min_free: int | None) -> tuple[int, int]:
    """The bytes and inodes kept free on the spool's file system (0 = none); min_free is
    spool.min_free (None: auto)."""
    if min_free == 0:
        return 0, 0
    share = int(space.total_bytes * RESERVE_SHARE)
    kept = min(RESERVE_BYTES, share) if min_free is None else min_free
    return kept, min(RESERVE_INODES, int(space.total_inodes * RESERVE_INODE_SHARE))


def shortage(space: Space, min_free: int | None, size: int = 0) -> str | None:
    """Why a new message cannot be taken: free bytes or inodes below the reserve, or a
    declared SIZE (RFC 1870) that does not fit above it; None when it can."""
    min_bytes, min_inodes = reserve(space, min_free)
    if space.free_bytes < min_bytes:
        return f"spool: below min_free: {space.free_bytes} bytes free, reserve {min_bytes}"
    if space.free_inodes < min_inodes:
        return (
            f"spool: below the inode reserve: {space.free_inodes} inodes free, reserve {min_inodes}"
        )
    room = space.free_bytes - min_bytes
    if min_bytes and size > room:
        return f"spool: SIZE={size} is more than the {room} bytes free above min_free"
    return None


def room(space: Space, min_free: int | None) -> Room:
    """What the metrics report of the spool's file system: free bytes and inodes, and the
    reserve kept of each."""
    return Room(space.free_bytes, space.free_inodes, *reserve(space, min_free))
