"""NeuMF or MF, sampled or full ranking, over several seeds: the NCF family compared on one
dataset with one command.

    python benchmarks/compare_models.py --data data/cache/ml-100k
    python benchmarks/compare_models.py --ratings ../shared/data/ml-100k/u.data --seeds 1 2 3
    python benchmarks/compare_models.py --data DIR --models mf neumf --flags mf="-l 0.01"

For every seed and every model, `ncf.py` trains it (a process of its own, as a user runs it),
keeping the model of its best epoch by sampled HR@10: on the cache's validation holdout where it
has one (convert.py --validation_holdout; ncf.py selects on it by itself), else on the test set,
as the reference does (which flatters every model alike). Then `ncf.py --mode test` tests that
model once under each protocol, writing each test user's rank (--ranks_output): sampled (the
test positive among its test negatives, the reference's) and full (against every item the user
has no known interaction with). `neumf_pretrained` is the NCF paper's NeuMF: started from the
GMF and the MLP of the same seed (--pretrained_gmf / --pretrained_mlp, alpha 0.5), trained with
SGD.

Per model: mean and standard deviation over the seeds of HR@10, NDCG@10 and MRR under both
protocols, the selected epoch, the training time (the epochs' training, evaluation excluded) and
the parameter count; the table says which set selected the epoch. Then, for each pair of models
and each protocol, paired tests over the test users, each user's HR@10 and NDCG@10 being the
mean over the seeds of that model's runs (`paired_tests`): HR@10 by the exact two-sided sign
test on the users where the two differ (with one seed, HR@10 is 0 or 1 and this is the exact
McNemar test on the discordant users), NDCG@10 by the two-sided Wilcoxon signed-rank test (users
where the two are equal dropped). Each p is given as it is and Holm-adjusted over the pairs of
its column (one family per protocol and metric). They say whether the gap between two models is
beyond what the variation between users explains, for these trained models: the spread over
seeds is the first table's, not theirs.

Written to OUT: results.md (both tables), results.json (every run's figures and the tests too),
results.png (with matplotlib), and each run's checkpoints, logs, figures and ranks in
runs/MODEL-seedN/. The last line printed is the JSON.

Stopped (Ctrl-C, SIGTERM, SIGHUP), it stops the running ncf.py with it, waits for it (that run
says its own line in its log and keeps its last.pth), and ends in one line naming the runs
complete and the one stopped. The same command again continues: a run whose result.json holds
the same flags and data is not trained again, and the stopped one resumes from its last.pth
(ncf.py --resume), or starts again when it had finished no epoch.

Every model trains with the flags of COMMON_FLAGS and its own of MODEL_FLAGS (both below, and
in README), which --flags MODEL="FLAGS" extends or overrides (later flags win).

--tune N (a cache with a validation holdout): each model is first tuned with the same budget,
N trials of tune.py (its default space; COMMON_FLAGS' epochs and Adam betas, the first seed),
its study in OUT/tuning/MODEL (a rerun continues it); each model's best parameters
(best.json) then follow its flags in every seed's run, so the models are compared each at its
own tuned best, selected on validation, and tested once per run.
"""
import contextlib
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ncflib import cli  # noqa: E402

PROGRAM = 'compare_models.py'
if __name__ == '__main__':
    cli.handle_signals_early(PROGRAM)

from logger.logger import read_log  # noqa: E402
from ncflib.cache import read_metadata  # noqa: E402
from ncflib.cli import UsageError  # noqa: E402
from ncflib.files import DirectoryLock, atomic_write  # noqa: E402

