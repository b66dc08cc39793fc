"""torch.hub entry points: `torch.hub.load('OWNER/ncf', 'neumf', ...)` or, from a clone,
`torch.hub.load('path/to/ncf', 'neumf', source='local', checkpoint='checkpoints/model.pth')`;
likewise 'gmf', 'mlp' and 'mf', and 'from_checkpoint' for whichever model a checkpoint holds.

Everything it imports is in the ncflib package: a caller's own modules named like ours
(`runtime`, `checkpoints`, `utils`, `neumf`...) cannot stand in for them."""
from ncflib import checkpoints, models, runtime
from ncflib.cache import ML_20M_ITEMS, ML_20M_USERS

dependencies = ['torch']
# The entry points' names for the sizes and the model (a checkpoint's refusals name them).
HUB_NAMES = {'model': 'entry point', 'n_users': 'nb_users', 'n_items': 'nb_items',
             'factors': 'mf_dim', 'layers': 'mlp_layer_sizes'}


def _build(model, nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout, checkpoint, device,
           impl):
    """A model of the family on `device`: from `checkpoint` (its model, sizes and weights;
    `model` None: whichever it holds; a size given too must be the checkpoint's) or freshly
    initialised, the sizes not given (None) the reference's."""
    given = {'n_users': nb_users, 'n_items': nb_items, 'factors': mf_dim,
             'layers': None if mlp_layer_sizes is None else list(mlp_layer_sizes)}
    state = None
    if checkpoint is not None:
        state = checkpoints.read(checkpoint)
        shape, nb_users, nb_items = checkpoints.shape_of(state, checkpoint)
        given['model'] = model
        checkpoints.check_given_flags(
            checkpoint, shape, nb_users, nb_items, given,
            {name for name, value in given.items() if value is not None},
            "the model is the checkpoint's: leave the size out, or load 'from_checkpoint' "
            'for whichever model it holds', spelled=HUB_NAMES)
    else:
        shape = models.ModelShape(model, models.DEFAULT_FACTORS if mf_dim is None else mf_dim,
                                  models.DEFAULT_LAYERS if mlp_layer_sizes is None
                                  else mlp_layer_sizes,
                                  models.DEFAULT_DROPOUT if dropout is None else dropout)
        nb_users = ML_20M_USERS if nb_users is None else nb_users
        nb_items = ML_20M_ITEMS if nb_items is None else nb_items
    # the model's own precision, fp32: nothing to measure
    plan = runtime.resolve(runtime.PlanOptions(device=device, impl=impl, precision='fp32'),
                           shape)
    built = plan.build_model(shape, nb_users, nb_items)
    if state is not None:
        checkpoints.load_model_state(built, state, checkpoint)
    return built.to(plan.device)


def neumf(nb_users=None, nb_items=None, mf_dim=None, mlp_layer_sizes=None, dropout=None,
          checkpoint=None, device='cpu', impl='auto'):
    """NeuMF as in the reference recipe, on `device`. Sizes not given are the reference's:
    ML-20m's tables (138,493 users, 26,744 items), mf_dim 64, mlp_layer_sizes (256, 256, 128,
    64), dropout 0.5.

    device: 'cpu', 'cuda' (cuda:0), 'cuda:N' or a torch.device of these; CUDA where there is
    none, a GPU the machine lacks or another device type is a UsageError (one line), as are
    sizes no model can have (nb_users=-5, an odd first layer, dropout 1).
    checkpoint: path to a model.pth or last.pth written by ncf.py (or the reference); the table
    sizes, factors and layers then come from it (one given too must be the checkpoint's) and
    its weights are loaded. impl: the implementation's model class, as ncf.py's --impl (all
    take the same weights).
    """
    return _build('neumf', nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout, checkpoint,
                  device, impl)


def gmf(nb_users=None, nb_items=None, mf_dim=None, checkpoint=None, device='cpu', impl='auto'):
    """GMF, NeuMF's GMF branch alone (as neumf() for the arguments)."""
    return _build('gmf', nb_users, nb_items, mf_dim, None, 0.0, checkpoint, device, impl)


def mlp(nb_users=None, nb_items=None, mlp_layer_sizes=None, dropout=None, checkpoint=None,
        device='cpu', impl='auto'):
    """MLP, NeuMF's MLP branch alone (as neumf() for the arguments)."""
    return _build('mlp', nb_users, nb_items, None, mlp_layer_sizes, dropout, checkpoint, device,
                  impl)


def mf(nb_users=None, nb_items=None, mf_dim=None, checkpoint=None, device='cpu', impl='auto'):
    """Dot-product matrix factorisation with biases (as neumf() for the arguments)."""
    return _build('mf', nb_users, nb_items, mf_dim, None, 0.0, checkpoint, device, impl)


def from_checkpoint(checkpoint, device='cpu', impl='auto'):
    """Whichever model of the family `checkpoint` holds, with its weights."""
    return _build(None, None, None, None, None, None, checkpoint, device, impl)
