"""Hyperparameter search over the NCF family, built on Optuna: the search spaces, the study in
Optuna's RDB storage (created, or continued only on the same data, space and objective), the
trials counted towards the total asked for, and a trial: a training run of the library, in
process, on the validation holdout alone. tune.py is the command-line flow around it.

A trial is what `ncf.py` runs with the fixed flags and the trial's parameters (its seed, its
checkpoints, its one-line failures), minus the test set: the data is loaded once per worker
without it (dataloading.load_dataset(with_test=False)) and the plan resolved once. Only when the
search has ended is the best trial's model tested, once (tune.py).
"""
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shlex
import socket
import sys
import warnings

import optuna
import torch

import dataloading
from ncflib import checkpoints, experiment
from ncflib.cli import UsageError, excerpt, warn
from ncflib.evaluation import Evaluation
from ncflib.files import atomic_write
from ncflib.flags import check_args, check_args_against_data, check_free_items, parse_args
from ncflib.models import ModelShape
from ncflib.training import OPTIMIZERS, RunSettings, Trainer

# The flags a search space may hold, and the type of their values ('layers': a list of sizes).
SPACE_FLAGS = {'learning_rate': float, 'factors': int, 'layers': 'layers', 'dropout': float,
               'negative_samples': int, 'embedding_l2': float, 'weight_decay': float,
               'batch_size': int, 'optimizer': str, 'beta1': float, 'beta2': float}

# Ranges wide enough for the published optima on MovieLens (the NCF paper; Rendle et al. 2020)
# and narrow enough for a few dozen trials. The learning rate's range depends on the optimizer
# (SGD needs larger steps). weight_decay acts on dense layers only (MF has none); embedding_l2's
# lower end is zero for practical purposes (a log range cannot hold 0).
_COMMON = {
    'optimizer': {'choices': ['adam', 'sgd']},
    'learning_rate': {'adam': {'low': 1e-4, 'high': 1e-2, 'log': True},
                      'sgd': {'low': 1e-3, 'high': 1.0, 'log': True}},
    'negative_samples': {'low': 1, 'high': 10},
    'embedding_l2': {'low': 1e-8, 'high': 1e-2, 'log': True},
    'batch_size': {'choices': [512, 1024, 2048, 4096]},
}
_FACTORS = {'factors': {'choices': [8, 16, 32, 64, 128]}}
_MLP = {'layers': {'choices': ['64 32 16', '128 64 32', '256 128 64', '256 256 128 64']},
        'dropout': {'low': 0.0, 'high': 0.5}}
_DECAY = {'weight_decay': {'low': 1e-8, 'high': 1e-2, 'log': True}}
DEFAULT_SPACES = {'neumf': {**_COMMON, **_FACTORS, **_MLP, **_DECAY},
                  'gmf': {**_COMMON, **_FACTORS, **_DECAY},
                  'mlp': {**_COMMON, **_MLP, **_DECAY},
                  'mf': {**_COMMON, **_FACTORS}}

# What the objective maximises: a validation figure of the trial's best epoch.
OBJECTIVES = experiment.SELECTION_METRICS
# A tuning run's own flags: ncf.py's that tune.py sets per trial or that have no place in one.
NOT_IN_A_TRIAL = ('mode', 'checkpoint_dir', 'load_checkpoint_path', 'resume',
                  'allow_changed_settings', 'overwrite_checkpoints', 'allow_other_data',
                  'log_path', 'tensorboard', 'pretrained_gmf', 'pretrained_mlp', 'alpha',
                  'users', 'users_file', 'output', 'ranks_output', 'local_rank')
# The user attribute of a study that says what it searches (tune.py refuses to continue a study
# whose differs), and of a trial that failed by itself (its own one-line reason; such a trial
# counts towards the total, unlike one whose worker was killed or interrupted: that one is
# retried).
IDENTITY_ATTR = 'ncf_search'
FAILURE_ATTR = 'failure'
TEST_ATTR = 'ncf_test'  # the study's: the best trial's test figures, once tested
# A running trial without a heartbeat this long past the grace period is a killed worker's
# (a live one beats within milliseconds of starting it): generous for clocks that differ.
ORPHAN_SECONDS = 300
STATES = optuna.trial.TrialState

# tune.py prints a line per trial: Optuna's own log (a failed trial's traceback) would repeat it
optuna.logging.set_verbosity(optuna.logging.ERROR)