# CPU-sized settings for data of ML-100k's size (the reference's batch of 2^20 is for ML-20m
# on a GPU): every model trains these many epochs at this batch, with Adam as tuned below. 15
# epochs keep three seeds of every model within 15 minutes on 2 CPU cores; on ML-100k (seed 1)
# NeuMF, GMF and MF peak before, MLP gains a little after (0.632 by then, 0.645 at epoch 16).
COMMON_FLAGS = '-e 15 -b 2048 -b1 0.9 -b2 0.999 -n 4'
# Each model's own: the reference's sizes (64 factors; layers 256 256 128 64, dropout 0.5) and a
# learning rate each, picked on ML-100k with seed 1 among 0.001 and 0.005 (benchmarks/RESULTS.md);
# MF with a light L2 penalty on the rows it uses, as Rendle et al. regularise it.
MODEL_FLAGS = {
    'neumf': '--model neumf -l 0.001',
    'gmf': '--model gmf -l 0.005',
    'mlp': '--model mlp -l 0.001',
    'mf': '--model mf -l 0.005 --embedding_l2 0.0001',
    # the NCF paper's: from this seed's GMF and MLP (alpha 0.5), then SGD; it starts where
    # they ended, so fewer epochs
    'neumf_pretrained': '--model neumf --optimizer sgd -l 0.01 -e 5',
}
MODELS = tuple(MODEL_FLAGS)
BRANCHES = ('gmf', 'mlp')  # neumf_pretrained starts from these
TOPK = 10
PROTOCOLS = ('sampled', 'full')
# In each run's directory: the run its checkpoints belong to (written before it trains), its
# figures once it is complete, ncf.py's checkpoint of its last epoch (which --resume reads), and
# each test user's rank under each protocol (ncf.py --ranks_output).
STARTED_FILE = 'started.json'
RESULT_FILE = 'result.json'
LAST_FILE = 'last.pth'
RANKS_FILE = 'ranks-{protocol}.csv'
# What selected each run's epoch, as the table says it.
SELECTED_ON = {'validation': "validation (held out of training: each user's latest interaction, "
                             "or the ratio or time split's validation part)",
               'test': "test (the reference's protocol, which flatters every model alike)"}


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROGRAM, description=__doc__.split('\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--data', help='a cache written by convert.py / prepare_dataset.sh')
    source.add_argument('--ratings', help='a ratings file, converted first into OUT/cache')
    parser.add_argument('--models', nargs='+', choices=MODELS, default=list(MODELS),
                        help='neumf_pretrained needs gmf and mlp (they run first)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[1, 2, 3])
    parser.add_argument('--flags', action='append', default=[], metavar='MODEL="FLAGS"',
                        help="more ncf.py flags for one model, after its defaults (repeatable)")
    parser.add_argument('--out', default='compare-models', help='where everything is written')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto')
    parser.add_argument('--tune', type=int, default=0, metavar='TRIALS',
                        help='tune each model first with this many tune.py trials on the '
                             "validation holdout, then run it with its best parameters")
    args = parser.parse_args(argv)
    args.extra = {}
    for item in args.flags:
        model, equals, flags = item.partition('=')
        if model not in MODELS or not equals:
            parser.error(f'--flags takes MODEL="FLAGS" with MODEL one of {", ".join(MODELS)}, '
                         f'not {item!r}')
        try:
            args.extra[model] = args.extra.get(model, []) + shlex.split(flags)
        except ValueError as error:  # an unbalanced quote
            parser.error(f'--flags {item!r}: {error}')
    if len(set(args.seeds)) < len(args.seeds):
        parser.error(f'--seeds names a seed twice: {" ".join(map(str, args.seeds))}')
    if args.tune < 0:
        parser.error(f'--tune must be a number of trials, not {args.tune}')
    if args.tune and 'neumf_pretrained' in args.models:
        parser.error('--tune tunes models trained from scratch: not neumf_pretrained (its '
                     'branches are the runs of gmf and mlp)')
    if 'neumf_pretrained' in args.models:
        args.models = list(dict.fromkeys(list(BRANCHES) + args.models))
    return args


def tune_flags(args, metadata, model):
    """tune.py's flags for one model: the budget, the fixed flags of every run but those its
    search space varies (batch size, negatives, learning rate...), where the study goes."""
    fixed = shlex.split(COMMON_FLAGS)
    kept = []
    for flag, value in zip(fixed[::2], fixed[1::2]):
        if flag in ('-e', '-b1', '-b2'):
            kept += [flag, value]
    return ['--model', model, '--trials', str(args.tune), '--seed', str(args.seeds[0]),
            '--device', args.device, '--valid_negative', str(metadata['valid_negative']),
            *kept, '--output', os.path.join(args.out, 'tuning', model)]


def tune(args, data, metadata, say):
    """--tune: each model's study run (or continued) to its N trials; its best parameters
    become flags of its runs (args.extra). Returns {model: best.json's summary}."""
    if not metadata.get('validation'):
        raise UsageError(f'--tune selects on a validation holdout, and {data} has none: convert '
                         'it with convert.py --validation_holdout')
    from ncflib.tuning import flag_argv

    tuned = {}
    for model in args.models:
        output = os.path.join(args.out, 'tuning', model)
        os.makedirs(output, exist_ok=True)
        say(f'Tuning {model}: {args.tune} trials of tune.py (its output: '
            f'{os.path.join(output, "tune.txt")})')
        run_script('tune.py', ['--data', data, *tune_flags(args, metadata, model)],
                   os.path.join(output, 'tune.txt'), f'tuning {model}')
        best = read_json(os.path.join(output, 'best.json'))
        if best is None:
            raise UsageError(f'tuning {model}: tune.py left no {output}/best.json')
        tuned[model] = best
        args.extra[model] = flag_argv(best['params']) + args.extra.get(model, [])
        say(f'{model} tuned: trial {best["best_trial"]} of {best["trials"]}, validation '
            f'HR@{TOPK} {best["best_value"]:.4f}: {" ".join(flag_argv(best["params"]))}')
    return tuned


# The recipe's scripts, as children that stop with this process

def run_script(script, argv, log, what, append=False):
    """Run the recipe's `script` (ncf.py, convert.py) with `argv` as a child that stops with
    this process, its output to `log` (appended to with `append`). Returns its resource usage
    (os.wait4's: the kernel's accounting of that process alone); UsageError naming `what` it
    did, its last line and `log` if it fails."""
    with open(log, 'a' if append else 'w') as output:
        with cli.child_process([sys.executable, os.path.join(ROOT, script), *argv],
                               stdout=output, stderr=subprocess.STDOUT) as child:
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = status = os.waitstatus_to_exitcode(status)
    if status:
        with open(log, errors='replace') as output:
            last = (output.read().strip().splitlines() or [''])[-1]
        how = (f'was killed by {signal.Signals(-status).name}' if status < 0 else
               f'failed{": " + last if last else f" (exit status {status})"}')
        raise UsageError(f'{what}: {script} {how} (see {log})')
    return usage


# How far the runs got

class Progress:
    """The runs of a comparison, which are complete and which one is under way: what an
    interrupted comparison leaves, for its line."""

    def __init__(self, args):
        self.runs_directory = os.path.join(args.out, 'runs')
        self.planned = [run_name(model, seed) for seed in args.seeds for model in args.models]
        self.complete = []
        self.current = None  # (run name, what it is doing)
        self.tuning = os.path.join(args.out, 'tuning') if args.tune else None

    def finished(self, name):
        self.current = None
        self.complete.append(name)

    def kept(self):
        left = (f'{len(self.complete)} of {len(self.planned)} runs complete in '
                f'{self.runs_directory}' + (f' ({", ".join(self.complete)})'
                                            if self.complete else ''))
        continues = ['complete runs are reused'] if self.complete else []
        if self.current is not None:
            name, doing = self.current
            if os.path.exists(os.path.join(self.runs_directory, name, LAST_FILE)):
                left += f'; {name} stopped {doing}, its last.pth kept'
                continues.append(f'{name} resumes from its last.pth')
            else:
                left += f'; {name} stopped {doing} before its first epoch ended'
                continues.append(f'{name} starts again')
        if self.tuning:  # tune.py's studies keep their finished trials
            left += f'; the studies in {self.tuning} keep their finished trials'
            continues.insert(0, 'the studies continue')
        return f'{left}; the same command again continues: {", ".join(continues)}' \
            if continues else f'{left}; the same command again starts them'


def run_name(model, seed):
    return f'{model}-seed{seed}'


# One run

def read_json(path):
    """The JSON object in `path`, or None where there is none (missing, or not JSON)."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def write_json(path, value):
    def write(temporary):
        with open(temporary, 'w') as file:
            json.dump(value, file, indent=1)
    atomic_write(path, write)


def settings_flags(args, valid_negative, model, seed):
    """ncf.py's flags for one run, but where it reads and writes."""
    return ['--seed', str(seed), '--device', args.device, '--metrics_at', str(TOPK),
            '--valid_negative', str(valid_negative), *shlex.split(COMMON_FLAGS),
            *shlex.split(MODEL_FLAGS[model]), *args.extra.get(model, [])]


def identity(args, metadata, model, seed):
    """What makes two runs the same run: the flags (where it reads and writes aside), the data's
    fingerprint and, for the pretrained NeuMF, its branches' identities."""
    same = {'flags': settings_flags(args, metadata['valid_negative'], model, seed),
            'data': metadata.get('fingerprint')}
    if model == 'neumf_pretrained':
        same['branches'] = [identity(args, metadata, branch, seed) for branch in BRANCHES]
    return same


def selected_on(metadata):
    """What selects a run's epoch: the cache's validation holdout where it has one (ncf.py then
    selects on it by itself), else the test set, as the reference does."""
    return 'validation' if metadata.get('validation') else 'test'


def epoch_figures(log):
    """Each epoch's figures in a training log, in order; a resumed run logs again an epoch it
    had logged but not saved: its last record counts."""
    epochs = {}
    for record in read_log(log):
        if isinstance(record.get('step'), list) and record['step']:
            epochs[record['step'][0]] = record['data']
    return [epochs[epoch] for epoch in sorted(epochs)]


def parameters(path):
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    return sum(tensor.numel() for tensor in state.values())


def start_flags(data, directory, same, model, seed):
    """ncf.py's flags that start this run from the beginning."""
    flags = ['--data', data, '--checkpoint_dir', directory, *same['flags'],
             '--overwrite_checkpoints']
    if model == 'neumf_pretrained':
        runs = os.path.dirname(directory)
        flags += [item for branch in BRANCHES for item in (
            f'--pretrained_{branch}', os.path.join(runs, run_name(branch, seed), 'model.pth'))]
    return flags


def train(data, directory, same, model, seed):
    """Train one run: resumed from its last.pth where the directory holds this same run's (its
    pretrained start is in it too), else from the beginning. Returns the flags that start it
    from the beginning, and whether it resumed."""
    name = run_name(model, seed)
    flags = start_flags(data, directory, same, model, seed)
    resume = (read_json(os.path.join(directory, STARTED_FILE)) == same
              and os.path.exists(os.path.join(directory, LAST_FILE)))
    if resume:
        run_script('ncf.py', ['--data', data, '--checkpoint_dir', directory, *same['flags'],
                              '--resume'], os.path.join(directory, 'train.txt'),
                   f'resuming {name}', append=True)
        return flags, True
    os.makedirs(directory, exist_ok=True)
    for stale in (RESULT_FILE, LAST_FILE):  # another run's: neither reused nor resumed
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, stale))
    write_json(os.path.join(directory, STARTED_FILE), same)
    run_script('ncf.py', flags, os.path.join(directory, 'train.txt'), f'training {name}')
    return flags, False


