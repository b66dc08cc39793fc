"""The NCF family (He et al., 2017): NeuMF as in the reference recipe, its two branches GMF and
MLP trained alone, and the dot-product matrix factorisation (MF) it is measured against (Rendle
et al., 2020).

    NeuMF  final([ gmf(u, i), mlp(u, i) ])     the reference's model
    GMF    final(gmf(u, i))                    gmf(u, i) = p_u * q_i, element-wise
    MLP    final(mlp(u, i))                    mlp(u, i) = ReLU layers over [p'_u, q'_i]
    MF     <p_u, q_i> + b_u + b_i + b          no layers

Parameter names are the reference's in every model (GMF's tables are `mf_*_embed`, MLP's
`mlp_*_embed` and `mlp.N`, the output layer `final`), so the reference's model.pth loads here and
the reverse, and a NeuMF starts from a trained GMF and MLP by copying tensors of the same names
(`NeuMF.load_branches`). The forward is in three replaceable parts (`inputs`, `hidden`, the
output): cpu_fused.py and fused.py override the first two with faster ones over the same
parameters (cpu_fused.py's `inputs` applies the first MLP layer too), so checkpoints and
optimizer states are the same for every implementation.
"""
import copy
import dataclasses
import itertools
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ncflib.cli import UsageError

MODELS = ('neumf', 'gmf', 'mlp', 'mf')
# The reference's model: 64 GMF factors, MLP layers 256 256 128 64, dropout 0.5.
DEFAULT_MODEL = 'neumf'
DEFAULT_FACTORS = 64
DEFAULT_LAYERS = (256, 256, 128, 64)
DEFAULT_DROPOUT = 0.5
# MF's initial embeddings: N(0, MF_INIT_STD), biases zero (Rendle et al.'s mf_simple.py).
MF_INIT_STD = 0.1


def check_count(value, name):
    """`value` is a positive integer (numpy's too; not a bool): UsageError naming it if not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError(f'{name} must be an integer, not {value!r}')
    if value < 1:
        raise UsageError(f'{name} must be positive, not {value}')


def check_tables(n_users, n_items):
    """The tables' rows: as many as there are users and items."""
    check_count(n_users, 'the number of users')
    check_count(n_items, 'the number of items')


def check_factors(factors):
    check_count(factors, '--factors')


def check_layers(layers, dropout=0.0):
    if not isinstance(layers, (list, tuple)) or not layers:
        raise UsageError(f'--layers must be positive sizes, not {layers!r}')
    for size in layers:
        check_count(size, '--layers')
    if layers[0] % 2:
        raise UsageError(f'--layers: the first size ({layers[0]}) must be even: it is the user '
                         'and item MLP embeddings side by side')
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
            or not (math.isfinite(dropout) and 0 <= dropout < 1):
        raise UsageError(f'--dropout must be in [0, 1), not {dropout!r}')


