"""Training: the settings that define a run, the step (Adam or SGD on the binary cross-entropy
of positives and sampled negatives, with the optional penalties), and the history of a run's
epochs."""
import contextlib
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ncflib.recipe import DEFAULT_BETAS, DEFAULT_EPS, DEFAULT_LEARNING_RATE
from ncflib.sparse_updates import SparseUpdates
from ncflib.whole_step import WholeStep

OPTIMIZERS = ('adam', 'sgd')
# dense: the reference's, whole-table gradients and optimizer steps; sparse: the touched rows'
EMBEDDING_UPDATES = ('dense', 'sparse')

@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a training run computes, by ncf.py's flag names: a resumed run must have the same
    (others, such as the number of epochs, the implementation or the precision, may change)."""
    batch_size: int
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    seed: int
    factors: int
    layers: tuple
    dropout: float
    negative_samples: int
    negative_sampling: str
    valid_negative: int
    topk: int
    eval_mode: str
    model: str
    optimizer: str
    embedding_l2: float
    weight_decay: float
    embedding_updates: str = 'dense'

    @classmethod
    def of(cls, flags):
        """The settings among `flags` (a dict of flag values: more may be there)."""
        return cls(**{field.name: flags[field.name] for field in dataclasses.fields(cls)})

    def state_dict(self):
        """As last.pth keeps them (lists, as the flags give them)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class History:
    """A training run's epochs so far: what last.pth keeps and a resumed run continues."""
    epoch: int = -1                 # the last epoch finished
    best_hr: float = 0.0
    best_epoch: int = -1
    hrs: list = dataclasses.field(default_factory=list)
    train_losses: list = dataclasses.field(default_factory=list)
    train_throughputs: list = dataclasses.field(default_factory=list)
    eval_throughputs: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0            # seconds since the run started, earlier runs included
    best_model_elapsed: float = None

    def record(self, epoch, hr, train_loss, throughputs, elapsed):
        """Epoch `epoch`'s figures; throughputs: (training, evaluation) samples/s. Returns
        whether its HR is the best so far."""
        self.epoch, self.elapsed = epoch, elapsed
        self.hrs.append(hr)
        self.train_losses.append(train_loss)
        self.train_throughputs.append(throughputs[0])
        self.eval_throughputs.append(throughputs[1])
        if hr <= self.best_hr:
            return False
        self.best_hr, self.best_epoch, self.best_model_elapsed = hr, epoch, elapsed
        return True

    def summary(self, time_to_target, compile_time):
        """The run's closing figures, in the reference's names."""
        def mean(values):
            return sum(values) / max(len(values), 1)
        return {
            'best_train_throughput': max(self.train_throughputs, default=0.0),
            'best_eval_throughput': max(self.eval_throughputs, default=0.0),
            'mean_train_throughput': mean(self.train_throughputs),
            'mean_eval_throughput': mean(self.eval_throughputs),
            'best_accuracy': self.best_hr,
            'best_epoch': self.best_epoch,
            'time_to_target': time_to_target,
            'time_to_best_model': self.best_model_elapsed,
            'compile_time': compile_time,
        }

    def state_dict(self):
        return dataclasses.asdict(self)


class TrainingLoss(nn.Module):
    """The mean loss of a (micro-)batch: the model's forward under the plan's autocast, the loss,
    and embedding_l2 times the L2 penalty of the table rows the samples use, as one module.
    torch.compile makes it one graph; DDP wraps the compiled module, so that DDP's own forward
    stays outside the graph."""

    def __init__(self, model, autocast, embedding_l2=0.0):
        super().__init__()
        self.model, self.autocast, self.embedding_l2 = model, autocast, embedding_l2

    def forward(self, users, items, labels, rows=None):
        with self.autocast():
            logits = self.model(users, items, rows=rows)
        loss = F.binary_cross_entropy_with_logits(logits.float().view(-1), labels)
        if self.embedding_l2:
            loss = loss + self.embedding_l2 * self.model.embedding_penalty(users, items, rows)
        return loss


def parameter_groups(model, weight_decay, tables=True):
    """The optimizer's parameters (without the tables where not `tables`): with weight_decay,
    the dense layers' weights in a group of their own that decays (the tables' rows are
    --embedding_l2's)."""
    excluded = set() if tables else {id(module.weight) for module in model.embeddings().values()}
    parameters = [p for p in model.parameters() if id(p) not in excluded]
    if not weight_decay:
        return parameters
    dense = {id(weight) for weight in model.dense_weights()}
    return [{'params': [p for p in parameters if id(p) in dense], 'weight_decay': weight_decay},
            {'params': [p for p in parameters if id(p) not in dense]}]


