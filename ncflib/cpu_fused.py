"""`--impl cpu_fused`: the input layer and activations of every model of the family as
hand-written autograd Functions, the fastest implementation measured on a CPU (the auto choice
there; on CUDA, torch.compile of the plain model is faster, and these Functions would block its
fusion).

- The embedding gathers (four for NeuMF, two for the others), the GMF product and the MLP input
  in one Function whose backward
  builds each gathered row's gradient once and adds it into the dense table gradient (Adam keeps
  its dense semantics), without the slice, concatenation and cast gradients autograd would make;
  the activations are cast to the compute dtype once, at the input, not at every layer.
- ReLU and dropout in one Function that saves only its output, with a dropout mask from 16
  random bits per element, several times cheaper on a CPU than torch's Bernoulli draw.
"""
import torch

from ncflib.models import GMF, MF, MLP, NeuMF


class CpuFused:
    """The Functions in place of a model's `inputs` and `hidden` (a mixin over a model class of
    models.py, which gives the parameters)."""

    def inputs(self, user, item, rows=None):
        return _GatherInputs.apply(user, item, *self.tables(rows), self.compute_dtype(user))

    def hidden(self, x):
        return _ReluDropout.apply(x, self.dropout if self.training else 0.0)


# Scoring has no backward for these Functions to save: the plain forward scores faster
# (benchmarks/throughput.py, ML-1m's shape on 2 vCPU: 1.23e6 against 1.02e6 samples/s in
# bf16, 5.9e5 against 4.3e5 in fp32 restricted to AVX2).
class CpuFusedNeuMF(CpuFused, NeuMF):
    scoring_class = NeuMF


class CpuFusedGMF(CpuFused, GMF):
    scoring_class = GMF


class CpuFusedMLP(CpuFused, MLP):
    scoring_class = MLP


class CpuFusedMF(CpuFused, MF):
    scoring_class = MF


MODEL_CLASSES = {model.NAME: model for model in (CpuFusedNeuMF, CpuFusedGMF, CpuFusedMLP,
                                                 CpuFusedMF)}


class _GatherInputs(torch.autograd.Function):
    """The branches' inputs from their tables (an autograd Function takes them one by one; None
    for a branch the model lacks): the GMF product and the MLP input, cast once to the compute
    dtype. The backward forms each gathered row's gradient once and adds it into a dense table
    gradient (Adam's semantics need the dense one), or, for the touched rows of sparse updates
    (sparse_updates.py: rows marked `gradient_sink`), straight into their `.grad`, which then
    takes every micro-batch's without a zero-filled tensor and a sum for each."""

    @staticmethod
    def forward(ctx, user, item, mf_user, mf_item, mlp_user, mlp_item, dtype):
        gmf = mlp_input = mf_u = mf_i = None
        if mf_user is not None:
            mf_u, mf_i = mf_user.index_select(0, user), mf_item.index_select(0, item)
            gmf = (mf_u * mf_i).to(dtype)
        if mlp_user is not None:
            mlp_input = torch.cat((mlp_user.index_select(0, user),
                                   mlp_item.index_select(0, item)), dim=1).to(dtype)
            ctx.half = mlp_user.shape[1]
        ctx.save_for_backward(user, item, mf_u, mf_i)
        ctx.tables = [None if t is None else (t.shape, t.dtype)
                      for t in (mf_user, mf_item, mlp_user, mlp_item)]
        ctx.sinks = [t.grad if getattr(t, 'gradient_sink', False) else None
                     for t in (mf_user, mf_item, mlp_user, mlp_item)]
        return gmf, mlp_input

    @staticmethod
    def backward(ctx, grad_gmf, grad_mlp_input):
        user, item, mf_u, mf_i = ctx.saved_tensors
        rows = [None] * 4
        if mf_u is not None:
            grad_gmf = grad_gmf.to(mf_u.dtype)
            rows[:2] = grad_gmf * mf_i, grad_gmf * mf_u
        if ctx.tables[2] is not None:
            # Contiguous halves: index_add_ takes a much slower path on strided rows.
            rows[2:] = (half.contiguous() for half in grad_mlp_input.to(ctx.tables[2][1])
                        .split(ctx.half, dim=1))
        grads = []
        for table, sink, index, row in zip(ctx.tables, ctx.sinks, (user, item, user, item),
                                           rows):
            if sink is not None:
                sink.index_add_(0, index, row)
            grads.append(None if table is None or sink is not None else
                         user.new_zeros(table[0], dtype=table[1]).index_add_(0, index, row))
        return (None, None, *grads, None)


class _ReluDropout(torch.autograd.Function):
    """relu(x), then inverted dropout with probability p, in one step; saves only the output
    (the gradient passes exactly where it is positive). The mask comes from 16 random bits per
    element (drop probability round(p * 65536) / 65536: exact for 0.5), and every operation is
    one of torch's vectorised ones (torch.where and bool products are several times slower on
    bf16)."""

    @staticmethod
    def forward(ctx, x, p):
        y = torch.relu(x)
        ctx.scale = 1.0
        if p > 0.0:
            ctx.scale = 1.0 / (1.0 - p)
            words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
            bits = words.random_(-2 ** 63, None).view(torch.int16)[:x.numel()].view(x.shape)
            keep = torch.ge(bits, round(p * 65536) - 32768).to(x.dtype).mul_(ctx.scale)
            y.mul_(keep)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        return (grad.mul_(ctx.scale) if ctx.scale != 1.0 else grad), None
