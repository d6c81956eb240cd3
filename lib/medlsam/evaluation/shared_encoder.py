"""A backend wrapper that hands out the same slice embedding to several Segmenter calls.

The evaluation segments every slice once per localization (MedLAM boxes, manual boxes); the
image embedding depends only on the windowed slice, so a small cache keyed by the slice's bytes
lets the second localization reuse the first one's encoder pass. The runner segments slices in
small chunks, so the cache only has to hold one chunk.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class SharedEncoder:
    """Wraps a SAM-family backend; `encode` is cached, everything else is the backend's own."""

    def __init__(self, backend, capacity: int = 32):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._backend = backend
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.capacity = int(capacity)
        self.hits = 0

    def encode(self, image_255: np.ndarray):
        image = np.ascontiguousarray(image_255, dtype=np.float32)
        key = hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return self._cache[key]
        embedding = self._backend.encode(image)
        self._cache[key] = embedding
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return embedding

    def clear(self) -> None:
        self._cache.clear()

    def __getattr__(self, name):
        # counters (encoder_calls, ...), decode, name, device: the wrapped backend's
        return getattr(self._backend, name)
