"""How transferlab's entry points (the command line, `transferlab.train/resume/compare`, a run's predictions)
set up the process they run in; the training code itself leaves the process alone."""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True where it took.

    By default it maps each block over its threshold (128 KB at first, rising to at most 32 MB as blocks are
    freed) from fresh pages and hands it back to the kernel when freed, so each large activation of every step
    faults its pages in anew. Keeping them made a full fine-tuning step of tf_efficientnet_lite0 (batch 32, 2
    cores, `benchmarks/speed.py`) 1.36x faster in bf16 (73 vs 54 images/s) and 2.0x in fp32 (35 vs 18).
    PyTorch's own CPU launcher (torch.backends.xeon.run_cpu) avoids the faults by preloading tcmalloc; this
    needs no preload. The price: memory the process freed stays with it (for its next batch) until it exits.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1))
