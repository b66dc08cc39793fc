"""torch.hub entry points: `torch.hub.load('OWNER/ncf', 'neumf', ...)` or, from a clone,
`torch.hub.load('path/to/ncf', 'neumf', source='local', checkpoint='checkpoints/model.pth')`;
likewise 'gmf', 'mlp' and 'mf', and 'from_checkpoint' for whichever model a checkpoint holds.

Everything it imports is in the ncflib package: a caller's own modules named like ours
(`runtime`, `checkpoints`, `utils`, `neumf`...) cannot stand in for them."""
from ncflib import checkpoints, models, runtime
from ncflib.cache import ML_20M_ITEMS, ML_20M_USERS
from ncflib.cli import UsageError

dependencies = ['torch']


def _build(model, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout, checkpoint, device,
           impl):
    """A model of the family on `device`: from `checkpoint` (its model, sizes and weights;
    `model` None: whichever it holds) or freshly initialised."""
    state = None
    if checkpoint is not None:
        state = checkpoints.read(checkpoint)
        shape, nb_users, nb_items = checkpoints.shape_of(state, checkpoint)
        if model is not None and shape.model != model:
            raise UsageError(f'checkpoint {checkpoint} holds --model {shape.describe()}, not '
                             f'{model}')
    else:
        shape = models.ModelShape(model, mf_dim, mlp_layer_sizes, dropout)
    # the model's own precision, fp32: nothing to measure
    plan = runtime.resolve(runtime.PlanOptions(device=device, impl=impl, precision='fp32'),
                           shape)
    built = plan.build_model(shape, nb_users, nb_items)
    if state is not None:
        checkpoints.load_model_state(built, state, checkpoint)
    return built.to(plan.device)


def neumf(nb_users=ML_20M_USERS, nb_items=ML_20M_ITEMS, mf_dim=models.DEFAULT_FACTORS,
          mlp_layer_sizes=models.DEFAULT_LAYERS, dropout=models.DEFAULT_DROPOUT,
          checkpoint=None, device='cpu', impl='auto'):
    """NeuMF as in the reference recipe (defaults: ML-20m's tables), on `device`.

    checkpoint: path to a model.pth or last.pth written by ncf.py (or the reference); the table
    sizes, factors and layers then come from it and its weights are loaded. impl: the
    implementation's model class, as ncf.py's --impl (all take the same weights).
    """
    return _build('neumf', nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout, checkpoint,
                  device, impl)


def gmf(nb_users=ML_20M_USERS, nb_items=ML_20M_ITEMS, mf_dim=models.DEFAULT_FACTORS,
        checkpoint=None, device='cpu', impl='auto'):
    """GMF, NeuMF's GMF branch alone (as neumf() for the arguments)."""
    return _build('gmf', nb_users, nb_items, mf_dim, models.DEFAULT_LAYERS, 0.0, checkpoint,
                  device, impl)


def mlp(nb_users=ML_20M_USERS, nb_items=ML_20M_ITEMS, mlp_layer_sizes=models.DEFAULT_LAYERS,
        dropout=models.DEFAULT_DROPOUT, checkpoint=None, device='cpu', impl='auto'):
    """MLP, NeuMF's MLP branch alone (as neumf() for the arguments)."""
    return _build('mlp', nb_users, nb_items, models.DEFAULT_FACTORS, mlp_layer_sizes, dropout,
                  checkpoint, device, impl)


def mf(nb_users=ML_20M_USERS, nb_items=ML_20M_ITEMS, mf_dim=models.DEFAULT_FACTORS,
       checkpoint=None, device='cpu', impl='auto'):
    """Dot-product matrix factorisation with biases (as neumf() for the arguments)."""
    return _build('mf', nb_users, nb_items, mf_dim, models.DEFAULT_LAYERS, 0.0, checkpoint,
                  device, impl)


def from_checkpoint(checkpoint, device='cpu', impl='auto'):
    """Whichever model of the family `checkpoint` holds, with its weights."""
    return _build(None, None, None, None, None, None, checkpoint, device, impl)
