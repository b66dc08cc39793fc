"""Triton kernels for NeuMF's embedding layer: the four gathers, the GMF product, the MLP input's
concatenation and the cast to the compute dtype in one kernel, and a backward that forms each
table row's gradient once, without atomics, without index_add_ and without a zero-fill.

    gmf, mlp_input = gather_inputs(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype)

is, in values and in gradients w.r.t. the four tables, the plain

    gmf = (mf_user[user] * mf_item[item]).to(dtype)
    mlp_input = torch.cat((mlp_user[user], mlp_item[item]), dim=1).to(dtype)

Forward: a 2-D grid, one program per BLOCK_B samples and per part of the output (column 0: the
GMF product of their MF rows, in fp32; 1: the MLP input's user half; 2: its item half), each
written straight in `dtype`; it saves only the two index vectors (and references to the two MF
tables, which the backward re-gathers: no [B, F] rows kept).

Backward, per side (user: mf_user and mlp_user; item: mf_item and mlp_item): one stable sort of
that side's indices, shared by its two tables; the run [start, end) of every table row in the
sorted indices comes from one torch.searchsorted of arange(n_rows + 1) (row r's run ends where row
r + 1's begins), so nothing waits on the host. Then one kernel, a 2-D grid: each program owns
BLOCK_R consecutive rows of one of the two tables (column 0: the MF table, 1: the MLP table) and
writes each of them exactly once (zeros for a row absent from the batch: the outputs are
torch.empty), walking the row's run in tiles of BLOCK_P positions and reducing each tile with
tl.sum in fp32. A sample's MF gradient, grad_gmf[s] * mf_other[other[s]], re-gathers the other
side's MF row there. The gradients are dense fp32 tables, so torch's Adam (fused=True included)
runs unchanged with its exact dense semantics.

Both are torch.library custom ops (ncf::gather_inputs, ncf::gather_inputs_backward) with fake
implementations and autograd registered: torch.compile keeps them as opaque nodes of its graph.

Triton is imported lazily: this module imports without it; `available()` says whether the kernels
can run here (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1 set before first use).

The kernels, the ops and their launch helpers take their tensors one by one, each table and
each gradient a parameter: a kernel's pointers and a custom op's schema are flat.
"""
import contextlib
import functools
import os

import torch

from ncflib.models import NeuMF

class FusedNeuMF(NeuMF):
    """`--impl fused`: NeuMF whose input layer is `gather_inputs` (the rest runs under
    torch.compile, which fuses the MLP's ReLU, dropout and casts itself)."""

    def inputs(self, user, item, rows=None):
        return gather_inputs(user, item, *self.tables(rows), self.compute_dtype(user))


# The kernels gather NeuMF's four tables: the other models (two tables) run under --impl
# compile, whose generated gathers serve them.
MODEL_CLASSES = {'neumf': FusedNeuMF}


# Block sizes (all constexpr in the kernels), for the recipe's sizes: F=64, H=128, a batch of
# 2^20, 138k users and 27k items. These gathers are bound by memory latency: what counts is how
# many warps an SM keeps in flight, and a thread's registers bound that (64K registers a SM). A
# thread holds rows x width / (32 x warps) elements of its program's tile, each with an address
# of its own where the rows' alignment is unknown (a width not a multiple of 16: no vector
# loads). Hence one part of the work per program (a forward program gathers one of the GMF
# product, the MLP user half and the MLP item half; a backward program sums rows of one table),
# and warps in proportion to the tile, so that a thread holds 16 elements (of one 128-wide row
# or of two 64-wide MF rows), stays well under 128 registers, aligned or not, and spills nothing
# (benchmarks/kernel_resources.py reads them from the compiled kernels). More warps rather than
# more programs: Triton's interpreter, which runs the tests without a GPU, runs programs one
# after another at a cost per operation, whatever the tile.
FORWARD_BLOCK_B = 64        # samples per forward program: 16k x 3 programs at 2^20
FORWARD_WARPS = 16
BACKWARD_BLOCK_R = 2        # table rows per backward program
BACKWARD_BLOCK_P_MIN = 16   # positions per tile of a row's run, sized from the mean run length;
BACKWARD_BLOCK_P_MAX = 32   # at 64 (16 warps), ptxas trims the registers for sm_80 and spills
BACKWARD_POSITIONS_PER_WARP = 4  # warps = BLOCK_P / 4


