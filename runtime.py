"""The runtime plan: the one place that knows CPU from CUDA.

From the flags and the machine, `resolve()` decides once: the device and the process group, the
compute precision, the implementation, the micro-batch and evaluation chunk sizes, and the
optimizer's settings. Everything else (training, evaluation, recommendations, inference.py,
hubconf.py, the benchmarks) takes the resulting frozen `Plan` and asks it, never the device.

    implementation  auto       CUDA: compile                CPU: cpu_fused
    precision       auto       CUDA: bf16 (fp16 before      CPU: bf16 where the CPU computes
                               Ampere)                      it natively, else fp32
    micro-batches              CUDA: none                   CPU: at most CPU_MICRO_BATCH samples
"""
import dataclasses
import os
import time

import torch
import torch.distributed as dist

from utils import UsageError

IMPLEMENTATIONS = ('auto', 'eager', 'compile', 'cpu_fused', 'fused')
PRECISIONS = ('auto', 'fp32', 'fp16', 'bf16')
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# On a CPU, a step is split into micro-batches of at most this many samples, whose activations
# stay in cache (the update is the same: the gradients add up); evaluation goes in pieces of it.
CPU_MICRO_BATCH = 16384
# Where torch.compile keeps what it compiled, so that a second run starts in seconds.
COMPILE_CACHE_ENV = 'NCF_COMPILE_CACHE'


def default_compile_cache():
    cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'),
                                                                  '.cache')
    return os.environ.get(COMPILE_CACHE_ENV) or os.path.join(cache_home, 'ncf', 'inductor')