@contextlib.contextmanager
def quiet_experimental():
    """Without Optuna's notices that the heartbeat and its callbacks are experimental (they are
    the documented way to recover a killed worker's trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        yield


# Search spaces -------------------------------------------------------------------------------

def read_space(path):
    """A search space from a JSON or YAML file (by its extension), checked."""
    try:
        with open(path, encoding='utf-8') as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f'--space {path}: cannot read it ({error})') from None
    try:
        if path.endswith(('.yaml', '.yml')):
            import yaml
            space = yaml.safe_load(text)
        else:
            space = json.loads(text)
    except Exception as error:  # the parsers' own errors: one line naming the file
        raise UsageError(f'--space {path} is not valid '
                         f'{"YAML" if path.endswith(("yaml", "yml")) else "JSON"}: '
                         f'{excerpt(str(error).splitlines()[0], 200)}') from None
    return check_space(space, f'--space {path}')


def check_space(space, source):
    """The space in a normal form ({flag: spec}: a fixed value, {'choices': [...]}, {'low',
    'high', 'log'?}, or {optimizer: one of those} where the range depends on the optimizer), or
    a UsageError naming the flag. Layers are strings of sizes ('256 128 64')."""
    if not isinstance(space, dict) or not space:
        raise UsageError(f'{source}: a search space is a mapping of flags to ranges, choices or '
                         'values')
    normal = {}
    for flag, spec in space.items():
        if flag not in SPACE_FLAGS:
            raise UsageError(f'{source}: {flag} is not a flag a search can vary (one of '
                             f'{", ".join(SPACE_FLAGS)})')
        if isinstance(spec, dict) and spec and set(spec) <= set(OPTIMIZERS):
            if flag == 'optimizer':
                raise UsageError(f'{source}: optimizer cannot depend on itself')
            normal[flag] = {name: _check_spec(flag, inner, f'{source}: {flag} ({name})')
                            for name, inner in spec.items()}
        else:
            normal[flag] = _check_spec(flag, spec, f'{source}: {flag}')
    conditional = [flag for flag, spec in normal.items() if by_optimizer(spec)]
    if conditional:
        choices = _values(normal.get('optimizer', {'value': 'adam'}))
        missing = [name for name in choices for flag in conditional
                   if name not in normal[flag]]
        if missing:
            raise UsageError(f'{source}: {conditional[0]} has no range for optimizer '
                             f'{missing[0]}')
    return normal


def by_optimizer(spec):
    return set(spec) <= set(OPTIMIZERS)


def _values(spec):
    return spec['choices'] if 'choices' in spec else [spec['value']]


def _check_spec(flag, spec, where):
    kind = SPACE_FLAGS[flag]
    if isinstance(spec, dict) and 'choices' in spec:
        if set(spec) != {'choices'} or not isinstance(spec['choices'], list) \
                or not spec['choices']:
            raise UsageError(f'{where}: choices is a non-empty list, alone')
        return {'choices': [_check_value(flag, value, where) for value in spec['choices']]}
    if isinstance(spec, dict):
        if kind in (str, 'layers') or not {'low', 'high'} <= set(spec) \
                or not set(spec) <= {'low', 'high', 'log'}:
            raise UsageError(f'{where}: give choices: [...], a value, or low and high (and log: '
                             'true)' if kind not in (str, 'layers') else
                             f'{where}: give choices: [...] or a value')
        low, high = (_check_value(flag, spec[end], where) for end in ('low', 'high'))
        log = spec.get('log', False)
        if not isinstance(log, bool):
            raise UsageError(f'{where}: log is true or false')
        if not low <= high or (log and low <= 0):
            raise UsageError(f'{where}: needs low <= high{" and low > 0 (log)" * log}')
        return {'low': low, 'high': high, 'log': log}
    return {'value': _check_value(flag, spec, where)}


def _check_value(flag, value, where):
    kind = SPACE_FLAGS[flag]
    if kind == 'layers':
        sizes = value.split() if isinstance(value, str) else value
        if not isinstance(sizes, list) or not sizes or not all(
                isinstance(size, int) and not isinstance(size, bool) and size > 0 or
                isinstance(size, str) and size.isdigit() and int(size) > 0 for size in sizes):
            raise UsageError(f'{where}: layers are positive sizes, as "256 128 64" or a list, '
                             f'not {value!r}')
        return ' '.join(str(int(size)) for size in sizes)
    if kind is str:
        if value not in OPTIMIZERS:
            raise UsageError(f'{where}: {value!r} is not an optimizer ({", ".join(OPTIMIZERS)})')
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and value != int(value)) or not math.isfinite(value):
        raise UsageError(f'{where}: {value!r} is not {"an integer" if kind is int else "a number"}')
    return kind(value)


def suggest(trial, space):
    """The trial's values of the space's flags ({flag: value}), the optimizer first (other
    ranges may depend on it). No trial: a point of the space (first choices, low ends), to check
    the fixed flags with before any trial."""
    values = {}
    order = sorted(space, key=lambda flag: flag != 'optimizer')
    for flag in order:
        spec = space[flag]
        if by_optimizer(spec):
            spec = spec[values.get('optimizer', 'adam')]
        if 'value' in spec:
            values[flag] = spec['value']
        elif trial is None:
            values[flag] = spec['choices'][0] if 'choices' in spec else spec['low']
        elif 'choices' in spec:
            values[flag] = trial.suggest_categorical(flag, spec['choices'])
        elif SPACE_FLAGS[flag] is int:
            values[flag] = trial.suggest_int(flag, spec['low'], spec['high'], log=spec['log'])
        else:
            values[flag] = trial.suggest_float(flag, spec['low'], spec['high'], log=spec['log'])
    return values


def flag_argv(values):
    """ncf.py's flags for {flag: value}."""
    argv = []
    for flag, value in values.items():
        if flag == 'layers':
            argv += [f'--{flag}', *value.split()]
        else:  # repr: a float's every digit, so that the command trains the very trial
            argv += [f'--{flag}', repr(value) if isinstance(value, float) else str(value)]
    return argv


