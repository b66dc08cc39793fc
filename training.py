"""The training step: Adam on the binary cross-entropy of positives and sampled negatives."""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrainingLoss(nn.Module):
    """The mean loss of a (micro-)batch: the model's forward under the plan's autocast, and the
    loss, as one module. torch.compile makes it one graph; DDP wraps the compiled module, so that
    DDP's own forward stays outside the graph."""

    def __init__(self, model, autocast):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, users, items, labels):
        with self.autocast():
            logits = self.model(users, items)
        return F.binary_cross_entropy_with_logits(logits.float().view(-1), labels)


class Trainer:
    """Steps of one global batch: each rank's slice, in micro-batches, then one Adam step.

    model: the model to train (the trainer compiles its step and wraps it in DDP as the plan
    says); batches: dataloading.TrainBatches.
    """

    def __init__(self, plan, model, batches, learning_rate, betas, eps):
        self.plan, self.model, self.batches = plan, model, batches
        self.optimizer = plan.optimizer(model.parameters(), learning_rate, betas, eps)
        self.scaler = plan.grad_scaler()
        self.loss = plan.distributed_model(plan.compile(TrainingLoss(model, plan.autocast)))
        # Each micro-batch's mean loss counts by its share of the slice: the gradients then add
        # up to the slice's, whatever the micro-batch sizes.
        self.weights = [(part.stop - part.start) / batches.rank_batch
                        for part in batches.micro_slices]

    def step(self, users, items, labels):
        """One optimisation step on this rank's slice of a batch; returns the slice's loss sum,
        on the device (reading it here would synchronise every step)."""
        slices = self.batches.micro_slices
        loss_sum = torch.zeros((), dtype=torch.float64, device=users.device)
        for index, (part, weight) in enumerate(zip(slices, self.weights)):
            # DDP all-reduces gradients on the last micro-batch of a step only.
            last = index == len(slices) - 1
            with contextlib.nullcontext() if last or not self.plan.distributed \
                    else self.loss.no_sync():
                loss = self.loss(users[part], items[part], labels[part]) * weight
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach() * self.batches.rank_batch
        # With fused Adam, GradScaler hands the inf check to the optimizer's kernel: no sync.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def weights_are_finite(self):
        """Whether no weight is NaN or infinite (one synchronisation, once an epoch)."""
        return bool(torch.stack([torch.isfinite(parameter).all()
                                 for parameter in self.model.parameters()]).all())

    def epoch(self, generator, progress=lambda steps: steps):
        """One pass over a freshly drawn epoch; returns this rank's (loss sum, sample count)."""
        users, items, labels = self.batches.epoch(generator)
        loss_sum = torch.zeros((), dtype=torch.float64, device=users.device)
        for step in progress(range(self.batches.steps)):
            loss_sum += self.step(users[step], items[step], labels[step])
        return loss_sum, self.batches.steps * self.batches.rank_batch

    def warm_up(self):
        """Compile the step before the clock of the first epoch starts: a forward and backward
        of each micro-batch shape, leaving the weights, the optimizer and every random state as
        they were. Returns the seconds it took (0 when not compiled)."""
        if not self.plan.compiled:
            return 0.0
        start = self.plan.time()
        rng = self.plan.rng_state()  # dropout draws from it
        positives = len(self.batches.users)
        for size in sorted({part.stop - part.start for part in self.batches.micro_slices}):
            # Training pairs spread over the whole data, as a real batch's are: compile time is
            # then what a step costs (one table row repeated in every sample would be the
            # backward's worst case). Three distinct tensors, as in a real step (aliased inputs
            # would compile another graph).
            index = torch.arange(size, device=self.plan.device) * positives // size
            users, items = self.batches.users[index], self.batches.items[index]
            labels = (index % 5 == 0).float()
            self.loss(users, items, labels).backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.plan.set_rng_state(rng)
        return self.plan.time() - start