@dataclasses.dataclass(frozen=True)
class Plan:
    device: torch.device
    precision: str               # 'fp32', 'fp16' or 'bf16': the compute dtype
    impl: str                    # 'eager', 'compile', 'cpu_fused' or 'fused'
    micro_batch: int = None      # most samples per forward/backward; None: the whole batch
    valid_batch_size: int = 2 ** 20  # most (user, item) pairs per evaluation forward
    fused_adam: bool = True      # one kernel over all parameters (apex FusedAdam's equivalent)
    rank: int = 0
    world_size: int = 1
    notes: tuple = ()            # why auto picked what it did, for the startup line
    warnings: tuple = ()         # settings that cost a fortune, said once at startup

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def dtype(self):
        return DTYPES[self.precision]

    @property
    def eval_chunk(self):
        """(user, item) pairs per evaluation forward: no more than a micro-batch either."""
        return min(self.valid_batch_size, self.micro_batch or self.valid_batch_size)

    @property
    def compiled(self):
        """Whether the training step and the scoring run under torch.compile."""
        return self.impl in ('compile', 'fused')

    def autocast(self):
        """Mixed precision for the training forward: the weights stay fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.precision != 'fp32')

    def grad_scaler(self):
        """Dynamic loss scaling, which fp16 needs (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == 'fp16')

    def optimizer(self, parameters, lr, betas, eps):
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps, fused=self.fused_adam)

    def time(self):
        """Wall time after the device's queued work has finished: timings include the GPU's."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def generator(self, seed):
        return torch.Generator(device=self.device).manual_seed(seed)

    def model_class(self):
        """The NeuMF class of this implementation; all share the reference's parameters."""
        if self.impl == 'cpu_fused':
            from cpu_fused import CpuFusedNeuMF
            return CpuFusedNeuMF
        if self.impl == 'fused':
            from fused import FusedNeuMF
            return FusedNeuMF
        from neumf import NeuMF
        return NeuMF

    def build_model(self, n_users, n_items, factors, layers, dropout):
        """A freshly initialised model of this implementation, on the CPU (to load weights into
        before it moves to the device)."""
        return self.model_class()(n_users, n_items, factors, layers, dropout)

    def compile(self, function):
        """`function` under torch.compile for the compiled implementations, else unchanged.
        Shapes are static: a step and an evaluation chunk have at most two shapes a run."""
        if not self.compiled:
            return function
        return torch.compile(function, dynamic=False)

    def distributed_model(self, model):
        """DDP around `model` when there are several processes."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def rng_state(self):
        """Every random state a run draws from, for a checkpoint."""
        return {'torch': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state(self.device) if self.device.type == 'cuda'
                else None}

    def set_rng_state(self, state):
        torch.set_rng_state(state['torch'])
        if self.device.type == 'cuda' and state.get('cuda') is not None:
            torch.cuda.set_rng_state(state['cuda'], self.device)

    def describe(self):
        """The startup line."""
        batches = (f'micro-batches of at most {self.micro_batch}' if self.micro_batch
                   else 'whole batches')
        line = (f'Precision: {self.precision}, implementation: {self.impl}, device: {self.device}, '
                f'processes: {self.world_size}, {batches}, '
                f'{"fused" if self.fused_adam else "plain"} Adam')
        return line + (f' ({"; ".join(self.notes)})' if self.notes else '')


def cpu_has_native_bf16():
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX): elsewhere bf16
    is emulated, and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(requested, local_rank=0):
    if requested == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda, but CUDA is not available')
    if requested == 'cuda' or (requested == 'auto' and torch.cuda.is_available()):
        return torch.device('cuda', local_rank % torch.cuda.device_count())
    return torch.device('cpu')


def resolve_precision(device, precision='auto', opt_level=None, amp=False):
    """(precision, note, warning) from --precision and the reference's --opt_level / --amp.

    O0 is fp32; O2 (--amp) is the reference's mixed precision: fp16 with loss scaling on CUDA,
    bf16 on a CPU. auto: bf16 on CUDA where the GPU has it (Ampere on), else fp16; on a CPU,
    bf16 where the CPU computes it natively, else fp32. Contradicting flags are an error.
    """
    if amp and opt_level == 'O0':
        raise UsageError('--amp and --opt_level O0 contradict each other')
    level = 'O2' if amp else opt_level
    if precision != 'auto' and level is not None and (level == 'O0') != (precision == 'fp32'):
        raise UsageError(f'--precision {precision} contradicts --opt_level {level}'
                         f'{" (--amp)" if amp else ""}')
    cuda = device.type == 'cuda'
    note = None
    if precision == 'auto':
        if level == 'O0':
            precision = 'fp32'
        elif level == 'O2':
            precision = 'fp16' if cuda else 'bf16'
        elif cuda:
            precision = 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
            note = f'precision auto: {precision} on this GPU'
        else:
            native = cpu_has_native_bf16()
            precision = 'bf16' if native else 'fp32'
            note = ('precision auto: bf16, native on this CPU' if native else
                    'precision auto: fp32, this CPU has no native bf16')
    if precision == 'fp16' and not cuda:
        raise UsageError('fp16 needs CUDA; on a CPU use --precision bf16 (or auto)')
    warning = None
    if precision == 'bf16' and not cuda and not cpu_has_native_bf16():
        warning = ('bf16 is emulated on this CPU (no AVX512-BF16 or AMX): training runs many '
                   'times slower than in fp32; --precision auto picks fp32 here')
    return precision, note, warning


def resolve_impl(device, impl='auto'):
    """(implementation, note): auto is the one measured fastest on the device."""
    if impl == 'auto':
        impl = 'compile' if device.type == 'cuda' else 'cpu_fused'
        return impl, f'implementation auto: {impl} on {device.type.upper()}'
    if impl == 'cpu_fused' and device.type != 'cpu':
        raise UsageError('--impl cpu_fused is for CPUs; on CUDA use compile, fused or eager')
    if impl == 'fused':
        import fused
        ok, reason = fused.available()
        if not ok:
            raise UsageError(f'--impl fused {reason}')
        if device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
            raise UsageError('--impl fused is for CUDA (on a CPU it runs only in Triton\'s '
                             'interpreter, TRITON_INTERPRET=1, for tests)')
    return impl, None


def resolve(device='auto', precision='auto', impl='auto', opt_level=None, amp=False,
            valid_batch_size=2 ** 20, rank=0, world_size=1, local_rank=0, compile_cache=None):
    """The plan for one process. Joins no process group (see `start`)."""
    device = resolve_device(device, local_rank)
    precision, precision_note, warning = resolve_precision(device, precision, opt_level, amp)
    impl, impl_note = resolve_impl(device, impl)
    cpu = device.type == 'cpu'
    if impl in ('compile', 'fused') and 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
        # torch.compile reads this when it first compiles: a persistent cache makes a second
        # run start in seconds instead of compiling again
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = compile_cache or default_compile_cache()
    return Plan(device=device, precision=precision, impl=impl,
                micro_batch=CPU_MICRO_BATCH if cpu else None, valid_batch_size=valid_batch_size,
                fused_adam=True, rank=rank, world_size=world_size,
                notes=tuple(note for note in (precision_note, impl_note) if note),
                warnings=(warning,) if warning else ())


def baseline(plan):
    """The reference's configuration on the plan's device, the yardstick of the speed-ups: the
    eager model, whole batches, fp16 AMP with apex FusedAdam's equivalent on CUDA, fp32 with
    torch's plain Adam on a CPU (the reference does not run on one)."""
    cuda = plan.device.type == 'cuda'
    return dataclasses.replace(plan, impl='eager', precision='fp16' if cuda else 'fp32',
                               fused_adam=cuda, micro_batch=None, notes=(), warnings=())


