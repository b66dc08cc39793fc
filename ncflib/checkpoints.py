"""Checkpoints: reading, checking and saving `model.pth` (the best model's state dict, as the
reference) and `last.pth` (everything --resume needs), and the directory that holds them with
the run's log. Written atomically, read with `torch.load(weights_only=True)`."""
import os

import torch

from ncflib.cli import UsageError, first_line
from ncflib.files import LOCK_FILE, DirectoryLock, atomic_torch_save, lock_holder, torch_load
from ncflib.models import DEFAULT_DROPOUT, MODEL_CLASSES, ModelShape
from ncflib.sparse_updates import SPARSE_OPTIMIZERS
from ncflib.training import History

# A training run's files in its checkpoint directory.
BEST_MODEL_FILE = 'model.pth'      # state dict of the best model so far, as the reference
LAST_CHECKPOINT_FILE = 'last.pth'  # everything --resume needs, after every epoch
LOG_FILE = 'log.json'              # the JSON log, where no --log_path says otherwise
# Where a model.pth keeps the fingerprint of its data and its model (ModelShape.record()): in
# the state dict's own metadata, which load_state_dict ignores, so that the file stays a plain
# state dict the reference loads. last.pth keeps them as entries of its dict.
FINGERPRINT_KEY = 'ncf_data_fingerprint'
MODEL_KEY = 'ncf_model'


class CheckpointDirectory:
    """Where a training run keeps its checkpoints (and, by default, its log), and what it has
    kept there so far: the line a run stopped by Ctrl-C, SIGTERM or a full disk ends with says
    so. An empty `path`: no checkpoints."""

    def __init__(self, path):
        self.path = path or ''
        self.best = os.path.join(self.path, BEST_MODEL_FILE)
        self.last = os.path.join(self.path, LAST_CHECKPOINT_FILE)
        self.log = os.path.join(self.path, LOG_FILE)
        self.lock_file = os.path.join(self.path, LOCK_FILE)
        self.locked = False     # the run holds the directory: from here on it may write there
        self.saved_epoch = None  # the epoch of the last.pth this run wrote or resumed from

    def __bool__(self):
        return bool(self.path)

    def holder(self):
        """Who holds the directory's lock now (a run writing there), or None."""
        return lock_holder(self.path)

    def lock(self):
        """The directory's lock, for the run that writes there (one run per directory); makes
        the directory where it is missing."""
        os.makedirs(self.path, exist_ok=True)
        lock = DirectoryLock(self.path, 'one training run per --checkpoint_dir')
        self.locked = True
        return lock

    def kept(self):
        """What a run stopped now leaves behind."""
        if not self.locked:
            return 'nothing was written'
        if self.saved_epoch is None:
            return f'no epoch finished: {self.path} holds no checkpoint of this run'
        return f'{self.last} from epoch {self.saved_epoch} kept (--resume continues from it)'


def read(path):
    """The object saved at `path`; UsageError (one line) if it is missing or not a checkpoint."""
    if os.path.isdir(path):
        raise UsageError(f'checkpoint {path} is a directory, not a checkpoint file (model.pth '
                         'or last.pth in it?)')
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path} does not exist')
    if os.path.getsize(path) == 0:
        raise UsageError(f'checkpoint {path} is empty (0 bytes)')
    return torch_load(path, 'checkpoint', map_location='cpu')


def model_state(state, path):
    """The model's state dict inside a model.pth, a last.pth or a DDP run's file ('module.'
    prefixes removed)."""
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']  # a last.pth
    if not isinstance(state, dict):
        raise UsageError(f'checkpoint {path} holds no state dict')
    return {key.removeprefix('module.'): value for key, value in state.items()}


