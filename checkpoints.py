"""Checkpoints: reading, checking and saving `model.pth` (the best model's state dict, as the
reference) and `last.pth` (everything --resume needs). Written atomically, read with
`torch.load(weights_only=True)`."""
import os

import torch

from utils import UsageError, atomic_torch_save

BEST_MODEL_FILE = 'model.pth'      # state dict of the best model so far, as the reference
LAST_CHECKPOINT_FILE = 'last.pth'  # everything --resume needs, after every epoch


def read(path):
    """The object saved at `path`; UsageError (one line) if it is missing or not a checkpoint."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path} does not exist')
    if os.path.getsize(path) == 0:
        raise UsageError(f'checkpoint {path} is empty (0 bytes)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle...: not a checkpoint of ours
        raise UsageError(f'cannot read checkpoint {path}: '
                         f'{str(error).splitlines()[0][:200]}') from None


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


def save_model(model, path):
    """The best model, as the reference saves it: a plain state dict."""
    atomic_torch_save(model.state_dict(), path)


def save_training_state(path, model, trainer, history, args, plan, generator):
    """last.pth: all that --resume needs to continue as if never stopped."""
    atomic_torch_save({
        'model': model.state_dict(), 'optimizer': trainer.optimizer.state_dict(),
        'scaler': trainer.scaler.state_dict(), 'history': history, 'args': vars(args),
        'rng': {**plan.rng_state(), 'data': generator.get_state().cpu()},
    }, path)


def restore_training_state(state, path, trainer, plan, generator):
    """Optimizer, loss scaler and random states from a last.pth; returns its history."""
    try:
        trainer.optimizer.load_state_dict(state['optimizer'])
        trainer.scaler.load_state_dict(state['scaler'])
        plan.set_rng_state(state['rng'])
        generator.set_state(state['rng']['data'].to(generator.get_state().device))
        return state['history']
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UsageError(f'{path} is not a resumable checkpoint of this run: '
                         f'{str(error).splitlines()[0][:200]}') from None
