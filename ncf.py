"""Train a Neural Collaborative Filtering model (NeuMF, or GMF, MLP, MF) and report HR@K /
NDCG@K.

    python ncf.py --data data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --model mf -l 0.005
    torchrun --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
    python ncf.py --data data/cache/ml-20m --mode test --load_checkpoint_path checkpoints/model.pth
    python ncf.py --data data/cache/ml-20m --mode recommend --load_checkpoint_path ... --users 12,57

The script: parse the flags, join the run's processes, check everything it will read and write
(reading the checkpoints, which may give the model), resolve the runtime plan
(ncflib/runtime.py), load the data and the model, then train, test or recommend. Nothing but the
tests imports it; what it runs lives in ncflib (training, evaluation, checkpoints, ...).
"""
import dataclasses
import os
import sys

from ncflib import cli

if __name__ == '__main__':
    cli.handle_signals_early('ncf.py')  # Ctrl-C while torch loads is one line too

import torch  # noqa: E402

import dataloading  # noqa: E402
from logger.autologging import log_args, log_hardware  # noqa: E402
from ncflib import checkpoints, experiment, models, recommend, runtime  # noqa: E402
from ncflib.cache import read_id_maps  # noqa: E402
from ncflib.cli import UsageError, first_line, out_of_memory, run_main, warn  # noqa: E402
from ncflib.evaluation import Evaluation  # noqa: E402
from ncflib.flags import (check_args, check_args_against_data, check_free_items,  # noqa: E402
                          check_outputs, log_path_of, model_shape, parse_args, run_files)
from ncflib.training import RunSettings, Trainer  # noqa: E402


@dataclasses.dataclass
class Checkpoints:
    """The checkpoints a run reads, read and checked before any work: last.pth for --resume,
    the one to start from or to evaluate (--load_checkpoint_path, or CHECKPOINT_DIR's
    model.pth in test and recommend modes), and the pretrained branches ({'gmf': (state,
    path), 'mlp': ...})."""
    resume: dict = None
    resume_path: str = None
    load: dict = None
    load_path: str = None
    pretrained: dict = None


def prepare(args, processes, directory):
    """The checks that need no data: flags, output places, checkpoints to read. `processes`:
    this run's (the plan comes after them: it needs the model, which a checkpoint may give)."""
    check_args(args, processes)
    check_outputs(args, processes, directory)
    if args.tensorboard:
        experiment.tensorboard_writer_class()  # the package is there
    read = Checkpoints()
    if args.resume:
        read.resume_path = directory.last
        read.resume = checkpoints.read(read.resume_path)
    if args.mode != 'train' or args.load_checkpoint_path:
        read.load_path = (args.load_checkpoint_path
                          or checkpoints.CheckpointDirectory(args.checkpoint_dir).best)
        read.load = checkpoints.read(read.load_path)
    if args.pretrained_gmf:
        read.pretrained = {kind: (checkpoints.read(path), path) for kind, path in
                           (('gmf', args.pretrained_gmf), ('mlp', args.pretrained_mlp))}
    return read


@dataclasses.dataclass
class Run:
    """What a run is made of, once the data is loaded and checked against the flags and the
    checkpoints read."""
    settings: RunSettings
    shape: models.ModelShape
    read: Checkpoints
    dataset: dataloading.Dataset
    # each user's training items (full ranking of the validation set, exact negatives), and
    # their items known before the test (the test's full ranking, recommendations), where
    # needed, else None: the same without a validation holdout
    exclusion: dataloading.ItemExclusion
    known_exclusion: dataloading.ItemExclusion
    batches: dataloading.TrainBatches
    model: torch.nn.Module
    started: float  # plan.time() when the run started, after the checks that need no data


def speaker(plan):
    """print, on rank 0; nothing on the others."""
    def say(*parts):
        if plan.rank == 0:
            print(*parts, flush=True)
    return say


