"""NeuMF (He et al., 2017) as in the reference recipe: a GMF branch and an MLP branch, fused.

Parameter names match the reference's, so its model.pth loads here and the reverse. The forward
is the reference's, in three replaceable parts (`inputs`, `hidden`, the final layer):
cpu_fused.py and fused.py subclass it with faster input layers and activations over the same
parameters, so checkpoints and optimizer states are the same for every implementation.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ncflib.cli import UsageError

# The reference's model: 64 GMF factors, MLP layers 256 256 128 64, dropout 0.5.
DEFAULT_FACTORS = 64
DEFAULT_LAYERS = (256, 256, 128, 64)
DEFAULT_DROPOUT = 0.5


def check_shape(factors, layers, dropout=0.0):
    """A model of these sizes can be built: UsageError (one line, in the flags' names) if not."""
    if factors < 1:
        raise UsageError(f'--factors must be positive, not {factors}')
    if not layers or min(layers) < 1:
        raise UsageError(f'--layers must be positive sizes, not {list(layers)}')
    if layers[0] % 2:
        raise UsageError(f'--layers: the first size ({layers[0]}) must be even: it is the user '
                         'and item MLP embeddings side by side')
    if not (math.isfinite(dropout) and 0 <= dropout < 1):
        raise UsageError(f'--dropout must be in [0, 1), not {dropout}')


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
        super().__init__()
        check_shape(mf_dim, mlp_layer_sizes, dropout)
        self.dropout = dropout
        # GMF branch: mf_dim-wide user and item embeddings, multiplied element-wise.
        self.mf_user_embed = nn.Embedding(nb_users, mf_dim)
        self.mf_item_embed = nn.Embedding(nb_items, mf_dim)
        # MLP branch: half of the first layer each, concatenated, then Linear + ReLU (+ dropout).
        self.mlp_user_embed = nn.Embedding(nb_users, mlp_layer_sizes[0] // 2)
        self.mlp_item_embed = nn.Embedding(nb_items, mlp_layer_sizes[0] // 2)
        self.mlp = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out
                                 in zip(mlp_layer_sizes[:-1], mlp_layer_sizes[1:]))
        self.final = nn.Linear(mlp_layer_sizes[-1] + mf_dim, 1)

        # The reference's initialisation: biases keep PyTorch's default.
        for embedding in (self.mf_user_embed, self.mf_item_embed,
                          self.mlp_user_embed, self.mlp_item_embed):
            nn.init.normal_(embedding.weight, 0.0, 0.01)
        for layer in self.mlp:
            glorot_uniform_(layer.weight)
        lecun_uniform_(self.final.weight)

    def forward(self, user, item, sigmoid=False):
        gmf, x = self.inputs(user, item)
        for layer in self.mlp:
            x = self.hidden(layer(x))
        x = torch.cat((gmf, x), dim=1)
        if x.dtype != self.final.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.float()  # the scoring copy's output layer is fp32 (see inference_copy)
        x = self.final(x)
        return torch.sigmoid(x) if sigmoid else x

    def inputs(self, user, item):
        """The GMF product and the MLP input (the user and item MLP embeddings side by side)."""
        gmf = self.mf_user_embed(user) * self.mf_item_embed(item)
        return gmf, torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)

    def compute_dtype(self, tensor):
        """The dtype the layers compute in: autocast's where it is on, else the tables'."""
        device_type = tensor.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.mf_user_embed.weight.dtype

    def hidden(self, x):
        """An MLP layer's activation: ReLU, then dropout in training."""
        x = F.relu(x)
        return F.dropout(x, p=self.dropout, training=self.training) if self.dropout else x

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
        first = self.mlp[0]
        half = self.mlp_user_embed.weight.shape[1]
        user_part = F.linear(self.mlp_user_embed(users), first.weight[:, :half], first.bias)
        item_part = F.linear(self.mlp_item_embed.weight, first.weight[:, half:])
        x = torch.relu(user_part[:, None, :] + item_part[None, :, :]).flatten(0, 1)
        for layer in self.mlp[1:]:
            x = torch.relu(layer(x))
        # The output layer in fp32 whatever the layers' dtype: fp32 logits
        final = self.final.weight.float()
        mf_dim = self.mf_user_embed.weight.shape[1]
        gmf = (self.mf_user_embed(users).float() * final[0, :mf_dim]) \
            @ self.mf_item_embed.weight.float().t()
        # a product and a sum rather than a matrix product: a bf16 x would round its result
        mlp = (x * final[0, mf_dim:]).sum(1).view(len(users), -1)
        return gmf + mlp + self.final.bias.float()

    def scoring_bytes_per_pair(self, dtype):
        """Bytes of activations per (user, item) pair that all_item_scores holds at its peak in
        `dtype` (two widest layers' outputs, and the fp32 scores), to size its chunks."""
        widths = sorted([self.mlp[0].in_features] + [layer.out_features for layer in self.mlp])
        return (widths[-1] + widths[-2]) * torch.finfo(dtype).bits // 8 + 16

    # The class of the scoring copy (a subclass may score with another forward).
    scoring_class = None

    def inference_copy(self, dtype):
        """A copy for scoring: eval mode, no gradients, weights cast once to `dtype` (so no
        autocast is needed, and no per-call casts of the weights), but for the output layer,
        which stays fp32: logits rounded to bf16 (8 bits of mantissa) would tie the positive
        with negatives it beats, and a tie counts against it."""
        model = copy.deepcopy(self).to(dtype).eval().requires_grad_(False)
        model.final.float()
        if self.scoring_class is not None:
            model.__class__ = self.scoring_class  # the same parameters, another forward
        return model


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