def check_shape(factors, layers, dropout=0.0):
    """A model of these sizes can be built: UsageError (one line, in the flags' names) if not."""
    check_factors(factors)
    check_layers(layers, dropout)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Which model of the family, and its sizes (the tables' rows come from the data). Sizes a
    model does not use (GMF's and MF's layers, MLP's factors) are kept as given, and ignored."""
    model: str = DEFAULT_MODEL
    factors: int = DEFAULT_FACTORS
    layers: tuple = DEFAULT_LAYERS
    dropout: float = DEFAULT_DROPOUT

    def __post_init__(self):
        if self.model not in MODELS:
            raise UsageError(f'--model must be one of {", ".join(MODELS)}, not {self.model!r}')
        check_shape(self.factors, self.layers, self.dropout)
        object.__setattr__(self, 'layers', tuple(self.layers))

    @property
    def uses_factors(self):
        return MODEL_CLASSES[self.model].HAS_GMF

    @property
    def uses_layers(self):
        return MODEL_CLASSES[self.model].HAS_MLP

    def record(self):
        """What a checkpoint records of the model: its name and the sizes it uses."""
        record = {'model': self.model}
        if self.uses_factors:
            record['factors'] = self.factors
        if self.uses_layers:
            record.update(layers=list(self.layers), dropout=self.dropout)
        return record

    def describe(self):
        sizes = ([f'factors {self.factors}'] if self.uses_factors else []) + \
            ([f'layers {list(self.layers)}'] if self.uses_layers else [])
        return f'{self.model} ({", ".join(sizes)})'

    def build(self, n_users, n_items, classes=None):
        """A freshly initialised model of this shape; classes: {model name: class} of an
        implementation (default: the plain ones)."""
        model_class = (classes or MODEL_CLASSES)[self.model]
        return model_class(n_users, n_items, self.factors, list(self.layers), self.dropout)


class NCF(nn.Module):
    """The frame the family shares: a GMF branch (HAS_GMF), an MLP branch (HAS_MLP), and an
    output layer over what they give, built in the reference's order (its random draws, hence its
    initial weights, are the reference's). Every model takes the reference's arguments; sizes
    of a branch it lacks are ignored."""
    NAME = None
    HAS_GMF = HAS_MLP = False

    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
        super().__init__()
        # Every model is built here (ncf.py, inference.py, torch.hub): bad sizes end in one line
        # rather than in torch's errors
        check_tables(nb_users, nb_items)
        if self.HAS_GMF:
            check_factors(mf_dim)
        if self.HAS_MLP:
            check_layers(mlp_layer_sizes, dropout)
        self.dropout = dropout if self.HAS_MLP else 0.0
        width = 0
        if self.HAS_GMF:  # mf_dim-wide user and item embeddings, multiplied element-wise
            self.mf_user_embed = nn.Embedding(nb_users, mf_dim)
            self.mf_item_embed = nn.Embedding(nb_items, mf_dim)
            width += mf_dim
        if self.HAS_MLP:
            # half of the first layer each, side by side, then Linear + ReLU (+ dropout)
            self.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
            self.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
            self.mlp = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out
                                     in zip(mlp_layer_sizes[:-1], mlp_layer_sizes[1:]))
            width += mlp_layer_sizes[-1]
        self.build_output(width)
        self.initialise()

    def build_output(self, width):
        self.final = nn.Linear(width, 1)

    def initialise(self):
        """The reference's initialisation: biases keep PyTorch's default."""
        for embedding in self.embeddings().values():
            nn.init.normal_(embedding.weight, 0.0, 0.01)
        for layer in getattr(self, 'mlp', ()):
            glorot_uniform_(layer.weight)
        lecun_uniform_(self.final.weight)

    def embeddings(self):
        """{name: table} of the per-user and per-item tables, in the reference's order (a
        user's table has 'user' in its name)."""
        return {name: module for name, module in self.named_children()
                if isinstance(module, nn.Embedding)}

    @staticmethod
    def table(module, name, rows):
        """A table's weight, or where `rows` ({table name: rows}, sparse_updates.py's) is given,
        the rows a step touches, which `user` and `item` then index."""
        return module.weight if rows is None else rows[name]

    def tables(self, rows=None):
        """The four tables the input layer reads, (mf_user, mf_item, mlp_user, mlp_item)
        weights (or `rows`), None for a branch the model lacks."""
        table = self.table
        mf = (table(self.mf_user_embed, 'mf_user_embed', rows),
              table(self.mf_item_embed, 'mf_item_embed', rows)) if self.HAS_GMF else (None, None)
        mlp = (table(self.mlp_user_embed, 'mlp_user_embed', rows),
               table(self.mlp_item_embed, 'mlp_item_embed', rows)) if self.HAS_MLP \
            else (None, None)
        return mf + mlp

    # Whether `inputs` gives the first MLP layer's activations rather than that layer's input
    # (cpu_fused.py computes that layer per distinct user and item of the batch).
    FIRST_LAYER_IN_INPUTS = False

    def forward(self, user, item, sigmoid=False, rows=None):
        gmf, x = self.inputs(user, item, rows)
        if self.HAS_MLP:
            for layer in itertools.islice(self.mlp, int(self.FIRST_LAYER_IN_INPUTS), None):
                x = self.hidden(layer(x))
        x = x if gmf is None else gmf if x is None else torch.cat((gmf, x), dim=1)
        if x.dtype != self.final.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # the scoring copy's output layer is fp32 (see inference_copy)
        x = self.final(x)
        return torch.sigmoid(x) if sigmoid else x

    def inputs(self, user, item, rows=None):
        """The GMF product and the MLP input (the user and item MLP embeddings side by side);
        None for a branch the model lacks."""
        mf_user, mf_item, mlp_user, mlp_item = self.tables(rows)
        gmf = F.embedding(user, mf_user) * F.embedding(item, mf_item) if self.HAS_GMF else None
        mlp_input = torch.cat((F.embedding(user, mlp_user), F.embedding(item, mlp_item)),
                              dim=1) if self.HAS_MLP else None
        return gmf, mlp_input

    def compute_dtype(self, tensor):
        """The dtype the layers compute in: autocast's where it is on, else the tables'."""
        device_type = tensor.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return next(iter(self.embeddings().values())).weight.dtype

    def hidden(self, x):
        """An MLP layer's activation: ReLU, then dropout in training."""
        x = F.relu(x)
        return F.dropout(x, p=self.dropout, training=self.training) if self.dropout else x

    def embedding_penalty(self, user, item, rows=None):
        """The mean over the samples of the squared norms of the table rows each one uses, in
        fp32: --embedding_l2's penalty, on the rows a batch uses only (as SGD-trained MF
        regularises; a decay of whole tables would shrink every row at every step)."""
        total = 0.0
        for name, embedding in self.embeddings().items():
            used = F.embedding(user if 'user' in name else item,
                               self.table(embedding, name, rows))
            total = total + used.float().pow(2).sum(1).mean()
        return total

    def dense_weights(self):
        """The weights of the dense layers, which --weight_decay decays (not their biases)."""
        return [layer.weight for layer in getattr(self, 'mlp', ())] + [self.final.weight]

    def all_item_scores(self, users):
        """Logits of every item for each of `users`: [len(users), n_items], as float32.

        The forward over all (user, item) pairs, factorised: the first MLP layer of a
        concatenation is the sum of a user part and an item part, each computed once per user
        and per item rather than per pair, and the GMF branch's contribution to the final layer
        is one matrix product. That leaves 40% of the per-pair multiply-adds of the default
        layers (256 256 128 64), and no per-pair embedding gathers. Callers size `users` to
        bound the [users, items, layer] memory. Evaluation only: no dropout.
        """
        assert not self.training, 'all_item_scores is for evaluation (dropout off)'
        # The output layer in fp32 whatever the layers' dtype: fp32 logits
        final = self.final.weight.float()[0]
        scores = self.final.bias.float()
        mf_dim = 0
        if self.HAS_GMF:
            mf_dim = self.mf_user_embed.weight.shape[1]
            scores = scores + (self.mf_user_embed(users).float() * final[:mf_dim]) \
                @ self.mf_item_embed.weight.float().t()
        if self.HAS_MLP:
            first = self.mlp[0]
            half = self.mlp_user_embed.weight.shape[1]
            user_part = F.linear(self.mlp_user_embed(users), first.weight[:, :half], first.bias)
            item_part = F.linear(self.mlp_item_embed.weight, first.weight[:, half:])
            x = torch.relu(user_part[:, None, :] + item_part[None, :, :]).flatten(0, 1)
            for layer in self.mlp[1:]:
                x = torch.relu(layer(x))
            # a product and a sum rather than a matrix product: a bf16 x would round its result
            scores = scores + (x * final[mf_dim:]).sum(1).view(len(users), -1)
        return scores

    def scoring_bytes_per_pair(self, dtype):
        """Bytes of activations per (user, item) pair that all_item_scores holds at its peak in
        `dtype` (two widest layers' outputs, and the fp32 scores), to size its chunks."""
        if not self.HAS_MLP:
            return 16
        widths = sorted([self.mlp[0].in_features] + [layer.out_features for layer in self.mlp])
        return (widths[-1] + widths[-2]) * torch.finfo(dtype).bits // 8 + 16

    # The class of the scoring copy (a subclass may score with another forward).
    scoring_class = None

    def output_parameters(self):
        """The output layer's parameters, which the scoring copy keeps in fp32."""
        return list(self.final.parameters())

    def inference_copy(self, dtype):
        """A copy for scoring: eval mode, no gradients, weights cast once to `dtype` (so no
        autocast is needed, and no per-call casts of the weights), but for the output layer,
        which stays exactly as trained, in fp32: logits rounded to bf16 (8 bits of mantissa)
        would tie the positive with negatives it beats, and a tie counts against it."""
        model = copy.deepcopy(self).eval().requires_grad_(False)
        kept = {id(parameter) for parameter in model.output_parameters()}
        for parameter in model.parameters():
            if id(parameter) not in kept:
                # as Module.to casts: the tensor under the same Parameter. Not the whole model
                # cast and the output layer cast back: that would round it to `dtype`.
                parameter.data = parameter.data.to(dtype)
        if self.scoring_class is not None:
            model.__class__ = self.scoring_class  # the same parameters, another forward
        return model


class NeuMF(NCF):
    """The reference's model: the GMF and MLP branches side by side under one output layer."""
    NAME = 'neumf'
    HAS_GMF = HAS_MLP = True

    def load_branches(self, gmf, mlp, alpha):
        """The NCF paper's start for NeuMF: the tables and hidden layers of a trained GMF and a
        trained MLP (of this model's sizes), and the output layer [alpha * GMF's, (1 - alpha) *
        MLP's], its bias alpha * GMF's + (1 - alpha) * MLP's: the logit is then exactly alpha *
        GMF's + (1 - alpha) * MLP's."""
        gmf_state, mlp_state = gmf.state_dict(), mlp.state_dict()
        state = {name: (gmf_state if name in gmf_state and not name.startswith('final.')
                        else mlp_state)[name] for name in self.state_dict()}
        state['final.weight'] = torch.cat((alpha * gmf_state['final.weight'],
                                           (1 - alpha) * mlp_state['final.weight']), dim=1)
        state['final.bias'] = alpha * gmf_state['final.bias'] \
            + (1 - alpha) * mlp_state['final.bias']
        self.load_state_dict(state)


class GMF(NCF):
    """Generalised matrix factorisation: the element-wise product of the user's and the item's
    embeddings, weighted by the output layer."""
    NAME = 'gmf'
    HAS_GMF = True


class MLP(NCF):
    """The multi-layer perceptron over the user's and the item's embeddings side by side."""
    NAME = 'mlp'
    HAS_MLP = True


class MF(NCF):
    """Dot-product matrix factorisation with biases (Rendle et al., 2020): <p_u, q_i> + b_u +
    b_i + b, the GMF tables with no output layer. Initialised as their mf_simple.py: embeddings
    N(0, MF_INIT_STD), biases zero."""
    NAME = 'mf'
    HAS_GMF = True

    def build_output(self, width):
        self.user_bias = nn.Embedding(self.mf_user_embed.num_embeddings, 1)
        self.item_bias = nn.Embedding(self.mf_item_embed.num_embeddings, 1)
        self.global_bias = nn.Parameter(torch.zeros(1))

    def initialise(self):
        for embedding in (self.mf_user_embed, self.mf_item_embed):
            nn.init.normal_(embedding.weight, 0.0, MF_INIT_STD)
        for bias in (self.user_bias, self.item_bias):
            nn.init.zeros_(bias.weight)

    def forward(self, user, item, sigmoid=False, rows=None):
        gmf, _ = self.inputs(user, item, rows)
        # summed in fp32 (the product may be bf16): logits keep fp32's resolution
        x = gmf.float().sum(1, keepdim=True) \
            + F.embedding(user, self.table(self.user_bias, 'user_bias', rows)).float() \
            + F.embedding(item, self.table(self.item_bias, 'item_bias', rows)).float() \
            + self.global_bias.float()
        return torch.sigmoid(x) if sigmoid else x

    def dense_weights(self):
        return []

    def output_parameters(self):
        """The biases, MF's output: an item's bias rounded to bf16 would reorder close items."""
        return [self.user_bias.weight, self.item_bias.weight, self.global_bias]

    def all_item_scores(self, users):
        assert not self.training
        scores = self.mf_user_embed(users).float() @ self.mf_item_embed.weight.float().t()
        return scores + self.user_bias(users).float() \
            + self.item_bias.weight.float().t() + self.global_bias.float()


MODEL_CLASSES = {model.NAME: model for model in (NeuMF, GMF, MLP, MF)}


def glorot_uniform_(weight):
    """Uniform in +-sqrt(6 / (fan_in + fan_out)) (Keras' glorot_uniform)."""
    fan_out, fan_in = weight.shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-limit, limit)


def lecun_uniform_(weight):
    """Uniform in +-sqrt(3 / fan_in) (Keras' lecun_uniform as the reference wrote it)."""
    limit = math.sqrt(3.0 / weight.shape[1])
    with torch.no_grad():
        return weight.uniform_(-limit, limit)
