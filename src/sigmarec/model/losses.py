"""The SIGMA model's losses (SIGMA part 3 and ours): the label's NTP over each prefix level
(with a multi-positive soft label), InfoNCE against in-batch targets, hard negatives and the
prompt's own items (or the whole catalogue), and the dense next-item losses at every purchase of
the prompt. A mixin of :class:`~sigmarec.model.sigma.SigmaModel`; every copy term comes from
:class:`~sigmarec.model.copy_prior.CopyPrior`."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from sigmarec.model.repeat import PromptSlots, column_counts, item_bias
from sigmarec.tokenization.hybrid import flat_to_codes


def positive_mix(pos_codes: torch.Tensor, pos_ok: torch.Tensor, codes: torch.Tensor,
                  level: int, n_codes: int) -> torch.Tensor:
    """(B, codes of ``level``) soft NTP label: the share of the row's positives with each code
    among those that agree with the fed label tokens (the target's codes) above ``level``."""
    agree = pos_ok.clone()
    for up in range(level):
        agree &= pos_codes[..., up] == codes[:, None, up]
    soft = torch.zeros(codes.shape[0], n_codes, device=codes.device)
    soft.scatter_add_(1, pos_codes[..., level].clamp(min=0), agree.float())
    # The target itself always agrees, so every row has mass; guard anyway.
    return soft / soft.sum(-1, keepdim=True).clamp(min=1e-9)



class Losses:
    """The loss methods of the SIGMA model."""

    def label_ntp(self, h: torch.Tensor, t: int, rows: torch.Tensor, codes: torch.Tensor,
                  slots: PromptSlots | None, gates: torch.Tensor | None,
                  positives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The label's NTP over the prefix levels (token-averaged) and whether each row's
        whole prefix is the argmax; ``h`` (B, t, H) with the labels appended."""
        bsz, n_levels = h.shape[0], self.levels
        pos_codes = pos_ok = None
        if positives is not None and positives.numel():
            pos_ok = positives >= 0
            pos_flat = self.item_prefix[positives.clamp(min=0).view(-1)]
            pos_codes = flat_to_codes(pos_flat, self.codebook_sizes).view(
                *positives.shape, n_levels)
        ntp, correct = [], torch.ones(bsz, dtype=torch.bool, device=h.device)
        for lv in range(n_levels):
            # The level-lv label token sits at column t-1-L+lv, predicted one column before.
            logits = self.level_logits(h[:, t - 2 - n_levels + lv], lv, rows,
                                       self.copy_bias(gates, slots, lv, codes))
            if self.cfg.multi_positive and pos_codes is not None:
                soft = positive_mix(pos_codes, pos_ok, codes, lv, logits.shape[1])
                ntp.append(-(soft * logits.log_softmax(-1)).sum(-1).mean())
            else:
                ntp.append(F.cross_entropy(logits, codes[:, lv]))
            correct &= logits.argmax(-1) == codes[:, lv]
        # Token-averaged like any LM loss, so λ keeps its meaning with 2-level prefixes.
        return torch.stack(ntp).mean(), correct

    def _batch_infonce(self, q: torch.Tensor, v: torch.Tensor, inverse: torch.Tensor,
                       n_hist: int, slots: PromptSlots | None, gates: torch.Tensor | None,
                       target_item: torch.Tensor, hard_negatives: torch.Tensor | None,
                       positives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's InfoNCE: in-batch targets and hard negatives (plus a repeat-aware
        model's prompt items) as the negatives."""
        bsz, offset = q.shape[0], n_hist
        v_tgt = F.normalize(v[inverse[offset:offset + bsz]].float(), dim=-1)
        logits_in = q @ v_tgt.T
        # Another row's target that is this row's target or one of its positives is not a
        # negative.
        same = target_item[None, :] == target_item[:, None]
        if positives is not None and positives.numel():
            same |= (positives[:, :, None] == target_item[None, None, :]).any(1)
        same.fill_diagonal_(False)
        if gates is not None:
            logits_in = logits_in + self.item_copy_bias(
                gates, slots, target_item[None, :].expand(bsz, -1))
        logits_in = logits_in.masked_fill(same, -torch.inf)
        cols = [logits_in]
        has_hard = hard_negatives is not None and hard_negatives.numel() > 0
        if has_hard:
            k = hard_negatives.shape[1]
            v_neg = v[inverse[offset + bsz:offset + bsz + bsz * k]].view(bsz, k, -1)
            logits_h = torch.einsum("bh,bkh->bk", q, F.normalize(v_neg.float(), dim=-1))
            if gates is not None:
                logits_h = logits_h + self.item_copy_bias(gates, slots,
                                                          hard_negatives.clamp(min=0))
            bad = (hard_negatives < 0) | (hard_negatives == target_item[:, None])
            cols.append(logits_h.masked_fill(bad, -torch.inf))
        if gates is not None:
            cols.append(self._prompt_negatives(q, v[inverse[:n_hist]], slots, gates,
                                               target_item, positives,
                                               hard_negatives if has_hard else None))
        logits_nce = torch.cat(cols, dim=1) / self.cfg.temperature
        labels = torch.arange(bsz, device=q.device)
        l_nce = F.cross_entropy(logits_nce, labels)
        item_acc = (logits_nce.argmax(-1) == labels).float().mean()
        return l_nce, item_acc

    def _catalogue_infonce(self, q: torch.Tensor, v: torch.Tensor, slots: PromptSlots | None,
                           gates: torch.Tensor | None, target_item: torch.Tensor,
                           positives: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A full softmax over the catalogue (``v`` holds every item's ṽ): the negatives are
        what the full-ranking evaluation competes against, not a small sample of them. The
        row's other positives are masked."""
        logits = q @ F.normalize(v.float(), dim=-1).T  # (B, N)
        if gates is not None:
            logits = logits + item_bias(gates, column_counts(slots, v.shape[0]),
                                        self.cfg.temperature)
        if positives is not None and positives.numel():
            other = torch.zeros_like(logits, dtype=torch.bool)
            other.scatter_(1, positives.clamp(min=0), positives >= 0)
            other[torch.arange(len(target_item), device=logits.device), target_item] = False
            logits = logits.masked_fill(other, -torch.inf)
        logits = logits / self.cfg.temperature
        acc = (logits.argmax(-1) == target_item).float().mean()
        return F.cross_entropy(logits, target_item), acc

    def _prompt_negatives(self, q: torch.Tensor, v_hist: torch.Tensor, slots: PromptSlots,
                          gates: torch.Tensor, target_item: torch.Tensor,
                          positives: torch.Tensor | None, hard: torch.Tensor | None
                          ) -> torch.Tensor:
        """(B, J) InfoNCE columns of each row's own prompt items (repeat-aware models): the
        copy gates can only be calibrated against the items the prompt shows but the user did
        not buy next. Positives, padding, repeats within the row and items that already are a
        column (another row's target, a hard negative) are masked."""
        items = slots.items
        present = items >= 0
        vt = torch.zeros(*items.shape, v_hist.shape[-1], device=q.device, dtype=torch.float32)
        vt[present] = F.normalize(v_hist.float(), dim=-1)
        logits = torch.einsum("bh,bjh->bj", q, vt) + self.item_copy_bias(gates, slots, items)
        j = torch.arange(items.shape[1], device=items.device)
        earlier = (items[:, :, None] == items[:, None, :]) & (j[None, None, :] < j[None, :, None])
        bad = ~present | earlier.any(-1) | (items[:, :, None] == target_item[None, None, :]).any(-1)
        if positives is not None and positives.numel():
            bad |= (items[:, :, None] == positives[:, None, :]).any(-1)
        if hard is not None:
            bad |= (items[:, :, None] == hard[:, None, :]).any(-1)
        return logits.masked_fill(bad, -torch.inf)

    def _dense_losses(self, h: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, rows: torch.Tensor, v: torch.Tensor,
                      item_ids: torch.Tensor, hist_inverse: torch.Tensor,
                      sequence_mask: torch.Tensor, prompt: PromptSlots | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-item losses at every purchase-sequence item of the prompts (ours, not the
        paper's: thousands of SFT samples instead of its ~130M, so each prompt must teach more).

        An item is written ``<c_1>..<c_L><|item|>``: level lv's code is predicted from the
        state one token before ``<c_lv>`` (as the label's NTP), and the state at ``<c_L>`` (whose
        next token is the item) is the query, scored against every distinct item of the batch
        (in-batch negatives; the item itself appears once among them)."""
        n_levels = self.levels
        slots = ((input_ids == self.item_token_id) & attention_mask.bool()).nonzero()  # (N, 2)
        keep = sequence_mask.to(slots.device).bool().view(-1)
        if keep.numel() != slots.shape[0]:
            raise ValueError(f"sequence_mask has {keep.numel()} entries for {slots.shape[0]} "
                             "placeholders")
        r, c = slots[keep, 0], slots[keep, 1]
        zero = h.new_zeros((), dtype=torch.float32)
        if r.numel() == 0:
            return zero, zero
        target = hist_inverse[keep]  # index into the batch's distinct items
        codes = flat_to_codes(self.item_prefix[item_ids.view(-1)[keep]], self.codebook_sizes)
        gates = sub = before = None
        if prompt is not None and self.repeat is not None:
            # The copy term of a history position counts only the sequence items before it:
            # the context section summarises the whole history up to the cut, so it already
            # holds this position's own item (a label leak the evaluation prompts never have).
            gates = self.repeat(h[r, c - n_levels - 1])
            sub, before = prompt.rows(r), prompt.ranks()[keep]
        ntp = []
        for lv in range(n_levels):
            col = c - n_levels + lv - 1  # the token before <c_lv>
            bias = self.copy_bias(gates, sub, lv, codes, before, seq_only=True)
            logits = self.level_logits(h[r, col], lv, rows, bias)
            ntp.append(F.cross_entropy(logits, codes[:, lv]))
        qd = self.query_from_hidden(h[r, c - 1])
        sims = qd @ F.normalize(v.float(), dim=-1).T
        if gates is not None:
            # Columns are the batch's distinct items: count them through their distinct index.
            uniq_slots = torch.full_like(prompt.items, -1)
            uniq_slots[prompt.items >= 0] = hist_inverse
            counts = column_counts(sub.with_items(uniq_slots[r]), v.shape[0], before,
                                   seq_only=True)
            sims = sims + item_bias(gates, counts, self.cfg.temperature)
        return torch.stack(ntp).mean(), F.cross_entropy(sims / self.cfg.temperature, target)
