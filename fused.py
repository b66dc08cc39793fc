"""Triton kernels for NeuMF's embedding layer: the four gathers, the GMF product, the MLP input's
concatenation and the cast to the compute dtype in one kernel, and a backward that forms each
table row's gradient once, without atomics, without index_add_ and without a zero-fill.

    gmf, mlp_input = gather_inputs(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype)

is, in values and in gradients w.r.t. the four tables, the plain

    gmf = (mf_user[user] * mf_item[item]).to(dtype)
    mlp_input = torch.cat((mlp_user[user], mlp_item[item]), dim=1).to(dtype)

Forward: one program per BLOCK_B samples loads their user and item rows of the four tables and
writes gmf (product in fp32) and mlp_input straight in `dtype`; it saves only the two index
vectors (and references to the two MF tables, which the backward re-gathers: no [B, F] rows kept).

Backward, per side (user: mf_user and mlp_user; item: mf_item and mlp_item): one stable sort of
that side's indices, shared by its two tables; the run [start, end) of every table row in the
sorted indices comes from one torch.searchsorted of arange(n_rows + 1) (row r's run ends where row
r + 1's begins), so nothing waits on the host. Then one kernel: each program owns BLOCK_R
consecutive table rows and writes each of them exactly once (zeros for a row absent from the
batch: the outputs are torch.empty), walking the row's run in tiles of BLOCK_P positions and
reducing each tile with tl.sum in fp32. A sample's MF gradient, grad_gmf[s] * mf_other[other[s]],
re-gathers the other side's MF row there. The gradients are dense fp32 tables, so torch's Adam
(fused=True included) runs unchanged with its exact dense semantics.

Both are torch.library custom ops (ncf::gather_inputs, ncf::gather_inputs_backward) with fake
implementations and autograd registered: torch.compile keeps them as opaque nodes of its graph.

Triton is imported lazily: this module imports without it; `available()` says whether the kernels
can run here (CUDA, or Triton's CPU interpreter with TRITON_INTERPRET=1 set before first use).
"""
import contextlib
import functools
import os

import torch

from neumf import NeuMF

class FusedNeuMF(NeuMF):
    """`--impl fused`: NeuMF whose input layer is `gather_inputs` (the rest runs under
    torch.compile, which fuses the MLP's ReLU, dropout and casts itself)."""

    def inputs(self, user, item):
        return gather_inputs(user, item, self.mf_user_embed.weight, self.mf_item_embed.weight,
                             self.mlp_user_embed.weight, self.mlp_item_embed.weight,
                             self.compute_dtype(user))


