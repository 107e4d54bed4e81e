"""Scoring token sequences with a reward model: batched, length-sorted, in inference mode.

Sequences are sorted by length before batching so that a batch holds sequences of similar
length (little padding), then the rewards are put back in input order. Because the reward is
read at each row's last real token and positions count real tokens only, a sequence's reward
does not depend on the batch it lands in (tests check this). The two sequences of a preference
pair share their prompt, which `score_pairs` computes once for both.

`reward_index` picks the output that is "the reward": 0 for a 1-output model, and the
helpfulness output (index 0) of a 5-attribute regression model (METHOD.md section 2); `weights`
instead combines all outputs linearly (the published 5-attribute weightings).
"""

import torch

from minirm.data import collate, collate_pairs

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


def _scored(model, n, order, batch_size, progress, desc, run):
    """Outputs (n, k) in input order: `run(indices)` gives the rows of a batch, the batches
    taken from `order` in inference mode and eval mode."""
    was_training = model.training
    model.eval()
    out = [None] * n
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for idx in batches:
                for i, r in zip(idx, run(idx).float().cpu()):
                    out[i] = r
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.zeros(0, 1)


def score_sequences(model, seqs, pad_id, batch_size=16, progress=False, desc="score",
                    reward_fn=None):
    """Head outputs (N, n_outputs) float32 for token-id lists `seqs`, in input order."""
    device = next(model.parameters()).device
    reward_fn = reward_fn or model.reward

    def run(idx):
        tokens, mask = collate([seqs[i] for i in idx], pad_id)
        return reward_fn(tokens.to(device), mask.to(device))

    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return _scored(model, len(seqs), order, batch_size, progress, desc, run)


def score_pairs(model, encoded_pairs, pad_id, batch_size=16, weights=None, reward_index=0,
                progress=False, reward_fn=None):
    """Rewards of chosen and rejected for encoded pairs [(chosen, rejected, strength)].

    A batch holds batch_size // 2 pairs (batch_size sequences), sorted by length, and computes
    each pair's shared prompt once (`data.collate_pairs`); `reward_fn(tokens, mask, prompts)`
    defaults to `model.reward`."""
    device = next(model.parameters()).device
    reward_fn = reward_fn or model.reward
    pairs = [(c.ids, r.ids) for c, r, _ in encoded_pairs]
    if not pairs:
        return torch.zeros(0), torch.zeros(0)

    def run(idx):
        tokens, mask, prompts = collate_pairs([pairs[i] for i in idx], pad_id)
        out = reward_fn(tokens.to(device), mask.to(device),
                        tuple(t.to(device) for t in prompts))
        return torch.cat((out[:len(idx)], out[len(idx):]), dim=1)  # a pair's two rows as one

    order = sorted(range(len(pairs)), key=lambda i: max(map(len, pairs[i])))
    out = _scored(model, len(pairs), order, max(1, batch_size // 2), progress, "score", run)
    k = out.shape[1] // 2
    chosen = reduce_outputs(out[:, :k], weights, reward_index)
    rejected = reduce_outputs(out[:, k:], weights, reward_index)
    return chosen, rejected
