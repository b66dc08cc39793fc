"""The runtime plan: the one place that knows CPU from CUDA.

From the flags and the machine, `resolve()` decides once: the device and the process group, the
compute precision, the implementation, the micro-batch and scoring chunk sizes, and the
optimizer's settings. Everything else (training, evaluation, recommendations, inference.py,
hubconf.py, the benchmarks) takes the resulting frozen `Plan` and asks it, never the device.

    implementation  auto       CUDA: compile                CPU: cpu_fused
    precision       auto       CUDA: bf16 where the GPU     CPU: the faster of fp32 and bf16,
                               computes it (Ampere on),     timed once on the model's layers
                               else fp16                    and remembered
    micro-batches              CUDA: none                   CPU: at most CPU_MICRO_BATCH samples
    scoring chunks             CUDA: by device memory       CPU: CPU_MICRO_BATCH pairs
"""
import dataclasses
import importlib
import json
import logging
import os
import platform
import re
import statistics
import time
import warnings

import torch
import torch.distributed as dist

from ncflib.cli import UsageError, first_line, warn
from ncflib.files import atomic_write
from ncflib.models import ModelShape

IMPLEMENTATIONS = ('auto', 'eager', 'compile', 'cpu_fused', 'fused')
# The implementation --impl auto picks on each device type (measured fastest there).
AUTO_IMPLEMENTATION = {'cuda': 'compile', 'cpu': 'cpu_fused'}
PRECISIONS = ('auto', 'fp32', 'tf32', 'fp16', 'bf16')
# tf32: fp32 weights and activations, matrix products on Ampere's TF32 tensor cores.
DTYPES = {'fp32': torch.float32, 'tf32': torch.float32, 'fp16': torch.float16,
          'bf16': torch.bfloat16}
# On a CPU, a step is split into micro-batches of at most this many samples, whose activations
# stay in cache (the update is the same: the gradients add up); evaluation goes in pieces of it.
CPU_MICRO_BATCH = 16384
# On CUDA, full ranking and recommendations score this many (user, item) pairs at most per
# chunk, fewer where a quarter of the device's memory does not hold their activations.
CUDA_SCORING_PAIRS = 2 ** 24
# Where torch.compile keeps what it compiled, so that a second run starts in seconds.
COMPILE_CACHE_ENV = 'NCF_COMPILE_CACHE'
# Beside it, the CPU precision measured fastest, per CPU, thread count, torch and model shape.
CPU_PRECISION_FILE = 'cpu_precision.json'
# The start of the UserWarning torch.compile gives on CUDA while TF32 is off.
TF32_ADVICE = 'TensorFloat32 tensor cores for float32 matrix multiplication available'


def cache_home():
    """Where ncf keeps what it learns about the machine: ~/.cache/ncf (XDG_CACHE_HOME/ncf)."""
    return os.path.join(os.environ.get('XDG_CACHE_HOME')
                        or os.path.join(os.path.expanduser('~'), '.cache'), 'ncf')


def default_compile_cache():
    return os.environ.get(COMPILE_CACHE_ENV) or os.path.join(cache_home(), 'inductor')