def check_fixed_flags(args, space):
    """The flags tune.py passes on to every trial: none of a run's own places or modes, and
    none the space varies."""
    for flag in NOT_IN_A_TRIAL:
        if flag in args.given:
            raise UsageError(f'--{flag} has no place in a search (tune.py sets each trial\'s '
                             'checkpoints and log; --output is where the search leaves them)')
    varied = [flag for flag in space if flag in args.given and 'value' not in space[flag]]
    if varied:
        raise UsageError(f'--{varied[0]} is in the search space: leave it out, or give it a '
                         'single value in --space')


# The study -----------------------------------------------------------------------------------

def identity(model, fingerprint, space, metric, fixed_argv):
    """What a study searches: it continues only with the same (tune.py compares them)."""
    return {'model': model, 'data_fingerprint': fingerprint, 'metric': metric,
            'space': space, 'fixed_flags': ' '.join(fixed_argv),
            'space_sha256': hashlib.sha256(json.dumps(space, sort_keys=True).encode())
            .hexdigest()}


def check_identity(study, wanted, shown_storage):
    """Set `wanted` on a new study; refuse one created for another search, naming what
    differs."""
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if recorded is None:
        if study.trials:
            raise UsageError(f'study {study.study_name!r} in {shown_storage} was not made by '
                             'tune.py: give another --study_name')
        study.set_user_attr(IDENTITY_ATTR, wanted)
        return
    for key, what in (('data_fingerprint', 'other data (fingerprint {})'),
                      ('model', 'another model ({})'), ('space_sha256', 'another search space'),
                      ('metric', 'another objective ({})'),
                      ('fixed_flags', 'other fixed flags ({!r})')):
        if recorded.get(key) != wanted[key]:
            shown = recorded.get(key)
            raise UsageError(f'study {study.study_name!r} in {shown_storage} was created for '
                             f'{what.format(shown[:16] if key == "data_fingerprint" else shown)}'
                             f': continue it with the same data and flags, or give another '
                             f'--study_name or --output')


def counted(trial):
    """Whether a finished trial counts towards the total: complete, pruned, or failed by itself
    (not killed, interrupted or surplus: those are retried or dropped)."""
    return trial.state in (STATES.COMPLETE, STATES.PRUNED) or (
        trial.state == STATES.FAIL and FAILURE_ATTR in trial.user_attrs)


def finished_count(study):
    return sum(counted(trial) for trial in study.get_trials(deepcopy=False))


def fail_stale_trials(study, storage, grace):
    """Fail (and retry once) the trials of workers killed outright: Optuna's heartbeat finds
    those that beat; one killed before its first heartbeat never would, so a running trial
    this old gets one now, and is found by a later worker's check once it is stale (a live
    worker's beats on)."""
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    oldest = datetime.datetime.now() - datetime.timedelta(seconds=grace + ORPHAN_SECONDS)
    for trial in study.get_trials(deepcopy=False, states=(STATES.RUNNING,)):
        if trial.datetime_start is not None and trial.datetime_start < oldest:
            storage.record_heartbeat(trial._trial_id)


