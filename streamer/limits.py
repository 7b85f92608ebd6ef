"""Size limits that keep a hostile record from exhausting memory or disk."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds checked before and while decoding a record.

    max_record_bytes: the whole record value (a tar batch included).
    max_pixels: width*height of any one image (Pillow's bomb guard uses it too).
    max_tar_members: members in one tar batch (a tar bomb of tiny files).
    max_tar_bytes: the sum of member sizes a tar declares (a sparse or inflated tar).
    max_header_bytes: one header value.
    """

    max_record_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_tar_members: int = 4096
    max_tar_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 4096
