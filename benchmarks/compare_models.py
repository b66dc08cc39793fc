"""NeuMF or MF, sampled or full ranking, over several seeds: the NCF family compared on one
dataset with one command.

    python benchmarks/compare_models.py --data data/cache/ml-100k
    python benchmarks/compare_models.py --ratings ../shared/data/ml-100k/u.data --seeds 1 2 3
    python benchmarks/compare_models.py --data DIR --models mf neumf --flags mf="-l 0.01"

For every seed and every model, `ncf.py` trains it (a process of its own, as a user runs it),
keeping the model of its best epoch under the reference's protocol (HR@10 over each user's test
positive and sampled test negatives, every epoch); then `ncf.py --mode test --eval_mode full`
ranks that model's test positive against every item the user has no training interaction
with. `neumf_pretrained` is the NCF paper's NeuMF: started from the GMF and the MLP of the same
seed (--pretrained_gmf / --pretrained_mlp, alpha 0.5), trained with SGD.

Per model: mean and standard deviation over the seeds of HR@10, NDCG@10 and MRR under both
protocols, the best epoch, the training time (the epochs' training, evaluation excluded) and the
parameter count. Written to OUT: results.md (the Markdown table), results.json (every run's
figures too), results.png (with matplotlib), and each run's checkpoints and logs in runs/.
The last line printed is the JSON.

Every model trains with the flags of COMMON_FLAGS and its own of MODEL_FLAGS (both below, and
in README), which --flags MODEL="FLAGS" extends or overrides (later flags win).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from logger.logger import read_log  # noqa: E402

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
TOPK = 10
PROTOCOLS = ('sampled', 'full')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    args = parser.parse_args(argv)
    args.extra = {}
    for item in args.flags:
        model, _, flags = item.partition('=')
        if model not in MODELS or not _:
            parser.error(f'--flags takes MODEL="FLAGS" with MODEL one of {", ".join(MODELS)}, '
                         f'not {item!r}')
        args.extra[model] = args.extra.get(model, []) + shlex.split(flags)
    if 'neumf_pretrained' in args.models:
        args.models = list(dict.fromkeys(['gmf', 'mlp'] + args.models))
    return args


def ncf(argv, log):
    """Run ncf.py with `argv`, its output to `log`; exit with its line if it fails."""
    with open(log, 'w') as output:
        completed = subprocess.run([sys.executable, os.path.join(ROOT, 'ncf.py'), *argv],
                                   stdout=output, stderr=subprocess.STDOUT)
    if completed.returncode:
        with open(log) as output:
            last = output.read().strip().splitlines()[-1:] or ['']
        sys.exit(f'compare_models.py: ncf.py {" ".join(argv)} failed: {last[0]} (see {log})')


def parameters(path):
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    return sum(tensor.numel() for tensor in state.values())


def run(args, data, model, seed, valid_negative):
    """Train one model with one seed, then rank its best model against every item; the cache's
    test negatives (valid_negative per user) as they are."""
    directory = os.path.join(args.out, 'runs', f'{model}-seed{seed}')
    flags = ['--data', data, '--seed', str(seed), '--device', args.device, '--checkpoint_dir',
             directory, '--overwrite_checkpoints', '--metrics_at', str(TOPK),
             '--valid_negative', str(valid_negative),
             *shlex.split(COMMON_FLAGS), *shlex.split(MODEL_FLAGS[model]),
             *args.extra.get(model, [])]
    if model == 'neumf_pretrained':
        flags += ['--pretrained_gmf', os.path.join(args.out, 'runs', f'gmf-seed{seed}',
                                                  'model.pth'),
                  '--pretrained_mlp', os.path.join(args.out, 'runs', f'mlp-seed{seed}',
                                                  'model.pth')]
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    ncf(flags, os.path.join(directory, 'train.txt'))
    wall = time.perf_counter() - start
    epochs = [r['data'] for r in read_log(os.path.join(directory, 'log.json'))
              if isinstance(r.get('step'), list) and r['step']]
    best = max(epochs, key=lambda figures: figures[f'hr@{TOPK}'])  # the first best, as saved
    full_log = os.path.join(directory, 'full.json')
    ncf(['--data', data, '--mode', 'test', '--eval_mode', 'full', '--checkpoint_dir',
         directory, '--device', args.device, '--log_path', full_log, '--metrics_at',
         str(TOPK)], os.path.join(directory, 'full.txt'))
    full = [r['data'] for r in read_log(full_log) if r.get('step') == []][-1]
    return {
        'model': model, 'seed': seed,
        'sampled': {'hr': best[f'hr@{TOPK}'], 'ndcg': best[f'ndcg@{TOPK}'], 'mrr': best['mrr']},
        'full': {'hr': full[f'hr@{TOPK}'], 'ndcg': full[f'ndcg@{TOPK}'], 'mrr': full['mrr']},
        'best_epoch': epochs.index(best), 'epochs': len(epochs),
        'train_seconds': sum(figures['train_epoch_time'] for figures in epochs),
        'wall_seconds': wall,
        'parameters': parameters(os.path.join(directory, 'model.pth')),
        'flags': flags,
    }


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


def markdown(summary, dataset):
    def cell(figure, digits=4):
        return f'{figure["mean"]:.{digits}f} ± {figure["std"]:.{digits}f}'
    lines = [f'{dataset}; mean ± standard deviation over {next(iter(summary.values()))["seeds"]} '
             'seeds; sampled: the test positive among its test negatives (the reference\'s '
             'protocol, best epoch); full: among every item without a training interaction '
             '(the same model).', '',
             f'| model | parameters | HR@{TOPK} sampled | NDCG@{TOPK} sampled | HR@{TOPK} full '
             f'| NDCG@{TOPK} full | MRR full | best epoch | training time (s) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for model, figures in summary.items():
        lines.append(f'| {model} | {figures["parameters"]:,} | {cell(figures["sampled_hr"])} | '
                     f'{cell(figures["sampled_ndcg"])} | {cell(figures["full_hr"])} | '
                     f'{cell(figures["full_ndcg"])} | {cell(figures["full_mrr"])} | '
                     f'{cell(figures["best_epoch"], 1)} | {cell(figures["train_seconds"], 1)} |')
    return '\n'.join(lines) + '\n'


def plot(summary, path):
    """HR@10 and NDCG@10 per model under both protocols, with the seeds' standard deviation."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('compare_models.py: warning: no matplotlib, no plot (pip install matplotlib)',
              file=sys.stderr)
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
    figure.savefig(path, dpi=120)
    return True


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if args.ratings:
        data = os.path.join(args.out, 'cache')
        subprocess.run([sys.executable, os.path.join(ROOT, 'convert.py'), '--path',
                        args.ratings, '--output', data], check=True)
    with open(os.path.join(data, 'metadata.json')) as file:
        metadata = json.load(file)
    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for model in args.models:
            runs.append(run(args, data, model, seed, metadata['valid_negative']))
            result = runs[-1]
            print(f'{model} seed {seed}: HR@{TOPK} sampled {result["sampled"]["hr"]:.4f} '
                  f'(epoch {result["best_epoch"]}), full {result["full"]["hr"]:.4f}; '
                  f'{result["train_seconds"]:.1f} s of training', file=sys.stderr, flush=True)
    summary = summarise(runs, args.models)
    dataset = (f'{metadata.get("source_file", data)}: {metadata["n_users"]:,} users, '
               f'{metadata["n_items"]:,} items, {metadata.get("valid_negative")} test negatives '
               f'per user ({metadata.get("test_negative_sampling", "recipe")})')
    table = markdown(summary, dataset)
    with open(os.path.join(args.out, 'results.md'), 'w') as file:
        file.write(table)
    plotted = plot(summary, os.path.join(args.out, 'results.png'))
    result = {'benchmark': 'compare_models', 'dataset': dataset, 'summary': summary,
              'runs': runs, 'common_flags': COMMON_FLAGS, 'model_flags': MODEL_FLAGS,
              'seconds': time.perf_counter() - start, 'plot': plotted}
    with open(os.path.join(args.out, 'results.json'), 'w') as file:
        json.dump(result, file, indent=1)
    print(table, file=sys.stderr)
    print(json.dumps({key: value for key, value in result.items() if key != 'runs'}))
    return result


if __name__ == '__main__':
    main()
