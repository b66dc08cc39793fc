"""torch.hub entry point: `torch.hub.load('OWNER/ncf', 'neumf', ...)` or, from a clone,
`torch.hub.load('path/to/ncf', 'neumf', source='local', checkpoint='checkpoints/model.pth')`."""
dependencies = ['torch']


def neumf(nb_users=138493, nb_items=26744, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64),
          dropout=0.5, checkpoint=None, device='cpu', impl='auto'):
    """NeuMF as in the reference recipe (defaults: ML-20m's tables), on `device`.

    checkpoint: path to a model.pth or last.pth written by ncf.py (or the reference); the table
    sizes, factors and layers then come from it and its weights are loaded. impl: the
    implementation's model class, as ncf.py's --impl (all take the same weights).
    """
    import checkpoints
    import runtime

    plan = runtime.resolve(device, impl=impl, precision='fp32')  # the model's own: fp32
    state = None
    if checkpoint is not None:
        state = checkpoints.read(checkpoint)
        nb_users, nb_items, mf_dim, mlp_layer_sizes = checkpoints.shapes_of(state, checkpoint)
    model = plan.build_model(nb_users, nb_items, mf_dim, list(mlp_layer_sizes), dropout)
    if state is not None:
        checkpoints.load_model_state(model, state, checkpoint)
    return model.to(plan.device)
