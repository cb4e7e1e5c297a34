"""The "triton" backend: the bucket ops as Triton kernels, registered as PyTorch custom ops.

The same maths as the spec backend (spec.py, the specification) and the C++/CUDA
kernels, over flat buckets:

- ``sq_norm``: one program per ``CHUNK`` elements writes a partial sum, then one program adds
  the partials in a fixed order. Two stages and no atomics: the same gradients give the same bits.
- ``perturb_``: every program reads the squared norm from device memory and back-solves rho_t,
  the guards and the scale itself; program 0 stores rho_t. The backup is written exactly.
- ``restore_``: the bit-exact restore, with the LE-SAM+ combine fused in.
- XSAM: ``xsam_dots`` (three partial sums per chunk, then three fixed-order sums),
  ``xsam_restore_`` and ``xsam_probe_`` (one pass each; the coefficients read from device memory).
- LookSAM: ``look_dots`` (two partial sums per chunk, then two fixed-order sums), ``look_store_``
  and ``look_add_`` (one pass each; the coefficient and found_inf read from device memory).
- The base update fused into the restore: ``sgd_step_`` and ``adam_step_`` (one pass each: w0, the
  final gradient and the state in, the weights and the state out; found_inf and Adam's step read
  from device memory, the bias corrections computed in fp64 by every program). Without a backup
  (a step that perturbed nothing) w0 is param: each program loads its elements before it stores them.
- The multi-tensor forms ``multi_perturb_``, ``multi_restore_``, ``multi_xsam_restore_``,
  ``multi_xsam_probe_``, ``multi_look_store_`` and ``multi_look_add_``: one launch over a list of
  buckets (FSDP2 makes each parameter's shard a bucket), each program finding its bucket's
  addresses in a table ("multi-tensor launches" below); the per-element maths are the per-bucket
  kernels' own (the ``_*_block`` functions). The reductions' partials go through such tables too:
  one launch over all the buckets (per dtype), then one launch of the sums.

Arithmetic is fp32 for fp32/bf16/fp16 buckets (loaded, converted, computed, converted back once),
with correctly rounded divisions and square roots (``div_rn``, ``sqrt_rn``) where the spec
divides or takes a root: plain ``/`` and ``sqrt`` are approximate on the GPU.
Float arguments are not specialised by Triton, so one compiled kernel serves every sigma_t of an
annealing. Triton passes float scalars as fp32, which would cost fp64 buckets precision: those
take the spec ops. The ops are ``torch.library.triton_op``s (namespace ``fused_lesam_triton``),
so ``torch.compile`` traces into them; those whose tables hold the buckets' addresses (the
reductions and the multi-tensor forms) it keeps whole, with fake kernels. The multi-tensor forms
are ``torch.library.custom_op``s with written schemas: their optional lists have no annotation
that schema inference takes, and torch 2.11's ``triton_op`` infers the schema whatever it is given. Every launch goes
through `_launch`: ``wrap_triton`` under a guard of the buckets' device (Triton launches on the
current device).

On CUDA tensors this runs compiled kernels. With ``TRITON_INTERPRET=1`` set before Triton is
imported, it runs them through Triton's interpreter on CPU tensors too: that is how the tests
check them on machines without a GPU (slow; small buckets only).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from ..maths import BUCKET_DTYPES, NORM_EPS, REDUCE_CHUNK, acc_dtype, sum_dtype
from . import spec

NAME = "triton"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRETED):
    raise ImportError("the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on the CPU)")
if INTERPRETED:
    # The interpreter makes triton.jit return an InterpretedFunction: torch 2.14's wrap_triton hands
    # it back as is, torch 2.11's rejects it. Launch it directly then, on every torch.
    def wrap_triton(kernel):
        return kernel


CHUNK = REDUCE_CHUNK  # elements per partial sum of the norm, as in the C++/CUDA kernels
REDUCE_BLOCK = 1024  # elements loaded at a time by the norm programs
ELEMENTWISE_BLOCK = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}  # 4 KB per program
NUM_WARPS = 4


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """fp32 x rounded to ``dtype`` to nearest even, as a GPU rounds. For bf16 the rounding is
    written out because Triton's interpreter truncates there, and the CPU tests should check what
    the GPU computes."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def _own_block(n, BLOCK: tl.constexpr):
    """A per-bucket kernel's block: program i takes elements [i BLOCK, (i + 1) BLOCK) of its bucket
    of n elements. Its offsets and their mask."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n


@triton.jit
def _table_program(table_ptr, programs_ptr, ROW: tl.constexpr, ALIGNED: tl.constexpr):
    """A multi-tensor kernel's work (`_table`): this program's bucket (its row of the table), the
    first element it takes, the bucket's size, and the program's index (the reductions' partial).
    ALIGNED: every size in the table is a multiple of 16 (see `_table_pointer`)."""
    program = programs_ptr + 3 * tl.program_id(0)
    row = table_ptr + ROW * tl.load(program)
    start = tl.load(program + 1)
    n = tl.load(row + ROW - 1)
    if ALIGNED:  # the start, a multiple of the block, always is
        start = tl.multiple_of(start, 16)
        n = tl.multiple_of(n, 16)
    return row, start, n, tl.load(program + 2)


@triton.jit
def _table_block(table_ptr, programs_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """A multi-tensor element-wise kernel's block: its bucket's row of the table, offsets, mask."""
    row, start, n, _ = _table_program(table_ptr, programs_ptr, ROW, ALIGNED)
    offsets = start + tl.arange(0, BLOCK)
    return row, offsets, offsets < n


@triton.jit
def _table_pointer(row, role: tl.constexpr, like_ptr, ALIGNED: tl.constexpr):
    """The bucket's ``role`` pointer, read from its row of the table as an int64 address and cast
    to the type of ``like_ptr`` (a bucket of the call: one dtype for all). ALIGNED: every address
    in the table is a multiple of 16 bytes. Told that of the pointers and the sizes (what Triton
    assumes of a kernel's own pointer and integer arguments when they are), the compiler loads and
    stores 16 bytes at a time; of an address read from memory it knows nothing otherwise."""
    pointer = tl.load(row + role).to(like_ptr.dtype)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _sq_partials_kernel(
    table_ptr,
    programs_ptr,
    like_ptr,
    partials_ptr,
    WEIGHTED: tl.constexpr,
    CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[index] = sum of g^2 (or (w g)^2) over the program's chunk (its bucket's elements
    [start, start + CHUNK)), accumulated in the partials' dtype. Table roles: grad, weight."""
    row, start, n, index = _table_program(table_ptr, programs_ptr, 3, ALIGNED)
    g_ptr = _table_pointer(row, 0, like_ptr, ALIGNED)
    w_ptr = _table_pointer(row, 1, like_ptr, ALIGNED)
    acc_type = partials_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=acc_type)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        if WEIGHTED:
            x = x * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc_type)  # (|w| g)^2 = (w g)^2
        acc += x * x
    tl.store(partials_ptr + index, tl.sum(acc, axis=0))


@triton.jit
def _sum_kernel(partials_ptr, count, out_ptr, BLOCK: tl.constexpr):
    """out[j] = the sum of partials[j count : (j + 1) count], in a fixed order (program j)."""
    j = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=partials_ptr.dtype.element_ty)
    for start in range(0, count, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + j * count + offsets, mask=offsets < count, other=0.0)
    tl.store(out_ptr + j, tl.sum(acc, axis=0))