def load(args, plan, shape, read, started):
    """The data, checked against the flags and the checkpoints, and the model of `shape` built
    on it."""
    say = speaker(plan)
    settings = RunSettings.of(vars(args))
    # Recommendations and full ranking use no test negatives: never draw new ones for them.
    valid_negative = args.valid_negative if args.mode != 'recommend' and \
        args.eval_mode == 'sampled' else None
    dataset = dataloading.load_dataset(args.data, plan.device, valid_negative, args.seed, say)
    check_args_against_data(args, dataset)
    exclusion = known_exclusion = None
    if args.eval_mode == 'full' or args.negative_sampling == 'exact' or (
            args.mode == 'recommend' and not dataset.has_validation):
        exclusion = dataloading.ItemExclusion(dataset.train_users, dataset.train_items,
                                              dataset.n_users, dataset.n_items)
        check_free_items(args, exclusion)
    if args.mode == 'recommend' or args.eval_mode == 'full':
        known_exclusion = dataloading.ItemExclusion(*dataset.known_pairs(), dataset.n_users,
                                                    dataset.n_items) \
            if dataset.has_validation else exclusion
    batches = dataloading.TrainBatches(
        dataset, plan, args.batch_size, args.negative_samples, args.grads_accumulated,
        exclusion=exclusion if args.negative_sampling == 'exact' else None,
        popularity=args.negative_sampling == 'popularity')
    if args.mode == 'train' and batches.steps == 0:
        raise UsageError(f'--batch_size {args.batch_size} is larger than an epoch '
                         f'({batches.samples} samples): no step would be trained')
    model = plan.build_model(shape, dataset.n_users, dataset.n_items)
    for state, path in ((read.load, read.load_path), (read.resume, read.resume_path)):
        if state is not None:
            checkpoints.check_data(state, path, dataset, args.allow_other_data, say)
            checkpoints.load_model_state(model, state, path)
    if read.pretrained is not None:
        checkpoints.load_pretrained(model, shape, read.pretrained, args.alpha, dataset,
                                    args.allow_other_data, say)
        say(f'Starting from {read.pretrained["gmf"][1]} and {read.pretrained["mlp"][1]} '
            f'(alpha {args.alpha})')
    if read.resume is not None:
        checkpoints.check_settings(read.resume, read.resume_path, settings,
                                   args.allow_changed_settings, say)
    return Run(settings, shape, read, dataset, exclusion, known_exclusion, batches,
               model.to(plan.device), started)


