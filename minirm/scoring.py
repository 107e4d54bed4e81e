"""Scoring token sequences with a reward model: batched, length-sorted, in inference mode.

Sequences are sorted by length before batching so that a batch holds sequences of similar
length (little padding), then the rewards are put back in input order. Because the reward is
read at each row's last real token and positions count real tokens only, a sequence's reward
does not depend on the batch it lands in (tests check this).

`reward_index` picks the output that is "the reward": 0 for a 1-output model, and the
helpfulness output (index 0) of a 5-attribute regression model (METHOD.md section 2); `weights`
instead combines all outputs linearly (the published 5-attribute weightings).
"""

import torch

from minirm.data import collate

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
                    reward_fn=None):
    """Head outputs (N, n_outputs) float32 for token-id lists `seqs`, in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [None] * len(seqs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    reward_fn = reward_fn or model.reward
    for idx in batches:
        tokens, mask = collate([seqs[i] for i in idx], pad_id)
        rewards = reward_fn(tokens.to(device), mask.to(device)).float().cpu()
        for i, r in zip(idx, rewards):
            out[i] = r
    model.train(was_training)
    if not out:
        return torch.zeros(0, 1)
    return torch.stack(out)


def score_pairs(model, encoded_pairs, pad_id, batch_size=16, weights=None, reward_index=0,
                progress=False, reward_fn=None):
    """Rewards of chosen and rejected for encoded pairs [(chosen, rejected, strength)]."""
    seqs = [e.ids for c, r, _ in encoded_pairs for e in (c, r)]
    out = score_sequences(model, seqs, pad_id, batch_size, progress, reward_fn=reward_fn)
    rewards = reduce_outputs(out, weights, reward_index)
    return rewards[0::2], rewards[1::2]
