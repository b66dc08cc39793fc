"""`--embedding_updates sparse`: a step computes gradients for, and updates, only the table rows
its batch touches (lazy Adam, or SGD), rather than whole-table gradients and Adam over every row
of every table, whose cost grows with the data and not with the batch.

Per side (users: the user tables; items: the item tables), over the global batch, which every
process draws alike (so the rows and their order are the same in each):

    rows   [capacity]  the distinct indices, ascending, then the first one again as padding
    slots  [batch]     each sample's position in `rows`

capacity = min(batch, the table's rows) where the plan keeps static shapes (a compiled step
compiles once, and CUDA reads nothing back to the host); elsewhere (eager and cpu_fused on a
CPU) the rows are exactly the distinct ones, whose count costs nothing to read: no padding
gathered and updated (at ML-20m's shape, batch 2^16, a batch touches ~44,700 users: the
capacity is 65,536). The model reads copies of those rows (leaves of autograd), so their
gradients, [capacity, width], are the touched rows' summed gradients; under torchrun they are
averaged across processes, as DDP averages the dense ones.

Lazy Adam (TensorFlow's LazyAdam, torch's SparseAdam): a touched row's moments and weights take
Adam's step, bias-corrected by the global step count; an untouched row keeps its moments and
weights (dense Adam would decay its moments and go on moving it). The step is torch's own Adam
kernel (fused where the plan's is) on the gathered rows, written back with index_copy_: the
padding repeats the first row with the first row's gradient, so its copies compute, and write,
exactly what the first row's slot does. A row touched at every step follows dense Adam
bit for bit; SGD (no momentum) is dense SGD, whose untouched rows do not move either.

Why by hand: torch.optim.SparseAdam takes sparse COO gradients, which neither torch.compile,
DDP over NCCL nor this recipe's fused backward produce, and coalesces them every step;
FBGEMM's table-batched embeddings own the tables and their lookup (no NeuMF input layer of
ours, Triton or cpu_fused, in front of them). Measured against both in benchmarks/RESULTS.md.
"""
import torch
import torch.distributed as dist
from torch.optim.adam import adam

from ncflib.cli import UsageError

SPARSE_OPTIMIZERS = {'adam': 'LazyAdam', 'sgd': 'LazySGD'}


def touched_rows(index, capacity=None):
    """(rows [capacity], slots like `index`, source [capacity]: the slot whose gradient each
    entry of `rows` takes, itself or 0 for the padding) of one side's indices; capacity None:
    the distinct rows alone (their count read on the host), and source None."""
    ordered, order = torch.sort(index)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[1:] = ordered[1:] != ordered[:-1]
    sorted_slots = new.cumsum(0) - 1
    slots = torch.empty_like(index).scatter_(0, order, sorted_slots)
    exact = capacity is None
    if exact:  # read on the host: free on a CPU, where alone it runs (Plan.static_shapes)
        capacity = int(sorted_slots[-1]) + 1
    # every sample of a row writes the same value into its slot; the padding is the first row
    rows = ordered[:1].expand(capacity).clone().scatter_(0, sorted_slots, ordered)
    if exact:
        return rows, slots, None
    source = torch.arange(capacity, device=index.device)
    source = source.masked_fill_(source > sorted_slots[-1], 0)
    return rows, slots, source


