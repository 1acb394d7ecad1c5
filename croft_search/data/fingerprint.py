"""A content key for a list of samples, used to name feature-cache entries."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from croft_search.data.base import Sample
from croft_search.errors import DataError


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Hex digest of (path relative to the parent of the samples' common folder, label, file size,
    mtime_ns) of every sample, in order.

    Relative paths keep the key valid when the data root moves; size and mtime change
    when an image is replaced. Order matters on purpose: cached feature rows are aligned
    with the sample order, so a reordered list must not hit the same cache entry.
    """
    digest = hashlib.sha256()
    digest.update(f"n={len(samples)}\n".encode())
    if not samples:
        return digest.hexdigest()
    # The common folder's own name stays in the key ("photo/dog/1.jpg", not "dog/1.jpg"),
    # so two domains' test sets never share a key by shape alone.
    base = os.path.dirname(os.path.commonpath([str(sample.path.parent) for sample in samples]))
    for sample in samples:
        try:
            stat = sample.path.stat()
        except OSError:
            raise DataError(f"image not found: {sample.path}") from None
        relative = os.path.relpath(sample.path, base).replace(os.sep, "/")
        digest.update(f"{relative}\t{sample.label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