@dataclasses.dataclass(frozen=True)
class Plan:
    device: torch.device
    precision: str               # 'fp32', 'fp16' or 'bf16': the compute dtype
    impl: str                    # 'eager', 'compile', 'cpu_fused' or 'fused'
    micro_batch: int = None      # most samples per forward/backward; None: the whole batch
    valid_batch_size: int = 2 ** 20  # most (user, item) pairs per evaluation forward
    fused_optimizer: bool = True  # one kernel over all parameters (apex FusedAdam's equivalent)
    rank: int = 0
    world_size: int = 1
    notes: tuple = ()            # why auto picked what it did, for the startup line
    warnings: tuple = ()         # settings that cost a fortune, said once at startup
    device_memory: int = None    # bytes of device memory (CUDA), which sizes scoring chunks
    compile_fallback: bool = False  # auto chose compiling: if it fails, run eager (one line)
    # the compiler failures said so far: each once a run, however many functions hit it
    failures_said: set = dataclasses.field(default_factory=set, compare=False, repr=False)

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

    def scoring_rows(self, n_items, bytes_per_pair):
        """Users per chunk of full ranking or recommendations, each scored against all `n_items`:
        on CUDA as many as a quarter of the device's memory holds at `bytes_per_pair` (the
        model's activations per (user, item) pair), at most CUDA_SCORING_PAIRS pairs; on a CPU,
        pieces of an evaluation chunk, whose activations stay in cache."""
        if self.device.type == 'cuda':
            pairs = min(CUDA_SCORING_PAIRS, self.device_memory // 4 // bytes_per_pair)
        else:
            pairs = self.eval_chunk
        return max(1, pairs // n_items)

    @property
    def compiled(self):
        """Whether the training step and the scoring run under torch.compile."""
        return self.impl in ('compile', 'fused')

    @property
    def static_shapes(self):
        """Whether a step's tensors keep their shapes from step to step: under torch.compile (a
        new shape compiles again) and on CUDA (sizing a tensor by a count read back would wait
        for the device). Elsewhere (eager and cpu_fused on a CPU) a count is read for free."""
        return self.compiled or self.device.type == 'cuda'

    @property
    def whole_step(self):
        """Whether the compiled training step holds the optimizer's update too (whole_step.py):
        --impl compile on a CPU, in one process (DDP's all-reduce hooks into autograd, which
        this step leaves out; on CUDA, unmeasured). Not where auto chose to compile: a compiler
        failure there must run the eager implementation, and this step's eager form differs
        from it in the last bits (its Adam is not the fused kernel)."""
        return self.impl == 'compile' and self.device.type == 'cpu' and not self.distributed \
            and not self.compile_fallback

    @property
    def kept_table_gradients(self):
        """Whether the tables' dense gradients are kept from step to step, the backward adding
        each micro-batch's rows into them and the step zeroing only the rows it touched:
        cpu_fused's Functions write the gradients themselves (autograd's embedding backward
        makes a table-sized one of its own), and not under DDP, which needs autograd to hand
        every gradient over for its all-reduce."""
        return self.impl == 'cpu_fused' and not self.distributed

    def autocast(self):
        """Mixed precision for the training forward: the weights stay fp32. Off where the
        compute dtype is fp32 (fp32, and tf32, whose TF32 products are a matmul setting)."""
        return torch.autocast(self.device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def grad_scaler(self):
        """Dynamic loss scaling, which fp16 needs (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == 'fp16')

    def optimizer(self, parameters, name='adam', lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        """torch's Adam (the reference's, as apex FusedAdam) or plain SGD (the NCF paper's for
        a NeuMF from pretrained branches), fused where the plan says; `parameters` may be
        groups with their own weight_decay."""
        if name == 'sgd':
            return torch.optim.SGD(parameters, lr=lr, fused=self.fused_optimizer)
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps,
                                fused=self.fused_optimizer)

    def time(self):
        """Wall time after the device's queued work has finished: timings include the GPU's."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def generator(self, seed):
        return torch.Generator(device=self.device).manual_seed(seed)

    def build_model(self, shape, n_users, n_items):
        """A freshly initialised model of `shape` (models.ModelShape) in this implementation,
        on the CPU (to load weights into before it moves to the device)."""
        return shape.build(n_users, n_items, model_classes(self.impl))

    def compile(self, function, dynamic=False, options=None):
        """`function` (or module) under torch.compile, as one graph (fullgraph), for the
        compiled implementations; else unchanged. Shapes are static unless `dynamic`: a step
        and an evaluation chunk have at most two shapes a run. Where auto chose to compile, a
        compiler that fails (Triton missing or too old for the GPU, a compiler error) makes it
        run eager, saying so in one line; where --impl asked for it, that is an error."""
        if not self.compiled:
            return function
        logging.getLogger('torch._dynamo.convert_frame').addFilter(_not_the_recompile_limit)
        compiled = torch.compile(function, dynamic=dynamic, fullgraph=True, options=options)
        if isinstance(function, torch.nn.Module):
            return CompiledModule(function, compiled, self)
        return Compiled(function, compiled, self)

    def distributed_model(self, model):
        """DDP around `model` when there are several processes. For a compiled step, `model` is
        the compiled module: DDP's own forward then stays outside the graph, which holds the
        whole step (Dynamo tracing into DDP's forward would break it into several)."""
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
                f'{"fused" if self.fused_optimizer else "plain"} optimizer'
                f'{", the optimizer inside the compiled step" if self.whole_step else ""}')
        return line + (f' ({"; ".join(self.notes)})' if self.notes else '')


def model_classes(impl):
    """{model name: class} of an implementation; all share the plain models' parameters."""
    if impl == 'cpu_fused':
        from ncflib import cpu_fused
        return cpu_fused.MODEL_CLASSES
    if impl == 'fused':
        from ncflib import fused
        return fused.MODEL_CLASSES
    from ncflib import models
    return models.MODEL_CLASSES


class CompileError(UsageError):
    """torch.compile failed where --impl asked for it (one line, exit status 1)."""


def _not_the_recompile_limit(record):
    """Whether a log record of Dynamo's is not its warning of the recompile limit (five lines),
    which _compile_failure says in one (added once: Logger.addFilter keeps one of each)."""
    return not str(record.msg).startswith('torch._dynamo hit config.')


def _compiler_failure(error):
    """'Type: first line' of the compiler's own failure that `error` is, or None where `error`
    is the code's (which the eager function raises too)."""
    exc = torch._dynamo.exc
    if isinstance(error, exc.FailOnRecompileLimitHit):
        # fullgraph=True past config.recompile_limit shapes (torch/_dynamo/convert_frame.py);
        # not a TorchDynamoException. Why is in the Unsupported it is raised from.
        return f'{type(error).__name__}: {first_line(error.__cause__ or error, 300)}'
    if not isinstance(error, exc.TorchDynamoException):
        return None
    # the compiler's own error, which Dynamo wraps (BackendCompilerFailed)
    cause = getattr(error, 'inner_exception', None) or error
    return f'{type(cause).__name__}: {first_line(cause, 300)}'


def _compile_failure(error, plan, fallen_back):
    """What to do when the compiled function raised `error`: True to run eager instead (auto
    chose to compile; said once), or raise. Errors of the code itself (not of the compiler)
    come back from the eager function too."""
    reason = _compiler_failure(error)
    if reason is None:
        raise error
    if not plan.compile_fallback:
        raise CompileError(f'torch.compile failed ({reason}); --impl eager runs without '
                           'compiling') from None
    if not fallen_back and reason not in plan.failures_said:
        plan.failures_said.add(reason)
        warn(f'torch.compile failed ({reason}): running eager instead (--impl compile makes '
             'this an error)')
    return True


class Compiled:
    """A compiled function that runs eager for good once the compiler failed (auto only)."""

    def __init__(self, function, compiled, plan):
        self.function, self.compiled, self.plan = function, compiled, plan
        self.eager = False

    def __call__(self, *args, **kwargs):
        if not self.eager:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # sorted out by _compile_failure
                self.eager = _compile_failure(error, self.plan, self.eager)
        return self.function(*args, **kwargs)


class CompiledModule(torch.nn.Module):
    """A compiled module, as a module DDP can wrap (its parameters are the module's), that runs
    eager for good once the compiler failed (auto only)."""

    def __init__(self, module, compiled, plan):
        super().__init__()
        self.module = module
        self.__dict__['compiled'] = compiled  # not a submodule: the same parameters again
        self.plan, self.eager = plan, False

    def forward(self, *args, **kwargs):
        if not self.eager:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as error:  # sorted out by _compile_failure
                self.eager = _compile_failure(error, self.plan, self.eager)
        return self.module(*args, **kwargs)


def cpu_name():
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open('/proc/cpuinfo') as file:
            for line in file:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16():
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX): elsewhere bf16
    is emulated, and many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process among those of a run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE: the processes on this machine)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(requested='auto', processes=Processes()):
    """This process's device: `requested` is 'auto' (CUDA where there is a GPU, else the CPU)
    or any device string or torch.device ncf runs on: 'cpu', 'cuda' (a process's own GPU: its
    local rank's under torchrun), 'cuda:N'. One line (UsageError) for CUDA where there is
    none, a GPU this machine lacks, more processes on it than GPUs, or another device type."""
    if requested == 'auto':
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):  # not a device string torch knows
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UsageError(f'device {str(requested)!r}: ncf runs on cpu, cuda or cuda:N')
    if device.type == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UsageError(f'device {requested} asked for, but CUDA is not available')
    gpus = torch.cuda.device_count()
    if device.index is not None and device.index >= gpus:
        raise UsageError(f'device {requested}, but this machine has {_gpus(gpus)} (cuda:0 to '
                         f'cuda:{gpus - 1})')
    # Processes sharing a GPU make NCCL fail later, with an error that does not say why.
    here = max(processes.local_world_size, processes.local_rank + 1)
    if device.index is not None and here > 1:
        raise UsageError(f'device {requested} would put the {here} processes of this machine on '
                         'one GPU: use cuda (a GPU each)')
    if here > gpus:
        raise UsageError(f'local rank {processes.local_rank} of {here} processes on this machine '
                         f'(LOCAL_WORLD_SIZE), but it has {_gpus(gpus)}: one process per GPU '
                         f'(torchrun --nproc_per_node {gpus} at most)')
    return device if device.index is not None else torch.device('cuda', processes.local_rank)