class LazyAdam(torch.optim.Optimizer):
    """Adam on the touched rows of each table (state as torch's Adam: step, exp_avg,
    exp_avg_sq, the moments table-sized). fused: torch's fused Adam kernel."""

    def __init__(self, params, lr, betas, eps, fused=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, fused=fused))

    @torch.no_grad()
    def step(self, touched):
        """touched: {table: (rows, source (None: each row its own slot), the rows as gathered
        (updated here), their gradient)}. One call of Adam's kernel for every table of a group."""
        for group in self.param_groups:
            tables = group['params']
            for table in tables:
                if not self.state[table]:
                    self.state[table] = {'step': torch.zeros((), device=table.device),
                                         'exp_avg': torch.zeros_like(table),
                                         'exp_avg_sq': torch.zeros_like(table)}
            states = [self.state[table] for table in tables]
            rows = [touched[table][0] for table in tables]
            weights = [touched[table][2] for table in tables]
            exp_avgs = [state['exp_avg'].index_select(0, index)
                        for state, index in zip(states, rows)]
            exp_avg_sqs = [state['exp_avg_sq'].index_select(0, index)
                           for state, index in zip(states, rows)]
            adam(weights, [grad if source is None else grad.index_select(0, source)
                           for _, source, _, grad in (touched[table] for table in tables)],
                 exp_avgs, exp_avg_sqs, [], [state['step'] for state in states],
                 foreach=False, fused=group['fused'], amsgrad=False, beta1=group['betas'][0],
                 beta2=group['betas'][1], lr=group['lr'], weight_decay=0.0, eps=group['eps'],
                 maximize=False)
            for table, state, index, weight, exp_avg, exp_avg_sq in zip(
                    tables, states, rows, weights, exp_avgs, exp_avg_sqs):
                table.index_copy_(0, index, weight)
                state['exp_avg'].index_copy_(0, index, exp_avg)
                state['exp_avg_sq'].index_copy_(0, index, exp_avg_sq)


class LazySGD(torch.optim.Optimizer):
    """SGD on the touched rows (the padding's gradients are zeros: adding them moves nothing)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, touched):
        for group in self.param_groups:
            for table in group['params']:
                rows, _, _, grad = touched[table]
                table.index_add_(0, rows, grad, alpha=-group['lr'])


class SparseUpdates:
    """The tables of `model` (its embeddings(): a name with 'user' in it is a user table) updated
    row by row: `gather` before a step's forward, `step` after its backward. The tables stop
    requiring gradients (DDP then leaves them out) and the dense optimizer must not hold them."""

    def __init__(self, plan, model, batch_size, optimizer, lr, betas, eps):
        if plan.precision == 'fp16':
            raise UsageError('--embedding_updates sparse needs --precision fp32, tf32 or bf16: '
                             "fp16's loss scaling does not reach the touched rows")
        self.plan = plan
        self.tables = {name: module.weight.requires_grad_(False)
                       for name, module in model.embeddings().items()}
        self.capacity = {side: min(batch_size, next(table.shape[0] for name, table
                                                    in self.tables.items() if side in name))
                         for side in ('user', 'item')}
        params = list(self.tables.values())
        self.optimizer = (LazyAdam(params, lr, betas, eps, plan.fused_optimizer)
                          if optimizer == 'adam' else LazySGD(params, lr))
        self.touched = None

    @staticmethod
    def side(name):
        return 'user' if 'user' in name else 'item'

    def gather(self, users, items):
        """For a global batch's users and items: their slots (the model's indices into the rows)
        and {table name: the touched rows' copy, a leaf of autograd}."""
        capacity = self.capacity if self.plan.static_shapes else {'user': None, 'item': None}
        sides = {'user': touched_rows(users, capacity['user']),
                 'item': touched_rows(items, capacity['item'])}
        rows, self.touched = {}, {}
        for name, table in self.tables.items():
            index, _, source = sides[self.side(name)]
            rows[name] = table.index_select(0, index).requires_grad_()
            # zeroed once a step, and summed into in place: by autograd, or (a gradient sink)
            # by cpu_fused's backward, each micro-batch's rows straight into it
            rows[name].grad = torch.zeros_like(rows[name])
            rows[name].gradient_sink = True
            self.touched[table] = (index, source, rows[name])
        return sides['user'][1], sides['item'][1], rows

    def step(self):
        """The touched rows' update from their gradients (averaged across processes first)."""
        touched = {}
        for table, (index, source, leaf) in self.touched.items():
            grad = leaf.grad
            if self.plan.distributed:
                dist.all_reduce(grad)
                grad.div_(self.plan.world_size)
            touched[table] = (index, source, leaf.detach(), grad)
        self.optimizer.step(touched)
        self.touched = None