def run_test(data, directory, same, name, protocol, held_out):
    """The test figures of the run's selected model (its model.pth) under `protocol`, with the
    training's flags (its test negatives, seed, precision: as its epochs were evaluated);
    `held_out`: the cache has a validation holdout, which ncf.py tests too. Each test user's
    rank goes to RANKS_FILE."""
    log = os.path.join(directory, f'{protocol}.json')
    with contextlib.suppress(FileNotFoundError):
        os.remove(log)  # a test appends to its log: only this one's figures
    run_script('ncf.py', ['--data', data, '--mode', 'test', '--checkpoint_dir', directory,
                          *same['flags'], '--eval_mode', protocol, '--log_path', log,
                          '--ranks_output',
                          os.path.join(directory, RANKS_FILE.format(protocol=protocol))],
               os.path.join(directory, f'{protocol}.txt'), f'testing {name} ({protocol})')
    figures = [r['data'] for r in read_log(log) if r.get('step') == []][-1]
    prefix = 'test_' if held_out else ''  # with a holdout, its figures are valid_*
    return {'hr': figures[f'{prefix}hr@{TOPK}'], 'ndcg': figures[f'{prefix}ndcg@{TOPK}'],
            'mrr': figures[f'{prefix}mrr']}


def complete(recorded, same, directory):
    """Whether `recorded` (a run's result.json) is this same run's, ranks included."""
    return (isinstance(recorded, dict) and recorded.get('identity') == same
            and all(os.path.isfile(os.path.join(directory, RANKS_FILE.format(protocol=p)))
                    for p in PROTOCOLS))