def _gpus(count):
    return f'{count} GPU{"" if count == 1 else "s"}'


def cuda_is_ampere_or_newer(device):
    """Whether the GPU `device` (its own, not the current one: asking creates no context on
    another GPU) computes bf16 and TF32 in hardware (compute capability 8.0 on); older GPUs
    emulate bf16, slower than fp16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(device, precision='auto', opt_level=None, amp=False, measure=None):
    """(precision, note, warning) from --precision and the reference's --opt_level / --amp.

    O0 is fp32; O2 (--amp) is the reference's mixed precision: fp16 with loss scaling on CUDA,
    bf16 on a CPU. auto: bf16 on a GPU that computes it (Ampere on), else fp16; on a CPU, what
    `measure()` returns, (precision, note): the faster of fp32 and bf16 there. tf32 is fp32
    with TF32 matrix products (CUDA, Ampere on); fp32 is strict. Contradicting flags are an
    error.
    """
    if amp and opt_level == 'O0':
        raise UsageError('--amp and --opt_level O0 contradict each other')
    level = 'O2' if amp else opt_level
    full_precision = ('fp32', 'tf32')
    if precision != 'auto' and level is not None and \
            (level == 'O0') != (precision in full_precision):
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
            precision = 'bf16' if cuda_is_ampere_or_newer(device) else 'fp16'
            note = f'precision auto: {precision} on this GPU'
        else:
            precision, note = measure()
    if precision == 'fp16' and not cuda:
        raise UsageError('fp16 needs CUDA; on a CPU use --precision bf16 (or auto)')
    if precision == 'tf32' and not (cuda and cuda_is_ampere_or_newer(device)):
        raise UsageError('tf32 needs an Ampere or newer GPU; use --precision fp32')
    warning = None
    if precision == 'bf16' and not cuda and not cpu_has_native_bf16():
        warning = ('bf16 is emulated on this CPU (no AVX512-BF16 or AMX): training runs many '
                   'times slower than in fp32; --precision auto picks fp32 here')
    return precision, note, warning


def measure_cpu_precisions(impl, shape, rounds=3):
    """Seconds of one training micro-step (forward, loss and backward of CPU_MICRO_BATCH / 4
    samples, dropout 0.5) of the model of `shape` (models.ModelShape) in implementation `impl`,
    in fp32 and in bf16: {'fp32':
    s, 'bf16': s}, the median of up to `rounds`, the precisions interleaved, after a round that
    sets up oneDNN's kernels. A first timed round that finds one 1.5 times the other decides
    (an emulated bf16 is many times slower: no need to time it thrice). The tables are small
    (the step's cost is in its layers); the global random state is left as it was."""
    import torch.nn.functional as F

    batch = CPU_MICRO_BATCH // 4
    random_state = torch.get_rng_state()  # the initialisation and dropout draw from it
    try:
        generator = torch.Generator().manual_seed(0)
        rows = 1024
        model = dataclasses.replace(shape, dropout=0.5).build(rows, rows, model_classes(impl))
        users, items = (torch.randint(0, rows, (batch,), generator=generator)
                        for _ in range(2))
        labels = (torch.rand(batch, generator=generator) < 0.2).float()
        seconds = {'fp32': [], 'bf16': []}
        for round_ in range(rounds + 1):
            for precision in seconds:
                start = time.perf_counter()
                with torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
                    logits = model(users, items)
                F.binary_cross_entropy_with_logits(logits.float().view(-1), labels).backward()
                if round_:
                    seconds[precision].append(time.perf_counter() - start)
            if round_ == 1 and max(seconds['fp32'][0], seconds['bf16'][0]) \
                    > 1.5 * min(seconds['fp32'][0], seconds['bf16'][0]):
                break
    finally:
        torch.set_rng_state(random_state)
    return {precision: statistics.median(times) for precision, times in seconds.items()}


def cpu_precision_by_measurement(impl, shape):
    """(precision, note): the faster of fp32 and bf16 for the model of `shape` on this CPU,
    measured once (well under a second) and remembered in cache_home()/cpu_precision.json per
    CPU, thread count, torch version, implementation, model and sizes. CPUs differ: one with
    AVX512-BF16 trains faster in fp32, another in bf16."""
    key = (f'{cpu_name()}; {torch.get_num_threads()} threads; torch '
           f'{torch.__version__}; {impl}; {shape.describe()}')
    path = os.path.join(cache_home(), CPU_PRECISION_FILE)
    remembered, seconds, where = {}, None, f'remembered in {path}'
    try:
        with open(path) as file:
            remembered = json.load(file)
        seconds = {name: float(remembered[key][name]) for name in ('fp32', 'bf16')}
    except (OSError, ValueError, KeyError, TypeError):  # not measured yet, or unreadable
        remembered = remembered if isinstance(remembered, dict) else {}
    if seconds is None:
        where = 'measured now'
        seconds = measure_cpu_precisions(impl, shape)
        record = json.dumps({**remembered, key: seconds}, indent=1) + '\n'

        def write(temporary):
            with open(temporary, 'w') as file:
                file.write(record)
        try:
            atomic_write(path, write, make_parents=True)
        except OSError:  # nowhere to remember it: measured again next time
            pass
    precision = min(seconds, key=seconds.get)
    other = 'bf16' if precision == 'fp32' else 'fp32'
    return precision, (f'precision auto: {precision}, the faster on this CPU (a training '
                       f'step of {CPU_MICRO_BATCH // 4} samples {seconds[precision] * 1000:.1f} '
                       f'ms, {seconds[other] * 1000:.1f} ms in {other}; {where})')


def resolve_impl(device, impl='auto', model='neumf'):
    """(implementation, note): auto is the one measured fastest on the device, for every model
    of the family (`model`)."""
    if impl == 'auto':
        impl = AUTO_IMPLEMENTATION[device.type]
        return impl, f'implementation auto: {impl} on {device.type.upper()}'
    if impl == 'cpu_fused' and device.type != 'cpu':
        raise UsageError('--impl cpu_fused is for CPUs; on CUDA use compile, fused or eager')
    if impl == 'fused' and model not in model_classes('fused'):
        raise UsageError(f'--impl fused gathers NeuMF\'s four tables; --model {model} runs with '
                         '--impl compile (the auto choice on CUDA)')
    if impl == 'fused':
        from ncflib import fused
        ok, reason = fused.available()
        if not ok:
            raise UsageError(f'--impl fused {reason}')
        if device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
            raise UsageError('--impl fused is for CUDA (on a CPU it runs only in Triton\'s '
                             'interpreter, TRITON_INTERPRET=1, for tests)')
    return impl, None


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """What the user asked of the plan: the flags `add_arguments` defines (--plain is --impl
    eager)."""
    device: str = 'auto'         # or 'cpu', 'cuda', 'cuda:N', a torch.device (resolve_device)
    precision: str = 'auto'
    impl: str = 'auto'
    opt_level: str = None
    amp: bool = False
    compile_cache: str = None

    @classmethod
    def from_flags(cls, flags):
        """The options among `flags`, a dict of flag values (more may be there)."""
        impl = flags['impl']
        if flags.get('plain'):
            if impl not in ('auto', 'eager'):
                raise UsageError(f'--plain means --impl eager, not --impl {impl}')
            impl = 'eager'
        return cls(device=flags['device'], precision=flags['precision'], impl=impl,
                   opt_level=flags['opt_level'], amp=flags['amp'],
                   compile_cache=flags['compile_cache'])


def resolve(options=PlanOptions(), model_shape=ModelShape(), valid_batch_size=2 ** 20,
            processes=Processes(), measure=cpu_precision_by_measurement):
    """The plan for one process. Joins no process group (see `start`).

    model_shape: the models.ModelShape of the model (default: the reference's), on which a CPU's
    precision is measured by measure(impl, model_shape) -> (precision, note)."""
    device = resolve_device(options.device, processes)
    impl, impl_note = resolve_impl(device, options.impl, model_shape.model)
    precision, precision_note, warning = resolve_precision(
        device, options.precision, options.opt_level, options.amp,
        lambda: measure(impl, model_shape))
    cpu = device.type == 'cpu'
    compiled = impl in ('compile', 'fused')
    if compiled and 'TORCHINDUCTOR_CACHE_DIR' not in os.environ:
        # torch.compile reads this when it first compiles: a persistent cache makes a second
        # run start in seconds instead of compiling again
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = options.compile_cache or default_compile_cache()
    if not cpu:
        # TF32 matrix products only where asked for: fp32 stays strict
        torch.set_float32_matmul_precision('high' if precision == 'tf32' else 'highest')
        # torch.compile advises TF32 whenever it is off; here that is the plan's choice
        # (--precision tf32 turns it on), so the advice is noise in every run's output
        warnings.filterwarnings('ignore', message=TF32_ADVICE)
    return Plan(device=device, precision=precision, impl=impl,
                micro_batch=CPU_MICRO_BATCH if cpu else None, valid_batch_size=valid_batch_size,
                fused_optimizer=True, rank=processes.rank, world_size=processes.world_size,
                notes=tuple(note for note in (precision_note, impl_note) if note),
                warnings=(warning,) if warning else (),
                device_memory=None if cpu else torch.cuda.get_device_properties(device)
                .total_memory,
                compile_fallback=compiled and options.impl == 'auto')


def baseline(plan):
    """The reference's configuration on the plan's device, the yardstick of the speed-ups: the
    eager model, whole batches, fp16 AMP with apex FusedAdam's equivalent on CUDA, fp32 with
    torch's plain Adam on a CPU (the reference does not run on one)."""
    cuda = plan.device.type == 'cuda'
    return dataclasses.replace(plan, impl='eager', precision='fp16' if cuda else 'fp32',
                               fused_optimizer=cuda, micro_batch=None, notes=(), warnings=())


def implementations(device):
    """The implementations that run on `device` (not counting Triton's CPU interpreter)."""
    names = ['eager', 'compile', 'cpu_fused' if device.type == 'cpu' else 'fused']
    if device.type == 'cuda':
        from ncflib import fused
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
    return f'{cpu_name()} ({torch.get_num_threads()} threads)'


def add_arguments(parser):
    """The flags a plan is resolved from, as ncf.py and inference.py take them."""
    parser.add_argument('--opt_level', default=None, type=str, choices=['O0', 'O2'],
                        help="The reference's spelling of --precision: O2 = mixed precision "
                             '(fp16 with loss scaling on CUDA, bf16 on a CPU), O0 = fp32; '
                             'None: --precision decides')
    parser.add_argument('--amp', action='store_true', help='Mixed precision: --opt_level O2')
    parser.add_argument('--precision', choices=PRECISIONS, default='auto',
                        help='Compute precision; auto: bf16 on a GPU that computes it (Ampere '
                             'on), else fp16; on a CPU the faster of fp32 and bf16, timed once '
                             'and remembered. tf32: fp32 with TF32 matrix products (CUDA, Ampere '
                             'on); fp32 is strict')
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
                        help='auto: CUDA when available. Under torchrun each process takes its '
                             "local rank's GPU: at most one process per GPU")