def is_surplus(study, number, total):
    """Whether trial `number` would go past `total`: as many trials as asked for have
    finished, or run under lower numbers (trial numbers order the workers' trials, so two
    workers never both take the last place)."""
    ahead = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            continue
        if counted(trial) or (trial.state == STATES.RUNNING and trial.number < number):
            ahead += 1
    return ahead >= total


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler (with a constant liar for parallel workers), seeded by `seed` and the
    trial's number: a rerun draws as the first run did, and workers running at once draw apart
    (one seeded sampler per worker would give them all the same first trials)."""

    def __init__(self, seed):
        self.seed, self.samplers = seed, {}

    def _of(self, trial):
        if trial.number not in self.samplers:
            self.samplers[trial.number] = optuna.samplers.TPESampler(
                seed=(self.seed * 1_000_003 + trial.number) % 2 ** 32, constant_liar=True)
        return self.samplers[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self._of(trial).sample_independent(study, trial, name, distribution)

    def before_trial(self, study, trial):
        self._of(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._of(trial).after_trial(study, trial, state, values)
        del self.samplers[trial.number]


def pruner(name, epochs):
    """Optuna's pruner by name: median (stop a trial whose validation figure is below the
    median of earlier trials at the same epoch, once 5 trials have finished and from the third
    epoch), hyperband, or none."""
    if name == 'median':
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min(2, epochs))
    if name == 'hyperband':
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


# A trial -------------------------------------------------------------------------------------

class QuietReport(experiment.Report):
    """A trial's report: its log, and nothing printed (tune.py prints a line per trial)."""

    def say(self, *parts):
        pass


@dataclasses.dataclass
class Search:
    """What every trial of a worker shares: the plan, the data without its test set, the
    exclusion of the training pairs where a trial needs it, the flags fixed for all trials and
    the space, the objective and where the trials go."""
    plan: object
    dataset: dataloading.Dataset
    exclusion: object
    fixed_argv: list
    space: dict
    metric: str
    output: str
    total: int


def trial_args(search, values, directory):
    """ncf.py's parsed flags for a trial (checked as ncf.py checks them)."""
    args = parse_args(search.fixed_argv + flag_argv(values) + ['--checkpoint_dir', directory])
    check_args(args, search.plan)
    check_args_against_data(args, search.dataset)
    if search.exclusion is not None and args.negative_sampling == 'exact':
        check_free_items(args, search.exclusion)
    return args


def trial_directory(output, number):
    return os.path.join(output, 'trials', f'{number:04d}')


def run_trial(search, trial, values):
    """Train the trial's model as ncf.py would, selecting on validation; report each epoch's
    figure to Optuna (which may prune: optuna.TrialPruned); returns the best epoch's figure.
    Leaves the trial's model.pth (its best epoch) and log.json in its directory."""
    plan, dataset = search.plan, search.dataset
    directory = checkpoints.CheckpointDirectory(trial_directory(search.output, trial.number))
    args = trial_args(search, values, directory.path)
    started = plan.time()
    torch.manual_seed(args.seed)
    batches = dataloading.TrainBatches(
        dataset, plan, args.batch_size, args.negative_samples, args.grads_accumulated,
        exclusion=search.exclusion if args.negative_sampling == 'exact' else None,
        popularity=args.negative_sampling == 'popularity')
    if batches.steps == 0:
        raise UsageError(f'--batch_size {args.batch_size} is larger than an epoch '
                         f'({batches.samples} samples)')
    shape = ModelShape(args.model, args.factors, args.layers, args.dropout)
    model = plan.build_model(shape, dataset.n_users, dataset.n_items).to(plan.device)
    trainer = Trainer(plan, model, batches, args.learning_rate, (args.beta1, args.beta2),
                      args.eps, args.optimizer, args.embedding_l2, args.weight_decay,
                      args.embedding_updates)
    validation = Evaluation(plan, dataset, model, args.topk, args.eval_mode, search.exclusion,
                            args.metrics_at, split='validation')

    def on_epoch(epoch, metrics):
        trial.report(getattr(metrics, search.metric), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f'epoch {epoch}')

    trial.set_user_attr('host', socket.gethostname())  # where its checkpoint is
    lock = directory.lock()
    report = QuietReport(plan, directory.log)
    try:
        result = experiment.train(
            trainer, validation, report, args.epochs, args.threshold, args.seed,
            experiment.Saving(directory, RunSettings.of(vars(args)), shape,
                              dataset.fingerprint),
            started, args.metrics_at, select_by=search.metric, on_epoch=on_epoch)
    finally:
        report.close()
        lock.release()
        # a trial never resumes (an interrupted one is retried from the start)
        if os.path.exists(directory.last):
            os.remove(directory.last)
    trial.set_user_attr('best_epoch', result['best_epoch'])
    return result['best_hr']