def run(args, data, metadata, model, seed, progress):
    """One run's figures: its result.json where it holds this same run, else trained (resumed
    where it stopped) and ranked against every item now, and recorded in result.json."""
    name = run_name(model, seed)
    directory = os.path.join(progress.runs_directory, name)
    same = identity(args, metadata, model, seed)
    recorded = read_json(os.path.join(directory, RESULT_FILE))
    if complete(recorded, same, directory):
        return recorded, f'reused: {os.path.join(directory, RESULT_FILE)}'
    # (a complete run without its ranks, as an older version left it, resumes: no epoch left
    # to train, then its tests)
    progress.current = name, 'in training'
    start = time.perf_counter()
    flags, resumed = train(data, directory, same, model, seed)
    wall = time.perf_counter() - start
    held_out = selected_on(metadata) == 'validation'
    tested = {}
    for protocol in PROTOCOLS:
        progress.current = name, f'in its {protocol} test'
        tested[protocol] = run_test(data, directory, same, name, protocol, held_out)
    epochs = epoch_figures(os.path.join(directory, 'log.json'))
    # the first best, as ncf.py saved it: by validation HR where the cache holds a holdout
    chosen = f'{"valid_" if held_out else ""}hr@{TOPK}'
    best = max(epochs, key=lambda figures: figures[chosen])
    result = {
        'model': model, 'seed': seed, **tested, 'selected_on': selected_on(metadata),
        'ranks': {p: RANKS_FILE.format(protocol=p) for p in PROTOCOLS},
        'best_epoch': epochs.index(best), 'epochs': len(epochs),
        'train_seconds': sum(figures['train_epoch_time'] for figures in epochs),
        'wall_seconds': wall, 'resumed': resumed,
        'parameters': parameters(os.path.join(directory, 'model.pth')),
        'flags': flags, 'identity': same,
    }
    write_json(os.path.join(directory, RESULT_FILE), result)
    return result, 'resumed from its last.pth' if resumed else ''


