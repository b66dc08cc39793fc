"""Tune a model of the NCF family with Optuna, selecting on a cache's validation holdout; the
test set is read once, when the search has ended, to test the best trial's model.

    python tune.py --data data/cache/ml-100k-holdout --model mf --trials 30 -e 20
    python tune.py --data DIR --model neumf --space space.yaml --metric ndcg --output tuning/neumf
    python tune.py ... --storage postgresql://user:password@host/ncf     # workers on many machines

Every flag other than tune.py's own (below) is ncf.py's, the same for every trial (--data,
--model, -e, --seed, --eval_mode, --topk, --device...); the search space (ncflib/tuning.py's
DEFAULT_SPACES, or --space FILE) gives the rest. The study lives in Optuna's RDB storage, by
default OUTPUT/study.db (SQLite): the same command again continues it (--trials is the total),
and several tune.py processes on one storage run trials in parallel. A worker killed outright
leaves its trial running until its heartbeat is --heartbeat x 2 seconds old; the next trial of
any worker then marks it failed and runs it again, once. Ctrl-C or SIGTERM: one line, the
study intact, the interrupted trial to be run again.

OUTPUT gets trials/NNNN/ (each trial's model.pth of its best epoch and log.json), trials.csv
and trials.md, best.json (the best trial: its parameters, the ncf.py command that trains it
again, its validation and test figures), best_model.pth and, with matplotlib, history.png.
"""
import json
import os
import shutil
import time

from ncflib import cli

if __name__ == '__main__':
    cli.handle_signals_early('tune.py')

try:
    import optuna  # noqa: E402
except ImportError:
    optuna = None

import dataloading  # noqa: E402
from ncflib import checkpoints, runtime, tuning  # noqa: E402
from ncflib.cache import read_metadata  # noqa: E402
from ncflib.cli import ArgumentParser, Terminated, UsageError, run_main  # noqa: E402
from ncflib.evaluation import Evaluation  # noqa: E402
from ncflib.files import atomic_write  # noqa: E402
from ncflib.flags import parse_args as parse_ncf_args  # noqa: E402
from ncflib.models import ModelShape  # noqa: E402

PROGRAM = 'tune.py'
STORAGE_ATTEMPTS = 5  # opening a new storage that other workers create at the same time


class Surplus(Exception):
    """A trial that started after the study had all its trials (another worker's took the
    last place): recorded as failed, never counted, never run."""


def parse_args(argv=None):
    parser = ArgumentParser(
        prog=PROGRAM, description='Tune an NCF model with Optuna on the validation holdout',
        epilog="Every other flag is ncf.py's (python ncf.py --help), fixed for all trials.")
    parser.add_argument('--trials', type=int, default=30,
                        help='Trials of the study in all (a rerun continues up to it)')
    parser.add_argument('--output', default=None,
                        help='Where the trials, the tables and the best model go (default: '
                             'tuning/MODEL)')
    parser.add_argument('--storage', default=None,
                        help="Optuna's storage, any SQLAlchemy URL (default: "
                             'sqlite:///OUTPUT/study.db)')
    parser.add_argument('--study_name', default=None, help='The study (default: ncf-MODEL)')
    parser.add_argument('--space', default=None, metavar='FILE',
                        help='The search space, YAML or JSON (default: the model\'s, in README)')
    parser.add_argument('--metric', choices=tuning.OBJECTIVES, default='hr',
                        help='The validation figure of the best epoch that the search maximises '
                             '(hr and ndcg at --topk)')
    parser.add_argument('--pruner', choices=('median', 'hyperband', 'none'), default='median',
                        help='Stop trials that fall behind, from their validation figures')
    parser.add_argument('--heartbeat', type=int, default=60, metavar='SECONDS',
                        help="A running trial's heartbeat: a worker killed outright has its "
                             'trial failed and retried once it is twice this old')
    own, rest = parser.parse_known_args(argv)
    args = parse_ncf_args(rest)
    if own.trials < 1 or own.heartbeat < 1:
        parser.error('--trials and --heartbeat must be positive')
    own.output = own.output or os.path.join('tuning', args.model)
    own.storage = own.storage or 'sqlite:///' + os.path.abspath(
        os.path.join(own.output, 'study.db'))
    own.study_name = own.study_name or f'ncf-{args.model}'
    return own, args, rest


