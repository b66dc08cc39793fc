"""NeuMF (He et al., 2017) as in the reference recipe: a GMF branch and an MLP branch, fused.

Parameter names match the reference's, so its model.pth loads here and the reverse.
"""
import math

import torch
import torch.nn as nn


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout=0.0):
        super().__init__()
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
        gmf = self.mf_user_embed(user) * self.mf_item_embed(item)
        x = torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)
        for layer in self.mlp:
            x = nn.functional.relu(layer(x))
            if self.dropout:
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        x = self.final(torch.cat((gmf, x), dim=1))
        return torch.sigmoid(x) if sigmoid else x


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