def summarise(runs, models):
    """Per model, mean and standard deviation over the seeds."""
    def spread(values):
        return {'mean': statistics.mean(values),
                'std': statistics.stdev(values) if len(values) > 1 else 0.0}
    summary = {}
    for model in models:
        mine = [run for run in runs if run['model'] == model]
        summary[model] = {
            **{f'{protocol}_{metric}': spread([run[protocol][metric] for run in mine])
               for protocol in PROTOCOLS for metric in ('hr', 'ndcg', 'mrr')},
            'best_epoch': spread([run['best_epoch'] for run in mine]),
            'train_seconds': spread([run['train_seconds'] for run in mine]),
            'parameters': mine[0]['parameters'], 'seeds': len(mine),
        }
    return summary


# Paired tests: each pair of models over the same test users

def per_user_figures(path):
    """(users, HR@TOPK, NDCG@TOPK) of each user of a ranks CSV (ncf.py --ranks_output: a row
    per test positive, user and its 0-based position in the user's ranking), as ncf.py counts
    them: a hit where the first position < TOPK; NDCG the gains 1 / log2(position + 2) of the
    hits over those of the best ranking (one positive: the gain itself)."""
    import numpy as np
    table = np.loadtxt(path, delimiter=',', skiprows=1, dtype=np.int64, ndmin=2)
    users, first, count = np.unique(table[:, 0], return_index=True, return_counts=True)
    ranks = table[:, 1]
    hit = ranks < TOPK
    gains = np.add.reduceat(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0), first) \
        if len(ranks) else np.zeros(0)
    ideal = np.cumsum(1.0 / np.log2(np.arange(TOPK) + 2.0))[np.minimum(count, TOPK) - 1]
    best = np.minimum.reduceat(ranks, first) if len(ranks) else ranks
    return users, (best < TOPK).astype(np.float64), gains / ideal