def run(args, plan, directory, shape, read):
    if plan.rank == 0:
        for warning in plan.warnings:
            warn(warning)
    torch.manual_seed(args.seed)
    runtime.barrier(plan)  # start the clock together
    setup = runtime.together(plan, load, args, plan, shape, read, plan.time())
    load_time = plan.time() - setup.started
    if args.mode == 'recommend':
        return recommend_users(args, plan, setup)

    evaluations = evaluations_of(args, plan, setup)
    # Every input has been checked: only now is anything written, by one run per directory.
    lock = None
    if directory:
        lock = runtime.together(plan, lambda: directory.lock() if plan.rank == 0 else None)
        if args.overwrite_checkpoints and not args.resume and plan.rank == 0:
            # the directory then only ever holds this run's files
            for path in run_files(args, directory):
                if os.path.exists(path):
                    os.remove(path)
    # A resumed run, or a test of a trained model, continues the training's log.
    report = experiment.Report(plan, log_path_of(args, directory),
                               append=args.resume or args.mode == 'test',
                               tensorboard=args.tensorboard)
    try:
        log_hardware(report.logger)
        log_args(report.logger, {name: value for name, value in vars(args).items()
                                 if name not in ('plan_options', 'given')})
        report.logger.log('PARAMETER', {'dataset': setup.dataset.metadata,
                                        'plan': plan.describe()})
        report.logger.metadata('train_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata('eval_throughput', {'unit': 'samples/s', 'format': ':.3e'})
        report.logger.metadata(f'hr@{args.topk}', {'unit': None, 'format': ':.5f'})
        dataset = setup.dataset
        report.say(f'Load data done [{load_time:.1f} s]. #user={dataset.n_users}, '
                   f'#item={dataset.n_items}, #train={len(dataset.train_users)}, '
                   f'#test={evaluations["test"].positive_total}'
                   + (f', #valid={evaluations["validation"].positive_total}'
                      if dataset.has_validation else ''))
        report.say(setup.model)
        report.say(f'{sum(p.numel() for p in setup.model.parameters())} parameters')
        report.say(f'{plan.describe()}, {args.eval_mode} evaluation'
                   + (', sparse embedding updates' if args.embedding_updates == 'sparse' else ''))
        if args.mode == 'test':
            tested = experiment.evaluate_once(plan, evaluations, report, args.metrics_at,
                                              args.ranks_output)
            return {'hr': tested['test'].hr, 'ndcg': tested['test'].ndcg,
                    'metrics': tested['test'], 'validation': tested.get('validation')}
        trainer = Trainer(plan, setup.model, setup.batches, args.learning_rate,
                          (args.beta1, args.beta2), args.eps, args.optimizer, args.embedding_l2,
                          args.weight_decay, args.embedding_updates)
        read = setup.read
        return experiment.train(
            trainer, evaluations.get('validation', evaluations['test']), report, args.epochs,
            args.threshold, args.seed, experiment.Saving(directory, setup.settings, setup.shape,
                                                         dataset.fingerprint),
            setup.started, args.metrics_at,
            resume=(read.resume, read.resume_path) if read.resume is not None else None,
            test=evaluations['test'] if dataset.has_validation else None)
    finally:
        report.close()
        if lock is not None:
            lock.release()


def recommend_users(args, plan, setup):
    """--mode recommend: each asked-for user's top-K unseen items, as CSV."""
    start = plan.time()
    id_maps = read_id_maps(args.data, setup.dataset.metadata)
    users = recommend.requested_users(id_maps[0], recommend.read_users(args.users,
                                                                       args.users_file))
    items, logits, compiling = recommend.recommend(plan, setup.model, setup.known_exclusion,
                                                   users, args.topk)
    rows = recommend.write(args.output, id_maps, users, items, logits)
    seconds = plan.time() - start
    print(f'Recommended up to {args.topk} items for each of {len(users)} users ({rows} rows)'
          + (f' to {args.output}' if args.output else '')
          + f' in {seconds:.2f} s after loading the data'
          + (f' ({compiling:.1f} s of it compiling the scoring)' if compiling else ''),
          file=sys.stderr)
    return {'users': len(users), 'rows': rows, 'seconds': seconds,
            'compile_seconds': compiling}


def evaluations_of(args, plan, setup):
    """{'test': Evaluation} of the test set, and with a validation holdout {'validation': ...}
    first, sharing the test's scoring copy of the model."""
    test = Evaluation(plan, setup.dataset, setup.model, args.topk, args.eval_mode,
                      setup.known_exclusion, args.metrics_at)
    if not setup.dataset.has_validation:
        return {'test': test}
    return {'validation': Evaluation(plan, setup.dataset, setup.model, args.topk,
                                     args.eval_mode, setup.exclusion, args.metrics_at,
                                     split='validation', scorer=test.scorer),
            'test': test}


def run_and_explain(args, directory):
    """Join the run's processes, check what needs no data, resolve the plan and `run`, with the
    failures that are not bugs said in one line: running out of memory, and another process of
    a distributed run that failed or was stopped."""
    processes = runtime.join(args.plan_options, args.local_rank)
    try:
        read = runtime.together(processes, prepare, args, processes, directory)
        # the model's sizes first: the plan may time its layers
        shape = runtime.together(processes, model_shape, args, read)
        plan = runtime.start(args.plan_options, shape, args.valid_batch_size, processes)
        return run(args, plan, directory, shape, read)
    except Exception as error:  # sorted out below; anything else is a bug, with its traceback
        if out_of_memory(error):
            raise UsageError(f'out of memory with --batch_size {args.batch_size} and '
                             f'--valid_batch_size {args.valid_batch_size} '
                             f'({first_line(error)}); {directory.kept()}') from None
        if processes.distributed and runtime.peer_failure(error):
            raise UsageError(f'another process of this run failed or was stopped '
                             f'({runtime.peer_failure(error)}); {directory.kept()}') from None
        raise


def main(argv=None):
    """Command-line entry point; returns the run's figures (for tests and notebooks)."""
    args = parse_args(argv)
    directory = checkpoints.CheckpointDirectory(args.checkpoint_dir if args.mode == 'train'
                                                else '')
    quiet = int(os.environ.get('RANK', 0)) != 0  # only rank 0 speaks
    try:
        return run_main('ncf.py', run_and_explain, args, directory, kept=directory.kept,
                        quiet=quiet)
    finally:
        runtime.stop()


if __name__ == '__main__':
    main()
