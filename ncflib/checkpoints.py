"""Checkpoints: reading, checking and saving `model.pth` (the best model's state dict, as the
reference) and `last.pth` (everything --resume needs), and the directory that holds them with
the run's log. Written atomically, read with `torch.load(weights_only=True)`."""
import os

import torch

from ncflib.cli import UsageError, first_line
from ncflib.files import DirectoryLock, atomic_torch_save, lock_holder, torch_load
from ncflib.training import History

# A training run's files in its checkpoint directory.
BEST_MODEL_FILE = 'model.pth'      # state dict of the best model so far, as the reference
LAST_CHECKPOINT_FILE = 'last.pth'  # everything --resume needs, after every epoch
LOG_FILE = 'log.json'              # the JSON log, where no --log_path says otherwise
# Where a model.pth keeps the fingerprint of its data: in the state dict's own metadata, which
# load_state_dict ignores, so that the file stays a plain state dict the reference loads.
FINGERPRINT_KEY = 'ncf_data_fingerprint'


class CheckpointDirectory:
    """Where a training run keeps its checkpoints (and, by default, its log), and what it has
    kept there so far: the line a run stopped by Ctrl-C, SIGTERM or a full disk ends with says
    so. An empty `path`: no checkpoints."""

    def __init__(self, path):
        self.path = path or ''
        self.best = os.path.join(self.path, BEST_MODEL_FILE)
        self.last = os.path.join(self.path, LAST_CHECKPOINT_FILE)
        self.log = os.path.join(self.path, LOG_FILE)
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
    """Load the model weights of a checkpoint into `model`, checking names and shapes."""
    state = model_state(state, path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(f'checkpoint {path} is not a NeuMF of these --layers: '
                         f'missing {missing[:3]}, unexpected {unexpected[:3]}')
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


def shapes_of(state, path):
    """(nb_users, nb_items, mf_dim, mlp_layer_sizes) of the NeuMF in a checkpoint."""
    state = model_state(state, path)
    try:
        nb_users, mf_dim = state['mf_user_embed.weight'].shape
        nb_items = state['mf_item_embed.weight'].shape[0]
        layers = [state['mlp_user_embed.weight'].shape[1] * 2]
        while f'mlp.{len(layers) - 1}.weight' in state:
            layers.append(state[f'mlp.{len(layers) - 1}.weight'].shape[0])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UsageError(f'checkpoint {path} is not a NeuMF state dict') from None
    return nb_users, nb_items, mf_dim, layers


def save_model(model, path, fingerprint):
    """The best model, as the reference saves it: a plain state dict, with the fingerprint of
    the data it was trained on in the state dict's metadata."""
    state = model.state_dict()
    state._metadata[''][FINGERPRINT_KEY] = fingerprint
    atomic_torch_save(state, path)


def save_training_state(path, trainer, generator, history, settings, fingerprint):
    """last.pth: all that --resume needs to continue as if never stopped: the trainer's model,
    optimizer and loss scaler, every random state, the history (training.History) and the
    run's settings (training.RunSettings)."""
    atomic_torch_save({
        'model': trainer.model.state_dict(), 'optimizer': trainer.optimizer.state_dict(),
        'scaler': trainer.scaler.state_dict(), 'history': history.state_dict(),
        'settings': settings.state_dict(),
        'rng': {**trainer.plan.rng_state(), 'data': generator.get_state().cpu()},
        'data_fingerprint': fingerprint,
    }, path)


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


def restore_training_state(state, path, trainer, generator):
    """The trainer's optimizer and loss scaler, and every random state, from a last.pth (whose
    model the trainer's model has loaded); returns its training.History."""
    try:
        trainer.optimizer.load_state_dict(state['optimizer'])
        trainer.scaler.load_state_dict(state['scaler'])
        trainer.plan.set_rng_state(state['rng'])
        generator.set_state(state['rng']['data'].to(generator.get_state().device))
        return History(**state['history'])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UsageError(f'{path} is not a resumable checkpoint of this run: '
                         f'{first_line(error)}') from None
