"""Registers, spills and shared memory of fused.py's Triton kernels, compiled ahead of time for
sm_80 (A100) and sm_90 (H100) without a GPU.

    python benchmarks/kernel_resources.py

Every launch that `--impl fused` makes at the recipe's sizes (F=64, H=128, a batch of 2^20,
ML-20m's 138,493 users and 26,744 items) is built by fused.py's own launch helpers
(`_forward_launch`, `_backward_launch`) over CPU tensors of the real shapes and dtypes, turned
into the specialisation a launch would compile by Triton's own argument binder, compiled for
each target by `triton.compile`, and its cubin read by the `cuobjdump` shipped in the Triton
wheel.

Covered: the forward for every (tables, compute) dtype pair the recipe calls it with (training:
fp32 tables under fp32/bf16/fp16 compute; scoring: tables cast to bf16/fp16), the backward for
each compute dtype (its tables are the fp32 parameters), every block size the code can pick
(BLOCK_P: each power of two from fused.BACKWARD_BLOCK_P_MIN to _MAX), and two specialisations of
each: `aligned`, what a launch at these sizes compiles (every pointer, width and stride a multiple
of 16, so rows load as 16-byte vectors), and `unaligned`, the same kernel with no divisibility
known, as for a width that is not a multiple of 16 (e.g. -f 60: the same padded tiles, one load
and one address per element).

Prints a table, then one JSON line: {"kernels": [{"name", "target", "dtype" (the compute dtype),
"table_dtype", "specialization", "block", "num_warps", "registers", "spill_bytes",
"stack_bytes", "local_bytes", "shared_bytes"}, ...]}. spill_bytes is the stack plus local memory
of a thread (0 when nothing spills); shared_bytes is a block's static shared memory (on sm_90
cuobjdump counts 1 KiB there for every kernel) plus Triton's dynamic share. Compiled kernels land
in Triton's cache (TRITON_CACHE_DIR, else ~/.triton/cache): a second run takes seconds.
"""
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

# The kernels must be Triton's JIT functions, not the interpreter's: fused._kernels() reads this
# when it first defines them.
os.environ.pop('TRITON_INTERPRET', None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = (80, 90)
F, H = 64, 128
BATCH, USERS, ITEMS = 2 ** 20, 138_493, 26_744
# (tables, compute) dtypes of the forward's calls: training (fp32 parameters, autocast to the
# precision) and the scoring copy (tables cast to the precision).
FORWARD_DTYPES = (('fp32', 'fp32'), ('fp32', 'bf16'), ('fp32', 'fp16'), ('bf16', 'bf16'),
                  ('fp16', 'fp16'))
BACKWARD_DTYPES = ('fp32', 'bf16', 'fp16')  # the incoming gradients' (the compute) dtype
RESOURCES = re.compile(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)')

# (row, source, options, target, cuobjdump) of every compilation: filled before the workers fork,
# which read it by index.
JOBS = []


def fail(message):
    print(f'kernel_resources: {message}', file=sys.stderr)
    sys.exit(2)


def launches(fused, torch):
    """(kernel, args, options, dtype, table_dtype) of every launch the recipe makes."""
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    forward_kernel, backward_kernel = fused._kernels()
    empty = torch.empty  # never written: only shapes, strides, dtypes and alignment count
    user = empty(BATCH, dtype=torch.int64)
    item = empty(BATCH, dtype=torch.int64)
    for table_name, name in FORWARD_DTYPES:
        table, dtype = dtypes[table_name], dtypes[name]
        tables = (empty(USERS, F, dtype=table), empty(ITEMS, F, dtype=table),
                  empty(USERS, H, dtype=table), empty(ITEMS, H, dtype=table))
        _, args, options = fused._forward_launch(user, item, *tables,
                                                 empty(BATCH, F, dtype=dtype),
                                                 empty(BATCH, 2 * H, dtype=dtype))
        yield forward_kernel, args, options, name, table_name
    # The user side's backward: the item side's differs only in n_rows and mlp_column, which
    # specialise alike.
    perm = empty(BATCH, dtype=torch.int64)
    bounds = empty(USERS + 1, dtype=torch.int32)
    mf_item = empty(ITEMS, F, dtype=torch.float32)
    grad_mf, grad_mlp_table = empty(USERS, F), empty(USERS, H)
    block_ps = []
    block_p = fused.BACKWARD_BLOCK_P_MIN
    while block_p <= fused.BACKWARD_BLOCK_P_MAX:
        block_ps.append(block_p)
        block_p *= 2
    for name in BACKWARD_DTYPES:
        dtype = dtypes[name]
        grad_gmf, grad_mlp = empty(BATCH, F, dtype=dtype), empty(BATCH, 2 * H, dtype=dtype)
        for block_p in block_ps:
            _, args, options = fused._backward_launch(perm, bounds, item, mf_item, grad_gmf,
                                                      grad_mlp, grad_mf, grad_mlp_table, 0,
                                                      block_p)
            yield backward_kernel, args, options, name, 'fp32'


def sources(kernel, args, options, arch):
    """{specialization: (ASTSource, compile options)} of this launch on sm_`arch`: what
    `kernel[grid](*args, **options)` would compile there, by Triton's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget('cuda', arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, binder_options = binder(*args, **options)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, options, bound,
                                                             specialization, binder_options)
    return {'aligned': (ASTSource(kernel, signature, constexprs, attrs), parsed.__dict__),
            'unaligned': (ASTSource(kernel, signature, constexprs, {k: [] for k in attrs}),
                          parsed.__dict__)}


def compile_job(index):
    """JOBS[index]'s row, with the compiled kernel's registers, spills and shared memory."""
    import triton

    row, source, options, target, cuobjdump = JOBS[index]
    compiled = triton.compile(source, target=target, options=options)
    with tempfile.TemporaryDirectory(prefix='kernel_resources_') as directory:
        path = os.path.join(directory, 'kernel.cubin')
        with open(path, 'wb') as file:
            file.write(compiled.asm['cubin'])
        done = subprocess.run([cuobjdump, '--dump-resource-usage', path], capture_output=True,
                              text=True)
    found = RESOURCES.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f'cuobjdump could not read {row["name"]}\'s cubin: '
                           f'{(done.stderr or done.stdout).strip()}')
    registers, stack, shared, local = map(int, found.groups())
    return dict(row, registers=registers, spill_bytes=stack + local, stack_bytes=stack,
                local_bytes=local, shared_bytes=shared + compiled.metadata.shared)


def run_jobs():
    """Every job's row, compiled in parallel (forked workers) where the platform allows."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                  else os.cpu_count() or 1, len(JOBS))
    if workers < 2 or 'fork' not in multiprocessing.get_all_start_methods():
        return [compile_job(index) for index in range(len(JOBS))]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('fork')) as pool:
        return list(pool.map(compile_job, range(len(JOBS))))