def join(options=PlanOptions(), local_rank=0):
    """This process among those of a run under torchrun / torch.distributed.launch (or alone),
    with the process group joined: NCCL on CUDA, bound to this process's GPU, gloo on CPU.
    local_rank: the launcher's --local_rank flag, where it sets no LOCAL_RANK."""
    processes = Processes(rank=int(os.environ.get('RANK', 0)),
                          world_size=int(os.environ.get('WORLD_SIZE', 1)),
                          local_rank=int(os.environ.get('LOCAL_RANK', local_rank)),
                          local_world_size=int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    device = resolve_device(options.device, processes)
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so that each rank owns its GPU
    if processes.distributed and not dist.is_initialized():
        # torch.distributed.nn's functions take group.WORLD as a default argument, bound when
        # it is imported: imported after the group exists (DDP imports it), it would hold the
        # group for good, and `stop` could not end the group's threads
        importlib.import_module('torch.distributed.nn.functional')
        # device_id: NCCL forms its communicator on this GPU now (an error here, not at the
        # first collective), and barrier() knows the device
        dist.init_process_group(backend='nccl' if cuda else 'gloo',
                                device_id=device if cuda else None)
    return processes


def start(options=PlanOptions(), model_shape=ModelShape(), valid_batch_size=2 ** 20,
          processes=Processes()):
    """The plan of this process among `processes` (from `join`): under torchrun, rank 0
    measures what is measured and the others take its answer."""
    measure = cpu_precision_by_measurement
    if processes.distributed:
        def measure(impl, shape):
            # processes timing at once would slow each other down, and could disagree
            answer = [cpu_precision_by_measurement(impl, shape) if processes.rank == 0
                      else None]
            dist.broadcast_object_list(answer, src=0)
            return answer[0]
    return resolve(options, model_shape, valid_batch_size, processes, measure)


# Collectives: what the processes of a run do together.

def together(plan, function, *args):
    """`function(*args)` on every process of `plan` (a Plan, or the Processes of `join`); a
    failure on any of them (bad input, or an error
    such as running out of memory) stops all of them, else the others would wait for it in the
    next collective until its timeout. The failing process raises its own error; the others
    raise a UsageError naming it, which rank 0 prints (when rank 0 failed, its own line)."""
    error = None
    try:
        result = function(*args)
    except Exception as raised:  # every failure is shared first, then raised
        error = raised
    if plan.distributed:
        shared = [None] * plan.world_size
        dist.all_gather_object(shared, None if error is None
                               else describe_failure(error, plan.rank))
        failed = next((rank for rank, message in enumerate(shared) if message is not None),
                      None)
        if failed is not None and error is None:
            error = UsageError(shared[failed])
    if error is not None:
        raise error
    return result


def describe_failure(error, rank):
    """One line for a failure that process `rank` reports to the others: a UsageError's own
    message (every process finds the same bad input), else the process, the exception's type
    and its first line."""
    if isinstance(error, UsageError):
        return str(error)
    return f'process {rank} failed: {type(error).__name__}: {first_line(error, 300)}'


def all_reduce_sums(values, plan):
    """Sum float64 figures over all ranks in one collective, then read them once on the host."""
    totals = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=plan.device)
                          for value in values])
    if plan.distributed:
        dist.all_reduce(totals)
    return totals.tolist()


def barrier(plan):
    """Wait for every process (to start a clock together, say)."""
    if plan.distributed:
        dist.barrier()


def peer_failure(error):
    """Where `error` is a collective's, failing because another process of the run failed or
    was stopped (its connection closed; gloo's and NCCL's errors): what it says, shortened.
    None for any other error."""
    text = first_line(error)
    if isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                             and ('gloo' in text or 'NCCL' in text)):
        # without the source location gloo starts with, and its closing advice
        return re.sub(r'^\[[^\]]*\]\s*', '', text).split('. ')[0]
    return None


def stop():
    """Leave the process group, whose threads end once nothing holds it (DDP's model neither):
    here, or when Python drops the exception a failed run exits with. They must end before the
    interpreter does: gloo's thread releases a collective's work, which holds Python's tensors,
    just after the collective returned (later on a loaded machine), taking the GIL; once the
    interpreter is exiting, that kills the thread mid-destructor, and the process aborts
    (std::terminate: 'terminate called without an active exception', SIGABRT)."""
    if dist.is_initialized():
        dist.destroy_process_group()