@triton.jit
def _perturb_block(
    w_ptr,
    g_ptr,
    backup_ptr,
    center_ptr,
    sq_ptr,
    sigma_ptr,
    rho_ptr,
    offsets,
    mask,
    sigma,
    rho_max,
    varrho,
    ADAPTIVE: tl.constexpr,
    SAVE_BACKUP: tl.constexpr,
    SAVE_CENTER: tl.constexpr,
    SIGMA_ON_DEVICE: tl.constexpr,
    NORM_EPS: tl.constexpr,
):
    """perturb_ on one block of a bucket (``offsets``, ``mask``): the per-bucket and multi-tensor kernels."""
    # The radius back-solve (maths.radius_and_scale): rho_t = min(sigma / (n + varrho), rho_max),
    # scale = rho_t / (n + NORM_EPS); both 0 for a non-finite norm, the scale 0 for a zero norm.
    if SIGMA_ON_DEVICE:
        sigma = tl.load(sigma_ptr).to(tl.float32)
    # sqrt_rn and div_rn: correctly rounded, as torch computes them (plain sqrt and / are approximate
    # on the GPU).
    norm = tl.sqrt_rn(tl.load(sq_ptr).to(tl.float32))
    finite = norm - norm == 0.0  # false for inf and NaN
    # min(., rho_max) that keeps a NaN, as torch.clamp(max=) does in the torch backend.
    unclipped = tl.div_rn(sigma, norm + varrho)
    rho = tl.where(finite, tl.where(unclipped > rho_max, rho_max, unclipped), 0.0)
    scale = tl.where(finite & (norm > 0.0), tl.div_rn(rho, norm + NORM_EPS), 0.0)
    if tl.program_id(0) == 0:
        tl.store(rho_ptr, rho)
    w = tl.load(w_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    if SAVE_BACKUP:
        tl.store(backup_ptr + offsets, w, mask=mask)
    if SAVE_CENTER:
        tl.store(center_ptr + offsets, g, mask=mask)
    wf = w.to(tl.float32)
    direction = g.to(tl.float32)
    if ADAPTIVE:
        direction = wf * wf * direction
    perturbed = _narrow(wf + direction * scale, w.dtype)
    tl.store(w_ptr + offsets, tl.where(finite, perturbed, w), mask=mask)  # a non-finite norm: w untouched


@triton.jit
def _perturb_kernel(
    w_ptr,
    g_ptr,
    backup_ptr,
    center_ptr,
    sq_ptr,
    sigma_ptr,
    rho_ptr,
    n,
    sigma,
    rho_max,
    varrho,
    ADAPTIVE: tl.constexpr,
    SAVE_BACKUP: tl.constexpr,
    SAVE_CENTER: tl.constexpr,
    SIGMA_ON_DEVICE: tl.constexpr,
    NORM_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, mask = _own_block(n, BLOCK)
    _perturb_block(
        w_ptr,
        g_ptr,
        backup_ptr,
        center_ptr,
        sq_ptr,
        sigma_ptr,
        rho_ptr,
        offsets,
        mask,
        sigma,
        rho_max,
        varrho,
        ADAPTIVE,
        SAVE_BACKUP,
        SAVE_CENTER,
        SIGMA_ON_DEVICE,
        NORM_EPS,
    )


@triton.jit
def _multi_perturb_kernel(
    table_ptr,
    programs_ptr,
    like_ptr,
    sq_ptr,
    sigma_ptr,
    rho_ptr,
    sigma,
    rho_max,
    varrho,
    ADAPTIVE: tl.constexpr,
    SAVE_BACKUP: tl.constexpr,
    SAVE_CENTER: tl.constexpr,
    SIGMA_ON_DEVICE: tl.constexpr,
    NORM_EPS: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Table roles: param, grad, backup, center.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 5, BLOCK, ALIGNED)
    _perturb_block(
        _table_pointer(row, 0, like_ptr, ALIGNED),
        _table_pointer(row, 1, like_ptr, ALIGNED),
        _table_pointer(row, 2, like_ptr, ALIGNED),
        _table_pointer(row, 3, like_ptr, ALIGNED),
        sq_ptr,
        sigma_ptr,
        rho_ptr,
        offsets,
        mask,
        sigma,
        rho_max,
        varrho,
        ADAPTIVE,
        SAVE_BACKUP,
        SAVE_CENTER,
        SIGMA_ON_DEVICE,
        NORM_EPS,
    )


@triton.jit
def _restore_block(w_ptr, backup_ptr, g_ptr, center_ptr, offsets, mask, ghat_coef, center_coef, COMBINE: tl.constexpr):
    tl.store(w_ptr + offsets, tl.load(backup_ptr + offsets, mask=mask), mask=mask)
    if COMBINE:
        ghat = tl.load(g_ptr + offsets, mask=mask)
        center = tl.load(center_ptr + offsets, mask=mask).to(tl.float32)
        combined = ghat.to(tl.float32) * ghat_coef - center * center_coef
        tl.store(g_ptr + offsets, _narrow(combined, ghat.dtype), mask=mask)


@triton.jit
def _restore_kernel(
    w_ptr, backup_ptr, g_ptr, center_ptr, n, ghat_coef, center_coef, COMBINE: tl.constexpr, BLOCK: tl.constexpr
):
    offsets, mask = _own_block(n, BLOCK)
    _restore_block(w_ptr, backup_ptr, g_ptr, center_ptr, offsets, mask, ghat_coef, center_coef, COMBINE)


@triton.jit
def _multi_restore_kernel(
    table_ptr,
    programs_ptr,
    like_ptr,
    ghat_coef,
    center_coef,
    COMBINE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Table roles: param, backup, grad, center.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 5, BLOCK, ALIGNED)
    _restore_block(
        _table_pointer(row, 0, like_ptr, ALIGNED),
        _table_pointer(row, 1, like_ptr, ALIGNED),
        _table_pointer(row, 2, like_ptr, ALIGNED),
        _table_pointer(row, 3, like_ptr, ALIGNED),
        offsets,
        mask,
        ghat_coef,
        center_coef,
        COMBINE,
    )


def _check(op: str, name: str, t: Tensor, like: Tensor | None = None, like_name: str = "") -> None:
    """The checks of the C++ ops (csrc/bucket_args.h), with the same messages."""
    where = f"fused_lesam_triton::{op}: {name}"
    if t.dtype not in BUCKET_DTYPES:
        raise RuntimeError(f"{where} has dtype {t.dtype}; buckets must be float32, float64, float16 or bfloat16")
    if not t.is_contiguous():
        raise RuntimeError(f"{where} must be contiguous (a flat bucket), got strides {t.stride()}")
    if like is None:
        return
    if t.dtype != like.dtype:
        raise RuntimeError(f"{where} has dtype {t.dtype} but {like_name} has {like.dtype}")
    if t.numel() != like.numel():
        raise RuntimeError(f"{where} has {t.numel()} elements but {like_name} has {like.numel()}")
    if t.device != like.device:
        raise RuntimeError(f"{where} is on {t.device} but {like_name} is on {like.device}")


def _check_buckets(op: str, param: Tensor, flat: bool = False, **others: Tensor | None) -> None:
    """The prologue of every element-wise op: ``param`` and its other buckets (None: not given),
    each like ``param``; with ``flat``, 1-D as well (the base-update ops slice them)."""
    for name, t in {"param": param, **others}.items():
        if t is None:
            continue
        _check(op, name, t, None if t is param else param, "param")
        if flat and t.dim() != 1:
            raise RuntimeError(
                f"fused_lesam_triton::{op}: {name} must be a flat (1-D) bucket, got shape {tuple(t.shape)}"
            )


def _device_guard(device: torch.device):
    """Makes ``device`` the current CUDA device for a launch: Triton launches on the current device,
    which need not be the buckets'. Nothing to do for CPU tensors (which only the interpreter runs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Every kernel launch of this file: through ``wrap_triton`` (so that torch.compile traces into
    the ops), on ``device``."""
    with _device_guard(device):
        wrap_triton(kernel)[grid](*args, **meta, num_warps=NUM_WARPS)


def _launch_elementwise(kernel, bucket: Tensor, *args, min_programs: int = 0, **meta) -> None:
    """An element-wise kernel over ``bucket`` (its dtype sets BLOCK, 4 KB per program; its size the
    grid; its device the guard), ``args`` and ``meta`` being the kernel's own. ``min_programs`` at
    least: an empty bucket launches nothing unless a program must run."""
    block = ELEMENTWISE_BLOCK[bucket.dtype]
    programs = max(triton.cdiv(bucket.numel(), block), min_programs)
    if programs:
        _launch(kernel, (programs,), bucket.device, *args, BLOCK=block, **meta)


# ------------------------------------------------------------------------ multi-tensor launches
# A multi-tensor kernel works on a list of buckets in one launch (under FSDP2 each parameter's
# shard is a bucket: one launch per op instead of one per shard), in the style of apex's and ATen's
# multi-tensor kernels. Its table (int64, on the buckets' device) holds a row per bucket: the
# address of its tensor of each role (param, grad, ...), then its size; and three entries per
# program: its bucket, the first element it takes, and its index (where a reduction's program
# stores its partial). A kernel reads its bucket's addresses and casts them to typed pointers
# (`_table_pointer`: int_to_ptr in compiled Triton, a reinterpretation in the interpreter).
#
# The tables are kept (`_TABLES`, by their contents and the stream): an optimizer's buckets are the
# same tensors step after step, so a table is built and copied to the device once (from pinned
# memory, one non-blocking copy) and its launches then read it where it is. A table built while a
# CUDA graph is being captured is never let go (`_CAPTURED_TABLES`): the graph's copy reads its
# pinned host memory at every replay.
TABLES_KEPT = 64
_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, int, bool]] = OrderedDict()
_CAPTURED_TABLES: dict[tuple, tuple[Tensor, Tensor, Tensor, int, bool]] = {}