def available():
    """(ok, reason): whether the Triton kernels can run here, and if not, why."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, 'triton is not installed: pip install triton'
    if torch.cuda.is_available() or _interpreting():
        return True, ''
    return False, 'needs CUDA (or TRITON_INTERPRET=1 for Triton\'s CPU interpreter)'


def _interpreting():
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernels, defined on first use (Triton reads TRITON_INTERPRET when they are)."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(user_ptr, item_ptr, mf_user_ptr, mf_item_ptr, mlp_user_ptr, mlp_item_ptr,
                       gmf_ptr, mlp_ptr, B, F, H,
                       stride_mf_user, stride_mf_item, stride_mlp_user, stride_mlp_item,
                       BLOCK_B: tl.constexpr, F_PAD: tl.constexpr, H_PAD: tl.constexpr):
        # Column 0 of the grid: the GMF product; 1: the MLP input's user half; 2: its item half.
        # (One program doing all three would have all four tables' rows in registers at once:
        # the compiler issues every load before the first store.)
        b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_batch = b < B
        part = tl.program_id(1)
        out_dtype = gmf_ptr.dtype.element_ty
        if part == 0:
            u = tl.load(user_ptr + b, mask=in_batch, other=0).to(tl.int64)
            i = tl.load(item_ptr + b, mask=in_batch, other=0).to(tl.int64)
            f = tl.arange(0, F_PAD)[None, :]
            mask_f = in_batch[:, None] & (f < F)
            x = tl.load(mf_user_ptr + u[:, None] * stride_mf_user + f, mask=mask_f, other=0.0)
            y = tl.load(mf_item_ptr + i[:, None] * stride_mf_item + f, mask=mask_f, other=0.0)
            gmf = x.to(tl.float32) * y.to(tl.float32)
            tl.store(gmf_ptr + b[:, None] * F + f, gmf.to(out_dtype), mask=mask_f)
        else:
            if part == 1:
                index_ptr, table_ptr, stride = user_ptr, mlp_user_ptr, stride_mlp_user
            else:
                index_ptr, table_ptr, stride = item_ptr, mlp_item_ptr, stride_mlp_item
            r = tl.load(index_ptr + b, mask=in_batch, other=0).to(tl.int64)
            h = tl.arange(0, H_PAD)[None, :]
            mask_h = in_batch[:, None] & (h < H)
            row = tl.load(table_ptr + r[:, None] * stride + h, mask=mask_h, other=0.0)
            tl.store(mlp_ptr + b[:, None] * (2 * H) + (part - 1) * H + h, row.to(out_dtype),
                     mask=mask_h)

    @triton.jit
    def backward_kernel(perm_ptr, bounds_ptr, other_ptr, mf_other_ptr, grad_gmf_ptr,
                        grad_mlp_ptr, grad_mf_ptr, grad_mlpt_ptr, n_rows, F, H, mlp_column,
                        stride_mf_other, stride_grad_gmf, stride_grad_mlp,
                        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                        F_PAD: tl.constexpr, H_PAD: tl.constexpr):
        # Column 0 of the grid: rows of the MF table; 1: rows of the MLP table. Row r's run in
        # the sorted indices is [bounds[r], bounds[r + 1]).
        first = tl.program_id(0).to(tl.int64) * BLOCK_R
        positions = tl.arange(0, BLOCK_P)
        if tl.program_id(1) == 0:
            f = tl.arange(0, F_PAD)
            f_in = f < F
            f_in_tile = f_in[None, :]
            grad_gmf_cols = grad_gmf_ptr + f[None, :]
            mf_other_cols = mf_other_ptr + f[None, :]
            grad_mf_cols = grad_mf_ptr + f
            for k in tl.static_range(BLOCK_R):
                r = first + k
                if r < n_rows:  # the last program's rows may run past the table's end
                    bound = bounds_ptr + r
                    start = tl.load(bound)
                    end = tl.load(bound + 1)
                    acc_mf = tl.zeros([F_PAD], dtype=tl.float32)
                    for p0 in range(start, end, BLOCK_P):
                        p = p0 + positions
                        in_run = p < end
                        s = tl.load(perm_ptr + p, mask=in_run, other=0).to(tl.int64)
                        o = tl.load(other_ptr + s, mask=in_run, other=0).to(tl.int64)
                        mask = in_run[:, None] & f_in_tile
                        g = tl.load(grad_gmf_cols + s[:, None] * stride_grad_gmf, mask=mask,
                                    other=0.0)
                        e = tl.load(mf_other_cols + o[:, None] * stride_mf_other, mask=mask,
                                    other=0.0)
                        acc_mf += tl.sum(g.to(tl.float32) * e.to(tl.float32), axis=0)
                    tl.store(grad_mf_cols + r * F, acc_mf, mask=f_in)
        else:
            h = tl.arange(0, H_PAD)
            h_in = h < H
            h_in_tile = h_in[None, :]
            grad_mlp_cols = grad_mlp_ptr + mlp_column + h[None, :]
            grad_mlpt_cols = grad_mlpt_ptr + h
            for k in tl.static_range(BLOCK_R):
                r = first + k
                if r < n_rows:
                    bound = bounds_ptr + r
                    start = tl.load(bound)
                    end = tl.load(bound + 1)
                    acc_mlp = tl.zeros([H_PAD], dtype=tl.float32)
                    for p0 in range(start, end, BLOCK_P):
                        p = p0 + positions
                        in_run = p < end
                        s = tl.load(perm_ptr + p, mask=in_run, other=0).to(tl.int64)
                        gm = tl.load(grad_mlp_cols + s[:, None] * stride_grad_mlp,
                                     mask=in_run[:, None] & h_in_tile, other=0.0)
                        acc_mlp += tl.sum(gm.to(tl.float32), axis=0)
                    tl.store(grad_mlpt_cols + r * H, acc_mlp, mask=h_in)

    return forward_kernel, backward_kernel


def _rows(t):
    """t with unit column stride (a copy only if it has not: parameters never need one)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == 'cuda' else contextlib.nullcontext()