def seed_means(runs, directory, models, protocol):
    """{model: (HR@TOPK, NDCG@TOPK)}: each test user's mean over the seeds of that model's runs
    (arrays in user order), from the runs' ranks under `protocol`; UsageError where two runs
    ranked other users (they would not pair)."""
    import numpy as np
    means, users = {}, None
    for model in models:
        figures = []
        for run in (run for run in runs if run['model'] == model):
            path = os.path.join(directory, run_name(model, run['seed']), run['ranks'][protocol])
            mine, hr, ndcg = per_user_figures(path)
            if users is None:
                users = mine
            elif not np.array_equal(users, mine):
                raise UsageError(f'{path} ranks other test users than the first run\'s: the '
                                 'runs do not pair')
            figures.append((hr, ndcg))
        means[model] = tuple(np.mean([pair[index] for pair in figures], axis=0)
                             for index in (0, 1))
    return means


def paired_tests(hr_a, hr_b, ndcg_a, ndcg_b):
    """Two-sided paired tests of model A against model B over the same users (arrays in the
    same user order; each a user's figure, the mean over seeds).

    HR@K: the exact sign test, binomial with p = 1/2 over the users where A and B differ. With
    one seed each user's HR is 0 or 1, and this is the exact McNemar test on the discordant
    users; with more, a user's HR is a fraction of the seeds, and only which model is ahead is
    counted (its few values tie too much for ranks to add much). NDCG@K: the Wilcoxon
    signed-rank test, which uses how far apart the two are, without assuming a normal
    difference (most users differ by 0, the others by graded, skewed amounts); users where the
    two are equal are dropped (scipy's zero_method 'wilcox'); scipy's 'auto' method (exact,
    else the normal approximation corrected for ties). No user differs: p = 1.
    Returns {'hr': {...}, 'ndcg': {...}}, each with A's mean minus B's and the p-value; 'hr' also
    the users where A is ahead and where B is."""
    from scipy import stats
    a_ahead, b_ahead = int((hr_a > hr_b).sum()), int((hr_b > hr_a).sum())
    hr_p = stats.binomtest(a_ahead, a_ahead + b_ahead).pvalue if a_ahead + b_ahead else 1.0
    differ = ndcg_a != ndcg_b
    ndcg_p = float(stats.wilcoxon(ndcg_a[differ], ndcg_b[differ]).pvalue) if differ.any() \
        else 1.0
    return {'hr': {'difference': float(hr_a.mean() - hr_b.mean()), 'a_ahead': a_ahead,
                   'b_ahead': b_ahead, 'p': float(hr_p)},
            'ndcg': {'difference': float(ndcg_a.mean() - ndcg_b.mean()), 'p': ndcg_p}}


