"""Scoring token sequences with a reward model: batched, length-sorted, in inference mode.

Sequences are sorted by length before batching so that a batch holds sequences of similar
length (little padding), then the rewards are put back in input order. Because the reward is
read at each row's last real token and positions count real tokens only, a sequence's reward
does not depend on the batch it lands in (tests check this). Sequences that continue one
prompt (the two answers of a pair, the k samples of a REINFORCE prompt) can have that prompt
computed once per batch, with the same rewards (`score_sequences(group=k)`).

`reward_index` picks the output that is "the reward": 0 for a 1-output model, and the
helpfulness output (index 0) of a 5-attribute regression model (METHOD.md section 2); `weights`
instead combines all outputs linearly (the published 5-attribute weightings).
"""

import torch

from minirm.data import MIN_GAIN, collate, collate_shared, common_prefix, padded_positions

# Two published weightings of the five HelpSteer2 attributes (METHOD.md section 2), in the order
# helpfulness, correctness, coherence, complexity, verbosity.
ATTRIBUTE_WEIGHTS = {
    "helpfulness": (1.0, 0.0, 0.0, 0.0, 0.0),
    "steerlm-a": (0.3, 0.74, 0.46, 0.47, -0.33),
    "steerlm-b": (0.65, 0.8, 0.45, 0.55, -0.4),
}


def reduce_outputs(out, weights=None, reward_index=0):
    """(B, n_outputs) head outputs -> (B,) scalar rewards."""
    if weights is not None and out.shape[-1] > 1:
        return out @ torch.tensor(weights, dtype=out.dtype, device=out.device)
    return out[:, reward_index]


@torch.inference_mode()
def score_sequences(model, seqs, pad_id, batch_size=16, progress=False, desc="score",
                    reward_fn=None, group=1):
    """Head outputs (N, n_outputs) float32 for token-id lists `seqs`, in input order.

    With `group` = k > 1, each run of k consecutive sequences continues one prompt (a pair's
    two answers, a REINFORCE prompt's k samples), which may then be computed once per batch
    (`plan_batches`). `reward_fn(tokens, mask)` replaces `model.reward`; it is passed
    `prompts=` as well for the batches that share them (as `model.reward` takes them)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    plan = plan_batches(seqs, batch_size, group)
    if progress:
        from tqdm import tqdm
        plan = tqdm(plan, desc=desc, unit="batch", leave=False)
    reward_fn = reward_fn or model.reward
    out = [None] * len(seqs)
    for idx, shared in plan:
        batch = [seqs[i] for i in idx]
        if shared:  # runs of `group` sequences, one after another
            tokens, mask, prompts = collate_shared(batch, [j // group for j in range(len(idx))],
                                                   pad_id)
            prompts = tuple(t.to(device) for t in prompts)
        else:
            (tokens, mask), prompts = collate(batch, pad_id), None
        # prompts= only when there are some: a caller's reward_fn(tokens, mask) still works.
        kwargs = {} if prompts is None else {"prompts": prompts}
        rewards = reward_fn(tokens.to(device), mask.to(device), **kwargs).float().cpu()
        for i, r in zip(idx, rewards):
            out[i] = r
    model.train(was_training)
    if not out:
        return torch.zeros(0, 1)
    return torch.stack(out)


def plan_batches(seqs, batch_size, group=1):
    """[(indices, shared)]: the sequences sorted by length, `batch_size` at a time. Or, when
    runs of `group` = k consecutive sequences continue one prompt, batches of whole runs,
    sorted by their longest sequence, where a batch computes each run's shared prompt once
    (`data.collate_shared`: shared = True) when that computes fewer positions than padding
    its whole sequences, by `data.MIN_GAIN` at least. Whichever of the two plans computes
    fewer positions in all: k samples of a long prompt share it, while the pairs of a
    benchmark with lengths all over the place pad less when sorted one by one."""
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lengths.__getitem__)
    plain = [(order[i:i + batch_size], False) for i in range(0, len(order), batch_size)]
    k = group
    if k < 2 or len(seqs) % k or batch_size < k:  # whole runs would exceed batch_size
        return plain
    runs = [list(range(i, i + k)) for i in range(0, len(seqs), k)]
    cut = [common_prefix([seqs[j] for j in r]) for r in runs]
    rests = [n - cut[j // k] for j, n in enumerate(lengths)]  # after the run's prompt
    runs.sort(key=lambda r: max(lengths[i] for i in r))
    per_batch = batch_size // k
    plan, total = [], 0
    for i in range(0, len(runs), per_batch):
        idx = sum(runs[i:i + per_batch], [])
        n = padded_positions(lengths, [idx])
        shared = (len(idx) // k * max(cut[j // k] for j in idx)
                  + padded_positions(rests, [idx]))
        plan.append((idx, shared <= (1 - MIN_GAIN) * n))
        total += shared if plan[-1][1] else n
    return plan if total < padded_positions(lengths, [idx for idx, _ in plain]) else plain


def score_pairs(model, encoded_pairs, pad_id, batch_size=16, weights=None, reward_index=0,
                progress=False, reward_fn=None):
    """Rewards of chosen and rejected for encoded pairs [(chosen, rejected, strength)]."""
    seqs = [e.ids for c, r, _ in encoded_pairs for e in (c, r)]
    out = score_sequences(model, seqs, pad_id, batch_size, progress, reward_fn=reward_fn,
                          group=2)
    rewards = reduce_outputs(out, weights, reward_index)
    return rewards[0::2], rewards[1::2]
