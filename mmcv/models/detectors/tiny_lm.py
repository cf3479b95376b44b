"""The miniature ORION's language model: a tiny causal LM built from a config, plus its plan head.

ORION hands visual scene tokens to a LLaVA-style LLM that answers driving
questions and whose hidden state of a planning token is decoded into the ego
plan. ``TinyCausalLM`` does the same at toy scale: a ``transformers`` Llama
built from a ``LlamaConfig`` (no download; transformers is imported only when
the module is built) fed with ``inputs_embeds``. One sequence per question:

    [visual tokens (K)] [<plan>] [question (Lq, left-padded)] [answer + <eos> (La)]

The ``<plan>`` position sees only the visual tokens, so the plan does not
depend on the question; answers are trained with cross-entropy and decoded
greedily. Text tokens and ``<plan>`` also get the mean visual token added to
their embeddings (scene conditioning), so the tiny LM learns in minutes.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcv.datasets.chat_tokenizer import ANSWER_LEN, ChatTokenizer
from mmcv.models.builder import HEADS


@HEADS.register_module()
class TinyCausalLM(nn.Module):
    """A tiny Llama plus an MLP plan head on the hidden state of the ``<plan>`` token.

    Args:
        hidden_size, num_layers, num_attention_heads, intermediate_size,
        max_position_embeddings: the ``LlamaConfig`` of the language model.
        vocab_size: defaults to the :class:`ChatTokenizer` vocabulary.
        plan_horizon: waypoints of the plan (each (x, y) metres).
        frozen: freeze the language model (its parameters stop requiring
            gradients and it stays in eval mode), as ORION's ``frozen`` LLM flag.
        attn_implementation: ``'sdpa'`` or ``'eager'`` attention inside transformers.
        loss_weights: ``dict(vlm=..., plan=...)`` multipliers of ``vlm_loss`` and ``loss_plan_reg``.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: int = 128, max_position_embeddings: int = 128,
                 vocab_size: Optional[int] = None, plan_horizon: int = 6, frozen: bool = False,
                 attn_implementation: str = "sdpa", loss_weights: Optional[Dict[str, float]] = None) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM  # lazy: `import mmcv` must stay light

        self.tokenizer = ChatTokenizer()
        vocab_size = self.tokenizer.vocab_size if vocab_size is None else int(vocab_size)
        if vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"TinyCausalLM: vocab_size must be >= {self.tokenizer.vocab_size} "
                             f"(the ChatTokenizer vocabulary), got {vocab_size}")
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_attention_heads,
                             num_key_value_heads=num_attention_heads,
                             max_position_embeddings=max_position_embeddings,
                             pad_token_id=self.tokenizer.pad_id, bos_token_id=self.tokenizer.bos_id,
                             eos_token_id=self.tokenizer.eos_id, tie_word_embeddings=False)
        config._attn_implementation = attn_implementation
        self.model = LlamaForCausalLM(config)
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.plan_horizon = int(plan_horizon)
        self.plan_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                       nn.Linear(hidden_size, self.plan_horizon * 2))
        weights = dict(vlm=1.0, plan=0.2)
        weights.update(loss_weights or {})
        self.loss_weights = weights
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> "TinyCausalLM":
        """Like ``nn.Module.train``, but a frozen language model stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    # ---------------------------------------------------------------- sequences
    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def _run(self, vis: Tensor, question_ids: Tensor, answer_ids: Optional[Tensor] = None) -> tuple:
        """Run the LM on [vis][<plan>][question][answer]; ``vis`` [B, K, D], ids [B, Q, L]."""
        b, q, lq = question_ids.shape
        if vis.dim() != 3 or vis.shape[0] != b or vis.shape[2] != self.hidden_size:
            raise ValueError(f"TinyCausalLM: visual tokens must be [B={b}, K, {self.hidden_size}], "
                             f"got {tuple(vis.shape)}")
        ids = question_ids if answer_ids is None else torch.cat([question_ids, answer_ids], dim=2)
        ids = ids.reshape(b * q, -1)
        total = vis.shape[1] + 1 + ids.shape[1]
        if total > self.max_position_embeddings:
            raise ValueError(f"TinyCausalLM: sequence of {total} tokens exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        k = vis.shape[1]
        vis_q = vis[:, None].expand(b, q, k, self.hidden_size).reshape(b * q, k, self.hidden_size)
        # Scene conditioning: every text token (and <plan>) also receives the mean visual token, a
        # residual shortcut that lets a 2-layer LM use the scene within a minute of CPU training.
        scene = vis_q.mean(dim=1, keepdim=True)
        plan_tok = self._embed(torch.full((b * q, 1), self.tokenizer.plan_id, dtype=torch.long, device=ids.device))
        embeds = torch.cat([vis_q, plan_tok + scene, self._embed(ids) + scene], dim=1)
        mask = torch.cat([torch.ones(b * q, k + 1, dtype=torch.long, device=ids.device),
                          (ids != self.tokenizer.pad_id).long()], dim=1)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.logits, out.hidden_states[-1], k

    def plan_from_hidden(self, hidden: Tensor, k: int, batch: int, questions: int) -> Tensor:
        """Decode the plan [B, T, 2] from the hidden state of the ``<plan>`` token (position ``k``)."""
        plan_state = hidden[:, k].reshape(batch, questions, self.hidden_size)[:, 0]
        return self.plan_head(plan_state).reshape(batch, self.plan_horizon, 2)

    # ---------------------------------------------------------------- train / test
    def loss(self, vis: Tensor, question_ids: Tensor, answer_ids: Tensor, ego_fut_trajs: Tensor) -> Dict[str, Tensor]:
        """``vlm_loss`` (answer cross-entropy) and ``loss_plan_reg`` (L1 to the ego plan)."""
        b, q, lq = question_ids.shape
        if answer_ids.shape[:2] != (b, q):
            raise ValueError(f"TinyCausalLM: vlm_answer_ids must be [B={b}, Q={q}, La], got {tuple(answer_ids.shape)}")
        if ego_fut_trajs.shape[1:] != (self.plan_horizon, 2):
            raise ValueError(f"TinyCausalLM: ego_fut_trajs must be [B, {self.plan_horizon}, 2], "
                             f"got {tuple(ego_fut_trajs.shape)}")
        logits, hidden, k = self._run(vis, question_ids, answer_ids)
        la = answer_ids.shape[2]
        start = k + 1 + lq - 1  # the position whose next token is the first answer token
        answer_logits = logits[:, start:start + la]
        targets = answer_ids.reshape(b * q, la).masked_fill(answer_ids.reshape(b * q, la) == self.tokenizer.pad_id,
                                                           -100)
        vlm_loss = F.cross_entropy(answer_logits.reshape(-1, answer_logits.shape[-1]).float(), targets.reshape(-1),
                                   ignore_index=-100)
        plan = self.plan_from_hidden(hidden, k, b, q)
        plan_loss = F.l1_loss(plan, ego_fut_trajs.to(plan.dtype))
        return dict(vlm_loss=vlm_loss * self.loss_weights["vlm"], loss_plan_reg=plan_loss * self.loss_weights["plan"])

    @torch.no_grad()
    def generate(self, vis: Tensor, question_ids: Tensor, max_new_tokens: int = ANSWER_LEN) -> tuple:
        """Greedy answers and the plan: (answer ids [B, Q, max_new_tokens] padded after <eos>, plan [B, T, 2])."""
        b, q, _ = question_ids.shape
        generated = question_ids.new_full((b, q, 0), self.tokenizer.pad_id)
        finished = torch.zeros(b * q, dtype=torch.bool, device=question_ids.device)
        plan = None
        for _ in range(max_new_tokens):
            logits, hidden, k = self._run(vis, question_ids, generated if generated.shape[2] else None)
            if plan is None:
                plan = self.plan_from_hidden(hidden, k, b, q)
            nxt = logits[:, -1].argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, self.tokenizer.pad_id), nxt)
            finished |= nxt == self.tokenizer.eos_id
            generated = torch.cat([generated, nxt.reshape(b, q, 1)], dim=2)
            if bool(finished.all()):
                break
        return generated, plan

    def answers_to_lists(self, generated: Tensor) -> List[List[List[int]]]:
        """[B, Q, L] generated ids -> per sample, per question, the ids before ``<eos>``."""
        out = []
        for sample in generated.tolist():
            rows = []
            for ids in sample:
                row = []
                for i in ids:
                    if i in (self.tokenizer.eos_id, self.tokenizer.pad_id):
                        break
                    row.append(i)
                rows.append(row)
            out.append(rows)
        return out


__all__ = ["TinyCausalLM"]
