"""`ncf.py --mode recommend`: each user's top-K unseen items, in the dataset's own ids.

    python ncf.py --mode recommend --data DIR --load_checkpoint_path CK [--users 12,57 |
        --users_file F] [--topk 10] [--output recs.csv]

Writes CSV `user_id,rank,item_id,score` (score: the model's probability), to --output
(atomically) or stdout. Every item a user has a training interaction with is left out.

    wanted = read_users(users, users_file)            # their own ids, or None: every user
    users = requested_users(user_ids, wanted)         # mapped ids
    items, logits, compiling = recommend(plan, model, exclusion, users, topk)
    write(output, (user_ids, item_ids), users, items, logits)
"""
import csv
import io
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import torch

from ncflib.cli import UsageError, warn
from ncflib.evaluation import NonFiniteScores, Scorer
from ncflib.files import atomic_write

HEADER = ('user_id', 'rank', 'item_id', 'score')


def read_users(users, users_file):
    """The user ids asked for, in the dataset's own ids: `users` comma-separated, or
    `users_file` one per line (a `user_id` header allowed); None for all users."""
    if users is None and users_file is None:
        return None
    if users is not None and users_file is not None:
        raise UsageError('give --users or --users_file, not both')
    if users is not None:
        return [user.strip() for user in users.split(',') if user.strip()]
    if not os.path.isfile(users_file):
        raise UsageError(f'--users_file {users_file} does not exist')
    with open(users_file, newline='') as file:
        wanted = [row[0].strip() for row in csv.reader(file) if row and row[0].strip()]
    return wanted[1:] if wanted and wanted[0] == 'user_id' else wanted


def requested_users(user_ids, wanted):
    """Mapped ids of the users `wanted` (their own ids; None: every user), each once, in the
    order asked for; unknown and repeated ones are said in one warning line each and skipped."""
    if wanted is None:
        return list(range(len(user_ids)))
    index = {user: mapped for mapped, user in enumerate(user_ids)}
    known = {}
    for user in wanted:
        if user in known:
            warn(f'user id {user} is listed more than once: recommended once')
        elif user in index:
            known[user] = index[user]
        else:
            warn(f'unknown user id {user}: skipped')
    if not known:
        raise UsageError('none of the requested users is in the dataset '
                         f'({len(wanted)} asked for)')
    return list(known.values())


def top_items(scorer, exclusion, users, topk):
    """(items, logits), each [len(users), topk], ranked on the device, for `users` (mapped
    ids, a 1-d tensor). Items a user trained on get -inf: they come last, and only when nothing
    else is left (the writer drops them)."""
    rows = scorer.rows_per_chunk(exclusion.n_items)
    # Every requested user's training pairs, and where each chunk's lie among them: read once
    # here, so that the chunk loop never waits on the host.
    pair_rows, pair_items = exclusion.pairs_of(users)
    bounds = [0] + torch.cumsum(exclusion.counts[users], 0).tolist()
    scorer.refresh()
    items, logits = [], []
    nonfinite = torch.zeros((), dtype=torch.long, device=users.device)
    with torch.no_grad():
        for start in range(0, len(users), rows):
            stop = min(start + rows, len(users))
            scores = scorer.all_items(users[start:stop])
            nonfinite += (~torch.isfinite(scores)).sum()
            trained = slice(bounds[start], bounds[stop])
            scores[pair_rows[trained] - start, pair_items[trained]] = float('-inf')
            best, best_items = torch.topk(scores, topk, dim=1)
            items.append(best_items)
            logits.append(best)
    if nonfinite:  # read once, after the loop
        raise NonFiniteScores(int(nonfinite), len(users) * exclusion.n_items)
    empty = torch.zeros(0, topk, device=users.device)
    return torch.cat(items or [empty.long()]), torch.cat(logits or [empty])


def csv_field(value):
    """`value` as the csv module writes a field: quoted only when it must be."""
    if any(character in value for character in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_rows(user_ids, item_ids, users, items, logits):
    """The CSV rows of a chunk as bytes, built column-wise (no Python loop per row).

    user_ids, item_ids: pyarrow string arrays of CSV-ready ids; users [R], items and logits
    [R, k] numpy arrays. Training items (logit -inf) are left out.
    """
    topk = items.shape[1]
    kept = np.isfinite(logits).ravel()
    user_rows = np.repeat(users, topk)[kept]
    ranks = np.tile(np.arange(1, topk + 1), len(users))[kept]
    scores = np.exp(-np.logaddexp(0.0, -logits.astype(np.float64).ravel()[kept]))  # sigmoid
    # the probability with 6 decimals, as '%.6f' would write it
    micro = np.rint(scores * 1e6).astype(np.int64)
    score_text = pc.binary_join_element_wise(
        pc.cast(pa.array(micro // 1_000_000), pa.string()),
        pc.utf8_lpad(pc.cast(pa.array(micro % 1_000_000), pa.string()), 6, '0'), '.')
    table = pa.table({'user_id': user_ids.take(pa.array(user_rows)), 'rank': pa.array(ranks),
                      'item_id': item_ids.take(pa.array(items.ravel()[kept])),
                      'score': score_text})
    sink = io.BytesIO()
    # the ids are quoted already where they must be
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style='none'))
    return sink.getvalue(), len(table)


def recommend(plan, model, exclusion, users, topk):
    """(items, logits, seconds compiling) of each of `users` (mapped ids, a list): its `topk`
    items that are not among its training items, best first, scored by a copy of `model` cast
    once to the plan's precision; on the device. A compiled plan compiles the scoring of each
    chunk size first (0 seconds where it does not compile)."""
    users = torch.tensor(users, device=plan.device, dtype=torch.long)
    scorer = Scorer(plan, model)
    compiling = 0.0
    if plan.compiled:
        start = plan.time()  # top_items refreshes the copy's weights: compiling needs none
        rows = scorer.rows_per_chunk(exclusion.n_items)
        scorer.score_chunk_sizes(users, {min(rows, len(users)), len(users) % rows} - {0})
        compiling = plan.time() - start
    return (*top_items(scorer, exclusion, users, topk), compiling)


def write(output, id_maps, users, items, logits):
    """CSV `user_id,rank,item_id,score` of the recommendations, in the dataset's own ids
    (`id_maps`: user and item ids in mapped order), to `output` (atomically, its directory
    made if missing) or stdout (None). Returns the number of rows."""
    user_ids, item_ids = id_maps
    # the one transfer of the results
    data, rows = csv_rows(pa.array([csv_field(user) for user in user_ids], pa.string()),
                          pa.array([csv_field(item) for item in item_ids], pa.string()),
                          np.asarray(users), items.cpu().numpy(), logits.float().cpu().numpy())
    header = (','.join(HEADER) + '\n').encode()
    if output:
        def write_file(temporary):
            with open(temporary, 'wb') as file:
                file.write(header)
                file.write(data)
        atomic_write(output, write_file, make_parents=True)  # as check_output_file allows
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(header)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return rows