def shown(url):
    """A storage URL for a message: without its password."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the storage says so in its own line
        return cli.excerpt(url, 80)


def open_study(own, wanted, sampler, pruner):
    """The study in its storage, created or continued (only for the same search)."""
    url = own.storage
    if url.startswith('sqlite:///'):
        os.makedirs(own.output, exist_ok=True)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with tuning.quiet_experimental():
                # SQLite: a worker waits for another's write instead of failing at once
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs={'connect_args': {'timeout': 60}}
                    if url.startswith('sqlite') else None, heartbeat_interval=own.heartbeat,
                    grace_period=2 * own.heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages
                    .RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(storage=storage, study_name=own.study_name,
                                        direction='maximize', load_if_exists=True,
                                        sampler=sampler, pruner=pruner)
            break
        except (ImportError, ValueError, RuntimeError) as error:
            raise UsageError(f'--storage {shown(url)}: {cli.first_line(error, 200)}') from None
        except Exception as error:  # SQLAlchemy's: a server not reached, a file not writable
            if not type(error).__module__.startswith('sqlalchemy'):
                raise
            # Workers that start together on a new storage race to create its tables: the
            # losers find them made, and open them again.
            if attempt + 1 == STORAGE_ATTEMPTS or not any(
                    sign in str(error) for sign in ('already exists', 'UNIQUE constraint',
                                                    'duplicate key')):
                raise UsageError(f'--storage {shown(url)}: {cli.first_line(error, 200)}') \
                    from None
            time.sleep(0.1 * (attempt + 1))
    tuning.check_identity(study, wanted, shown(url))
    return study, storage


def load_search(own, args, space):
    """The plan, resolved once, and the data without its test set, loaded once."""
    if 'validation' not in read_metadata(args.data, print):
        raise UsageError(f'{args.data} has no validation holdout, and a search selects on one '
                         '(never on the test set): convert the data with convert.py '
                         '--validation_holdout (or prepare_dataset.sh DATASET RAW_DIR CACHE_DIR '
                         '--validation_holdout)')
    plan = runtime.start(args.plan_options, ModelShape(args.model, args.factors, args.layers,
                                                       args.dropout), args.valid_batch_size)
    valid_negative = args.valid_negative if args.eval_mode == 'sampled' else None
    dataset = dataloading.load_dataset(args.data, plan.device, valid_negative, args.seed,
                                       print, with_test=False)
    exclusion = None
    if args.eval_mode == 'full' or args.negative_sampling == 'exact':
        exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                              dataset.n_users, dataset.n_items)
    search = tuning.Search(plan, dataset, exclusion, own.rest, space, own.metric, own.output,
                           own.trials)
    # the fixed flags, with a point of the space, checked as a trial's before any trial
    tuning.trial_args(search, tuning.suggest(None, space), own.output)
    return search


def optimize(study, search, own, args):
    """Trials until the study has --trials finished ones (this worker's and the others')."""
    interrupted, progress = [], tuning.progress_bar(own.trials,
                                                    tuning.finished_count(study))

    def objective(trial):
        if tuning.is_surplus(study, trial.number, own.trials):
            study.stop()
            raise Surplus()
        try:
            return tuning.run_trial(search, trial, tuning.suggest(trial, search.space))
        except UsageError as error:  # the trial's own (it diverged...): counted, search goes on
            trial.set_user_attr(tuning.FAILURE_ATTR, str(error))
            raise
        except Terminated as error:  # Optuna marks a trial interrupted by Ctrl-C as failed
            interrupted.append((trial.number, error))
            raise KeyboardInterrupt from error

    def finished(study, trial):
        if tuning.counted(trial):
            progress.write(tuning.describe_trial(trial, search.metric, args.topk))
            progress.update()
        if tuning.finished_count(study) >= own.trials:
            study.stop()

    try:
        study.optimize(objective, catch=(UsageError, Surplus), callbacks=[finished])
    except KeyboardInterrupt as error:
        # the interrupted trial runs again, as a killed worker's does
        for number, _ in interrupted:
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            with tuning.quiet_experimental():
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)
        raise interrupted[0][1] if interrupted else error
    finally:
        progress.close()


def test_best(study, search, own, args):
    """The best trial's model on the test set, once: read from the study where a worker did it
    already, else tested here, with its validation figure evaluated beside it."""
    best = study.best_trial
    recorded = study.user_attrs.get(tuning.TEST_ATTR)
    if recorded and recorded['trial'] == best.number:
        return recorded
    path = os.path.join(tuning.trial_directory(own.output, best.number),
                        checkpoints.BEST_MODEL_FILE)
    if not os.path.exists(path):
        raise UsageError(f'the best trial, {best.number}, ran on {best.user_attrs.get("host")}: '
                         f'its {path} is not here (run this command again there to test it, '
                         'or give the workers one --output)')
    plan = search.plan
    dataset = dataloading.load_dataset(
        args.data, plan.device, args.valid_negative if args.eval_mode == 'sampled' else None,
        args.seed, print)
    state = checkpoints.read(path)
    checkpoints.check_data(state, path, dataset, False, print)
    shape, _, _ = checkpoints.shape_of(state, path)
    model = plan.build_model(shape, dataset.n_users, dataset.n_items)
    checkpoints.load_model_state(model, state, path)
    model = model.to(plan.device)
    known = None
    if args.eval_mode == 'full':
        known = dataloading.ItemExclusion(*dataset.known_pairs(), dataset.n_users,
                                          dataset.n_items)
    test = Evaluation(plan, dataset, model, args.topk, args.eval_mode, known, args.metrics_at)
    validation = Evaluation(plan, dataset, model, args.topk, args.eval_mode, search.exclusion,
                            args.metrics_at, split='validation', scorer=test.scorer)
    figures = {split: {**metrics.figures(args.metrics_at), 'mrr': metrics.mrr,
                       'loss': metrics.loss}
               for split, metrics in (('validation', validation()), ('test', test()))}
    recorded = {'trial': best.number, 'best_epoch': best.user_attrs.get('best_epoch'),
                **figures}
    study.set_user_attr(tuning.TEST_ATTR, recorded)
    return recorded


def leave(study, search, own, args, tested):
    """The tables, best.json, best_model.pth and the plot in OUTPUT."""
    rows = tuning.trial_rows(study, search.metric)
    tuning.write_tables(rows, own.output)
    if tested is None:
        return
    best = study.best_trial
    values = {flag: spec['value'] for flag, spec in search.space.items()
              if not tuning.by_optimizer(spec) and 'value' in spec}
    values.update(best.params)
    values = {flag: values[flag] for flag in search.space if flag in values}
    command = tuning.ncf_command(search.fixed_argv, values)
    summary = {'study': own.study_name, 'storage': shown(own.storage), 'metric': own.metric,
               'trials': len(rows), 'pruned': sum(row['state'] == 'pruned' for row in rows),
               'best_trial': best.number, 'best_value': best.value, 'params': values,
               'ncf_command': command, **{key: tested[key] for key in
                                          ('best_epoch', 'validation', 'test')}}
    atomic_write(os.path.join(own.output, 'best.json'),
                 lambda path: open(path, 'w').write(json.dumps(summary, indent=2) + '\n'))
    source = os.path.join(tuning.trial_directory(own.output, best.number),
                          checkpoints.BEST_MODEL_FILE)
    atomic_write(os.path.join(own.output, 'best_model.pth'),
                 lambda path: shutil.copyfile(source, path))
    tuning.plot_history(rows, search.metric, os.path.join(own.output, 'history.png'))
    return summary


def run(own, args):
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UsageError('tune.py runs one process per worker, not under torchrun: start '
                         'several tune.py processes on one --storage instead')
    if optuna is None:
        raise UsageError('tune.py needs Optuna: pip install optuna')
    space = (tuning.read_space(own.space) if own.space else
             tuning.check_space(tuning.DEFAULT_SPACES[args.model], 'the default space'))
    tuning.check_fixed_flags(args, space)
    cli.check_writable_directory(own.output, '--output')
    search = load_search(own, args, space)
    wanted = tuning.identity(args.model, search.dataset.fingerprint, space,
                             f'{own.metric}@{args.topk}', search.fixed_argv)
    study, storage = open_study(own, wanted, tuning.TrialSeededSampler(args.seed),
                       tuning.pruner(own.pruner, args.epochs))
    # a killed worker's trial, failed (and retried) now rather than in the first trial
    tuning.fail_stale_trials(study, storage, 2 * own.heartbeat)
    done = tuning.finished_count(study)
    print(f'Study {own.study_name} in {shown(own.storage)}: {done} of {own.trials} trials '
          f'finished; {search.plan.describe()}', flush=True)
    if done < own.trials:
        optimize(study, search, own, args)
    done = tuning.finished_count(study)
    running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    if done < own.trials or running:
        tuning.write_tables(tuning.trial_rows(study, own.metric), own.output)
        print(f'{done} of {own.trials} trials finished, {running} running in other workers: '
              'the worker that finishes the last tests the best trial (or run this command '
              'again then)')
        return {'finished': done, 'running': running}
    if not any(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials):
        tuning.write_tables(tuning.trial_rows(study, own.metric), own.output)
        raise UsageError(f'no trial of study {own.study_name} completed (all pruned or failed): '
                         f'see {os.path.join(own.output, "trials.md")}')
    tested = test_best(study, search, own, args)
    summary = leave(study, search, own, args, tested)
    print(tuning.describe_best(summary, args.topk), flush=True)
    return summary


def main(argv=None):
    """Command-line entry point; returns the search's summary (for tests)."""
    own, args, rest = parse_args(argv)
    own.rest = rest

    def kept():
        return (f'the study in {shown(own.storage)} keeps its finished trials; the same '
                'command continues it')
    return run_main(PROGRAM, run, own, args, kept=kept)


if __name__ == '__main__':
    main()
