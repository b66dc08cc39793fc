"""`--impl cpu_fused`: the input layer and activations of every model of the family as
hand-written autograd Functions, the fastest implementation measured on a CPU (the auto choice
there; on CUDA, torch.compile of the plain model is faster, and these Functions would block its
fusion).

- The first MLP layer per distinct user and item of a (micro-)batch of DISTINCT_FROM samples or
  more: a layer over the user's and the item's embeddings side by side is the sum of a user part
  and an item part, so each is computed once per distinct row and gathered per sample (as
  `all_item_scores` does for scoring). A batch of 2,048 at ML-100k draws ~670 distinct users
  and ~1,165 items, 45% of its samples' rows, and that layer is most of the step's
  multiply-adds. Its backward sums each row's gradient first, then multiplies per distinct
  row.
- The embedding gathers (the GMF branch's, and the MLP's below DISTINCT_FROM), the GMF product
  and the MLP input in one Function whose backward builds each gathered row's gradient once and
  adds it into the table's, without the slice, concatenation and cast gradients autograd would
  make; the activations are cast to the compute dtype once, at the input, not at every layer.
- ReLU and dropout in one Function that saves only its output, with a dropout mask from 16
  random bits per element, several times cheaper on a CPU than torch's Bernoulli draw.
"""
import torch

from ncflib.models import GMF, MF, MLP, NeuMF


class CpuFused:
    """The Functions in place of a model's `inputs` and `hidden` (a mixin over a model class of
    models.py, which gives the parameters)."""
    FIRST_LAYER_IN_INPUTS = True

    def inputs(self, user, item, rows=None):
        mf_user, mf_item, mlp_user, mlp_item = self.tables(rows)
        dtype = self.compute_dtype(user)
        if not self.HAS_MLP or len(user) < DISTINCT_FROM:
            gmf, x = _GatherInputs.apply(user, item, mf_user, mf_item, mlp_user, mlp_item, dtype)
            return gmf, None if x is None else self.hidden(self.mlp[0](x))
        gmf = None
        if self.HAS_GMF:
            gmf, _ = _GatherInputs.apply(user, item, mf_user, mf_item, None, None, dtype)
        first = self.mlp[0]
        return gmf, self.hidden(_FirstLayer.apply(user, item, mlp_user, mlp_item, first.weight,
                                                  first.bias, dtype))

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

# The (micro-)batch from which the first layer is computed per distinct row: below it, the
# gathers and sums per row cost about what they save (forward and backward of NeuMF 256-128-64
# at ML-100k, in one process, 2 vCPU AMD EPYC: level at 320 samples, 12% faster at 640).
DISTINCT_FROM = 512
# The counts of distinct rows are rounded up to a multiple of this (the padding repeats a row and
# takes no gradient): oneDNN's bf16 matrix products compile a kernel for each new shape (~0.7 ms
# each on 2 vCPU AMD EPYC), and rounded counts repeat after a few steps.
DISTINCT_ROWS_ROUNDING = 64


def distinct(index, n_rows):
    """(the distinct values of `index`, ascending, then the first one again up to a multiple of
    DISTINCT_ROWS_ROUNDING; each entry's position among them), for indices into a table of
    `n_rows`. Marking the table's rows costs less than torch.unique's sort where the table is
    not much larger than the index (at 65,536 indices into 6,040 rows, 0.44 ms against 2.2 ms on
    2 vCPU AMD EPYC); past that, the sort's cost does not grow with the table."""
    if n_rows > 4 * index.numel():
        values, slots = torch.unique(index, sorted=True, return_inverse=True)
    else:
        marks = torch.zeros(n_rows, dtype=index.dtype, device=index.device)
        marks.index_fill_(0, index, 1)
        values = marks.nonzero().squeeze(1)
        slots = marks.cumsum_(0).sub_(1).index_select(0, index)
    padding = -len(values) % DISTINCT_ROWS_ROUNDING
    return torch.cat((values, values[:1].expand(padding))) if padding else values, slots