def main():
    try:
        import triton
    except ImportError:
        fail('triton is not installed (pip install triton): nothing to compile')
    import torch
    from triton.backends.compiler import GPUTarget

    from ncflib import fused

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                             'cuobjdump')
    if not os.access(cuobjdump, os.X_OK):
        fail(f'{cuobjdump} is not here: this Triton wheel ships no CUDA tools')
    # Triton 3.9 warns that its FP-fusion default will change: the same at every launch, noise here.
    warnings.filterwarnings('ignore', message='TRITON_DEFAULT_FP_FUSION')

    for kernel, args, options, dtype, table_dtype in launches(fused, torch):
        block = {k: v for k, v in options.items() if k.startswith('BLOCK_')}
        for arch in TARGETS:
            for specialization, (source, compile_options) in sources(kernel, args, options,
                                                                     arch).items():
                row = {'name': kernel.__name__, 'target': f'sm_{arch}', 'dtype': dtype,
                       'table_dtype': table_dtype, 'specialization': specialization,
                       'block': block, 'num_warps': compile_options.get('num_warps')}
                JOBS.append((row, source, compile_options, GPUTarget('cuda', arch, 32),
                             cuobjdump))
    try:
        rows = run_jobs()
    except RuntimeError as error:
        fail(str(error))
    missing = {k.__name__ for k in fused._kernels()} - {row['name'] for row in rows}
    if missing:
        fail(f'no launch of {", ".join(sorted(missing))} here: add it to launches()')

    header = ('kernel', 'target', 'spec', 'tables->compute', 'block', 'warps', 'regs', 'spill',
              'shared')
    table = [header] + [
        (row['name'], row['target'], row['specialization'],
         f"{row['table_dtype']}->{row['dtype']}",
         ' '.join(f'{k}={v}' for k, v in row['block'].items()), str(row['num_warps']),
         str(row['registers']), str(row['spill_bytes']), str(row['shared_bytes']))
        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f'Triton {triton.__version__}; F={F}, H={H}, batch {BATCH}; regs and spill (stack + '
          'local bytes) per thread, shared bytes per block')
    for line in table:
        print('  '.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print(json.dumps({'kernels': rows}))


if __name__ == '__main__':
    main()