def _check(user, item, mf_user, mf_item, mlp_user, mlp_item):
    ok, reason = available()
    if not ok:
        raise RuntimeError(f'fused.gather_inputs: {reason}')
    if user.device.type != 'cuda' and not _interpreting():
        raise RuntimeError('fused.gather_inputs: CPU tensors need TRITON_INTERPRET=1 '
                           '(Triton\'s interpreter)')
    if user.dim() != 1 or item.shape != user.shape:
        raise ValueError(f'user and item must be index vectors of one length, got '
                         f'{tuple(user.shape)} and {tuple(item.shape)}')
    if mf_user.shape[0] != mlp_user.shape[0] or mf_item.shape[0] != mlp_item.shape[0]:
        raise ValueError('the MF and MLP tables of a side must have as many rows')
    if mf_user.shape[1] != mf_item.shape[1] or mlp_user.shape[1] != mlp_item.shape[1]:
        raise ValueError('the user and item tables of a branch must be as wide')


# The launches' grids and arguments, in one place each: the ops below launch them, and
# benchmarks/kernel_resources.py compiles the same ahead of time to read their registers.

def _forward_launch(user, item, mf_user, mf_item, mlp_user, mlp_item, gmf, mlp_input):
    """(grid, args, options) of the forward kernel over these tensors."""
    B, F, H = user.shape[0], mf_user.shape[1], mlp_user.shape[1]
    grid = (_cdiv(B, FORWARD_BLOCK_B), 3)
    args = (user, item, mf_user, mf_item, mlp_user, mlp_item, gmf, mlp_input, B, F, H,
            mf_user.stride(0), mf_item.stride(0), mlp_user.stride(0), mlp_item.stride(0))
    options = dict(BLOCK_B=FORWARD_BLOCK_B, F_PAD=_pow2(F), H_PAD=_pow2(H),
                   num_warps=FORWARD_WARPS)
    return grid, args, options


