"""`--impl compile` on a CPU, one process: the whole training step as one compiled graph, the
optimizer included. At small batches a step's time is overhead, not arithmetic: autograd's engine,
the optimizer's Python and a kernel launch per operation cost more than the products of a batch of
32 (benchmarks/RESULTS.md, "The whole step compiled"). Here torch.func computes the gradients inside
the graph, and the update is torch's own Adam (or SGD) arithmetic, traced into the same graph, on
the optimizers' own state: checkpoints, resume and a later run without this are unchanged.

With sparse embedding updates the graph also finds the batch's touched rows, gathers them, and
writes the updated rows and their moments back (sparse_updates.py's semantics, step for step).
"""
import dataclasses
import functools
import math
import types

import torch
from torch.func import functional_call, grad_and_value
from torch.optim.sgd import sgd

from ncflib.sparse_updates import LazyAdam, touched_rows


def optimizer_state(optimizer, parameter):
    """`optimizer`'s state of `parameter` as torch's Adam keeps it (step, exp_avg, exp_avg_sq),
    made as Adam makes it on its first step where it has none yet; SGD's: none."""
    if not is_adam(optimizer):
        return {}
    state = optimizer.state[parameter]
    if not state:
        state.update(step=torch.zeros((), dtype=torch.float32, device=parameter.device),
                     exp_avg=torch.zeros_like(parameter),
                     exp_avg_sq=torch.zeros_like(parameter))
    return state


def is_adam(optimizer):
    return isinstance(optimizer, (torch.optim.Adam, LazyAdam))


@dataclasses.dataclass(frozen=True)
class Group:
    """What the step needs of an optimizer's param group: numbers, not the optimizer (whose
    every attribute the graph would otherwise check at each call)."""
    adam: bool
    size: int
    lr: float
    betas: tuple
    eps: float
    weight_decay: float

    @classmethod
    def all_of(cls, optimizer):
        return [cls(is_adam(optimizer), len(group['params']), group['lr'],
                    tuple(group.get('betas', (0.0, 0.0))), group.get('eps', 0.0),
                    group.get('weight_decay', 0.0)) for group in optimizer.param_groups]


def adam_factors(groups, states):
    """[step size, sqrt of the second moment's bias correction] of Adam's next step, from the
    step count (torch's Adam computes them on the host too), as a tensor: as numbers they would
    be constants of the graph, compiled again every step; computed in the graph from the step
    count, the compiler would take the powers again for every element. None for SGD."""
    group = groups[0]  # every group of ours shares lr and betas
    if not group.adam:
        return None
    step = int(states[0]['step']) + 1  # a CPU tensor: reading it waits for nothing
    return torch.tensor([group.lr / (1 - group.betas[0] ** step),
                         math.sqrt(1 - group.betas[1] ** step)])


def update(group, parameters, grads, states, factors):
    """One step of the optimizer of `group` (a Group) on `parameters`, in place, by torch's
    arithmetic: Adam's (single-tensor, weight_decay as an L2 term) or plain SGD."""
    if not group.adam:
        sgd(parameters, grads, [None] * len(parameters), foreach=False,
            weight_decay=group.weight_decay, momentum=0.0, lr=group.lr, dampening=0.0,
            nesterov=False, maximize=False)
        return
    beta1, beta2 = group.betas
    step_size, bias_correction2_sqrt = factors[0], factors[1]
    for parameter, grad, state in zip(parameters, grads, states):
        if group.weight_decay:
            grad = grad.add(parameter, alpha=group.weight_decay)
        state['step'].add_(1)
        state['exp_avg'].lerp_(grad, 1 - beta1)
        state['exp_avg_sq'].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state['exp_avg_sq'].sqrt() / bias_correction2_sqrt).add_(group.eps)
        parameter.sub_(state['exp_avg'] / denom * step_size)


