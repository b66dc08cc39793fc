"""`ncf.py --mode recommend`: each user's top-K unseen items, in the dataset's own ids.

    python ncf.py --mode recommend --data DIR --load_checkpoint_path CK [--users 12,57 |
        --users_file F] [--topk 10] [--output recs.csv]

Writes CSV `user_id,rank,item_id,score` (score: the model's probability), to --output
(atomically) or stdout. Every item a user has a training interaction with is left out.
"""
import csv
import math
import os
import sys

import torch

from dataloading import ITEM_IDS_FILE, USER_IDS_FILE
from neumf import all_item_scores
from utils import UsageError, atomic_write

HEADER = ('user_id', 'rank', 'item_id', 'score')


def read_id_map(data_dir, name):
    """Original ids in mapped order (line k after the header: mapped id k), as strings."""
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise UsageError(f'{path} is missing: recommend mode needs the id maps convert.py '
                         'writes (run it again to get them)')
    with open(path, newline='') as file:
        rows = list(csv.reader(file))
    if not rows or len(rows[0]) != 1:
        raise UsageError(f'{path} is not an id map: expected a one-column CSV with a header')
    return [row[0] if row else '' for row in rows[1:]]


def requested_users(args, user_ids, warn):
    """Mapped ids of the users asked for (all by default); unknown ones are reported, skipped."""
    if args.users is None and args.users_file is None:
        return list(range(len(user_ids)))
    if args.users is not None and args.users_file is not None:
        raise UsageError('give --users or --users_file, not both')
    if args.users is not None:
        wanted = [user.strip() for user in args.users.split(',') if user.strip()]
    else:
        if not os.path.isfile(args.users_file):
            raise UsageError(f'--users_file {args.users_file} does not exist')
        with open(args.users_file, newline='') as file:
            wanted = [row[0].strip() for row in csv.reader(file) if row and row[0].strip()]
    index = {user: mapped for mapped, user in enumerate(user_ids)}
    if wanted and wanted[0] == 'user_id' and 'user_id' not in index:
        wanted = wanted[1:]  # a header line
    known = []
    for user in wanted:
        if user in index:
            known.append(index[user])
        else:
            warn(f'unknown user id {user}: skipped')
    if not known:
        raise UsageError('none of the requested users is in the dataset '
                         f'({len(wanted)} asked for)')
    return known


def top_items(model, exclusion, users, topk, chunk, autocast):
    """For chunks of `users` (mapped ids, a 1-d tensor): (users, items [R, k], logits [R, k]).
    Items a user trained on get -inf: they come last, and only when nothing else is left (the
    writer drops them)."""
    n_items = exclusion.n_items
    rows = max(1, chunk // n_items)
    model.eval()
    with torch.no_grad(), autocast():
        for start in range(0, len(users), rows):
            chunk_users = users[start:start + rows]
            scores = all_item_scores(model, chunk_users, n_items)
            pair_rows, pair_items = exclusion.pairs_of(chunk_users)
            scores[pair_rows, pair_items] = float('-inf')
            best, items = torch.topk(scores, topk, dim=1)
            yield chunk_users, items, best


def recommend(model, exclusion, args, device, autocast, chunk, warn):
    user_ids = read_id_map(args.data, USER_IDS_FILE)
    item_ids = read_id_map(args.data, ITEM_IDS_FILE)
    if len(user_ids) != exclusion.n_users or len(item_ids) != exclusion.n_items:
        raise UsageError(f'the id maps in {args.data} ({len(user_ids)} users, {len(item_ids)} '
                         f'items) do not match its tensors ({exclusion.n_users} users, '
                         f'{exclusion.n_items} items)')
    users = torch.tensor(requested_users(args, user_ids, warn), device=device, dtype=torch.long)

    def write(sink):
        writer = csv.writer(sink, lineterminator='\n')
        writer.writerow(HEADER)
        rows = 0
        for chunk_users, items, logits in top_items(model, exclusion, users, args.topk, chunk,
                                                    autocast):
            # one transfer per chunk of users
            for user, user_items, user_logits in zip(chunk_users.tolist(), items.tolist(),
                                                     logits.tolist()):
                for rank, (item, logit) in enumerate(zip(user_items, user_logits), start=1):
                    if logit == float('-inf'):  # a training item: nothing else was left
                        break
                    score = 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
                    writer.writerow((user_ids[user], rank, item_ids[item], f'{score:.6f}'))
                    rows += 1
        return rows

    if args.output:
        def write_file(temporary):
            with open(temporary, 'w', newline='') as file:
                write_file.rows = write(file)
        atomic_write(args.output, write_file)
        return len(users), write_file.rows
    rows = write(sys.stdout)
    sys.stdout.flush()
    return len(users), rows