def holm(p_values):
    """Holm's step-down adjustment of a family's p-values (in their order): the k-th smallest
    times the m - k + 1 not yet rejected, never below an earlier one's, at most 1."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - position) * p_values[index]))
        adjusted[index] = running
    return adjusted


def significance(runs, directory, models):
    """Every pair of models under each protocol: paired_tests over the test users, each p
    Holm-adjusted over the pairs of its protocol and metric (p_holm). A list of {'a', 'b',
    'protocol', 'users', 'hr', 'ndcg'}."""
    pairs = []
    for protocol in PROTOCOLS:
        means = seed_means(runs, directory, models, protocol)
        tested = [{'a': a, 'b': b, 'protocol': protocol, 'users': len(means[a][0]),
                   **paired_tests(means[a][0], means[b][0], means[a][1], means[b][1])}
                  for a, b in itertools.combinations(models, 2)]
        for metric in ('hr', 'ndcg'):
            for pair, adjusted in zip(tested, holm([pair[metric]['p'] for pair in tested])):
                pair[metric]['p_holm'] = adjusted
        pairs += tested
    return pairs


def check_scipy():
    """The paired tests need scipy: said before any work."""
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        raise UsageError('the paired tests need scipy: pip install scipy') from None


# The report

def markdown(summary, dataset, selection, pairs, seeds):
    def cell(figure, digits=4):
        return f'{figure["mean"]:.{digits}f} ± {figure["std"]:.{digits}f}'
    lines = [f'{dataset}; mean ± standard deviation over {next(iter(summary.values()))["seeds"]} '
             'seeds; sampled: each test positive among its user\'s test negatives (the '
             'reference\'s protocol); full: among every item without a known interaction (the '
             'same model).',
             '', f'Epoch selected on: {SELECTED_ON[selection]}, by sampled HR@{TOPK}; every '
             'figure is the selected model\'s' + (', tested once.' if selection == 'validation'
                                                   else '.'), '',
             f'| model | parameters | HR@{TOPK} sampled | NDCG@{TOPK} sampled | HR@{TOPK} full '
             f'| NDCG@{TOPK} full | MRR full | best epoch | training time (s) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for model, figures in summary.items():
        lines.append(f'| {model} | {figures["parameters"]:,} | {cell(figures["sampled_hr"])} | '
                     f'{cell(figures["sampled_ndcg"])} | {cell(figures["full_hr"])} | '
                     f'{cell(figures["full_ndcg"])} | {cell(figures["full_mrr"])} | '
                     f'{cell(figures["best_epoch"], 1)} | {cell(figures["train_seconds"], 1)} |')
    return '\n'.join(lines + [''] + significance_lines(pairs, seeds)) + '\n'


def tuned_lines(tuned, trials):
    """What --tune chose for each model, above the tables."""
    lines = [f'Each model tuned first with the same budget: {trials} trials of tune.py (its '
             f'default space, selected on validation HR@{TOPK}); its runs use the best trial\'s '
             'parameters:', '']
    for model, best in tuned.items():
        params = ', '.join(f'{flag} {value:.3g}' if isinstance(value, float) else
                           f'{flag} {value}' for flag, value in best['params'].items())
        lines.append(f'- {model}: trial {best["best_trial"]} ({best["pruned"]} of '
                     f'{best["trials"]} pruned), validation HR@{TOPK} '
                     f'{best["best_value"]:.4f}: {params}')
    return '\n'.join(lines + ['', ''])


def significance_lines(pairs, seeds):
    """The second table: each pair's gaps and p-values."""
    if not pairs:
        return ['One model: no pair to test.']
    lines = [f'Paired tests over the {pairs[0]["users"]:,} test users, each user\'s figure the '
             f'mean over {seeds} seed{"s" if seeds > 1 else ""}, two-sided: HR@{TOPK} by the '
             'exact sign test on the users where the two differ (McNemar\'s with one seed), '
             f'NDCG@{TOPK} by the Wilcoxon signed-rank test; p unadjusted, then Holm-adjusted '
             'over the pairs of its protocol and metric. A - B: the difference of the means.', '',
             f'| A | B | protocol | HR@{TOPK} A - B | users A / B ahead | p | Holm p '
             f'| NDCG@{TOPK} A - B | p | Holm p |',
             '|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for pair in pairs:
        hr, ndcg = pair['hr'], pair['ndcg']
        lines.append(f'| {pair["a"]} | {pair["b"]} | {pair["protocol"]} | '
                     f'{hr["difference"]:+.4f} | {hr["a_ahead"]} / {hr["b_ahead"]} | '
                     f'{hr["p"]:.3g} | {hr["p_holm"]:.3g} | {ndcg["difference"]:+.4f} | '
                     f'{ndcg["p"]:.3g} | {ndcg["p_holm"]:.3g} |')
    return lines


def plot(summary, path):
    """HR@10 and NDCG@10 per model under both protocols, with the seeds' standard deviation."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        cli.warn('no matplotlib, no plot (pip install matplotlib)')
        return False
    models = list(summary)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ('hr', 'ndcg')):
        for offset, protocol in ((-0.2, 'sampled'), (0.2, 'full')):
            axis.bar([index + offset for index in range(len(models))],
                     [summary[m][f'{protocol}_{metric}']['mean'] for m in models], width=0.4,
                     yerr=[summary[m][f'{protocol}_{metric}']['std'] for m in models],
                     label=protocol, capsize=3)
        axis.set_xticks(range(len(models)), models)
        axis.set_title(f'{metric.upper()}@{TOPK}')
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format='png', dpi=120))
    return True


def convert_ratings(args):
    """--ratings converted into OUT/cache by convert.py (its output in OUT/convert.txt)."""
    data = os.path.join(args.out, 'cache')
    log = os.path.join(args.out, 'convert.txt')
    print(f'Converting {args.ratings} into {data} (convert.py\'s output: {log})',
          file=sys.stderr, flush=True)
    run_script('convert.py', ['--path', args.ratings, '--output', data], log,
               f'converting --ratings {args.ratings}')
    return data


def write_text(path, text):
    def write(temporary):
        with open(temporary, 'w') as file:
            file.write(text)
    atomic_write(path, write)


def compare(args, progress):
    """Every run (reusing the complete ones), then the summary, written to OUT."""
    def say(line):
        print(line, file=sys.stderr, flush=True)
    # a missing or broken cache, or an --out that cannot be written, before any work
    metadata = read_metadata(args.data, log=say) if args.data else None
    check_scipy()
    cli.check_writable_directory(args.out, '--out')
    os.makedirs(args.out, exist_ok=True)
    with DirectoryLock(args.out, 'one comparison per --out'):
        data = args.data or convert_ratings(args)
        metadata = metadata or read_metadata(data, log=say)
        start = time.perf_counter()
        tuned = tune(args, data, metadata, say) if args.tune else None
        runs = []
        for seed in args.seeds:
            for model in args.models:
                result, how = run(args, data, metadata, model, seed, progress)
                runs.append(result)
                progress.finished(run_name(model, seed))
                say(f'{model} seed {seed}: HR@{TOPK} sampled {result["sampled"]["hr"]:.4f} '
                    f'(epoch {result["best_epoch"]}, selected on {result["selected_on"]}), '
                    f'full {result["full"]["hr"]:.4f}; '
                    f'{result["train_seconds"]:.1f} s of training' + (f' ({how})' if how else ''))
        return report(args, data, metadata, runs, time.perf_counter() - start, tuned)


def split_words(metadata):
    """The split of one's own data, for the dataset's line ('' for leave-one-out)."""
    parameters = metadata.get('split_parameters') or {}
    if metadata.get('split') == 'ratio':
        return (', each user\'s interactions split ' + '/'.join(
            f'{share:g}' for share in parameters.get('ratios', []) if share)
            + f' ({parameters.get("order")} order), {metadata.get("n_test"):,} test positives')
    if metadata.get('split') == 'time':
        return (', split at time ' + ' and '.join(f'{cutoff:g}' for cutoff in
                                                   parameters.get('cutoffs', []))
                + f', {metadata.get("n_test"):,} test positives')
    return ''


def report(args, data, metadata, runs, seconds, tuned=None):
    """results.md, results.json and results.png in OUT, each whole or absent; the table on
    stderr, the summary's JSON on stdout."""
    summary = summarise(runs, args.models)
    selection = selected_on(metadata)
    validation = metadata.get('validation')
    dataset = (f'{metadata.get("source_file", data)}: {metadata["n_users"]:,} users, '
               f'{metadata["n_items"]:,} items, {metadata.get("valid_negative")} test negatives '
               f'per user ({metadata.get("test_negative_sampling", "recipe")})'
               + split_words(metadata)
               + (f', a validation holdout of {validation["users"]:,} users'
                  if validation else ''))
    pairs = significance(runs, os.path.join(args.out, 'runs'), args.models)
    table = markdown(summary, dataset, selection, pairs, len(args.seeds))
    if tuned:
        table = tuned_lines(tuned, args.tune) + table
    write_text(os.path.join(args.out, 'results.md'), table)
    plotted = plot(summary, os.path.join(args.out, 'results.png'))
    result = {'benchmark': 'compare_models', 'dataset': dataset, 'selected_on': selection,
              'summary': summary, 'significance': pairs, 'runs': runs,
              'common_flags': COMMON_FLAGS, 'model_flags': MODEL_FLAGS, 'seconds': seconds,
              'tuned': tuned,
              'plot': plotted}
    write_json(os.path.join(args.out, 'results.json'), result)
    print(table, file=sys.stderr)
    print(json.dumps({key: value for key, value in result.items() if key != 'runs'}))
    return result


def main(argv=None):
    args = parse_args(argv)
    progress = Progress(args)
    return cli.run_main(PROGRAM, compare, args, progress, kept=progress.kept)


if __name__ == '__main__':
    main()