def describe_trial(trial, metric, topk):
    """The line of a finished trial."""
    name = f'{metric.upper()}@{topk}' if metric != 'mrr' else 'MRR'
    values = ', '.join(f'{flag}={value:.3g}' if isinstance(value, float) else
                       f'{flag}={value}' for flag, value in trial.params.items())
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else float('nan')
    if trial.state == STATES.COMPLETE:
        what = (f'validation {name} = {trial.value:.4f} (epoch '
                f'{trial.user_attrs.get("best_epoch")})')
    elif trial.state == STATES.PRUNED:
        epochs = trial.intermediate_values
        what = (f'pruned after epoch {max(epochs)}: validation {name} = '
                f'{max(epochs.values()):.4f}' if epochs else 'pruned')
    else:
        what = f'failed: {trial.user_attrs.get(FAILURE_ATTR, "stopped")}'
    return f'Trial {trial.number} {what} in {seconds:.1f} s; {values}'


def trial_rows(study, metric):
    """The finished trials as table rows (dicts), by number."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not counted(trial):
            continue
        steps = trial.intermediate_values
        value = trial.value if trial.state == STATES.COMPLETE else (
            max(steps.values()) if steps else None)
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        rows.append({'trial': trial.number, 'state': trial.state.name.lower(),
                     f'valid_{metric}': value, 'best_epoch': trial.user_attrs.get('best_epoch'),
                     'epochs': (max(steps) + 1) if steps else 0, 'seconds': seconds,
                     **trial.params, 'failure': trial.user_attrs.get(FAILURE_ATTR, '')})
    return rows


def ncf_command(fixed_argv, values):
    """The ncf.py command line that trains a trial again (its validation figures epoch by epoch
    and, with the test set, its test figure)."""
    return shlex.join(['python', 'ncf.py', *fixed_argv, *flag_argv(values)])




def progress_bar(total, done):
    """tqdm over the trials on a terminal; else its write and update print the lines alone."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=done, unit='trial')

    class Lines:
        def write(self, line):
            print(line, flush=True)

        def update(self):
            pass

        def close(self):
            pass
    return Lines()


def write_tables(rows, output):
    """trials.csv and trials.md in `output`: one row per finished trial."""
    columns = list(dict.fromkeys(name for row in rows for name in row))

    def cell(value):
        if value is None:
            return ''
        return f'{value:.6g}' if isinstance(value, float) else str(value)

    def write_csv(path):
        with open(path, 'w', newline='') as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows({name: cell(row.get(name)) for name in columns} for row in rows)

    def write_markdown(path):
        lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
        lines += ['| ' + ' | '.join(cell(row.get(name)).replace('|', '\\|')
                                    for name in columns) + ' |' for row in rows]
        with open(path, 'w') as file:
            file.write('\n'.join(lines) + '\n')
    atomic_write(os.path.join(output, 'trials.csv'), write_csv)
    atomic_write(os.path.join(output, 'trials.md'), write_markdown)


def plot_history(rows, metric, path):
    """Each finished trial's validation figure and the best so far, by trial number (with
    matplotlib; without it, a notice)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        warn('no matplotlib, no history.png (pip install matplotlib)')
        return
    points = [(row['trial'], row[f'valid_{metric}'], row['state']) for row in rows
              if row[f'valid_{metric}'] is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    for state, marker in (('complete', 'o'), ('pruned', 'x')):
        chosen = [(number, value) for number, value, kind in points if kind == state]
        if chosen:
            axes.scatter(*zip(*chosen), marker=marker, label=state)
    complete = sorted((number, value) for number, value, kind in points if kind == 'complete')
    if complete:
        best, running = [], -math.inf
        for number, value in complete:
            running = max(running, value)
            best.append((number, running))
        axes.step(*zip(*best), where='post', label='best so far')
    axes.set_xlabel('trial')
    axes.set_ylabel(f'validation {metric}')
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format='png'))
    plt.close(figure)


def describe_best(summary, topk):
    """The closing line: the best trial, its validation and test figures, its command."""
    metric = summary['metric']
    name = 'mrr' if metric == 'mrr' else f'{metric}@{topk}'
    shown = name.upper()
    valid, test = summary['validation'], summary['test']
    return (f'Best of {summary["trials"]} trials ({summary["pruned"]} pruned): trial '
            f'{summary["best_trial"]}, epoch {summary["best_epoch"]}: validation {shown} = '
            f'{valid[name]:.4f}; test HR@{topk} = {test[f"hr@{topk}"]:.4f}, NDCG@{topk} = '
            f'{test[f"ndcg@{topk}"]:.4f}\nTrain it again: {summary["ncf_command"]}')