class Trainer:
    """Steps of one global batch: each rank's slice, in micro-batches, then one Adam step.

    model: the model to train (the trainer compiles its step and wraps it in DDP as the plan
    says); batches: dataloading.TrainBatches; optimizer: 'adam' or 'sgd' (betas and eps are
    Adam's); embedding_l2 and weight_decay: the penalties, 0 for none; embedding_updates:
    'dense' or 'sparse' (the tables' touched rows only: sparse_updates.py).
    """

    def __init__(self, plan, model, batches, learning_rate=DEFAULT_LEARNING_RATE,
                 betas=DEFAULT_BETAS, eps=DEFAULT_EPS, optimizer='adam', embedding_l2=0.0,
                 weight_decay=0.0, embedding_updates='dense'):
        self.plan, self.model, self.batches = plan, model, batches
        # before DDP wraps the model: the tables then no longer require gradients
        self.sparse = SparseUpdates(plan, model, batches.batch_size, optimizer, learning_rate,
                                    betas, eps) if embedding_updates == 'sparse' else None
        self.optimizer = plan.optimizer(parameter_groups(model, weight_decay,
                                                         tables=self.sparse is None),
                                        optimizer, learning_rate, betas, eps)
        # {table: 'user' or 'item'}: dense gradients kept from step to step (the plan says
        # where), which cpu_fused's backward sums into (gradient sinks, as sparse updates'
        # rows are): no table-sized zero-fill, allocation and sum for every micro-batch
        self.kept_gradients = {}
        for name, module in model.embeddings().items():
            table = module.weight
            table.gradient_sink = self.sparse is None and plan.kept_table_gradients
            if table.gradient_sink:
                table.grad = torch.zeros_like(table)
                self.kept_gradients[table] = SparseUpdates.side(name)
        self.scaler = plan.grad_scaler()
        loss = TrainingLoss(model, plan.autocast, embedding_l2)
        # the plan's whole-step graph (optimizer included), or the loss's graph and autograd
        self.whole_step = WholeStep(plan, loss, batches, self.optimizer, self.sparse) \
            if plan.whole_step else None
        self.loss = None if plan.whole_step else plan.distributed_model(plan.compile(loss))

    def draw(self, generator):
        """A freshly drawn epoch as `step` takes it: this rank's slice of each batch, or with
        sparse updates the whole batches (whose touched rows every process gathers)."""
        return self.batches.epoch(generator, whole=self.sparse is not None)

    def step(self, users, items, labels):
        """One optimisation step on a batch of `draw`'s; returns this rank's loss sum, on the
        device (reading it here would synchronise every step)."""
        if self.whole_step is not None:
            return self.whole_step(users, items, labels)
        slices = self.batches.micro_slices
        loss_sum = torch.zeros((), dtype=torch.float64, device=users.device)
        rows = None
        if self.sparse is not None:
            users, items, rows = self.sparse.gather(users, items)
            mine = self.batches.rank_part
            users, items, labels = users[mine], items[mine], labels[mine]
        for index, (part, weight) in enumerate(zip(slices, self.batches.micro_shares)):
            # DDP all-reduces gradients on the last micro-batch of a step only.
            last = index == len(slices) - 1
            with contextlib.nullcontext() if last or not self.plan.distributed \
                    else self.loss.no_sync():
                loss = self.loss(users[part], items[part], labels[part], rows) * weight
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach() * self.batches.rank_batch
        # With a fused optimizer, GradScaler hands the inf check to the optimizer's kernel: no sync.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.sparse is not None:
            self.sparse.step()
        self.clear_gradients(users, items)
        return loss_sum

    def clear_gradients(self, users, items):
        """Every gradient to None for the next step, but a kept table gradient, zeroed: the rows
        of the step's `users` or `items`, the only rows a step's table gradient has (its
        samples' rows, and --embedding_l2's penalty of those rows), or all of it where they are
        more than an eighth of its rows (on 2 vCPU AMD EPYC a row zeroed by index costs what
        seven zeroed in order do: at 65,536 indices into 138,493 rows of 128, 6.9 ms against 2.0;
        at 2,048 into 200,948, 0.14 ms against 3.3)."""
        for group in self.optimizer.param_groups:
            for parameter in group['params']:
                if parameter not in self.kept_gradients:
                    parameter.grad = None
        for table, side in self.kept_gradients.items():
            index = users if side == 'user' else items
            if len(index) * 8 > len(table):
                table.grad.zero_()
            else:
                table.grad.index_fill_(0, index, 0)

    def weights_are_finite(self):
        """Whether no weight is NaN or infinite (one synchronisation, once an epoch)."""
        return bool(torch.stack([torch.isfinite(parameter).all()
                                 for parameter in self.model.parameters()]).all())

    def epoch(self, generator, progress=lambda steps: steps):
        """One pass over a freshly drawn epoch; returns this rank's (loss sum, sample count)."""
        users, items, labels = self.draw(generator)
        loss_sum = torch.zeros((), dtype=torch.float64, device=users.device)
        for step in progress(range(self.batches.steps)):
            loss_sum += self.step(users[step], items[step], labels[step])
        return loss_sum, self.batches.steps * self.batches.rank_batch

    def warm_up(self):
        """Compile the step before the clock of the first epoch starts: a forward and backward
        of each micro-batch shape (or the whole step, where the plan compiles it whole), leaving
        the weights, the optimizer and every random state as they were. Returns the seconds it
        took (0 when not compiled)."""
        if not self.plan.compiled:
            return 0.0
        start = self.plan.time()
        rng = self.plan.rng_state()  # dropout draws from it
        positives = len(self.batches.users)
        rows = None
        sizes = sorted({part.stop - part.start for part in self.batches.micro_slices})
        if self.whole_step is not None:  # one graph, of the whole batch
            index = torch.arange(self.batches.batch_size, device=self.plan.device) \
                * positives // self.batches.batch_size
            self.whole_step.warm_up(self.batches.users[index], self.batches.items[index],
                                    (index % 5 == 0).float())
            sizes = []
        for size in sizes:
            # Training pairs spread over the whole data, as a real batch's are: compile time is
            # then what a step costs (one table row repeated in every sample would be the
            # backward's worst case). Three distinct tensors, as in a real step (aliased inputs
            # would compile another graph).
            spread = self.batches.batch_size if self.sparse is not None else size
            index = torch.arange(spread, device=self.plan.device) * positives // spread
            users, items = self.batches.users[index], self.batches.items[index]
            if self.sparse is not None:  # slots into the rows a whole batch touches
                users, items, rows = self.sparse.gather(users, items)
                users, items, index = users[:size], items[:size], index[:size]
            labels = (index % 5 == 0).float()
            self.loss(users, items, labels, rows).backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.plan.set_rng_state(rng)
        return self.plan.time() - start
