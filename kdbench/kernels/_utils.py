"""Launch helpers shared by the kernel files: tiles, persistent grids, and a cross-program barrier."""

from __future__ import annotations

import functools
import math
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from kdbench._checks import interpreter_on


class TilePlan(NamedTuple):
    """How (N, V) rows are cut into work items of ROWS x BLOCK elements.

    A row that fits one BLOCK-wide tile is one item (``chunks == 1``), and several such
    rows share a tile (``ROWS > 1``) when V is small.  A wider row is cut into
    ``chunks`` BLOCK-wide pieces, one item each, ``ROWS == 1``.  Items are numbered
    row block major: item = row_block * chunks + chunk.
    """

    ROWS: int
    BLOCK: int
    chunks: int
    CHUNKS_PAD: int  # next power of two >= chunks
    items: int


def tile_plan(n: int, v: int, tile: int) -> TilePlan:
    """Cut (n, v) into items of at most ``tile`` elements (a power of two) each."""
    block = max(triton.next_power_of_2(max(v, 1)), 16)
    if block <= tile:
        rows = max(1, min(tile // block, triton.next_power_of_2(max(n, 1))))
        chunks = 1
    else:
        block, rows = tile, 1
        chunks = triton.cdiv(v, tile)
    items = triton.cdiv(max(n, 1), rows) * chunks
    return TilePlan(rows, block, chunks, triton.next_power_of_2(chunks), items)


def pick_config(
    v: int, itemsize: int, wide: tuple[int, int, int], narrow: tuple[int, int, int]
) -> tuple[int, int, int]:
    """(tile elements, warps, programs per SM) for rows of ``v`` elements of ``itemsize`` bytes.

    Rows that fit a ``narrow`` tile share small programs (few warps: a row's reductions
    then stay within a warp or two, which is what keeps the per-row work cheap when
    rows are short).  Wider rows are chunked into ``wide`` tiles, halved for 4-byte
    elements so that the tile and the next one's raw values still fit in registers.
    """
    if max(triton.next_power_of_2(max(v, 1)), 16) <= narrow[0]:
        return narrow
    tile, warps, per_sm = wide
    return (tile // 2 if itemsize >= 4 else tile, warps, per_sm)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (N, V) with unit column stride; copies only when a view cannot give that."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v)
    if x2.stride(-1) != 1 and v > 1:
        x2 = x2.contiguous()
    return x2


def loads_pairs(*tensors: torch.Tensor) -> bool:
    """Whether (N, V) bfloat16 ``tensors`` can be loaded as 32-bit words of two values each
    (``_tile_math.widen``): V, every row stride and every start address even in elements."""
    return all(
        x.dtype == torch.bfloat16 and x.shape[-1] % 2 == 0 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
        for x in tensors
    )


def bf16_round_by_hand(dtype: torch.dtype) -> bool:
    """Whether stores to ``dtype`` must round to bfloat16 in integer arithmetic.

    Triton's CPU interpreter truncates float32 -> bfloat16 instead of rounding to
    nearest-even (the GPU's cvt.rn does round), which would add up to one extra ulp
    of error under test. Only the interpreter takes this path.
    """
    return dtype == torch.bfloat16 and interpreter_on()


def usable_sms(device: torch.device) -> int:
    """Multiprocessors this process may occupy at once.

    Under MPS, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` limits a client to that share of
    the SMs; a persistent grid larger than that could not be resident all at once.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pct = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if pct:
        try:
            sms = max(1, math.floor(sms * min(100.0, float(pct)) / 100.0))
        except ValueError:
            pass
    return sms


@functools.lru_cache(maxsize=None)
def _ctas_per_sm(device_index: int, n_regs: int, shared: int, num_warps: int) -> int:
    """How many CTAs of this shape fit on one SM at once (registers, threads, shared memory)."""
    props = torch.cuda.get_device_properties(device_index)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or 228 * 1024
    # Registers are allocated per warp in units of 256 (Volta through Hopper).
    regs_per_warp = triton.cdiv(max(n_regs, 1) * 32, 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_threads = threads_per_sm // (32 * num_warps)
    by_smem = smem_per_sm // (shared + 1024) if shared else 32  # 1 KB per CTA is reserved
    return max(0, min(by_regs, by_threads, by_smem, 32))


def resident_programs(kernel: Any, device: torch.device, num_warps: int, want_per_sm: int) -> int:
    """Programs of a compiled ``kernel`` that are certain to be resident together.

    ``kernel`` is what ``jit_fn.warmup(...)`` returns.  At most ``want_per_sm`` per SM;
    at least one per SM (a kernel that fits nowhere would not launch at all).
    """
    kernel._init_handles()
    fit = _ctas_per_sm(torch.device(device).index or 0, int(kernel.n_regs), int(kernel.metadata.shared), num_warps)
    return usable_sms(device) * max(1, min(fit, want_per_sm))


@triton.jit
def cast_for_store(
    x,  # float32 tensor
    DTYPE: tl.constexpr,  # element type of the destination
    ROUND_BY_HAND: tl.constexpr,  # see bf16_round_by_hand
):
    """x rounded to nearest-even in DTYPE."""
    if ROUND_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(x != x, bits, rounded) >> 16
        return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def arrive(cnt_ptr):
    """Add 1 to the int32 counter at ``cnt_ptr`` once every thread's earlier stores are done.

    The CTA barrier orders all threads' stores before thread 0's release add (the
    pattern of CUTLASS's ``GenericBarrier``); a program that sees the count with an
    acquire load (:func:`wait_until`) then sees those stores.
    """
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def wait_until(cnt_ptr, target):
    """Return once the int32 counter at ``cnt_ptr`` has reached ``target`` (acquire): every
    store its arrivals published is visible to every thread of the program after this."""
    seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def arrive_and_wait(cnt_ptr, target):
    """Barrier of the programs sharing the int32 counter at ``cnt_ptr``.

    Each arriving program adds 1; it returns once the counter reaches ``target``.  Every
    store the program made before the call is visible to every program after its own
    call returns: the CTA barrier orders all threads' stores before thread 0's release
    add, and the acquire load orders the reads after it (the pattern of CUTLASS's
    ``GenericBarrier``).  All programs counted must be resident at once, or this waits
    for ever: launchers size persistent grids with :func:`resident_programs`.
    """
    tl.debug_barrier()
    seen = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
