"""torch.hub entry point: `torch.hub.load('OWNER/ncf', 'neumf', ...)` or, from a clone,
`torch.hub.load('path/to/ncf', 'neumf', source='local', checkpoint='checkpoints/model.pth')`.

Everything it imports is in the ncflib package: a caller's own modules named like ours
(`runtime`, `checkpoints`, `utils`, `neumf`...) cannot stand in for them."""
from ncflib import checkpoints, models, runtime
from ncflib.cache import ML_20M_ITEMS, ML_20M_USERS

dependencies = ['torch']


def neumf(nb_users=ML_20M_USERS, nb_items=ML_20M_ITEMS, mf_dim=models.DEFAULT_FACTORS,
          mlp_layer_sizes=models.DEFAULT_LAYERS, dropout=models.DEFAULT_DROPOUT,
          checkpoint=None, device='cpu', impl='auto'):
    """NeuMF as in the reference recipe (defaults: ML-20m's tables), on `device`.

    checkpoint: path to a model.pth or last.pth written by ncf.py (or the reference); the table
    sizes, factors and layers then come from it and its weights are loaded. impl: the
    implementation's model class, as ncf.py's --impl (all take the same weights).
    """
    # the model's own precision, fp32: nothing to measure
    plan = runtime.resolve(runtime.PlanOptions(device=device, impl=impl, precision='fp32'))
    state = None
    if checkpoint is not None:
        state = checkpoints.read(checkpoint)
        nb_users, nb_items, mf_dim, mlp_layer_sizes = checkpoints.shapes_of(state, checkpoint)
    model = plan.build_model(nb_users, nb_items, mf_dim, list(mlp_layer_sizes), dropout)
    if state is not None:
        checkpoints.load_model_state(model, state, checkpoint)
    return model.to(plan.device)
