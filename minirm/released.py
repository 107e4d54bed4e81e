"""The released reward model's interface: the reward is the logit of token id 0 (METHOD.md 9).

NVIDIA released Llama-3.1-Nemotron-70B-Reward-HF as a plain `LlamaForCausalLM`: the trained
head `Linear(hidden, 1)` was copied into row 0 of the output layer, so

    reward(x) = lm_head.weight[0] · norm(h_last(x))        (the logit of token 0 at the last token)

where h_last is the hidden state at the last input token (the final <|eot_id|>). This module
reads a model that way (`token0_reward`, the `--reward token0` flag of evaluate and score) and
writes a trained minirm reward model that way (`export_token0`, `python -m minirm.released`).

What the export simplifies, on purpose:
- The head's bias has nowhere to go in a bias-free lm_head, so it is dropped (and printed):
  token-0 rewards equal the head's rewards minus the bias. Comparisons (chosen vs rejected,
  pairwise accuracy, RewardBench) are unchanged.
- The exported folder is for scoring only. A reward model keeps no language-model head (METHOD.md
  2), so the other rows of lm_head are zero, unless the model ties its embeddings: then lm_head
  is untied and its other rows are copies of the embedding (the tied head the base model had).
  Row 0 is cast to the model's dtype; with bfloat16 weights the head loses precision there.
- A multi-output head is folded into one row: the chosen output (`reward_index`), or with
  `weights` the weighted sum Σ w_i W_i (the reward is linear in the head, so this is exact).

    python -m minirm.released --model RM_DIR --out DIR [--force]

An existing non-empty --out folder is replaced only with --force, and never the --model folder
(or one holding it).
"""

from dataclasses import dataclass, replace

import torch

from minirm.cliargs import opt, parse
from minirm.errors import UserError, cli
from minirm.model import Transformer
from minirm.scoring import ATTRIBUTE_WEIGHTS


def _row0(model):
    """Row 0 of the output layer: lm_head.weight[0], or the tied embedding's row 0."""
    if model.output is not None:
        return model.output.weight[0]
    if model.cfg.tie_embeddings:
        return model.tok_embeddings.weight[0]
    raise UserError("this model has a reward head and no language-model head, so it has no "
                    "token-0 logit; read it with --reward head (the default)")


def token0_reward(model):
    """A `reward_fn(tokens, mask, prompts=None) -> (B, 1)` for score_sequences: the logit of
    token 0 at the last real token (METHOD.md 9), in float32; `prompts` as for
    `Transformer.last_hidden`.

    Only row 0 of the logits is computed (a dot product), which equals
    `model(tokens, mask)[b, last, 0]` without the (B, T, vocab) logits.
    """
    _row0(model)  # fail now, not in the middle of a data set

    def reward_fn(tokens, mask=None, prompts=None):
        h_last = model.last_hidden(tokens, mask, prompts)
        return (h_last.float() @ _row0(model).float())[:, None]

    return reward_fn


def head_row(model, reward_index=0, weights=None):
    """(row, bias): the head as one linear function of the final hidden state."""
    if model.score is None:
        raise UserError("the model has no reward head to export; train one with minirm.train")
    w, b = model.score.weight.detach().float(), model.score.bias.detach().float()
    if weights is not None:
        if len(weights) != w.shape[0]:
            raise UserError(f"--weights has {len(weights)} entries but the head has "
                            f"{w.shape[0]} outputs")
        weights = torch.tensor(weights, dtype=torch.float32)
        return weights @ w, float(weights @ b)
    if not 0 <= reward_index < w.shape[0]:
        raise UserError(f"--reward-index {reward_index} is out of range: the head has "
                        f"{w.shape[0]} outputs")
    return w[reward_index], float(b[reward_index])


def export_token0(model, reward_index=0, weights=None):
    """A reward model -> (causal LM whose token-0 logit is the reward, dropped bias).

    The LM shares no storage with `model`: body tensors are copied, lm_head is new (row 0 = the
    head's row, other rows zero or the tied embedding; see the module docstring).
    """
    row, bias = head_row(model, reward_index, weights)
    cfg = replace(model.cfg, n_outputs=0, tie_embeddings=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.startswith("score.")}
    emb = state["tok_embeddings.weight"]
    lm_head = emb.clone() if model.cfg.tie_embeddings else torch.zeros_like(emb)
    lm_head[0] = row.to(lm_head.dtype)  # METHOD.md 9: the head goes into lm_head.weight[0]
    state["output.weight"] = lm_head
    with torch.device("meta"):
        lm = Transformer(cfg)
    lm.load_state_dict(state, assign=True, strict=True)
    return lm, bias


@dataclass
class ReleasedSettings:
    model: str = opt(None, "trained reward-model folder (with a head)")
    out: str = opt(None, "folder to write the token-0 causal LM to")
    reward_index: int = opt(0, "head output to export (0: the helpfulness output)")
    weights: str = opt(None, "export this weighted sum of a 5-output head instead",
                       choices=tuple(ATTRIBUTE_WEIGHTS))
    dtype: str = opt(None, "dtype of the export, unset: the reward model's",
                     choices=("float32", "bfloat16", "float16"))
    force: bool = opt(False, "replace an existing --out folder")


@cli
def main(argv=None):
    from minirm.checkpoint import load_model, load_tokenizer, save_model
    from minirm.runs import check_out_folder
    from minirm.score import reward_reading, stored_dtype

    s = parse(ReleasedSettings, argv, "python -m minirm.released",
              "Export a reward model in the released convention: reward = logit of token 0.")
    if s.model is None or s.out is None:
        raise UserError("--model and --out are required: python -m minirm.released "
                        "--model RM_DIR --out DIR")
    check_out_folder(s.out, {"--model": s.model}, s.force)  # before the model is loaded
    model, cfg = load_model(s.model, dtype=s.dtype or stored_dtype(s.model))
    if not cfg.n_outputs:
        raise UserError(f"{s.model}: no reward head to export (config.json has no "
                        "num_labels); pass a reward model trained with minirm.train")
    _, index, weights = reward_reading(model, "head", s.reward_index, s.weights, where=s.model)
    lm, bias = export_token0(model, index, weights)
    save_model(lm, s.out, tokenizer=load_tokenizer(s.model))
    rows = "copies of the tied embedding" if cfg.tie_embeddings else "zero"
    print(f"wrote {s.out}: a LlamaForCausalLM (vocab {cfg.vocab_size}) whose logit of token 0 "
          f"at the last token is the reward; the other lm_head rows are {rows} (for scoring "
          "only)")
    print(f"dropped the head's bias {bias:+.6g}: token-0 rewards = head rewards - ({bias:+.6g}); "
          "comparisons are unchanged")


if __name__ == "__main__":
    main()
