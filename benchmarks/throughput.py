"""Training and evaluation samples/s of the plain and the fast path, in one run, on CPU or GPU.

    python benchmarks/throughput.py                       # GPU: ML-20m's shape; CPU: ML-1m's
    python benchmarks/throughput.py --device cpu --batch_size 65536
    python benchmarks/throughput.py --data data/cache/ml-20m

Both paths run ncf.py's own code (model, batches, optimizer, train_epoch, validate), so the figures
are what `python ncf.py` gets: the fast path with its defaults, the plain path with `--plain` at
the baseline precision (fp32 on CPU: a plain eager PyTorch loop; --plain_precision to change).
Without --data, MovieLens-shaped synthetic data is generated and converted first (cached in
--workdir). For each path it times, with device synchronisation: a training step (median of
--steps after warm-up), a whole epoch (negative sampling and shuffling included), one full
evaluation, and the time from building the model to the end of the first step. The last line
is JSON.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import convert  # noqa: E402
import dataloading  # noqa: E402
import ncf  # noqa: E402
import synthetic  # noqa: E402

SHAPES = {  # (users, items, rows) of the generated data
    'ml-20m': (138_493, 26_744, 20_000_000),
    'ml-1m': (6_040, 3_706, 1_000_000),
}


def prepare_data(args, device):
    if args.data:
        return args.data
    shape = args.shape or ('ml-20m' if device.type == 'cuda' else 'ml-1m')
    users, items, rows = SHAPES[shape]
    directory = os.path.join(args.workdir, f'synthetic-{shape}')
    cache = os.path.join(directory, 'cache')
    if not os.path.exists(os.path.join(cache, dataloading.METADATA_FILE)):
        print(f'Generating {shape}-shaped synthetic data in {directory} ...', file=sys.stderr)
        ratings = os.path.join(directory, 'ratings.csv')
        synthetic.write_csv(ratings, synthetic.generate(users, items, rows, seed=args.seed),
                            layout='ml-20m')
        convert.main(['--path', ratings, '--output', cache])
    return cache


def time_path(name, argv, dataset, device, steps):
    """Time one path; returns its figures."""
    args = ncf.parse_args(argv)
    args.world_size, args.rank, args.distributed = 1, 0, False
    precision = ncf.resolve_precision(args, device)
    dtype = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    start = ncf.synchronized_time(device)
    model = ncf.build_model(args, dataset).to(device)
    optimizer = ncf.build_optimizer(args, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    batches = ncf.build_batches(args, dataset, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    users, items, labels = batches.epoch(generator)

    def step(index):
        index %= batches.steps
        for micro in range(batches.micro_batches):
            with autocast():
                logits = model(users[index, micro], items[index, micro])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.float().view(-1), labels[index, micro])
            scaler.scale(loss / batches.micro_batches).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    first_step = ncf.synchronized_time(device) - start
    for index in range(1, 3):  # warm-up
        step(index)
    step_times = []
    for index in range(3, 3 + steps):
        begin = ncf.synchronized_time(device)
        step(index)
        step_times.append(ncf.synchronized_time(device) - begin)
    step_time = statistics.median(step_times)

    begin = ncf.synchronized_time(device)
    ncf.train_epoch(model, optimizer, scaler, batches, generator, autocast, False,
                    lambda steps: steps)
    epoch_time = ncf.synchronized_time(device) - begin

    evaluation = ncf.Evaluation(dataset, args, device)
    evaluation(model, autocast)  # warm-up
    begin = ncf.synchronized_time(device)
    hr, _, _ = evaluation(model, autocast)
    eval_time = ncf.synchronized_time(device) - begin
    figures = {
        'precision': precision,
        'batch_size': args.batch_size,
        'micro_batches': batches.micro_batches,
        'step_ms': step_time * 1000,
        'train_step_samples_per_s': args.batch_size / step_time,
        'train_epoch_samples_per_s': batches.steps * args.batch_size / epoch_time,
        'epoch_s': epoch_time,
        'eval_samples_per_s': evaluation.samples / eval_time,
        'eval_s': eval_time,
        'first_step_s': first_step,
        'hr_after_one_epoch': round(hr, 4),
    }
    if device.type == 'cuda':
        figures['peak_memory_gib'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    print(f'{name:>5}: {precision}, step {figures["step_ms"]:.2f} ms = '
          f'{figures["train_step_samples_per_s"]:.3e} samples/s, epoch {epoch_time:.2f} s = '
          f'{figures["train_epoch_samples_per_s"]:.3e} samples/s, eval {eval_time:.2f} s = '
          f'{figures["eval_samples_per_s"]:.3e} samples/s, first step after '
          f'{first_step:.2f} s', file=sys.stderr, flush=True)
    return figures


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    from logger.autologging import hardware_info
    return f'{hardware_info()["cpu"]} ({torch.get_num_threads()} threads)'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data', help='a cache to use (default: generate synthetic data)')
    parser.add_argument('--shape', choices=sorted(SHAPES),
                        help='generated data shape (default: ml-20m on GPU, ml-1m on CPU)')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto')
    parser.add_argument('--batch_size', type=int, default=None,
                        help='global batch (default: 1048576 on GPU, 65536 on CPU)')
    parser.add_argument('--steps', type=int, default=10, help='timed training steps')
    parser.add_argument('--plain_precision', default=None, choices=['fp32', 'fp16', 'bf16'],
                        help='precision of the plain path (default: fp32 on CPU, the '
                             "reference's fp16 AMP on GPU)")
    parser.add_argument('--extra', default='',
                        help='more ncf.py flags for both paths, e.g. "--dropout 0"')
    parser.add_argument('--workdir', default=os.path.join(tempfile.gettempdir(), 'ncf-bench'))
    parser.add_argument('-s', '--seed', type=int, default=1)
    args = parser.parse_args()

    use_cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    device = torch.device('cuda' if use_cuda else 'cpu')
    batch_size = args.batch_size or (2 ** 20 if use_cuda else 2 ** 16)
    plain_precision = args.plain_precision or ('fp16' if use_cuda else 'fp32')
    data = prepare_data(args, device)
    dataset = dataloading.load_dataset(data, device)
    print(f'{device_name(device)}: {dataset.n_users:,} users, {dataset.n_items:,} items, '
          f'{len(dataset.train_users):,} training positives, batch {batch_size:,}',
          file=sys.stderr)

    common = ['--data', data, '-b', str(batch_size), '--device', device.type,
              '-s', str(args.seed)] + args.extra.split()
    plain = time_path('plain', common + ['--plain', '--precision', plain_precision], dataset,
                      device, args.steps)
    fast = time_path('fast', common, dataset, device, args.steps)
    result = {
        'benchmark': 'throughput',
        'device': device_name(device),
        'torch': torch.__version__,
        'python': platform.python_version(),
        'shape': {'n_users': dataset.n_users, 'n_items': dataset.n_items,
                  'n_train': len(dataset.train_users), 'n_test': dataset.n_users,
                  'negative_samples': ncf.parse_args(common).negative_samples,
                  'valid_negative': dataset.test_negatives.shape[1]},
        'batch_size': batch_size,
        'plain': plain,
        'fast': fast,
        'train_speedup': round(fast['train_epoch_samples_per_s']
                               / plain['train_epoch_samples_per_s'], 2),
        'train_step_speedup': round(fast['train_step_samples_per_s']
                                    / plain['train_step_samples_per_s'], 2),
        'eval_speedup': round(fast['eval_samples_per_s'] / plain['eval_samples_per_s'], 2),
    }
    print(f'train speedup {result["train_speedup"]}x (epoch), {result["train_step_speedup"]}x '
          f'(step); eval speedup {result["eval_speedup"]}x', file=sys.stderr)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