def implementations(device):
    """The implementations that run on `device` (not counting Triton's CPU interpreter)."""
    names = ['eager', 'compile', 'cpu_fused' if device.type == 'cpu' else 'fused']
    if device.type == 'cuda':
        import fused
        if not fused.available()[0]:
            names.remove('fused')
    return names


def peak_memory_gib(device):
    """Peak device memory allocated since the last reset, or None on a CPU."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def reset_peak_memory(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    from logger.autologging import hardware_info
    return f'{hardware_info()["cpu"]} ({torch.get_num_threads()} threads)'


def add_arguments(parser):
    """The flags a plan is resolved from, as ncf.py and inference.py take them."""
    parser.add_argument('--opt_level', default=None, type=str, choices=['O0', 'O2'],
                        help="The reference's spelling of --precision: O2 = mixed precision "
                             '(fp16 with loss scaling on CUDA, bf16 on a CPU), O0 = fp32; '
                             'None: --precision decides')
    parser.add_argument('--amp', action='store_true', help='Mixed precision: --opt_level O2')
    parser.add_argument('--precision', choices=PRECISIONS, default='auto',
                        help='Compute precision; auto: bf16 on CUDA (fp16 before Ampere), bf16 '
                             'on a CPU with native bf16 (AVX512-BF16, AMX), fp32 on other CPUs')
    parser.add_argument('--impl', choices=IMPLEMENTATIONS, default='auto',
                        help='Implementation; auto: compile on CUDA, cpu_fused on a CPU. eager: '
                             "the reference's forward; compile: it under torch.compile; "
                             'cpu_fused: hand-written CPU autograd Functions; fused: Triton '
                             'embedding kernels under torch.compile (CUDA)')
    parser.add_argument('--plain', action='store_true', help='Same as --impl eager')
    parser.add_argument('--compile_cache', default=None, metavar='DIR',
                        help='Where torch.compile keeps compiled code, so that a second run '
                             f'starts in seconds (None: ${COMPILE_CACHE_ENV} or '
                             '~/.cache/ncf/inductor; TORCHINDUCTOR_CACHE_DIR, if set, wins)')
    parser.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                        help='auto: CUDA when available')


def parsed(parser, args):
    """`args` with --plain read as --impl eager (a contradiction is the parser's error)."""
    if args.plain:
        if args.impl not in ('auto', 'eager'):
            parser.error(f'--plain means --impl eager, not --impl {args.impl}')
        args.impl = 'eager'
    return args


def start(device='auto', **settings):
    """The plan of this process under torchrun / torch.distributed.launch (or alone), with the
    process group joined: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', settings.pop('local_rank', 0)))
    plan = resolve(device, rank=rank, world_size=world_size, local_rank=local_rank, **settings)
    if plan.device.type == 'cuda':
        torch.cuda.set_device(plan.device)  # before NCCL starts, so each rank owns its GPU
    if plan.distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if plan.device.type == 'cuda' else 'gloo')
    return plan


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()