class WholeStep:
    """Trainer.step's work as one compiled function of the loss module (training.TrainingLoss),
    the batches' micro-slices, the dense optimizer and, with sparse updates, SparseUpdates."""

    def __init__(self, plan, loss, batches, optimizer, sparse=None):
        self.loss, self.optimizer, self.sparse = loss, optimizer, sparse
        self.groups = Group.all_of(optimizer)
        self.table_groups = [] if sparse is None else Group.all_of(sparse.optimizer)
        # per table: its name in the model's `rows`, its side and the side's touched rows
        self.row_tables = [] if sparse is None else [
            (name, sparse.side(name), sparse.capacity[sparse.side(name)])
            for name in sparse.tables]
        self.rank_batch = batches.rank_batch
        self.slices = list(zip(batches.micro_slices, batches.micro_shares))
        names = {id(parameter): name for name, parameter in loss.named_parameters()}
        # the graph's inputs by name, in the order `arguments` gives them
        self.names = [names[id(parameter)] for group in optimizer.param_groups
                      for parameter in group['params']]
        self.table_names = [] if sparse is None else [names[id(table)]
                                                      for table in sparse.tables.values()]
        # A code object of its own: torch.compile keeps compiled graphs per code object, so
        # this step's graph serves this trainer alone, whose modules and numbers never change:
        # each call then checks only its tensors (their shapes and types), not the ~1,000
        # guards on the modules, the numbers and torch's globals (~30 us of a 0.5 ms step).
        step = types.FunctionType(WholeStep.step.__code__.replace(), WholeStep.step.__globals__)
        self.compiled = plan.compile(
            types.MethodType(step, self),
            options={'guard_filter_fn': functools.partial(
                torch.compiler.keep_tensor_guards_unsafe, keep_parameters=True)})

    def arguments(self):
        """The graph's inputs: the weights and optimizer states it reads and updates (their
        identity changes when a resume loads the optimizers' state, their shapes never) and
        Adam's factors of this step."""
        parameters = [parameter for group in self.optimizer.param_groups
                      for parameter in group['params']]
        states = [optimizer_state(self.optimizer, parameter) for parameter in parameters]
        tables = [] if self.sparse is None else list(self.sparse.tables.values())
        table_states = [optimizer_state(self.sparse.optimizer, table) for table in tables]
        factors = [adam_factors(self.groups, states)] + \
            ([adam_factors(self.table_groups, table_states)] if tables else [])
        return parameters, states, tables, table_states, factors

    def __call__(self, users, items, labels):
        """One step on a whole batch (one process: the rank's slice is the batch); returns its
        loss sum on the device."""
        with torch.no_grad():  # the gradients are torch.func's: no autograd graph to record
            return self.compiled(*self.arguments(), users, items, labels)

    def warm_up(self, users, items, labels):
        """Compile the step on copies of the weights and optimizer states (the graph is the
        same for them: its inputs are guarded by type and shape, not identity), leaving these
        as they were."""
        def copy(tensor):
            clone = tensor.detach().clone()
            return torch.nn.Parameter(clone, tensor.requires_grad) \
                if isinstance(tensor, torch.nn.Parameter) else clone

        def copies(states):
            return [{key: copy(value) for key, value in state.items()} for state in states]

        parameters, states, tables, table_states, factors = self.arguments()
        with torch.no_grad():
            self.compiled([copy(parameter) for parameter in parameters], copies(states),
                          [copy(table) for table in tables], copies(table_states), factors,
                          users, items, labels)

    def step(self, parameters, states, tables, table_states, factors, users, items, labels):
        named = dict(zip(self.names, parameters))
        frozen = dict(zip(self.table_names, tables))  # read through `rows` alone
        rows, touched = None, []
        if tables:
            capacity = {side: rows for _, side, rows in self.row_tables}
            sides = {'user': touched_rows(users, capacity['user']),
                     'item': touched_rows(items, capacity['item'])}
            rows = {}
            for table, (name, side, _) in zip(tables, self.row_tables):
                index, _, source = sides[side]
                rows[name] = table.index_select(0, index)
                touched.append((index, source))
            users, items = sides['user'][1], sides['item'][1]

        def mean_loss(named, rows, part):
            return functional_call(self.loss, (named, frozen),
                                   (users[part], items[part], labels[part], rows))

        # the rows' gradients too where the step has rows
        gradient = grad_and_value(mean_loss, argnums=(0, 1) if tables else 0)
        grads, row_grads, loss_sum = {}, {}, 0.0
        for part, weight in self.slices:
            part_grads, loss = gradient(named, rows, part)
            for sums, part_sums in zip((grads, row_grads),
                                       part_grads if tables else (part_grads,)):
                for name, grad in part_sums.items():
                    sums[name] = grad * weight + sums.get(name, 0.0)
            loss_sum = loss_sum + loss.double() * (weight * self.rank_batch)

        start = 0
        for group in self.groups:
            end = start + group.size
            update(group, parameters[start:end],
                   [grads[name] for name in self.names[start:end]], states[start:end],
                   factors[0])
            start = end
        if tables:
            # each touched row's moments as its weights: gathered, updated, written back (the
            # step count is the table's)
            moments = [{key: value if key == 'step' else value.index_select(0, index)
                        for key, value in state.items()}
                       for state, (index, _) in zip(table_states, touched)]
            # the padding repeats the first row: its copies take the first row's gradient, so
            # the duplicate writes below are of one value
            update(self.table_groups[0], list(rows.values()),
                   [row_grads[name].index_select(0, source)
                    for name, (_, source) in zip(rows, touched)], moments, factors[1])
            for table, state, weights, moment, (index, _) in zip(
                    tables, table_states, rows.values(), moments, touched):
                table.index_put_((index,), weights)
                for key, value in moment.items():
                    if key != 'step':
                        state[key].index_put_((index,), value)
        return loss_sum