def _backward_block_p(B, n_rows):
    """Positions per tile of a row's run: the mean run length's power of two, clamped."""
    return min(max(_pow2(_cdiv(B, n_rows)), BACKWARD_BLOCK_P_MIN), BACKWARD_BLOCK_P_MAX)


def _backward_launch(perm, bounds, other, mf_other, grad_gmf, grad_mlp, grad_mf, grad_mlp_table,
                     mlp_column, block_p):
    """(grid, args, options) of one side's backward kernel over these tensors."""
    (n_rows, F), H = grad_mf.shape, grad_mlp_table.shape[1]
    grid = (_cdiv(n_rows, BACKWARD_BLOCK_R), 2)
    args = (perm, bounds, other, mf_other, grad_gmf, grad_mlp, grad_mf, grad_mlp_table, n_rows,
            F, H, mlp_column, mf_other.stride(0), grad_gmf.stride(0), grad_mlp.stride(0))
    options = dict(BLOCK_R=BACKWARD_BLOCK_R, BLOCK_P=block_p, F_PAD=_pow2(F), H_PAD=_pow2(H),
                   num_warps=max(1, block_p // BACKWARD_POSITIONS_PER_WARP))
    return grid, args, options


@torch.library.custom_op('ncf::gather_inputs', mutates_args=())
def _gather_inputs(user: torch.Tensor, item: torch.Tensor, mf_user: torch.Tensor,
                   mf_item: torch.Tensor, mlp_user: torch.Tensor, mlp_item: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    _check(user, item, mf_user, mf_item, mlp_user, mlp_item)
    forward_kernel, _ = _kernels()
    B, F, H = user.shape[0], mf_user.shape[1], mlp_user.shape[1]
    gmf = torch.empty((B, F), dtype=dtype, device=user.device)
    mlp_input = torch.empty((B, 2 * H), dtype=dtype, device=user.device)
    if B == 0:
        return gmf, mlp_input
    user, item = user.contiguous(), item.contiguous()
    mf_user, mf_item, mlp_user, mlp_item = map(_rows, (mf_user, mf_item, mlp_user, mlp_item))
    grid, args, options = _forward_launch(user, item, mf_user, mf_item, mlp_user, mlp_item, gmf,
                                          mlp_input)
    with _device_guard(user):
        forward_kernel[grid](*args, **options)
    return gmf, mlp_input


@_gather_inputs.register_fake
def _(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype):
    B, F, H = user.shape[0], mf_user.shape[1], mlp_user.shape[1]
    return (user.new_empty((B, F), dtype=dtype), user.new_empty((B, 2 * H), dtype=dtype))


def _side(index, other, mf_other, grad_gmf, grad_mlp, n_rows, F, H, mlp_column, backward_kernel):
    """The dense fp32 gradients of one side's MF and MLP tables."""
    device = index.device
    grad_mf = torch.empty((n_rows, F), dtype=torch.float32, device=device)
    grad_mlp_table = torch.empty((n_rows, H), dtype=torch.float32, device=device)
    if n_rows == 0:
        return grad_mf, grad_mlp_table
    B = index.shape[0]
    # One sort per side, shared by its two tables; stable, so the sums are deterministic.
    sorted_index, perm = torch.sort(index, stable=True)
    rows = torch.arange(n_rows + 1, dtype=sorted_index.dtype, device=device)
    bounds = torch.searchsorted(sorted_index, rows, out_int32=B < 2 ** 31)
    grid, args, options = _backward_launch(perm, bounds, other, mf_other, grad_gmf, grad_mlp,
                                           grad_mf, grad_mlp_table, mlp_column,
                                           _backward_block_p(B, n_rows))
    with _device_guard(index):
        backward_kernel[grid](*args, **options)
    return grad_mf, grad_mlp_table


@torch.library.custom_op('ncf::gather_inputs_backward', mutates_args=())
def _gather_inputs_backward(grad_gmf: torch.Tensor, grad_mlp_input: torch.Tensor,
                            user: torch.Tensor, item: torch.Tensor, mf_user: torch.Tensor,
                            mf_item: torch.Tensor, n_users: int, n_items: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad mf_user, grad mf_item, grad mlp_user, grad mlp_item), dense fp32."""
    _, backward_kernel = _kernels()
    F, H = grad_gmf.shape[1], grad_mlp_input.shape[1] // 2
    user, item = user.contiguous(), item.contiguous()
    grad_gmf, grad_mlp_input, mf_user, mf_item = map(_rows, (grad_gmf, grad_mlp_input,
                                                             mf_user, mf_item))
    grad_mf_user, grad_mlp_user = _side(user, item, mf_item, grad_gmf, grad_mlp_input, n_users,
                                        F, H, 0, backward_kernel)
    grad_mf_item, grad_mlp_item = _side(item, user, mf_user, grad_gmf, grad_mlp_input, n_items,
                                        F, H, H, backward_kernel)
    return grad_mf_user, grad_mf_item, grad_mlp_user, grad_mlp_item


@_gather_inputs_backward.register_fake
def _(grad_gmf, grad_mlp_input, user, item, mf_user, mf_item, n_users, n_items):
    F, H = grad_gmf.shape[1], grad_mlp_input.shape[1] // 2
    empty = functools.partial(grad_gmf.new_empty, dtype=torch.float32)
    return empty((n_users, F)), empty((n_items, F)), empty((n_users, H)), empty((n_items, H))


def _setup_context(ctx, inputs, output):
    user, item, mf_user, mf_item, mlp_user, mlp_item, dtype = inputs
    # The index vectors, and the MF tables themselves (no copy) for the backward's re-gather.
    ctx.save_for_backward(user, item, mf_user, mf_item)
    ctx.n_users, ctx.n_items = mf_user.shape[0], mf_item.shape[0]
    ctx.dtype, ctx.mlp_width = dtype, mlp_user.shape[1]


def _backward(ctx, grad_gmf, grad_mlp_input):
    user, item, mf_user, mf_item = ctx.saved_tensors
    B, F = user.shape[0], mf_user.shape[1]
    # An output that took no part in the loss has no gradient: zeros stand in.
    if grad_gmf is None:
        grad_gmf = mf_user.new_zeros((B, F), dtype=ctx.dtype)
    if grad_mlp_input is None:
        grad_mlp_input = mf_user.new_zeros((B, 2 * ctx.mlp_width), dtype=ctx.dtype)
    grads = _gather_inputs_backward(grad_gmf, grad_mlp_input, user, item, mf_user, mf_item,
                                    ctx.n_users, ctx.n_items)
    return (None, None, *grads, None)


_gather_inputs.register_autograd(_backward, setup_context=_setup_context)


def gather_inputs(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype):
    """(gmf, mlp_input): (mf_user[user] * mf_item[item]).to(dtype) and
    cat(mlp_user[user], mlp_item[item], dim=1).to(dtype), by one Triton kernel; differentiable
    w.r.t. the four tables (dense fp32 gradients, by one sort and one kernel per side)."""
    return _gather_inputs(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype)