def gradient_sink(table):
    """Where a table's gradient goes: for a table marked `gradient_sink` (sparse updates'
    touched rows, and a dense table whose gradient the trainer keeps from step to step: see
    Plan.kept_table_gradients), its `.grad`, summed into, which then takes every micro-batch's
    gradient without a zero-filled tensor and a sum for each; else None, and the backward
    returns a table-sized gradient (under DDP, which all-reduces what autograd hands over)."""
    return table.grad if getattr(table, 'gradient_sink', False) else None


def table_gradient(table, sink, index, rows):
    """The gradients `rows` of the table's rows at `index` (repeats add up): added into the
    sink, or returned as the table's dense gradient. table: (shape, dtype)."""
    if sink is not None:
        sink.index_add_(0, index, rows)
        return None
    return index.new_zeros(table[0], dtype=table[1]).index_add_(0, index, rows)


class _GatherInputs(torch.autograd.Function):
    """The branches' inputs from their tables (an autograd Function takes them one by one; None
    for a branch left out): the GMF product and the MLP input, cast once to the compute dtype.
    The backward forms each gathered row's gradient once and adds it into its table's."""

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
        tables = mf_user, mf_item, mlp_user, mlp_item
        ctx.tables = [None if t is None else (t.shape, t.dtype) for t in tables]
        ctx.sinks = [None if t is None else gradient_sink(t) for t in tables]
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
        grads = [None if table is None else table_gradient(table, sink, index, row)
                 for table, sink, index, row in zip(ctx.tables, ctx.sinks,
                                                    (user, item, user, item), rows)]
        return (None, None, *grads, None)


class _FirstLayer(torch.autograd.Function):
    """The first MLP layer's output before its activation, weight @ [p'_u, q'_i] + bias, as
    (weight_u @ p'_u + bias) + weight_i @ q'_i with each part computed once per distinct user
    and item and gathered per sample, in the compute dtype (its sum rounded once more than one
    matrix product's, as autocast rounds). The backward sums the samples' gradients per distinct
    row in fp32, then takes the weight's, the bias's and the rows' gradients from those sums."""

    @staticmethod
    def forward(ctx, user, item, user_table, item_table, weight, bias, dtype):
        users, user_slots = distinct(user, user_table.shape[0])
        items, item_slots = distinct(item, item_table.shape[0])
        user_rows = user_table.index_select(0, users).to(dtype)
        item_rows = item_table.index_select(0, items).to(dtype)
        half = user_table.shape[1]
        weight = weight.to(dtype)
        user_part = torch.addmm(bias.to(dtype), user_rows, weight[:, :half].t())
        item_part = torch.mm(item_rows, weight[:, half:].t())
        ctx.save_for_backward(users, user_slots, items, item_slots, user_rows, item_rows, weight)
        ctx.tables = (user_table.shape, user_table.dtype), (item_table.shape, item_table.dtype)
        ctx.parameter_dtype = bias.dtype
        ctx.sinks = gradient_sink(user_table), gradient_sink(item_table)
        return user_part.index_select(0, user_slots).add_(item_part.index_select(0, item_slots))

    @staticmethod
    def backward(ctx, grad):
        users, user_slots, items, item_slots, user_rows, item_rows, weight = ctx.saved_tensors
        half = user_rows.shape[1]
        grad = grad.to(ctx.parameter_dtype)
        per_user = grad.new_zeros(len(users), grad.shape[1]).index_add_(0, user_slots, grad)
        per_item = grad.new_zeros(len(items), grad.shape[1]).index_add_(0, item_slots, grad)
        grad_bias = per_user.sum(0)
        per_user, per_item = per_user.to(weight.dtype), per_item.to(weight.dtype)
        grad_weight = torch.cat((per_user.t() @ user_rows, per_item.t() @ item_rows),
                                dim=1).to(ctx.parameter_dtype)
        user_grad = (per_user @ weight[:, :half]).to(ctx.tables[0][1])
        item_grad = (per_item @ weight[:, half:]).to(ctx.tables[1][1])
        return (None, None, table_gradient(ctx.tables[0], ctx.sinks[0], users, user_grad),
                table_gradient(ctx.tables[1], ctx.sinks[1], items, item_grad), grad_weight,
                grad_bias, None)


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