def load_model_state(model, state, path):
    """Load the model weights of a checkpoint into `model`, checking model, names and shapes."""
    state = model_state(state, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        try:
            held = f'--model {shape_of(state, path)[0].describe()}'
        except UsageError:
            held = 'no model of the family'
        raise UsageError(f'checkpoint {path} holds {held}, not --model {type(model).NAME} of '
                         f'these sizes (missing {missing[:3]}, unexpected {unexpected[:3]})')
    for key, value in expected.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            have = list(state[key].shape) if isinstance(state[key], torch.Tensor) else state[key]
            raise UsageError(f'checkpoint {path} does not fit this model and data: {key} is '
                             f'{have} there, {list(value.shape)} here')
    broken = [key for key, value in state.items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:
        raise UsageError(f'checkpoint {path} holds weights that are not finite (NaN or '
                         f'infinite) in {", ".join(broken[:3])}: not a usable model')
    model.load_state_dict(state)


def recorded_model(state):
    """What a checkpoint records of its model (ModelShape.record()), or None (the reference's
    checkpoints and older ones)."""
    if isinstance(state, dict) and isinstance(state.get('model_shape'), dict):
        return state['model_shape']  # a last.pth
    metadata = getattr(state, '_metadata', None) or {}
    recorded = (metadata.get('') or metadata.get('module') or {}).get(MODEL_KEY)
    return recorded if isinstance(recorded, dict) else None


def shape_of(state, path):
    """(models.ModelShape, n_users, n_items) of the model in a checkpoint: its model as it
    records it, else as its parameter names say (the reference's model.pth: a NeuMF), and its
    sizes from its tensors."""
    recorded = recorded_model(state)
    state = model_state(state, path)
    try:
        if recorded is not None:
            model = recorded['model']
        elif 'user_bias.weight' in state:
            model = 'mf'
        else:
            model = {(True, True): 'neumf', (True, False): 'gmf', (False, True): 'mlp'}[
                ('mf_user_embed.weight' in state, 'mlp_user_embed.weight' in state)]
        model_class = MODEL_CLASSES[model]
        tables = 'mf_user_embed.weight' if model_class.HAS_GMF else 'mlp_user_embed.weight'
        n_users = state[tables].shape[0]
        n_items = state[tables.replace('user', 'item')].shape[0]
        shape = {'model': model}
        if model_class.HAS_GMF:
            shape['factors'] = state['mf_user_embed.weight'].shape[1]
        if model_class.HAS_MLP:
            layers = [state['mlp_user_embed.weight'].shape[1] * 2]
            while f'mlp.{len(layers) - 1}.weight' in state:
                layers.append(state[f'mlp.{len(layers) - 1}.weight'].shape[0])
            shape.update(layers=layers, dropout=(recorded or {}).get('dropout', DEFAULT_DROPOUT))
        return ModelShape(**shape), n_users, n_items
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, UsageError):
        raise UsageError(f'checkpoint {path} holds no model of the family (neumf, gmf, mlp, mf) '
                         'that ncf.py writes') from None


def check_given_flags(path, shape, n_users, n_items, flags, given, why, spelled=None):
    """Where the checkpoint `path` (holding a model of `shape` over `n_users` and `n_items`)
    says what the model is, a model flag (model, n_users, n_items, factors, layers) given by
    the caller (`given`: their names; `flags`: {name: value}) must agree with it (one line,
    ending with `why` the checkpoint decides). spelled: {name: how the caller writes it}
    (default: --name)."""
    held = {'model': shape.model, 'n_users': n_users, 'n_items': n_items,
            'factors': shape.factors if shape.uses_factors else None,
            'layers': list(shape.layers) if shape.uses_layers else None}
    for name, value in held.items():
        if name in given and value is not None and flags[name] != value:
            shown = ' '.join(map(str, flags[name])) if isinstance(flags[name], list) \
                else flags[name]
            flag = (spelled or {}).get(name, f'--{name}')
            raise UsageError(f'{flag} {shown}, but {path} holds --model {shape.describe()} '
                             f'over {n_users} users and {n_items} items: {why}')


def save_model(model, path, fingerprint, shape):
    """The best model, as the reference saves it: a plain state dict, with the fingerprint of
    the data it was trained on and its model (`shape`, a models.ModelShape) in the state
    dict's metadata."""
    state = model.state_dict()
    state._metadata[''][FINGERPRINT_KEY] = fingerprint
    state._metadata[''][MODEL_KEY] = shape.record()
    atomic_torch_save(state, path)


def save_training_state(path, trainer, generator, history, settings, fingerprint, shape):
    """last.pth: all that --resume needs to continue as if never stopped: the trainer's model,
    optimizer and loss scaler, every random state, the history (training.History), the run's
    settings (training.RunSettings) and its model (a models.ModelShape)."""
    atomic_torch_save({
        'model': trainer.model.state_dict(), 'optimizer': trainer.optimizer.state_dict(),
        'table_optimizer': (trainer.sparse.optimizer.state_dict()
                            if trainer.sparse is not None else None),
        'scaler': trainer.scaler.state_dict(), 'history': history.state_dict(),
        'settings': settings.state_dict(), 'model_shape': shape.record(),
        'rng': {**trainer.plan.rng_state(), 'data': generator.get_state().cpu()},
        'data_fingerprint': fingerprint,
    }, path)


def load_pretrained(model, shape, pretrained, alpha, dataset, allow_other_data, say):
    """Start `model`, a NeuMF of `shape`, from a trained GMF and a trained MLP, as the NCF paper
    (NeuMF.load_branches). pretrained: {'gmf': (state, path), 'mlp': (state, path)}. Each must
    be that model, of this NeuMF's sizes and trained on `dataset` (one line if not)."""
    branches = {}
    for kind, (state, path) in pretrained.items():
        held, n_users, n_items = shape_of(state, path)
        sizes = {'gmf': ('factors', held.factors, shape.factors),
                 'mlp': ('layers', list(held.layers), list(shape.layers))}[kind]
        if held.model != kind:
            raise UsageError(f'--pretrained_{kind} {path} holds --model {held.describe()}, not '
                             f'{kind}')
        if sizes[1] != sizes[2]:
            raise UsageError(f'--pretrained_{kind} {path} has {sizes[0]} {sizes[1]}, this NeuMF '
                             f'--{sizes[0]} {sizes[2]}')
        if (n_users, n_items) != (dataset.n_users, dataset.n_items):
            raise UsageError(f'--pretrained_{kind} {path} has {n_users} users and {n_items} '
                             f'items, --data {dataset.n_users} and {dataset.n_items}: it was '
                             'trained on other data')
        check_data(state, f'--pretrained_{kind} {path}', dataset, allow_other_data, say)
        branches[kind] = held.build(n_users, n_items)
        load_model_state(branches[kind], state, path)
    model.load_branches(branches['gmf'], branches['mlp'], alpha)


def fingerprint_of(state):
    """The data fingerprint a checkpoint records (model.pth or last.pth), or None."""
    if isinstance(state, dict) and 'data_fingerprint' in state:
        return state['data_fingerprint']
    metadata = getattr(state, '_metadata', None) or {}
    return (metadata.get('') or metadata.get('module') or {}).get(FINGERPRINT_KEY)


def check_data(state, path, dataset, allow_other_data, say):
    """Refuse a checkpoint trained on other data than `dataset` (one line), unless told to; a
    checkpoint or a cache without a fingerprint passes with a notice, and so does one trained
    on a cache of the same ratings and ids converted before the fingerprint covered the split."""
    trained_on = fingerprint_of(state)
    if trained_on is None:
        say(f'Notice: {path} records no data fingerprint (the reference\'s checkpoints and '
            'older ones do not): not checked against the data')
    elif dataset.fingerprint is None:
        say('Notice: the cache records no data fingerprint (convert.py before cache version '
            f'2): {path} is not checked against it')
    elif trained_on == dataset.fingerprint:
        return
    elif trained_on == dataset.fingerprint_without_split:
        say(f'Notice: {path} was trained on a cache of these ratings and ids converted before '
            'the fingerprint covered the split (cache version 2): its training pairs are not '
            'checked')
    elif not allow_other_data:
        raise UsageError(f'{path} was trained on other data (fingerprint {trained_on}) than '
                         f'--data (fingerprint {dataset.fingerprint}); --allow_other_data uses '
                         'it anyway')
    else:
        say(f'Notice: {path} was trained on other data (fingerprint {trained_on}, the data '
            f'{dataset.fingerprint}): used anyway, as --allow_other_data says')


def check_settings(state, path, settings, allow_changed_settings, say):
    """--resume continues the checkpoint's run: a setting that changes what it computes
    (`settings`, a training.RunSettings) is refused (one line naming them), unless told to."""
    saved = state.get('settings') or state.get('args')  # 'args': before RunSettings
    if not isinstance(saved, dict):
        return
    ours = settings.state_dict()
    changed = [f'--{name} {saved[name]} -> {ours[name]}' for name in ours
               if name in saved and saved[name] != ours[name]]
    if changed and not allow_changed_settings:
        raise UsageError(f'--resume with other settings than {path}\'s run: '
                         f'{", ".join(changed)}; --allow_changed_settings resumes anyway')
    if changed:
        say(f'Notice: resuming with changed settings ({", ".join(changed)}), as '
            '--allow_changed_settings says')


def restore_training_state(state, path, trainer, generator, seed, say):
    """The trainer's optimizer and loss scaler, and every random state, from a last.pth (whose
    model the trainer's model has loaded); returns its training.History. What the run may
    change on resume is taken from this run, with a notice where it cannot continue the
    checkpoint's: another optimizer (or other parameter groups) starts its state afresh, the
    hyperparameters are this run's, loss scaling that the checkpoint's precision had not
    starts afresh, and the data's random state of another device type (CUDA's and the CPU's
    generators differ) is seeded anew from `seed` and the epoch."""
    try:
        history = History(**state['history'])
        # checkpoints from before --optimizer trained with Adam
        trained_with = (state.get('settings') or {}).get('optimizer', 'adam')
        restore_optimizer(trainer.optimizer, state['optimizer'], trained_with, path, say)
        if trainer.sparse is not None and state.get('table_optimizer') is not None:
            restore_optimizer(trainer.sparse.optimizer, state.get('table_optimizer'),
                              SPARSE_OPTIMIZERS[trained_with], path, say)
        if state['scaler'] or not trainer.scaler.is_enabled():
            trainer.scaler.load_state_dict(state['scaler'])
        else:
            say(f'Notice: {path} was trained without loss scaling (not in fp16): it starts '
                'afresh')
        trainer.plan.set_rng_state(state['rng'])
        saved = state['rng']['data']
        if saved.numel() == generator.get_state().numel():
            generator.set_state(saved.to(generator.get_state().device))
        else:
            generator.manual_seed(seed * 1_000_003 + history.epoch + 1)
            say(f'Notice: {path} drew its data on another device type: the epochs from here '
                'draw from a seed of --seed and the epoch (the same on every rerun, not the '
                "checkpoint's own sequence)")
        return history
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise UsageError(f'{path} is not a resumable checkpoint of this run: '
                         f'{first_line(error)}') from None


def restore_optimizer(optimizer, saved, trained_with, path, say):
    """The optimizer state of a last.pth, of the optimizer `trained_with` ('adam', 'sgd'; for
    sparse updates' tables 'LazyAdam', 'LazySGD'), into `optimizer`, keeping `optimizer`'s own
    hyperparameters (this run's flags: a changed learning rate takes effect). A state of
    another optimizer or of other parameter groups (--optimizer, --weight_decay or
    --embedding_updates changed) is not loaded: the optimizer starts afresh, with a notice."""
    sizes = [len(group['params']) for group in saved['param_groups']]
    if trained_with.lower() != type(optimizer).__name__.lower() or \
            sizes != [len(group['params']) for group in optimizer.param_groups]:
        say(f'Notice: {path} holds the state of another optimizer or of other parameter '
            'groups (--optimizer, --weight_decay or --embedding_updates changed): the '
            'optimizer starts afresh')
        return
    ours = [{name: value for name, value in group.items() if name != 'params'}
            for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, ours):
        group.update(settings)
