"""NeuMF (He et al., 2017) as in the reference recipe: a GMF branch and an MLP branch, fused.

Parameter names match the reference's, so its model.pth loads here and the reverse. Two
implementations share those parameters: the plain one (the reference's forward, autograd does the
rest) and the fast one (the default): the embedding gathers, the GMF product and the MLP input
in one autograd function with a hand-written backward, activations in the autocast dtype from
the first layer on, and ReLU and dropout in one step with a cheaper dropout mask. Checkpoints and
optimizer states are the same for both.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0, fast=True):
        super().__init__()
        self.fast = fast
        if mlp_layer_sizes[0] % 2 != 0:
            raise ValueError(f'the first MLP layer ({mlp_layer_sizes[0]}) must be even: it is the '
                             'user and item MLP embeddings side by side')
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
        x = self._fast_forward(user, item) if self.fast else self._plain_forward(user, item)
        return torch.sigmoid(x) if sigmoid else x

    def _plain_forward(self, user, item):
        gmf = self.mf_user_embed(user) * self.mf_item_embed(item)
        x = torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)
        for layer in self.mlp:
            x = nn.functional.relu(layer(x))
            if self.dropout:
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        return self.final(torch.cat((gmf, x), dim=1))

    def _fast_forward(self, user, item):
        device_type = user.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else self.final.weight.dtype)
        gmf, x = _GatherInputs.apply(user, item, self.mf_user_embed.weight,
                                     self.mf_item_embed.weight, self.mlp_user_embed.weight,
                                     self.mlp_item_embed.weight, dtype)
        p = self.dropout if self.training else 0.0
        for layer in self.mlp:
            x = _ReluDropout.apply(layer(x), p)
        return self.final(torch.cat((gmf, x), dim=1))


class _GatherInputs(torch.autograd.Function):
    """Both branches' inputs from the four tables: the GMF product and the MLP input, cast once
    to the compute dtype. The backward forms each gathered row's gradient once and adds it into
    a dense table gradient (Adam's semantics need the dense one), without the slice, concat and
    cast gradients autograd would otherwise materialise."""

    @staticmethod
    def forward(ctx, user, item, mf_user, mf_item, mlp_user, mlp_item, dtype):
        mf_u, mf_i = mf_user.index_select(0, user), mf_item.index_select(0, item)
        gmf = (mf_u * mf_i).to(dtype)
        mlp_input = torch.cat((mlp_user.index_select(0, user),
                               mlp_item.index_select(0, item)), dim=1).to(dtype)
        ctx.save_for_backward(user, item, mf_u, mf_i)
        ctx.table_shapes = [t.shape for t in (mf_user, mf_item, mlp_user, mlp_item)]
        ctx.half = mlp_user.shape[1]
        return gmf, mlp_input

    @staticmethod
    def backward(ctx, grad_gmf, grad_mlp_input):
        user, item, mf_u, mf_i = ctx.saved_tensors
        grad_gmf = grad_gmf.to(mf_u.dtype)
        # Contiguous halves: index_add_ takes a much slower path on strided rows.
        grad_mlp_user, grad_mlp_item = (half.contiguous() for half in
                                        grad_mlp_input.to(mf_u.dtype).split(ctx.half, dim=1))
        rows = (grad_gmf * mf_i, grad_gmf * mf_u, grad_mlp_user, grad_mlp_item)
        grads = [mf_u.new_zeros(shape).index_add_(0, index, row) for shape, index, row
                 in zip(ctx.table_shapes, (user, item, user, item), rows)]
        return (None, None, *grads, None)


class _ReluDropout(torch.autograd.Function):
    """relu(x), then inverted dropout with probability p, in one step; saves only the output
    (the gradient passes exactly where it is positive). The mask comes from 16 random bits per
    element (drop probability round(p * 65536) / 65536: exact for 0.5), several times cheaper
    on a CPU than torch's Bernoulli draw, and every operation is one of torch's vectorised ones
    (torch.where and bool products are several times slower on bf16)."""

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


def all_item_scores(model, users, n_items):
    """Logits of every item for each of `users`: [len(users), n_items], as float32, in eval mode.

    The forward over all (user, item) pairs, factorised: the first MLP layer of a concatenation
    is the sum of a user part and an item part, each computed once per user and per item rather
    than per pair, and the GMF branch's contribution to the final layer is one matrix product.
    That leaves 40% of the per-pair multiply-adds of the default layers (256 256 128 64), and no
    per-pair embedding gathers. Callers size `users` to bound the [users, items, layer] memory.
    """
    assert not model.training, 'all_item_scores is for evaluation (dropout off)'
    first = model.mlp[0]
    half = model.mlp_user_embed.weight.shape[1]
    user_part = F.linear(model.mlp_user_embed(users), first.weight[:, :half], first.bias)
    item_part = F.linear(model.mlp_item_embed.weight, first.weight[:, half:])
    x = torch.relu(user_part[:, None, :] + item_part[None, :, :]).flatten(0, 1)
    for layer in model.mlp[1:]:
        x = torch.relu(layer(x))
    mf_dim = model.mf_user_embed.weight.shape[1]
    final_gmf, final_mlp = model.final.weight[0, :mf_dim], model.final.weight[0, mf_dim:]
    gmf = (model.mf_user_embed(users) * final_gmf) @ model.mf_item_embed.weight.t()
    mlp = (x @ final_mlp.to(x.dtype)).view(len(users), n_items)
    return gmf.float() + mlp.float() + model.final.bias.float()


def shapes_of(state):
    """(nb_users, nb_items, mf_dim, mlp_layer_sizes) of a NeuMF state dict, or of a last.pth
    holding one under 'model'; ValueError if it is not one."""
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']
    try:
        state = {key.removeprefix('module.'): value for key, value in state.items()}
        nb_users, mf_dim = state['mf_user_embed.weight'].shape
        nb_items = state['mf_item_embed.weight'].shape[0]
        layers = [state['mlp_user_embed.weight'].shape[1] * 2]
        while f'mlp.{len(layers) - 1}.weight' in state:
            layers.append(state[f'mlp.{len(layers) - 1}.weight'].shape[0])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError('not a NeuMF state dict') from None
    return nb_users, nb_items, mf_dim, layers