# Block sizes (all constexpr in the kernels), chosen for an H100 at the recipe's sizes: F=64,
# H=128, a batch of 2^20, 138k users and 27k items.
FORWARD_BLOCK_B = 32        # samples per forward program: 32k programs at 2^20
FORWARD_WARPS = 4
BACKWARD_BLOCK_R = 2        # table rows per backward program
BACKWARD_BLOCK_P_MIN = 16   # positions per tile of a row's run, sized from the mean run length
BACKWARD_BLOCK_P_MAX = 64
BACKWARD_WARPS = 4


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
        b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        in_batch = b < B
        u = tl.load(user_ptr + b, mask=in_batch, other=0).to(tl.int64)
        i = tl.load(item_ptr + b, mask=in_batch, other=0).to(tl.int64)
        f = tl.arange(0, F_PAD)
        h = tl.arange(0, H_PAD)
        mask_f = in_batch[:, None] & (f < F)[None, :]
        mask_h = in_batch[:, None] & (h < H)[None, :]
        out_dtype = gmf_ptr.dtype.element_ty

        x = tl.load(mf_user_ptr + u[:, None] * stride_mf_user + f[None, :], mask=mask_f, other=0.0)
        y = tl.load(mf_item_ptr + i[:, None] * stride_mf_item + f[None, :], mask=mask_f, other=0.0)
        gmf = x.to(tl.float32) * y.to(tl.float32)
        tl.store(gmf_ptr + b[:, None] * F + f[None, :], gmf.to(out_dtype), mask=mask_f)

        row = mlp_ptr + b[:, None] * (2 * H) + h[None, :]
        x = tl.load(mlp_user_ptr + u[:, None] * stride_mlp_user + h[None, :], mask=mask_h,
                    other=0.0)
        tl.store(row, x.to(out_dtype), mask=mask_h)
        y = tl.load(mlp_item_ptr + i[:, None] * stride_mlp_item + h[None, :], mask=mask_h,
                    other=0.0)
        tl.store(row + H, y.to(out_dtype), mask=mask_h)

    @triton.jit
    def backward_kernel(perm_ptr, bounds_ptr, other_ptr, mf_other_ptr, grad_gmf_ptr,
                        grad_mlp_ptr, grad_mf_ptr, grad_mlpt_ptr, n_rows, F, H, mlp_column,
                        stride_mf_other, stride_grad_gmf, stride_grad_mlp,
                        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                        F_PAD: tl.constexpr, H_PAD: tl.constexpr):
        f = tl.arange(0, F_PAD)
        h = tl.arange(0, H_PAD)
        f_in = f < F
        h_in = h < H
        positions = tl.arange(0, BLOCK_P)
        for k in tl.static_range(BLOCK_R):
            r = tl.program_id(0).to(tl.int64) * BLOCK_R + k
            in_table = r < n_rows
            # Row r's run in the sorted indices: [bounds[r], bounds[r + 1]); empty past the end.
            start = tl.load(bounds_ptr + r, mask=in_table, other=0)
            end = tl.load(bounds_ptr + r + 1, mask=in_table, other=0)
            acc_mf = tl.zeros([F_PAD], dtype=tl.float32)
            acc_mlp = tl.zeros([H_PAD], dtype=tl.float32)
            for p0 in range(start, end, BLOCK_P):
                p = p0 + positions
                in_run = p < end
                s = tl.load(perm_ptr + p, mask=in_run, other=0).to(tl.int64)
                o = tl.load(other_ptr + s, mask=in_run, other=0).to(tl.int64)
                mask_f = in_run[:, None] & f_in[None, :]
                g = tl.load(grad_gmf_ptr + s[:, None] * stride_grad_gmf + f[None, :],
                            mask=mask_f, other=0.0)
                e = tl.load(mf_other_ptr + o[:, None] * stride_mf_other + f[None, :],
                            mask=mask_f, other=0.0)
                acc_mf += tl.sum(g.to(tl.float32) * e.to(tl.float32), axis=0)
                gm = tl.load(grad_mlp_ptr + s[:, None] * stride_grad_mlp + mlp_column + h[None, :],
                             mask=in_run[:, None] & h_in[None, :], other=0.0)
                acc_mlp += tl.sum(gm.to(tl.float32), axis=0)
            tl.store(grad_mf_ptr + r * F + f, acc_mf, mask=f_in & (f * 0 + r < n_rows))
            tl.store(grad_mlpt_ptr + r * H + h, acc_mlp, mask=h_in & (h * 0 + r < n_rows))

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
    grid = (_cdiv(B, FORWARD_BLOCK_B),)
    with _device_guard(user):
        forward_kernel[grid](user, item, mf_user, mf_item, mlp_user, mlp_item, gmf, mlp_input,
                             B, F, H, mf_user.stride(0), mf_item.stride(0), mlp_user.stride(0),
                             mlp_item.stride(0), BLOCK_B=FORWARD_BLOCK_B, F_PAD=_pow2(F),
                             H_PAD=_pow2(H), num_warps=FORWARD_WARPS)
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
    block_p = min(max(_pow2(_cdiv(B, n_rows)), BACKWARD_BLOCK_P_MIN), BACKWARD_BLOCK_P_MAX)
    grid = (_cdiv(n_rows, BACKWARD_BLOCK_R),)
    with _device_guard(index):
        backward_kernel[grid](perm, bounds, other, mf_other, grad_gmf, grad_mlp, grad_mf,
                              grad_mlp_table, n_rows, F, H, mlp_column, mf_other.stride(0),
                              grad_gmf.stride(0), grad_mlp.stride(0), BLOCK_R=BACKWARD_BLOCK_R,
                              BLOCK_P=block_p, F_PAD=_pow2(F), H_PAD=_pow2(H),
                              num_warps=BACKWARD_WARPS)
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
