"""The Python side of prepare_dataset.sh: its checks, the extraction, the file digests and the
decision to convert, each ending in one line on failure (exit status 1).

    python prepare.py [--kept TEXT] check RAW_DIR CACHE_DIR RATINGS     the directories first
    python prepare.py [--kept TEXT] extract ZIP MEMBER TARGET             unless done already
    python prepare.py [--kept TEXT] decide RATINGS CACHE_DIR [--validation_holdout]
                                                                          exit 0: reuse, 3: convert
    python prepare.py [--kept TEXT] command CACHE_DIR                     the training command

--kept: what the script has left as it was, for the line of an interrupted step.
"""
import hashlib
import json
import os
import shlex
import sys
import zipfile

from ncflib.cache import CACHE_VERSION, METADATA_FILE, MIN_RATINGS, SEED, VALID_NEGATIVE
from ncflib.cli import (UsageError, check_output_file, check_writable_directory,
                        handle_signals_late, import_held, run_main)
from ncflib.files import atomic_write, remember_sha256, remembered_sha256
from ncflib.recipe import DEFAULT_BATCH_SIZE, DEFAULT_NEGATIVE_SAMPLES

PROGRAM = 'prepare_dataset.sh'
CONVERT = 3  # decide's exit status when the cache must be converted (again)
HOLDOUT = '--validation_holdout'  # convert.py's option, which decide weighs


def check(raw, cache, ratings):
    """Before any work: the directories that will be written can be."""
    if not os.path.isfile(ratings):
        check_writable_directory(raw, 'RAW_DIR')
    if not os.path.isfile(os.path.join(cache, METADATA_FILE)):
        check_writable_directory(cache, 'CACHE_DIR')


def extract(archive, member, target):
    """Extract `member` unless the file there came from this very zip (by sha256)."""
    stamp = target + '.zip-sha256'
    try:  # a bad zip is reported before anything is written, a digest included
        with zipfile.ZipFile(archive) as zipped:
            zipped.getinfo(member)
    except (zipfile.BadZipFile, KeyError, EOFError) as error:
        raise UsageError(f'cannot extract {member} from {archive}: {error}') from None
    digest, _ = remembered_sha256(archive, log=print)
    try:
        with open(stamp) as file:
            extracted_from = file.read().strip()
    except OSError:
        extracted_from = None
    if os.path.isfile(target) and extracted_from == digest:
        print(f'Using {target}')
        return
    print(f'Extracting {member} from {archive}'
          + (' (the zip has changed since it was last extracted)' if extracted_from else ''))
    check_output_file(target, 'RAW_DIR')
    if os.path.exists(stamp):  # no stamp until the new file is whole
        os.remove(stamp)
    extracted = hashlib.sha256()

    def write(temporary):
        with zipfile.ZipFile(archive) as zipped, zipped.open(member) as source, \
                open(temporary, 'wb') as sink:
            while chunk := source.read(1 << 22):
                extracted.update(chunk)
                sink.write(chunk)
    try:
        atomic_write(target, write, make_parents=True)
    except (zipfile.BadZipFile, KeyError, EOFError) as error:
        raise UsageError(f'cannot extract {member} from {archive}: {error}') from None
    remember_sha256(target, extracted.hexdigest())

    def write_stamp(temporary):
        with open(temporary, 'w') as file:
            file.write(digest + '\n')
    atomic_write(stamp, write_stamp)


def decide(ratings, cache, *options):
    """0: the cache was converted from this very ratings file, with these options (convert.py's
    defaults, and a validation holdout where `options` hold --validation_holdout); 3: convert."""
    unknown = set(options) - {HOLDOUT}
    if unknown:
        raise UsageError(f'prepare.py decide takes no option {sorted(unknown)[0]} '
                         f'(only {HOLDOUT})')
    holdout = HOLDOUT in options
    digest, _ = remembered_sha256(ratings, log=print)
    try:
        with open(os.path.join(cache, METADATA_FILE)) as file:
            metadata = json.load(file)
    except OSError:
        metadata, reason = None, 'no cache yet'
    except ValueError:
        metadata, reason = None, 'its metadata.json does not parse'
    if metadata is not None:
        if not isinstance(metadata, dict) or metadata.get('version') != CACHE_VERSION:
            reason = 'the cache is from another version of convert.py'
        elif metadata.get('source_sha256') != digest:
            reason = 'the ratings file has changed since it was converted'
        elif (metadata.get('min_ratings'), metadata.get('valid_negative'),
              metadata.get('seed')) != (MIN_RATINGS, VALID_NEGATIVE, SEED):
            reason = 'the cache was converted with other options'
        elif ('validation' in metadata) != holdout:
            reason = (f'the cache was converted {"without" if holdout else "with"} a validation '
                      'holdout')
        else:
            reason = proof_failure(cache)
            if reason is None:
                print(f'Using cached preprocessed data in {cache} (converted from {ratings}, '
                      f'sha256 {digest[:16]}...{", with a validation holdout" * holdout})')
                return 0
    check_writable_directory(cache, 'CACHE_DIR')
    print(f'Preprocessing {ratings} into {cache} ({reason})')
    return CONVERT


def proof_failure(cache):
    """Why the cache in `cache` does not prove its content as ncf.py checks it (its tensors'
    digests, counts, ids and fingerprint), or None: a cache changed since convert.py wrote it
    is converted again, not reused for ncf.py to refuse."""
    import_held('torch', 'dataloading')
    import torch

    import dataloading
    try:
        dataloading.load_dataset(cache, torch.device('cpu'), log=lambda *_: None)
    except UsageError as error:
        return f'it has changed since convert.py wrote it ({error})'
    return None


def command(cache):
    """The training command for this cache: the reference's batch of 2^20 needs an epoch of
    many such batches (ML-20m has 94); smaller data gets the Quick start's small-batch
    settings, with a batch well under an epoch."""
    with open(os.path.join(cache, METADATA_FILE)) as file:
        samples = json.load(file)['n_train'] * (1 + DEFAULT_NEGATIVE_SAMPLES)
    flags = ''
    if samples < 16 * DEFAULT_BATCH_SIZE:
        batch = 4096
        while batch > 64 and 16 * batch > samples:
            batch //= 2
        flags = f' -b {batch} -l 0.002 -b1 0.9 -b2 0.999'
    data = shlex.quote(cache)
    print(f'You can now run the training with: python ncf.py --data {data}{flags}')
    print(f'or, on several GPUs: torchrun --nproc_per_node=<number_of_GPUs> ncf.py '
          f'--data {data}{flags}')


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    kept = None
    if argv[:1] == ['--kept']:
        kept, argv = argv[1], argv[2:]
    steps = {'check': check, 'extract': extract, 'decide': decide, 'command': command}
    if not argv or argv[0] not in steps:
        print(f'{PROGRAM}: error: prepare.py needs one of {", ".join(steps)}', file=sys.stderr)
        sys.exit(2)
    sys.exit(run_main(PROGRAM, steps[argv[0]], *argv[1:], kept=kept) or 0)


if __name__ == '__main__':
    handle_signals_late(PROGRAM)  # a signal after the work, too, is one line
    main()