def _table(
    roles: list[list[Tensor]], block: int, first_indices: list[int] | None = None, one_at_least: bool = False
) -> tuple[Tensor, Tensor, int, bool]:
    """(table, programs, number of programs, ALIGNED: see `_table_pointer`) for a launch over the
    buckets of ``roles`` (a list of buckets per role; the first role's sizes set the programs),
    ``block`` elements per program. A bucket's programs are indexed from its entry of
    ``first_indices`` (None: from 0). With ``one_at_least``, buckets all empty still get a program
    (it takes no element)."""
    buckets = roles[0]
    device = buckets[0].device
    rows = [value for i, bucket in enumerate(buckets) for value in (*(r[i].data_ptr() for r in roles), bucket.numel())]
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, block, one_at_least, None if first_indices is None else tuple(first_indices), *rows)
    kept = _TABLES.get(key) or _CAPTURED_TABLES.get(key)
    if kept is None:
        programs = []
        for i, bucket in enumerate(buckets):
            first = 0 if first_indices is None else first_indices[i]
            for j in range(triton.cdiv(bucket.numel(), block)):
                programs += (i, j * block, first + j)
        if one_at_least and not programs:
            programs = [0, 0, 0]
        host = torch.tensor(rows + programs, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
            capturing = torch.cuda.is_current_stream_capturing()
            on_device = host.to(device, non_blocking=True)
        else:
            capturing, on_device = False, host
        aligned = all(value % 16 == 0 for value in rows)  # the addresses in bytes, the sizes in elements
        kept = (host, on_device[: len(rows)], on_device[len(rows) :], len(programs) // 3, aligned)
        if capturing:
            _CAPTURED_TABLES[key] = kept
        else:
            _TABLES[key] = kept
            if len(_TABLES) > TABLES_KEPT:
                _TABLES.popitem(last=False)
    elif key in _TABLES:
        _TABLES.move_to_end(key)
    return kept[1:]


def _launch_multi(kernel, roles: list[list[Tensor]], *args, one_at_least: bool = False, **meta) -> None:
    """One launch of a multi-tensor element-wise kernel over the buckets of ``roles`` (their dtype
    sets BLOCK, as in `_launch_elementwise`), ``args`` and ``meta`` being the kernel's own after the
    table, the programs and a bucket that types the pointers."""
    buckets = roles[0]
    block = ELEMENTWISE_BLOCK[buckets[0].dtype]
    table, programs, count, aligned = _table(roles, block, one_at_least=one_at_least)
    if count:
        like = max(buckets, key=Tensor.numel)
        _launch(kernel, (count,), like.device, table, programs, like, *args, ALIGNED=aligned, BLOCK=block, **meta)


def _chunk_groups(buckets: list[Tensor], kinds: list) -> tuple[int, dict]:
    """The chunks of a reduction: bucket i's CHUNK-element chunks have the partials first_i,
    first_i + 1, ... in bucket order (the layout and order of one launch per bucket, so the sums keep
    their bits). The buckets of one kind (``kinds[i]``: the dtype, and sq_norm's weighting) go to one
    launch. Returns the number of chunks and {kind: (its non-empty buckets' indices, their first_i)}."""
    groups: dict = {}
    total = 0
    for i, (bucket, kind) in enumerate(zip(buckets, kinds)):
        count = triton.cdiv(bucket.numel(), CHUNK)
        if count:
            indices, firsts = groups.setdefault(kind, ([], []))
            indices.append(i)
            firsts.append(total)
        total += count
    return total, groups


def _launch_partials(kernel, roles: list[list[Tensor]], indices: list[int], firsts: list[int], partials, *args, **meta):
    """One launch of a partials kernel over the buckets ``indices`` of ``roles`` (a group of
    `_chunk_groups`), writing ``partials``; ``args`` and ``meta`` are the kernel's own after them."""
    group = [[role[i] for i in indices] for role in roles]
    table, programs, count, aligned = _table(group, CHUNK, firsts)
    like = max(group[0], key=Tensor.numel)
    _launch(
        kernel,
        (count,),
        like.device,
        table,
        programs,
        like,
        partials,
        *args,
        CHUNK=CHUNK,
        ALIGNED=aligned,
        BLOCK=REDUCE_BLOCK,
        **meta,
    )


def _opaque_to_compile(op, fake) -> None:
    """torch.compile keeps an op that launches multi-tensor kernels whole, one call in its graph: its
    tables need the buckets' addresses, which fake and functional tensors do not have, so its body
    is not traced. ``fake`` gives its output's metadata; functionalization treats it as any custom
    op (as torch.export does triton_ops) instead of decomposing it into its kernel launches."""
    op.register_fake(fake)
    op.register_torch_dispatch(FunctionalTensorMode, _undecomposed)


def _undecomposed(mode, func, types, args, kwargs):
    return mode.__torch_dispatch__(func, types, args, kwargs)


@triton_op("fused_lesam_triton::sq_norm", mutates_args=())
def sq_norm(grads: list[Tensor], weights: list[Tensor | None]) -> Tensor:
    if len(grads) != len(weights):
        raise RuntimeError(f"fused_lesam_triton::sq_norm: got {len(grads)} grad buckets but {len(weights)} weights")
    for i, (grad, weight) in enumerate(zip(grads, weights)):
        _check("sq_norm", f"grads[{i}]", grad)
        if weight is not None:
            _check("sq_norm", f"weights[{i}]", weight, grad, f"grads[{i}]")
    out_dtype = sum_dtype(grads)
    total, groups = _chunk_groups(grads, [(g.dtype, w is not None) for g, w in zip(grads, weights)])
    partials = torch.empty(total, dtype=out_dtype, device=grads[0].device)
    roles = [grads, [g if w is None else w for g, w in zip(grads, weights)]]
    for (_, weighted), (indices, firsts) in groups.items():
        _launch_partials(_sq_partials_kernel, roles, indices, firsts, partials, WEIGHTED=weighted)
    out = torch.empty((), dtype=out_dtype, device=grads[0].device)
    _launch(_sum_kernel, (1,), out.device, partials, total, out, BLOCK=REDUCE_BLOCK)
    return out


def _sq_norm_fake(grads, weights):
    return grads[0].new_empty((), dtype=sum_dtype(grads))


_opaque_to_compile(sq_norm, _sq_norm_fake)


def _check_radius_args(op: str, sq: Tensor, sigma_t: Tensor | None, param: Tensor) -> None:
    if sq.dim() != 0 or sq.dtype not in (torch.float32, torch.float64) or sq.device != param.device:
        raise RuntimeError(
            f"fused_lesam_triton::{op}: sq must be the 0-d float32/float64 tensor sq_norm returns "
            f"on param's device, got a {sq.dtype} tensor of shape {tuple(sq.shape)} on {sq.device}"
        )
    if sigma_t is not None and (sigma_t.dim() != 0 or sigma_t.dtype != torch.float64):
        raise RuntimeError(
            f"fused_lesam_triton::{op}: sigma_t must be a 0-d float64 tensor, got a {sigma_t.dtype} "
            f"tensor of shape {tuple(sigma_t.shape)}"
        )
    if sigma_t is not None and sigma_t.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::{op}: sigma_t is on {sigma_t.device} but param is on {param.device}")


@triton_op("fused_lesam_triton::perturb_", mutates_args=("param", "backup", "center"))
def perturb_(
    param: Tensor,
    grad: Tensor,
    backup: Tensor | None,
    sq: Tensor,
    sigma: float,
    rho_max: float,
    varrho: float,
    adaptive: bool,
    center: Tensor | None = None,
    sigma_t: Tensor | None = None,
) -> Tensor:
    _check_buckets("perturb_", param, grad=grad, backup=backup, center=center)
    _check_radius_args("perturb_", sq, sigma_t, param)
    if param.dtype == torch.float64:
        return spec.perturb_(
            param=param,
            grad=grad,
            backup=backup,
            sq=sq,
            sigma=sigma,
            rho_max=rho_max,
            varrho=varrho,
            adaptive=adaptive,
            center=center,
            sigma_t=sigma_t,
        )
    rho = torch.empty((), dtype=torch.float32, device=param.device)
    _launch_elementwise(
        _perturb_kernel,
        param,
        param,
        grad,
        param if backup is None else backup,
        param if center is None else center,
        sq,
        sq if sigma_t is None else sigma_t,
        rho,
        param.numel(),
        sigma,
        rho_max,
        varrho,
        ADAPTIVE=adaptive,
        SAVE_BACKUP=backup is not None,
        SAVE_CENTER=center is not None,
        SIGMA_ON_DEVICE=sigma_t is not None,
        NORM_EPS=NORM_EPS,
        min_programs=1,
    )  # one program at least: it stores rho_t
    return rho


if torch.__version__ < (2, 14):
    # torch 2.11's autograd layer of a custom op bumps the version of every mutated argument by its
    # position, but the dispatcher leaves out trailing arguments at their defaults: perturb_ without
    # center and sigma_t fails there (IndexError). Its replacement skips the ones left out, as later
    # torch does; the op itself is unchanged.
    def _perturb_inplace_or_view(keyset, *args, **kwargs):
        for i in (0, 2, 8):  # param, backup, center
            if i < len(args):
                torch._library.custom_ops.increment_version(args[i])
        return perturb_._opoverload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)

    perturb_._lib.impl("perturb_", _perturb_inplace_or_view, "ADInplaceOrView", with_keyset=True, allow_override=True)


@triton_op("fused_lesam_triton::restore_", mutates_args=("param", "grad"))
def restore_(
    param: Tensor, backup: Tensor, grad: Tensor, center: Tensor | None, ghat_coef: float, center_coef: float
) -> None:
    _check_buckets("restore_", param, backup=backup, grad=grad, center=center)
    if param.dtype == torch.float64:
        spec.restore_(
            param=param, backup=backup, grad=grad, center=center, ghat_coef=ghat_coef, center_coef=center_coef
        )
        return
    _launch_elementwise(
        _restore_kernel,
        param,
        param,
        backup,
        grad,
        grad if center is None else center,
        param.numel(),
        ghat_coef,
        center_coef,
        COMBINE=center is not None,
    )


# ---------------------------------------------------------------------------------------- XSAM
@triton.jit
def _dots_partials_kernel(
    table_ptr,
    programs_ptr,
    like_ptr,
    partials_ptr,
    total,
    CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[j * total + index] for j = sum D^2, sum g^2, sum D g over the program's chunk
    (D = w - b). Table roles: param, backup, grad."""
    row, start, n, index = _table_program(table_ptr, programs_ptr, 4, ALIGNED)
    w_ptr = _table_pointer(row, 0, like_ptr, ALIGNED)
    b_ptr = _table_pointer(row, 1, like_ptr, ALIGNED)
    g_ptr = _table_pointer(row, 2, like_ptr, ALIGNED)
    acc_type = partials_ptr.dtype.element_ty
    dd = tl.zeros([BLOCK], dtype=acc_type)
    gg = tl.zeros([BLOCK], dtype=acc_type)
    dg = tl.zeros([BLOCK], dtype=acc_type)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        d = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc_type) - tl.load(
            b_ptr + offsets, mask=mask, other=0.0
        ).to(acc_type)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        dd += d * d
        gg += g * g
        dg += d * g
    tl.store(partials_ptr + index, tl.sum(dd, axis=0))
    tl.store(partials_ptr + total + index, tl.sum(gg, axis=0))
    tl.store(partials_ptr + 2 * total + index, tl.sum(dg, axis=0))


@triton.jit
def _coefs(coefs_ptr):
    """The slerp coefficients (c0, c1), read from the device."""
    return tl.load(coefs_ptr).to(tl.float32), tl.load(coefs_ptr + 1).to(tl.float32)


@triton.jit
def _xsam_restore_block(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, offsets, mask, HAS_DELTA: tl.constexpr):
    c0, c1 = _coefs(coefs_ptr)
    b = tl.load(backup_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask)
    if HAS_DELTA:
        d = tl.load(delta_ptr + offsets, mask=mask).to(tl.float32)
    else:
        d = tl.load(w_ptr + offsets, mask=mask).to(tl.float32) - b.to(tl.float32)
    tl.store(g_ptr + offsets, _narrow(d * c0 + g.to(tl.float32) * c1, g.dtype), mask=mask)
    tl.store(w_ptr + offsets, b, mask=mask)


@triton.jit
def _xsam_restore_kernel(
    w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, n, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    offsets, mask = _own_block(n, BLOCK)
    _xsam_restore_block(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, offsets, mask, HAS_DELTA)


@triton.jit
def _multi_xsam_restore_kernel(
    table_ptr, programs_ptr, like_ptr, coefs_ptr, HAS_DELTA: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    # Table roles: param, backup, grad, delta.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 5, BLOCK, ALIGNED)
    _xsam_restore_block(
        _table_pointer(row, 0, like_ptr, ALIGNED),
        _table_pointer(row, 1, like_ptr, ALIGNED),
        _table_pointer(row, 2, like_ptr, ALIGNED),
        _table_pointer(row, 3, like_ptr, ALIGNED),
        coefs_ptr,
        offsets,
        mask,
        HAS_DELTA,
    )


@triton.jit
def _xsam_probe_block(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, offsets, mask, SAVE_DELTA: tl.constexpr):
    c0, c1 = _coefs(coefs_ptr)
    w = tl.load(w_ptr + offsets, mask=mask)
    b = tl.load(backup_ptr + offsets, mask=mask).to(tl.float32)
    if SAVE_DELTA:
        d = _narrow(w.to(tl.float32) - b, w.dtype)
        tl.store(delta_ptr + offsets, d, mask=mask)
    else:
        d = tl.load(delta_ptr + offsets, mask=mask)
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(w_ptr + offsets, _narrow(b + (d.to(tl.float32) * c0 + g * c1), w.dtype), mask=mask)


@triton.jit
def _xsam_probe_kernel(
    w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, n, SAVE_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    offsets, mask = _own_block(n, BLOCK)
    _xsam_probe_block(w_ptr, backup_ptr, g_ptr, delta_ptr, coefs_ptr, offsets, mask, SAVE_DELTA)


@triton.jit
def _multi_xsam_probe_kernel(
    table_ptr, programs_ptr, like_ptr, coefs_ptr, SAVE_DELTA: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    # Table roles: param, backup, grad, delta.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 5, BLOCK, ALIGNED)
    _xsam_probe_block(
        _table_pointer(row, 0, like_ptr, ALIGNED),
        _table_pointer(row, 1, like_ptr, ALIGNED),
        _table_pointer(row, 2, like_ptr, ALIGNED),
        _table_pointer(row, 3, like_ptr, ALIGNED),
        coefs_ptr,
        offsets,
        mask,
        SAVE_DELTA,
    )


def _check_coefs(op: str, coefs: Tensor, param: Tensor) -> None:
    if coefs.dim() != 1 or coefs.numel() != 2 or coefs.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"fused_lesam_triton::{op}: coefs must be a (2,) float32/float64 tensor, got a {coefs.dtype} "
            f"tensor of shape {tuple(coefs.shape)}"
        )
    if coefs.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::{op}: coefs is on {coefs.device} but param is on {param.device}")


@triton_op("fused_lesam_triton::xsam_dots", mutates_args=())
def xsam_dots(params: list[Tensor], backups: list[Tensor], grads: list[Tensor]) -> Tensor:
    if not (len(params) == len(backups) == len(grads)):
        raise RuntimeError(
            f"fused_lesam_triton::xsam_dots: got {len(params)} param, {len(backups)} backup and "
            f"{len(grads)} grad buckets; they must match one to one"
        )
    if not params:
        raise RuntimeError("fused_lesam_triton::xsam_dots: needs at least one bucket")
    for i, (param, backup, grad) in enumerate(zip(params, backups, grads)):
        _check("xsam_dots", f"params[{i}]", param)
        _check("xsam_dots", f"backups[{i}]", backup, param, f"params[{i}]")
        _check("xsam_dots", f"grads[{i}]", grad, param, f"params[{i}]")
    out_dtype = sum_dtype(params)
    total, groups = _chunk_groups(params, [p.dtype for p in params])
    partials = torch.zeros(3 * max(total, 1), dtype=out_dtype, device=params[0].device)
    for indices, firsts in groups.values():
        _launch_partials(_dots_partials_kernel, [params, backups, grads], indices, firsts, partials, total)
    out = torch.empty(3, dtype=out_dtype, device=params[0].device)
    _launch(_sum_kernel, (3,), out.device, partials, total, out, BLOCK=REDUCE_BLOCK)
    return out


def _xsam_dots_fake(params, backups, grads):
    return params[0].new_empty(3, dtype=sum_dtype(params))


_opaque_to_compile(xsam_dots, _xsam_dots_fake)


@triton_op("fused_lesam_triton::xsam_restore_", mutates_args=("param", "grad"))
def xsam_restore_(param: Tensor, backup: Tensor, grad: Tensor, delta: Tensor | None, coefs: Tensor) -> None:
    _check_buckets("xsam_restore_", param, backup=backup, grad=grad, delta=delta)
    _check_coefs("xsam_restore_", coefs, param)
    if param.dtype == torch.float64:
        spec.xsam_restore_(param=param, backup=backup, grad=grad, delta=delta, coefs=coefs)
        return
    _launch_elementwise(
        _xsam_restore_kernel,
        param,
        param,
        backup,
        grad,
        param if delta is None else delta,
        coefs,
        param.numel(),
        HAS_DELTA=delta is not None,
    )


@triton_op("fused_lesam_triton::xsam_probe_", mutates_args=("param", "delta"))
def xsam_probe_(param: Tensor, backup: Tensor, grad: Tensor, delta: Tensor, coefs: Tensor, save_delta: bool) -> None:
    _check_buckets("xsam_probe_", param, backup=backup, grad=grad, delta=delta)
    _check_coefs("xsam_probe_", coefs, param)
    if param.dtype == torch.float64:
        spec.xsam_probe_(param=param, backup=backup, grad=grad, delta=delta, coefs=coefs, save_delta=save_delta)
        return
    _launch_elementwise(
        _xsam_probe_kernel, param, param, backup, grad, delta, coefs, param.numel(), SAVE_DELTA=save_delta
    )


# ---------------------------------------------------------------------------------------- LookSAM
@triton.jit
def _look_dots_partials_kernel(
    table_ptr,
    programs_ptr,
    like_ptr,
    partials_ptr,
    total,
    CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """partials[j * total + index] for j = sum g_hat g, sum g^2 over the program's chunk. Table
    roles: g_hat (grad), g (center)."""
    row, start, n, index = _table_program(table_ptr, programs_ptr, 3, ALIGNED)
    ghat_ptr = _table_pointer(row, 0, like_ptr, ALIGNED)
    g_ptr = _table_pointer(row, 1, like_ptr, ALIGNED)
    acc_type = partials_ptr.dtype.element_ty
    hg = tl.zeros([BLOCK], dtype=acc_type)
    gg = tl.zeros([BLOCK], dtype=acc_type)
    for i in tl.static_range(0, CHUNK, BLOCK):
        offsets = start + i + tl.arange(0, BLOCK)
        mask = offsets < n
        h = tl.load(ghat_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
        hg += h * g
        gg += g * g
    tl.store(partials_ptr + index, tl.sum(hg, axis=0))
    tl.store(partials_ptr + total + index, tl.sum(gg, axis=0))


@triton.jit
def _look_store_block(dir_ptr, ghat_ptr, g_ptr, coef_ptr, found_inf_ptr, offsets, mask):
    taken = tl.load(found_inf_ptr) == 0.0  # false for a nonzero or NaN found_inf: g_v is kept
    write = _and_taken(mask, taken)
    coef = tl.load(coef_ptr).to(tl.float32)
    ghat = tl.load(ghat_ptr + offsets, mask=write)
    g = tl.load(g_ptr + offsets, mask=write).to(tl.float32)
    tl.store(dir_ptr + offsets, _narrow(ghat.to(tl.float32) - g * coef, ghat.dtype), mask=write)


@triton.jit
def _look_store_kernel(dir_ptr, ghat_ptr, g_ptr, coef_ptr, found_inf_ptr, n, BLOCK: tl.constexpr):
    offsets, mask = _own_block(n, BLOCK)
    _look_store_block(dir_ptr, ghat_ptr, g_ptr, coef_ptr, found_inf_ptr, offsets, mask)


@triton.jit
def _multi_look_store_kernel(
    table_ptr, programs_ptr, like_ptr, coef_ptr, found_inf_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr
):
    # Table roles: look_dir, grad, center.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 4, BLOCK, ALIGNED)
    _look_store_block(
        _table_pointer(row, 0, like_ptr, ALIGNED),
        _table_pointer(row, 1, like_ptr, ALIGNED),
        _table_pointer(row, 2, like_ptr, ALIGNED),
        coef_ptr,
        found_inf_ptr,
        offsets,
        mask,
    )


@triton.jit
def _look_add_block(g_ptr, dir_ptr, coef_ptr, offsets, mask):
    coef = tl.load(coef_ptr).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask)
    d = tl.load(dir_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(g_ptr + offsets, _narrow(g.to(tl.float32) + d * coef, g.dtype), mask=mask)


@triton.jit
def _look_add_kernel(g_ptr, dir_ptr, coef_ptr, n, BLOCK: tl.constexpr):
    offsets, mask = _own_block(n, BLOCK)
    _look_add_block(g_ptr, dir_ptr, coef_ptr, offsets, mask)


@triton.jit
def _multi_look_add_kernel(table_ptr, programs_ptr, like_ptr, coef_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # Table roles: grad, look_dir.
    row, offsets, mask = _table_block(table_ptr, programs_ptr, 3, BLOCK, ALIGNED)
    _look_add_block(
        _table_pointer(row, 0, like_ptr, ALIGNED), _table_pointer(row, 1, like_ptr, ALIGNED), coef_ptr, offsets, mask
    )


def _check_look_coef(op: str, coef: Tensor, bucket: Tensor) -> None:
    if coef.dim() != 0 or coef.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(
            f"fused_lesam_triton::{op}: coef must be a 0-d float32/float64 tensor, got a {coef.dtype} "
            f"tensor of shape {tuple(coef.shape)}"
        )
    if coef.device != bucket.device:
        raise RuntimeError(f"fused_lesam_triton::{op}: coef is on {coef.device} but the buckets are on {bucket.device}")


def _check_look_found_inf(op: str, found_inf: Tensor, look_dir: Tensor) -> None:
    if found_inf.dim() != 0 or found_inf.dtype != torch.float32:
        raise RuntimeError(
            f"fused_lesam_triton::{op}: found_inf must be a 0-d float32 tensor, got a {found_inf.dtype} "
            f"tensor of shape {tuple(found_inf.shape)}"
        )
    if found_inf.device != look_dir.device:
        raise RuntimeError(
            f"fused_lesam_triton::{op}: found_inf is on {found_inf.device} but look_dir is on {look_dir.device}"
        )


@triton_op("fused_lesam_triton::look_dots", mutates_args=())
def look_dots(grads: list[Tensor], centers: list[Tensor]) -> Tensor:
    if len(grads) != len(centers):
        raise RuntimeError(
            f"fused_lesam_triton::look_dots: got {len(grads)} grad and {len(centers)} center buckets; "
            f"they must match one to one"
        )
    if not grads:
        raise RuntimeError("fused_lesam_triton::look_dots: needs at least one bucket")
    for i, (grad, center) in enumerate(zip(grads, centers)):
        _check("look_dots", f"grads[{i}]", grad)
        _check("look_dots", f"centers[{i}]", center, grad, f"grads[{i}]")
    out_dtype = sum_dtype(grads)
    total, groups = _chunk_groups(grads, [g.dtype for g in grads])
    partials = torch.zeros(2 * max(total, 1), dtype=out_dtype, device=grads[0].device)
    for indices, firsts in groups.values():
        _launch_partials(_look_dots_partials_kernel, [grads, centers], indices, firsts, partials, total)
    out = torch.empty(2, dtype=out_dtype, device=grads[0].device)
    _launch(_sum_kernel, (2,), out.device, partials, total, out, BLOCK=REDUCE_BLOCK)
    return out


def _look_dots_fake(grads, centers):
    return grads[0].new_empty(2, dtype=sum_dtype(grads))


_opaque_to_compile(look_dots, _look_dots_fake)


@triton_op("fused_lesam_triton::look_store_", mutates_args=("look_dir",))
def look_store_(look_dir: Tensor, grad: Tensor, center: Tensor, coef: Tensor, found_inf: Tensor) -> None:
    for name, t in (("look_dir", look_dir), ("grad", grad), ("center", center)):
        _check("look_store_", name, t, None if t is look_dir else look_dir, "look_dir")
    _check_look_coef("look_store_", coef, look_dir)
    _check_look_found_inf("look_store_", found_inf, look_dir)
    if look_dir.dtype == torch.float64:
        spec.look_store_(look_dir=look_dir, grad=grad, center=center, coef=coef, found_inf=found_inf)
        return
    _launch_elementwise(_look_store_kernel, look_dir, look_dir, grad, center, coef, found_inf, look_dir.numel())


@triton_op("fused_lesam_triton::look_add_", mutates_args=("grad",))
def look_add_(grad: Tensor, look_dir: Tensor, coef: Tensor) -> None:
    _check("look_add_", "grad", grad)
    _check("look_add_", "look_dir", look_dir, grad, "grad")
    _check_look_coef("look_add_", coef, grad)
    if grad.dtype == torch.float64:
        spec.look_add_(grad=grad, look_dir=look_dir, coef=coef)
        return
    _launch_elementwise(_look_add_kernel, grad, grad, look_dir, coef, grad.numel())


# ------------------------------------------------------------------------------ multi-tensor forms
# spec.py's multi_* ops: on every bucket of their lists exactly what the per-bucket op computes on
# it, in one launch of a multi-tensor kernel (`_table`) whatever the number of buckets; a list of
# one bucket takes the per-bucket op (its kernel knows its pointers' alignment), fp64 the spec's.
# Their schemas are written out: infer_schema takes no optional list of tensors, and they have no
# defaults (the Python functions that call them do): torch 2.11's dispatcher leaves out mutated
# trailing arguments at their defaults (see perturb_).
def _check_lists(op: str, **lists: list[Tensor] | None) -> int:
    """The number of buckets of a multi-tensor op, after its lists' checks (None: not given): one
    length, at least 1; each bucket like the first list's bucket at its index (`_check`); and the
    first list's buckets of one dtype on one device."""
    given = {name: tensors for name, tensors in lists.items() if tensors is not None}
    lengths = {name: len(tensors) for name, tensors in given.items()}
    first_name, first = next(iter(given.items()))
    if not first or any(length != len(first) for length in lengths.values()):
        raise RuntimeError(f"fused_lesam_triton::{op}: the lists must have one length, at least 1; got {lengths}")
    for i, bucket in enumerate(first):
        _check(op, f"{first_name}[{i}]", bucket)
        if bucket.dtype != first[0].dtype or bucket.device != first[0].device:
            raise RuntimeError(
                f"fused_lesam_triton::{op}: {first_name}[{i}] has dtype {bucket.dtype} on {bucket.device} but "
                f"{first_name}[0] has {first[0].dtype} on {first[0].device}; one call takes one dtype on one device"
            )
    for name, tensors in given.items():
        if tensors is not first:
            for i, t in enumerate(tensors):
                _check(op, f"{name}[{i}]", t, first[i], f"{first_name}[{i}]")
    return len(first)


def _stand_in(buckets: list[Tensor] | None, instead: list[Tensor]) -> list[Tensor]:
    """An optional list for the table: ``instead`` when it is not given (the kernel then never
    touches that role, as the per-bucket kernels' stand-in pointers)."""
    return instead if buckets is None else buckets


@torch.library.custom_op(
    "fused_lesam_triton::multi_perturb_",
    mutates_args=("params", "backups", "centers"),
    schema="(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[]? backups, Tensor sq, float sigma, float rho_max, "
    "float varrho, bool adaptive, Tensor(c!)[]? centers, Tensor? sigma_t) -> Tensor",
)
def _multi_perturb(params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers, sigma_t):
    count = _check_lists("multi_perturb_", params=params, grads=grads, backups=backups, centers=centers)
    _check_radius_args("multi_perturb_", sq, sigma_t, params[0])
    if count == 1:
        backup, center = (None if bucket is None else bucket[0] for bucket in (backups, centers))
        return perturb_(params[0], grads[0], backup, sq, sigma, rho_max, varrho, adaptive, center, sigma_t)
    if params[0].dtype == torch.float64:
        return spec.multi_perturb_(params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers, sigma_t)
    rho = torch.empty((), dtype=torch.float32, device=params[0].device)
    _launch_multi(
        _multi_perturb_kernel,
        [params, grads, _stand_in(backups, params), _stand_in(centers, params)],
        sq,
        sq if sigma_t is None else sigma_t,
        rho,
        sigma,
        rho_max,
        varrho,
        ADAPTIVE=adaptive,
        SAVE_BACKUP=backups is not None,
        SAVE_CENTER=centers is not None,
        SIGMA_ON_DEVICE=sigma_t is not None,
        NORM_EPS=NORM_EPS,
        one_at_least=True,
    )  # one program at least: it stores rho_t
    return rho


def _multi_perturb_fake(params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers, sigma_t):
    return params[0].new_empty((), dtype=acc_dtype(params[0].dtype))


def multi_perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    backups: list[Tensor] | None,
    sq: Tensor,
    sigma: float,
    rho_max: float,
    varrho: float,
    adaptive: bool,
    centers: list[Tensor] | None = None,
    sigma_t: Tensor | None = None,
) -> Tensor:
    """spec.multi_perturb_: the defaults of the last two arguments, for the op that has none."""
    return _multi_perturb(params, grads, backups, sq, sigma, rho_max, varrho, adaptive, centers, sigma_t)


@torch.library.custom_op(
    "fused_lesam_triton::multi_restore_",
    mutates_args=("params", "grads"),
    schema="(Tensor(a!)[] params, Tensor[] backups, Tensor(b!)[] grads, Tensor[]? centers, float ghat_coef, "
    "float center_coef) -> ()",
)
def multi_restore_(params, backups, grads, centers, ghat_coef, center_coef):
    count = _check_lists("multi_restore_", params=params, backups=backups, grads=grads, centers=centers)
    if count == 1:
        restore_(params[0], backups[0], grads[0], None if centers is None else centers[0], ghat_coef, center_coef)
    elif params[0].dtype == torch.float64:
        spec.multi_restore_(params, backups, grads, centers, ghat_coef, center_coef)
    else:
        _launch_multi(
            _multi_restore_kernel,
            [params, backups, grads, _stand_in(centers, grads)],
            ghat_coef,
            center_coef,
            COMBINE=centers is not None,
        )


@torch.library.custom_op(
    "fused_lesam_triton::multi_xsam_restore_",
    mutates_args=("params", "grads"),
    schema="(Tensor(a!)[] params, Tensor[] backups, Tensor(b!)[] grads, Tensor[]? deltas, Tensor coefs) -> ()",
)
def multi_xsam_restore_(params, backups, grads, deltas, coefs):
    count = _check_lists("multi_xsam_restore_", params=params, backups=backups, grads=grads, deltas=deltas)
    _check_coefs("multi_xsam_restore_", coefs, params[0])
    if count == 1:
        xsam_restore_(params[0], backups[0], grads[0], None if deltas is None else deltas[0], coefs)
    elif params[0].dtype == torch.float64:
        spec.multi_xsam_restore_(params, backups, grads, deltas, coefs)
    else:
        _launch_multi(
            _multi_xsam_restore_kernel,
            [params, backups, grads, _stand_in(deltas, params)],
            coefs,
            HAS_DELTA=deltas is not None,
        )


@torch.library.custom_op(
    "fused_lesam_triton::multi_xsam_probe_",
    mutates_args=("params", "deltas"),
    schema="(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] deltas, Tensor coefs, "
    "bool save_delta) -> ()",
)
def multi_xsam_probe_(params, backups, grads, deltas, coefs, save_delta):
    count = _check_lists("multi_xsam_probe_", params=params, backups=backups, grads=grads, deltas=deltas)
    _check_coefs("multi_xsam_probe_", coefs, params[0])
    if count == 1:
        xsam_probe_(params[0], backups[0], grads[0], deltas[0], coefs, save_delta)
    elif params[0].dtype == torch.float64:
        spec.multi_xsam_probe_(params, backups, grads, deltas, coefs, save_delta)
    else:
        _launch_multi(_multi_xsam_probe_kernel, [params, backups, grads, deltas], coefs, SAVE_DELTA=save_delta)


@torch.library.custom_op(
    "fused_lesam_triton::multi_look_store_",
    mutates_args=("look_dirs",),
    schema="(Tensor(a!)[] look_dirs, Tensor[] grads, Tensor[] centers, Tensor coef, Tensor found_inf) -> ()",
)
def multi_look_store_(look_dirs, grads, centers, coef, found_inf):
    count = _check_lists("multi_look_store_", look_dirs=look_dirs, grads=grads, centers=centers)
    _check_look_coef("multi_look_store_", coef, look_dirs[0])
    _check_look_found_inf("multi_look_store_", found_inf, look_dirs[0])
    if count == 1:
        look_store_(look_dirs[0], grads[0], centers[0], coef, found_inf)
    elif look_dirs[0].dtype == torch.float64:
        spec.multi_look_store_(look_dirs, grads, centers, coef, found_inf)
    else:
        _launch_multi(_multi_look_store_kernel, [look_dirs, grads, centers], coef, found_inf)


@torch.library.custom_op(
    "fused_lesam_triton::multi_look_add_",
    mutates_args=("grads",),
    schema="(Tensor(a!)[] grads, Tensor[] look_dirs, Tensor coef) -> ()",
)
def multi_look_add_(grads, look_dirs, coef):
    count = _check_lists("multi_look_add_", grads=grads, look_dirs=look_dirs)
    _check_look_coef("multi_look_add_", coef, grads[0])
    if count == 1:
        look_add_(grads[0], look_dirs[0], coef)
    elif grads[0].dtype == torch.float64:
        spec.multi_look_add_(grads, look_dirs, coef)
    else:
        _launch_multi(_multi_look_add_kernel, [grads, look_dirs], coef)


def _no_output(*args) -> None:
    return None


_opaque_to_compile(_multi_perturb, _multi_perturb_fake)
for _op in (multi_restore_, multi_xsam_restore_, multi_xsam_probe_, multi_look_store_, multi_look_add_):
    _opaque_to_compile(_op, _no_output)


# ------------------------------------------------------------------ the base update, fused into the restore
# One pass ends a step: read w0 (backup), the final gradient and the optimizer state, write the
# weights and the state (spec.sgd_step_ / adam_step_, torch.optim's SGD and Adam/AdamW).
# Each stored state value is rounded once to the bucket's dtype and the stored value is what the
# rest of the step uses, as torch's reads of its state do. found_inf is read here: a skipped step
# stores w0 bit-exactly and writes no state (the state stores are masked off, not rewritten).
@triton.jit
def _final_grad(
    g_ptr, center_ptr, offsets, mask, ghat_coef, center_coef, COMBINE: tl.constexpr, MAXIMIZE: tl.constexpr
):
    """The gradient the base optimizer steps with (fp32): the LE-SAM+ combine, then maximize's sign."""
    g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
    if COMBINE:
        g = g * ghat_coef - tl.load(center_ptr + offsets, mask=mask).to(tl.float32) * center_coef
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _store_state(state_ptr, offsets, write, value):
    """state <- value rounded to the state's dtype where ``write``; returns the stored value in fp32."""
    stored = _narrow(value, state_ptr.dtype.element_ty)
    tl.store(state_ptr + offsets, stored, mask=write)
    return stored.to(tl.float32)


@triton.jit
def _and_taken(mask, taken):
    """mask & taken for the scalar ``taken``: written as a where because Triton's interpreter
    cannot broadcast a scalar bool into a block for ``&`` (it raises a numpy TypeError)."""
    return tl.where(taken, mask, False)


@triton.jit
def _sgd_step_kernel(
    w_ptr,
    backup_ptr,
    g_ptr,
    buf_ptr,
    center_ptr,
    found_inf_ptr,
    n,
    lr,
    momentum,
    keep,
    weight_decay,
    ghat_coef,
    center_coef,
    MOMENTUM: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    INIT_BUFFER: tl.constexpr,
    COMBINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # keep = 1 - dampening
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    taken = tl.load(found_inf_ptr) == 0.0  # false for a nonzero or NaN found_inf: the step is skipped
    backup = tl.load(backup_ptr + offsets, mask=mask)
    w0 = backup.to(tl.float32)
    g = _final_grad(g_ptr, center_ptr, offsets, mask, ghat_coef, center_coef, COMBINE, MAXIMIZE)
    if WEIGHT_DECAY:
        g = g + w0 * weight_decay
    d = g
    if MOMENTUM:
        if INIT_BUFFER:
            b = g
        else:
            b = tl.load(buf_ptr + offsets, mask=mask).to(tl.float32) * momentum + g * keep
        b = _store_state(buf_ptr, offsets, _and_taken(mask, taken), b)
        if NESTEROV:
            d = g + b * momentum
        else:
            d = b
    tl.store(w_ptr + offsets, tl.where(taken, _narrow(w0 - d * lr, backup.dtype), backup), mask=mask)


@triton.jit
def _from_halves(hi, lo):
    """hi + lo in fp64: a Python float passed as two fp32 halves (Triton passes floats as fp32)."""
    return tl.full([], hi, tl.float64) + lo


@triton.jit
def _adam_step_kernel(
    w_ptr,
    backup_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    center_ptr,
    step_ptr,
    found_inf_ptr,
    n,
    lr_hi,
    lr_lo,
    beta1_hi,
    beta1_lo,
    beta2_hi,
    beta2_lo,
    lerp_weight,
    lerp_rest,
    one_minus_beta2,
    eps,
    weight_decay,
    decay_keep,
    ghat_coef,
    center_coef,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    LERP_SMALL_WEIGHT: tl.constexpr,
    COMBINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # lerp_weight = 1 - beta1 and lerp_rest = 1 - lerp_weight (in fp32, as torch's lerp takes them);
    # decay_keep = 1 - lr * weight_decay (AdamW).
    # The bias corrections in fp64 from t (beta^t = 2^(t log2 beta)); fp32 would lose them for large t.
    # fp64 / and sqrt are correctly rounded on the GPU too (div.rn.f64, sqrt.rn.f64; *_rn are fp32 only).
    t = tl.load(step_ptr).to(tl.float64)
    beta1_t = tl.exp2(t * tl.log2(_from_halves(beta1_hi, beta1_lo)))
    beta2_t = tl.exp2(t * tl.log2(_from_halves(beta2_hi, beta2_lo)))
    step_size = (_from_halves(lr_hi, lr_lo) / (1.0 - beta1_t)).to(tl.float32)
    bias2_sqrt = tl.sqrt(1.0 - beta2_t).to(tl.float32)

    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    taken = tl.load(found_inf_ptr) == 0.0  # false for a nonzero or NaN found_inf: the step is skipped
    write = _and_taken(mask, taken)
    backup = tl.load(backup_ptr + offsets, mask=mask)
    w0 = backup.to(tl.float32)
    g = _final_grad(g_ptr, center_ptr, offsets, mask, ghat_coef, center_coef, COMBINE, MAXIMIZE)
    if WEIGHT_DECAY:
        if DECOUPLED:
            w0 = w0 * decay_keep
        else:
            g = g + w0 * weight_decay
    m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
    if LERP_SMALL_WEIGHT:  # torch's lerp(m, g, w): two forms, each exact at its own end
        m = m + lerp_weight * (g - m)
    else:
        m = g - (g - m) * lerp_rest
    m = _store_state(m_ptr, offsets, write, m)
    v = tl.load(v_ptr + offsets, mask=mask).to(tl.float32) * beta2_hi + g * g * one_minus_beta2  # hi: beta2 in fp32
    v = _store_state(v_ptr, offsets, write, v)
    if AMSGRAD:  # torch.maximum propagates NaN
        vmax = tl.load(vmax_ptr + offsets, mask=mask).to(tl.float32)
        v = _store_state(vmax_ptr, offsets, write, tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL))
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    new = w0 - step_size * tl.div_rn(m, denom)
    tl.store(w_ptr + offsets, tl.where(taken, _narrow(new, backup.dtype), backup), mask=mask)


def _fp32(x: float) -> float:
    """x rounded to the nearest fp32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _halves(x: float) -> tuple[float, float]:
    """x as hi + lo, both fp32 values (48 of x's 53 bits), for the kernel to add back in fp64."""
    hi = _fp32(x)
    return hi, _fp32(x - hi)


def _check_given(op: str, name: str, t: Tensor | None, wanted: bool, when: str) -> None:
    """An optional state bucket is given exactly when its option is on (``when`` says which)."""
    if (t is not None) != wanted:
        raise RuntimeError(
            f"fused_lesam_triton::{op}: {name} must be given exactly when {when} "
            f"({'it is' if wanted else 'it is not'}), but it was {'None' if t is None else 'given'}"
        )


def _check_device_scalar(op: str, name: str, t: Tensor, param: Tensor) -> None:
    """found_inf and step: a 0-d float32 tensor on param's device, read by the kernel itself."""
    if t.dim() != 0 or t.dtype != torch.float32:
        raise RuntimeError(
            f"fused_lesam_triton::{op}: {name} must be a 0-d float32 tensor, got a {t.dtype} tensor "
            f"of shape {tuple(t.shape)}"
        )
    if t.device != param.device:
        raise RuntimeError(f"fused_lesam_triton::{op}: {name} is on {t.device} but param is on {param.device}")


@triton_op("fused_lesam_triton::sgd_step_", mutates_args=("param", "momentum_buffer"))
def sgd_step_(
    param: Tensor,
    backup: Tensor | None,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    center: Tensor | None,
    found_inf: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_buffer: bool,
    ghat_coef: float,
    center_coef: float,
) -> None:
    _check_buckets(
        "sgd_step_", param, flat=True, backup=backup, grad=grad, momentum_buffer=momentum_buffer, center=center
    )
    _check_given("sgd_step_", "momentum_buffer", momentum_buffer, momentum != 0, "momentum != 0")
    _check_device_scalar("sgd_step_", "found_inf", found_inf, param)
    if param.dtype == torch.float64:
        spec.sgd_step_(
            param=param,
            backup=backup,
            grad=grad,
            momentum_buffer=momentum_buffer,
            center=center,
            found_inf=found_inf,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            init_buffer=init_buffer,
            ghat_coef=ghat_coef,
            center_coef=center_coef,
        )
        return
    _launch_elementwise(
        _sgd_step_kernel,
        param,
        param,
        param if backup is None else backup,
        grad,
        param if momentum_buffer is None else momentum_buffer,
        grad if center is None else center,
        found_inf,
        param.numel(),
        lr,
        momentum,
        1 - dampening,
        weight_decay,
        ghat_coef,
        center_coef,
        MOMENTUM=momentum != 0,
        WEIGHT_DECAY=weight_decay != 0,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        INIT_BUFFER=init_buffer,
        COMBINE=center is not None,
    )


@triton_op("fused_lesam_triton::adam_step_", mutates_args=("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
def adam_step_(
    param: Tensor,
    backup: Tensor | None,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    center: Tensor | None,
    step: Tensor,
    found_inf: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    ghat_coef: float,
    center_coef: float,
) -> None:
    _check_buckets(
        "adam_step_",
        param,
        flat=True,
        backup=backup,
        grad=grad,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        max_exp_avg_sq=max_exp_avg_sq,
        center=center,
    )
    _check_given("adam_step_", "max_exp_avg_sq", max_exp_avg_sq, amsgrad, "amsgrad")
    _check_device_scalar("adam_step_", "step", step, param)
    _check_device_scalar("adam_step_", "found_inf", found_inf, param)
    if param.dtype == torch.float64:
        spec.adam_step_(
            param=param,
            backup=backup,
            grad=grad,
            exp_avg=exp_avg,
            exp_avg_sq=exp_avg_sq,
            max_exp_avg_sq=max_exp_avg_sq,
            center=center,
            step=step,
            found_inf=found_inf,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            ghat_coef=ghat_coef,
            center_coef=center_coef,
        )
        return
    # The scalars the kernel combines with each other are rounded here, as torch rounds them: fp32
    # for the element-wise maths, fp32 halves of the fp64 values behind the bias corrections.
    lerp_weight = _fp32(1 - beta1)
    _launch_elementwise(
        _adam_step_kernel,
        param,
        param,
        param if backup is None else backup,
        grad,
        exp_avg,
        exp_avg_sq,
        exp_avg if max_exp_avg_sq is None else max_exp_avg_sq,
        grad if center is None else center,
        step,
        found_inf,
        param.numel(),
        *_halves(lr),
        *_halves(beta1),
        *_halves(beta2),
        lerp_weight,
        1 - lerp_weight,
        1 - beta2,
        eps,
        weight_decay,
        1 - lr * weight_decay,
        ghat_coef,
        center_coef,
        WEIGHT_DECAY=weight_decay != 0,
        DECOUPLED=decoupled_weight_decay,
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        LERP_SMALL_WEIGHT=abs(lerp_weight) < 0.5,
        COMBINE=center is not None,
    )
